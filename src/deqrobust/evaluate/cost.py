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
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from ..gradients import GradientSource
from .runner import AttackRunner, predictions_ok
from .suites import AttackSpec

if TYPE_CHECKING:
    from .plan import EvaluationPlan

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

    def clean(self, defense: str) -> Linear:
        return self.fit(f"clean:{defense.split(':')[0]}", lambda x, y: self.target.logits(x, defense))

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

    def run(self, spec: AttackSpec, source: Optional[GradientSource], n: float, grads_per_example: float,
            own_per_example: float, n_calls: float) -> float:
        """Seconds (per process) of one attack run on ``n`` examples."""
        per_process, m = self.batches(n)
        grad = self.grad(source) if source is not None else Linear(0.0, 0.0)
        return per_process * (n_calls * grad.per_call + m * (grads_per_example * grad.per_example + own_per_example))

    def forward(self, defense: str, n: float, calls_per_batch: int = 1) -> float:
        per_process, m = self.batches(n)
        return per_process * calls_per_batch * self.clean(defense)(m)


def estimate_cost(runner: AttackRunner, plan: "EvaluationPlan", x_dev: Tensor, y_dev: Tensor,
                  world_size: int = 1, shares: Optional[tuple[float, float]] = None,
                  n_dev: Optional[int] = None) -> CostEstimate:
    """Time the kinds of work on ``x_dev`` (at most one batch) and price the whole evaluation.

    ``shares`` = (clean, robust) replaces the dev probe's shares, for pricing on synthetic inputs (the
    probe's examples are then all attacked, and PGD is priced at every step); ``n_dev`` replaces the
    number of dev examples the plan reads."""
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

    runs: dict[str, int] = {}
    phase = ["dev"]

    def attack(spec: AttackSpec, source: Optional[GradientSource], n: float, survivors: bool) -> float:
        """An attack run on ``n`` examples: clean-correct ones (PGD stops early on those it breaks)
        or survivors of earlier attacks (every step runs)."""
        runs[phase[0]] = runs.get(phase[0], 0) + 1
        if spec.algorithm == "pgd":
            own, grads = prices.algorithm(suite.matrix, xc, yc)
            own, grads = own * calls(spec) / calls(suite.matrix), grads * calls(spec) / calls(suite.matrix)
            if survivors:
                grads = float(calls(spec))
            return prices.run(spec, source, n, grads, own, calls(spec))
        own, grads = prices.algorithm(spec, xs, ys)
        return prices.run(spec, source, n, grads, own, calls(spec) if source is not None else 0)

    n_states = target.n_states
    n_dev, n_test = (len(y_dev) if n_dev is None else n_dev), plan.n_test
    if shares is None:
        assumptions = [f"the dev probe ({len(y)} dev examples, {suite.matrix.label} with the ready-made source "
                       f"'{ready}') holds on test: {100 * p_clean:.0f}% clean-correct, {100 * p_robust:.0f}% survive "
                       "it, and as many survive the whole matrix"]
    else:
        assumptions = [f"given shares: {100 * p_clean:.0f}% clean-correct, {100 * p_robust:.0f}% survive the matrix "
                       f"(timed on {len(y)} synthetic inputs; PGD priced at every step)"]
    breakdown = {"dev early-exit selection": 0.0, "dev candidate selection": 0.0, "clean passes": 0.0,
                 "test matrix": 0.0, "cascade": 0.0, "square": 0.0, "sanity checks": 0.0}
    if plan.requested_n_test and plan.requested_n_test > n_test:
        assumptions.insert(0, f"{n_test} test examples: {plan.requested_n_test} were asked for, the test split has {n_test}")
    requested = list(plan.requested_defenses or (("final", "early", "ensemble") if target.is_deq else ("final",)))
    defenses = []
    for d in requested:
        if d == "early" and target.is_deq:
            defenses += [f"early:{max(1, n_states // 2)}"] * (2 if n_states > 1 else 1)
        else:
            defenses.append(d)
    if "early" in requested and n_states > 1:
        assumptions.append("the two early-exit rules pick different states (two early-exit defenses; if they agree, "
                           "one defense's share less)")
    reused: dict[int, int] = {}
    if target.wants_early_exit_selection(plan.requested_defenses):
        from .selection import white_box_sources

        for n in range(1, n_states + 1):
            cost = prices.forward(f"early:{n}", n_dev) + attack(suite.matrix, ready, p_clean * n_dev, False)
            cost += sum(attack(suite.matrix, s, p_robust * n_dev, True) for s in white_box_sources(n))
            breakdown["dev early-exit selection"] += cost
        reused = {i: 1 + len(white_box_sources(1)) for i, d in enumerate(defenses) if d.startswith("early")}

    every = target.sources(both_pairings=True)
    if plan.mode == "adaptive":
        mean = sum(prices.grad(s).per_example for s in every) / len(every)
        typical = min(every, key=lambda s: abs(prices.grad(s).per_example - mean))
        paper = [GradientSource("exact"), GradientSource("phantom"), GradientSource("adjoint", n_states),
                 GradientSource("unrolled", n_states), GradientSource("adjoint", None), GradientSource("unrolled", None)]
        if n_states > 1:
            paper += [GradientSource("adjoint", max(1, n_states // 2)), GradientSource("unrolled", n_states // 2)]
        extra = [typical] * max(0, plan.top_k - 1)
        matrix, cascade = paper + extra, [ready] + extra
        for i, d in enumerate(defenses):
            others = [s for s in every if s != ready]
            if i not in reused:
                breakdown["dev candidate selection"] += prices.forward(d, n_dev)
                breakdown["dev candidate selection"] += attack(suite.matrix, ready, p_clean * n_dev, False)
            skip = reused.get(i, 1) - 1
            breakdown["dev candidate selection"] += sum(attack(suite.matrix, s, p_robust * n_dev, True)
                                                        for s in others[skip:])
        assumptions.append(f"the {plan.top_k - 1} strongest sources besides '{ready}' cost as much as an average source "
                           f"('{typical}') and are not paper-table sources; the intermediate state is n = "
                           f"{max(1, n_states // 2)}")
    else:
        matrix = cascade = plan.sources()

    boost = suite.boost if plan.mode == "adaptive" else ()
    n_sanity = min(suite.sanity_examples, n_test)
    phase[0] = "test"
    for d in defenses:
        breakdown["clean passes"] += prices.forward(d, n_test) + (prices.forward("final", n_test) if target.is_deq else 0)
        breakdown["test matrix"] += sum(attack(suite.matrix, s, p_clean * n_test, False) for s in matrix)
        for spec, names in suite.standalone:
            for name in names:
                source = target.source(name if target.is_deq or name == "none" else "autograd")
                breakdown["test matrix"] += attack(spec, source, p_clean * n_test, False)
        for spec in boost + suite.cascade:
            breakdown["cascade"] += sum(attack(spec, s, p_robust * n_test, True) for s in cascade)
        if suite.square is not None:
            breakdown["square"] += attack(suite.square, None, p_robust * n_test, True)
        # Sanity checks with the strongest matrix source (priced as an average one): the matrix attack
        # at eps and at 2 eps, twice the iterations, and the larger radii, where PGD breaks nearly every
        # example within two steps; then the forward-determinism passes.
        strongest = min(matrix, key=lambda s: abs(prices.grad(s).per_example
                                                   - sum(prices.grad(t).per_example for t in matrix) / len(matrix)))
        at_eps = attack(suite.matrix, strongest, p_clean * n_sanity, False)
        doubled = attack(replace(suite.matrix, steps=2 * suite.matrix.steps), strongest, p_clean * n_sanity, False)
        larger = prices.run(suite.matrix, strongest, p_clean * n_sanity, 2.0, 0.0, 2)
        runs["test"] += len(suite.eps_multipliers)
        breakdown["sanity checks"] += 2 * at_eps + doubled + larger * len(suite.eps_multipliers)
        breakdown["sanity checks"] += prices.forward(d, n_sanity, 2) + 4 * prices.clean(d)(1)
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
        attack_runs=runs,
        device=str(x_dev.device),
        workers=world_size,
    )
