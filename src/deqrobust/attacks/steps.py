"""The pieces every projected-gradient loop shares (the evaluation's PGD and training's inner attacks).

One random start, one ascent step and one "is this prediction wrong" — written once so the two
loops cannot drift apart (docs/method.md §11).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import ThreatModel, project

__all__ = ["ascent_step", "example_noise", "misclassified", "random_start", "start_noise"]


def start_noise(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Uniform noise in [-1, 1] of ``x``'s shape, from ``generator`` (default: the global torch RNG)."""
    return torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) * 2 - 1


def example_noise(x: Tensor, seeds: Tensor, draw: int = 0) -> Tensor:
    """Uniform noise in [-1, 1] of ``x``'s shape, row i from its own stream ``seeds[i]`` (``draw``:
    which draw of that stream, e.g. the restart). A row depends on its seed only, not on which
    other examples share the batch, so two runs over different sets of examples start an example
    from the same point.

    Example:
        >>> x = torch.zeros(3, 2)
        >>> torch.equal(example_noise(x, torch.tensor([5, 6, 7]))[1:], example_noise(x[:2], torch.tensor([6, 7])))
        True
    """
    generator = torch.Generator()
    rows = []
    for seed in seeds.tolist():
        generator.manual_seed(int(seed) * 1000 + draw)
        rows.append(torch.rand(x.shape[1:], generator=generator, dtype=x.dtype))
    noise = torch.stack(rows) if rows else torch.empty(x.shape, dtype=x.dtype)
    return (noise * 2 - 1).to(x.device)


def random_start(x: Tensor, threat: ThreatModel, noise: Optional[Tensor] = None) -> Tensor:
    """A random point of the ε-ball around ``x``, clamped to [0, 1].

    ``noise`` in [-1, 1] of ``x``'s shape (default: :func:`start_noise` from the global RNG) gives
    the point: under L∞ it is ``x + ε·noise`` (uniform in the box); under L2 its direction is
    the noise's and its radius ``ε·|noise[0]|`` (uniform in [0, ε]), one rule for every caller.

    Example:
        >>> x = torch.full((2, 1, 3, 3), 0.95)
        >>> x0 = random_start(x, ThreatModel("Linf", 0.1))
        >>> bool(((x0 - x).abs() <= 0.1 + 1e-7).all() and (x0 <= 1).all())
        True
        >>> noise = torch.full((1, 4), -0.5)
        >>> random_start(torch.full((1, 4), 0.5), ThreatModel("L2", 0.2), noise)  # radius 0.1, direction -1
        tensor([[0.4500, 0.4500, 0.4500, 0.4500]])
    """
    step: Tensor = start_noise(x) if noise is None else noise.to(device=x.device, dtype=x.dtype)
    if threat.norm == "L2":
        flat = step.reshape(step.shape[0], -1)
        radius = flat[:, :1].abs()
        step = (flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(1e-12) * radius).view_as(step)
    return project(x + threat.eps * step, x, threat)


def ascent_step(x_adv: Tensor, grad: Tensor, x: Tensor, threat: ThreatModel, alpha: float) -> Tensor:
    """One ascent step of size ``alpha`` (the gradient's sign under L∞, its direction under L2),
    projected onto the ε-ball around ``x`` ∩ [0, 1]. Non-finite gradient entries count as 0.

    Example:
        >>> x = torch.full((1, 2), 0.5)
        >>> ascent_step(x, torch.tensor([[3.0, -float("nan")]]), x, ThreatModel("Linf", 0.1), 0.25)
        tensor([[0.6000, 0.5000]])
    """
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if threat.norm == "Linf":
        step = grad.sign()
    else:
        norms = torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1).clamp_min(1e-12)
        step = grad / norms.view(-1, *([1] * (grad.dim() - 1)))
    return project(x_adv.detach() + alpha * step, x, threat)


def misclassified(logits: Tensor, y: Tensor) -> Tensor:
    """Per example: the prediction is wrong, or a logit is not finite (never counted as correct).

    Example:
        >>> misclassified(torch.tensor([[2.0, 1.0], [0.0, 1.0], [float("nan"), 0.0]]), torch.tensor([0, 0, 1]))
        tensor([False,  True,  True])
    """
    return (logits.argmax(dim=1) != y) | ~torch.isfinite(logits).all(dim=1)
