"""The white-box evaluation protocol, as a driver: plan → price → dev → test → result.

1. **plan** (:mod:`.plan`, :mod:`.runs`) — every option resolved against the model and the sizes of
   the splits, before any compute; the attack runs listed;
2. **price** (:mod:`.cost`) — the listed runs priced on dev examples;
3. **dev** — the early-exit selection (:mod:`.selection`) and, in the adaptive protocol, the
   candidate selection (:mod:`.candidates`) per defense;
4. **test** (:mod:`.executor`) — per defense: the matrix attack standalone with each kept source,
   then the cascade on the survivors (``boost`` attacks, each AutoAttack algorithm with each kept
   source, Square last), then the sanity checks. The test split is read once, after phase 3.

Each phase that reads data is recorded in ``data_access``. The public entry points are in :mod:`.api`.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .. import __version__
from ..attackable import EstimatorSettings
from ..attacks import ThreatModel
from ..errors import ConfigError, NotADEQWarning
from ..utils.seeding import seed_everything
from ..utils.stats import at_chance, interval_of, with_interval
from ..validate import check_labels_in_range, model_dtype
from .candidates import select_candidates
from .columns import PAPER_COLUMNS
from .console import banner
from .cost import CostEstimate, estimate_cost
from .dev import run_dev_phase
from .executor import TestPhase, say
from .inputs import Labelled, check_call, split_tensors
from .options import EvaluationOptions
from .plan import EvaluationPlan, ProtocolMode, prepare
from .report import attack_shares, notes_for
from .results import CandidateSelection, DefenseResult, EarlyExitSelection, EvaluationResult
from .runner import AttackRunner, predictions_ok
from .runs import assumed_runs, test_runs
from .selection import select_early_exit, select_headline
from .state import EvalState


def plan_for(model: nn.Module, options: EvaluationOptions, threat: ThreatModel, dev: Optional[Labelled],
             test: Labelled) -> EvaluationPlan:
    """The plan of an evaluation: of the splits, only their sizes and the input shape are read."""
    shaped = dev if dev is not None and len(dev) else test
    numel = int(shaped.images[0].numel()) if len(shaped) else 1
    return prepare(model, options, threat, n_test_available=len(test),
                   n_dev_available=len(dev) if dev is not None else None, input_numel=numel)


def unless_guessing(plan: EvaluationPlan, x_dev: Tensor, y_dev: Tensor, batch_size: int) -> EvaluationPlan:
    """``plan``, or :meth:`~.plan.EvaluationPlan.at_chance` when the final output's clean accuracy on
    the dev examples is within sampling noise of guessing (or below it)."""
    correct, classes = 0, 0
    for start in range(0, len(y_dev), batch_size):
        logits = plan.target.logits(x_dev[start : start + batch_size], "final")
        ok, _ = predictions_ok(logits, y_dev[start : start + batch_size])
        correct, classes = correct + int(ok.sum()), int(logits.shape[1])
    if at_chance(correct / max(len(y_dev), 1), len(y_dev), classes):
        return plan.at_chance(correct, len(y_dev), classes)
    return plan


def warn_if_downgraded(plan: EvaluationPlan, rank: int) -> Optional[str]:
    """The note of a model that is not a DEQ the library can reach (:meth:`~.target.AttackTarget.downgrade`),
    raised as a :class:`~deqrobust.errors.NotADEQWarning` at the call (rank 0)."""
    note = plan.target.downgrade()
    if note is not None and rank == 0:
        warnings.warn(note, NotADEQWarning, stacklevel=4)
    return note


def unrun_columns(plan: EvaluationPlan, results: list[DefenseResult]) -> list[str]:
    """The note naming the paper columns the default (lean) matrix did not run (their dev-chosen source
    was not a candidate)."""
    if plan.mode is not ProtocolMode.ADAPTIVE or plan.paper_columns:
        return []
    missing = sorted({c for r in results for c in PAPER_COLUMNS if r.table.get(c) is None})
    if not missing:
        return []
    return [f"paper columns not run: {', '.join(missing)} (the matrix ran the candidates chosen on dev; "
            "--paper-columns runs every column's source too)"]


def plan_key(model: nn.Module, plan: EvaluationPlan, options: EvaluationOptions, world_size: int) -> dict[str, Any]:
    """What an estimate priced (the plan as asked, before the at-chance check; the model by its class,
    size and a checksum of its weights): an estimate is reused by an evaluation only with the same key."""
    tensors = [t.detach() for t in model.state_dict().values() if isinstance(t, Tensor) and t.is_floating_point()]
    # weighted by position, so a sign flip or a permutation of the weights changes it
    checksum = sum(float((t.double().flatten().cpu() * torch.linspace(1.0, 2.0, t.numel(), dtype=torch.float64)).sum())
                   for t in tensors)
    return {"model": f"{type(model).__name__}, {sum(t.numel() for t in tensors)} values, checksum {checksum:.12g}",
            "protocol": plan.mode.value, "suite": plan.suite.name, "n_examples": plan.n_test, "n_dev": plan.n_dev,
            "defenses": list(plan.requested_defenses) if plan.requested_defenses else None,
            "sources": list(plan.requested_sources) if plan.requested_sources else None, "top_k": plan.top_k,
            "paper_columns": plan.paper_columns, "headline": plan.headline, "batch_size": options.batch_size,
            "world_size": world_size, "threat": [plan.threat.norm, plan.threat.eps]}


def run_protocol(model: nn.Module, *, dev: Optional[Labelled], test: Labelled, threat: ThreatModel,
                 options: EvaluationOptions, model_info: Optional[dict[str, Any]] = None, dataset: str = "",
                 rank: int = 0, world_size: int = 1, given_estimate: Optional[CostEstimate] = None) -> EvaluationResult:
    """Run the protocol on a model in eval mode (see :func:`~deqrobust.evaluate.evaluate`)."""
    started = time.perf_counter()
    n_classes = check_call(model, dev, test, threat)
    plan = plan_for(model, options, threat, dev, test)
    downgrade = warn_if_downgraded(plan, rank)
    if given_estimate is not None:  # before any compute: an estimate of another plan is refused
        reused = plan_key(model, plan, options, world_size)
        differs = sorted(k for k in set(reused) | set(given_estimate.plan_key)
                         if reused.get(k) != given_estimate.plan_key.get(k))
        if differs:
            raise ConfigError("the estimate was made for another plan (it differs in "
                              + ", ".join(f"{k}: {given_estimate.plan_key.get(k)!r} vs {reused.get(k)!r}" for k in differs)
                              + "); call estimate() with the same arguments, or leave estimate= out")
    if options.return_adversarial:
        saved = Path(options.out_dir) / "eval_state.json" if options.out_dir is not None else None
        if world_size > 1 or (saved is not None and saved.exists() and options.resume):
            raise ConfigError("return_adversarial=True keeps the points of the attacks run in this call: "
                              + ("run it in one process (world_size=1)" if world_size > 1 else
                                 f"{saved} would be resumed — pass resume=False or another out_dir"))
    talk = options.progress and rank == 0  # one set of bars per evaluation, not one per process
    seed_everything(options.seed)
    device = next(model.parameters()).device
    dtype = model_dtype(model)
    dev_xy = split_tensors(dev, plan.n_dev, device, dtype) if dev is not None else None
    data_access: list[dict[str, Any]] = []
    if dev is not None and dev_xy is not None and plan.mode in (ProtocolMode.ADAPTIVE, ProtocolMode.EXHAUSTIVE):
        data_access.append({"phase": "chance_check", "split": dev.name, "n_examples": len(dev_xy[1])})
        plan = unless_guessing(plan, *dev_xy, options.batch_size)
    suite, target, n_test = plan.suite, plan.target, plan.n_test
    out = Path(options.out_dir) if options.out_dir is not None else None
    state_path = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        state_path = out / (f"eval_state.rank{rank}.json" if world_size > 1 else "eval_state.json")
        if not options.resume and state_path.exists():
            state_path.unlink()
    suite_settings = suite.describe(threat.eps)
    fingerprint = {
        "model": model_info or {"class": type(model).__name__}, "dataset": dataset, "threat": [threat.norm, threat.eps],
        "suite": suite_settings, "seed": options.seed, "n_examples": n_test, "batch_size": options.batch_size,
        "world_size": world_size, "settings": repr(options.settings or EstimatorSettings()),
        "defenses": list(plan.requested_defenses) if plan.requested_defenses else None,
        "sources": list(options.sources) if options.sources else None, "protocol": plan.mode.value,
        "paper_columns": plan.paper_columns, **({"headline": plan.headline} if plan.headline else {}),
    }
    state = EvalState(state_path, fingerprint, started=started)
    runner = AttackRunner(model, threat, options.seed, state, options.batch_size, options.settings,
                          suite.adjoint_variant, talk, rank, world_size)
    timing: dict[str, Any] = {"resumed_units": state.resumed}

    # Price: the listed runs, priced on the dev examples before anything runs (kept across a resume).
    estimate = state.meta.get("estimate")
    if estimate is None and given_estimate is not None:  # evaluate(..., estimate=est): its probe, not a second one
        estimate = dict(given_estimate.to_dict(), reused=True)
        state.set_meta("estimate", estimate)
    if estimate is None:
        estimate = (estimate_cost(runner, plan, assumed_runs(plan), *dev_xy, world_size).to_dict() if dev_xy is not None
                    else {"skipped": "no dev split: nothing to time the work on without reading test data"})
        state.set_meta("estimate", estimate)
    # The banner and the closing line go to stderr on rank 0 even without progress bars (--no-progress).
    say(banner(plan, model_info or target.describe(), threat, len(test), estimate)
        + (f"\n  warning: {downgrade}" if downgrade else ""), rank == 0)
    overall = None
    if talk:
        from tqdm.auto import tqdm

        overall = tqdm(total=sum((estimate.get("attack_runs") or {}).values()) or None, desc="evaluation (attack runs)",
                       unit="run", position=0, leave=True)
        runner.overall = overall

    # Dev: early exit and attack candidates, chosen on dev only, from one set of dev attacks.
    selection: Optional[EarlyExitSelection] = None
    candidates = None
    defenses = plan.defenses([]) if not plan.early_exit_selection else []
    outcomes = {}
    if plan.mode is ProtocolMode.ADAPTIVE and (dev is None or dev_xy is None):
        raise ConfigError("the adaptive protocol chooses its attacks on a dev split; none was given")
    if dev is not None and dev_xy is not None and plan.dev_defenses():
        t0 = time.perf_counter()
        for step, done in (("early_exit_selection", plan.early_exit_selection),
                           ("candidate_selection", plan.mode is ProtocolMode.ADAPTIVE),
                           ("headline_selection", plan.headline is None and not plan.early_exit_selection
                            and plan.mode is not ProtocolMode.ADAPTIVE)):  # logged where it is the dev phase's only use
            if done:
                data_access.append({"phase": step, "split": dev.name, "n_examples": len(dev_xy[1])})
        outcomes = run_dev_phase(runner, plan, *dev_xy)
        if plan.early_exit_selection:
            selection = select_early_exit(outcomes, target.n_states, suite.matrix.label)
        early_states = list(dict.fromkeys([selection.paper_rule, selection.white_box_rule])) if selection else []
        defenses = plan.defenses(early_states)
        if plan.mode is ProtocolMode.ADAPTIVE:
            candidates = select_candidates(runner, [str(d) for d in defenses], outcomes, suite.matrix.label,
                                           plan.top_k, plan.paper_columns)
        timing["dev_s"] = time.perf_counter() - t0

    named = plan.headline
    if named == "early":
        named = f"early:{selection.white_box_rule}" if selection is not None else None
    headline = select_headline(outcomes, [str(d) for d in defenses], named)

    # Test: the test split, touched once, after the dev phase.
    x, y = split_tensors(test, n_test, device, dtype)
    check_labels_in_range(y, n_classes, test.name)
    data_access.append({"phase": "test_evaluation", "split": test.name, "n_examples": len(y)})
    defense_plans = plan.defense_plans(defenses, candidates)
    if overall is not None:  # the test plan is known now: the bar's total becomes exact
        overall.total = len(runner.executed) + sum(len(test_runs(plan, d)) for d in defense_plans)
        overall.refresh()
    # the test phase's points only: asked for, or the transfer to a purified defense judges its twin's
    runner.keep_points = options.return_adversarial or any(d.purify is not None for d in defenses)
    results = TestPhase(runner, plan, x, y, options.return_adversarial).run(defense_plans)
    if overall is not None:
        overall.close()
    timing["defenses_s"] = {r.defense: r.seconds for r in results}
    timing["this_process_s"] = time.perf_counter() - started
    timing["total_s"] = state.wall_s()  # a resumed evaluation: what its results cost, over every process
    result = assemble(plan, runner, results, headline, selection, candidates, estimate, data_access, timing,
                      model_info=model_info or target.describe(), dataset=dataset, suite=suite_settings,
                      dev_given=dev is not None, x=x, y=y, seed=options.seed, batch_size=options.batch_size)
    if out is not None and rank == 0:
        from .report import write_reports

        write_reports(result, out)
    return result


def assemble(plan: EvaluationPlan, runner: AttackRunner, results: list[DefenseResult], headline: tuple[str, str],
             selection: Optional[EarlyExitSelection], candidates: Optional[CandidateSelection], estimate: dict[str, Any],
             data_access: list[dict[str, Any]], timing: dict[str, Any], *, model_info: dict[str, Any], dataset: str,
             suite: dict[str, Any], dev_given: bool, x: Tensor, y: Tensor, seed: int,
             batch_size: int) -> EvaluationResult:
    """The result of the phases: the headline defense, the timing against the reference attack, the
    estimate beside the actual time, the notes."""
    target, world_size = plan.target, runner.world_size
    best = next(r for r in results if r.defense == headline[0])
    final = next((r for r in results if r.defense == "final"), results[0])
    chance = at_chance(final.clean_acc / 100.0, len(y), runner.n_classes)
    ready = str(target.ready_made)
    reference = next((c for c in final.matrix if c.source == ready and c.attack == plan.suite.matrix.label), None)
    total = timing["total_s"]
    timing.update({"reference_attack": f"{plan.suite.matrix.label}|{reference.source}" if reference else None,
                   "reference_attack_s": reference.seconds if reference else None})
    attack_seconds = sum(c.seconds for r in results for c in r.matrix + r.cascade)
    timing["attack_s"] = attack_seconds  # summed over processes, like reference_attack_s
    if reference and reference.seconds > 0:
        timing["attack_time_over_reference"] = attack_seconds / reference.seconds
        timing["total_over_reference"] = total * world_size / reference.seconds
    timing["share_by_attack"] = attack_shares(results)
    resumed = runner.state.resumed
    if "skipped" not in estimate:
        estimate = dict(estimate, actual_s=total, actual_over_predicted=total / estimate["predicted_s"]
                        if estimate["predicted_s"] > 0 else None, resumed=resumed > 0)
    said = (([f"predicted {estimate['predicted_s']:.0f} s"] if "predicted_s" in estimate else [])
            + ([f"resumed: {timing['this_process_s']:.0f} s in this process"] if resumed else []))
    say(f"evaluation finished in {total:.0f} s" + (f" ({', '.join(said)})" if said else ""), runner.rank == 0)
    return EvaluationResult(
        deqrobust_version=__version__,
        model=model_info,
        dataset=dataset,
        threat_model=runner.threat.norm,
        eps=runner.threat.eps,
        n_examples=len(y),
        seed=seed,
        suite=suite,
        clean_acc=best.clean_acc,
        autoattack_acc=best.worst_case_acc,
        best_defense=best.defense,
        best_defense_checks_passed=not any(c.failed for c in best.sanity_checks),
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
        notes=([plan.target.downgrade() or ""] if not plan.target.is_deq else [])
        + ([f"{plan.describe()['why']}; no early-exit defense"] if not dev_given else [])
        + ([f"model at chance on dev: {plan.dev_clean}; only the final output under the ready-made "
            f"{plan.suite.matrix.label} and the sanity checks were run — train the model first"]
           if plan.mode is ProtocolMode.AT_CHANCE else [])
        + ([f"model at chance: clean accuracy {with_interval(final.clean_acc, len(y))}% is within sampling noise of guessing among "
            f"{runner.n_classes} classes ({len(y)} examples) — its robustness numbers say nothing"] if chance else [])
        + unrun_columns(plan, results)
        + notes_for(results),
        best_defense_rule=headline[1],
        clean_acc_interval=interval_of(best.clean_acc, len(y)),
        autoattack_acc_interval=interval_of(best.worst_case_acc, len(y)),
        undefended_clean_acc_interval=interval_of(final.clean_acc, len(y)),
    )
