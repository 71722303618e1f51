"""Fixed-point iteration, optionally damped: ``z_{n+1} = (1 - λ) z_n + λ f(z_n)``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .info import SolverInfo
from .tracker import Callbacks, SolveTracker, validate_options

OPTIONS = ("damping",)


@torch.no_grad()
def fixed_point(
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
    """Solve ``z = f(z)`` by (damped) fixed-point iteration, per sample.

    Args:
        f: map on flattened states (B, D) -> (B, D).
        z0: initial guess (B, D).
        max_iter, tol, stop_mode, trace, callback, return_final, div_factor, stop_early:
            see :class:`~deqrobust.solvers.tracker.SolveTracker`.
        damping: λ in (0, 1]; 1 (default) is plain iteration.

    Example:
        >>> import torch
        >>> z, info = fixed_point(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3), max_iter=60, tol=1e-6)
        >>> torch.allclose(z, torch.full((2, 3), 2.0), atol=1e-5)
        True
    """
    validate_options("fixed_point", options, OPTIONS)
    damping = float(options.get("damping", 1.0))
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"fixed_point damping must be in (0, 1], got {damping}")
    run = SolveTracker(f, z0, max_iter, tol, stop_mode, trace, callback, return_final, div_factor, stop_early)
    while run.running():
        run.step(run.fz if damping == 1.0 else torch.add(run.z, run.g, alpha=damping))
    return run.finish()
