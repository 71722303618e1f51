"""What an evaluation prints for the person watching (stderr, so that stdout stays the summary):
the banner with the price before anything runs."""

from __future__ import annotations

from typing import Any

from ..attacks import ThreatModel
from .cost import CostEstimate
from .plan import EvaluationPlan


def banner(plan: EvaluationPlan, model: dict[str, Any], threat: ThreatModel, available: int,
           estimate: dict[str, Any]) -> str:
    """What is about to run, and its price, before anything runs."""
    name = model.get("checkpoint") or model.get("factory") or model.get("name") or model.get("class", "model")
    eps = f"{threat.eps:.4g}" + (f" (= {threat.eps * 255:.3g}/255)" if threat.norm == "Linf" else "")
    test = f"{plan.n_test} of {available}" + (f" (capped: the test split has {available})"
                                                if plan.requested_n_test and plan.requested_n_test > available else "")
    dev = "none (nothing is chosen)" if not plan.n_dev else f"{plan.n_dev} (the suite's dev_examples: {plan.suite.dev_examples})"
    defenses = plan.requested_defenses
    shown = ", ".join(defenses) if defenses else ("final, early (chosen on dev), ensemble" if plan.target.is_deq
                                                  else "final")
    lines = [f"evaluating {name}: {threat.norm} eps={eps}, suite {plan.suite.name}, {plan.mode.value} protocol",
             f"  test examples: {test}; dev examples: {dev}",
             f"  defenses: {shown}"]
    purified = [d for d in plan.defenses([1]) if d.purify is not None] if plan.target.is_deq else []
    for d in purified:
        lines.append(f"  {d}: input entropy reduction, judged beside its static twin {d.static} (BPDA, non-adaptive, "
                     "through the loop, confident loss, transfer)")
    if "skipped" in estimate:
        lines.append(f"  no cost estimate: {estimate['skipped']}")
    else:
        runs = estimate.get("attack_runs") or {}
        lines.append(f"  attack runs: about {sum(runs.values())} ({runs.get('dev', 0)} on dev, {runs.get('test', 0)} on test)")
        lines.append(CostEstimate.render(estimate))
    return "\n".join(lines)
