"""FAB-T: AutoAttack's targeted minimum-norm FAB attack (per-class gradients), from ``pyautoattack``."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .base import Attack, ThreatModel


class FABT(Attack):
    """Targeted FAB against ``n_targets`` classes (AutoAttack standard: 9, 100 iterations).

    ``targeted=False`` gives untargeted FAB (AutoAttack plus), which asks for one gradient per class.
    """

    name = "fab-t"

    def __init__(self, model: Callable[[Tensor], Tensor], threat: ThreatModel, steps: int = 100,
                 n_targets: int = 9, restarts: int = 1, targeted: bool = True, seed: int = 0) -> None:
        super().__init__(model, threat, seed)
        self.steps, self.n_targets, self.restarts, self.targeted = steps, n_targets, restarts, targeted
        self.name = "fab-t" if targeted else "fab"

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        from pyautoattack.fab_pt import FABAttack_PT

        n_classes = self.get_logits(x[:1]).shape[1]
        attack = FABAttack_PT(self.watched_logits, norm=self.threat.norm, n_restarts=self.restarts, n_iter=self.steps,
                              eps=self.threat.eps, seed=self.seed, targeted=self.targeted, device=x.device,
                              n_target_classes=min(self.n_targets, n_classes - 1))
        return attack.perturb(x, y)
