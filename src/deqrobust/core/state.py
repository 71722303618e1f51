"""Flattening of DEQ states: a tensor or a list of tensors (multiscale) <-> (B, D) for the solvers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

State = Union[Tensor, Sequence[Tensor]]


@dataclass(frozen=True)
class StateSpec:
    """Per-sample shapes of a state, to flatten it to (B, D) and back.

    Example:
        >>> import torch
        >>> z = [torch.zeros(2, 3, 4, 4), torch.ones(2, 6, 2, 2)]
        >>> spec = StateSpec.of(z)
        >>> flat = spec.flatten(z)
        >>> flat.shape, spec.dim
        (torch.Size([2, 72]), 72)
        >>> [t.shape for t in spec.unflatten(flat)] == [t.shape for t in z]
        True
    """

    shapes: tuple[tuple[int, ...], ...]
    is_list: bool

    @classmethod
    def of(cls, z: State) -> "StateSpec":
        if isinstance(z, Tensor):
            return cls((tuple(z.shape[1:]),), False)
        tensors = list(z)
        if not tensors or not all(isinstance(t, Tensor) for t in tensors):
            raise TypeError("a DEQ state must be a tensor or a non-empty list of tensors")
        return cls(tuple(tuple(t.shape[1:]) for t in tensors), True)

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def flatten(self, z: State) -> Tensor:
        if isinstance(z, Tensor):
            return z.reshape(z.shape[0], -1)
        return torch.cat([t.reshape(t.shape[0], -1) for t in z], dim=1)

    def unflatten(self, flat: Tensor) -> State:
        bsz = flat.shape[0]
        if not self.is_list:
            return flat.view(bsz, *self.shapes[0])
        parts = torch.split(flat, self.sizes, dim=1)
        return [p.reshape(bsz, *s) for p, s in zip(parts, self.shapes)]
