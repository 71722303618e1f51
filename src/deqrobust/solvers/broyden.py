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
        self.us = like.new_empty(bsz, memory, dim)  # only the first `count` slots are ever read
        self.vs = like.new_empty(bsz, memory, dim)
        self.memory = memory
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count >= self.memory

    def _parts(self) -> tuple[Tensor, Tensor]:
        k = min(self.count, self.memory)
        return self.us[:, :k], self.vs[:, :k]

    @staticmethod
    def _apply(left: Tensor, right: Tensor, x: Tensor) -> Tensor:
        """``-x + Σ_l right_l (left_l · x)`` as two batched matrix products."""
        if left.shape[1] == 0:
            return -x
        # (B, 1, D) x (B, D, k): several times faster on CPU than the equivalent (B, k, D) x (B, D, 1).
        coeff = torch.bmm(x.unsqueeze(1), left.transpose(1, 2))  # (B, 1, k)
        return torch.baddbmm(x.unsqueeze(1), coeff, right, alpha=1.0, beta=-1.0).squeeze(1)

    def matvec(self, x: Tensor) -> Tensor:
        """``B x``."""
        us, vs = self._parts()
        return self._apply(vs, us, x)

    def rmatvec(self, x: Tensor) -> Tensor:
        """``Bᵀ x``."""
        us, vs = self._parts()
        return self._apply(us, vs, x)

    def next_slot(self) -> tuple[Tensor, Tensor]:
        """Views of the buffer slots the next rank-one term goes to (fill them, then ``count += 1``)."""
        slot = self.count % self.memory
        return self.us[:, slot], self.vs[:, slot]


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vecdot(a, b)  # one kernel; einsum pays ~80 µs of dispatch per call


@torch.no_grad()
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
    b_g = inverse.matvec(run.g)  # B_n g(z_n); the step is z_{n+1} = z_n - B_n g(z_n)
    while run.running():
        g_prev, active = run.g, run.active
        run.advance(run.z - b_g)
        # With the full step Δz = -B_n g_n, the "good" Broyden term simplifies:
        # Δz - B_n Δg = -B_n g_{n+1}, so one product with B_n serves the update and the next step,
        # B_{n+1} g_{n+1} = B_n g_{n+1} + u (vᵀ g_{n+1}).
        b_g_next = inverse.matvec(run.g)
        delta_g = run.g - g_prev
        v = inverse.rmatvec(b_g).neg_()  # B_nᵀ Δz
        denom = _rowdot(v, delta_g)
        scale = torch.linalg.vector_norm(v, dim=1) * torch.linalg.vector_norm(delta_g, dim=1)
        ok = active & ~run.diverged & torch.isfinite(denom) & (denom.abs() > 1e-12 * scale) & (scale > 0)
        factor = torch.where(ok, -1.0 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(denom))
        wrapped = inverse.full
        u, v_slot = inverse.next_slot()
        torch.mul(b_g_next, factor.unsqueeze(1), out=u)  # u = (Δz - B_n Δg) / (vᵀ Δg)
        torch.where(ok.unsqueeze(1), v, torch.zeros_like(v), out=v_slot)
        inverse.count += 1
        if wrapped:  # the oldest term left the ring buffer: recompute
            b_g = inverse.matvec(run.g)
        else:
            b_g = torch.addcmul(b_g_next, u, _rowdot(v_slot, run.g).unsqueeze(1))
        run.notify()
    return run.finish()


class BroydenState:
    """Broyden's method one step at a time, on a map that may change between steps.

    The input-entropy-reduction defense (:mod:`deqrobust.defenses.entropy`) solves in chunks and
    changes the injected input between them; :meth:`retarget` carries the low-rank memory over to
    the new map and "lifts" it with one rank-one update: the last step's secant pair
    ``(Δz, Δg + g_new(z) - g_old(z))``, so that ``B`` maps the change of ``g`` across the switch
    back to the step. Steps use the same update as :func:`broyden`, without stopping, residual
    tracking or the lowest iterate: every sample takes every step.

    Example:
        >>> import torch
        >>> a = torch.tensor([[0.5, 0.2], [-0.3, 0.4]])
        >>> run = BroydenState(lambda z: z @ a.T + 1.0, torch.zeros(3, 2), memory=20)
        >>> z = [run.step() for _ in range(3)][-1]
        >>> run.retarget(lambda z: z @ a.T + 2.0)  # a new input; the memory is kept
        >>> z = [run.step() for _ in range(12)][-1]
        >>> float((z - (z @ a.T + 2.0)).abs().max()) < 1e-4
        True
    """

    def __init__(self, f: Callable[[Tensor], Tensor], z0: Tensor, memory: int) -> None:
        if int(memory) < 1:
            raise ValueError(f"broyden memory must be >= 1, got {memory}")
        self.f = f
        self.z = z0
        self.g = f(z0) - z0
        self.inverse = LowRankInverse(z0.shape[0], z0.shape[1], int(memory), z0)
        self.last: Optional[tuple[Tensor, Tensor]] = None  # the last step's (Δz, Δg)

    @torch.no_grad()
    def step(self) -> Tensor:
        """One Broyden step ``z ← z - B g(z)`` and the update of ``B``; returns the new ``z``."""
        z_next = self.z - self.inverse.matvec(self.g)
        g_next = self.f(z_next) - z_next
        delta_z, delta_g = z_next - self.z, g_next - self.g
        self.update(delta_z, delta_g)
        self.z, self.g, self.last = z_next, g_next, (delta_z, delta_g)
        return z_next

    @torch.no_grad()
    def retarget(self, f: Callable[[Tensor], Tensor]) -> None:
        """Continue on the new map ``f`` from the current state, the memory lifted (see the class).

        The lift is skipped for a sample whose last step is shorter than the change of ``g`` it
        would have to explain (``‖Δz‖ < ‖g_new(z) - g_old(z)‖``, e.g. a chunk that converged): that
        secant pair makes ``B`` nearly singular along the change and the solve stalls, then diverges."""
        g_new = f(self.z) - self.z
        if self.last is not None:
            delta_z, delta_g = self.last
            change = g_new - self.g
            informative = torch.linalg.vector_norm(delta_z, dim=1) >= torch.linalg.vector_norm(change, dim=1)
            self.update(delta_z, delta_g + change, informative)
        self.f, self.g = f, g_new

    def update(self, delta_z: Tensor, delta_g: Tensor, where: Optional[Tensor] = None) -> None:
        """The "good" Broyden update ``B ← B + (Δz - B Δg)(Δzᵀ B) / (Δzᵀ B Δg)``, per sample (those
        in ``where``); a vanishing or non-finite denominator skips that sample's update (as :func:`broyden`)."""
        inverse = self.inverse
        v = inverse.rmatvec(delta_z)  # Bᵀ Δz
        b_dg = inverse.matvec(delta_g)
        denom = _rowdot(v, delta_g)
        scale = torch.linalg.vector_norm(v, dim=1) * torch.linalg.vector_norm(delta_g, dim=1)
        ok = torch.isfinite(denom) & (denom.abs() > 1e-12 * scale) & (scale > 0)
        if where is not None:
            ok = ok & where
        factor = torch.where(ok, 1.0 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(denom))
        u, v_slot = inverse.next_slot()
        torch.mul(delta_z - b_dg, factor.unsqueeze(1), out=u)
        torch.where(ok.unsqueeze(1), v, torch.zeros_like(v), out=v_slot)
        inverse.count += 1
