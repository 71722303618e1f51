"""Square: AutoAttack's score-based black-box attack (no gradients), from ``pyautoattack``.

Square only queries the defended output, so a Square success that the white-box attacks missed
signals gradient masking (a sanity check of the protocol).

Square draws square windows on ``(C, H, W)`` images. Inputs of any other shape (a flat feature
vector, say) are laid out row by row on the smallest square grid that holds them, padded with
zeros; the padding is cut off before the model sees a query, so the attack and its ε-ball are
those of the original input (under L2 the padding takes part of the budget: weaker, still valid).
"""

from __future__ import annotations

import math
from typing import Callable

from torch import Tensor
from torch.nn import functional as F

from .base import Attack, ThreatModel


class Square(Attack):
    """Square attack with ``queries`` model queries per example (AutoAttack standard: 5000)."""

    name = "square"

    def __init__(self, model: Callable[[Tensor], Tensor], threat: ThreatModel, queries: int = 5000,
                 p_init: float = 0.8, restarts: int = 1, seed: int = 0) -> None:
        super().__init__(model, threat, seed)
        self.queries, self.p_init, self.restarts = queries, p_init, restarts

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        if x.dim() == 4:
            return self._square(lambda z: self.get_logits(self.as_input(z)), x, y)
        shape = x.shape[1:]
        d = shape.numel()
        side = max(5, math.isqrt(d - 1) + 1)  # the smallest square grid holding d values (Square needs H >= 5)

        def to_image(z: Tensor) -> Tensor:
            return F.pad(z.reshape(len(z), d), (0, side * side - d)).reshape(len(z), 1, side, side)

        def from_image(z: Tensor) -> Tensor:
            return z.reshape(len(z), side * side)[:, :d].reshape(len(z), *shape)

        return from_image(self._square(lambda z: self.get_logits(self.as_input(from_image(z))), to_image(x), y))

    def _square(self, logits: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        from pyautoattack.square import SquareAttack

        attack = SquareAttack(logits, norm=self.threat.norm, n_queries=self.queries, eps=self.threat.eps,
                              p_init=self.p_init, n_restarts=self.restarts, seed=self.seed, device=x.device,
                              resc_schedule=self.queries < 5000)
        return attack.perturb(x, y)
