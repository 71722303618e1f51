"""Projected gradient descent with random start, restarts and per-example early stop (Madry et al.).

The one PGD of the package: the evaluation's PGD-10 and training's inner attacks (PGD-AT, TRADES)
are this class with different settings; its pieces are :mod:`deqrobust.attacks.steps`.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Attack, ThreatModel
from .steps import ascent_step, example_noise, misclassified, random_start, start_noise

GradFn = Callable[[Tensor, Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
StartFn = Callable[[Tensor], Tensor]


def cross_entropy_sum(logits: Tensor, y: Tensor) -> Tensor:
    """The summed cross-entropy (so each example's input gradient is its own loss's)."""
    return F.cross_entropy(logits, y, reduction="sum")


def confident_cross_entropy_sum(logits: Tensor, y: Tensor) -> Tensor:
    """The summed cross-entropy minus the prediction entropy: adversarial points that arrive
    confident, so a test-time defense lowering the entropy has less to move (Croce et al., ICML 2022)."""
    log_p = F.log_softmax(logits, dim=1)
    return F.nll_loss(log_p, y, reduction="sum") + (log_p.exp() * log_p).sum()


class PGD(Attack):
    """PGD on a loss of the logits (default: the summed cross-entropy).

    Args:
        model, threat: see :class:`~deqrobust.attacks.base.Attack`.
        steps: iterations per restart. alpha: step size (default ε/4: 2/255 for ε = 8/255).
        restarts: random restarts; an example broken by one restart is not attacked again.
        random_start: ``True`` for a uniform start in the ε-ball (:func:`~deqrobust.attacks.steps.random_start`),
            ``False`` to start at ``x``, or a function ``x -> x0``.
        seed: seeds the random starts of one call; ``None`` draws them from the global torch RNG
            (training, where the run's RNG stream is checkpointed).
        grad_fn: optional ``(x, y) -> ∂loss/∂x`` replacing autograd through ``get_logits``
            (e.g. the paper-exact simultaneous adjoint); success is still judged on ``get_logits``.
        loss: ``(logits, target) -> summed loss``; ``target`` is what the call's ``y`` holds (labels,
            or TRADES' clean probabilities).
        early_stop: keep the first misclassified iterate of each example and stop attacking it.
            ``False`` runs every step on every example (``y`` need not be labels then).
        track: with ``early_stop=False``, flag the examples misclassified at any iterate.
        example_seeds: one seed per example of the call: example i starts from its own stream
            (:func:`~deqrobust.attacks.steps.example_noise`, restart r its r-th draw), so its
            trajectory does not depend on the other examples attacked with it.

    The judgement "is this iterate adversarial" is one method, :meth:`judge` (the override point
    of :class:`~deqrobust.attacks.shared_pgd.SharedPGD`).

    After a call, ``grad_stats`` holds how many gradients were computed and how many were
    all-zero or non-finite (obfuscation diagnostics), and ``fooled`` which examples were
    misclassified at some iterate (``None`` when neither ``early_stop`` nor ``track``).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> attack = PGD(model, ThreatModel("Linf", 0.1), steps=5)
        >>> x = torch.rand(8, 1, 2, 2); y = torch.randint(0, 3, (8,))
        >>> bool(((attack(x, y) - x).abs() <= 0.1 + 1e-6).all())
        True
    """

    name = "pgd"

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        threat: ThreatModel,
        steps: int = 10,
        alpha: Optional[float] = None,
        restarts: int = 1,
        random_start: Union[bool, StartFn] = True,
        seed: Optional[int] = 0,
        grad_fn: Optional[GradFn] = None,
        loss: LossFn = cross_entropy_sum,
        early_stop: bool = True,
        track: bool = False,
        example_seeds: Optional[Tensor] = None,
    ) -> None:
        super().__init__(model, threat, 0 if seed is None else seed)
        if steps < 1 or restarts < 1:
            raise ValueError(f"PGD needs steps >= 1 and restarts >= 1 (got {steps}, {restarts})")
        if restarts > 1 and not early_stop:
            raise ValueError("PGD restarts need early_stop (a restart attacks only the examples not yet broken)")
        self.steps, self.restarts, self.random_start = steps, restarts, random_start
        self.alpha = threat.eps / 4 if alpha is None else float(alpha)
        self.grad_fn, self.loss, self.early_stop, self.track = grad_fn, loss, early_stop, track
        self.global_rng = seed is None
        self.example_seeds = example_seeds
        self.fooled: Optional[Tensor] = None

    def _loss_grad(self, x: Tensor, y: Tensor) -> tuple[Optional[Tensor], Tensor]:
        """(logits, gradient of the summed loss) at ``x``; with ``grad_fn`` the logits are left
        to :meth:`judge` (``None``)."""
        if self.grad_fn is not None:
            return None, self.grad_fn(x, y)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self.get_logits(xg)
            (grad,) = torch.autograd.grad(self.loss(logits.float(), y), xg)
        return logits.detach(), grad

    def judge(self, x_adv: Tensor, logits: Optional[Tensor], y: Tensor, idx: Tensor) -> Tensor:
        """Which iterates ``x_adv`` (the call's examples ``idx``) are adversarial: misclassified
        by the model (``logits`` at ``x_adv`` when already computed)."""
        if logits is None:
            with torch.no_grad():
                logits = self.get_logits(x_adv)
        return misclassified(logits, y)

    def _start(self, x0: Tensor, generator: Optional[torch.Generator], idx: Optional[Tensor] = None,
               restart: int = 0) -> Tensor:
        """The start of restart ``restart`` for the call's examples ``idx`` (default: all)."""
        if callable(self.random_start):
            return self.random_start(x0).detach()
        if self.random_start:
            rows = torch.arange(x0.shape[0]) if idx is None else idx.cpu()
            noise = (example_noise(x0, self.example_seeds[rows], restart) if self.example_seeds is not None
                     else start_noise(x0, generator))
            return random_start(x0, self.threat, noise)
        return x0.clone()

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        generator = None if self.global_rng else torch.Generator(device=x.device).manual_seed(self.seed)
        if not self.early_stop:
            return self._all_steps(x, y, generator)
        best = x.clone()
        broken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for restart in range(self.restarts):
            idx = (~broken).nonzero().flatten()
            if idx.numel() == 0:
                break
            x0, y0 = x[idx], y[idx]
            x_adv = self._start(x0, generator, idx, restart)
            for _ in range(self.steps):
                logits, grad = self._loss_grad(x_adv, y0)
                self._record(grad)
                hit = self.judge(x_adv, logits, y0, idx)
                if bool(hit.any()):  # keep the first adversarial point and stop attacking it
                    best[idx[hit]] = x_adv[hit]
                    broken[idx[hit]] = True
                    keep = ~hit
                    idx, x0, y0, x_adv, grad = idx[keep], x0[keep], y0[keep], x_adv[keep], grad[keep]
                    if idx.numel() == 0:
                        break
                x_adv = ascent_step(x_adv, grad, x0, self.threat, self.alpha)
            if idx.numel():
                hit = self.judge(x_adv, None, y0, idx)
                best[idx[hit]] = x_adv[hit]
                broken[idx[hit]] = True
                best[idx[~hit]] = x_adv[~hit]  # unbroken examples keep their last iterate (in the ball)
        self.fooled = broken
        return best

    def _all_steps(self, x: Tensor, y: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """Every step on every example (training's inner attack); ``fooled`` tracked when asked."""
        x_adv = self._start(x, generator)
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device) if self.track else None
        everyone = torch.arange(x.shape[0], device=x.device)
        for _ in range(self.steps):
            logits, grad = self._loss_grad(x_adv, y)
            self._record(grad)
            if fooled is not None:
                fooled |= self.judge(x_adv, logits, y, everyone)
            x_adv = ascent_step(x_adv, grad, x, self.threat, self.alpha)
        if fooled is not None:
            fooled |= self.judge(x_adv, None, y, everyone)
        self.fooled = fooled
        return x_adv.detach()
