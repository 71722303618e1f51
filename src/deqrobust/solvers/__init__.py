"""Per-sample fixed-point solvers with one signature and traced raw iterates.

``solver(f, z0, max_iter, tol, stop_mode="rel", trace=False, callback=None, ...) -> (z, info)``
that run without autograd (a callback may enable it for its own work)
where ``f`` maps flattened states (B, D) -> (B, D). ``info`` is a :class:`SolverInfo` with
TorchDEQ's keys. Imports nothing from deqrobust but :mod:`deqrobust.errors`.

Example:
    >>> import torch
    >>> from deqrobust.solvers import get_solver
    >>> z, info = get_solver("broyden")(torch.cos, torch.zeros(2, 1), max_iter=20, tol=1e-6)
    >>> info["nstep"].tolist() <= [20, 20]
    True
"""

from __future__ import annotations

from typing import Callable

from . import anderson as _anderson
from . import broyden as _broyden
from . import fixed_point as _fixed_point
from .anderson import anderson
from .broyden import broyden
from .callbacks import KeepStates, RunningMean
from .fixed_point import fixed_point
from .info import SolverInfo, SolverStep
from .tracker import SolveTracker

Solver = Callable[..., tuple]

SOLVERS: dict[str, Solver] = {"fixed_point": fixed_point, "anderson": anderson, "broyden": broyden}
SOLVER_OPTIONS: dict[str, tuple[str, ...]] = {
    "fixed_point": _fixed_point.OPTIONS,
    "anderson": _anderson.OPTIONS,
    "broyden": _broyden.OPTIONS,
}


def get_solver(name: str) -> Solver:
    """Look a solver up by name (``"fixed_point"``, ``"anderson"``, ``"broyden"``)."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(SOLVERS)}") from None


__all__ = [
    "SOLVERS",
    "SOLVER_OPTIONS",
    "KeepStates",
    "RunningMean",
    "SolveTracker",
    "SolverInfo",
    "SolverStep",
    "anderson",
    "broyden",
    "fixed_point",
    "get_solver",
]
