"""Per-sample solver statistics (TorchDEQ's key names) and the per-step view given to callbacks."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass
class SolverInfo:
    """What a solve did, per sample. Index ``[:, n]`` of a trace is state ``z_n`` (column 0 is ``z_0``).

    Key access works as in TorchDEQ: ``info["nstep"]``.

    Attributes:
        nstep: (B,) steps taken by each sample before it stopped (converged, diverged or max_iter).
        abs_trace: (B, N+1) ``||f(z_n) - z_n||`` for n = 0..N (frozen after a sample stops).
        rel_trace: (B, N+1) ``||f(z_n) - z_n|| / (||f(z_n)|| + 1e-9)``.
        abs_lowest, rel_lowest: (B,) residuals of the lowest-residual iterate (by ``stop_mode``).
        lowest_step: (B,) index n of that iterate.
        converged: (B,) residual fell below ``tol``.
        diverged: (B,) non-finite values or residual blow-up; such a sample is never a fixed point.
        states: raw iterates ``[z_1, ..., z_N]`` (each (B, D)) when ``trace=True``, else None.
    """

    nstep: Tensor
    abs_trace: Tensor
    rel_trace: Tensor
    abs_lowest: Tensor
    rel_lowest: Tensor
    lowest_step: Tensor
    converged: Tensor
    diverged: Tensor
    stop_mode: str
    max_iter: int
    states: Optional[list[Tensor]] = field(default=None, repr=False)

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(f"unknown solver info key {key!r}; valid keys: {', '.join(self.keys())}")
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    @property
    def rel_final(self) -> Tensor:
        """(B,) relative residual of the last raw iterate z_N."""
        return self.rel_trace[:, -1]


@dataclass
class SolverStep:
    """The solver's state after step n, handed to callbacks (n = 0 is the initial guess).

    ``z`` is the raw iterate ``z_n`` (B, D) and ``fz`` is ``f(z_n)``; samples that have stopped are
    frozen (``active`` is False and ``z`` repeats). ``inverse_jacobian_t(v)`` applies ``B_nᵀ``, the
    solver's current estimate of ``(J_g)^{-ᵀ}`` with ``g(z) = f(z) - z`` (``-v`` for solvers
    without one). ``evaluated`` is False on the padding steps after the whole batch stopped early,
    where no new f evaluation took place.
    """

    n: int
    z: Tensor
    fz: Tensor
    active: Tensor
    inverse_jacobian_t: Callable[[Tensor], Tensor]
    evaluated: bool = True


def negative_identity(v: Tensor) -> Tensor:
    """``B = -I``: the inverse-Jacobian estimate of plain fixed-point iteration."""
    return -v


def batch_norm(v: Tensor) -> Tensor:
    """Per-sample Euclidean norm of a (B, D) tensor."""
    return torch.linalg.vector_norm(v, dim=1)
