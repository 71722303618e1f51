"""What an evaluation reads: a dataset split, or labelled examples given as tensors ``(x, y)``,
checked where they enter and read only when their phase comes (the test split after every choice)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union, overload

import torch
from torch import Tensor

from ..data.splits import Split
from ..errors import ConfigError


@dataclass(frozen=True, eq=False)
class Examples:
    """Labelled examples given as tensors, ``(x, y)``: any input shape with a batch dimension,
    floats in [0, 1], int64 labels (a dataset's :class:`~deqrobust.data.Split` works as it is)."""

    images: Tensor
    labels: Tensor
    name: str

    def __len__(self) -> int:
        return len(self.labels)


Data = Union[Split, Examples, tuple[Tensor, Tensor]]
Labelled = Union[Split, Examples]  # what :func:`as_examples` makes of a :data:`Data`


@overload
def as_examples(data: None, name: str) -> None: ...
@overload
def as_examples(data: Data, name: str) -> Labelled: ...
def as_examples(data: Any, name: str) -> Any:
    """A split as the protocol reads it: an ``(x, y)`` pair becomes :class:`Examples` (validated);
    a split object is passed through untouched (its tensors are read later, when their phase comes)."""
    if data is None or not isinstance(data, (tuple, list)):
        return data
    if len(data) != 2 or not all(isinstance(t, Tensor) for t in data):
        raise ConfigError(f"{name} must be a Split or a pair of tensors (x, y), got a {type(data).__name__} of "
                          f"{len(data)} item(s)")
    x, y = data
    if x.dim() < 2 or not x.is_floating_point():
        raise ConfigError(f"{name} inputs must be a floating-point tensor (N, ...), got {x.dtype} {tuple(x.shape)}")
    if y.dim() != 1 or y.dtype != torch.int64 or len(y) != len(x):
        raise ConfigError(f"{name} labels must be an int64 tensor of shape ({len(x)},), got {y.dtype} {tuple(y.shape)}")
    if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
        raise ConfigError(f"{name} inputs must lie in [0, 1] (the threat model's domain); got [{float(x.min()):.3g}, "
                          f"{float(x.max()):.3g}] — normalise inside the model instead")
    return Examples(x, y, name)


def split_tensors(split: Labelled, n: Optional[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``n`` examples of a split as float [0,1] inputs and int64 labels."""
    count = len(split.labels) if n is None else min(int(n), len(split.labels))
    images = split.images[:count]
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return x.to(device), split.labels[:count].to(device)
