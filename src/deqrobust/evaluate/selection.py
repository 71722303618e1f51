"""Early-exit selection on the dev split (never the test split): the paper's rule picks the state
most robust under the ready-made PGD attack; the stronger rule the one most robust under the
white-box attacks (ready-made, then adjoint with both pairings and unrolled at that state, and both
gradient ensembles, on what the ready-made attack left). The attacks are the dev phase's
(:mod:`deqrobust.evaluate.dev`); this module reads their outcomes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from ..gradients import GradientSource
from .results import EarlyExitSelection, StateRobustness

if TYPE_CHECKING:
    from .dev import DevOutcome


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


def select_early_exit(outcomes: Mapping[str, "DevOutcome"], n_states: int, attack: str) -> EarlyExitSelection:
    """Both rules over ``early:1..N``'s dev outcomes (each defense's white-box sources only, even
    where the dev phase ran more)."""
    per_state = []
    for state in range(1, n_states + 1):
        outcome = outcomes[f"early:{state}"]
        per_state.append(StateRobustness(state=state, clean_acc=outcome.clean_acc, ready_made_acc=outcome.ready_made_acc,
                                         white_box_acc=outcome.acc_after(*map(str, white_box_sources(state)))))
    first = outcomes["early:1"]
    return EarlyExitSelection(
        split="dev",
        n_examples=first.n_examples,
        ready_made_source=str(first.ready_made),
        attack=attack,
        per_state=per_state,
        paper_rule=_best(per_state, "ready_made_acc"),
        white_box_rule=_best(per_state, "white_box_acc"),
    )
