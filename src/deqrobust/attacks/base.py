"""The thin attack base: threat model, projection, seeding and the ``get_logits`` override point."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DEQInputError
from ..utils.modes import evaluation_mode
from ..validate import check_examples, check_labels_in_range, parse_eps

NORMS = ("Linf", "L2")


@dataclass(frozen=True)
class ThreatModel:
    """``norm`` ("Linf" or "L2") and radius ``eps`` (a number or a fraction such as ``"8/255"``);
    inputs live in [0, 1], so an L-inf radius above 1 is an error.

    Example:
        >>> ThreatModel("Linf", "8/255").eps == 8 / 255
        True
        >>> ThreatModel("Linf", 8)
        Traceback (most recent call last):
        ...
        deqrobust.errors.ConfigError: Linf eps 8 exceeds 1, the whole [0, 1] input range; did you mean 8/255?
    """

    norm: str = "Linf"
    eps: float = 8 / 255

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; valid: {', '.join(NORMS)}")
        eps = parse_eps(self.eps)
        if self.norm == "Linf" and eps > 1:
            hint = f"; did you mean {eps:g}/255?" if eps <= 255 and not (isinstance(self.eps, str) and "/" in self.eps) else ""
            raise ConfigError(f"Linf eps {self.eps!r} exceeds 1, the whole [0, 1] input range{hint}")
        object.__setattr__(self, "eps", eps)


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
    # The label-range probe (one forward on one example) of every call; a caller that checked its
    # labels against the model once (the evaluation's runner and price) turns it off for its attacks.
    check_labels = True

    def __init__(self, model: Callable[[Tensor], Tensor], threat: ThreatModel, seed: int = 0) -> None:
        self.model = model
        self.threat = threat
        self.seed = int(seed)
        self.grad_stats: dict[str, int] = {}
        self.input_dtype: Optional[torch.dtype] = None  # the dtype of the call's inputs (see as_input)
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
        return self.get_logits(self.as_input(x))

    def as_input(self, x: Tensor) -> Tensor:
        """``x`` in the dtype of the call's inputs: third-party attack code (pyautoattack) casts its
        iterates to float32, and a float64 model must still get float64 inputs."""
        dtype = self.input_dtype
        return x if dtype is None or x.dtype == dtype else x.to(dtype)

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
        """The attack's points for ``(x, y)``, projected onto the ε-ball ∩ [0, 1].

        The examples are checked first (:mod:`deqrobust.validate`): finite inputs in [0, 1], and
        int64 labels within the model's classes (one forward on one example tells how many). A
        model in train mode is attacked in eval mode, with one warning per call."""
        if (not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() < 1 or y.dim() < 1
                or x.shape[0] != y.shape[0]):
            sizes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (x, y)]
            raise DEQInputError(f"x and y must be tensors with one row per example; got {sizes[0]} and {sizes[1]}")
        labels = not y.is_floating_point()  # TRADES' inner attack passes the clean probabilities instead
        check_examples(x, y if labels else None, "attack")
        self._reset_grad_stats()  # per call: the statistics describe this call's gradients only
        self.input_dtype = x.dtype
        if x.shape[0] == 0:
            return x.clone()
        module = self.model if isinstance(self.model, nn.Module) else None
        with evaluation_mode(module) if module is not None else contextlib.nullcontext():
            if labels and self.check_labels:
                with torch.no_grad():
                    check_labels_in_range(y, int(self.get_logits(x[:1].detach()).shape[-1]), "attack")
            x_adv = self.perturb(x.detach(), y.detach())
        return project(x_adv.detach().to(x.dtype), x.detach(), self.threat)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm={self.threat.norm}, eps={self.threat.eps:.5g}, seed={self.seed})"
