"""Result dataclasses, serialised to JSON with RobustBench's field names (``clean_acc``,
``autoattack_acc``, ``eps``, ``threat_model`` — both accuracies of the best defense) plus our
attack × defense matrix. The schema is
documented in ``schema.json`` next to this file. Accuracies are percentages."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Optional


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


@dataclass
class CheckResult:
    """An obfuscation sanity check: its verdict and the numbers behind it."""

    name: str
    passed: bool
    details: dict[str, Any] = field(default_factory=dict)


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


@dataclass
class StateRobustness:
    """Dev-split numbers of the early-exit defense at one state (paper Fig. 2a)."""

    state: int
    clean_acc: float
    ready_made_acc: float
    white_box_acc: float


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def defense(self, name: str) -> DefenseResult:
        for d in self.defenses:
            if d.defense == name:
                return d
        raise KeyError(f"no defense {name!r}; evaluated: {', '.join(d.defense for d in self.defenses)}")


def result_schema() -> dict[str, Any]:
    """The JSON Schema of ``results.json``."""
    text = resources.files("deqrobust.evaluate").joinpath("schema.json").read_text()
    return json.loads(text)
