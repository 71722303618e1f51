"""One PGD trajectory judged on several outputs at once.

When the attack's gradient does not depend on the output being judged — a ``grad_fn`` such as
the paper-exact surrogate gradient of an intermediate state, which never reads the defense —
PGD against defense A and PGD against defense B follow the same iterates from the same start; they
differ only in which iterate each keeps (the first one its own output misclassifies). So one
trajectory serves every defense: each iterate is judged by every output (for a DEQ, all of them
from one solve), an example keeps being attacked while one defense still stands, and each defense
gets what PGD against it alone would have found — with per-example start seeds
(``example_seeds``), example for example.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .base import ThreatModel
from .pgd import PGD, GradFn
from .steps import misclassified

Judges = Callable[[Tensor], Sequence[Tensor]]


class SharedPGD(PGD):
    """PGD with a judge-independent ``grad_fn``, judged by several outputs.

    Args:
        judges: ``x -> [logits under output j]`` for every output j.
        wanted: ``(batch, J)`` booleans: which examples each output is attacked on.
        grad_fn: the gradient (required: with autograd through one output the trajectory would
            depend on that output).
        Other arguments: see :class:`~deqrobust.attacks.pgd.PGD`.

    After a call, ``broken[i, j]`` says whether output j misclassified an iterate of example i
    (only where ``wanted``), ``nonfinite[i, j]`` whether those logits were not finite; with
    ``keep_points``, ``points[i, j]`` is that iterate (the input where output j was not broken).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(4, 3)
        >>> grad = lambda x, y: torch.autograd.functional.vjp(lambda v: torch.nn.functional.cross_entropy(
        ...     lin(v), y, reduction="sum"), x)[1]
        >>> x, y = torch.rand(6, 4), torch.randint(0, 3, (6,))
        >>> seeds = torch.arange(6)
        >>> shared = SharedPGD(lambda v: [lin(v), 2 * lin(v) + 1], torch.ones(6, 2, dtype=torch.bool),
        ...                    ThreatModel("Linf", 0.3), grad_fn=grad, example_seeds=seeds)
        >>> _ = shared(x, y)
        >>> alone = PGD(lambda v: 2 * lin(v) + 1, ThreatModel("Linf", 0.3), grad_fn=grad, example_seeds=seeds)
        >>> _ = alone(x, y)
        >>> torch.equal(shared.broken[:, 1], alone.fooled)
        True
    """

    name = "pgd"

    def __init__(
        self,
        judges: Judges,
        wanted: Tensor,
        threat: ThreatModel,
        steps: int = 10,
        alpha: Optional[float] = None,
        restarts: int = 1,
        seed: int = 0,
        grad_fn: Optional[GradFn] = None,
        example_seeds: Optional[Tensor] = None,
        keep_points: bool = False,
    ) -> None:
        if grad_fn is None:
            raise ValueError("SharedPGD needs a grad_fn that does not depend on the output judged")
        super().__init__(lambda x: judges(x)[0], threat, steps=steps, alpha=alpha, restarts=restarts, seed=seed,
                         grad_fn=grad_fn, example_seeds=example_seeds)
        self.judges = judges
        self.wanted = wanted.to(torch.bool)
        self.broken = torch.zeros_like(self.wanted)
        self.nonfinite = torch.zeros_like(self.wanted)
        self.keep_points = keep_points
        self.points: Optional[Tensor] = None  # with keep_points: (batch, J, ...) the iterate that broke each

    def judge(self, x_adv: Tensor, logits: Optional[Tensor], y: Tensor, idx: Tensor) -> Tensor:
        """Record, per output, the examples this iterate breaks first; an example is done when
        every output that wants it has been broken."""
        with torch.no_grad():
            outputs = self.judges(x_adv)
        rows = idx.to(self.wanted.device)
        for j, out in enumerate(outputs):
            new = (self.wanted[rows, j] & ~self.broken[rows, j]) & misclassified(out, y).to(self.wanted.device)
            self.broken[rows[new], j] = True
            if self.points is not None:
                self.points[rows[new], j] = x_adv[new.to(x_adv.device)].detach().to(self.points.device)
            self.nonfinite[rows[new], j] = ~torch.isfinite(out[new.to(out.device)]).all(dim=1).to(self.wanted.device)
        return (~self.wanted[rows] | self.broken[rows]).all(dim=1).to(x_adv.device)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        self.broken.zero_()
        self.nonfinite.zero_()
        if self.keep_points:
            self.points = x.detach().unsqueeze(1).repeat(1, self.wanted.shape[1], *([1] * (x.dim() - 1)))
        return super().perturb(x, y)
