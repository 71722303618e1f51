"""Flattening of DEQ states: a tensor or a list of tensors (multiscale) <-> (B, D) for the solvers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from ..errors import ConfigError

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
        """``z`` as (B, D); a state of another structure than the spec's is an error that says why.

        Example:
            >>> StateSpec.of(torch.zeros(2, 3)).flatten([torch.zeros(2, 3), torch.zeros(2, 1)])  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            deqrobust.errors.ConfigError: f returned a list of 2 tensors but the initial state is one tensor: ... f.init_state(e) ...
        """
        if isinstance(z, Tensor) and not self.is_list:
            return z.reshape(z.shape[0], -1)
        if isinstance(z, Tensor) or not self.is_list:
            got = "one tensor" if isinstance(z, Tensor) else f"a {type(z).__name__} of {len(z)} tensors"
            want = f"a list of {len(self.shapes)} tensors" if self.is_list else "one tensor"
            raise ConfigError(f"f returned {got} but the initial state is {want}: a DEQ whose state is a list needs "
                              "f.init_state(e) returning the initial list (e.g. zeros for each branch)")
        return torch.cat([t.reshape(t.shape[0], -1) for t in z], dim=1)

    def unflatten(self, flat: Tensor) -> State:
        bsz = flat.shape[0]
        if not self.is_list:
            return flat.view(bsz, *self.shapes[0])
        parts = torch.split(flat, self.sizes, dim=1)
        return [p.reshape(bsz, *s) for p, s in zip(parts, self.shapes)]
