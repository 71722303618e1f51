"""``deqrobust demo``: the main job end to end on the offline default dataset.

Trains a robust MDEQ-tiny on scikit-learn's 8x8 digits with PGD-AT (phantom gradient, the paper's
8/7 Broyden setting), then runs the full white-box protocol on it — every defense (final, early
exit chosen on the dev split, ensemble) against every attack candidate (ready-made, simultaneous
adjoint and unrolled intermediates at every state, both gradient ensembles) x (PGD-10, APGD-CE,
APGD-T, FAB-T, Square) — and writes the report to ``runs/demo/``.

Threat model: L-inf, eps = 0.1. Digits pixels take the values k/16, so CIFAR-10's 8/255 would be a
fraction of one grey level; 0.1 is 1.6 grey levels (step 0.025 = eps/4, as 2/255 is for 8/255).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_CONFIG = "digits-tiny-unroll"
# Fits the whole demo (training + full protocol) in under 10 minutes on 2 CPU cores.
DEMO_TRAIN = ["run.epochs=8", "run.threads=1"]
DEMO_EVAL = {"n_examples": None, "dev_examples": 100, "sanity_examples": 48}
# --quick: the same pipeline, reduced, for CI (about a minute).
QUICK_TRAIN = ["run.epochs=1", "data.train_subset=256", "pretrain.iterations=8", "eval.dev_examples=32", "run.threads=1"]
QUICK_EVAL = {"n_examples": 24, "dev_examples": 12, "sanity_examples": 8}


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
    import shutil

    import torch

    from ..evaluate import evaluate_checkpoint, get_suite
    from ..evaluate.report import summary_table
    from ..train import apply_overrides, load_config, train

    torch.set_flush_denormal(True)
    started = time.perf_counter()
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    train_dir = out / "train"
    overrides = QUICK_TRAIN if args.quick else DEMO_TRAIN
    evaluation = QUICK_EVAL if args.quick else DEMO_EVAL
    config = apply_overrides(load_config(DEMO_CONFIG), overrides)
    print(f"deqrobust demo{' --quick' if args.quick else ''}: MDEQ-tiny on scikit-learn digits (8x8), "
          f"PGD-AT with the phantom gradient, Broyden {config.deq.f_max_iter}/{config.deq.b_max_iter}; "
          f"threat model L-inf eps={config.attack.eps:g} (pixels are k/16: 8/255 would be below one grey level).")
    print(f"[1/2] training ({config.run.epochs} epochs) -> {train_dir}")
    last = train_dir / "checkpoints" / "last.safetensors"
    result = train(config, train_dir, resume=last.exists(), seed=args.seed, progress=not args.no_progress)
    print(f"      best dev accuracy: clean {100 * result.best_dev_clean_acc:.1f}%, "
          f"PGD-{config.eval.pgd_steps} {100 * result.best_dev_robust_acc:.1f}% (epoch {result.best_epoch})")
    suite = get_suite("quick", dev_examples=evaluation["dev_examples"], sanity_examples=evaluation["sanity_examples"])
    print(f"[2/2] white-box evaluation (suite '{suite.name}': every defense x every attack candidate) -> {out}")
    evaluated = evaluate_checkpoint(train_dir / "checkpoints" / "best.safetensors", suite=suite,
                                    n_examples=evaluation["n_examples"], seed=args.seed, out_dir=out,
                                    progress=not args.no_progress, device="cpu")
    print()
    print(summary_table(evaluated))
    print(f"\nbest defense: {evaluated.best_defense}, worst-case robust accuracy {evaluated.autoattack_acc:.2f}% "
          f"over {evaluated.n_examples} test examples (clean {evaluated.clean_acc:.2f}%)")
    for note in evaluated.notes:
        print(f"note: {note}")
    print(f"report: {out / 'report.md'}; results: {out / 'results.json'}; plots: {out / 'residuals.png'}, "
          f"{out / 'robustness_per_state.png'}")
    print(f"demo wall time: {time.perf_counter() - started:.0f} s")
    return 0
