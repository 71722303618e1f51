"""Early-exit selection on the dev split (never the test split): the paper's rule picks the state
most robust under the ready-made PGD attack; the stronger rule the one most robust under the
white-box attacks (ready-made, adjoint and unrolled at that state, and both gradient ensembles)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..gradients import GradientSource
from .results import EarlyExitSelection, StateRobustness
from .runner import AttackRunner, percent
from .suites import AttackSpec


def white_box_sources(n: int, ready_made: str) -> list[GradientSource]:
    return [
        GradientSource(ready_made),
        GradientSource("adjoint", n),
        GradientSource("unrolled", n),
        GradientSource("adjoint", None),
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
    progress: bool = True,
    states: Optional[list[int]] = None,
) -> EarlyExitSelection:
    """Evaluate ``early:n`` for every state n on the dev examples given (and only those)."""
    model = runner.model
    ready_made = model.grad
    states = states or list(range(1, model.n_states + 1))
    n = len(y_dev)
    per_state = []
    total = len(states) * len(white_box_sources(1, ready_made)) * runner.bar_share(n)
    bar = tqdm(total=total, desc=f"dev early-exit selection ({spec.label})", disable=not progress, leave=False, unit="ex")
    for state in states:
        defense = f"early:{state}"
        correct, _, _ = runner.clean(defense, x_dev, y_dev)
        key = f"select/{defense}/{spec.label}"
        alone = runner.run(f"{key}/{ready_made}", defense, spec, GradientSource(ready_made), x_dev, y_dev, correct, bar=bar)
        ready_robust = correct.clone()
        ready_robust[alone.broken] = False
        robust = ready_robust.clone()
        for source in white_box_sources(state, ready_made)[1:]:
            res = runner.run(f"{key}/{source}", defense, spec, source, x_dev, y_dev, robust, bar=bar)
            robust[res.broken] = False
        per_state.append(
            StateRobustness(
                state=state,
                clean_acc=percent(correct),
                ready_made_acc=percent(ready_robust),
                white_box_acc=percent(robust),
            )
        )
    bar.close()
    return EarlyExitSelection(
        split="dev",
        n_examples=n,
        ready_made_source=ready_made,
        attack=spec.label,
        per_state=per_state,
        paper_rule=_best(per_state, "ready_made_acc"),
        white_box_rule=_best(per_state, "white_box_acc"),
    )
