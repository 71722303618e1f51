"""Unrolling-based phantom gradient: k damped steps from the detached fixed point, with graph."""

from __future__ import annotations

from typing import Callable

from torch import Tensor


def phantom_output(
    f: Callable[[Tensor], Tensor],
    z_star: Tensor,
    steps: int = 5,
    damping: float = 0.5,
    undamped_first: bool = False,
) -> Tensor:
    """``ẑ_0 = z*`` (detached), optionally ``ẑ ← f(ẑ)`` once, then ``ẑ_t = (1-λ) ẑ_{t-1} + λ f(ẑ_{t-1})``.

    Autograd through the returned ``ẑ_k`` is the phantom gradient (docs/method.md §3).

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0]], requires_grad=True)
        >>> out = phantom_output(lambda z: 0.5 * z + x, torch.tensor([[2.0]]), steps=2, damping=1.0)
        >>> out.backward(); x.grad.item()   # 1 + 0.5 over two undamped steps
        1.5
    """
    if steps < 0:
        raise ValueError(f"phantom steps must be >= 0, got {steps}")
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"phantom damping must be in (0, 1], got {damping}")
    z = z_star.detach()
    if undamped_first:
        z = f(z)
    for _ in range(steps):
        z = (1.0 - damping) * z + damping * f(z) if damping < 1.0 else f(z)
    return z
