"""Training objectives as small task modules (docs/method.md §11), in the manner of timm's tasks.

A :class:`Task` crafts a step's inputs, runs the one forward that DDP wraps (:class:`TrainForward`)
and returns a :class:`TaskOutput` — loss, the logits its training accuracy is read from, and the
solver's statistics. The trainer picks one task from the config once: :class:`CleanUnroll` during
the clean pretraining of a DEQ, then ``TASKS[config.attack.objective]``.

Adding an objective is one new file and one registry line::

    @register_task
    class MART(Task):
        name = "mart"
        def inputs(self, model, x, y, step): ...
        def loss(self, logits, y): ...

after which ``attack.objective = "mart"`` is a valid config value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..attacks.base import ThreatModel
from ..models import is_deq
from .config import TrainConfig
from .objectives import pgd_at_loss, pgd_craft, trades_craft, trades_loss
from .registry import TASKS

__all__ = ["CleanUnroll", "DepthSampler", "PGDAT", "RandomStates", "StepSetup", "TASKS", "TRADES", "Task", "TaskOutput",
           "TrainForward", "objective_task", "register_task"]


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
        max_iter: Union[None, int, Sequence[int]] = None,
        stats_index: int = 0,
    ) -> dict[str, Any]:
        nan = torch.tensor(float("nan"))
        out: dict[str, Any] = {"logits": [], "jac": torch.zeros(()), "nstep": nan, "rel": nan}
        deq = self.model if is_deq(self.model) else None
        for i, x in enumerate(inputs):
            if deq is None:
                out["logits"].append(self.model(x))
            elif mode == "unroll":
                out["logits"].append(deq.unrolled_forward(x, self.unroll_layers))
            else:
                cap = max_iter[i] if isinstance(max_iter, Sequence) else max_iter  # one cap per pass, or one for all
                res = deq.forward_with_info(x, jac_loss=i == jac_index, max_iter=cap)
                out["logits"].append(res.logits)
                if res.jac_loss is not None:
                    out["jac"] = res.jac_loss
                if i == stats_index:
                    out["nstep"] = res.info.nstep.float().mean().detach().cpu()
                    out["rel"] = torch.nan_to_num(res.info.rel_final.float(), nan=float("inf")).mean().detach().cpu()
        return out


@dataclass(frozen=True)
class StepSetup:
    """What the trainer decides for one step: the Jacobian term's use, the solver's iteration cap, and
    the step's seed (the same on every rank, so per-step random choices agree across processes)."""

    use_jacobian: bool = False
    max_iter: Optional[int] = None
    seed: int = 0


@dataclass
class TaskOutput:
    """A step's loss (Jacobian term included), the logits its training accuracy is read from, and
    the solver's mean steps and final relative residual (NaN when not measured)."""

    loss: Tensor
    logits: Tensor
    nstep: Tensor
    rel: Tensor


class Task:
    """One training objective. Subclasses set ``name`` and implement :meth:`inputs` and :meth:`loss`;
    ``stats_index`` says which pass's solver statistics count (``None``: none, as in pretraining),
    ``jacobian_index`` which pass carries the Jacobian term."""

    name: ClassVar[str] = "task"
    mode: ClassVar[str] = "deq"
    stats_index: ClassVar[Optional[int]] = 0
    jacobian_index: ClassVar[int] = 0

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.attack = config.attack
        self.threat = ThreatModel(config.attack.norm, config.attack.eps)

    def inputs(self, model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
        """The batches the forward sees (crafted through the unwrapped ``model``)."""
        raise NotImplementedError

    def loss(self, logits: list[Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, the logits whose accuracy is the training accuracy) from the forward's logits."""
        raise NotImplementedError

    def max_iters(self, setup: StepSetup, passes: int) -> Union[None, int, list[int]]:
        """The solver cap of the step's passes (default: the step's one cap for every pass)."""
        return setup.max_iter

    def __call__(self, model: nn.Module, forward: nn.Module, x: Tensor, y: Tensor, setup: StepSetup) -> TaskOutput:
        inputs = self.inputs(model, x, y)
        forward.train()
        out = forward(inputs, mode=self.mode, jac_index=self.jacobian_index if setup.use_jacobian else -1,
                      max_iter=self.max_iters(setup, len(inputs)),
                      stats_index=0 if self.stats_index is None else self.stats_index)
        loss, logits = self.loss(out["logits"], y)
        if setup.use_jacobian:
            loss = loss + self.config.jacobian.weight * out["jac"].float()
        nan = torch.tensor(float("nan"))
        measured = self.stats_index is not None
        return TaskOutput(loss, logits, out["nstep"] if measured else nan, out["rel"] if measured else nan)


class CleanUnroll(Task):
    """A DEQ's clean pretraining: cross-entropy of the weight-tied unroll (``pretrain.layers`` layers)."""

    name = "clean-unroll"
    mode = "unroll"
    stats_index = None

    def inputs(self, model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
        return [x]

    def loss(self, logits: list[Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        return pgd_at_loss(logits[0], y), logits[0]


def register_task(cls: type[Task]) -> type[Task]:
    """Add a task under its ``name`` (a valid ``attack.objective`` from then on); returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, Task)) or cls.name in ("task", ""):
        raise TypeError("register_task takes a Task subclass with its own name")
    TASKS[cls.name] = cls
    return cls


@register_task
class PGDAT(Task):
    """PGD-AT: ``(1-w)·CE(x_adv) + w·CE(x)``, ``x_adv`` by PGD from a random start (or from ``x``)."""

    name = "pgd-at"

    def inputs(self, model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
        a = self.attack
        x_adv, _ = pgd_craft(model, x, y, self.threat, a.step_size, a.steps, start=None if a.random_start else x)
        return [x_adv, x] if a.clean_weight > 0 else [x_adv]

    def loss(self, logits: list[Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        clean = logits[1] if len(logits) > 1 else None
        return pgd_at_loss(logits[0], y, clean, self.attack.clean_weight), logits[0]


@register_task
class TRADES(Task):
    """TRADES: ``CE(x) + β·KL(p(x) || p(x_adv))``; statistics and the Jacobian term on ``x_adv``."""

    name = "trades"
    stats_index = 1
    jacobian_index = 1

    def inputs(self, model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
        a = self.attack
        return [x, trades_craft(model, x, self.threat, a.step_size, a.steps, a.trades_init_std)]

    def loss(self, logits: list[Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        return trades_loss(logits[0], logits[1], y, self.attack.trades_beta), logits[1]


class DepthSampler(nn.Module):
    """A DEQ run at a depth drawn uniformly from ``1..n`` on every forward (the lowest-residual
    iterate among that many solver steps; the model's own gradient, e.g. phantom), drawn from
    ``generator`` (:meth:`RandomStates.__call__` seeds it from the step's seed: the same depths on
    every rank and after a resume). ``depths`` records the draws since the last :meth:`reseed`.

    Example:
        >>> from deqrobust.models import build_model
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> sampler = DepthSampler(build_model("mdeq-tiny", 10, 1), n=8)
        >>> _ = sampler(torch.rand(2, 1, 8, 8)); _ = sampler(torch.rand(2, 1, 8, 8))
        >>> len(sampler.depths), all(1 <= k <= 8 for k in sampler.depths)
        (2, True)
    """

    def __init__(self, model: nn.Module, n: int) -> None:
        super().__init__()
        if not is_deq(model):
            raise TypeError("random intermediate states need a DEQ (DEQClassifier)")
        self.model, self.n = model, int(n)
        self.depths: list[int] = []
        self.generator = torch.Generator().manual_seed(0)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))
        self.depths.clear()

    def draw(self) -> int:
        k = int(torch.randint(1, self.n + 1, (), generator=self.generator))
        self.depths.append(k)
        return k

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_with_info(x, max_iter=self.draw()).logits


@register_task
class RandomStates(TRADES):
    """Random intermediate states (Yang et al., ICML 2023), as released: TRADES in which every
    forward — each of the training attack's and each of the loss's — runs the DEQ to a depth drawn
    uniformly from ``1..f_max_iter``, with the model's gradient (the phantom unroll in the shipped
    configs). The Jacobian term, when drawn, applies to the adversarial pass at its drawn depth."""

    name = "random-states"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        if config.deq is None:
            raise ValueError("attack.objective = 'random-states' needs a DEQ model (a [deq] section)")
        self.n = config.deq.f_max_iter
        self.sampler: Optional[DepthSampler] = None

    def __call__(self, model: nn.Module, forward: nn.Module, x: Tensor, y: Tensor, setup: StepSetup) -> TaskOutput:
        if self.sampler is None or self.sampler.model is not model:
            self.sampler = DepthSampler(model, self.n)
        self.sampler.reseed(setup.seed)  # this step's depths: from its seed, on every rank
        return super().__call__(model, forward, x, y, setup)

    def inputs(self, model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
        if self.sampler is None:
            raise RuntimeError("inputs before the step's depths were seeded (call the task)")
        a = self.attack
        return [x, trades_craft(self.sampler, x, self.threat, a.step_size, a.steps, a.trades_init_std)]

    def max_iters(self, setup: StepSetup, passes: int) -> list[int]:
        sampler = self.sampler
        if sampler is None:
            raise RuntimeError("max_iters before inputs")
        return [sampler.draw() for _ in range(passes)]


def objective_task(config: TrainConfig) -> Task:
    """The adversarial task that ``config.attack.objective`` names.

    Example:
        >>> from deqrobust.train import load_config
        >>> type(objective_task(load_config("digits-tiny-unroll"))).__name__
        'PGDAT'
    """
    return TASKS[config.attack.objective](config)


