"""Attack settings: named presets (the paper's PGD-10 / PGD-1000, AutoAttack standard / plus) and
the evaluation suites built from them (quick / paper / full)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Literal, Optional, get_args

from torch import Tensor

from ..attacks import APGD, APGDT, FABT, PGD, Attack, Square, ThreatModel
from ..attacks.pgd import confident_cross_entropy_sum, cross_entropy_sum
from ..errors import ConfigError

ALGORITHMS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "fab", "square")
Loss = Literal["ce", "ce-confident"]  # ce-confident: CE minus the prediction entropy (PGD only)
LOSSES: tuple[str, ...] = get_args(Loss)


@dataclass(frozen=True)
class AttackSpec:
    """One attack algorithm with its budget. ``alpha`` (PGD step) is relative to ε (0.25: 2/255 at 8/255)."""

    algorithm: str
    steps: int = 10
    restarts: int = 1
    n_targets: int = 9
    queries: int = 5000
    alpha: float = 0.25
    loss: Loss = "ce"

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown attack algorithm {self.algorithm!r}; valid: {', '.join(ALGORITHMS)}")
        if self.loss not in LOSSES or (self.loss != "ce" and self.algorithm != "pgd"):
            raise ConfigError(f"unknown loss {self.loss!r} for {self.algorithm}; valid: ce, and for pgd "
                              f"{', '.join(LOSSES[1:])}")

    @property
    def uses_gradients(self) -> bool:
        return self.algorithm != "square"

    @property
    def label(self) -> str:
        if self.algorithm == "pgd":
            suffix = "" if self.loss == "ce" else f"-{self.loss.removeprefix('ce-')}"
            return f"pgd{self.steps}" + (f"x{self.restarts}" if self.restarts > 1 else "") + suffix
        if self.algorithm == "square":
            return f"square{self.queries}"
        return self.algorithm + (f"x{self.restarts}" if self.restarts > 1 else "")

    def build(self, model: Callable[[Tensor], Tensor], threat: ThreatModel, seed: int,
              grad_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
              example_seeds: Optional[Tensor] = None) -> Attack:
        """The attack; ``grad_fn`` and ``example_seeds`` (per-example starts) reach PGD only."""
        a = self.algorithm
        if a == "pgd":
            loss = confident_cross_entropy_sum if self.loss == "ce-confident" else cross_entropy_sum
            return PGD(model, threat, steps=self.steps, alpha=self.alpha * threat.eps, restarts=self.restarts,
                       seed=seed, grad_fn=grad_fn if self.loss == "ce" else None, example_seeds=example_seeds, loss=loss)
        if a in ("apgd-ce", "apgd-dlr"):
            return APGD(model, threat, steps=self.steps, restarts=self.restarts, loss=a.split("-")[1], seed=seed)
        if a == "apgd-t":
            return APGDT(model, threat, steps=self.steps, n_targets=self.n_targets, restarts=self.restarts, seed=seed)
        if a in ("fab-t", "fab"):
            return FABT(model, threat, steps=self.steps, n_targets=self.n_targets, restarts=self.restarts,
                        targeted=a == "fab-t", seed=seed)
        return Square(model, threat, queries=self.queries, restarts=self.restarts, seed=seed)


PRESETS: dict[str, list[AttackSpec]] = {
    "pgd10": [AttackSpec("pgd", steps=10)],
    "pgd1000": [AttackSpec("pgd", steps=1000)],
    "autoattack-standard": [
        AttackSpec("apgd-ce", steps=100),
        AttackSpec("apgd-t", steps=100, n_targets=9),
        AttackSpec("fab-t", steps=100, n_targets=9),
        AttackSpec("square", queries=5000),
    ],
    "autoattack-plus": [
        AttackSpec("apgd-ce", steps=100, restarts=5),
        AttackSpec("apgd-dlr", steps=100, restarts=5),
        AttackSpec("fab", steps=100, restarts=5),
        AttackSpec("square", queries=5000),
        AttackSpec("apgd-t", steps=100, n_targets=9),
        AttackSpec("fab-t", steps=100, n_targets=9),
    ],
}


@dataclass(frozen=True)
class Suite:
    """What the protocol runs for each defense.

    * ``matrix``: run standalone with every gradient source on every clean-correct example — the
      paper's tables (Tables 2–3) and its "minimum over attacks".
    * ``cascade``: gradient attacks run with every gradient source, each only on the examples no
      earlier attack broke (AutoAttack's cascade); then ``square`` once per defense.
    * ``standalone``: extra standalone attacks with the listed sources only (``"exact"``,
      ``"phantom"``, ``"none"`` for Square), e.g. the paper's Table 1 (PGD-1000, Square).
    * ``dev_examples``: dev examples for the early-exit and candidate selections;
      ``sanity_examples``: examples for the ε-growth and iteration-doubling checks.
    * ``adaptive``: choose the attack candidates on the dev split (see
      :mod:`deqrobust.evaluate.candidates`): the matrix runs the paper-table sources and the
      ``top_k`` strongest, the cascade (``boost`` first, then ``cascade``) only the ``top_k``. An
      exhaustive run (``evaluate(..., exhaustive=True)``, or a suite with ``adaptive=False``) attacks
      with every source in the matrix and in the cascade, and skips ``boost``.
    """

    name: str
    matrix: AttackSpec
    cascade: tuple[AttackSpec, ...]
    square: Optional[AttackSpec]
    standalone: tuple[tuple[AttackSpec, tuple[str, ...]], ...] = ()
    dev_examples: int = 200
    sanity_examples: int = 64
    eps_multipliers: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    adjoint_variant: str = "loss"
    adaptive: bool = True
    top_k: int = 3
    boost: tuple[AttackSpec, ...] = ()
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("dev_examples", "sanity_examples", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"suite {self.name!r}: {name} must be a positive integer, got {value!r}")

    def describe(self, eps: Optional[float] = None) -> dict:
        """The settings, for the results JSON: every attack with its label, the named presets it
        belongs to (e.g. ``autoattack-standard``) and, given ``eps``, PGD's absolute step size."""

        def entry(spec: AttackSpec, data: dict) -> dict:
            data["label"] = spec.label
            data["presets"] = [name for name, specs in PRESETS.items() if spec in specs]
            if spec.algorithm == "pgd" and eps is not None:
                data["step"] = spec.alpha * eps
            return data

        data = asdict(self)
        entry(self.matrix, data["matrix"])
        for spec, item in zip(self.cascade, data["cascade"]):
            entry(spec, item)
        for spec, item in zip(self.boost, data["boost"]):
            entry(spec, item)
        if self.square is not None:
            entry(self.square, data["square"])
        data["standalone"] = [{**entry(spec, asdict(spec)), "sources": list(srcs)} for spec, srcs in self.standalone]
        return data


def _aa(preset: str) -> tuple[tuple[AttackSpec, ...], Optional[AttackSpec]]:
    specs = PRESETS[preset]
    return tuple(s for s in specs if s.uses_gradients), next((s for s in specs if not s.uses_gradients), None)


SUITES: dict[str, Suite] = {
    # Small budgets for a first look and for CI: every source × every algorithm, cut-down iterations.
    "quick": Suite(
        "quick",
        matrix=AttackSpec("pgd", steps=10),
        cascade=(
            AttackSpec("apgd-ce", steps=6),
            AttackSpec("apgd-t", steps=5, n_targets=1),
            AttackSpec("fab-t", steps=5, n_targets=1),
        ),
        square=AttackSpec("square", queries=250),
        dev_examples=80,
        sanity_examples=48,
        boost=(AttackSpec("pgd", steps=10, restarts=2), AttackSpec("apgd-t", steps=5, n_targets=1, restarts=3)),
    ),
    # The paper's settings: PGD-10 matrix, AutoAttack (standard) with every source.
    "paper": Suite("paper", matrix=PRESETS["pgd10"][0], cascade=_aa("autoattack-standard")[0],
                   square=_aa("autoattack-standard")[1], dev_examples=1000, sanity_examples=200),
    # The paper's Table 2: the PGD-10 matrix only (no cascade).
    "pgd10": Suite("pgd10", matrix=PRESETS["pgd10"][0], cascade=(), square=None, dev_examples=1000,
                   sanity_examples=200, adaptive=False),
    # The paper's Table 1: ready-made PGD-10 / PGD-1000 with exact and phantom gradients, and Square.
    "table1": Suite("table1", matrix=PRESETS["pgd10"][0], cascade=(), square=None,
                    standalone=((PRESETS["pgd1000"][0], ("exact", "phantom")), (AttackSpec("square", queries=5000), ("none",))),
                    dev_examples=1000, sanity_examples=200, adaptive=False),
    # Strongest: PGD-10 matrix, PGD-1000 and AutoAttack plus with every source.
    "full": Suite("full", matrix=PRESETS["pgd10"][0],
                  cascade=(AttackSpec("pgd", steps=1000),) + _aa("autoattack-plus")[0],
                  square=_aa("autoattack-plus")[1], dev_examples=1000, sanity_examples=200),
}


def get_suite(name: str, **overrides) -> Suite:
    """A named suite, optionally with fields replaced (e.g. ``dev_examples=50``)."""
    try:
        suite = SUITES[name]
    except KeyError:
        raise ConfigError(f"unknown suite {name!r}; valid: {', '.join(SUITES)}") from None
    return replace(suite, **overrides) if overrides else suite
