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
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from torch import Tensor

from .checks import DETERMINISM_ALONE, DETERMINISM_PASSES
from .plan import Pending
from .prices import Linear, Prices, calls
from .runner import AttackRunner, predictions_ok
from .runs import share_groups

if TYPE_CHECKING:
    from .plan import EvaluationPlan
    from .runs import AttackRun

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
    plan_key: dict[str, Any] = field(default_factory=dict)  # what was priced (``evaluate(..., estimate=)`` checks it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return self.render(self.to_dict())

    @staticmethod
    def render(data: dict[str, Any]) -> str:
        """The prediction as printed at the start of an evaluation (and by ``--estimate``)."""
        parts = ", ".join(f"{name} {duration(s)}" for name, s in data["breakdown"].items() if s >= 0.05)
        lines = [f"predicted wall time: {duration(data['predicted_s'])} on {data['workers']} process(es), "
                 f"{data['device']} ({parts})"]
        lines += [f"  assumed: {a}" for a in data["assumptions"]]
        lines.append(f"  (measured in {data['measured_in_s']:.1f} s on dev examples)")
        return "\n".join(lines)


def union_share(k: int) -> float:
    """How many more examples a trajectory shared by ``k`` defenses attacks than one defense's run:
    the union of their populations, ``1 + 0.6 (1 - 1/k)`` times one (measured on the demo model's
    dev split: the survivors of the ready-made PGD-10 on 2, 4 and 10 defenses were 1.17, 1.46 and
    1.6 times those of ``final``).

    Example:
        >>> union_share(1), round(union_share(4), 2)
        (1.0, 1.45)
    """
    return 1.0 + 0.6 * (1.0 - 1.0 / max(1, k))


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
    prices = Prices(runner, x, y, world_size)
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

    averaged: list[Linear] = []

    def average() -> Linear:
        """A source still to be chosen costs what an average source costs (timed on first need)."""
        if not averaged:
            every = target.sources(both_pairings=True)
            averaged.append(Linear(sum(prices.grad(s).per_call for s in every) / len(every),
                                   sum(prices.grad(s).per_example for s in every) / len(every)))
        return averaged[0]

    sizes = {"dev": plan.n_dev, "test": plan.n_test, "sanity": plan.n_sanity}

    def price(run: "AttackRun", sharing: int = 1) -> float:
        """One attack run: on clean-correct examples PGD stops early on those it breaks; on the
        survivors of earlier attacks every step runs; at the ε-growth check's larger radii PGD breaks
        nearly every example within two steps. A run whose trajectory ``sharing`` defenses share
        attacks the union of their examples (:func:`union_share`)."""
        share = p_clean if run.on == "correct" else p_robust
        n = sizes[run.examples] * min(1.0, share * union_share(sharing))
        source = run.source
        if run.step == "transfer":  # one defended forward of the twin's points
            return prices.forward(run.defense, n)
        grad = (average() if isinstance(source, Pending) and run.defense.purify is None
                else prices.grad(target.ready_made if isinstance(source, Pending) else source, run.defense,
                                 run.purification)
                if source is not None else None)
        spec = run.spec
        if run.eps is not None and run.eps > runner.threat.eps:
            return prices.run(spec, grad, n, 2.0, 0.0, 2)
        if spec.algorithm == "square":  # one forward of the defended model per query, on every batch
            per_process, m = prices.batches(n)
            return per_process * spec.queries * spec.restarts * prices.clean(run.defense)(m)
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

    breakdown = {"dev early-exit selection": 0.0, "dev candidate selection": 0.0, "dev headline selection": 0.0,
                 "clean passes": 0.0, "test matrix": 0.0, "follow-up attacks": 0.0, "cascade": 0.0, "square": 0.0,
                 "sanity checks": 0.0}
    category = {"early-exit selection": "dev early-exit selection", "candidate selection": "dev candidate selection",
                "headline selection": "dev headline selection",
                "matrix": "test matrix", "follow-up": "follow-up attacks", "transfer": "follow-up attacks",
                "cascade": "cascade", "square": "square", "sanity": "sanity checks"}
    counted: dict[str, int] = {}
    cleaned: set[tuple[str, str]] = set()
    # A run sharing its trajectory with an earlier one (:func:`~.runs.share_groups`) costs nothing
    # more: the group is priced as its first run on the union of the group's examples (one gradient
    # per step, every defense judged from one solve).
    groups = share_groups(plan, runs)
    riders = {i for group in groups for i in group[1:]}
    sharing = {group[0]: len(group) for group in groups}
    if groups:
        assumptions.append(f"{len(groups)} trajectories shared by {len(riders) + len(groups)} runs; one shared by k "
                           "defenses attacks 1 + 0.6 (1 - 1/k) times one defense's examples")
    for i, run in enumerate(runs):
        counted[run.phase] = counted.get(run.phase, 0) + 1
        if (run.phase, str(run.defense)) not in cleaned:  # one clean pass per defense and split
            cleaned.add((run.phase, str(run.defense)))
            n = plan.n_dev if run.phase == "dev" else plan.n_test
            breakdown[category[run.step] if run.phase == "dev" else "clean passes"] += prices.forward(run.defense, n)
            if run.phase == "test":  # the forward-determinism check: the sanity examples twice, a few alone
                breakdown["sanity checks"] += prices.forward(run.defense, plan.n_sanity, DETERMINISM_PASSES)
                breakdown["sanity checks"] += DETERMINISM_ALONE * prices.clean(run.defense)(1)
        if i not in riders:
            breakdown[category[run.step]] += price(run, sharing.get(i, 1))
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
