"""``deqrobust evaluate``: the white-box protocol on a checkpoint (see :mod:`deqrobust.evaluate`).

Examples::

    deqrobust evaluate --checkpoint runs/digits-tiny-unroll/checkpoints/best.safetensors
    deqrobust evaluate --checkpoint best.safetensors --suite paper --n-examples 1000 --out runs/eval
    torchrun --nproc_per_node=4 -m deqrobust evaluate --checkpoint best.safetensors --suite paper
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError, ConfigError, DatasetError, DEQInputError
from ..utils.names import split_names


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..evaluate.suites import SUITES

    parser = subparsers.add_parser(
        "evaluate",
        help="fully white-box robustness evaluation of a checkpoint or of any model",
        description="Every defense (final, early exit chosen on dev, ensemble) against every attack candidate "
        "(ready-made, adjoint and unrolled intermediate gradients, gradient ensembles) x (PGD, APGD-CE, "
        "APGD-T, FAB-T, Square); per-example worst case; sanity checks; JSON/Markdown/PNG report.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a .safetensors checkpoint written by deqrobust train")
    which.add_argument("--model", help="your own model: a factory module:function or path/to/file.py:function returning a "
                       "DEQClassifier (every source and defense) or any nn.Module classifier (its own gradient); "
                       "needs --dataset and --eps")
    parser.add_argument("--weights", default=None,
                        help="with --model: weights to load (.safetensors, or a .pt state dict read weights-only)")
    parser.add_argument("--dataset", default=None, help="dataset name (default: the checkpoint's)")
    parser.add_argument("--data-root", default=None, help="dataset cache folder (default: $DEQROBUST_DATA or ~/.cache/deqrobust)")
    parser.add_argument("--data-path", default=None, help="an existing dataset folder (e.g. cifar-10-batches-py)")
    parser.add_argument("--n-examples", type=int, default=None,
                        help="test examples (default: the whole test split); also bounds the dev selections unless "
                        "--dev-examples is given")
    parser.add_argument("--suite", default="quick", choices=sorted(SUITES), help="attack budgets (default: quick)")
    parser.add_argument("--eps", default=None, help="radius, e.g. 8/255 (default: the checkpoint's training eps)")
    parser.add_argument("--norm", default=None, choices=["Linf", "L2"], help="threat model norm (default: the checkpoint's)")
    parser.add_argument("--headline", default=None,
                        help="the headline defense (default: the best worst case on dev, fixed before the test split "
                             "is read), e.g. final or early (the early-exit state chosen on dev)")
    parser.add_argument("--defenses", default=None,
                        help="comma-separated: final, early (chosen on dev), early:<n>, ensemble, ensemble:trajectory, "
                        "entropy (input entropy reduction, read at z_(N-1)), entropy:final, entropy:early:<n>, "
                        "entropy(steps=10,chunk=2,step=<size>,radius=<eps>,memory=2)[:...]")
    parser.add_argument("--sources", default=None,
                        help="comma-separated gradient sources (default: all): exact, phantom, adjoint:<n>, unrolled:<n>, "
                        "adjoint:ensemble, unrolled:ensemble")
    parser.add_argument("--exhaustive", action="store_true",
                        help="every gradient source in the matrix and in the cascade (default: candidates chosen on dev)")
    parser.add_argument("--paper-columns", action="store_true",
                        help="adaptive protocol: the test matrix runs the source of every column of the paper's "
                        "tables too, not only the candidates chosen on dev (the report's table filled)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="adaptive protocol: sources in the AutoAttack cascade, the ready-made one included "
                        "(default: the suite's, 3)")
    parser.add_argument("--estimate", action="store_true",
                        help="time one batch of each kind of work on dev examples, print the predicted wall time "
                        "with its breakdown, and exit (the test split is not read)")
    parser.add_argument("--dev-examples", type=int, default=None,
                        help="dev examples for the early-exit and candidate selections (default: the suite's, never "
                        "more than --n-examples)")
    parser.add_argument("--sanity-examples", type=int, default=None, help="examples for the eps-growth / more-iterations checks")
    parser.add_argument("--seed", type=int, default=0, help="seed of every attack (same seed, same numbers)")
    parser.add_argument("--out", default=None, help="report folder (default: runs/eval/<checkpoint>-<suite>)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--workers", type=int, default=1,
                        help="local worker processes (runs itself under torchrun; batches are sharded, totals exact)")
    parser.add_argument("--fresh", action="store_true", help="ignore a saved evaluation state and start over")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def launch_workers(workers: int, argv: list[str]) -> int:
    """Re-run this command under ``torchrun --standalone`` with ``workers`` processes on this machine."""
    import os
    import subprocess

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
           "-m", "deqrobust", "evaluate", *argv]
    return subprocess.run(cmd, env=env).returncode


def strip_workers(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        out.append(a)
    return out


def names(text: Optional[str]) -> Optional[list[str]]:
    """``"final, early"`` -> ``["final", "early"]`` (None passes through)."""
    return split_names(text) if text else None


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    if args.workers > 1 and "LOCAL_RANK" not in os.environ:
        return launch_workers(args.workers, strip_workers(args.argv[args.argv.index("evaluate") + 1 :]))

    from ..distributed import is_main_process, shutdown
    from ..evaluate import EvaluationOptions, evaluate_checkpoint, evaluate_own_model
    from ..evaluate.report import summary_table
    from ..utils.stats import with_interval

    torch.set_flush_denormal(True)
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        name = f"{ckpt.parent.parent.name or ckpt.stem}-{ckpt.stem}"
    else:
        name = args.model.rpartition(":")[2] or "model"
    out = Path(args.out) if args.out else Path("runs") / "eval" / f"{name}-{args.suite}"
    try:
        if args.weights and not args.model:
            raise ConfigError("--weights goes with --model (a checkpoint carries its own weights)")
        options = EvaluationOptions(
            suite=args.suite, n_examples=args.n_examples, dev_examples=args.dev_examples,
            sanity_examples=args.sanity_examples, seed=args.seed, batch_size=args.batch_size,
            defenses=names(args.defenses), sources=names(args.sources), exhaustive=args.exhaustive, top_k=args.top_k,
            paper_columns=args.paper_columns, headline=args.headline,
            out_dir=out, resume=not args.fresh, progress=not args.no_progress)
        if args.checkpoint:
            result = evaluate_checkpoint(ckpt, options, dataset=args.dataset, data_root=args.data_root,
                                         data_path=args.data_path, eps=args.eps, norm=args.norm, device=args.device,
                                         estimate_only=args.estimate)
        else:
            result = evaluate_own_model(args.model, options, weights=args.weights, dataset=args.dataset,
                                        data_root=args.data_root, data_path=args.data_path, eps=args.eps,
                                        norm=args.norm or "Linf", device=args.device, estimate_only=args.estimate)
    except (CheckpointError, ConfigError, DatasetError, DEQInputError) as exc:
        print(f"deqrobust evaluate: error: {exc}", file=sys.stderr)
        shutdown()
        return 2
    main = is_main_process()
    shutdown()
    if args.estimate:
        if main:
            from ..evaluate import CostEstimate

            print(CostEstimate.render(result.to_dict()))
        return 0
    if main:
        print(summary_table(result))
        failed = "" if result.best_defense_checks_passed else "  [its sanity checks FAILED: see the report]"
        print(f"\nheadline defense: {result.headline()}; undefended model clean "
              f"{with_interval(result.undefended_clean_acc, result.n_examples)}%; {result.threat_model} "
              f"eps={result.eps:.4g}{failed}")
        for note in result.notes:
            print(f"note: {note}")
        print(f"report: {out / 'report.md'}  results: {out / 'results.json'}  plots: {out}/*.png")
    return 0
