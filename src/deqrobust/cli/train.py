"""``deqrobust train``: robust training from a shipped config or a TOML file (see :mod:`deqrobust.train`).

Examples::

    deqrobust train --config digits-tiny-unroll
    deqrobust train --config digits-tiny-unroll --set optim.lr=5e-4 --seed 1 --out runs/lr5e-4
    deqrobust train --out runs/digits-tiny-unroll --resume          # config read from the run
    torchrun --nproc_per_node=4 -m deqrobust train --config cifar10-large-unroll-8-7

Imports :mod:`deqrobust.train` and :mod:`deqrobust.distributed`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..distributed import is_main_process, shutdown
from ..errors import CheckpointError, ConfigError, DatasetError, DivergenceError


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand."""
    from ..train import list_configs

    parser = subparsers.add_parser(
        "train",
        help="adversarially train a model (PGD-AT / TRADES)",
        description="Adversarially train a model from a config; works unchanged under torchrun.",
        epilog="shipped configs: " + ", ".join(list_configs()),
    )
    parser.add_argument("--config", "-c", help="shipped config name or path to a TOML file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=5e-4 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="run seed (default: the config's run.seed)")
    parser.add_argument("--out", "-o", default=None, help="run directory (default: runs/<config name>)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out exactly from its last checkpoint"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="override run.device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def _say(message: str, stream=sys.stdout) -> None:
    if is_main_process():
        print(message, file=stream, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run ``deqrobust train``; returns the exit status (0 ok, 1 training failed, 2 bad arguments)."""
    from ..train import apply_overrides, load_config, train

    try:
        if args.config is None:
            if not (args.resume and args.out):
                raise ConfigError("--config is required (it may be omitted only with --resume --out RUN_DIR)")
            config = load_config(Path(args.out) / "config.toml")
        else:
            config = load_config(args.config)
        config = apply_overrides(config, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / config.name
        _say(f"training {config.name} ({config.description or config.model.name}) -> {out}")
        result = train(
            config, out, resume=args.resume, seed=args.seed, progress=not args.no_progress,
            overwrite=args.overwrite, device=args.device, log=True,
        )  # fmt: skip
    except (ConfigError, FileExistsError) as exc:
        _say(f"error: {exc}", sys.stderr)
        shutdown()
        return 2
    except (CheckpointError, DivergenceError, DatasetError) as exc:
        _say(f"error: {exc}", sys.stderr)
        shutdown()
        return 1
    _say(f"checkpoints: {result.best_checkpoint} (best, epoch {result.best_epoch}), {result.last_checkpoint} (last)")
    _say(f"metrics: {result.out_dir / 'metrics.jsonl'}")
    _say(
        f"best dev accuracy: clean {result.best_dev_clean_acc:.4f}, robust (PGD) {result.best_dev_robust_acc:.4f}; "
        f"{result.epochs} epochs, {result.iterations} iterations in {result.wall_time:.1f} s"
    )
    for message in result.warnings:
        _say(f"warning: {message}", sys.stderr)
    if result.best_at_chance:
        _say(f"warning: the best checkpoint (epoch {result.best_epoch}) is at chance level (dev clean "
             f"{result.best_dev_clean_acc:.3f}): it has learnt nothing yet; train longer (--resume --set run.epochs=N)",
             sys.stderr)
    shutdown()
    return 0
