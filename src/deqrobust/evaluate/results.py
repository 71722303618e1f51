"""Result dataclasses, serialised to JSON with RobustBench's field names (``clean_acc``,
``autoattack_acc``, ``eps``, ``threat_model`` — both accuracies of the best defense) plus our
attack × defense matrix. The schema is
documented in ``schema.json`` next to this file. Accuracies are percentages; each test accuracy
carries its 95 % Wilson interval (``interval``, ``intervals``, ``*_interval``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Literal, Optional

from torch import Tensor

from ..utils.stats import INTERVAL_METHOD, with_interval

CheckStatus = Literal["pass", "fail", "inconclusive"]


@dataclass
class AttackCell:
    """One attack with one gradient source on one defense.

    ``mode`` is ``"matrix"`` (standalone on every clean-correct example: ``robust_acc`` is that
    attack's accuracy) or ``"cascade"`` (only on examples nothing before it broke:
    ``robust_acc`` is the accuracy after it, AutoAttack-style).
    """

    attack: str
    source: str
    mode: str
    n_attacked: int
    n_broken: int
    robust_acc: float
    grad_computed: int = 0
    grad_zero: int = 0
    grad_nonfinite: int = 0
    n_nonfinite: int = 0
    seconds: float = 0.0
    interval: list[float] = field(default_factory=list)  # 95 % Wilson interval of robust_acc


@dataclass
class CheckResult:
    """An obfuscation sanity check: its verdict and the numbers behind it.

    ``status`` is ``"pass"``, ``"fail"`` or ``"inconclusive"`` — a check that could not have failed
    at this size (``passed`` is then ``None``, and ``details["needs"]`` says what it would need).

    Example:
        >>> CheckResult("gradients", True).status, CheckResult("eps_growth", None).status
        ('pass', 'inconclusive')
    """

    name: str
    passed: Optional[bool]
    details: dict[str, Any] = field(default_factory=dict)
    status: CheckStatus = field(init=False, default="pass")

    def __post_init__(self) -> None:
        self.status = "inconclusive" if self.passed is None else ("pass" if self.passed else "fail")

    @property
    def failed(self) -> bool:
        return self.passed is False


def checks_verdict(checks: list[CheckResult], fail: str = "FAIL") -> str:
    """One line for a defense's checks: the failed ones, the inconclusive ones, and how many passed —
    never "pass" for a check that could not have failed.

    Example:
        >>> checks_verdict([CheckResult("gradients", True), CheckResult("more_iterations", None)])
        '1 pass; inconclusive: more_iterations'
    """
    failed = [c.name for c in checks if c.status == "fail"]
    open_ = [c.name for c in checks if c.status == "inconclusive"]
    passed = sum(c.status == "pass" for c in checks)
    parts = ([f"{fail}: " + ", ".join(failed)] if failed else []) + ([f"inconclusive: {', '.join(open_)}"] if open_ else [])
    if not parts:
        return "pass"
    return "; ".join(([f"{passed} pass"] if passed else []) + parts) if not failed else "; ".join(parts)


@dataclass
class DefenseResult:
    defense: str
    clean_acc: float
    worst_case_acc: float
    min_over_attacks_acc: float
    min_over_attacks_attack: str
    n_nonfinite_clean: int
    n_nonfinite_adversarial: int
    table: dict[str, Any]
    matrix: list[AttackCell]
    cascade: list[AttackCell]
    sanity_checks: list[CheckResult]
    seconds: float
    robust: list[bool] = field(default_factory=list)  # per test example: survived every attack
    broken_by: dict[int, str] = field(default_factory=dict)  # test index -> "attack|source" that broke it, or "clean"
    intervals: dict[str, list[float]] = field(default_factory=dict)  # 95 % Wilson interval per accuracy field
    adversarial: Optional[Tensor] = field(default=None, repr=False, compare=False)  # return_adversarial=True only
    # a purified defense only: each attack family's accuracy, the non-adaptive number, the checks that catch it
    follow_up: Optional[dict[str, Any]] = None


@dataclass
class StateRobustness:
    """Dev-split numbers of the early-exit defense at one state (paper Fig. 2a)."""

    state: int
    clean_acc: float
    ready_made_acc: float
    white_box_acc: float
    intervals: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class EarlyExitSelection:
    """The early-exit step chosen on the dev split by the paper's rule (best under ready-made
    PGD) and by the stronger rule (best under the white-box attacks)."""

    split: str
    n_examples: int
    ready_made_source: str
    attack: str
    per_state: list[StateRobustness]
    paper_rule: int
    white_box_rule: int


@dataclass
class SourceOnDev:
    """One gradient source's PGD attack on one defense, on the dev split: what it broke among the
    examples the ready-made attack left standing, and the robust accuracy after both."""

    source: str
    extra_broken: int
    dev_acc: float
    interval: list[float] = field(default_factory=list)


@dataclass
class DefenseCandidates:
    """The candidates kept for one defense, chosen from every source's dev numbers: ``matrix`` (the
    paper-table sources and the ``cascade`` ones) attacks every test example standalone; ``cascade``
    (the ready-made source and the strongest others) runs the AutoAttack algorithms. ``pairing``
    is the adjoint pairing kept per state (``"1"``..``"N"``, ``"ensemble"``), ``intermediate_state``
    the state n < N of the paper's "intermediate" column per estimator, ``columns`` the source of
    each paper-table column (``adjoint_final``, ``adjoint_intermediate``, ...)."""

    defense: str
    clean_acc: float
    ready_made_acc: float
    white_box_acc: float
    sources: list[SourceOnDev]
    pairing: dict[str, str]
    intermediate_state: dict[str, Optional[int]]
    columns: dict[str, str]
    matrix: list[str]
    cascade: list[str]
    intervals: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class CandidateSelection:
    """Attack candidates chosen per defense on the dev split (never the test split)."""

    split: str
    n_examples: int
    attack: str
    top_k: int
    defenses: list[DefenseCandidates]

    def for_defense(self, name: str) -> DefenseCandidates:
        for d in self.defenses:
            if d.defense == name:
                return d
        raise KeyError(f"no candidates for defense {name!r}")


@dataclass
class EvaluationResult:
    deqrobust_version: str
    model: dict[str, Any]
    dataset: str
    threat_model: str
    eps: float
    n_examples: int
    seed: int
    suite: dict[str, Any]
    clean_acc: float
    autoattack_acc: float
    best_defense: str
    best_defense_checks_passed: bool
    undefended_clean_acc: float
    model_at_chance: bool
    defenses: list[DefenseResult]
    early_exit: Optional[EarlyExitSelection]
    candidate_selection: Optional[CandidateSelection]
    protocol: dict[str, Any]
    estimate: dict[str, Any]
    residuals: dict[str, Any]
    data_access: list[dict[str, Any]]
    timing: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    best_defense_rule: str = ""  # how the headline defense was fixed before the test split was read
    clean_acc_interval: list[float] = field(default_factory=list)
    autoattack_acc_interval: list[float] = field(default_factory=list)
    undefended_clean_acc_interval: list[float] = field(default_factory=list)
    interval_method: str = INTERVAL_METHOD

    def to_dict(self) -> dict[str, Any]:
        """Everything but the adversarial examples (``return_adversarial=True``), as JSON types."""
        held = [d.adversarial for d in self.defenses]
        for d in self.defenses:
            d.adversarial = None
        try:
            data = asdict(self)
        finally:
            for d, points in zip(self.defenses, held):
                d.adversarial = points
        for entry in data["defenses"]:
            entry.pop("adversarial")
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def defense(self, name: str) -> DefenseResult:
        for d in self.defenses:
            if d.defense == name:
                return d
        raise KeyError(f"no defense {name!r}; evaluated: {', '.join(d.defense for d in self.defenses)}")

    def summary(self) -> str:
        """A short table: per defense, clean and worst-case accuracy with their 95 % intervals and
        the checks; the headline and how it was chosen."""
        n = self.n_examples
        rows = [f"{'defense':<22} {'clean':<22} {'worst case':<22} checks"]
        for d in self.defenses:
            mark = " *" if d.defense == self.best_defense else ""
            rows.append(f"{d.defense + mark:<22} {with_interval(d.clean_acc, n):<22} {with_interval(d.worst_case_acc, n):<22} "
                        f"{checks_verdict(d.sanity_checks)}")
        rows.append(f"* {self.headline()}; {self.threat_model} eps={self.eps:.4g}, {self.dataset}")
        return "\n".join(rows)

    def headline(self) -> str:
        """The headline sentence: the defense fixed on dev, its accuracies with 95 % intervals, the rule."""
        n = self.n_examples
        return (f"{self.best_defense} — worst-case robust accuracy {with_interval(self.autoattack_acc, n)}%, clean "
                f"{with_interval(self.clean_acc, n)}% ({self.interval_method}; {n} examples). Chosen: "
                f"{self.best_defense_rule}")

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (f"EvaluationResult(best_defense={self.best_defense!r}, autoattack_acc={self.autoattack_acc:.2f}, "
                f"clean_acc={self.clean_acc:.2f}, n_examples={self.n_examples}, threat_model={self.threat_model!r}, "
                f"eps={self.eps:.4g}, defenses={[d.defense for d in self.defenses]})")


def result_schema() -> dict[str, Any]:
    """The JSON Schema of ``results.json``."""
    text = resources.files("deqrobust.evaluate").joinpath("schema.json").read_text()
    return json.loads(text)
