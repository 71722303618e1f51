"""``deqrobust demo``: the main job end to end on the offline default dataset.

Trains a robust MDEQ-tiny on scikit-learn's 8x8 digits with PGD-AT (phantom gradient, the paper's
8/7 Broyden setting), then runs the white-box protocol on 240 test examples — every defense (final,
early exit chosen on the dev split, ensemble); every gradient source (ready-made, simultaneous
adjoint with both pairings and unrolled intermediates at every state, both gradient ensembles)
attacked on dev, the paper-table sources and the strongest ones kept for the test matrix (PGD-10)
and the strongest for the cascade (PGD-10 with restarts, APGD-CE, APGD-T, FAB-T), then Square —
and writes the report to ``runs/demo/``.

Threat model: L-inf, eps = 0.1. Digits pixels take the values k/16, so CIFAR-10's 8/255 would be a
fraction of one grey level; 0.1 is 1.6 grey levels (step 0.025 = eps/4, as 2/255 is for 8/255).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_CONFIG = "digits-tiny-unroll"
# Sized for a first look: training 146 s + the full adaptive protocol 337 s on 2 CPU cores (README).
DEMO_TRAIN = ["run.epochs=7", "run.threads=1"]
DEMO_EVAL = ["--n-examples", "240", "--batch-size", "60", "--workers", "2", "--paper-columns"]
# --quick: the same pipeline, reduced, for CI (about a minute).
QUICK_TRAIN = ["run.epochs=2", "data.train_subset=512", "pretrain.iterations=16", "eval.dev_examples=64", "run.threads=1"]
QUICK_EVAL = ["--n-examples", "16", "--batch-size", "8", "--workers", "2", "--dev-examples", "8", "--sanity-examples", "8",
              "--paper-columns"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="train a robust tiny MDEQ on digits and evaluate it fully white-box (offline, CPU)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--quick", action="store_true", help="a reduced version of the same pipeline (CI)")
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming a previous demo run")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import json
    import shutil
    import subprocess

    import torch

    from ..errors import ConfigError
    from ..train import apply_overrides, load_config, train

    torch.set_flush_denormal(True)
    started = time.perf_counter()
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    train_dir = out / "train"
    config = apply_overrides(load_config(DEMO_CONFIG), QUICK_TRAIN if args.quick else DEMO_TRAIN)
    if config.deq is None:
        raise ConfigError(f"the demo config {DEMO_CONFIG} has no deq section")
    print(f"deqrobust demo{' --quick' if args.quick else ''}: MDEQ-tiny on scikit-learn digits (8x8), "
          f"PGD-AT with the phantom gradient, Broyden {config.deq.f_max_iter}/{config.deq.b_max_iter}; "
          f"threat model L-inf eps={config.attack.eps:g} (pixels are k/16: 8/255 would be below one grey level).",
          flush=True)
    print(f"[1/2] training ({config.run.epochs} epochs) -> {train_dir}", flush=True)
    last = train_dir / "checkpoints" / "last.safetensors"
    result = train(config, train_dir, resume=last.exists(), seed=args.seed, progress=not args.no_progress)
    print(f"      best dev accuracy: clean {100 * result.best_dev_clean_acc:.1f}%, "
          f"PGD-{config.eval.pgd_steps} {100 * result.best_dev_robust_acc:.1f}% (epoch {result.best_epoch}); "
          f"{result.wall_time:.0f} s", flush=True)
    print(f"[2/2] white-box evaluation (every defense; attack candidates chosen on dev; 2 worker processes) -> {out}",
          flush=True)
    cmd = [sys.executable, "-m", "deqrobust", "evaluate", "--checkpoint", str(train_dir / "checkpoints" / "best.safetensors"),
           "--suite", "quick", "--seed", str(args.seed), "--out", str(out), *(QUICK_EVAL if args.quick else DEMO_EVAL)]
    if args.no_progress:
        cmd.append("--no-progress")
    code = subprocess.run(cmd).returncode
    if code != 0:
        print(f"deqrobust demo: the evaluation failed (exit code {code}); rerun to resume it", file=sys.stderr)
        return code
    data = json.loads((out / "results.json").read_text())
    print(f"demo wall time: {time.perf_counter() - started:.0f} s "
          f"(training {result.wall_time:.0f} s, evaluation {data['timing']['total_s']:.0f} s)")
    return 0
