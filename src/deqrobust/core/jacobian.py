"""Hutchinson estimate of ``||J_f(z*)||_F² / D`` for Jacobian regularisation (as in MDEQ)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


def jacobian_frobenius_loss(
    f: Callable[[Tensor], Tensor], z_star: Tensor, generator: Optional[torch.Generator] = None
) -> Tensor:
    """One-sample Hutchinson estimate ``||vᵀ J_f||² / (B·D)`` with ``v ~ N(0, I)``, differentiable in θ.

    Example:
        >>> import torch
        >>> w = torch.eye(4) * 0.5
        >>> loss = jacobian_frobenius_loss(lambda z: z @ w, torch.randn(1000, 4))
        >>> abs(loss.item() - 0.25) < 0.02    # ||0.5 I||_F² / 4
        True
    """
    z = z_star.detach().requires_grad_()
    with torch.enable_grad():
        fz = f(z)
        v = torch.randn(fz.shape, generator=generator, dtype=fz.dtype, device=fz.device)
        (vjp,) = torch.autograd.grad(fz, z, v, create_graph=True)
    return vjp.pow(2).sum() / vjp.numel()
