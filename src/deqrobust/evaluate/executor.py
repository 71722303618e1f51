"""The test phase: the plan's attack runs (:func:`~.runs.test_phase_runs`) in order, stage by
stage across the defenses — each marks what it broke in its defense's per-example worst case and
records its cell; runs that differ only in defense share one trajectory — then each defense's
sanity checks (:func:`~.checks.run_checks`)."""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..defenses import Defense
from ..gradients import GradientSource
from ..utils.stats import interval_of

from .checks import cell_label, run_checks
from .columns import paper_row
from .plan import DefensePlan, EvaluationPlan, Pending
from .results import AttackCell, DefenseResult
from .runner import AttackRunner, UnitResult, percent, predictions_ok
from .runs import AttackRun, share_groups, source_name, test_phase_runs


def say(message: str, enabled: bool) -> None:
    """A line for the person watching (stderr, so that stdout stays the summary)."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


@dataclass
class DefenseLedger:
    """One defense under attack: which test examples are clean-correct, which survive every attack
    so far (the per-example worst case), and the cells recorded."""

    defense: str
    correct: Tensor
    robust: Tensor
    nonfinite_clean: int
    nonfinite_adversarial: set[int] = field(default_factory=set)
    matrix: list[AttackCell] = field(default_factory=list)
    cascade: list[AttackCell] = field(default_factory=list)
    broken_by: dict[int, str] = field(default_factory=dict)  # test index -> the first attack that broke it
    points: dict[int, Tensor] = field(default_factory=dict)  # with return_adversarial: the point that broke it
    families: dict[str, set[int]] = field(default_factory=dict)  # a purified defense: attack family -> broken

    def mark(self, broken: list[int], nonfinite: list[int], label: str, found: Optional[dict[int, Tensor]] = None) -> None:
        """Record what one attack (``label``: ``attack|source``) broke; ``found`` are its points."""
        alive = self.robust[broken].tolist() if broken else []  # one read, not one per example
        for i in (i for i, still in zip(broken, alive) if still):
            self.broken_by[i] = label
            if found is not None and i in found:
                self.points[i] = found[i]
        self.robust[broken] = False
        self.nonfinite_adversarial.update(nonfinite)


FAMILIES = ("non-adaptive", "bpda", "through-loop:straight-through", "through-loop:raw", "confident", "transfer",
            "cascade", "square")


def family(run: AttackRun) -> str:
    """A run against a purified defense, by what its gradient sees: the follow-up's own
    non-adaptive attack, BPDA (the matrix), through the loop, the confident loss, transfer, or the
    cascade and Square on what survived."""
    if run.step in ("transfer", "cascade", "square"):
        return run.step
    if run.purification != "bpda":
        return run.purification
    return "confident" if run.spec.loss == "ce-confident" else "bpda"


def follow_up_summary(ledger: DefenseLedger, defense: Defense, static: Optional[DefenseResult]) -> dict:
    """A purified defense's columns (each family's per-example robust accuracy), the follow-up's
    own non-adaptive number against the worst case, and the checks that would have caught it."""
    n = max(1, ledger.correct.numel())
    correct = set(ledger.correct.nonzero().flatten().tolist())

    def acc(broken: set[int]) -> float:
        return 100.0 * len(correct - broken) / n

    columns = {name: acc(ledger.families[name]) if name in ledger.families else None
               for name in FAMILIES if name not in ("cascade", "square")}
    non_adaptive = ledger.families.get("non-adaptive", set())
    worst = 100.0 * int(ledger.robust.sum()) / n
    caught = []
    black_box = (ledger.families.get("transfer", set()) | ledger.families.get("square", set())) - non_adaptive
    if black_box:  # an example broken by both counts once
        caught.append(f"the black-box check: transfer from the static model and Square broke "
                      f"{len(black_box)} examples the non-adaptive attack left")
    adaptive = {name: len(ledger.families.get(name, set()) - non_adaptive)
                for name in ("bpda", "through-loop:straight-through", "through-loop:raw", "confident")}
    if any(adaptive.values()):
        best = max(adaptive, key=lambda k: adaptive[k])
        caught.append(f"the adaptive attacks: {best} broke {adaptive[best]} examples the non-adaptive attack left")
    st, raw = (len(ledger.families.get(f"through-loop:{k}", set())) for k in ("straight-through", "raw"))
    return {
        "columns": columns,
        "non_adaptive_acc": acc(non_adaptive),
        "worst_case_acc": worst,
        "gap_points": acc(non_adaptive) - worst,
        "static_worst_case_acc": static.worst_case_acc if static is not None else None,
        "stronger_through_loop": "straight-through" if st > raw else "raw" if raw > st else "equal",
        "caught_by": caught,
        "settings": {"purification": str(defense.purify), "read": str(defense.static)},
    }


def cell(label: str, source: str, mode: str, res: UnitResult, robust: Tensor) -> AttackCell:
    return AttackCell(
        attack=label, source=source, mode=mode, n_attacked=res.attacked, n_broken=len(res.broken),
        robust_acc=percent(robust), grad_computed=res.grad_computed, grad_zero=res.grad_zero,
        grad_nonfinite=res.grad_nonfinite, n_nonfinite=len(res.nonfinite), seconds=res.seconds,
        interval=interval_of(percent(robust), robust.numel()),
    )


class TestPhase:
    """Runs the test phase of ``plan`` with ``runner`` on the test examples ``(x, y)``."""

    def __init__(self, runner: AttackRunner, plan: EvaluationPlan, x: Tensor, y: Tensor,
                 return_adversarial: bool = False) -> None:
        self.runner, self.plan, self.x, self.y = runner, plan, x, y
        self.return_adversarial = return_adversarial
        self.cleaned: dict[str, tuple[Tensor, Tensor]] = {}

    def clean(self, defense: Defense) -> tuple[Tensor, Tensor]:
        """(correct, non-finite) on the clean test examples, computed once per defense."""
        if str(defense) not in self.cleaned:
            self.cleaned[str(defense)] = self.runner.clean(defense, self.x, self.y)
        return self.cleaned[str(defense)]

    def attack(self, ledger: DefenseLedger, run: AttackRun, bar) -> AttackCell:
        """Run one attack, mark what it broke in the worst case, record its cell.

        A matrix run attacks every clean-correct example (the cell's accuracy is that attack's
        alone); a cascade run only the examples nothing broke yet (the cell's accuracy is the worst
        case after it)."""
        if isinstance(run.source, Pending):
            raise ValueError(f"run {run.kind} on {run.defense}: its source is still pending ({run.source})")
        matrix = run.on == "correct"
        todo = ledger.correct if matrix else ledger.robust
        key = run.key(self.runner.threat.eps)
        res = self.runner.run(key, run.defense, run.spec, run.source, self.x, self.y, todo, bar=bar,
                              purification=run.purification)
        ledger.mark(res.broken, res.nonfinite, cell_label(run.label, run.source), self.runner.points.pop(key, None))
        if matrix:
            after = ledger.correct.clone()
            after[res.broken] = False
        else:
            after = ledger.robust
        if run.defense.purify is not None:
            ledger.families.setdefault(family(run), set()).update(res.broken)
        recorded = cell(run.label, source_name(run.source), "matrix" if matrix else "cascade", res, after)
        (ledger.matrix if matrix else ledger.cascade).append(recorded)
        return recorded

    def transfer(self, ledger: DefenseLedger, twin: Optional[DefenseLedger], run: AttackRun, bar) -> AttackCell:
        """Judge, on the purified defense, every point that broke its static twin in this process
        (the first point per example; an example the twin's runs broke before a resume has none)."""
        runner = self.runner
        key = run.key(runner.threat.eps)
        saved = runner.state.get(key)
        found: dict[int, Tensor] = {}
        if saved is None:
            start = time.perf_counter()
            points = twin.points if twin is not None else {}
            todo = [i for i in sorted(points) if bool(ledger.correct[i])]
            local = UnitResult(attacked=len(todo))
            for begin in range(0, len(todo), runner.batch_size):
                part = todo[begin:begin + runner.batch_size]
                batch = torch.stack([points[i] for i in part]).to(self.x.device, self.x.dtype)
                ok, nonfinite = predictions_ok(runner.logits(batch, run.defense), self.y[part])
                local.broken += [i for i, good in zip(part, ok.tolist()) if not good]
                local.nonfinite += [i for i, bad in zip(part, nonfinite.tolist()) if bad]
            found = {i: points[i] for i in local.broken}
            local.seconds = time.perf_counter() - start
            runner.state.put(key, local.__dict__)
            saved = local.__dict__
        res = runner.gather(UnitResult(**saved))
        runner.log(key)
        if bar is not None:
            bar.update(runner.bar_share(len(self.y)))
        ledger.mark(res.broken, res.nonfinite, cell_label("transfer", None), found if runner.keep_points else None)
        ledger.families.setdefault("transfer", set()).update(res.broken)
        after = ledger.correct.clone()
        after[res.broken] = False
        recorded = cell("transfer", source_name(None), "matrix", res, after)
        ledger.matrix.append(recorded)
        return recorded

    def run(self, defenses: Sequence[DefensePlan]) -> list[DefenseResult]:
        """The test phase of every defense: the attack runs stage by stage across the defenses
        (:func:`~.runs.test_phase_runs`; a group of runs sharing a trajectory runs as one when its
        first run is due), then each defense's sanity checks and result."""
        runner, plan, y = self.runner, self.plan, self.y
        ledgers: dict[str, DefenseLedger] = {}
        spent: dict[str, float] = {}
        for defense in defenses:
            start = time.perf_counter()
            name = str(defense.defense)
            correct, nonfinite_clean = self.clean(defense.defense)
            if bool(nonfinite_clean.any()):
                say(f"warning: {name}: {int(nonfinite_clean.sum())} of {len(y)} clean inputs give NaN/Inf logits (a "
                    "diverging solver?); they count as errors", runner.rank == 0)
            ledgers[name] = DefenseLedger(name, correct, correct.clone(), int(nonfinite_clean.sum()))
            spent[name] = time.perf_counter() - start
        runs = [r for r in test_phase_runs(plan, defenses) if r.step != "sanity"]
        leaders = {group[0]: group for group in share_groups(plan, runs)}
        eps = runner.threat.eps
        for (_, spec), group in itertools.groupby(enumerate(runs), key=lambda item: (item[1].step, item[1].spec)):
            stage = list(group)
            bar = runner.bar(len(stage), len(y), f"{spec.label} × {len(stage)} run(s)")
            for i, run in stage:
                if i in leaders and isinstance(run.source, GradientSource):
                    start = time.perf_counter()
                    members = [runs[j] for j in leaders[i]]
                    runner.run_shared([(m.key(eps), m.defense, self.todo(ledgers[str(m.defense)], m)) for m in members],
                                      run.spec, run.source, self.x, self.y)
                    for m in members:
                        spent[str(m.defense)] += (time.perf_counter() - start) / len(members)
                start = time.perf_counter()
                if run.step == "transfer":
                    self.transfer(ledgers[str(run.defense)], ledgers.get(str(run.defense.static)), run, bar)
                else:
                    self.attack(ledgers[str(run.defense)], run, bar)
                # a resumed run costs what the earlier processes spent on it, not the moment it takes to read back
                spent[str(run.defense)] += time.perf_counter() - start + runner.state.restored_seconds(run.key(eps))
            bar.close()
        results: list[DefenseResult] = []
        for defense in defenses:
            start = time.perf_counter()
            twin = next((r for r in results if r.defense == str(defense.defense.static)), None)
            result = self.result(defense, ledgers[str(defense.defense)], twin)
            result.seconds = spent[result.defense] + time.perf_counter() - start
            results.append(result)
        return results

    @staticmethod
    def todo(ledger: DefenseLedger, run: AttackRun) -> Tensor:
        """The examples ``run`` attacks now: every clean-correct one (matrix), or those nothing broke yet."""
        return (ledger.correct if run.on == "correct" else ledger.robust).clone()

    def result(self, defense: DefensePlan, ledger: DefenseLedger, twin: Optional[DefenseResult] = None) -> DefenseResult:
        """One defense's sanity checks and result, after its attacks."""
        runner, plan, x, y, name = self.runner, self.plan, self.x, self.y, str(defense.defense)
        correct = ledger.correct
        square = ledger.cascade[-1] if plan.suite.square is not None else None

        pgd_cells = [c for c in ledger.matrix if c.attack == plan.suite.matrix.label]
        weakest = min(ledger.matrix, key=lambda c: c.robust_acc)
        strongest_pgd = min(pgd_cells, key=lambda c: c.robust_acc)
        sanity = run_checks(runner, plan.suite, defense.defense, x, y, correct, plan.target.source(strongest_pgd.source),
                            ledger.matrix + ledger.cascade, square,
                            lambda broken, label, key: ledger.mark(broken, [], label, runner.points.pop(key, None)),
                            ledger.robust)
        cells = {c.source: c.robust_acc for c in pgd_cells}
        table = paper_row(plan.target.is_deq, plan.target.n_states, percent(correct), cells, percent(ledger.robust),
                          weakest.robust_acc, defense.columns)
        table["intervals"] = {k: interval_of(v, len(y)) for k, v in table.items()
                              if isinstance(v, float) and not k.endswith("_state")}
        return DefenseResult(
            defense=name,
            clean_acc=percent(correct),
            worst_case_acc=percent(ledger.robust),
            min_over_attacks_acc=weakest.robust_acc,
            min_over_attacks_attack=cell_label(weakest.attack, weakest.source),
            n_nonfinite_clean=ledger.nonfinite_clean,
            n_nonfinite_adversarial=len(ledger.nonfinite_adversarial),
            table=table,
            matrix=ledger.matrix,
            cascade=ledger.cascade,
            sanity_checks=sanity,
            seconds=0.0,
            robust=ledger.robust.tolist(),
            intervals={"clean_acc": interval_of(percent(correct), len(y)),
                       "worst_case_acc": interval_of(percent(ledger.robust), len(y)),
                       "min_over_attacks_acc": interval_of(weakest.robust_acc, len(y))},
            broken_by={i: ("clean" if not ok else ledger.broken_by.get(i, "?"))
                       for i, (ok, alive) in enumerate(zip(correct.tolist(), ledger.robust.tolist())) if not alive},
            adversarial=self.adversarial(ledger) if self.return_adversarial else None,
            follow_up=follow_up_summary(ledger, defense.defense, twin) if defense.defense.purify is not None else None,
        )

    def adversarial(self, ledger: DefenseLedger) -> Tensor:
        """The test inputs with each broken example replaced by the point that broke it."""
        points = self.x.detach().cpu().clone()
        for i, point in ledger.points.items():
            points[i] = point.to(points.dtype)
        return points
