"""Choices made on the dev split (never the test split): the headline defense
(:func:`select_headline`), and the early-exit state — the paper's rule picks the state
most robust under the ready-made PGD attack; the stronger rule the one most robust under the
white-box attacks (ready-made, then adjoint with both pairings and unrolled at that state, and both
gradient ensembles, on what the ready-made attack left). The attacks are the dev phase's
(:mod:`deqrobust.evaluate.dev`); this module reads their outcomes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from ..utils.stats import interval_of
from .plan import white_box_sources
from .results import EarlyExitSelection, StateRobustness

if TYPE_CHECKING:
    from .dev import DevOutcome


def _best(per_state: list[StateRobustness], key: str) -> int:
    """Highest accuracy; ties go to higher clean accuracy, then to the earlier state."""
    return max(per_state, key=lambda s: (getattr(s, key), s.clean_acc, -s.state)).state


def select_early_exit(outcomes: Mapping[str, "DevOutcome"], n_states: int, attack: str) -> EarlyExitSelection:
    """Both rules over ``early:1..N``'s dev outcomes (each defense's white-box sources only, even
    where the dev phase ran more)."""
    per_state = []
    for state in range(1, n_states + 1):
        outcome = outcomes[f"early:{state}"]
        accs = {"clean_acc": outcome.clean_acc, "ready_made_acc": outcome.ready_made_acc,
                "white_box_acc": outcome.acc_after(*map(str, white_box_sources(state)))}
        per_state.append(StateRobustness(state=state, **accs,
                                         intervals={k: interval_of(v, outcome.n_examples) for k, v in accs.items()}))
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


def select_headline(outcomes: Mapping[str, "DevOutcome"], defenses: Sequence[str],
                    named: Optional[str] = None) -> tuple[str, str]:
    """The headline defense and how it was chosen, fixed before the test split is read: the one
    the user ``named``; else the one with the best worst case on dev over the dev attacks (ties:
    higher dev clean accuracy, then the earlier defense); else (no dev split) ``final``.

    Example:
        >>> select_headline({}, ["final", "ensemble"])
        ('final', 'no dev split: the undefended output, fixed before the test split was read')
    """
    if named is not None:
        return named, "named by the user"
    if len(defenses) == 1:
        return defenses[0], "the only defense evaluated"
    covered = [d for d in defenses if d in outcomes]
    if len(covered) < len(defenses):
        if "final" in defenses:
            return "final", "no dev split: the undefended output, fixed before the test split was read"
        return defenses[0], "no dev split: the first defense asked for, fixed before the test split was read"
    order = {d: i for i, d in enumerate(defenses)}
    best = max(covered, key=lambda d: (outcomes[d].acc_after_all(), outcomes[d].clean_acc, -order[d]))
    chosen = outcomes[best]
    return best, (f"the best worst case on dev ({chosen.acc_after_all():.2f}% of {chosen.n_examples} dev examples, "
                  "over the dev attacks), fixed before the test split was read")
