"""A DEQ run at a random depth at test time, attacked with EOT (docs/method.md §8).

A model trained with random intermediate states can also be *deployed* that way: each input is
classified after ``d`` solver steps, ``d`` drawn uniformly from ``1..N`` — the same read-out as in
training, ``model.forward_with_info(x, max_iter=d)``. Such a classifier is random, so it is judged by
its **expected accuracy**: the fraction of the N equally likely depths at which an input is
classified correctly, computed exactly (N forwards, no sampling: the number is deterministic).

The attacks maximise the loss in expectation over the depth (EOT). The expectation over N equally
likely depths is the mean of the N per-depth gradients, computed exactly rather than sampled, which
is EOT with every draw. Two attacks that ignore the randomness are run beside it, so the table shows
what EOT adds: PGD on the full depth only, and PGD on one depth drawn per example and step.
Every attack keeps, per example, the iterate of lowest expected accuracy; the worst case is the
per-example minimum over the attacks and the clean point.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Optional, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attacks import ThreatModel
from ..attacks.steps import ascent_step, example_noise, random_start
from ..core import DEQClassifier
from ..errors import ConfigError
from ..models import is_deq
from ..utils.modes import evaluation_mode
from ..utils.seeding import derive_seed

DepthAttack = Literal["full-depth", "one-depth", "eot"]
DEPTH_ATTACKS: tuple[str, ...] = get_args(DepthAttack)
HEADERS: dict[str, str] = {"full-depth": "PGD at depth N (no EOT)", "one-depth": "PGD, one random depth per step (no EOT)",
           "eot": "PGD with EOT over the depth"}


def depth_logits(model: DEQClassifier, x: Tensor, depth: int) -> Tensor:
    """The logits after ``depth`` solver steps, as random intermediate states trains them (with the
    model's own gradient when autograd is on)."""
    return model.forward_with_info(x, max_iter=int(depth)).logits


def depth_correct(model: DEQClassifier, x: Tensor, y: Tensor) -> Tensor:
    """``[B, N]``: example i classified correctly after d = 1..N solver steps (no autograd).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deqrobust import DEQClassifier
        >>> class F(nn.Module):
        ...     def __init__(self): super().__init__(); self.lin = nn.Linear(3, 3)
        ...     def forward(self, z, e): return torch.tanh(0.3 * self.lin(z) + e)
        >>> model = DEQClassifier(nn.Linear(2, 3), F(), nn.Linear(3, 2), f_max_iter=4).eval()
        >>> depth_correct(model, torch.rand(5, 2), torch.zeros(5, dtype=torch.long)).shape
        torch.Size([5, 4])
    """
    with torch.no_grad(), evaluation_mode(model):
        return torch.stack([depth_logits(model, x, d).argmax(dim=1) == y for d in range(1, model.n_states + 1)], dim=1)


def expected_correct(model: DEQClassifier, x: Tensor, y: Tensor) -> Tensor:
    """Per example, the probability that the random-depth model classifies it correctly."""
    return depth_correct(model, x, y).double().mean(dim=1)


def depth_gradient(model: DEQClassifier, x: Tensor, y: Tensor, depths: Tensor) -> Tensor:
    """Per example i, the input gradient of the cross-entropy after ``depths[i]`` solver steps
    (the model's own gradient: phantom or exact). Examples sharing a depth share one forward."""
    grad = torch.zeros_like(x)
    with torch.enable_grad():
        for d in depths.unique().tolist():
            rows = (depths == d).nonzero().flatten()
            leaf = x[rows].detach().requires_grad_(True)
            loss = F.cross_entropy(depth_logits(model, leaf, int(d)).float(), y[rows], reduction="sum")
            grad[rows] = torch.autograd.grad(loss, leaf)[0]
    return grad


def eot_gradient(model: DEQClassifier, x: Tensor, y: Tensor) -> Tensor:
    """EOT over a depth uniform on ``1..N``: the mean of the N per-depth gradients, exactly."""
    every = [depth_gradient(model, x, y, torch.full((x.shape[0],), d)) for d in range(1, model.n_states + 1)]
    return torch.stack(every).mean(dim=0)


@dataclass
class RandomDepthResult:
    """Expected accuracies (%) of the random-depth model: clean, under each attack, worst case.

    ``clean_per_depth`` is the clean accuracy (%) after d = 1..N steps; ``seconds`` the wall time."""

    n_examples: int
    n_states: int
    norm: str
    eps: float
    steps: int
    alpha: float
    seed: int
    clean_acc: float
    attacks: dict[str, float]
    worst_case_acc: float
    clean_per_depth: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RandomDepthResult":
        return cls(**data)

    def settings(self) -> dict[str, Any]:
        """What the numbers depend on besides the weights (a cached result is reused only when equal)."""
        return {"n_examples": self.n_examples, "norm": self.norm, "eps": self.eps, "seed": self.seed,
                "steps": self.steps, "alpha": self.alpha, "attacks": list(self.attacks)}


GradFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]


def draw_depths(n_states: int, rows: Tensor, step: int, seed: int) -> Tensor:
    """The depths (uniform on ``1..n_states``) that the one-depth attack uses at ``step`` for the
    examples ``rows``: each from its own seed, so an example's draws do not depend on its batch."""
    return torch.stack([torch.randint(1, n_states + 1, (), generator=torch.Generator().manual_seed(
        derive_seed(seed, "depth", int(r), int(step)))) for r in rows.tolist()])


def _attack_gradient(model: DEQClassifier, attack: DepthAttack, seed: int) -> GradFn:
    n = model.n_states

    def full_depth(x: Tensor, y: Tensor, rows: Tensor, step: int) -> Tensor:
        return depth_gradient(model, x, y, torch.full((x.shape[0],), n))

    def one_depth(x: Tensor, y: Tensor, rows: Tensor, step: int) -> Tensor:
        return depth_gradient(model, x, y, draw_depths(n, rows, step, seed))

    def eot(x: Tensor, y: Tensor, rows: Tensor, step: int) -> Tensor:
        return eot_gradient(model, x, y)

    return {"full-depth": full_depth, "one-depth": one_depth, "eot": eot}[attack]


def _pgd(model: DEQClassifier, x: Tensor, y: Tensor, rows: Tensor, threat: ThreatModel, grad_fn: GradFn, steps: int,
         alpha: float, seeds: Tensor, clean: Tensor) -> Tensor:
    """PGD from a random start keeping each example's iterate of lowest expected accuracy; returns it."""
    best = clean.clone()
    x_adv = random_start(x, threat, example_noise(x, seeds))
    for step in range(steps + 1):
        p = expected_correct(model, x_adv, y)
        best = torch.minimum(best, p)
        if step == steps or bool((best == 0).all()):
            break
        x_adv = ascent_step(x_adv, grad_fn(x_adv, y, rows, step), x, threat, alpha)
    return best


def evaluate_random_depth(
    model: DEQClassifier,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 20,
    alpha: Optional[float] = None,
    seed: int = 0,
    batch_size: int = 120,
    progress: Optional[Callable[[str], None]] = None,
) -> RandomDepthResult:
    """The random-depth model's expected accuracy, clean and under each attack of
    :data:`DEPTH_ATTACKS` (PGD, ``steps`` steps of ``alpha`` = ε/4 by default, from a random start).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deqrobust import DEQClassifier
        >>> from deqrobust.attacks import ThreatModel
        >>> class F(nn.Module):
        ...     def __init__(self): super().__init__(); self.lin = nn.Linear(3, 3)
        ...     def forward(self, z, e): return torch.tanh(0.3 * self.lin(z) + e)
        >>> model = DEQClassifier(nn.Linear(2, 3), F(), nn.Linear(3, 2), f_max_iter=4).eval()
        >>> result = evaluate_random_depth(model, torch.rand(6, 2), torch.zeros(6, dtype=torch.long),
        ...                                ThreatModel("Linf", 0.1), steps=2)
        >>> result.worst_case_acc <= min(result.attacks.values()) <= result.clean_acc
        True
    """
    if not is_deq(model):
        raise ConfigError(f"a random depth needs a DEQ (DEQClassifier), got {type(model).__name__}")
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    alpha = threat.eps / 4 if alpha is None else float(alpha)
    if alpha <= 0:
        raise ConfigError(f"alpha must be positive, got {alpha}")
    start = time.perf_counter()
    n_examples = int(x.shape[0])
    clean_parts: list[Tensor] = []
    per_depth: list[Tensor] = []
    attacked: dict[str, list[Tensor]] = {a: [] for a in DEPTH_ATTACKS}
    with evaluation_mode(model):
        for lo in range(0, n_examples, batch_size):
            rows = torch.arange(lo, min(lo + batch_size, n_examples))
            xb, yb = x[rows], y[rows]
            correct = depth_correct(model, xb, yb)
            clean = correct.double().mean(dim=1)
            clean_parts.append(clean)
            per_depth.append(correct.double().sum(dim=0))
            seeds = torch.tensor([derive_seed(seed, "random-depth-start", int(r)) for r in rows.tolist()])
            for attack in get_args(DepthAttack):
                attacked[attack].append(_pgd(model, xb, yb, rows, threat, _attack_gradient(model, attack, seed), steps,
                                             alpha, seeds, clean))
                if progress is not None:
                    progress(f"random depth: {attack} on examples {lo}..{int(rows[-1])}")
    clean_all = torch.cat(clean_parts) if clean_parts else torch.zeros(0, dtype=torch.float64)
    each = {a: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64) for a, v in attacked.items()}
    worst = torch.stack([clean_all, *each.values()]).amin(dim=0) if n_examples else clean_all

    def percent(p: Tensor) -> float:
        return float(p.mean() * 100) if p.numel() else 0.0

    counts = torch.stack(per_depth).sum(dim=0) if per_depth else torch.zeros(model.n_states)
    return RandomDepthResult(n_examples, model.n_states, threat.norm, float(threat.eps), int(steps), alpha, int(seed),
                             percent(clean_all), {a: percent(p) for a, p in each.items()}, percent(worst),
                             [float(c) * 100 / max(n_examples, 1) for c in counts.tolist()],
                             time.perf_counter() - start)
