"""Input normalisation inside a model: inputs stay in [0, 1] outside (docs/method.md §1), ``(x - mean) / std`` inside."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel, with ``mean``/``std`` stored as buffers (saved in ``state_dict``).

    Example:
        >>> import torch
        >>> norm = InputNormalization([0.5], [0.25])
        >>> norm(torch.ones(1, 1, 2, 2)).flatten().tolist()
        [2.0, 2.0, 2.0, 2.0]
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean has {mean_t.numel()} entries but std has {std_t.numel()}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {std_t.flatten().tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: Tensor) -> Tensor:
        channels = self.mean.shape[1]
        if channels != 1 and x.shape[1] != channels:
            raise ValueError(f"normalisation has {channels} channels but the input has {x.shape[1]}")
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def input_normalization(
    mean: Optional[Sequence[float]], std: Optional[Sequence[float]], channels: int
) -> nn.Module:
    """:class:`InputNormalization` if ``mean``/``std`` are given, else ``nn.Identity`` (both or neither).

    A single value is broadcast over the channels; otherwise there must be one per channel.

    Example:
        >>> type(input_normalization(None, None, 3)).__name__
        'Identity'
    """
    if mean is None and std is None:
        return nn.Identity()
    if mean is None or std is None:
        raise ValueError("give both mean and std for input normalisation, or neither")
    mean_l, std_l = list(torch.as_tensor(mean).flatten().tolist()), list(torch.as_tensor(std).flatten().tolist())
    for label, values in (("mean", mean_l), ("std", std_l)):
        if len(values) not in (1, channels):
            raise ValueError(f"{label} needs 1 or {channels} values (one per input channel), got {len(values)}")
    return InputNormalization(mean_l * (channels // len(mean_l)), std_l * (channels // len(std_l)))
