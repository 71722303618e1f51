"""What an estimator differentiates at a state: an attack's loss, or a cotangent on the logits.

* :class:`LossObjective` — the paper-exact variant: ``L(h(z_n), y)`` is evaluated at every state.
* :class:`CotangentObjective` — the generic variant for off-the-shelf attacks: the attack's
  cotangent ``c = ∂L/∂logits`` (taken at the defended logits) is pulled back through ``h`` at
  every state, ``<c, h(z_n)>``. Linear in ``c``, so any attack's loss works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor


class Objective(Protocol):
    def __call__(self, logits: Tensor) -> Tensor:
        """A scalar whose gradient w.r.t. the logits is the attack's per-sample cotangent."""


@dataclass
class CotangentObjective:
    cotangent: Tensor

    def __call__(self, logits: Tensor) -> Tensor:
        return (logits * self.cotangent).sum()


@dataclass
class LossObjective:
    """``loss_fn(logits, y)`` returning per-sample losses (e.g. ``cross_entropy(..., reduction="none")``)."""

    loss_fn: Callable[[Tensor, Tensor], Tensor]
    labels: Tensor

    def __call__(self, logits: Tensor) -> Tensor:
        return self.loss_fn(logits, self.labels).sum()


def cross_entropy_objective(labels: Tensor) -> LossObjective:
    """The paper's attack loss: per-sample cross-entropy at each state."""
    return LossObjective(lambda logits, y: torch.nn.functional.cross_entropy(logits, y, reduction="none"), labels)
