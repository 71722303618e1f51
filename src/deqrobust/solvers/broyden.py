"""Broyden's method ("good" Broyden on ``g(z) = f(z) - z``), per sample, low-rank inverse Jacobian.

``B_n ≈ J_g(z_n)^{-1}`` is kept as ``B = -I + Σ_l u_l v_lᵀ`` per sample; the step is
``z_{n+1} = z_n - B_n g(z_n)`` (unit step, no line search, so ``z_1 = f(z_0)`` from ``B_0 = -I``) and
``B_{n+1} = B_n + (Δz - B_n Δg)(Δzᵀ B_n) / (Δzᵀ B_n Δg)``; a vanishing or non-finite denominator
skips that sample's update. Callbacks see ``B_nᵀ`` through ``SolverStep.inverse_jacobian_t``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .info import SolverInfo
from .tracker import Callbacks, SolveTracker, validate_options

OPTIONS = ("memory",)


class LowRankInverse:
    """Per-sample ``B = -I + U Vᵀ`` with a ring buffer of at most ``memory`` rank-one terms."""

    def __init__(self, bsz: int, dim: int, memory: int, like: Tensor) -> None:
        self.us = like.new_zeros(bsz, memory, dim)
        self.vs = like.new_zeros(bsz, memory, dim)
        self.memory = memory
        self.count = 0

    def _parts(self) -> tuple[Tensor, Tensor]:
        k = min(self.count, self.memory)
        return self.us[:, :k], self.vs[:, :k]

    def matvec(self, x: Tensor) -> Tensor:
        """``B x``."""
        us, vs = self._parts()
        if us.shape[1] == 0:
            return -x
        return -x + torch.einsum("bl,bld->bd", torch.einsum("bld,bd->bl", vs, x), us)

    def rmatvec(self, x: Tensor) -> Tensor:
        """``Bᵀ x``."""
        us, vs = self._parts()
        if us.shape[1] == 0:
            return -x
        return -x + torch.einsum("bl,bld->bd", torch.einsum("bld,bd->bl", us, x), vs)

    def update(self, delta_z: Tensor, delta_g: Tensor, mask: Tensor) -> None:
        """Rank-one "good" Broyden update for the samples in ``mask`` with a usable denominator."""
        v = self.rmatvec(delta_z)
        denom = torch.einsum("bd,bd->b", v, delta_g)
        scale = torch.linalg.vector_norm(v, dim=1) * torch.linalg.vector_norm(delta_g, dim=1)
        ok = mask & torch.isfinite(denom) & (denom.abs() > 1e-12 * scale) & (scale > 0)
        safe = torch.where(ok, denom, torch.ones_like(denom))
        u = (delta_z - self.matvec(delta_g)) / safe.unsqueeze(1)
        keep = ok.unsqueeze(1)
        slot = self.count % self.memory
        self.us[:, slot] = torch.where(keep, u, torch.zeros_like(u))
        self.vs[:, slot] = torch.where(keep, v, torch.zeros_like(v))
        self.count += 1


def broyden(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    max_iter: int = 50,
    tol: float = 1e-3,
    stop_mode: str = "rel",
    trace: bool = False,
    callback: Callbacks = None,
    return_final: bool = False,
    div_factor: float = 1e4,
    stop_early: bool = True,
    **options: Optional[int],
) -> tuple[Tensor, SolverInfo]:
    """Solve ``z = f(z)`` with Broyden's method, per sample.

    Args:
        memory: number of rank-one terms kept (ring buffer, limited-memory Broyden);
            default ``max_iter`` (full Broyden, as TorchDEQ).
        Other arguments: see :func:`~deqrobust.solvers.fixed_point.fixed_point`.

    Example:
        >>> import torch
        >>> a = torch.tensor([[0.5, 0.2], [-0.3, 0.4]])
        >>> z, info = broyden(lambda z: z @ a.T + 1.0, torch.zeros(3, 2), max_iter=20, tol=1e-8)
        >>> float((z - (z @ a.T + 1.0)).abs().max()) < 1e-5
        True
    """
    validate_options("broyden", options, OPTIONS)
    memory = options.get("memory") or max_iter
    if int(memory) < 1:
        raise ValueError(f"broyden memory must be >= 1, got {memory}")
    run = SolveTracker(f, z0, max_iter, tol, stop_mode, trace, callback, return_final, div_factor, stop_early)
    inverse = LowRankInverse(z0.shape[0], z0.shape[1], int(memory), z0)
    run.inverse_jacobian_t = inverse.rmatvec
    while run.running():
        z_prev, g_prev, active = run.z, run.g, run.active
        run.advance(z_prev - inverse.matvec(g_prev))
        delta_z = run.z - z_prev
        delta_g = torch.nan_to_num(run.g - g_prev)
        inverse.update(torch.nan_to_num(delta_z), delta_g, active & ~run.diverged)
        run.notify()
    return run.finish()
