"""The thin attack base: threat model, projection, seeding and the ``get_logits`` override point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

NORMS = ("Linf", "L2")


@dataclass(frozen=True)
class ThreatModel:
    """``norm`` ("Linf" or "L2") and radius ``eps``; inputs live in [0, 1]."""

    norm: str = "Linf"
    eps: float = 8 / 255

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; valid: {', '.join(NORMS)}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")


def project(x_adv: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    """Project onto the ε-ball around ``x`` intersected with [0, 1]; non-finite coordinates of
    ``x_adv`` (an attack fed NaN gradients) fall back to ``x``, so the result is always in the ball.

    Example:
        >>> import torch
        >>> x = torch.full((1, 4), 0.5)
        >>> project(torch.tensor([[0.0, 0.49, 0.9, 2.0]]), x, ThreatModel("Linf", 0.1)).tolist()
        [[0.4000000059604645, 0.49000000953674316, 0.6000000238418579, 0.6000000238418579]]
    """
    delta = torch.nan_to_num(x_adv - x, nan=0.0, posinf=0.0, neginf=0.0)
    if threat.norm == "Linf":
        delta = delta.clamp(-threat.eps, threat.eps)
    else:
        norms = torch.linalg.vector_norm(delta.reshape(delta.shape[0], -1), dim=1).clamp_min(1e-12)
        factor = torch.clamp(threat.eps / norms, max=1.0).view(-1, *([1] * (delta.dim() - 1)))
        delta = delta * factor
    return (x + delta).clamp(0.0, 1.0)


def distance(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    """Per-example distance in the threat model's norm."""
    diff = (x_adv - x).reshape(x.shape[0], -1)
    return diff.abs().amax(dim=1) if norm == "Linf" else torch.linalg.vector_norm(diff, dim=1)


class Attack:
    """Base class. Subclasses implement :meth:`perturb`; calling the attack projects its result.

    Args:
        model: any callable ``x -> logits`` (an ``nn.Module`` in eval mode, or an attackable DEQ).
        threat: the :class:`ThreatModel`.
        seed: seeds all randomness of one call (same seed, same points).
    """

    name = "attack"

    def __init__(self, model: Callable[[Tensor], Tensor], threat: ThreatModel, seed: int = 0) -> None:
        self.model = model
        self.threat = threat
        self.seed = int(seed)
        self.grad_stats: dict[str, int] = {}
        self._reset_grad_stats()

    def get_logits(self, x: Tensor) -> Tensor:
        """The single override point for how logits are obtained."""
        return self.model(x)

    def watched_logits(self, x: Tensor) -> Tensor:
        """:meth:`get_logits`, recording in ``grad_stats`` every input gradient later taken through it.

        Handed to third-party attack code (pyautoattack) so that its gradients face the same
        zero/non-finite diagnostics as ours."""
        if x.requires_grad and torch.is_grad_enabled() and not getattr(x, "_deqrobust_watched", False):
            setattr(x, "_deqrobust_watched", True)  # one hook per tensor, however often it is evaluated
            x.register_hook(self._record)
        return self.get_logits(x)

    def _reset_grad_stats(self) -> None:
        self.grad_stats = {"computed": 0, "zero": 0, "nonfinite": 0}

    def _record(self, grad: Tensor) -> None:
        """Count per-example gradients, and those all-zero or non-finite (obfuscation diagnostics)."""
        flat = grad.detach().reshape(grad.shape[0], -1)
        finite = torch.isfinite(flat).all(dim=1)
        self.grad_stats["computed"] += int(flat.shape[0])
        self.grad_stats["nonfinite"] += int((~finite).sum())
        self.grad_stats["zero"] += int((finite & (flat.abs().amax(dim=1) == 0)).sum())

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y disagree on the batch size: {x.shape[0]} vs {y.shape[0]}")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError("attack inputs must lie in [0, 1]")
        self._reset_grad_stats()  # per call: the statistics describe this call's gradients only
        if x.shape[0] == 0:
            return x.clone()
        x_adv = self.perturb(x.detach(), y.detach())
        return project(x_adv.detach().to(x.dtype), x.detach(), self.threat)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm={self.threat.norm}, eps={self.threat.eps:.5g}, seed={self.seed})"
