"""The dev phase: the attacks on the dev split that the early-exit selection and the candidate
selection read (:func:`~deqrobust.evaluate.runs.dev_runs` lists them).

For each defense attacked on dev, the ready-made source attacks every clean-correct dev example;
every other source then attacks the examples the ready-made attack left standing. A source's dev
number is therefore what it adds to an off-the-shelf attack. A source whose gradient never reads
the defense (the intermediate-state estimators) attacks every defense with **one** trajectory,
judged on all of them from one solve (:meth:`~deqrobust.evaluate.runner.AttackRunner.run_shared`):
each defense gets what its own run would have given. The early-exit selection and the candidate
selection read the same outcomes; no dev attack runs twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from ..gradients import GradientSource
from .runner import AttackRunner, percent
from .runs import dev_runs, share_groups

if TYPE_CHECKING:
    from .plan import EvaluationPlan


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

    def acc_after(self, *sources: str) -> float:
        """Robust accuracy after the ready-made attack and ``sources`` (per-example AND)."""
        alive = self.survivors()
        for source in sources:
            alive[self.broken[source]] = False
        return percent(alive)

    def acc_after_all(self) -> float:
        """Robust accuracy after the ready-made attack and every other source run on dev."""
        return self.acc_after(*self.broken)


def run_dev_phase(runner: AttackRunner, plan: "EvaluationPlan", x: Tensor, y: Tensor) -> dict[str, DevOutcome]:
    """Run the plan's dev attacks on ``(x, y)`` (dev examples only); the outcome per defense."""
    runs = dev_runs(plan)
    leaders = {group[0]: group for group in share_groups(plan, runs)}
    eps = runner.threat.eps
    outcomes: dict[str, DevOutcome] = {}
    bar = runner.bar(len(runs), len(y), f"dev attacks ({plan.suite.matrix.label}, {len(plan.dev_defenses())} defenses)")
    for i, run in enumerate(runs):
        name, source = str(run.defense), run.source
        if not isinstance(source, GradientSource):
            raise ValueError(f"dev run {run.kind} on {name}: no gradient source ({source})")
        if run.on == "correct":  # the ready-made source, first on every defense
            correct, _ = runner.clean(run.defense, x, y)
            res = runner.run(run.key(eps), run.defense, run.spec, source, x, y, correct, bar=bar)
            outcomes[name] = DevOutcome(name, len(y), correct, source, res.broken)
            continue
        if i in leaders:
            group = [runs[j] for j in leaders[i]]
            runner.run_shared([(r.key(eps), r.defense, outcomes[str(r.defense)].survivors()) for r in group],
                              run.spec, source, x, y)
        outcome = outcomes[name]
        outcome.broken[str(source)] = runner.run(run.key(eps), run.defense, run.spec, source, x, y,
                                                 outcome.survivors(), bar=bar).broken
    bar.close()
    return outcomes
