"""What changes with the iteration or the machine, not with the objective: the learning-rate
schedule, the autocast dtype, and the number of CPU threads."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch

from .config import TrainConfig

__all__ = ["amp_dtype", "autocast", "lr_at", "threads"]


def lr_at(config: TrainConfig, iteration: int, total: int) -> float:
    """The learning rate at ``iteration`` of ``total``: constant, or cosine from ``optim.lr`` to ``optim.min_lr``.

    Example:
        >>> from deqrobust.train import load_config
        >>> config = load_config("digits-tiny-unroll")
        >>> lr_at(config, 0, 100) == config.optim.lr, lr_at(config, 100, 100) == config.optim.min_lr
        (True, True)
    """
    opt = config.optim
    if opt.schedule == "constant":
        return opt.lr
    progress = min(iteration, total) / max(total, 1)
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1.0 + math.cos(math.pi * progress))


def amp_dtype(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """``run.amp``: ``"off"`` → None, ``"bf16"`` → bfloat16, ``"auto"`` → bfloat16 on a CUDA device that has it.

    Example:
        >>> amp_dtype("auto", torch.device("cpu")), amp_dtype("bf16", torch.device("cpu"))
        (None, torch.bfloat16)
    """
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(dtype: Optional[torch.dtype], device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def threads(count: Optional[int]) -> Iterator[None]:
    """Use ``count`` torch intra-op threads for the block (``None``: unchanged)."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count is not None:
            torch.set_num_threads(before)
