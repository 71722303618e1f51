"""What each paper table / figure needs: the trainings (shipped configs) and the evaluation suite,
at the paper's scale (CIFAR-10, GPU) or scaled down to the offline default dataset: ``tiny`` (the
shipped digits configs) and, for ``table1`` and ``fig2``, ``small`` (the digits setting of the
fixed-point study, docs/fixed-point-study.md, with the largest gap among those that kept a residual)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from ..errors import ConfigError

TARGETS = ("table1", "table2", "table3", "table4", "fig2", "followup")
SCALES = ("paper", "small", "tiny")
SMALL_TARGETS = ("table1", "fig2")  # the targets about a lost fixed point: the only ones the study's setting serves


@dataclass(frozen=True)
class Run:
    """One training run: ``key`` names it in tables, ``config`` is a shipped config name."""

    key: str
    label: str
    config: str
    overrides: tuple[str, ...] = ()
    random_depth: bool = False  # also evaluated at a random depth with EOT (random intermediate states)
    defenses: Optional[tuple[str, ...]] = None  # this run's, instead of the experiment's


@dataclass(frozen=True)
class Experiment:
    target: str
    title: str
    runs: tuple[Run, ...]
    suite: str
    defenses: Optional[tuple[str, ...]] = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def defenses_for(self, run: Run) -> Optional[tuple[str, ...]]:
        """The defenses ``run`` is evaluated with: its own when it names them, else the experiment's."""
        return run.defenses if run.defenses is not None else self.defenses


# Paper-scale runs (CIFAR-10, L-inf 8/255).
LARGE_UNROLL = Run("unrolling_trained_8_7", "DEQ-Large, unrolling-trained 8/7", "cifar10-large-unroll-8-7")
LARGE_EXACT_8_7 = Run("exact_trained_8_7", "DEQ-Large, exact-trained 8/7", "cifar10-large-exact-8-7")
LARGE_EXACT_50 = Run("exact_trained_50_50", "DEQ-Large, exact-trained 50/50", "cifar10-large-exact-50-50")
XL_UNROLL = Run("xl", "DEQ-XL, unrolling-trained 8/7", "cifar10-xl-unroll-8-7")
RESNET18 = Run("ResNet-18", "ResNet-18, PGD-AT", "cifar10-resnet18-pgdat")
WRN = Run("WRN-34-10", "WRN-34-10, PGD-AT", "cifar10-wrn34-10-pgdat")
LARGE_RANDOM_STATES = Run("random_states", "DEQ-Large, random intermediate states (TRADES)", "cifar10-large-random-states",
                          random_depth=True)

# The same pipeline on scikit-learn digits (8x8, L-inf 0.1) with CPU-sized models.
TINY: dict[str, Run] = {
    LARGE_UNROLL.config: Run(LARGE_UNROLL.key, "MDEQ-tiny, unrolling-trained 8/7 (digits)", "digits-tiny-unroll"),
    LARGE_EXACT_8_7.config: Run(LARGE_EXACT_8_7.key, "MDEQ-tiny, exact-trained 8/7 (digits)", "digits-tiny-exact"),
    LARGE_EXACT_50.config: Run(LARGE_EXACT_50.key, "MDEQ-tiny, exact-trained 16/16 (digits; 50/50 scaled down)",
                               "digits-tiny-exact", ("deq.f_max_iter=16", "deq.b_max_iter=16")),
    XL_UNROLL.config: Run(XL_UNROLL.key, "MDEQ-small, unrolling-trained 8/7 (digits)", "digits-tiny-unroll",
                          ("model.name=mdeq-small",)),
    RESNET18.config: Run(RESNET18.key, "ResNet-18, PGD-AT (digits)", "digits-resnet18-pgdat"),
    LARGE_RANDOM_STATES.config: Run(LARGE_RANDOM_STATES.key, "MDEQ-tiny, random intermediate states (digits)",
                                    "digits-tiny-random-states", random_depth=True),
}

# The fixed-point study's setting with the largest gap between ready-made exact-gradient PGD-10 and the per-example
# worst case among those whose residual stayed above 0.2 (docs/fixed-point-study.md; the larger gap at eps 0.2 is a
# converged model's), and its unrolling-trained twin (the same overrides).
SMALL_SETTING = "exact-nojac-4-3-20ep"
SMALL_OVERRIDES = ("jacobian.weight=0", "run.epochs=20", "deq.f_max_iter=4", "deq.b_max_iter=3")
SMALL: dict[str, Run] = {
    LARGE_EXACT_8_7.config: Run(LARGE_EXACT_8_7.key, f"MDEQ-tiny, exact-trained 4/3, no Jacobian term, 20 epochs "
                                f"(digits; the study's {SMALL_SETTING})", "digits-tiny-exact", SMALL_OVERRIDES),
    LARGE_UNROLL.config: Run(LARGE_UNROLL.key, "MDEQ-tiny, unrolling-trained 4/3, no Jacobian term, 20 epochs "
                             "(digits; its unrolling-trained twin)", "digits-tiny-unroll", SMALL_OVERRIDES),
}

EXPERIMENTS: dict[str, Experiment] = {
    "table1": Experiment("table1", "Table 1: exact-trained DEQ-Large 8/7 under ready-made attacks",
                         (LARGE_EXACT_8_7,), "table1", ("final",)),
    "table2": Experiment("table2", "Table 2: PGD-10 white-box matrix (unrolling-trained 8/7 vs exact-trained 50/50)",
                         (LARGE_UNROLL, LARGE_EXACT_50), "pgd10"),
    "table3": Experiment("table3", "Table 3: unrolling-trained DEQs under PGD-10 and AutoAttack",
                         (LARGE_UNROLL, XL_UNROLL), "paper"),
    "table4": Experiment("table4", "Table 4: DEQs (ensemble defense, weakest attack) vs deep networks",
                         (LARGE_UNROLL, XL_UNROLL, RESNET18, WRN), "paper"),
    "fig2": Experiment("fig2", "Figure 2: robustness per state (a) and fixed-point residuals (b)",
                       (LARGE_EXACT_8_7, LARGE_EXACT_50, LARGE_UNROLL), "pgd10"),
    "followup": Experiment("followup", "The follow-up (Yang et al., ICML 2023): random intermediate states and input "
                           "entropy reduction, judged adaptively",
                           (replace(LARGE_RANDOM_STATES, defenses=("final", "entropy")), LARGE_UNROLL), "quick",
                           ("entropy",),
                           ("each model with input entropy reduction (released settings, read at z_(N-1)) and without "
                            "it (its static twin, the same state read without purification); the random-states model "
                            "also at full depth (final) and at a random depth with EOT",)),
}


def experiment(target: str, scale: str) -> Experiment:
    """The experiment for ``target`` at ``scale`` (tiny: digits configs, the quick suite; small: the
    fixed-point study's setting, ``table1`` and ``fig2`` only).

    Example:
        >>> [run.config for run in experiment("fig2", "small").runs]
        ['digits-tiny-exact', 'digits-tiny-unroll']
    """
    if target not in EXPERIMENTS:
        raise ConfigError(f"unknown reproduction target {target!r}; valid: {', '.join(TARGETS)}")
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    if scale == "small" and target not in SMALL_TARGETS:
        raise ConfigError(f"--scale small exists for {' and '.join(SMALL_TARGETS)} only (the fixed-point study's "
                          f"setting); use --scale tiny for {target}")
    exp = EXPERIMENTS[target]
    if scale == "paper":
        return exp
    scaled = TINY if scale == "tiny" else SMALL
    runs = tuple(replace(scaled[r.config], defenses=r.defenses) for r in exp.runs if r.config in scaled)
    dropped = [r.label for r in exp.runs if r.config not in scaled]
    notes = tuple(f"{label}: GPU scale only, left out at --scale {scale}" for label in dropped)
    suite = {"table1": "table1", "table2": "pgd10", "fig2": "pgd10"}.get(target, "quick")
    title = " — tiny scale (digits)" if scale == "tiny" else f" — small scale (digits, the fixed-point study's {SMALL_SETTING})"
    return Experiment(exp.target, exp.title + title, runs, suite, exp.defenses, exp.notes + notes)
