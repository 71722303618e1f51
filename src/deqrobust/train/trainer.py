"""The training loop: clean unrolled pretraining, then an adversarial task, with per-epoch dev selection.

:func:`train` is the entry point (the ``deqrobust train`` command calls it). One :class:`Trainer`
owns a run folder (:mod:`~deqrobust.train.run_dir` lists its files). The loop's parts live beside
it: the objective as a task (:mod:`~deqrobust.train.tasks`), the schedule, autocast and threads
(:mod:`~deqrobust.train.schedule`), the epoch's totals (:mod:`~deqrobust.train.stats`) and the
reaction to a non-finite loss (:mod:`~deqrobust.train.nan_policy`).

The trainer only ever receives the train and dev splits (:class:`TrainingData`); the test split is
dropped when the data is loaded. Everything random is seeded from the run seed; a run resumed from
``last`` continues bit for bit (CPU). Under ``torchrun`` the model is wrapped in
DistributedDataParallel, data is sharded, attacks are crafted through the unwrapped module, and only
rank 0 writes files. Imports :mod:`deqrobust.checkpoint`, :mod:`deqrobust.data`,
:mod:`deqrobust.distributed`, :mod:`deqrobust.models` and this package.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..data import BatchLoader, DatasetInfo, Split, load_dataset
from ..distributed import DistInfo, all_gather_object, all_reduce_sum, barrier, init_distributed, is_main_process
from ..errors import ConfigError, DivergenceError
from ..models import build_model, is_deq
from ..utils.seeding import derive_seed, seed_everything
from ..utils.stats import at_chance
from .config import TrainConfig, config_to_dict
from .evaluation import DevResult, evaluate_dev
from .nan_policy import decide, why_stopped
from .run_dir import RUN_FILES, RunDir, checkpoint_metadata, plan_resume, prepare_out_dir
from .schedule import amp_dtype, autocast, lr_at, threads
from .state import capture_rng, restore_rng
from .stats import EpochStats
from .tasks import CleanUnroll, StepSetup, Task, TrainForward, objective_task

__all__ = ["RUN_FILES", "TrainResult", "Trainer", "TrainingData", "load_training_data", "train"]

PathLike = Union[str, Path]


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




def _model_kwargs(config: TrainConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    m = config.model
    for key in ("dropout", "mean", "std", "final_norm"):
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


class Trainer:
    """One training run in ``out_dir`` (see :mod:`~deqrobust.train.run_dir`). Use :func:`train` unless
    you need the pieces; ``data`` must hold only the train and dev splits."""

    def __init__(self, config: TrainConfig, data: TrainingData, out_dir: PathLike, *, dist: DistInfo,
                 progress: bool = True, log: Optional[bool] = None) -> None:
        if not isinstance(data, TrainingData):
            raise TypeError("Trainer takes a TrainingData (train and dev splits only), not the full dataset splits")
        self.config, self.data, self.dist, self.progress = config, data, dist, progress
        self.log = progress if log is None else log
        self.run_dir = RunDir(Path(out_dir))
        self.out_dir, self.last_path, self.best_path = self.run_dir.out, self.run_dir.last, self.run_dir.best
        self.seed, self.device = config.run.seed, dist.device
        self.amp_dtype = amp_dtype(config.run.amp, self.device)

        seed_everything(self.seed)
        self.model_kwargs = _model_kwargs(config)
        info = data.info
        self.model = build_model(config.model.name, info.num_classes, info.in_channels, **self.model_kwargs)
        self.model = self.model.to(self.device)
        self.is_deq = is_deq(self.model)
        self.optimizer = self._make_optimizer()
        self.pretrain_task: Task = CleanUnroll(config)
        self.task: Task = objective_task(config)  # the objective, chosen once
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
            self._say(f"warning: {message}")
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
            return torch.optim.Adam(params, lr=opt.lr, betas=(opt.betas[0], opt.betas[1]), weight_decay=opt.weight_decay)
        return torch.optim.SGD(
            params, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay
        )

    def _reset_state(self) -> None:
        self.epoch = 0  # index of the epoch in progress (or next)
        self.global_iter = 0
        self.best: dict[str, Any] = {"epoch": 0, "dev_clean_acc": -1.0, "dev_robust_acc": -1.0, "eligible": False}
        self.history: list[dict[str, Any]] = []
        self.stats = EpochStats()
        self.lr_scale = 1.0
        self.lr_retries = 0
        self.skipped_total = 0
        self.elapsed_before = 0.0
        self.session_start = time.perf_counter()
        self.last_lr = lr_at(self.config, 0, self.total_iters)

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.session_start

    def _say(self, message: str) -> None:
        if self.dist.is_main and self.log:
            print(message, file=sys.stderr, flush=True)

    def _save(self, kind: str, epoch_done: bool) -> None:
        """Write ``last`` (resumable) or ``best`` from rank 0; every rank takes part (RNG gathering)."""
        rng_states = all_gather_object(capture_rng()) if kind == "last" else []
        if self.dist.is_main:
            meta = checkpoint_metadata(kind, self.config, self.data.info, self.model_kwargs,
                                       num_train=len(self.data.train), num_dev=len(self.data.dev),
                                       dev_used=len(self.dev), history=self.history, iteration=self.global_iter,
                                       best=self.best)  # fmt: skip
            if kind == "best":
                self.run_dir.save_best(self.model, meta)
            else:
                state = {
                    "epoch": self.epoch, "epoch_done": epoch_done, "global_iter": self.global_iter,
                    "seed": self.seed, "world_size": self.dist.world_size, "loader": self.loader.state_dict(),
                    "accumulators": self.stats.to_dict(), "lr_scale": self.lr_scale,
                    "lr_retries": self.lr_retries, "skipped_total": self.skipped_total, "elapsed": self.elapsed,
                    "best": dict(self.best),
                }  # fmt: skip
                self.run_dir.save_last(self.model, dict(meta, history=self.history), state,
                                       self.optimizer.state_dict(), rng_states)
        barrier()

    def _restore(self) -> None:
        """Load model, optimizer, counters, RNG and data position from the ``last`` checkpoint."""
        ckpt, state, optimizer, rng = self.run_dir.load_last(self.dist.world_size)
        self.model.load_state_dict(ckpt.state_dict)
        self.optimizer.load_state_dict(optimizer)
        self.loader.load_state_dict(dict(state["loader"], rank=self.dist.rank))
        self.epoch = int(state["epoch"]) + (1 if state["epoch_done"] else 0)
        if state["epoch_done"]:
            self.loader.set_epoch(self.epoch)
        self.global_iter = int(state["global_iter"])
        self.stats = EpochStats() if state["epoch_done"] else EpochStats.from_dict(state["accumulators"])
        self.lr_scale, self.lr_retries = float(state["lr_scale"]), int(state["lr_retries"])
        self.skipped_total, self.elapsed_before = int(state["skipped_total"]), float(state["elapsed"])
        self.session_start = time.perf_counter()
        self.best = dict(state["best"])
        self.history = list(ckpt.metadata.get("history") or [])
        restore_rng(rng[self.dist.rank])

    # ------------------------------------------------------------------ one iteration
    def _jacobian_active(self) -> bool:
        jac = self.config.jacobian
        return self.is_deq and jac.weight > 0 and (jac.stop_epoch is None or self.epoch < jac.stop_epoch)

    def _setup(self, pretrain: bool) -> StepSetup:
        """This step's Jacobian term and solver cap (decided from the step's seed: the same on every rank)."""
        cfg = self.config
        seed = derive_seed(self.seed, "step", self.global_iter)
        if pretrain or not self._jacobian_active():
            return StepSetup(seed=seed)
        decide_rng = random.Random(seed)
        use = decide_rng.random() < cfg.jacobian.prob
        max_iter = None
        if cfg.jacobian.f_thres_delta and cfg.deq is not None:
            delta = cfg.jacobian.f_thres_delta
            max_iter = max(1, cfg.deq.f_max_iter + decide_rng.randint(-delta, delta))
        return StepSetup(use_jacobian=use, max_iter=max_iter, seed=seed)

    def _step(self, x: Tensor, y: Tensor) -> Optional[str]:
        """One optimizer step; returns what was non-finite ("loss", "gradient") instead of stepping, else None."""
        lr = lr_at(self.config, self.global_iter, self.total_iters) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        pretrain = self.is_deq and self.global_iter < self.config.pretrain.iterations
        task = self.pretrain_task if pretrain else self.task
        with autocast(self.amp_dtype, self.device):
            out = task(self.model, self.forward_module, x, y, self._setup(pretrain))
        bad = torch.tensor([0.0 if bool(torch.isfinite(out.loss.detach())) else 1.0])
        if float(all_reduce_sum(bad)) > 0:
            return "loss"
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack([g.detach().float().abs().sum() for g in grads]).sum())):
            self.optimizer.zero_grad(set_to_none=True)
            return "gradient"
        if self.config.optim.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()

        n, stats = float(len(y)), self.stats
        stats.loss += float(out.loss.detach()) * n
        stats.correct += float((out.logits.detach().argmax(dim=1) == y).sum())
        stats.seen += n
        stats.batches += 1
        if not pretrain and self.is_deq and bool(torch.isfinite(out.nstep)):
            stats.nstep += float(out.nstep)
            stats.rel += float(out.rel)
            stats.deq_batches += 1
        self.global_iter += 1
        self.last_lr = lr
        return None

    # ------------------------------------------------------------------ epochs
    def _evaluate(self) -> DevResult:
        cfg = self.config
        return evaluate_dev(
            self.model, self.dev, self.task.threat,
            alpha=cfg.eval.pgd_alpha if cfg.eval.pgd_alpha is not None else cfg.attack.step_size,
            steps=cfg.eval.pgd_steps, batch_size=cfg.eval.batch_size or cfg.run.batch_size, seed=cfg.eval.seed,
            device=self.device, rank=self.dist.rank, world_size=self.dist.world_size, amp_dtype=self.amp_dtype,
        )  # fmt: skip

    def _end_epoch(self, bar: Any) -> None:
        cfg = self.config
        totals = self.stats.all_ranks()  # exact global values over all ranks
        epoch_no = self.epoch + 1
        evaluate = epoch_no % cfg.eval.every_epochs == 0 or epoch_no == cfg.run.epochs
        result = self._evaluate() if evaluate else None
        pretrain_end = cfg.pretrain.iterations if self.is_deq else 0
        start_iter = self.global_iter - self.iters_per_epoch
        phase = ("pretrain" if self.global_iter <= pretrain_end
                 else ("adversarial" if start_iter >= pretrain_end else "mixed"))  # fmt: skip
        ws = self.dist.world_size
        record: dict[str, Any] = {
            "epoch": epoch_no, "iteration": self.global_iter, "phase": phase, "objective": cfg.attack.objective,
            "lr": lr_at(cfg, self.global_iter - 1, self.total_iters) * self.lr_scale,
            "train_loss": totals.train_loss, "train_acc": totals.train_acc,
            "dev_clean_acc": result.clean_acc if result else None,
            "dev_robust_acc": result.robust_acc if result else None,
            "dev_examples": result.total if result else None,
            "solver_steps": totals.solver_steps, "solver_rel_residual": totals.solver_rel_residual,
            "skipped_batches": int(totals.skipped) // ws if ws > 1 else int(totals.skipped),
            "jacobian_active": self._jacobian_active(), "epoch_time": self.stats.time, "wall_time": self.elapsed,
            "best": False,
        }  # fmt: skip
        # A pretraining epoch, or one at chance, is the best only while no other epoch was evaluated.
        eligible = result is not None and phase != "pretrain" and not at_chance(
            result.clean_acc, result.total, self.data.info.num_classes)
        improved = result is not None and (eligible, result.robust_acc, result.clean_acc) > (
            self.best.get("eligible", True), self.best["dev_robust_acc"], self.best["dev_clean_acc"])
        if improved:
            assert result is not None
            self.best = {"epoch": epoch_no, "dev_clean_acc": result.clean_acc, "dev_robust_acc": result.robust_acc,
                         "eligible": eligible}
            record["best"] = True
        self.history.append(record)
        if self.dist.is_main:
            self.run_dir.append_metrics(record)
            if self.log:
                dev = (f"dev clean {result.clean_acc:.3f}, dev PGD-{cfg.eval.pgd_steps} {result.robust_acc:.3f}"
                       f"{' (best)' if improved else ''}, " if result is not None else "")  # fmt: skip
                loss = "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
                message = f"epoch {epoch_no}/{cfg.run.epochs} ({phase}): {dev}train loss {loss}"
                bar.write(message, file=sys.stderr) if bar is not None else self._say(message)
        if improved:
            self._save("best", epoch_done=True)
        self._save("last", epoch_done=True)

    def _progress_bar(self) -> Any:
        if not (self.progress and self.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_iters, initial=self.global_iter, desc=self.config.name, unit="it",
                    dynamic_ncols=True, file=sys.stderr, smoothing=0.1)  # fmt: skip

    def _run_epochs(self, bar: Any) -> Optional[str]:
        """Train from the current position to the last epoch. Returns where a rollback is needed
        (``run.nan_policy = "lower_lr"``), else None when every epoch is done."""
        cfg = self.config
        every = cfg.run.checkpoint_every_iters
        while self.epoch < cfg.run.epochs:
            self.loader.set_epoch(self.epoch)
            start = time.perf_counter()
            for x, y in self.loader:
                bad = self._step(x, y)
                if bad is not None:
                    where = (f"epoch {self.epoch + 1}, iteration {self.global_iter + 1} "
                             f"(batch {self.loader.state_dict()['batch']})")
                    action = decide(cfg.run, self.skipped_total, self.lr_retries)
                    if action == "rollback":
                        return f"non-finite {bad} at {where}"
                    if action == "stop":
                        raise DivergenceError(
                            f"training diverged: non-finite {bad} at {where}; stopped ({why_stopped(cfg.run)}). The "
                            f"last good checkpoint {self.last_path} ({self.run_dir.last_position()}) is intact; "
                            "continue from it with --resume")
                    if self.dist.is_main:
                        print(f"warning: non-finite {bad} at {where}; batch skipped", file=sys.stderr)
                    self.stats.skipped += 1
                    self.skipped_total += 1
                    self.global_iter += 1
                self.stats.time += time.perf_counter() - start
                start = time.perf_counter()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=self.epoch + 1, loss=f"{self.stats.loss / max(self.stats.seen, 1):.3f}",
                                    lr=f"{self.last_lr:.2e}", refresh=False)  # fmt: skip
                if every and self.global_iter % every == 0 and self.loader.state_dict()["batch"] < self.iters_per_epoch:
                    self._save("last", epoch_done=False)
            self._end_epoch(bar)
            self.epoch += 1
            self.stats = EpochStats()
        return None

    # ------------------------------------------------------------------ the run
    def fit(self, resume: bool = False) -> TrainResult:
        """Train to the configured number of epochs (from ``last`` when ``resume``)."""
        if resume:
            self._restore()
        else:
            if self.dist.is_main:
                self.run_dir.start(self.config, [], fresh=True)
            self._save("last", epoch_done=False)  # a good checkpoint exists from the start
        if self.dist.is_main:
            self.run_dir.start(self.config, self.history, fresh=False)
        barrier()
        bar = self._progress_bar()
        try:
            while (rollback := self._run_epochs(bar)) is not None:
                retries, scale = self.lr_retries + 1, self.lr_scale * 0.5
                self._restore()
                self.lr_retries, self.lr_scale = retries, scale
                if self.dist.is_main:
                    print(f"warning: {rollback}; back to the last checkpoint with the learning rate x{scale:g}",
                          file=sys.stderr)
                    self.run_dir.rewrite_metrics(self.history)
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
            self.run_dir.write_summary({k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in result.__dict__.items() if k != "history"})
        barrier()
        return result


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
    out = Path(out_dir)
    run = dataclasses.replace(config.run)
    if device is not None:
        run.device = device
    resumption = plan_resume(out, dataclasses.replace(config, run=run), seed) if resume else None
    if resumption is not None:
        run.seed = resumption.seed
    elif seed is not None:
        run.seed = seed
    config = dataclasses.replace(config, run=run).validate()
    if resumption is not None and log and is_main_process():
        print(resumption.message, file=sys.stderr, flush=True)
    dist = init_distributed(run.device)
    prepare_out_dir(out, resume, overwrite, dist)
    data = load_training_data(config)
    with threads(run.threads):
        trainer = Trainer(config, data, out, dist=dist, progress=progress, log=log)
        return trainer.fit(resume=resume)
