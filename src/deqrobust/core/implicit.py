"""Exact (implicit) gradient: replace the incoming cotangent c by u solving ``u = J_f(z*)ᵀ u + c``.

Works in eval mode as in training mode: attacks get a real input gradient.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..solvers import get_solver

# The backward solver's statistics of the most recent backward pass (for monitoring and tests).
LAST_BACKWARD_INFO: dict[str, Any] = {}


class _ImplicitGradient(torch.autograd.Function):
    """Identity on ``fz = f(z*, e)``; its backward solves the adjoint linear system."""

    @staticmethod
    def forward(ctx, fz: Tensor, z_leaf: Tensor, graph_fz: Tensor, backward_solve: Callable) -> Tensor:
        ctx.graph = (graph_fz, z_leaf)
        ctx.backward_solve = backward_solve
        return fz.view_as(fz)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        graph_fz, z_leaf = ctx.graph

        def vjp(u: Tensor) -> Tensor:
            return torch.autograd.grad(graph_fz, z_leaf, u, retain_graph=True)[0] + grad

        u = ctx.backward_solve(vjp, torch.zeros_like(grad))
        return u, None, None, None


def exact_output(
    f: Callable[[Tensor], Tensor],
    z_star: Tensor,
    solver: str = "broyden",
    max_iter: int = 30,
    tol: float = 1e-6,
    stop_mode: str = "rel",
    solver_options: dict | None = None,
) -> Tensor:
    """Return ``f(z*)`` whose backward is the exact implicit gradient.

    ``f`` must carry the graph to the injection and the parameters; ``z_star`` is detached.
    One evaluation of ``f`` serves both as the output and as the graph for the backward VJPs.

    Example:
        >>> import torch
        >>> w = torch.tensor([[0.5]]); x = torch.tensor([[1.0]], requires_grad=True)
        >>> f = lambda z: z @ w.T + x          # fixed point z* = 2x, dz*/dx = 2
        >>> out = exact_output(f, torch.tensor([[2.0]]), tol=1e-10, max_iter=50)
        >>> out.backward(); round(x.grad.item(), 4)
        2.0
    """
    backward_solver = get_solver(solver)
    options = dict(solver_options or {})

    def backward_solve(vjp: Callable[[Tensor], Tensor], u0: Tensor) -> Tensor:
        u, info = backward_solver(vjp, u0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **options)
        LAST_BACKWARD_INFO.clear()
        LAST_BACKWARD_INFO.update(nstep=info.nstep, rel_lowest=info.rel_lowest, abs_lowest=info.abs_lowest)
        return u

    z_leaf = z_star.detach().requires_grad_()
    fz = f(z_leaf)
    if not torch.is_grad_enabled() or not fz.requires_grad:
        return fz
    return _ImplicitGradient.apply(fz, z_leaf, fz, backward_solve)
