"""Anderson acceleration (type II, as in the DEQ literature), per sample."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .info import SolverInfo
from .tracker import Callbacks, SolveTracker, validate_options

OPTIONS = ("m", "lam", "beta")
# Below this mean squared residual a history counts as all zero (its normalisation would overflow).
_SCALE_FLOOR = {torch.float16: 1e-6, torch.bfloat16: 1e-30, torch.float32: 1e-30, torch.float64: 1e-290}


@torch.no_grad()
def anderson(
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
    **options: float,
) -> tuple[Tensor, SolverInfo]:
    """Solve ``z = f(z)`` with Anderson acceleration.

    The first step is plain iteration (``z_1 = f(z_0)``); later steps mix the last ``m`` iterates
    with weights from a per-sample regularised least-squares problem.

    Args:
        m: history size (default 5).
        lam: Tikhonov regularisation of the mixing problem, relative to the mean squared residual
            in the history (default 1e-4), so it stays meaningful at any residual scale; a history
            of exactly zero residuals (an exact fixed point) is handled, never a singular system.
        beta: mixing parameter (default 1.0).
        Other arguments: see :func:`~deqrobust.solvers.fixed_point.fixed_point`.

    Example:
        >>> import torch
        >>> z, info = anderson(lambda z: torch.cos(z), torch.zeros(4, 1), max_iter=30, tol=1e-6)
        >>> float((z - torch.cos(z)).abs().max()) < 1e-4
        True
    """
    validate_options("anderson", options, OPTIONS)
    m = int(options.get("m", 5))
    lam = float(options.get("lam", 1e-4))
    beta = float(options.get("beta", 1.0))
    if m < 1:
        raise ValueError(f"anderson history size m must be >= 1, got {m}")
    run = SolveTracker(f, z0, max_iter, tol, stop_mode, trace, callback, return_final, div_factor, stop_early)
    bsz, dim = z0.shape
    xs = z0.new_empty(bsz, m, dim)  # past iterates z (only the filled slots are read)
    gs = z0.new_empty(bsz, m, dim)  # their residuals g = f(z) - z
    gram = z0.new_zeros(bsz, m, m)  # g_i · g_j, one new row per step
    scale_floor = _SCALE_FLOOR.get(z0.dtype, 0.0)
    count = 0
    while run.running():
        slot = count % m
        z, g = run.z, run.g
        if not run.all_active:  # stopped samples contribute zeros: their rows never reach the solve
            keep = run.active.view(bsz, 1)
            z, g = torch.where(keep, z, torch.zeros_like(z)), torch.where(keep, g, torch.zeros_like(g))
        xs[:, slot] = z
        gs[:, slot] = g
        count += 1
        k = min(count, m)
        if k == 1:
            run.step(run.fz)  # z_1 = f(z_0), as the other solvers
            continue
        row = torch.bmm(g.unsqueeze(1), gs[:, :k].transpose(1, 2)).squeeze(1)  # the fast orientation on CPU
        gram[:, slot, :k] = row
        gram[:, :k, slot] = row
        # The mixing weights do not change when the gram block is scaled, so it is normalised by the
        # mean squared residual: the system stays well conditioned at any residual scale, and a
        # sample whose history is all zero (converged exactly, or frozen for m steps) gets G = 0,
        # lam * I — solvable, uniform weights — instead of a singular matrix.
        scale = torch.diagonal(gram[:, :k, :k], dim1=1, dim2=2).mean(dim=1)
        scale = torch.where(scale > scale_floor, scale, torch.ones_like(scale))
        system = z0.new_zeros(bsz, k + 1, k + 1)
        system[:, 0, 1:] = 1.0
        system[:, 1:, 0] = 1.0
        system[:, 1:, 1:] = gram[:, :k, :k] / scale.view(bsz, 1, 1) + lam * torch.eye(k, dtype=z0.dtype, device=z0.device)
        rhs = z0.new_zeros(bsz, k + 1, 1)
        rhs[:, 0] = 1.0
        alpha = torch.linalg.solve(system, rhs)[:, 1:].transpose(1, 2)  # (B, 1, k)
        mixed_x = torch.bmm(alpha, xs[:, :k]).squeeze(1)
        mixed_g = torch.bmm(alpha, gs[:, :k]).squeeze(1)
        run.step(mixed_x + beta * mixed_g)  # = β Σα f(z) + (1-β) Σα z
    return run.finish()
