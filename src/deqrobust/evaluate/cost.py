"""The price of an evaluation, predicted before it runs (``deqrobust evaluate --estimate``).

On the device at hand and on dev examples only, each distinct kind of work is timed on a batch of
two examples and on one full batch (so that each has a cost per call and a cost per example):

* a clean pass of each kind of defense (final, early exit, ensemble);
* one gradient evaluation (defended forward + backward) of each kind of source — exact, phantom,
  the adjoint (each pairing) at the first and the last state, unrolled, each gradient ensemble;
* each attack algorithm of the suite, once, with the ready-made source (its budget capped for the
  timing and scaled back): its time, less the gradients it took, is the algorithm's own cost;
* the dev probe — the ready-made PGD of the matrix on the dev batch — gives the clean share and the
  share that survives (assumed to hold on test), and how early PGD stops on broken examples.

Every attack run of the plan (dev selections, test matrix, cascade, Square, sanity checks) is then
priced batch by batch as the runner packs it across the processes. The assumptions are stated in
the estimate; every evaluation records it with the actual time at the end (``results.json`` →
``estimate``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ..defenses import Defense
from ..gradients import GradientSource
from .plan import Pending
from .runner import AttackRunner, predictions_ok
from .suites import AttackSpec

if TYPE_CHECKING:
    from .plan import EvaluationPlan
    from .runs import AttackRun

PROBE_STEPS = 20  # attack budgets above this are timed with this many steps and scaled
PROBE_QUERIES = 20  # Square likewise, in queries
PROBE_EXAMPLES = 64  # at most this many dev examples are timed


@dataclass
class CostEstimate:
    """A predicted wall time with its breakdown (seconds per phase) and what it assumed."""

    predicted_s: float
    breakdown: dict[str, float]
    assumptions: list[str]
    unit_costs: dict[str, float] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)
    measured_in_s: float = 0.0
    attack_runs: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    workers: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def render(data: dict[str, Any]) -> str:
        """The prediction as printed at the start of an evaluation (and by ``--estimate``)."""
        parts = ", ".join(f"{name} {duration(s)}" for name, s in data["breakdown"].items() if s >= 0.05)
        lines = [f"predicted wall time: {duration(data['predicted_s'])} on {data['workers']} process(es), "
                 f"{data['device']} ({parts})"]
        lines += [f"  assumed: {a}" for a in data["assumptions"]]
        lines.append(f"  (measured in {data['measured_in_s']:.1f} s on dev examples)")
        return "\n".join(lines)


def duration(seconds: float) -> str:
    """``75.2`` -> ``"1 min 15 s"``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class _Clock:
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


class _Prices:
    """Measured costs of each kind of work, and attack runs priced with them."""

    def __init__(self, runner: AttackRunner, x: Tensor, y: Tensor, world_size: int) -> None:
        self.runner, self.target = runner, runner.target
        self.clock = _Clock(x.device)
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
        return self.fit(f"clean:{str(defense).split(':')[0]}", lambda x, y: self.target.logits(x, defense))

    def grad(self, source: GradientSource) -> Linear:
        """One gradient evaluation with ``source`` (against ``final``); the adjoint at state n is
        interpolated between its first and last state, the unrolled estimator costs the same at any n."""
        n_states = self.target.n_states
        if source.kind == "adjoint" and source.state is not None and n_states > 1:
            first = self._grad(GradientSource("adjoint", 1, source.pairing))
            last = self._grad(GradientSource("adjoint", n_states, source.pairing))
            w = (source.state - 1) / (n_states - 1)
            return Linear(first.per_call + w * (last.per_call - first.per_call),
                          first.per_example + w * (last.per_example - first.per_example))
        if source.kind == "unrolled" and source.state is not None:
            source = GradientSource("unrolled", n_states)
        return self._grad(source)

    def _grad(self, source: GradientSource) -> Linear:
        model = self.target.attack_model("final", source, self.runner.settings)
        grad_fn = self.runner.grad_fn(AttackSpec("pgd", steps=1), source)

        def once(x: Tensor, y: Tensor) -> None:
            if grad_fn is not None:
                with torch.no_grad():
                    self.target.logits(x, "final")
                grad_fn(x, y)
                return
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                loss = torch.nn.functional.cross_entropy(model(xg), y, reduction="sum")
                torch.autograd.grad(loss, xg)

        return self.fit(f"grad:{source}", once)

    def run_algorithm(self, spec: AttackSpec, x: Tensor, y: Tensor) -> Tensor:
        """Time ``spec`` (budget capped) with the ready-made source on ``x``; return its points."""
        timed, scale = capped(spec)
        ready = self.target.ready_made
        source = None if spec.algorithm == "square" else ready
        attack = timed.build(self.target.attack_model("final", source, self.runner.settings), self.runner.threat, 0,
                             self.runner.grad_fn(timed, source))
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


def estimate_cost(runner: AttackRunner, plan: "EvaluationPlan", runs: Sequence["AttackRun"], x_dev: Tensor,
                  y_dev: Tensor, world_size: int = 1, shares: Optional[tuple[float, float]] = None) -> CostEstimate:
    """Time the kinds of work on ``x_dev`` (at most one batch) and price ``runs``, the plan's attack
    runs (:func:`~deqrobust.evaluate.runs.assumed_runs`), with the clean passes they imply.

    ``shares`` = (clean, robust) replaces the dev probe's shares, for pricing on synthetic inputs (the
    probe's examples are then all attacked, and PGD is priced at every step)."""
    started = time.perf_counter()
    suite, target = plan.suite, plan.target
    n_probe = min(len(y_dev), runner.batch_size, PROBE_EXAMPLES)
    x, y = x_dev[:n_probe], y_dev[:n_probe]
    prices = _Prices(runner, x, y, world_size)
    ready = target.ready_made

    # The dev probe: the matrix attack with the ready-made source, timed.
    ok, _ = predictions_ok(prices.target.logits(x, "final"), y)
    correct = ok.nonzero().flatten()
    xc, yc = (x[correct], y[correct]) if len(correct) and shares is None else (x, y)
    x_adv = prices.run_algorithm(suite.matrix, xc, yc)
    _, pgd_grads = prices.algorithm(suite.matrix, xc, yc)
    survived, _ = predictions_ok(target.logits(x_adv, "final"), yc)
    p_clean = float(ok.float().mean()) if len(y) else 1.0
    p_robust = p_clean * float(survived.float().mean()) if len(yc) else p_clean
    alive = survived.nonzero().flatten()
    xs, ys = (xc[alive], yc[alive]) if len(alive) and shares is None else (xc, yc)
    if shares is not None:
        p_clean, p_robust = shares
        prices.algo[suite.matrix.label] = (prices.algo[suite.matrix.label][0], float(calls(suite.matrix)))
        _, pgd_grads = prices.algorithm(suite.matrix, xc, yc)

    every = target.sources(both_pairings=True)
    average = Linear(sum(prices.grad(s).per_call for s in every) / len(every),
                     sum(prices.grad(s).per_example for s in every) / len(every))
    sizes = {"dev": plan.n_dev, "test": plan.n_test, "sanity": plan.n_sanity}

    def price(run: "AttackRun") -> float:
        """One attack run: on clean-correct examples PGD stops early on those it breaks; on the
        survivors of earlier attacks every step runs; at the ε-growth check's larger radii PGD breaks
        nearly every example within two steps."""
        n = sizes[run.examples] * (p_clean if run.on == "correct" else p_robust)
        source = run.source
        grad = average if isinstance(source, Pending) else prices.grad(source) if source is not None else None
        spec = run.spec
        if run.eps is not None and run.eps > runner.threat.eps:
            return prices.run(spec, grad, n, 2.0, 0.0, 2)
        if spec.algorithm == "pgd":
            own, grads = prices.algorithm(suite.matrix, xc, yc)
            own, grads = own * calls(spec) / calls(suite.matrix), grads * calls(spec) / calls(suite.matrix)
            if run.on == "survivors":
                grads = float(calls(spec))
            return prices.run(spec, grad, n, grads, own, calls(spec))
        own, grads = prices.algorithm(spec, xs, ys)
        return prices.run(spec, grad, n, grads, own, calls(spec) if grad is not None else 0)

    if shares is None:
        assumptions = [f"the dev probe ({len(y)} dev examples, {suite.matrix.label} with the ready-made source "
                       f"'{ready}') holds on test: {100 * p_clean:.0f}% clean-correct, {100 * p_robust:.0f}% survive "
                       "it, and as many survive the whole matrix"]
    else:
        assumptions = [f"given shares: {100 * p_clean:.0f}% clean-correct, {100 * p_robust:.0f}% survive the matrix "
                       f"(timed on {len(y)} synthetic inputs; PGD priced at every step)"]
    if plan.requested_n_test and plan.requested_n_test > plan.n_test:
        assumptions.insert(0, f"{plan.n_test} test examples: {plan.requested_n_test} were asked for, the test split "
                              f"has {plan.n_test}")
    if len(plan.assumed_early_states()) > 1:
        assumptions.append("the two early-exit rules pick different states (two early-exit defenses; if they agree, "
                           "one defense's share less)")
    if any(isinstance(r.source, Pending) for r in runs if r.step != "sanity"):
        assumptions.append(f"the {plan.top_k - 1} strongest sources besides '{ready}' cost as much as an average source "
                           f"and are not paper-table sources; the intermediate state is n = "
                           f"{max(1, target.n_states // 2)}")

    breakdown = {"dev early-exit selection": 0.0, "dev candidate selection": 0.0, "clean passes": 0.0,
                 "test matrix": 0.0, "cascade": 0.0, "square": 0.0, "sanity checks": 0.0}
    category = {"early-exit selection": "dev early-exit selection", "candidate selection": "dev candidate selection",
                "matrix": "test matrix", "cascade": "cascade", "square": "square", "sanity": "sanity checks"}
    counted: dict[str, int] = {}
    cleaned: set[tuple[str, str]] = set()
    for run in runs:
        counted[run.phase] = counted.get(run.phase, 0) + 1
        if (run.phase, str(run.defense)) not in cleaned:  # one clean pass per defense and split
            cleaned.add((run.phase, str(run.defense)))
            n = plan.n_dev if run.phase == "dev" else plan.n_test
            breakdown[category[run.step] if run.phase == "dev" else "clean passes"] += prices.forward(run.defense, n)
            if run.phase == "test":  # the forward-determinism check: twice on the sanity examples, 4 alone
                breakdown["sanity checks"] += prices.forward(run.defense, plan.n_sanity, 2)
                breakdown["sanity checks"] += 4 * prices.clean(run.defense)(1)
        breakdown[category[run.step]] += price(run)
    if target.is_deq and plan.n_test:
        breakdown["clean passes"] += prices.forward("final", plan.n_test)  # the residuals per state
    measured = time.perf_counter() - started
    return CostEstimate(
        predicted_s=sum(breakdown.values()) + measured,
        breakdown={"estimate itself": measured, **breakdown},
        assumptions=assumptions,
        unit_costs={f"{key} per call": cost.per_call for key, cost in prices.linear.items()}
        | {f"{key} per example": cost.per_example for key, cost in prices.linear.items()}
        | {f"{label} own per example": v[0] for label, v in prices.algo.items()}
        | {f"{label} gradients per example": v[1] for label, v in prices.algo.items()},
        probe={"split": "dev", "n_examples": len(y), "clean_share": p_clean, "robust_share": p_robust,
               "pgd_gradients_per_example": pgd_grads},
        measured_in_s=measured,
        attack_runs=counted,
        device=str(x_dev.device),
        workers=world_size,
    )
