"""Early-exit selection on the dev split (never the test split): the paper's rule picks the state
most robust under the ready-made PGD attack; the stronger rule the one most robust under the
white-box attacks (ready-made, then adjoint with both pairings and unrolled at that state, and both
gradient ensembles, on what the ready-made attack left)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..gradients import GradientSource
from .dev import DevOutcome, attack_on_dev
from .results import EarlyExitSelection, StateRobustness
from .runner import AttackRunner
from .suites import AttackSpec


def white_box_sources(n: int) -> list[GradientSource]:
    """The estimators aimed at state n, and both gradient ensembles (each pairing of the adjoint)."""
    return [
        GradientSource("adjoint", n),
        GradientSource("adjoint", n, "fresh"),
        GradientSource("unrolled", n),
        GradientSource("adjoint", None),
        GradientSource("adjoint", None, "fresh"),
        GradientSource("unrolled", None),
    ]


def _best(per_state: list[StateRobustness], key: str) -> int:
    """Highest accuracy; ties go to higher clean accuracy, then to the earlier state."""
    return max(per_state, key=lambda s: (getattr(s, key), s.clean_acc, -s.state)).state


def select_early_exit(
    runner: AttackRunner,
    x_dev: Tensor,
    y_dev: Tensor,
    spec: AttackSpec,
    states: Optional[list[int]] = None,
) -> tuple[EarlyExitSelection, dict[str, DevOutcome]]:
    """Evaluate ``early:n`` for every state n on the dev examples given (and only those).

    Returns the selection and the dev attacks per defense, which the candidate selection extends.
    """
    states = states or list(range(1, runner.target.n_states + 1))
    n = len(y_dev)
    per_state, outcomes = [], {}
    bar = runner.bar(len(states) * (1 + len(white_box_sources(1))), n, f"dev early-exit selection ({spec.label})")
    for state in states:
        defense = f"early:{state}"
        outcome = attack_on_dev(runner, defense, spec, white_box_sources(state), x_dev, y_dev, bar=bar)
        outcomes[defense] = outcome
        per_state.append(StateRobustness(state=state, clean_acc=outcome.clean_acc,
                                         ready_made_acc=outcome.ready_made_acc, white_box_acc=outcome.acc_after_all()))
    bar.close()
    selection = EarlyExitSelection(
        split="dev",
        n_examples=n,
        ready_made_source=str(runner.target.ready_made),
        attack=spec.label,
        per_state=per_state,
        paper_rule=_best(per_state, "ready_made_acc"),
        white_box_rule=_best(per_state, "white_box_acc"),
    )
    return selection, outcomes
