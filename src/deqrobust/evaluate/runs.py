"""The attack runs of an evaluation plan, as one list: the dev selections, then per defense the
test matrix, the cascade, Square and the sanity checks' attacks. The test phase executes this list;
the cost estimate prices it (before dev, with the choices still :class:`~.plan.Pending`); a test
checks that the runs executed are the runs listed.

A run is one attack with one source against one defense on one population of examples: every
clean-correct example (``correct``) or those no earlier attack broke (``survivors``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Mapping, Optional, Sequence

from ..attackable import PurificationGradient
from ..defenses import Defense
from ..gradients import GradientSource
from .checks import check_key, planned_attacks, source_name
from .plan import STRONGEST_ON_TEST, DefensePlan, EvaluationPlan, ProtocolMode, SourceRef
from .runner import defense_free_gradient
from .suites import AttackSpec

Phase = Literal["dev", "test"]
Step = Literal["early-exit selection", "candidate selection", "headline selection", "matrix", "follow-up", "cascade",
               "square", "transfer", "sanity"]
Population = Literal["correct", "survivors"]


@dataclass(frozen=True)
class AttackRun:
    """One attack run: ``eps`` is the radius when it is not the evaluation's (the ε-growth check);
    ``purification``: against a purified defense, how the gradient treats the purification
    (:func:`~deqrobust.attackable.purification_gradient`). A ``transfer`` run attacks nothing: it
    judges, on a purified defense, the points that broke its static twin."""

    phase: Phase
    step: Step
    defense: Defense
    spec: AttackSpec
    source: SourceRef
    on: Population
    eps: Optional[float] = None
    purification: PurificationGradient = "bpda"

    @property
    def examples(self) -> Literal["dev", "test", "sanity"]:
        """Which examples it runs on: the dev ones, the test ones, or the sanity checks' first test ones."""
        return "dev" if self.phase == "dev" else "sanity" if self.step == "sanity" else "test"

    @property
    def label(self) -> str:
        """The attack's column label: its spec's, with the purification gradient unless BPDA."""
        if self.step == "transfer":
            return "transfer"
        return self.spec.label + ("" if self.purification == "bpda" else f":{self.purification}")

    @property
    def kind(self) -> str:
        """What a run is, for counting: phase, step and attack."""
        return f"{self.phase}/{self.step}/{self.label}"

    def key(self, eps: float) -> str:
        """Its key in the resumable state (``eps``: the evaluation's radius)."""
        if self.phase == "dev":
            return f"dev/{self.defense}/{self.spec.label}/{self.source}"
        if self.step == "sanity":
            return check_key(str(self.defense), self.eps if self.eps is not None else eps, self.spec, self.source)
        if self.step == "transfer":
            return f"test/{self.defense}/transfer"
        mode = "matrix" if self.step in ("matrix", "follow-up") else "cascade"
        return f"test/{self.defense}/{mode}/{self.label}/{source_name(self.source)}"


def dev_runs(plan: EvaluationPlan) -> list[AttackRun]:
    """The dev phase: on every dev defense (:meth:`~.plan.EvaluationPlan.dev_defenses`) the
    ready-made source on the clean-correct examples; then, source by source, each source on what
    the ready-made attack left of every defense that needs it (the white-box sources at each
    defense's state, :meth:`~.plan.EvaluationPlan.dev_sources`; adaptive: every source on every defense)."""
    target, spec = plan.target, plan.suite.matrix
    ready = target.ready_made
    defenses = plan.dev_defenses()

    def step(defense: Defense) -> Step:
        if plan.early_exit_selection and defense.kind == "early":
            return "early-exit selection"
        return "candidate selection" if plan.mode is ProtocolMode.ADAPTIVE else "headline selection"

    runs = [AttackRun("dev", step(d), d, spec, ready, "correct") for d in defenses]
    needs = {d: plan.dev_sources(d) for d in defenses}
    for source in dict.fromkeys(s for d in defenses for s in needs[d]):
        runs += [AttackRun("dev", step(d), d, spec, source, "survivors") for d in defenses if source in needs[d]]
    return runs


def share_groups(plan: EvaluationPlan, runs: Sequence[AttackRun]) -> list[list[int]]:
    """Runs (indices into ``runs``) that share one trajectory, each group in order: the same
    attack with the same defense-free source (:func:`~.runner.defense_free_gradient`) on the same
    split, against different defenses; the sanity checks never. In the order of :func:`dev_runs`
    and :func:`test_phase_runs` every earlier run of a group's defenses is done when the group's
    first run is due, so each member's examples are known then."""
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        source = run.source
        if (run.step == "sanity" or not isinstance(source, GradientSource)
                or not defense_free_gradient(plan.target.is_deq, plan.suite.adjoint_variant, run.spec, source, run.defense)):
            continue
        groups.setdefault((run.phase, run.spec, str(source), run.on, run.eps), []).append(i)
    return [group for group in groups.values() if len(group) > 1]


def test_runs(plan: EvaluationPlan, defense: DefensePlan, sanity_source: SourceRef = STRONGEST_ON_TEST) -> list[AttackRun]:
    """The test phase against one defense, in the order it runs: the matrix attack with each matrix
    source, the suite's standalone attacks, the cascade (``boost`` first) with each cascade source,
    Square, then the sanity checks' attacks with ``sanity_source`` (the strongest matrix source)."""
    suite, target, name = plan.suite, plan.target, defense.defense
    runs = [AttackRun("test", "matrix", name, suite.matrix, s, "correct") for s in defense.matrix]
    for spec, names in suite.standalone:  # a plain network has one gradient: its own
        own = dict.fromkeys(n if target.is_deq or n == "none" else "autograd" for n in names)
        runs += [AttackRun("test", "matrix", name, spec, target.source(n), "correct") for n in own]
    for spec in defense.boost + suite.cascade:
        runs += [AttackRun("test", "cascade", name, spec, s, "survivors") for s in defense.cascade]
    if name.purify is not None:
        runs += follow_up_runs(plan, defense)
    if suite.square is not None:
        runs.append(AttackRun("test", "square", name, suite.square, None, "survivors"))
    if name.purify is not None:
        runs.append(AttackRun("test", "transfer", name, suite.matrix, None, "correct"))
    for eps, spec in planned_attacks(plan.threat, plan.input_numel, suite.matrix, suite.eps_multipliers):
        runs.append(AttackRun("test", "sanity", name, spec, sanity_source, "correct",
                              None if eps == plan.threat.eps else eps))
    return runs


def follow_up_runs(plan: EvaluationPlan, defense: DefensePlan) -> list[AttackRun]:
    """The attacks on a purified defense besides BPDA (the matrix), each a column of its own on
    every clean-correct example: the follow-up's own non-adaptive evaluation with each matrix source;
    through the loop (the sign straight-through, and raw) and the confident loss with the
    ready-made source and the first cascade source."""
    suite, name = plan.suite, defense.defense
    through = list(dict.fromkeys([plan.target.ready_made, *defense.cascade]))[:2]
    runs = [AttackRun("test", "follow-up", name, suite.matrix, s, "correct", purification="non-adaptive")
            for s in defense.matrix if s is not None]
    modes: tuple[PurificationGradient, ...] = ("through-loop:straight-through", "through-loop:raw")
    for mode in modes:
        runs += [AttackRun("test", "follow-up", name, suite.matrix, s, "correct", purification=mode) for s in through]
    confident = replace(suite.matrix, loss="ce-confident") if suite.matrix.algorithm == "pgd" else suite.matrix
    runs += [AttackRun("test", "follow-up", name, confident, s, "correct") for s in through]
    return runs


def test_phase_runs(plan: EvaluationPlan, defenses: Sequence[DefensePlan],
                    sanity_sources: Optional[Mapping[str, SourceRef]] = None) -> list[AttackRun]:
    """The test phase of every defense in the order it runs: stage by stage (the matrix attack,
    each standalone attack, each cascade attack, Square), within a stage source by source in one
    fixed order (:func:`~deqrobust.gradients.all_sources`'s) and for each source defense by
    defense; then each defense's sanity checks. Runs of one source in one stage are thus due
    together, after every earlier stage of every defense."""
    order = {str(s): i for i, s in enumerate(plan.target.sources(both_pairings=True))}
    per_defense = [test_runs(plan, d, (sanity_sources or {}).get(str(d.defense), STRONGEST_ON_TEST)) for d in defenses]
    stages: dict[tuple, list[tuple[int, int, AttackRun]]] = {}
    for j, runs in enumerate(per_defense):
        for k, run in enumerate(runs):
            if run.step != "sanity":
                rank = order.get(str(run.source), len(order) + k) if isinstance(run.source, GradientSource) else k
                stages.setdefault((run.step, run.spec), []).append((rank, j, run))
    ordered = [run for stage in stages.values() for _, _, run in sorted(stage, key=lambda item: item[:2])]
    # a transfer judges the points every other run found against the static twin: after all of them
    ordered = [r for r in ordered if r.step != "transfer"] + [r for r in ordered if r.step == "transfer"]
    return ordered + [run for runs in per_defense for run in runs if run.step == "sanity"]


def plan_runs(plan: EvaluationPlan, defenses: Sequence[DefensePlan],
              sanity_sources: Optional[Mapping[str, SourceRef]] = None) -> list[AttackRun]:
    """Every attack run of the evaluation, in order."""
    return dev_runs(plan) + test_phase_runs(plan, defenses, sanity_sources)


def assumed_runs(plan: EvaluationPlan) -> list[AttackRun]:
    """The runs as the price sees them before dev (:meth:`EvaluationPlan.assumed_defense_plans`)."""
    return plan_runs(plan, plan.assumed_defense_plans())


def count_by_kind(runs: Sequence[AttackRun]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.kind] = counts.get(run.kind, 0) + 1
    return counts
