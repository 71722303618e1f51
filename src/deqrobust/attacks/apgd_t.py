"""APGD-T: AutoAttack's targeted APGD on the DLR loss over the top competing classes."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .base import Attack, ThreatModel


class APGDT(Attack):
    """Targeted APGD-DLR against ``n_targets`` classes (AutoAttack standard: 9).

    The target count is capped at ``num_classes - 1`` (known after the first call).
    """

    name = "apgd-t"

    def __init__(self, model: Callable[[Tensor], Tensor], threat: ThreatModel, steps: int = 100,
                 n_targets: int = 9, restarts: int = 1, seed: int = 0) -> None:
        super().__init__(model, threat, seed)
        self.steps, self.n_targets, self.restarts = steps, n_targets, restarts

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        from pyautoattack.autopgd_base import APGDAttack_targeted

        n_classes = self.get_logits(x[:1]).shape[1]
        if n_classes < 4:
            raise ValueError(f"APGD-T's targeted DLR loss needs at least 4 classes, the model has {n_classes}")
        attack = APGDAttack_targeted(self.watched_logits, n_iter=self.steps, norm=self.threat.norm,
                                     n_restarts=self.restarts, eps=self.threat.eps, seed=self.seed,
                                     n_target_classes=min(self.n_targets, n_classes - 1), device=x.device)
        return attack.perturb(x, y)
