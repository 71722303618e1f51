"""``deqrobust reproduce``: the paper's tables and figure, ours beside theirs.

Examples::

    deqrobust reproduce table2 --device cuda                 # GPU: CIFAR-10, the paper's configs
    torchrun --nproc_per_node=8 -m deqrobust reproduce table3 --device cuda
    deqrobust reproduce table2 --scale tiny                  # CPU: the same pipeline on digits
    deqrobust reproduce table1 --scale small                 # CPU: the fixed-point study's setting (table1, fig2)
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..reproduce import SCALES, TARGETS

    from ..reproduce.experiments import EXPERIMENTS

    targets = "\n".join(f"  {name:7s} {exp.title}; trains {', '.join(r.config for r in exp.runs)}; suite {exp.suite}"
                         for name, exp in EXPERIMENTS.items())
    parser = subparsers.add_parser(
        "reproduce",
        help="reproduce a table/figure of the paper (ours beside the paper's numbers)",
        description="Runs the trainings and evaluations a paper table needs (resumable; works under torchrun) "
        "and prints our numbers beside the paper's. Paper scale needs GPUs; --scale tiny runs the same "
        "pipeline on the offline default dataset (digits configs); --scale small (table1 and fig2) trains the "
        "fixed-point study's 4/3-step setting instead (the largest gap with a residual above 0.2; "
        "docs/fixed-point-study.md)."
        "\n\ntargets (at --scale paper):\n" + targets,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--scale", default="paper", choices=SCALES)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda ...")
    parser.add_argument("--out", default="runs/reproduce", help="folder for all runs and reports")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-examples", type=int, default=None,
                        help="test examples per evaluation (default: all); also bounds the dev selections unless "
                        "--dev-examples is given")
    parser.add_argument("--dev-examples", type=int, default=None,
                        help="dev examples for the early-exit and candidate selections (default: the suite's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="training config override applied to every run (e.g. run.epochs=2)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from ..distributed import is_main_process, shutdown
    from ..errors import CheckpointError, ConfigError, DatasetError, DivergenceError
    from ..reproduce import reproduce

    torch.set_flush_denormal(True)
    try:
        result = reproduce(args.target, scale=args.scale, out_dir=args.out, device=args.device, seed=args.seed,
                           n_examples=args.n_examples, train_overrides=args.overrides,
                           dev_examples=args.dev_examples, progress=not args.no_progress)
    except (ConfigError, CheckpointError, DatasetError, DivergenceError) as exc:
        print(f"deqrobust reproduce: {exc}", file=sys.stderr)
        shutdown()
        return 2
    main = is_main_process()
    shutdown()
    if main:
        print(result.markdown)
        print(f"\nreport: {result.report}")
    return 0
