"""Anderson acceleration (type II, as in the DEQ literature), per sample."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .info import SolverInfo
from .tracker import Callbacks, SolveTracker, validate_options

OPTIONS = ("m", "lam", "beta")


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
            in the history (default 1e-4), so it stays meaningful at any residual scale.
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
    xs = z0.new_zeros(bsz, m, dim)
    fs = z0.new_zeros(bsz, m, dim)
    count = 0
    while run.running():
        slot = count % m
        keep = run.active.view(bsz, 1)
        # Stopped samples contribute zeros, so their (possibly non-finite) rows never reach the solve.
        xs[:, slot] = torch.where(keep, run.z, torch.zeros_like(run.z))
        fs[:, slot] = torch.where(keep, run.fz, torch.zeros_like(run.fz))
        count += 1
        k = min(count, m)
        if k == 1:
            proposal = run.fz
        else:
            order = [(slot - i) % m for i in range(k)]  # newest first; fixed order keeps results batch-independent
            x_hist, f_hist = xs[:, order], fs[:, order]
            g_hist = f_hist - x_hist
            gram = torch.bmm(g_hist, g_hist.transpose(1, 2))
            system = z0.new_zeros(bsz, k + 1, k + 1)
            system[:, 0, 1:] = 1.0
            system[:, 1:, 0] = 1.0
            scale = torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(z0.dtype).tiny)
            eye = torch.eye(k, dtype=z0.dtype, device=z0.device)
            system[:, 1:, 1:] = gram + (lam * scale).view(bsz, 1, 1) * eye
            rhs = z0.new_zeros(bsz, k + 1, 1)
            rhs[:, 0] = 1.0
            alpha = torch.linalg.solve(system, rhs)[:, 1:, 0]
            mixed_f = torch.einsum("bk,bkd->bd", alpha, f_hist)
            mixed_x = torch.einsum("bk,bkd->bd", alpha, x_hist)
            proposal = beta * mixed_f + (1.0 - beta) * mixed_x
        run.step(proposal)
    return run.finish()
