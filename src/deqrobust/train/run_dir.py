"""The run folder: its files, their atomic writes, and the checks before a run starts or resumes.

::

    <out>/config.toml                  resolved config (seed included)
    <out>/metrics.jsonl                one JSON line per epoch
    <out>/checkpoints/last.safetensors resumable: weights, optimizer, RNG, data position, counters
    <out>/checkpoints/best.safetensors weights of the best dev PGD accuracy so far
    <out>/summary.json                 written when training finishes

Only rank 0 writes. A resumed run must have the same config except the entries in
:data:`RESUME_FREE` and a larger ``run.epochs`` (a finished run can be trained longer).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import Tensor, nn

from ..checkpoint import Checkpoint, load_checkpoint, model_spec, read_metadata, save_checkpoint
from ..data import DatasetInfo
from ..distributed import DistInfo, barrier
from ..errors import CheckpointError, ConfigError
from ..utils.io import atomic_write_json, atomic_write_text
from .config import TrainConfig, config_from_dict, config_to_dict, config_to_toml
from .state import decode, encode

__all__ = ["RESUME_FREE", "RUN_FILES", "Resumption", "RunDir", "checkpoint_metadata", "config_diff", "plan_resume",
           "prepare_out_dir"]

RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "checkpoints")
# Config entries that may differ between a run and its resumption (they do not change the result).
RESUME_FREE = {("run", "device"), ("run", "checkpoint_every_iters"), ("run", "nan_policy"), ("run", "nan_max_skips"),
               ("run", "nan_max_retries"), ("run", "threads")}  # fmt: skip


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder and rank 0's atomic writes to them."""

    out: Path

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.safetensors"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    def start(self, config: TrainConfig, history: list[dict[str, Any]], fresh: bool) -> None:
        """Write the config and the metrics of the epochs already done (from the checkpoint, so a
        crash between a metrics line and its checkpoint never leaves a duplicate or missing line)."""
        if fresh:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.toml", config_to_toml(config))
        self.rewrite_metrics(history)

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in history))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def save_best(self, model: nn.Module, metadata: dict[str, Any]) -> None:
        save_checkpoint(self.best, model, metadata)

    def save_last(self, model: nn.Module, metadata: dict[str, Any], training_state: dict[str, Any],
                  optimizer: dict[str, Any], rng_states: list[Any]) -> None:
        """The resumable checkpoint: ``training_state`` (counters, loader position, …) plus the
        optimizer state and every rank's RNG states, their tensors stored beside the weights."""
        extra: dict[str, Tensor] = {}
        state = dict(training_state, optimizer=encode(optimizer, "optim", extra), rng=encode(rng_states, "rng", extra))
        save_checkpoint(self.last, model, dict(metadata, training_state=state), extra=extra)

    def load_last(self, world_size: int) -> tuple[Checkpoint, dict[str, Any], dict[str, Any], list[Any]]:
        """(checkpoint, training state, optimizer state, RNG states of every rank) of ``last``."""
        ckpt = load_checkpoint(self.last, map_location="cpu")
        state = ckpt.metadata.get("training_state")
        if state is None:
            raise CheckpointError(f"{self.last} is not a resumable checkpoint (no training state)")
        if state["world_size"] != world_size:
            raise CheckpointError(
                f"{self.last} was written by a run on {state['world_size']} process(es); resume it on the same "
                f"number (this run has {world_size})"
            )
        return ckpt, state, decode(state["optimizer"], ckpt.extra), decode(state["rng"], ckpt.extra)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.out / "summary.json", summary)

    def last_position(self) -> str:
        """"epoch E, iteration I" of the last good checkpoint (for error messages)."""
        last = read_metadata(self.last) if self.last.is_file() else {}
        return f"epoch {last.get('epoch', '?')}, iteration {last.get('iteration', '?')}"


def checkpoint_metadata(kind: str, config: TrainConfig, info: DatasetInfo, model_kwargs: dict[str, Any], *,
                        num_train: int, num_dev: int, dev_used: int, history: list[dict[str, Any]], iteration: int,
                        best: dict[str, Any]) -> dict[str, Any]:
    """What every checkpoint of a run records: how to rebuild the model, the data, the threat model,
    the config, and where training stood."""
    cfg = config
    return {
        "kind": kind,
        "model": model_spec(cfg.model.name, info.num_classes, info.in_channels, model_kwargs),
        "dataset": {"name": cfg.data.dataset, "dev_size": cfg.data.dev_size, "dev_seed": cfg.data.dev_seed,
                    "train_subset": cfg.data.train_subset, "num_train": num_train, "num_dev": num_dev,
                    "dev_examples_used": dev_used},
        "threat_model": {"norm": cfg.attack.norm, "eps": cfg.attack.eps},
        "config": config_to_dict(cfg),
        "config_name": cfg.name,
        "epoch": len(history),
        "iteration": iteration,
        "best": dict(best),
        "metrics": history[-1] if history else None,
    }


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The config entries that differ between a run (``a``) and its resumption (``b``), outside :data:`RESUME_FREE`.

    Example:
        >>> config_diff({"run": {"seed": 0, "device": "cpu"}}, {"run": {"seed": 1, "device": "cuda"}})
        ['run.seed: run has 0, given 1']
    """
    diffs = []
    for section in sorted(set(a) | set(b)):
        va, vb = a.get(section), b.get(section)
        if isinstance(va, dict) and isinstance(vb, dict):
            for key in sorted(set(va) | set(vb)):
                if (section, key) not in RESUME_FREE and va.get(key) != vb.get(key):
                    diffs.append(f"{section}.{key}: run has {va.get(key)!r}, given {vb.get(key)!r}")
        elif va != vb and section not in ("name", "description"):
            diffs.append(f"{section}: run has {va!r}, given {vb!r}")
    return diffs


@dataclass(frozen=True)
class Resumption:
    """What resuming a run folder means: the run's seed, and the message saying from where."""

    seed: int
    message: str


def plan_resume(out: Path, config: TrainConfig, seed: Optional[int]) -> Resumption:
    """Check that ``out`` holds a resumable run that ``config`` may continue (same config, epochs
    extended or kept) and say from where it resumes. Raises CheckpointError or ConfigError."""
    last = RunDir(out).last
    if not last.is_file():
        raise CheckpointError(f"cannot resume: {last} does not exist")
    meta = read_metadata(last)
    run_seed = int(meta["config"]["run"]["seed"]) if seed is None else seed
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, seed=run_seed)).validate()
    saved = config_from_dict({k: v for k, v in meta["config"].items() if v is not None})
    state = meta.get("training_state") or {}
    done = int(state.get("epoch", 0)) + (1 if state.get("epoch_done") else 0)
    if config.run.epochs < saved.run.epochs:
        raise ConfigError(f"cannot resume {out} with run.epochs={config.run.epochs}: the run has "
                          f"run.epochs={saved.run.epochs}; a run can be extended, not shortened")
    same_length = dataclasses.replace(saved, run=dataclasses.replace(saved.run, epochs=config.run.epochs))
    diffs = config_diff(config_to_dict(same_length), config_to_dict(config))
    if diffs:
        raise ConfigError(f"cannot resume {out} with a different config: " + "; ".join(diffs))
    iteration = state.get("global_iter", 0)
    if config.run.epochs > saved.run.epochs:
        message = (f"extending {out} from {saved.run.epochs} to {config.run.epochs} epochs, resuming from epoch "
                   f"{done + 1}, iteration {iteration}: the cosine schedule is recomputed over the new total, so the "
                   "learning rate from here on follows the longer schedule (it jumps up, then decays to zero at the "
                   "new last epoch)")
    elif done >= saved.run.epochs:
        message = (f"{out} is already complete ({done} of {saved.run.epochs} epochs); nothing to train. To train it "
                   f"longer: --resume --set run.epochs=N (N > {saved.run.epochs})")
    else:
        message = f"resuming {out} from epoch {done + 1} (of {saved.run.epochs}), iteration {iteration}"
    return Resumption(run_seed, message)


def prepare_out_dir(out: Path, resume: bool, overwrite: bool, dist: DistInfo) -> None:
    """Refuse to train over an existing run unless ``overwrite`` (then delete its files); a
    resumption (checked by :func:`plan_resume`) keeps everything."""
    if resume:
        return
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, --overwrite to "
            "replace it, or choose another --out"
        )
    barrier()
    if existing and dist.is_main:
        for name in existing:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    barrier()
