"""The training loop: clean unrolled pretraining, then PGD-AT or TRADES, with per-epoch dev selection.

:func:`train` is the entry point (the ``deqrobust train`` command calls it). One :class:`Trainer`
owns a run directory::

    <out>/config.toml                  resolved config (seed included)
    <out>/metrics.jsonl                one JSON line per epoch
    <out>/checkpoints/last.safetensors resumable: weights, optimizer, RNG, data position, counters
    <out>/checkpoints/best.safetensors weights of the best dev PGD accuracy so far
    <out>/summary.json                 written when training finishes

The trainer only ever receives the train and dev splits (:class:`TrainingData`); the test split is
dropped when the data is loaded. Everything random is seeded from the run seed; a run resumed from
``last`` continues bit for bit (CPU). Under ``torchrun`` the model is wrapped in
DistributedDataParallel, data is sharded, attacks are crafted through the unwrapped module, and only
rank 0 writes files. Imports :mod:`deqrobust.checkpoint`, :mod:`deqrobust.data`,
:mod:`deqrobust.distributed`, :mod:`deqrobust.models`, :mod:`deqrobust.attacks` and this package.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ..attacks.base import ThreatModel
from ..checkpoint import load_checkpoint, model_spec, read_metadata, save_checkpoint
from ..data import BatchLoader, DatasetInfo, Split, load_dataset
from ..distributed import DistInfo, all_gather_object, all_reduce_sum, barrier, init_distributed, is_main_process
from ..errors import CheckpointError, ConfigError, DivergenceError
from ..models import build_model, is_deq
from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.seeding import derive_seed, seed_everything
from ..utils.stats import at_chance
from .config import TrainConfig, config_from_dict, config_to_dict, config_to_toml
from .evaluation import DevResult, evaluate_dev
from .objectives import pgd_at_loss, pgd_craft, trades_craft, trades_loss
from .state import capture_rng, decode, encode, restore_rng

__all__ = ["RUN_FILES", "TrainResult", "Trainer", "TrainingData", "load_training_data", "train"]

PathLike = Union[str, Path]
RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "checkpoints")
# Config entries that may differ between a run and its resumption (they do not change the result).
RESUME_FREE = {("run", "device"), ("run", "checkpoint_every_iters"), ("run", "nan_policy"), ("run", "nan_max_skips"),
               ("run", "nan_max_retries"), ("run", "threads")}  # fmt: skip


@dataclass(frozen=True)
class TrainingData:
    """What training may see: the train and dev splits and the dataset's metadata (never the test split)."""

    train: Split
    dev: Split
    info: DatasetInfo


def load_training_data(config: TrainConfig) -> TrainingData:
    """Load ``config.data``'s dataset and keep only train (optionally a fixed subset) and dev.

    Example:
        >>> from deqrobust.train import load_config
        >>> data = load_training_data(load_config("digits-tiny-unroll"))
        >>> len(data.dev), hasattr(data, "test")
        (200, False)
    """
    cfg = config.data
    splits = load_dataset(
        cfg.dataset, root=cfg.root, download=cfg.download, dev_size=cfg.dev_size, dev_seed=cfg.dev_seed
    )
    train, dev, info = splits.train, splits.dev, splits.info
    del splits
    if cfg.train_subset is not None and cfg.train_subset < len(train):
        gen = torch.Generator().manual_seed(derive_seed(cfg.dev_seed, "train-subset"))
        train = train.subset(torch.randperm(len(train), generator=gen)[: cfg.train_subset].sort().values)
    return TrainingData(train, dev, info)


@dataclass
class TrainResult:
    """Outcome of :func:`train` (dev accuracies are those of the best checkpoint)."""

    out_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_dev_clean_acc: float
    best_dev_robust_acc: float
    epochs: int
    iterations: int
    wall_time: float
    skipped_batches: int = 0
    lr_retries: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    best_at_chance: bool = False


class _NonFinite(Exception):
    """A non-finite loss or gradient, on any rank."""


class TrainForward(nn.Module):
    """The module DDP wraps: one call runs every model pass of a training step (so DDP sees exactly
    one forward per backward). ``mode`` ``"unroll"`` is the clean weight-tied unroll of pretraining.
    Returns ``{"logits": [...], "jac": Tensor, "nstep": Tensor, "rel": Tensor}`` (mean solver steps
    and final relative residual of pass ``stats_index``; NaN for other models)."""

    def __init__(self, model: nn.Module, unroll_layers: int = 8) -> None:
        super().__init__()
        self.model = model
        self.unroll_layers = unroll_layers

    def forward(
        self,
        inputs: list[Tensor],
        mode: str = "deq",
        jac_index: int = -1,
        max_iter: Optional[int] = None,
        stats_index: int = 0,
    ) -> dict[str, Any]:
        nan = torch.tensor(float("nan"))
        out: dict[str, Any] = {"logits": [], "jac": torch.zeros(()), "nstep": nan, "rel": nan}
        for i, x in enumerate(inputs):
            if mode == "unroll":
                out["logits"].append(self.model.unrolled_forward(x, self.unroll_layers))
            elif is_deq(self.model):
                res = self.model.forward_with_info(x, jac_loss=i == jac_index, max_iter=max_iter)
                out["logits"].append(res.logits)
                if res.jac_loss is not None:
                    out["jac"] = res.jac_loss
                if i == stats_index:
                    out["nstep"] = res.info.nstep.float().mean().detach().cpu()
                    out["rel"] = torch.nan_to_num(res.info.rel_final.float(), nan=float("inf")).mean().detach().cpu()
            else:
                out["logits"].append(self.model(x))
        return out


def _lr_at(config: TrainConfig, iteration: int, total: int) -> float:
    opt = config.optim
    if opt.schedule == "constant":
        return opt.lr
    progress = min(iteration, total) / max(total, 1)
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1.0 + math.cos(math.pi * progress))


def _amp_dtype(setting: str, device: torch.device) -> Optional[torch.dtype]:
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _model_kwargs(config: TrainConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    m = config.model
    for key in ("dropout", "mean", "std"):
        if getattr(m, key) is not None:
            kwargs[key] = getattr(m, key)
    if config.deq is not None:
        kwargs.update(config_to_dict(config)["deq"])
    return kwargs


def budget_warnings(config: TrainConfig, iters_per_epoch: int, deq: bool) -> list[str]:
    """What a run's budget will not do: no (or no full) adversarial epoch after the clean pretraining."""
    pretrain = config.pretrain.iterations if deq else 0
    total = config.run.epochs * iters_per_epoch
    if pretrain <= 0 or config.run.epochs < 1:
        return []
    first_adversarial_epoch = -(-pretrain // iters_per_epoch) + 1  # the first epoch that starts after pretraining
    if total <= pretrain:
        return [f"run.epochs={config.run.epochs} ({total} iterations) does not go past the {pretrain} iterations of "
                f"clean pretraining: no adversarial training happens and the model will not be robust; use "
                f"run.epochs >= {first_adversarial_epoch}"]
    if config.run.epochs < first_adversarial_epoch:
        return [f"run.epochs={config.run.epochs} gives only {total - pretrain} adversarial iterations after the "
                f"{pretrain} of clean pretraining (no full adversarial epoch); use run.epochs >= {first_adversarial_epoch}"]
    return []


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
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


class Trainer:
    """One training run in ``out_dir`` (see the module docstring). Use :func:`train` unless you need
    the pieces; ``data`` must hold only the train and dev splits."""

    def __init__(
        self,
        config: TrainConfig,
        data: TrainingData,
        out_dir: PathLike,
        *,
        dist: DistInfo,
        progress: bool = True,
        log: Optional[bool] = None,
    ) -> None:
        if not isinstance(data, TrainingData):
            raise TypeError("Trainer takes a TrainingData (train and dev splits only), not the full dataset splits")
        self.config, self.data, self.dist, self.progress = config, data, dist, progress
        self.log = progress if log is None else log
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.last_path = self.ckpt_dir / "last.safetensors"
        self.best_path = self.ckpt_dir / "best.safetensors"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.seed = config.run.seed
        self.device = dist.device
        self.amp_dtype = _amp_dtype(config.run.amp, self.device)
        info = data.info
        self.threat = ThreatModel(config.attack.norm, config.attack.eps)

        seed_everything(self.seed)
        self.model_kwargs = _model_kwargs(config)
        self.model = build_model(config.model.name, info.num_classes, info.in_channels, **self.model_kwargs).to(
            self.device
        )
        self.is_deq = is_deq(self.model)
        self.optimizer = self._make_optimizer()
        self.forward_module: nn.Module = TrainForward(self.model, config.pretrain.layers)
        if dist.is_distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_module = DistributedDataParallel(self.forward_module, device_ids=ids)
        augment = info.augmentation if config.data.augment else None
        self.loader = BatchLoader(
            data.train, config.run.batch_size, shuffle=True, augment=augment, seed=derive_seed(self.seed, "data"),
            drop_last=True, rank=dist.rank, world_size=dist.world_size, device=self.device,
        )  # fmt: skip
        self.iters_per_epoch = len(self.loader)
        if self.iters_per_epoch == 0:
            raise ConfigError(
                f"the training split ({len(data.train)} examples over {dist.world_size} rank(s)) is smaller than "
                f"one batch of {config.run.batch_size}; lower run.batch_size"
            )
        self.total_iters = config.run.epochs * self.iters_per_epoch
        self.warnings = budget_warnings(config, self.iters_per_epoch, self.is_deq)
        for message in self.warnings:
            if dist.is_main and self.log:
                print(f"warning: {message}", file=sys.stderr, flush=True)
        n_dev = len(data.dev) if config.eval.dev_examples is None else min(config.eval.dev_examples, len(data.dev))
        self.dev = data.dev.subset(torch.arange(n_dev), "dev")
        # Training-stream randomness differs per rank (the model was initialised identically above).
        seed_everything(derive_seed(self.seed, "train", dist.rank))
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _make_optimizer(self) -> torch.optim.Optimizer:
        opt = self.config.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        if opt.name == "adam":
            return torch.optim.Adam(params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
        return torch.optim.SGD(
            params, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay
        )

    def _reset_state(self) -> None:
        self.epoch = 0  # index of the epoch in progress (or next)
        self.global_iter = 0
        self.best: dict[str, Any] = {"epoch": 0, "dev_clean_acc": -1.0, "dev_robust_acc": -1.0, "eligible": False}
        self.history: list[dict[str, Any]] = []
        self.acc = self._new_accumulators()
        self.lr_scale = 1.0
        self.lr_retries = 0
        self.skipped_total = 0
        self.elapsed_before = 0.0
        self.session_start = time.perf_counter()
        self.last_lr = _lr_at(self.config, 0, self.total_iters)

    @staticmethod
    def _new_accumulators() -> dict[str, float]:
        return {"loss": 0.0, "correct": 0.0, "seen": 0.0, "batches": 0.0, "nstep": 0.0, "rel": 0.0, "deq_batches": 0.0,
                "skipped": 0.0, "time": 0.0}  # fmt: skip

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.session_start

    def _metadata(self, kind: str) -> dict[str, Any]:
        cfg = self.config
        return {
            "kind": kind,
            "model": model_spec(
                cfg.model.name, self.data.info.num_classes, self.data.info.in_channels, self.model_kwargs
            ),
            "dataset": {
                "name": cfg.data.dataset,
                "dev_size": cfg.data.dev_size,
                "dev_seed": cfg.data.dev_seed,
                "train_subset": cfg.data.train_subset,
                "num_train": len(self.data.train),
                "num_dev": len(self.data.dev),
                "dev_examples_used": len(self.dev),
            },  # fmt: skip
            "threat_model": {"norm": cfg.attack.norm, "eps": cfg.attack.eps},
            "config": config_to_dict(cfg),
            "config_name": cfg.name,
            "epoch": len(self.history),
            "iteration": self.global_iter,
            "best": dict(self.best),
            "metrics": self.history[-1] if self.history else None,
        }

    def _save(self, kind: str, epoch_done: bool) -> None:
        """Write ``last`` (resumable) or ``best`` from rank 0; every rank takes part (RNG gathering)."""
        if kind == "last":
            rng_states = all_gather_object(capture_rng())
        if self.dist.is_main:
            meta = self._metadata(kind)
            extra: dict[str, Tensor] = {}
            if kind == "last":
                meta["history"] = self.history
                meta["training_state"] = {
                    "epoch": self.epoch,
                    "epoch_done": epoch_done,
                    "global_iter": self.global_iter,
                    "seed": self.seed,
                    "world_size": self.dist.world_size,
                    "loader": self.loader.state_dict(),
                    "accumulators": dict(self.acc),
                    "lr_scale": self.lr_scale,
                    "lr_retries": self.lr_retries,
                    "skipped_total": self.skipped_total,
                    "elapsed": self.elapsed,
                    "best": dict(self.best),
                    "optimizer": encode(self.optimizer.state_dict(), "optim", extra),
                    "rng": encode(rng_states, "rng", extra),
                }
            save_checkpoint(self.last_path if kind == "last" else self.best_path, self.model, meta, extra=extra)
        barrier()

    def _restore(self, path: Path) -> None:
        """Load model, optimizer, counters, RNG and data position from a ``last`` checkpoint."""
        ckpt = load_checkpoint(path, map_location="cpu")
        state = ckpt.metadata.get("training_state")
        if state is None:
            raise CheckpointError(f"{path} is not a resumable checkpoint (no training state)")
        self.model.load_state_dict(ckpt.state_dict)
        self.optimizer.load_state_dict(decode(state["optimizer"], ckpt.extra))
        loader_state = dict(state["loader"], rank=self.dist.rank)
        if state["world_size"] != self.dist.world_size:
            raise CheckpointError(
                f"{path} was written by a run on {state['world_size']} process(es); resume it on the same number "
                f"(this run has {self.dist.world_size})"
            )
        self.loader.load_state_dict(loader_state)
        self.epoch = int(state["epoch"]) + (1 if state["epoch_done"] else 0)
        if state["epoch_done"]:
            self.loader.set_epoch(self.epoch)
        self.global_iter = int(state["global_iter"])
        self.acc = self._new_accumulators() if state["epoch_done"] else dict(state["accumulators"])
        self.lr_scale = float(state["lr_scale"])
        self.lr_retries = int(state["lr_retries"])
        self.skipped_total = int(state["skipped_total"])
        self.elapsed_before = float(state["elapsed"])
        self.session_start = time.perf_counter()
        self.best = dict(state["best"])
        self.history = list(ckpt.metadata.get("history") or [])
        rng = decode(state["rng"], ckpt.extra)
        restore_rng(rng[self.dist.rank])

    # ------------------------------------------------------------------ one iteration
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _jacobian_active(self) -> bool:
        jac = self.config.jacobian
        return self.is_deq and jac.weight > 0 and (jac.stop_epoch is None or self.epoch < jac.stop_epoch)

    def _step(self, x: Tensor, y: Tensor) -> None:
        cfg = self.config
        lr = _lr_at(cfg, self.global_iter, self.total_iters) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        pretrain = self.is_deq and self.global_iter < cfg.pretrain.iterations
        decide = random.Random(derive_seed(self.seed, "step", self.global_iter))  # same on every rank
        jac_phase = not pretrain and self._jacobian_active()
        use_jac = jac_phase and decide.random() < cfg.jacobian.prob
        max_iter = None
        if jac_phase and cfg.jacobian.f_thres_delta and cfg.deq is not None:
            delta = cfg.jacobian.f_thres_delta
            max_iter = max(1, cfg.deq.f_max_iter + decide.randint(-delta, delta))
        alpha = cfg.attack.step_size

        with self._autocast():
            if pretrain:
                inputs, mode, jac_index = [x], "unroll", -1
            elif cfg.attack.objective == "pgd-at":
                x_adv, _ = pgd_craft(self.model, x, y, self.threat, alpha, cfg.attack.steps,
                                     start=None if cfg.attack.random_start else x)  # fmt: skip
                inputs = [x_adv, x] if cfg.attack.clean_weight > 0 else [x_adv]
                mode, jac_index = "deq", 0 if use_jac else -1
            else:
                x_adv = trades_craft(self.model, x, self.threat, alpha, cfg.attack.steps, cfg.attack.trades_init_std)
                inputs, mode, jac_index = [x, x_adv], "deq", 1 if use_jac else -1
            self.forward_module.train()
            stats_index = 1 if (not pretrain and cfg.attack.objective == "trades") else 0
            out = self.forward_module(
                inputs, mode=mode, jac_index=jac_index, max_iter=max_iter, stats_index=stats_index
            )
            logits = out["logits"]
            if pretrain:
                loss = pgd_at_loss(logits[0], y)
                train_logits = logits[0]
            elif cfg.attack.objective == "pgd-at":
                loss = pgd_at_loss(logits[0], y, logits[1] if len(logits) > 1 else None, cfg.attack.clean_weight)
                train_logits = logits[0]
            else:
                loss = trades_loss(logits[0], logits[1], y, cfg.attack.trades_beta)
                train_logits = logits[1]
            if use_jac:
                loss = loss + cfg.jacobian.weight * out["jac"].float()

        bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach())) else 1.0])
        if float(all_reduce_sum(bad)) > 0:
            raise _NonFinite("loss")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack([g.detach().float().abs().sum() for g in grads]).sum())):
            self.optimizer.zero_grad(set_to_none=True)
            raise _NonFinite("gradient")
        if cfg.optim.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()

        with torch.no_grad():
            n = float(len(y))
            self.acc["loss"] += float(loss.detach()) * n
            self.acc["correct"] += float((train_logits.detach().argmax(dim=1) == y).sum())
            self.acc["seen"] += n
            self.acc["batches"] += 1
            if not pretrain and self.is_deq and math.isfinite(float(out["nstep"])):
                self.acc["nstep"] += float(out["nstep"])
                self.acc["rel"] += float(out["rel"])
                self.acc["deq_batches"] += 1
        self.global_iter += 1
        self.last_lr = lr

    # ------------------------------------------------------------------ epochs
    def _evaluate(self) -> DevResult:
        cfg = self.config
        return evaluate_dev(
            self.model, self.dev, self.threat,
            alpha=cfg.eval.pgd_alpha if cfg.eval.pgd_alpha is not None else cfg.attack.step_size,
            steps=cfg.eval.pgd_steps, batch_size=cfg.eval.batch_size or cfg.run.batch_size, seed=cfg.eval.seed,
            device=self.device, rank=self.dist.rank, world_size=self.dist.world_size, amp_dtype=self.amp_dtype,
        )  # fmt: skip

    def _end_epoch(self, bar: Any) -> None:
        cfg = self.config
        keys = ("loss", "correct", "seen", "skipped", "nstep", "rel", "deq_batches")
        totals = torch.tensor([self.acc[k] for k in keys], dtype=torch.float64)
        all_reduce_sum(totals)  # exact global values over all ranks
        ws = self.dist.world_size
        epoch_no = self.epoch + 1
        evaluate = epoch_no % cfg.eval.every_epochs == 0 or epoch_no == cfg.run.epochs
        result = self._evaluate() if evaluate else None
        pretrain_end = cfg.pretrain.iterations if self.is_deq else 0
        start_iter = self.global_iter - self.iters_per_epoch
        phase = (
            "pretrain"
            if self.global_iter <= pretrain_end
            else ("adversarial" if start_iter >= pretrain_end else "mixed")
        )
        deq_batches = float(totals[6])
        record: dict[str, Any] = {
            "epoch": epoch_no,
            "iteration": self.global_iter,
            "phase": phase,
            "objective": cfg.attack.objective,
            "lr": _lr_at(cfg, self.global_iter - 1, self.total_iters) * self.lr_scale,
            "train_loss": float(totals[0] / totals[2]) if totals[2] else None,
            "train_acc": float(totals[1] / totals[2]) if totals[2] else None,
            "dev_clean_acc": result.clean_acc if result else None,
            "dev_robust_acc": result.robust_acc if result else None,
            "dev_examples": result.total if result else None,
            "solver_steps": float(totals[4]) / deq_batches if deq_batches else None,
            "solver_rel_residual": float(totals[5]) / deq_batches if deq_batches else None,
            "skipped_batches": int(totals[3]) // ws if ws > 1 else int(totals[3]),
            "jacobian_active": self._jacobian_active(),
            "epoch_time": self.acc["time"],
            "wall_time": self.elapsed,
            "best": False,
        }
        # A pretraining epoch, or one at chance, is the best only while no other epoch was evaluated.
        eligible = result is not None and phase != "pretrain" and not at_chance(
            result.clean_acc, result.total, self.data.info.num_classes)
        improved = result is not None and (eligible, result.robust_acc, result.clean_acc) > (
            self.best.get("eligible", True),
            self.best["dev_robust_acc"],
            self.best["dev_clean_acc"],
        )
        if improved:
            assert result is not None
            self.best = {"epoch": epoch_no, "dev_clean_acc": result.clean_acc, "dev_robust_acc": result.robust_acc,
                         "eligible": eligible}
            record["best"] = True
        self.history.append(record)
        if self.dist.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.log:
                dev = (
                    f"dev clean {result.clean_acc:.3f}, dev PGD-{cfg.eval.pgd_steps} {result.robust_acc:.3f}"
                    f"{' (best)' if improved else ''}, "
                    if result is not None
                    else ""
                )
                loss = record["train_loss"]
                loss_text = "n/a" if loss is None else f"{loss:.4f}"
                message = f"epoch {epoch_no}/{cfg.run.epochs} ({phase}): {dev}train loss {loss_text}"
                if bar is not None:
                    bar.write(message, file=sys.stderr)
                else:
                    print(message, file=sys.stderr, flush=True)
        if improved:
            self._save("best", epoch_done=True)
        self._save("last", epoch_done=True)

    def _progress_bar(self) -> Any:
        if not (self.progress and self.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.total_iters, initial=self.global_iter, desc=self.config.name, unit="it", dynamic_ncols=True,
            file=sys.stderr, smoothing=0.1,
        )  # fmt: skip

    def _run_epochs(self, bar: Any) -> None:
        """Train from the current position to the last epoch."""
        cfg = self.config
        every = cfg.run.checkpoint_every_iters
        while self.epoch < cfg.run.epochs:
            self.loader.set_epoch(self.epoch)
            start = time.perf_counter()
            for x, y in self.loader:
                try:
                    self._step(x, y)
                except _NonFinite as exc:
                    self._handle_nonfinite(str(exc))
                    self.acc["skipped"] += 1
                    self.skipped_total += 1
                    self.global_iter += 1
                self.acc["time"] += time.perf_counter() - start
                start = time.perf_counter()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=self.epoch + 1, loss=f"{self.acc['loss'] / max(self.acc['seen'], 1):.3f}",
                                    lr=f"{self.last_lr:.2e}", refresh=False)  # fmt: skip
                if every and self.global_iter % every == 0 and self.loader.state_dict()["batch"] < self.iters_per_epoch:
                    self._save("last", epoch_done=False)
            self._end_epoch(bar)
            self.epoch += 1
            self.acc = self._new_accumulators()

    def _handle_nonfinite(self, what: str) -> None:
        """Apply ``run.nan_policy`` to a non-finite loss/gradient (returns only for a skip)."""
        run = self.config.run
        where = f"epoch {self.epoch + 1}, iteration {self.global_iter + 1} (batch {self.loader.state_dict()['batch']})"
        if run.nan_policy == "skip" and self.skipped_total < run.nan_max_skips:
            if self.dist.is_main:
                print(f"warning: non-finite {what} at {where}; batch skipped", file=sys.stderr)
            return
        if run.nan_policy == "lower_lr" and self.lr_retries < run.nan_max_retries:
            raise _Rollback(what, where)
        last = read_metadata(self.last_path) if self.last_path.is_file() else {}
        hint = {
            "stop": 'lower optim.lr, add Jacobian regularisation, or set run.nan_policy = "skip" / "lower_lr"',
            "skip": f"more than run.nan_max_skips = {run.nan_max_skips} batches were skipped",
            "lower_lr": f"the learning rate was already halved run.nan_max_retries = {run.nan_max_retries} times",
        }[run.nan_policy]
        raise DivergenceError(
            f"training diverged: non-finite {what} at {where}; stopped ({hint}). The last good checkpoint "
            f"{self.last_path} (epoch {last.get('epoch', '?')}, iteration {last.get('iteration', '?')}) is intact; "
            "continue from it with --resume"
        )

    # ------------------------------------------------------------------ the run
    def fit(self, resume: bool = False) -> TrainResult:
        """Train to the configured number of epochs (from ``last`` when ``resume``)."""
        if resume:
            self._restore(self.last_path)
        else:
            if self.dist.is_main:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.metrics_path, "")
            self._save("last", epoch_done=False)  # a good checkpoint exists from the start
        if self.dist.is_main:
            atomic_write_text(self.out_dir / "config.toml", config_to_toml(self.config))
            # Metrics of completed epochs come from the checkpoint, so a crash between writing a metrics
            # line and the checkpoint never leaves a duplicate or missing line.
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))
        barrier()
        bar = self._progress_bar()
        try:
            while True:
                try:
                    self._run_epochs(bar)
                    break
                except _Rollback as rollback:
                    retries, scale = self.lr_retries + 1, self.lr_scale * 0.5
                    self._restore(self.last_path)
                    self.lr_retries, self.lr_scale = retries, scale
                    if self.dist.is_main:
                        print(f"warning: non-finite {rollback.what} at {rollback.where}; back to the last checkpoint "
                              f"with the learning rate x{scale:g}", file=sys.stderr)  # fmt: skip
                        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))
                    if bar is not None:
                        bar.reset(total=self.total_iters)
                        bar.update(self.global_iter)
        finally:
            if bar is not None:
                bar.close()
        result = TrainResult(
            out_dir=self.out_dir, best_checkpoint=self.best_path, last_checkpoint=self.last_path,
            best_epoch=int(self.best["epoch"]), best_dev_clean_acc=float(self.best["dev_clean_acc"]),
            best_dev_robust_acc=float(self.best["dev_robust_acc"]), epochs=len(self.history),
            iterations=self.global_iter, wall_time=self.elapsed, skipped_batches=self.skipped_total,
            lr_retries=self.lr_retries, history=list(self.history), warnings=list(self.warnings),
            best_at_chance=self.best["epoch"] > 0 and at_chance(self.best["dev_clean_acc"], len(self.dev),
                                                                self.data.info.num_classes),
        )  # fmt: skip
        if self.dist.is_main:
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items() if k != "history"}
            atomic_write_json(self.out_dir / "summary.json", summary)
        barrier()
        return result


class _Rollback(Exception):
    def __init__(self, what: str, where: str) -> None:
        super().__init__(what)
        self.what, self.where = what, where


def _prepare_out_dir(out: Path, resume: bool, overwrite: bool, dist: DistInfo) -> None:
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        if not (out / "checkpoints" / "last.safetensors").is_file():
            raise CheckpointError(f"cannot resume: {out}/checkpoints/last.safetensors does not exist")
        return
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


@contextlib.contextmanager
def _threads(count: Optional[int]) -> Iterator[None]:
    """Use ``count`` torch intra-op threads for the block (``None``: unchanged)."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count is not None:
            torch.set_num_threads(before)


def train(
    config: TrainConfig,
    out_dir: PathLike,
    *,
    resume: bool = False,
    seed: Optional[int] = None,
    progress: bool = True,
    overwrite: bool = False,
    device: Optional[str] = None,
    log: Optional[bool] = None,
) -> TrainResult:
    """Train ``config`` into ``out_dir`` (see the module docstring for the files written).

    Args:
        config: a validated :class:`~deqrobust.train.config.TrainConfig` (``load_config(...)``).
        out_dir: the run directory; an existing run there is an error unless ``resume`` or ``overwrite``.
        resume: continue exactly from ``out_dir/checkpoints/last.safetensors``.
        seed: overrides ``config.run.seed`` (on resume, default: the run's seed).
        progress: show a tqdm progress bar (rank 0).
        overwrite: delete an existing run's files in ``out_dir`` first.
        device: overrides ``config.run.device``.
        log: print one line per epoch to stderr (rank 0; default: as ``progress``).

    Under ``torchrun`` every process calls this; the process group is set up from the environment.

    Raises:
        ConfigError, CheckpointError, FileExistsError, DivergenceError (non-finite loss under the
        ``stop`` policy; the last good checkpoint stays intact).

    Example:
        >>> import tempfile
        >>> from deqrobust.train import apply_overrides, load_config
        >>> config = apply_overrides(load_config("digits-tiny-unroll"), [
        ...     "run.epochs=1", "data.train_subset=64", "run.batch_size=32", "pretrain.iterations=1",
        ...     "attack.steps=1", "eval.pgd_steps=1", "eval.dev_examples=16"])
        >>> result = train(config, tempfile.mkdtemp(), progress=False)
        >>> result.epochs, result.iterations, result.best_checkpoint.name
        (1, 2, 'best.safetensors')
    """
    import dataclasses

    out = Path(out_dir)
    run = dataclasses.replace(config.run)
    if device is not None:
        run.device = device
    resume_meta: dict[str, Any] = {}
    if resume:
        last = out / "checkpoints" / "last.safetensors"
        if not last.is_file():
            raise CheckpointError(f"cannot resume: {last} does not exist")
        resume_meta = read_metadata(last)
        saved_seed = int(resume_meta["config"]["run"]["seed"])
        run.seed = saved_seed if seed is None else seed
    elif seed is not None:
        run.seed = seed
    config = dataclasses.replace(config, run=run).validate()
    if resume:
        saved = config_from_dict({k: v for k, v in resume_meta["config"].items() if v is not None})
        state = resume_meta.get("training_state") or {}
        done_epochs = int(state.get("epoch", 0)) + (1 if state.get("epoch_done") else 0)
        extend = config.run.epochs > saved.run.epochs
        if config.run.epochs < saved.run.epochs:
            raise ConfigError(f"cannot resume {out} with run.epochs={config.run.epochs}: the run has "
                              f"run.epochs={saved.run.epochs}; a run can be extended, not shortened")
        diffs = _config_diff(config_to_dict(dataclasses.replace(saved, run=dataclasses.replace(
            saved.run, epochs=config.run.epochs))), config_to_dict(config))
        if diffs:
            raise ConfigError(f"cannot resume {out} with a different config: " + "; ".join(diffs))
        if log and is_main_process():
            if extend:
                print(f"extending {out} from {saved.run.epochs} to {config.run.epochs} epochs, resuming from epoch "
                      f"{done_epochs + 1}, iteration {state.get('global_iter', 0)}: the cosine schedule is recomputed "
                      f"over the new total, so the learning rate from here on follows the longer schedule (it jumps "
                      "up, then decays to zero at the new last epoch)", file=sys.stderr, flush=True)
            elif done_epochs >= saved.run.epochs:
                print(f"{out} is already complete ({done_epochs} of {saved.run.epochs} epochs); nothing to train. To "
                      f"train it longer: --resume --set run.epochs=N (N > {saved.run.epochs})", file=sys.stderr,
                      flush=True)
            else:
                print(f"resuming {out} from epoch {done_epochs + 1} (of {saved.run.epochs}), iteration "
                      f"{state.get('global_iter', 0)}", file=sys.stderr, flush=True)
    dist = init_distributed(run.device)
    _prepare_out_dir(out, resume, overwrite, dist)
    data = load_training_data(config)
    with _threads(run.threads):
        trainer = Trainer(config, data, out, dist=dist, progress=progress, log=log)
        return trainer.fit(resume=resume)
