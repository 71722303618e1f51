"""The measured cost of each kind of work an evaluation does, on the device at hand: a clean pass of
each kind of defense, one gradient evaluation of each kind of source, each attack algorithm's own
work (timed on dev examples, its budget capped and scaled back), and an attack run priced from those
as the runner packs it into batches across the processes. :mod:`.cost` prices a plan's runs with it."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from torch import Tensor

from ..attackable import PurificationGradient
from ..defenses import Defense
from ..gradients import GradientSource
from .runner import AttackRunner
from .suites import AttackSpec

PROBE_STEPS = 20  # attack budgets above this are timed with this many steps and scaled
PROBE_QUERIES = 20  # Square likewise, in queries


class Clock:
    """Wall time of a block, with the device synchronised around it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def capped(spec: AttackSpec) -> tuple[AttackSpec, float]:
    """The spec timed for the estimate and the factor that scales its time back to the real budget."""
    if spec.algorithm == "square":
        queries = min(spec.queries, PROBE_QUERIES)
        return replace(spec, queries=queries, restarts=1), spec.queries * spec.restarts / queries
    targeted = spec.algorithm in ("apgd-t", "fab-t")
    steps = min(spec.steps, PROBE_STEPS)
    work = spec.steps * spec.restarts * (spec.n_targets if targeted else 1)
    return replace(spec, steps=steps, restarts=1, n_targets=1 if targeted else spec.n_targets), work / steps


def calls(spec: AttackSpec) -> int:
    """Gradient calls (batched) of one attack run: steps × restarts (× targets)."""
    targets = spec.n_targets if spec.algorithm in ("apgd-t", "fab-t") else 1
    return spec.steps * spec.restarts * targets


@dataclass(frozen=True)
class Linear:
    """Seconds of one call on a batch of m examples: ``per_call + m * per_example``."""

    per_call: float
    per_example: float

    def __call__(self, m: float) -> float:
        return self.per_call + m * self.per_example


class Prices:
    """Measured costs of each kind of work, and attack runs priced with them."""

    def __init__(self, runner: AttackRunner, x: Tensor, y: Tensor, world_size: int) -> None:
        self.runner, self.target = runner, runner.target
        self.clock = Clock(x.device)
        self.x, self.y = x, y
        self.world_size = world_size
        self.linear: dict[str, Linear] = {}
        self.algo: dict[str, tuple[float, float]] = {}  # label -> (own seconds per example, gradients per example)

    def fit(self, key: str, work) -> Linear:
        """Time ``work(x, y)`` on two examples (after a warm-up) and on the whole batch."""
        if key not in self.linear:
            small_x, small_y = self.x[:2], self.y[:2]
            work(small_x, small_y)  # warm-up of this code path, not counted
            small = self.clock(lambda: work(small_x, small_y))
            full = self.clock(lambda: work(self.x, self.y))
            m = len(self.y)
            per_example = max(0.0, (full - small) / max(1, m - len(small_y)))
            self.linear[key] = Linear(max(0.0, small - len(small_y) * per_example), per_example)
        return self.linear[key]

    def clean(self, defense: Union[str, Defense]) -> Linear:
        """One defended forward; a purified defense costs its purification too (timed apart)."""
        parsed = Defense.parse(defense, self.target.n_states) if self.target.is_deq else Defense("final")
        name = parsed.kind if parsed.purify is None else str(parsed.purify)
        return self.fit(f"clean:{name}", lambda x, y: self.target.logits(x, parsed))

    def grad(self, source: GradientSource, defense: Union[str, Defense] = "final",
             purification: PurificationGradient = "bpda") -> Linear:
        """One gradient evaluation with ``source`` (against ``final``, or against a purified defense:
        its purified forward, then the gradient at the purified input); the adjoint at state n is
        interpolated between its first and last state, the unrolled estimator costs the same at any n."""
        n_states = self.target.n_states
        parsed = Defense.parse(defense, n_states) if self.target.is_deq else Defense("final")
        against = parsed if parsed.purify is not None else Defense("final")
        if source.kind == "adjoint" and source.state is not None and n_states > 1:
            first = self._grad(GradientSource("adjoint", 1, source.pairing), against, purification)
            last = self._grad(GradientSource("adjoint", n_states, source.pairing), against, purification)
            w = (source.state - 1) / (n_states - 1)
            return Linear(first.per_call + w * (last.per_call - first.per_call),
                          first.per_example + w * (last.per_example - first.per_example))
        if source.kind == "unrolled" and source.state is not None:
            source = GradientSource("unrolled", n_states)
        return self._grad(source, against, purification)

    def _grad(self, source: GradientSource, defense: Defense, purification: PurificationGradient = "bpda") -> Linear:
        if defense.purify is None:
            purification = "bpda"
        model = self.target.attack_model(defense, source, self.runner.settings, purification)
        grad_fn = self.runner.grad_fn(AttackSpec("pgd", steps=1), source, defense, purification)

        def once(x: Tensor, y: Tensor) -> None:
            if grad_fn is not None:
                with torch.no_grad():
                    self.target.logits(x, defense)
                grad_fn(x, y)
                return
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                loss = torch.nn.functional.cross_entropy(model(xg), y, reduction="sum")
                torch.autograd.grad(loss, xg)

        mode = "" if purification == "bpda" else f":{purification}"
        return self.fit(f"grad:{source}" if defense.purify is None else f"grad:{source}@{defense.purify}{mode}", once)

    def run_algorithm(self, spec: AttackSpec, x: Tensor, y: Tensor) -> Tensor:
        """Time ``spec`` (budget capped) with the ready-made source on ``x``; return its points."""
        timed, scale = capped(spec)
        ready = self.target.ready_made
        source = None if spec.algorithm == "square" else ready
        attack = timed.build(self.target.attack_model("final", source, self.runner.settings), self.runner.threat, 0,
                             self.runner.grad_fn(timed, source))
        attack.check_labels = False  # as the evaluation's attacks (labels checked once)
        n = max(1, len(y))
        out: list[Tensor] = []
        seconds = self.clock(lambda: out.append(attack(x, y)))
        grads = (getattr(attack, "grad_stats", {}) or {}).get("computed", 0)
        if source is not None:
            cost = self.grad(ready)
            seconds -= calls(timed) * cost.per_call + grads * cost.per_example
        self.algo[spec.label] = (max(0.0, seconds) / n * scale, grads / n * scale)
        return out[0]

    def algorithm(self, spec: AttackSpec, x: Tensor, y: Tensor) -> tuple[float, float]:
        """(own seconds per example, gradients per example) of ``spec``'s real budget."""
        if spec.label not in self.algo:
            self.run_algorithm(spec, x, y)
        return self.algo[spec.label]

    def batches(self, n: float) -> tuple[int, float]:
        """(batches per process, examples per batch) of a run on ``n`` examples, packed as the runner does."""
        if n <= 0:
            return 0, 0.0
        bs, w = self.runner.batch_size, self.world_size
        count = -(-int(round(n)) // bs)
        count = max(1, min(-(-count // w) * w, int(round(n))))
        return -(-count // w), n / count

    def run(self, spec: AttackSpec, grad: Optional[Linear], n: float, grads_per_example: float,
            own_per_example: float, n_calls: float) -> float:
        """Seconds (per process) of one attack run on ``n`` examples with gradients costing ``grad``."""
        per_process, m = self.batches(n)
        grad = grad or Linear(0.0, 0.0)
        return per_process * (n_calls * grad.per_call + m * (grads_per_example * grad.per_example + own_per_example))

    def forward(self, defense: Union[str, Defense], n: float, calls_per_batch: int = 1) -> float:
        per_process, m = self.batches(n)
        return per_process * calls_per_batch * self.clean(defense)(m)
