"""Square: AutoAttack's score-based black-box attack (no gradients), from ``pyautoattack``.

Square only queries the defended output, so a Square success that the white-box attacks missed
signals gradient masking (a sanity check of the protocol).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .base import Attack, ThreatModel


class Square(Attack):
    """Square attack with ``queries`` model queries per example (AutoAttack standard: 5000)."""

    name = "square"

    def __init__(self, model: Callable[[Tensor], Tensor], threat: ThreatModel, queries: int = 5000,
                 p_init: float = 0.8, restarts: int = 1, seed: int = 0) -> None:
        super().__init__(model, threat, seed)
        self.queries, self.p_init, self.restarts = queries, p_init, restarts

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        from pyautoattack.square import SquareAttack

        attack = SquareAttack(self.get_logits, norm=self.threat.norm, n_queries=self.queries, eps=self.threat.eps,
                              p_init=self.p_init, n_restarts=self.restarts, seed=self.seed, device=x.device,
                              resc_schedule=self.queries < 5000)
        return attack.perturb(x, y)
