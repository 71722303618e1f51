"""Attacks on the dev split, shared by the early-exit selection and the candidate selection.

For one defense, the ready-made source attacks every clean-correct dev example; every other source
then attacks the examples the ready-made attack left standing. A source's dev number is therefore
what it adds to an off-the-shelf attack. Each attack is one unit of the resumable state, keyed by
(defense, attack, source) only, so the candidate selection of ``early:n`` reuses what the early-exit
selection already ran on ``early:n``: no dev attack runs twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from torch import Tensor
from tqdm.auto import tqdm

from ..gradients import GradientSource
from .runner import AttackRunner, percent
from .suites import AttackSpec


@dataclass
class DevOutcome:
    """What the dev attacks broke on one defense (indices into the dev examples)."""

    defense: str
    n_examples: int
    correct: Tensor
    ready_made: GradientSource
    ready_broken: list[int]
    broken: dict[str, list[int]] = field(default_factory=dict)

    @property
    def clean_acc(self) -> float:
        return percent(self.correct)

    def survivors(self) -> Tensor:
        """Clean-correct examples the ready-made attack did not break."""
        alive = self.correct.clone()
        alive[self.ready_broken] = False
        return alive

    @property
    def ready_made_acc(self) -> float:
        return percent(self.survivors())

    def extra(self, source: str) -> int:
        """Examples ``source`` broke among those the ready-made attack left standing."""
        return len(self.broken[source])

    def acc_after(self, source: str) -> float:
        """Robust accuracy after the ready-made attack and ``source``."""
        alive = self.survivors()
        alive[self.broken[source]] = False
        return percent(alive)

    def acc_after_all(self) -> float:
        """Robust accuracy after the ready-made attack and every other source (per-example AND)."""
        alive = self.survivors()
        for broken in self.broken.values():
            alive[broken] = False
        return percent(alive)


def attack_on_dev(runner: AttackRunner, defense: str, spec: AttackSpec, sources: Sequence[GradientSource],
                  x: Tensor, y: Tensor, bar: Optional[tqdm] = None,
                  outcome: Optional[DevOutcome] = None) -> DevOutcome:
    """Attack ``defense`` on the dev examples with the ready-made source, then with each of
    ``sources`` on its survivors; extend ``outcome`` (same defense) when given."""
    key = f"dev/{defense}/{spec.label}"
    ready = runner.target.ready_made
    if outcome is None:
        correct, _ = runner.clean(defense, x, y)
        res = runner.run(f"{key}/{ready}", defense, spec, ready, x, y, correct, bar=bar)
        outcome = DevOutcome(defense, len(y), correct, ready, res.broken)
    alive = outcome.survivors()
    for source in sources:
        name = str(source)
        if source == ready or name in outcome.broken:
            continue
        outcome.broken[name] = runner.run(f"{key}/{name}", defense, spec, source, x, y, alive, bar=bar).broken
    return outcome
