"""Training objectives (docs/method.md §11): the inner attacks of PGD-AT and TRADES, and their outer losses.

The inner attacks are the package's one :class:`~deqrobust.attacks.PGD` with no early stop: the
model is put in eval mode while crafting (its own gradient mode, exact or phantom, gives the input
gradient) and back in its previous mode afterwards; only ``autograd.grad`` with respect to the input
is used, so parameter gradients and DDP's gradient synchronisation are never touched. Pass the
unwrapped module, not a DDP wrapper. Imports torch, :mod:`deqrobust.attacks` and :mod:`deqrobust.utils`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks.base import ThreatModel, project
from ..attacks.pgd import PGD
from ..attacks.steps import ascent_step, random_start
from ..utils.modes import evaluation_mode

__all__ = [
    "pgd_at_loss",
    "pgd_craft",
    "random_start",
    "sign_step",
    "trades_craft",
    "trades_loss",
]

sign_step = ascent_step  # the one ascent step (kept under its training name)


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
    """PGD-AT's inner attack: :class:`~deqrobust.attacks.PGD` on the summed cross-entropy, every
    step on every example, from ``start`` (default: a random start from the global RNG), ``steps``
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
    begin = True if start is None else (lambda _: start.detach())
    attack = PGD(model, threat, steps=steps, alpha=alpha, random_start=begin, seed=None, early_stop=False,
                 track=track)
    with evaluation_mode(model, warn=False):
        x_adv = attack.perturb(x, y.detach())
    return x_adv, attack.fooled


def _kl_sum(logits: Tensor, p_clean: Tensor) -> Tensor:
    return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")


def trades_craft(
    model: nn.Module, x: Tensor, threat: ThreatModel, alpha: float, steps: int, init_std: float = 0.001
) -> Tensor:
    """TRADES' inner maximisation of ``KL(p(x) || p(x_adv))`` from ``x + init_std·N(0, 1)``:
    :class:`~deqrobust.attacks.PGD` with the KL loss, model in eval mode.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x = torch.rand(5, 1, 2, 2)
        >>> x_adv = trades_craft(model, x, ThreatModel("Linf", 0.1), 0.025, 3)
        >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all())
        True
    """
    x = x.detach()
    with evaluation_mode(model, warn=False):
        with torch.no_grad():
            p_clean = F.softmax(model(x).float(), dim=1)
        attack = PGD(model, threat, steps=steps, alpha=alpha, seed=None, loss=_kl_sum, early_stop=False,
                     random_start=lambda x0: project(x0 + init_std * torch.randn_like(x0), x0, threat))
        return attack.perturb(x, p_clean)


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
