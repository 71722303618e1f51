"""APGD (AutoAttack's step-size-free PGD) on the CE or DLR loss, from ``pyautoattack``."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .base import Attack, ThreatModel


class APGD(Attack):
    """APGD-CE (``loss="ce"``) or APGD-DLR (``loss="dlr"``), untargeted.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> x = torch.rand(4, 1, 2, 2); y = torch.randint(0, 3, (4,))
        >>> bool(((APGD(model, ThreatModel("Linf", 0.1), steps=5)(x, y) - x).abs() <= 0.1 + 1e-6).all())
        True
    """

    name = "apgd-ce"

    def __init__(self, model: Callable[[Tensor], Tensor], threat: ThreatModel, steps: int = 100,
                 restarts: int = 1, loss: str = "ce", seed: int = 0) -> None:
        super().__init__(model, threat, seed)
        if loss not in ("ce", "dlr"):
            raise ValueError(f"unknown APGD loss {loss!r}; valid: ce, dlr")
        self.steps, self.restarts, self.loss = steps, restarts, loss
        self.name = f"apgd-{loss}"

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        from pyautoattack.autopgd_base import APGDAttack

        attack = APGDAttack(self.watched_logits, n_iter=self.steps, norm=self.threat.norm, n_restarts=self.restarts,
                            eps=self.threat.eps, seed=self.seed, loss=self.loss, device=x.device)
        return attack.perturb(x, y)
