"""Runs the trainings and evaluations of a paper target and renders ours beside the paper's."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import ConfigError
from ..evaluate import EvaluationOptions, evaluate_checkpoint
from ..evaluate.random_depth import RandomDepthResult
from ..evaluate.results import EvaluationResult
from ..utils.io import atomic_write_text
from .experiments import Experiment, Run, experiment
from .tables import plot_fig2, render


@dataclass
class ReproduceResult:
    experiment: Experiment
    markdown: str
    results: dict[str, EvaluationResult] = field(default_factory=dict)
    report: Optional[Path] = None
    random_depth: dict[str, RandomDepthResult] = field(default_factory=dict)


def run_dir(out: Path, scale: str, run: Run, overrides: Sequence[str]) -> Path:
    extra = list(run.overrides) + list(overrides)
    tag = "" if not extra else "-" + hashlib.sha1("\n".join(extra).encode()).hexdigest()[:8]
    return out / scale / "train" / f"{run.config}{tag}"


RANDOM_DEPTH_STEPS = 20  # PGD-20 of step eps/4 for each attack on the random-depth model


def random_depth_result(checkpoint: Path, path: Path, *, n_examples: Optional[int], seed: int, device: str,
                        progress: bool) -> RandomDepthResult:
    """The checkpoint's model at a random depth with EOT (:mod:`deqrobust.evaluate.random_depth`) on its
    test split, reused from ``path`` when it holds the same weights and settings, else computed and saved."""
    from ..attacks import ThreatModel
    from ..checkpoint import load_model
    from ..data import load_dataset
    from ..distributed import init_distributed
    from ..evaluate.inputs import split_tensors
    from ..evaluate.random_depth import DEPTH_ATTACKS, evaluate_random_depth
    from ..validate import model_dtype
    from ..models import is_deq

    dist = init_distributed(device)
    model, meta = load_model(checkpoint, dist.device)
    if not is_deq(model):
        raise ConfigError(f"{checkpoint}: a random depth needs a DEQ, got {type(model).__name__}")
    data_meta = meta.get("dataset") or {}
    splits = load_dataset(data_meta["name"], dev_size=data_meta.get("dev_size"), dev_seed=int(data_meta.get("dev_seed", 0)))
    threat_meta = meta.get("threat_model") or {}
    threat = ThreatModel(threat_meta.get("norm", "Linf"), float(threat_meta["eps"]))
    x, y = split_tensors(splits.test, n_examples, dist.device, model_dtype(model))
    wanted = {"n_examples": int(x.shape[0]), "norm": threat.norm, "eps": float(threat.eps), "seed": int(seed),
              "steps": RANDOM_DEPTH_STEPS, "alpha": float(threat.eps) / 4, "attacks": list(DEPTH_ATTACKS)}
    if path.exists():
        saved = json.loads(path.read_text())
        cached = RandomDepthResult.from_json(saved["result"])
        if saved.get("tensor_sha256") == meta.get("tensor_sha256") and cached.settings() == wanted:
            return cached

    def report(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = evaluate_random_depth(model.eval(), x, y, threat, steps=RANDOM_DEPTH_STEPS, seed=seed,
                                   progress=report if progress else None)
    atomic_write_text(path, json.dumps({"tensor_sha256": meta.get("tensor_sha256"), "result": result.to_json()},
                                       indent=2) + "\n")
    return result


def defenses_tag(defenses: Optional[Sequence[str]]) -> str:
    """Tells apart the evaluations of one run by targets that name different defenses (the followup
    target's model shares its run, and its suite, with table3's)."""
    if defenses is None:
        return ""
    return "-" + hashlib.sha1(",".join(defenses).encode()).hexdigest()[:8]


def refuse_on_cpu(exp: Experiment, overrides: Sequence[str]) -> str:
    """The message printed instead of starting GPU-scale runs on a CPU, with measured cost estimates."""
    from ..train import apply_overrides, load_config
    from .cost import estimate

    lines = [f"refusing to run {exp.target} at paper scale on the CPU: these trainings are GPU-scale "
             "(CIFAR-10, 220 epochs of PGD-10 adversarial training). Estimated cost on this machine, from one "
             "timed forward+backward of each model:"]
    for run in exp.runs:
        cfg = apply_overrides(load_config(run.config), list(overrides))
        est = estimate(run.config, cfg)
        lines.append(f"  - {run.config}: {est.image_passes:.3g} image passes x {est.seconds_per_image_pass:.3g} s "
                     f"= ~{est.cpu_hours:,.0f} CPU-hours (~{est.cpu_hours / 24:,.0f} days)")
    lines.append("Run it on GPUs (--device cuda, optionally under torchrun --nproc_per_node=K), or try the same "
                 "pipeline on the offline default dataset with --scale tiny.")
    return "\n".join(lines)


def reproduce(
    target: str,
    *,
    scale: str = "paper",
    out_dir: Union[str, Path] = "runs/reproduce",
    device: str = "auto",
    seed: int = 0,
    n_examples: Optional[int] = None,
    train_overrides: Sequence[str] = (),
    dev_examples: Optional[int] = None,
    progress: bool = True,
) -> ReproduceResult:
    """Train (or resume) every run ``target`` needs, evaluate each, and render the comparison table.

    Each evaluation reads ``n_examples`` test examples (default: all) and ``dev_examples`` dev ones
    (default: the suite's, never more than ``n_examples``: :func:`~deqrobust.evaluate.dev_size`).

    Training runs are shared between targets (``table2`` and ``table3`` reuse the same DEQ-Large),
    and both training and evaluation resume where they stopped.
    """
    from ..distributed import init_distributed, is_main_process
    from ..train import apply_overrides, load_config, train

    exp = experiment(target, scale)
    dist = init_distributed(device)
    if scale == "paper" and dist.device.type == "cpu":
        raise ConfigError(refuse_on_cpu(exp, train_overrides))
    out = Path(out_dir)
    results: dict[str, EvaluationResult] = {}
    params: dict[str, int] = {}
    random_depth: dict[str, RandomDepthResult] = {}
    for run in exp.runs:
        config = apply_overrides(load_config(run.config), list(run.overrides) + list(train_overrides))
        directory = run_dir(out, scale, run, train_overrides)
        last = directory / "checkpoints" / "last.safetensors"
        train(config, directory, resume=last.exists(), seed=seed, progress=progress, device=device)
        best = directory / "checkpoints" / "best.safetensors"
        defenses = exp.defenses_for(run)
        eval_dir = out / scale / "eval" / f"{directory.name}-{exp.suite}{defenses_tag(defenses)}"
        options = EvaluationOptions(suite=exp.suite, n_examples=n_examples, dev_examples=dev_examples, seed=seed,
                                    out_dir=eval_dir, progress=progress, defenses=defenses,
                                    paper_columns=exp.target != "followup")  # no paper table to fill there
        results[run.key] = evaluate_checkpoint(best, options, device=device)
        params[run.key] = int(results[run.key].model.get("parameters", 0))
        if run.random_depth and exp.target == "followup" and is_main_process():
            random_depth[run.key] = random_depth_result(best, eval_dir / "random_depth.json", n_examples=n_examples,
                                                        seed=seed, device=device, progress=progress)
    markdown = render(exp, results, params, random_depth)
    report = None
    if is_main_process():
        report = atomic_write_text(out / scale / f"{target}.md", markdown + "\n")
        if target == "fig2":
            plot_fig2(exp, results, out / scale / "fig2.png")
    return ReproduceResult(exp, markdown, results, report, random_depth)
