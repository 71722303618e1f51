"""Per-epoch model selection on the dev split: clean and PGD accuracy, sharded over ranks.

Each rank evaluates a disjoint shard; counts are summed with ``all_reduce`` so the totals are exact
and global. PGD random starts are seeded per example (by its index in the dev split), so results do
not depend on the batch size or on how examples are sharded. An example is counted robust only if
it is classified correctly clean and at every PGD iterate; NaN/Inf logits count as errors.
Imports torch, :mod:`deqrobust.data`, :mod:`deqrobust.attacks`, :mod:`deqrobust.distributed`,
:mod:`deqrobust.utils` and :mod:`.objectives`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..attacks.base import ThreatModel
from ..data import BatchLoader, Split
from ..distributed import all_reduce_sum
from ..utils.seeding import derive_seed
from ..attacks.steps import misclassified, random_start
from ..utils.modes import evaluation_mode
from .objectives import pgd_craft

__all__ = ["DevResult", "evaluate_dev", "example_noise"]


@dataclass(frozen=True)
class DevResult:
    """Global counts of one dev evaluation."""

    clean_correct: int
    robust_correct: int
    total: int

    @property
    def clean_acc(self) -> float:
        return self.clean_correct / self.total if self.total else float("nan")

    @property
    def robust_acc(self) -> float:
        return self.robust_correct / self.total if self.total else float("nan")


def example_noise(indices: Tensor, shape: tuple[int, ...], seed: int) -> Tensor:
    """Uniform noise in [-1, 1] of per-sample ``shape`` for each example index, independent of batching.

    Example:
        >>> a = example_noise(torch.tensor([3, 7]), (1, 2, 2), seed=0)
        >>> b = example_noise(torch.tensor([7]), (1, 2, 2), seed=0)
        >>> a.shape, bool(torch.equal(a[1], b[0]))
        (torch.Size([2, 1, 2, 2]), True)
    """
    out = torch.empty((len(indices), *shape))
    for row, idx in enumerate(indices.tolist()):
        gen = torch.Generator().manual_seed(derive_seed(seed, "dev-pgd-start", int(idx)))
        out[row] = torch.rand(shape, generator=gen) * 2 - 1
    return out


def evaluate_dev(
    model: nn.Module,
    split: Split,
    threat: ThreatModel,
    *,
    alpha: float,
    steps: int,
    batch_size: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    amp_dtype: Optional[torch.dtype] = None,
) -> DevResult:
    """Clean and PGD-``steps`` accuracy of ``model`` (eval mode) on ``split``, summed over ranks.

    Example:
        >>> from deqrobust.data import Split
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> split = Split(torch.rand(6, 1, 2, 2), torch.randint(0, 3, (6,)), "dev")
        >>> result = evaluate_dev(model, split, ThreatModel("Linf", 0.1), alpha=0.025, steps=2, batch_size=4)
        >>> result.total, result.robust_correct <= result.clean_correct
        (6, True)
    """
    device = torch.device(device)
    loader = BatchLoader(
        split, batch_size, shuffle=False, rank=rank, world_size=world_size, even_shards=False,
        device=device, with_indices=True,
    )  # fmt: skip
    counts = torch.zeros(3, dtype=torch.float64)
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )
    with evaluation_mode(model, warn=False), autocast:
        for x, y, idx in loader:
            with torch.no_grad():
                logits = model(x)
            clean = ~misclassified(logits, y)
            start_noise = example_noise(idx, tuple(x.shape[1:]), seed).to(device)
            start = random_start(x, threat, start_noise)
            _, fooled = pgd_craft(model, x, y, threat, alpha, steps, start=start, track=True)
            assert fooled is not None
            counts += torch.tensor(
                [float(clean.sum()), float((clean & ~fooled).sum()), float(len(y))], dtype=torch.float64
            )
    all_reduce_sum(counts)
    return DevResult(int(counts[0]), int(counts[1]), int(counts[2]))
