"""Training objectives (docs/method.md §11): the inner attacks of PGD-AT and TRADES, and their outer losses.

The inner attacks are tight loops with no early stop: the model is put in eval mode while crafting
(its own gradient mode, exact or phantom, gives the input gradient) and back in its previous mode
afterwards; only ``autograd.grad`` with respect to the input is used, so parameter gradients and
DDP's gradient synchronisation are never touched. Pass the unwrapped module, not a DDP wrapper.
Imports torch and :mod:`deqrobust.attacks` only.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks.base import ThreatModel, project

__all__ = [
    "eval_mode",
    "pgd_at_loss",
    "pgd_craft",
    "random_start",
    "sign_step",
    "trades_craft",
    "trades_loss",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def random_start(x: Tensor, threat: ThreatModel, noise: Optional[Tensor] = None) -> Tensor:
    """A uniform random point of the ε-ball around ``x``, clamped to [0, 1] (docs/method.md §11).

    ``noise`` in [-1, 1] of ``x``'s shape may be given (for per-example seeding); otherwise it is
    drawn from the global torch RNG. For L2 the noise direction is normalised and scaled by a
    uniform radius taken from its first entry's magnitude.

    Example:
        >>> x = torch.full((2, 1, 3, 3), 0.95)
        >>> x0 = random_start(x, ThreatModel("Linf", 0.1))
        >>> bool(((x0 - x).abs() <= 0.1 + 1e-7).all() and (x0 <= 1).all())
        True
    """
    if noise is None:
        noise = torch.rand_like(x) * 2 - 1
    noise = noise.to(device=x.device, dtype=x.dtype)
    if threat.norm == "L2":
        flat = noise.reshape(noise.shape[0], -1)
        radius = flat[:, :1].abs()
        flat = flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(1e-12) * radius
        noise = flat.view_as(noise)
    return project(x + threat.eps * noise, x, threat)


def sign_step(x_adv: Tensor, grad: Tensor, x: Tensor, threat: ThreatModel, alpha: float) -> Tensor:
    """One ascent step (sign of the gradient for L∞, normalised gradient for L2), then projection
    onto the ε-ball ∩ [0, 1]. Non-finite gradient entries count as 0."""
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if threat.norm == "Linf":
        step = grad.sign()
    else:
        norms = torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1).clamp_min(1e-12)
        step = grad / norms.view(-1, *([1] * (grad.dim() - 1)))
    return project(x_adv.detach() + alpha * step, x, threat)


def _input_grad(model: nn.Module, x_adv: Tensor, target: Tensor, loss_fn: LossFn) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        xg = x_adv.detach().requires_grad_(True)
        logits = model(xg)
        loss = loss_fn(logits.float(), target)
        (grad,) = torch.autograd.grad(loss, xg)
    return logits.detach(), grad


def _ce_sum(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def pgd_craft(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    alpha: float,
    steps: int,
    *,
    start: Optional[Tensor] = None,
    track: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """PGD on the summed cross-entropy from ``start`` (default: :func:`random_start`), ``steps``
    steps of size ``alpha``, model in eval mode.

    Returns ``(x_adv, fooled)``: ``fooled`` (only when ``track``) flags examples misclassified (or
    with non-finite logits) at any iterate, including the final one.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x, y = torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,))
        >>> x_adv, fooled = pgd_craft(model, x, y, ThreatModel("Linf", 0.1), 0.025, 3, track=True)
        >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all()), fooled.shape
        (True, torch.Size([5]))
    """
    x = x.detach()
    x_adv = random_start(x, threat) if start is None else start.detach()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device) if track else None
    with eval_mode(model):
        for _ in range(steps):
            logits, grad = _input_grad(model, x_adv, y, _ce_sum)
            if fooled is not None:
                fooled |= (logits.argmax(dim=1) != y) | ~torch.isfinite(logits).all(dim=1)
            x_adv = sign_step(x_adv, grad, x, threat, alpha)
        if fooled is not None:
            with torch.no_grad():
                logits = model(x_adv)
            fooled |= (logits.argmax(dim=1) != y) | ~torch.isfinite(logits).all(dim=1)
    return x_adv.detach(), fooled


def trades_craft(
    model: nn.Module, x: Tensor, threat: ThreatModel, alpha: float, steps: int, init_std: float = 0.001
) -> Tensor:
    """TRADES' inner maximisation of ``KL(p(x) || p(x_adv))`` from ``x + init_std·N(0, 1)``, eval mode.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x = torch.rand(5, 1, 2, 2)
        >>> x_adv = trades_craft(model, x, ThreatModel("Linf", 0.1), 0.025, 3)
        >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all())
        True
    """
    x = x.detach()
    with eval_mode(model):
        with torch.no_grad():
            p_clean = F.softmax(model(x).float(), dim=1)

        def kl_sum(logits: Tensor, target: Tensor) -> Tensor:
            return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum")

        x_adv = project(x + init_std * torch.randn_like(x), x, threat)
        for _ in range(steps):
            _, grad = _input_grad(model, x_adv, p_clean, kl_sum)
            x_adv = sign_step(x_adv, grad, x, threat, alpha)
    return x_adv.detach()


def pgd_at_loss(
    logits_adv: Tensor, y: Tensor, logits_clean: Optional[Tensor] = None, clean_weight: float = 0.0
) -> Tensor:
    """``(1 - w)·CE(logits_adv, y) + w·CE(logits_clean, y)`` (mean over the batch).

    Example:
        >>> logits = torch.zeros(4, 10); y = torch.arange(4)
        >>> round(pgd_at_loss(logits, y).item(), 4)   # log 10
        2.3026
    """
    loss = F.cross_entropy(logits_adv.float(), y)
    if logits_clean is not None and clean_weight > 0:
        loss = (1.0 - clean_weight) * loss + clean_weight * F.cross_entropy(logits_clean.float(), y)
    return loss


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES: ``CE(logits_clean, y) + β·KL(p_clean || p_adv)`` (KL summed over classes, mean over batch).

    Example:
        >>> logits = torch.randn(4, 10); y = torch.arange(4)
        >>> bool(torch.isclose(trades_loss(logits, logits, y, 6.0), F.cross_entropy(logits, y)))
        True
    """
    clean, adv = logits_clean.float(), logits_adv.float()
    kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
    return F.cross_entropy(clean, y) + beta * kl
