"""The white-box evaluation protocol (SPEC §6): every defense × every attack candidate, per-example
worst case, early exit chosen on dev, obfuscation checks, reports."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import __version__
from ..attackable import EstimatorSettings
from ..attacks import ThreatModel
from ..core import DEQClassifier
from ..data.splits import Split
from ..errors import ConfigError
from ..gradients import GradientSource, all_sources
from ..utils.seeding import seed_everything
from . import checks
from .results import AttackCell, CheckResult, DefenseResult, EvaluationResult
from .runner import AttackRunner, UnitResult, percent
from .selection import select_early_exit
from .state import EvalState
from .suites import Suite, get_suite


def split_tensors(split: Split, n: Optional[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``n`` examples of a split as float [0,1] images and int64 labels."""
    count = len(split.labels) if n is None else min(int(n), len(split.labels))
    images = split.images[:count]
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return x.to(device), split.labels[:count].to(device)


def sources_for(model: nn.Module, names: Optional[Sequence[str]] = None) -> list[Optional[GradientSource]]:
    """Every gradient source of the protocol (or the listed ones, validated)."""
    if not isinstance(model, DEQClassifier):
        return [None]  # a plain network: autograd through the network itself
    if names is None:
        return list(all_sources(model.n_states))
    return [GradientSource.parse(n, model.n_states) for n in names]


def source_name(source: Optional[GradientSource]) -> str:
    return "autograd" if source is None else str(source)


def paper_table(model: nn.Module, clean: float, cells: dict[str, float], worst: float, minimum: float) -> dict[str, Any]:
    """Table 2's layout for one defense (matrix attack): final / strongest intermediate / ensemble."""
    table: dict[str, Any] = {"clean": clean, "min_over_attacks": minimum, "worst_case": worst}
    if not isinstance(model, DEQClassifier):
        table.update({k: None for k in ("adjoint_final", "adjoint_intermediate", "adjoint_ensemble",
                                         "unrolled_final", "unrolled_intermediate", "unrolled_ensemble")})
        table["ready_made"] = cells.get("autograd")
        return table
    n_states = model.n_states
    for ready in ("exact", "phantom"):
        table[f"ready_made_{ready}"] = cells.get(ready)
    for kind in ("adjoint", "unrolled"):
        table[f"{kind}_final"] = cells.get(f"{kind}:{n_states}")
        inter = [(cells[f"{kind}:{n}"], n) for n in range(1, n_states) if f"{kind}:{n}" in cells]
        table[f"{kind}_intermediate"] = min(inter)[0] if inter else None
        table[f"{kind}_intermediate_state"] = min(inter)[1] if inter else None
        table[f"{kind}_ensemble"] = cells.get(f"{kind}:ensemble")
    return table


class _Evaluation:
    """One evaluation run (holds the runner, data and bookkeeping)."""

    def __init__(self, runner: AttackRunner, suite: Suite, progress: bool,
                 sources: Optional[Sequence[str]] = None) -> None:
        self.runner, self.suite, self.progress = runner, suite, progress
        self.model = runner.model
        self.sources = sources_for(self.model, sources)

    def bar(self, runs: int, n: int, desc: str) -> tqdm:
        """A progress bar over ``runs`` attack runs on ``n`` examples, counted in examples."""
        return tqdm(total=runs * self.runner.bar_share(n), desc=desc, disable=not self.progress, leave=False,
                    unit="ex")

    def pct(self, mask: Tensor) -> float:
        return percent(mask)

    def cell(self, label: str, source: Optional[GradientSource], mode: str, res: UnitResult, robust: Tensor) -> AttackCell:
        return AttackCell(
            attack=label, source=source_name(source), mode=mode, n_attacked=res.attacked,
            n_broken=len(res.broken), robust_acc=self.pct(robust), grad_computed=res.grad_computed,
            grad_zero=res.grad_zero, grad_nonfinite=res.grad_nonfinite, n_nonfinite=len(res.nonfinite),
            seconds=res.seconds,
        )

    def defense(self, defense: str, x: Tensor, y: Tensor) -> DefenseResult:
        start = time.perf_counter()
        runner, suite = self.runner, self.suite
        sources = self.sources
        correct, nonfinite_clean, _ = runner.clean(defense, x, y)
        robust = correct.clone()
        nonfinite_adv: set[int] = set()

        # Matrix: the standalone attack with every gradient source (the paper's tables).
        matrix, cells = [], {}
        bar = self.bar(len(sources), len(y), f"{defense}: {suite.matrix.label} × {len(sources)} sources")
        for source in sources:
            res = runner.run(f"test/{defense}/matrix/{suite.matrix.label}/{source_name(source)}", defense,
                             suite.matrix, source, x, y, correct, bar=bar)
            alone = correct.clone()
            alone[res.broken] = False
            robust[res.broken] = False
            nonfinite_adv.update(res.nonfinite)
            matrix.append(self.cell(suite.matrix.label, source, "matrix", res, alone))
            cells[source_name(source)] = matrix[-1].robust_acc
        bar.close()
        for spec, names in suite.standalone:
            bar = self.bar(len(names), len(y), f"{defense}: {spec.label} × {len(names)} sources")
            for name in names:
                source = None if name == "none" or not isinstance(self.model, DEQClassifier) else GradientSource.parse(name, self.model.n_states)
                res = runner.run(f"test/{defense}/matrix/{spec.label}/{name}", defense, spec, source, x, y, correct,
                                 bar=bar)
                alone = correct.clone()
                alone[res.broken] = False
                robust[res.broken] = False
                nonfinite_adv.update(res.nonfinite)
                matrix.append(self.cell(spec.label, source, "matrix", res, alone))
                matrix[-1].source = name if source is None else matrix[-1].source
                cells[f"{spec.label}|{name}"] = matrix[-1].robust_acc
            bar.close()

        # Cascade: every algorithm with every source, on the survivors only; Square last.
        cascade = []
        for spec in suite.cascade:
            bar = self.bar(len(sources), len(y), f"{defense}: {spec.label} × {len(sources)} sources")
            for source in sources:
                res = runner.run(f"test/{defense}/cascade/{spec.label}/{source_name(source)}", defense, spec,
                                 source, x, y, robust, bar=bar)
                robust[res.broken] = False
                nonfinite_adv.update(res.nonfinite)
                cascade.append(self.cell(spec.label, source, "cascade", res, robust))
            bar.close()
        square_cell = None
        if suite.square is not None:
            bar = self.bar(1, len(y), f"{defense}: {suite.square.label}")
            res = runner.run(f"test/{defense}/cascade/{suite.square.label}/none", defense, suite.square, None,
                             x, y, robust, bar=bar)
            bar.close()
            robust[res.broken] = False
            nonfinite_adv.update(res.nonfinite)
            square_cell = self.cell(suite.square.label, None, "cascade", res, robust)
            square_cell.source = "none"
            cascade.append(square_cell)

        weakest = min(matrix, key=lambda c: c.robust_acc)
        strongest_pgd = min((c for c in matrix if c.attack == suite.matrix.label), key=lambda c: c.robust_acc)
        sanity = self.sanity(defense, x, y, correct, strongest_pgd, matrix + cascade, square_cell, robust)
        worst = self.pct(robust)
        return DefenseResult(
            defense=defense,
            clean_acc=self.pct(correct),
            worst_case_acc=worst,
            min_over_attacks_acc=weakest.robust_acc,
            min_over_attacks_attack=f"{weakest.attack}|{weakest.source}",
            n_nonfinite_clean=int(nonfinite_clean.sum()),
            n_nonfinite_adversarial=len(nonfinite_adv),
            table=paper_table(self.model, self.pct(correct), cells, worst, weakest.robust_acc),
            matrix=matrix,
            cascade=cascade,
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
        source = None if weakest.source == "autograd" else GradientSource.parse(weakest.source, getattr(self.model, "n_states", 1))
        runs = len(checks.growth_radii(runner.threat, xs, suite.eps_multipliers)) + 2
        bar = self.bar(runs, n, f"{defense}: sanity checks")
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


def residual_profile(model: nn.Module, x: Tensor, batch_size: int) -> dict[str, Any]:
    """Relative residual ``r(z_n)`` per state on clean inputs (paper Fig. 2b)."""
    if not isinstance(model, DEQClassifier):
        return {}
    traces, steps = [], []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            solve = model.solve(x[start : start + batch_size])
            traces.append(solve.info.rel_trace.float().cpu())
            steps.append(solve.info.nstep.float().cpu())
    rel = torch.cat(traces)
    finite = torch.where(torch.isfinite(rel), rel, torch.full_like(rel, float("nan")))
    return {
        "states": list(range(rel.shape[1])),
        "rel_mean": torch.nanmean(finite, dim=0).tolist(),
        "rel_median": torch.nanmedian(finite, dim=0).values.tolist(),
        "rel_max": torch.nan_to_num(finite, nan=float("inf")).amax(dim=0).tolist(),
        "mean_nstep": torch.cat(steps).mean().item(),
        "n_examples": int(rel.shape[0]),
    }


def evaluate(
    model: nn.Module,
    *,
    dev: Split,
    test: Split,
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
) -> EvaluationResult:
    """Run the full white-box protocol and return (and, with ``out_dir``, write) the results.

    The early-exit step is chosen on the first ``suite.dev_examples`` dev examples only; the test
    split is read once, after the selection. With ``out_dir`` a state file makes the run resumable
    (``resume=False`` starts over). ``rank``/``world_size`` shard the batches across processes
    (results are gathered exactly). ``sources`` restricts the gradient sources (default: all of
    them — ready-made, adjoint and unrolled at every state, both ensembles).

    Example (see ``tests/evaluate`` for a full run)::

        result = evaluate(model, dev=splits.dev, test=splits.test, threat=ThreatModel("Linf", 0.1),
                          suite="quick", n_examples=100, out_dir="runs/eval")
        print(result.best_defense, result.autoattack_acc)
    """
    started = time.perf_counter()
    suite = get_suite(suite) if isinstance(suite, str) else suite
    progress = progress and rank == 0  # one set of bars per evaluation, not one per process
    for name, value in (("n_examples", n_examples), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    seed_everything(seed)
    model.eval()
    device = next(model.parameters()).device
    is_deq = isinstance(model, DEQClassifier)
    out = Path(out_dir) if out_dir is not None else None
    state_path = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        state_path = out / (f"eval_state.rank{rank}.json" if world_size > 1 else "eval_state.json")
        if not resume and state_path.exists():
            state_path.unlink()
    n_test = len(test) if n_examples is None else min(int(n_examples), len(test))  # the size only: no test data read yet
    suite_settings = suite.describe(threat.eps)
    fingerprint = {
        "model": model_info or {"class": type(model).__name__}, "dataset": dataset, "threat": [threat.norm, threat.eps],
        "suite": suite_settings, "seed": seed, "n_examples": n_test, "batch_size": batch_size,
        "world_size": world_size, "settings": repr(settings or EstimatorSettings()),
        "defenses": list(defenses) if defenses else None, "sources": list(sources) if sources else None,
    }
    state = EvalState(state_path, fingerprint)
    runner = AttackRunner(model, threat, seed, state, batch_size, settings, suite.adjoint_variant, progress,
                          rank, world_size)
    evaluation = _Evaluation(runner, suite, progress, sources)
    data_access: list[dict[str, Any]] = []
    timing: dict[str, Any] = {"resumed_units": state.resumed}

    # 1. Early exit chosen on dev only.
    selection = None
    if is_deq and (defenses is None or any(d.startswith("early") and ":" not in d for d in defenses)):
        t0 = time.perf_counter()
        x_dev, y_dev = split_tensors(dev, suite.dev_examples, device)
        data_access.append({"phase": "early_exit_selection", "split": dev.name, "n_examples": len(y_dev)})
        selection = select_early_exit(runner, x_dev, y_dev, suite.matrix, progress)
        timing["early_exit_selection_s"] = time.perf_counter() - t0

    # 2. The test split, touched once, after selection.
    x, y = split_tensors(test, n_test, device)
    data_access.append({"phase": "test_evaluation", "split": test.name, "n_examples": len(y)})
    names = resolve_defenses(model, defenses, selection)
    results = []
    for name in names:
        results.append(evaluation.defense(name, x, y))
    timing["defenses_s"] = {r.defense: r.seconds for r in results}

    best = max(results, key=lambda r: (r.worst_case_acc, r.clean_acc))
    final = next((r for r in results if r.defense == "final"), results[0])
    reference = next((c for c in final.matrix if c.source in (getattr(model, "grad", "autograd"), "autograd")), None)
    total = time.perf_counter() - started
    timing.update({"total_s": total, "reference_attack": f"{suite.matrix.label}|{reference.source}" if reference else None,
                   "reference_attack_s": reference.seconds if reference else None})
    attack_seconds = sum(c.seconds for r in results for c in r.matrix + r.cascade)
    timing["attack_s"] = attack_seconds  # summed over processes, like reference_attack_s
    if reference and reference.seconds > 0:
        timing["attack_time_over_reference"] = attack_seconds / reference.seconds
        timing["total_over_reference"] = total * world_size / reference.seconds
    timing["share_by_attack"] = attack_shares(results)
    result = EvaluationResult(
        deqrobust_version=__version__,
        model=model_info or describe_model(model),
        dataset=dataset,
        threat_model=threat.norm,
        eps=threat.eps,
        n_examples=len(y),
        seed=seed,
        suite=suite_settings,
        clean_acc=final.clean_acc,
        autoattack_acc=best.worst_case_acc,
        best_defense=best.defense,
        defenses=results,
        early_exit=selection,
        residuals=residual_profile(model, x, batch_size),
        data_access=data_access,
        timing=timing,
        notes=notes_for(results),
    )
    if out is not None and rank == 0:
        from .report import write_reports

        write_reports(result, out)
    return result


def resolve_defenses(model: nn.Module, defenses: Optional[Sequence[str]], selection) -> list[str]:
    if not isinstance(model, DEQClassifier):
        if defenses and list(defenses) != ["final"]:
            raise ConfigError("a plain (non-DEQ) network has only the 'final' defense")
        return ["final"]
    if defenses is None:
        defenses = ["final", "early", "ensemble"]
    names: list[str] = []
    for d in defenses:
        if d == "early":
            if selection is None:
                raise ConfigError("'early' needs the dev selection; give early:<n> explicitly")
            for n in (selection.paper_rule, selection.white_box_rule):
                if f"early:{n}" not in names:
                    names.append(f"early:{n}")
        elif d not in names:
            names.append(d)
    return names


def attack_shares(results: list[DefenseResult]) -> dict[str, float]:
    """Share of the attack wall time taken by each algorithm (all defenses, all sources)."""
    totals: dict[str, float] = {}
    for r in results:
        for c in r.matrix + r.cascade:
            key = f"{c.attack} ({c.mode})"
            totals[key] = totals.get(key, 0.0) + c.seconds
    whole = sum(totals.values()) or 1.0
    return {k: v / whole for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def notes_for(results: list[DefenseResult]) -> list[str]:
    notes = []
    for r in results:
        failed = [c.name for c in r.sanity_checks if not c.passed]
        if failed:
            notes.append(f"{r.defense}: sanity check(s) failed: {', '.join(failed)} — the robust accuracy may be "
                         "overestimated (gradient masking); see sanity_checks for the numbers")
        extra = sum(int(c.details.get("breaks_beyond_suite", 0)) for c in r.sanity_checks)
        if extra:
            notes.append(f"{r.defense}: the sanity checks' own attacks at eps broke {extra} example(s) that every suite "
                         "attack missed (counted in the worst case) — the suite's budgets are too small for this model")
        if r.n_nonfinite_clean or r.n_nonfinite_adversarial:
            notes.append(f"{r.defense}: {r.n_nonfinite_clean} clean and {r.n_nonfinite_adversarial} adversarial "
                         "inputs gave NaN/Inf logits (counted as errors)")
    return notes


def describe_model(model: nn.Module) -> dict[str, Any]:
    info: dict[str, Any] = {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())}
    if isinstance(model, DEQClassifier):
        info.update({k: getattr(model, k) for k in (
            "f_solver", "f_max_iter", "f_tol", "f_stop_mode", "b_solver", "b_max_iter", "b_tol", "grad",
            "phantom_steps", "phantom_damping", "phantom_undamped_first")})
    return info


def parse_eps(text: Union[str, float, None]) -> Optional[float]:
    """``"8/255"`` or ``"0.1"`` -> float (None passes through)."""
    if text is None or isinstance(text, float):
        return text
    from fractions import Fraction

    try:
        value = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"invalid eps {text!r}: give a number such as 0.1 or a fraction such as 8/255") from None
    if value <= 0:
        raise ConfigError(f"eps must be > 0, got {text!r}")
    return value


def evaluate_checkpoint(
    checkpoint: Union[str, Path],
    *,
    dataset: Optional[str] = None,
    data_root: Optional[Union[str, Path]] = None,
    data_path: Optional[Union[str, Path]] = None,
    download: bool = True,
    eps: Union[str, float, None] = None,
    norm: Optional[str] = None,
    suite: Union[str, Suite] = "quick",
    n_examples: Optional[int] = None,
    seed: int = 0,
    out_dir: Optional[Union[str, Path]] = None,
    resume: bool = True,
    progress: bool = True,
    batch_size: int = 128,
    defenses: Optional[Sequence[str]] = None,
    device: str = "auto",
    sources: Optional[Sequence[str]] = None,
) -> EvaluationResult:
    """Load a checkpoint and run :func:`evaluate` on its dataset and threat model (both overridable).

    The dev split is rebuilt with the checkpoint's dev settings, so the early-exit step is chosen on
    the same held-out examples that selected the checkpoint, never on test data. Under ``torchrun``
    the batches are sharded across the processes and the totals gathered exactly.
    """
    from ..checkpoint import load_model
    from ..data import load_dataset
    from ..distributed import init_distributed

    dist = init_distributed(device)
    model, meta = load_model(checkpoint, dist.device)
    data_meta = meta.get("dataset") or {}
    name = dataset or data_meta.get("name")
    if not name:
        raise ConfigError(f"{checkpoint} records no dataset; pass --dataset")
    splits = load_dataset(name, root=data_root, download=download, path=data_path,
                          dev_size=data_meta.get("dev_size"), dev_seed=int(data_meta.get("dev_seed", 0)))
    threat_meta = meta.get("threat_model") or {}
    eps_value = parse_eps(eps) if eps is not None else threat_meta.get("eps")
    if eps_value is None:
        raise ConfigError(f"{checkpoint} records no threat model; pass --eps")
    threat = ThreatModel(norm or threat_meta.get("norm", "Linf"), float(eps_value))
    info = describe_model(model)
    info.update({"name": (meta.get("model") or {}).get("name"), "checkpoint": str(checkpoint),
                 "checkpoint_kind": meta.get("kind"), "epoch": meta.get("epoch"),
                 "tensor_sha256": meta.get("tensor_sha256")})
    return evaluate(model, dev=splits.dev, test=splits.test, threat=threat, suite=suite, n_examples=n_examples,
                    seed=seed, out_dir=out_dir, resume=resume, progress=progress, batch_size=batch_size,
                    defenses=defenses, model_info=info, dataset=name, rank=dist.rank, world_size=dist.world_size,
                    sources=sources)
