"""The white-box evaluation protocol: every defense against the attack candidates, per-example worst
case, early exit and candidates chosen on dev, obfuscation checks, reports.

Phases, in order (each recorded in ``data_access``):

1. **dev** — the early-exit selection (:mod:`.selection`) and, in the adaptive protocol, the
   candidate selection (:mod:`.candidates`) per defense;
2. **test** — per defense: the matrix attack standalone with each kept source, then the cascade on
   the survivors (``boost`` attacks, each AutoAttack algorithm with each kept source, Square last),
   then the sanity checks. The test split is read once, after phase 1.

The exhaustive protocol (``exhaustive=True``) skips the candidate selection and attacks with every
source in the matrix and in the cascade.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import Tensor, nn

from .. import __version__
from ..attackable import EstimatorSettings
from ..attacks import ThreatModel
from ..errors import ConfigError
from ..gradients import GradientSource
from ..utils.modes import evaluation_mode
from ..utils.seeding import seed_everything
from ..utils.stats import at_chance
from . import checks
from .candidates import select_candidates
from .cost import CostEstimate, estimate_cost
from .inputs import Data, Labelled, as_examples, split_tensors
from .plan import EvaluationPlan, prepare
from .report import attack_shares, notes_for, paper_table
from .dev import DevOutcome
from .results import AttackCell, CandidateSelection, CheckResult, DefenseResult, EarlyExitSelection, EvaluationResult
from .runner import AttackRunner, UnitResult, percent
from .selection import select_early_exit
from .state import EvalState
from .suites import AttackSpec, Suite
from .target import AttackTarget


def source_name(source: Optional[GradientSource]) -> str:
    """A cell's source label: the source, or ``none`` for a gradient-free attack."""
    return "none" if source is None else str(source)


@dataclass(frozen=True)
class DefensePlan:
    """What the test phase runs against one defense."""

    defense: str
    matrix: tuple[GradientSource, ...]
    cascade: tuple[GradientSource, ...]
    boost: tuple[AttackSpec, ...] = ()
    columns: Optional[dict[str, str]] = None  # paper-table column -> source, when chosen on dev

    def runs(self, suite: Suite) -> int:
        """Attack runs this plan makes (the sanity checks included)."""
        standalone = sum(len(names) for _, names in suite.standalone)
        cascade = len(self.boost + suite.cascade) * len(self.cascade) + (suite.square is not None)
        return len(self.matrix) + standalone + cascade + len(suite.eps_multipliers) + 3  # radii, unbounded, PGD-2k x2

    @classmethod
    def adaptive(cls, defense: str, target: AttackTarget, selection: CandidateSelection, suite: Suite) -> "DefensePlan":
        kept = selection.for_defense(defense)
        return cls(defense, tuple(target.sources(kept.matrix)), tuple(target.sources(kept.cascade)), suite.boost,
                   kept.columns)


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

    def mark(self, broken: list[int], nonfinite: list[int]) -> None:
        self.robust[broken] = False
        self.nonfinite_adversarial.update(nonfinite)


class _Evaluation:
    """One evaluation run (holds the runner and the suite)."""

    def __init__(self, runner: AttackRunner, suite: Suite) -> None:
        self.runner, self.suite, self.target = runner, suite, runner.target

    def attack(self, ledger: DefenseLedger, mode: str, spec: AttackSpec, source: Optional[GradientSource],
               x: Tensor, y: Tensor, bar) -> AttackCell:
        """Run one attack, mark what it broke in the worst case, record its cell.

        ``matrix`` attacks every clean-correct example (the cell's accuracy is that attack's alone);
        ``cascade`` only the examples nothing broke yet (the cell's accuracy is the worst case after it).
        """
        name = source_name(source)
        todo = ledger.correct if mode == "matrix" else ledger.robust
        res = self.runner.run(f"test/{ledger.defense}/{mode}/{spec.label}/{name}", ledger.defense, spec, source,
                              x, y, todo, bar=bar)
        ledger.mark(res.broken, res.nonfinite)
        if mode == "matrix":
            after = ledger.correct.clone()
            after[res.broken] = False
        else:
            after = ledger.robust
        cell = self.cell(spec.label, name, mode, res, after)
        (ledger.matrix if mode == "matrix" else ledger.cascade).append(cell)
        return cell

    @staticmethod
    def cell(label: str, source: str, mode: str, res: UnitResult, robust: Tensor) -> AttackCell:
        return AttackCell(
            attack=label, source=source, mode=mode, n_attacked=res.attacked, n_broken=len(res.broken),
            robust_acc=percent(robust), grad_computed=res.grad_computed, grad_zero=res.grad_zero,
            grad_nonfinite=res.grad_nonfinite, n_nonfinite=len(res.nonfinite), seconds=res.seconds,
        )

    def defense(self, plan: DefensePlan, x: Tensor, y: Tensor) -> DefenseResult:
        start = time.perf_counter()
        runner, suite, defense = self.runner, self.suite, plan.defense
        correct, nonfinite_clean = runner.clean(defense, x, y)
        if bool(nonfinite_clean.any()):
            say(f"warning: {defense}: {int(nonfinite_clean.sum())} of {len(y)} clean inputs give NaN/Inf logits (a "
                "diverging solver?); they count as errors", runner.rank == 0)
        ledger = DefenseLedger(defense, correct, correct.clone(), int(nonfinite_clean.sum()))

        def stage(mode: str, spec: AttackSpec, sources: Sequence[Optional[GradientSource]]) -> None:
            bar = runner.bar(len(sources), len(y), f"{defense}: {spec.label} × {len(sources)} source(s)")
            for source in sources:
                self.attack(ledger, mode, spec, source, x, y, bar)
            bar.close()

        stage("matrix", suite.matrix, plan.matrix)  # the paper's tables: standalone, every clean-correct example
        for spec, names in suite.standalone:  # a plain network has one gradient: its own
            own = dict.fromkeys(n if self.target.is_deq or n == "none" else "autograd" for n in names)
            stage("matrix", spec, [self.target.source(n) for n in own])
        for spec in plan.boost + suite.cascade:  # AutoAttack's cascade: survivors only, Square last
            stage("cascade", spec, plan.cascade)
        square = None
        if suite.square is not None:
            stage("cascade", suite.square, [None])
            square = ledger.cascade[-1]

        pgd_cells = [c for c in ledger.matrix if c.attack == suite.matrix.label]
        weakest = min(ledger.matrix, key=lambda c: c.robust_acc)
        strongest_pgd = min(pgd_cells, key=lambda c: c.robust_acc)
        sanity = self.sanity(defense, x, y, correct, strongest_pgd, ledger.matrix + ledger.cascade, square, ledger.robust)
        cells = {c.source: c.robust_acc for c in pgd_cells}
        worst = percent(ledger.robust)
        return DefenseResult(
            defense=defense,
            clean_acc=percent(correct),
            worst_case_acc=worst,
            min_over_attacks_acc=weakest.robust_acc,
            min_over_attacks_attack=f"{weakest.attack}|{weakest.source}",
            n_nonfinite_clean=ledger.nonfinite_clean,
            n_nonfinite_adversarial=len(ledger.nonfinite_adversarial),
            table=paper_table(self.target, percent(correct), cells, worst, weakest.robust_acc, plan.columns),
            matrix=ledger.matrix,
            cascade=ledger.cascade,
            sanity_checks=sanity,
            seconds=time.perf_counter() - start,
        )

    def sanity(self, defense: str, x: Tensor, y: Tensor, correct: Tensor, weakest: AttackCell,
               attacked: list[AttackCell], square: Optional[AttackCell], robust: Tensor) -> list[CheckResult]:
        """The obfuscation checks; ``attacked`` are the matrix and cascade cells whose gradients are checked.

        The checks' own attacks at the evaluation's ε are attacks too: what they break is removed
        from ``robust`` (the per-example worst case), and each check says how many of those breaks
        no suite attack had found (``breaks_beyond_suite``).
        """
        runner, suite = self.runner, self.suite
        n = min(suite.sanity_examples, len(y))
        xs, ys, cs = x[:n], y[:n], correct[:n]
        source = self.target.source(weakest.source)
        runs = len(checks.growth_radii(runner.threat, xs, suite.eps_multipliers)) + 1
        bar = runner.bar(runs, n, f"{defense}: sanity checks")
        growth, growth_broken = checks.eps_growth(runner, defense, suite.matrix, source, xs, ys, cs,
                                                  suite.eps_multipliers, bar=bar)
        iterations, iterations_broken = checks.more_iterations(runner, defense, suite.matrix, source, xs, ys, cs, bar=bar)
        bar.close()
        for check, broken in ((growth, growth_broken), (iterations, iterations_broken)):
            new = [i for i in broken if robust[i]]
            check.details["breaks_beyond_suite"] = len(new)
            robust[new] = False
        return [
            growth,
            iterations,
            checks.square_vs_white_box(square, len(y)),
            checks.gradients(attacked),
            checks.deterministic_forward(runner, defense, xs),
        ]


def best_defense(results: list[DefenseResult]) -> DefenseResult:
    """The defense with the highest worst case (ties: higher clean accuracy) among those whose sanity
    checks all pass; if none passes, among all (the result records that its checks failed)."""
    passing = [r for r in results if all(c.passed for c in r.sanity_checks)] or results
    return max(passing, key=lambda r: (r.worst_case_acc, r.clean_acc))


def banner(plan: "EvaluationPlan", model: dict[str, Any], threat: ThreatModel, available: int,
           x_dev: Optional[Tensor], defenses: Optional[Sequence[str]], estimate: dict[str, Any]) -> str:
    """What is about to run, and its price, before anything runs."""
    name = model.get("checkpoint") or model.get("factory") or model.get("name") or model.get("class", "model")
    eps = f"{threat.eps:.4g}" + (f" (= {threat.eps * 255:.3g}/255)" if threat.norm == "Linf" else "")
    test = f"{plan.n_test} of {available}" + (f" (capped: the test split has {available})"
                                                if plan.requested_n_test and plan.requested_n_test > available else "")
    dev = "none (nothing is chosen)" if x_dev is None else f"{len(x_dev)} (the suite's dev_examples: {plan.suite.dev_examples})"
    shown = ", ".join(defenses) if defenses else ("final, early (chosen on dev), ensemble" if plan.target.is_deq
                                                  else "final")
    lines = [f"evaluating {name}: {threat.norm} eps={eps}, suite {plan.suite.name}, {plan.mode} protocol",
             f"  test examples: {test}; dev examples: {dev}",
             f"  defenses: {shown}"]
    if "skipped" in estimate:
        lines.append(f"  no cost estimate: {estimate['skipped']}")
    else:
        runs = estimate.get("attack_runs") or {}
        lines.append(f"  attack runs: about {sum(runs.values())} ({runs.get('dev', 0)} on dev, {runs.get('test', 0)} on test)")
        lines.append(CostEstimate.render(estimate))
    return "\n".join(lines)


def say(message: str, enabled: bool) -> None:
    """A line for the person watching (stderr, so that stdout stays the summary)."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


def evaluate(
    model: nn.Module,
    *,
    dev: Optional[Data],
    test: Data,
    threat: ThreatModel,
    suite: Union[str, Suite] = "quick",
    n_examples: Optional[int] = None,
    seed: int = 0,
    out_dir: Optional[Union[str, Path]] = None,
    resume: bool = True,
    progress: bool = True,
    batch_size: int = 128,
    defenses: Optional[Sequence[str]] = None,
    settings: Optional[EstimatorSettings] = None,
    model_info: Optional[dict[str, Any]] = None,
    dataset: str = "",
    rank: int = 0,
    world_size: int = 1,
    sources: Optional[Sequence[str]] = None,
    exhaustive: bool = False,
    top_k: Optional[int] = None,
) -> EvaluationResult:
    """Run the white-box protocol and return (and, with ``out_dir``, write) the results.

    The early-exit step and (adaptive protocol, the default of the ``quick``, ``paper`` and ``full``
    suites) the attack candidates are chosen on the first ``suite.dev_examples`` dev examples only;
    the test split is read once, after that. ``exhaustive=True`` attacks with every gradient source
    in the matrix and in the cascade instead; ``sources`` restricts the sources of an exhaustive run.
    With ``out_dir`` a state file makes the run resumable (``resume=False`` starts over).
    ``rank``/``world_size`` shard the batches across processes (results are gathered exactly). A model
    in train mode is evaluated in eval mode and switched back afterwards (with a warning).

    ``dev`` and ``test`` are dataset splits or ``(x, y)`` tensor pairs. With ``dev=None`` nothing is
    chosen: no early-exit defense, every source attacked (exhaustive), no cost estimate — never a
    selection made on test data; the report says so.

    Example (see ``tests/evaluate`` for a full run)::

        result = evaluate(model, dev=splits.dev, test=splits.test, threat=ThreatModel("Linf", 0.1),
                          suite="quick", n_examples=100, out_dir="runs/eval")
        print(result.best_defense, result.autoattack_acc)
    """
    dev, test = as_examples(dev, "dev"), as_examples(test, "test")
    with evaluation_mode(model):
        return _evaluate(model, dev=dev, test=test, threat=threat, suite=suite, n_examples=n_examples, seed=seed,
                         out_dir=out_dir, resume=resume, progress=progress, batch_size=batch_size, defenses=defenses,
                         settings=settings, model_info=model_info, dataset=dataset, rank=rank, world_size=world_size,
                         sources=sources, exhaustive=exhaustive, top_k=top_k)


def _evaluate(model: nn.Module, *, dev: Optional[Labelled], test: Labelled, threat: ThreatModel, suite: Union[str, Suite],
              n_examples: Optional[int], seed: int, out_dir: Optional[Union[str, Path]], resume: bool, progress: bool,
              batch_size: int, defenses: Optional[Sequence[str]], settings: Optional[EstimatorSettings],
              model_info: Optional[dict[str, Any]], dataset: str, rank: int, world_size: int,
              sources: Optional[Sequence[str]], exhaustive: bool, top_k: Optional[int]) -> EvaluationResult:
    started = time.perf_counter()
    plan = prepare(model, suite=suite, test=test, n_examples=n_examples, batch_size=batch_size, defenses=defenses,
                   sources=sources, exhaustive=exhaustive, top_k=top_k, has_dev=dev is not None)
    suite, target, n_test = plan.suite, plan.target, plan.n_test
    defenses = list(plan.requested_defenses) if plan.requested_defenses else None
    talk = progress and rank == 0
    progress = talk  # one set of bars per evaluation, not one per process
    seed_everything(seed)
    device = next(model.parameters()).device
    out = Path(out_dir) if out_dir is not None else None
    state_path = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        state_path = out / (f"eval_state.rank{rank}.json" if world_size > 1 else "eval_state.json")
        if not resume and state_path.exists():
            state_path.unlink()
    suite_settings = suite.describe(threat.eps)
    fingerprint = {
        "model": model_info or {"class": type(model).__name__}, "dataset": dataset, "threat": [threat.norm, threat.eps],
        "suite": suite_settings, "seed": seed, "n_examples": n_test, "batch_size": batch_size,
        "world_size": world_size, "settings": repr(settings or EstimatorSettings()),
        "defenses": list(defenses) if defenses else None, "sources": list(sources) if sources else None,
        "protocol": plan.mode,
    }
    state = EvalState(state_path, fingerprint)
    runner = AttackRunner(model, threat, seed, state, batch_size, settings, suite.adjoint_variant, progress,
                          rank, world_size)
    evaluation = _Evaluation(runner, suite)
    dev_xy = split_tensors(dev, suite.dev_examples, device) if dev is not None else None
    x_dev = dev_xy[0] if dev_xy is not None else None
    data_access: list[dict[str, Any]] = []
    timing: dict[str, Any] = {"resumed_units": state.resumed}

    # 0. The price, predicted on the dev examples before anything runs (kept across a resume).
    estimate = state.meta.get("estimate")
    if estimate is None:
        estimate = (estimate_cost(runner, plan, *dev_xy, world_size).to_dict() if dev_xy is not None
                    else {"skipped": "no dev split: nothing to time the work on without reading test data"})
        state.set_meta("estimate", estimate)
    # The banner and the closing line go to stderr on rank 0 even without progress bars (--no-progress).
    say(banner(plan, model_info or target.describe(), threat, len(test), x_dev, defenses, estimate), rank == 0)
    overall = None
    if talk:
        from tqdm.auto import tqdm

        overall = tqdm(total=sum((estimate.get("attack_runs") or {}).values()) or None, desc="evaluation (attack runs)",
                       unit="run", position=0, leave=True)
        runner.overall = overall

    # 1. Dev: early exit and attack candidates, chosen on dev only.
    selection: Optional[EarlyExitSelection] = None
    outcomes: dict[str, DevOutcome] = {}
    if dev is not None and dev_xy is not None and target.wants_early_exit_selection(defenses):
        t0 = time.perf_counter()
        data_access.append({"phase": "early_exit_selection", "split": dev.name, "n_examples": len(dev_xy[1])})
        selection, outcomes = select_early_exit(runner, *dev_xy, suite.matrix)
        timing["early_exit_selection_s"] = time.perf_counter() - t0
    early = [selection.paper_rule, selection.white_box_rule] if selection is not None else []
    names = target.defenses(defenses, list(dict.fromkeys(early)))
    candidates = None
    if plan.mode == "adaptive":
        if dev is None or dev_xy is None:
            raise ConfigError("the adaptive protocol chooses its attacks on a dev split; none was given")
        t0 = time.perf_counter()
        data_access.append({"phase": "candidate_selection", "split": dev.name, "n_examples": len(dev_xy[1])})
        candidates = select_candidates(runner, names, *dev_xy, suite.matrix, plan.top_k, outcomes)
        timing["candidate_selection_s"] = time.perf_counter() - t0

    # 2. The test split, touched once, after the dev phase.
    x, y = split_tensors(test, n_test, device)
    data_access.append({"phase": "test_evaluation", "split": test.name, "n_examples": len(y)})
    plans = [DefensePlan.adaptive(name, target, candidates, suite) if candidates is not None
             else DefensePlan(name, tuple(plan.sources()), tuple(plan.sources())) for name in names]
    if overall is not None:  # the test plan is known now: the bar's total becomes exact
        overall.total = overall.n + sum(p.runs(suite) for p in plans)
        overall.refresh()
    results = [evaluation.defense(defense_plan, x, y) for defense_plan in plans]
    if overall is not None:
        overall.close()
    timing["defenses_s"] = {r.defense: r.seconds for r in results}

    best = best_defense(results)
    final = next((r for r in results if r.defense == "final"), results[0])
    chance = at_chance(final.clean_acc / 100.0, len(y), runner.n_classes)
    ready = str(target.ready_made)
    reference = next((c for c in final.matrix if c.source == ready and c.attack == suite.matrix.label), None)
    total = time.perf_counter() - started
    timing.update({"total_s": total, "reference_attack": f"{suite.matrix.label}|{reference.source}" if reference else None,
                   "reference_attack_s": reference.seconds if reference else None})
    attack_seconds = sum(c.seconds for r in results for c in r.matrix + r.cascade)
    timing["attack_s"] = attack_seconds  # summed over processes, like reference_attack_s
    if reference and reference.seconds > 0:
        timing["attack_time_over_reference"] = attack_seconds / reference.seconds
        timing["total_over_reference"] = total * world_size / reference.seconds
    timing["share_by_attack"] = attack_shares(results)
    if "skipped" not in estimate:
        estimate = dict(estimate, actual_s=total, actual_over_predicted=total / estimate["predicted_s"]
                        if estimate["predicted_s"] > 0 else None, resumed=state.resumed > 0)
    say(f"evaluation finished in {total:.0f} s" + (f" (predicted {estimate['predicted_s']:.0f} s" if "predicted_s" in estimate
        else " (") + (", resumed" if state.resumed else "") + ")", rank == 0)
    result = EvaluationResult(
        deqrobust_version=__version__,
        model=model_info or target.describe(),
        dataset=dataset,
        threat_model=threat.norm,
        eps=threat.eps,
        n_examples=len(y),
        seed=seed,
        suite=suite_settings,
        clean_acc=best.clean_acc,
        autoattack_acc=best.worst_case_acc,
        best_defense=best.defense,
        best_defense_checks_passed=all(c.passed for c in best.sanity_checks),
        undefended_clean_acc=final.clean_acc,
        model_at_chance=chance,
        defenses=results,
        early_exit=selection,
        candidate_selection=candidates,
        protocol=plan.describe(),
        estimate=estimate,
        residuals=target.residuals(x, batch_size),
        data_access=data_access,
        timing=timing,
        notes=([f"no dev split: {plan.describe()['why']}; no early-exit defense"] if dev is None else [])
        + ([f"model at chance: clean accuracy {final.clean_acc:.2f}% is within sampling noise of guessing among "
            f"{runner.n_classes} classes ({len(y)} examples) — its robustness numbers say nothing"] if chance else [])
        + notes_for(results),
    )
    if out is not None and rank == 0:
        from .report import write_reports

        write_reports(result, out)
    return result


def estimate(
    model: nn.Module,
    *,
    dev: Data,
    test: Data,
    threat: ThreatModel,
    suite: Union[str, Suite] = "quick",
    n_examples: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 128,
    defenses: Optional[Sequence[str]] = None,
    settings: Optional[EstimatorSettings] = None,
    rank: int = 0,
    world_size: int = 1,
    sources: Optional[Sequence[str]] = None,
    exhaustive: bool = False,
    top_k: Optional[int] = None,
    progress: bool = True,
) -> CostEstimate:
    """Predict the wall time of :func:`evaluate` with the same arguments, without running it.

    Times one batch of each kind of work on dev examples (see :mod:`deqrobust.evaluate.cost`);
    of the test split only its size is read.
    """
    dev, test = as_examples(dev, "dev"), as_examples(test, "test")
    if dev is None:
        raise ConfigError("the cost estimate times the work on dev examples; pass dev=...")
    with evaluation_mode(model):
        plan = prepare(model, suite=suite, test=test, n_examples=n_examples, batch_size=batch_size,
                       defenses=defenses, sources=sources, exhaustive=exhaustive, top_k=top_k)
        seed_everything(seed)
        device = next(model.parameters()).device
        runner = AttackRunner(model, threat, seed, EvalState(None, {}), batch_size, settings,
                              plan.suite.adjoint_variant, False, rank, world_size)
        x_dev, y_dev = split_tensors(dev, plan.suite.dev_examples, device)
        return estimate_cost(runner, plan, x_dev, y_dev, world_size)
