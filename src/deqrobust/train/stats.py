"""One epoch's running totals, by name (saved in ``last`` checkpoints as ``accumulators``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..distributed import all_reduce_sum

__all__ = ["EpochStats"]


@dataclass
class EpochStats:
    """Sums over the batches of one epoch on this rank.

    ``loss`` is summed per example (``loss · batch size``); ``nstep`` and ``rel`` (solver steps
    and final relative residual) are summed over the ``deq_batches`` that reported them.

    Example:
        >>> stats = EpochStats(loss=6.0, correct=2.0, seen=4.0)
        >>> stats.train_loss, stats.train_acc, EpochStats.from_dict(stats.to_dict()) == stats
        (1.5, 0.5, True)
    """

    loss: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    batches: float = 0.0
    nstep: float = 0.0
    rel: float = 0.0
    deq_batches: float = 0.0
    skipped: float = 0.0
    time: float = 0.0

    SUMMED_OVER_RANKS = ("loss", "correct", "seen", "skipped", "nstep", "rel", "deq_batches")

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EpochStats":
        return cls(**{f.name: float(data[f.name]) for f in dataclasses.fields(cls) if f.name in data})

    def all_ranks(self) -> "EpochStats":
        """These totals summed over every rank (exact: float64); ``batches`` and ``time`` stay this rank's."""
        totals = torch.tensor([getattr(self, k) for k in self.SUMMED_OVER_RANKS], dtype=torch.float64)
        all_reduce_sum(totals)
        return dataclasses.replace(self, **{k: float(v) for k, v in zip(self.SUMMED_OVER_RANKS, totals)})

    @property
    def train_loss(self) -> Optional[float]:
        return self.loss / self.seen if self.seen else None

    @property
    def train_acc(self) -> Optional[float]:
        return self.correct / self.seen if self.seen else None

    @property
    def solver_steps(self) -> Optional[float]:
        return self.nstep / self.deq_batches if self.deq_batches else None

    @property
    def solver_rel_residual(self) -> Optional[float]:
        return self.rel / self.deq_batches if self.deq_batches else None
