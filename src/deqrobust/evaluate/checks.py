"""Obfuscation sanity checks (Carlini et al. 2019; Athalye et al. 2018; AutoAttack's checks), each
with a pass/fail verdict and its numbers:

* ``eps_growth`` — robust accuracy falls to ≈0 as ε grows (×2, ×4, ×8, unbounded);
* ``more_iterations`` — doubling the PGD iterations does not raise robust accuracy beyond noise;
* ``square_vs_white_box`` — the gradient-free Square attack breaks at most 0.5 points (and at
  least one example is allowed) of examples that survived every white-box attack;
* ``gradients`` — every gradient computed at an attacked point is non-zero and finite;
* ``deterministic_forward`` — the defended forward gives the same logits twice, and the same for
  a sample alone as in its batch.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..attacks import ThreatModel
from ..defenses import Defense
from ..gradients import GradientSource
from ..utils.stats import interval_of, noise_points
from .results import AttackCell, CheckResult
from .runner import AttackRunner, percent
from .suites import AttackSpec, Suite

SQUARE_TOLERANCE_POINTS = 0.5
UNBOUNDED = {"Linf": 1.0}


noise_tolerance = noise_points  # two binomial standard errors (in points), at least one example


def source_name(source: object) -> str:
    """A cell's source label: the source, or ``none`` for a gradient-free attack."""
    return "none" if source is None else str(source)


def cell_label(attack: str, source: object) -> str:
    """``attack|source``: how a cell, and what broke an example, are named."""
    return f"{attack}|{source_name(source)}"


def check_key(defense: str, eps: float, spec: AttackSpec, source: object) -> str:
    """The state key of a check's attack. The ε-growth check at ε and the iteration check's first
    attack are the same attack on the same examples: one key, so it runs once."""
    return f"check/{defense}/{eps:.6g}/{spec.label}/{source}"


def growth_radii(threat: ThreatModel, input_numel: int, multipliers: Sequence[float]) -> list[float]:
    """The radii the ε-growth check attacks at: ε × each multiplier below the unbounded radius, then it
    (L-inf: 1, the whole pixel range; L2: the norm of an input of ones, ``input_numel`` values)."""
    unbounded = UNBOUNDED.get(threat.norm, math.sqrt(input_numel))
    return [threat.eps * m for m in multipliers if threat.eps * m < unbounded] + [unbounded]


def doubled(spec: AttackSpec) -> AttackSpec:
    """The iteration check's second attack: the same with twice the steps."""
    return replace(spec, steps=2 * spec.steps)


def planned_attacks(threat: ThreatModel, input_numel: int, spec: AttackSpec,
                    multipliers: Sequence[float]) -> list[tuple[float, AttackSpec]]:
    """(radius, attack) of every attack the ε-growth and iteration checks run, each once: the growth
    radii, the attack at ε (shared by both checks), and the doubled attack at ε."""
    radii = growth_radii(threat, input_numel, multipliers)
    at_eps = [] if threat.eps in radii else [threat.eps]
    return [(eps, spec) for eps in radii + at_eps] + [(threat.eps, doubled(spec))]


def verdict_unless_certain(passed: bool, cannot_fail: bool, needs: str) -> tuple[Optional[bool], dict[str, Any]]:
    """A check's verdict, or ``None`` (inconclusive) when no outcome could have failed it at this size,
    with what it would need."""
    if cannot_fail:
        return None, {"inconclusive": "no outcome could have failed this check at this size", "needs": needs}
    return passed, {}


def examples_to_resolve(base: float, clean: float, n: int) -> str:
    """What the iteration check would need to be able to fail: a tolerance (two standard errors
    of ``base``) below the gap between the clean-correct share and ``base``."""
    gap = (clean - base) / 100.0
    if gap <= 0:
        return "an attack that breaks at least one example (the first attack broke none)"
    p = base / 100.0
    need = max(int(math.ceil(4 * p * (1 - p) / (gap * gap))), int(math.ceil(1 / gap)) + 1)
    return f"about {need} or more examples at these accuracies (here {n})"


def eps_growth(runner: AttackRunner, defense: str, spec: AttackSpec, source: Optional[GradientSource],
               x: Tensor, y: Tensor, correct: Tensor, multipliers: Sequence[float],
               bar: Optional[tqdm] = None) -> tuple[CheckResult, list[tuple[int, str, str]]]:
    """The check, and (index, attack label, run key) of the examples its attack broke at the
    evaluation's own ε (for the worst case)."""
    threat = runner.threat
    radii = growth_radii(threat, x[0].numel(), multipliers)
    unbounded = radii[-1]
    accs, at_eps, intervals = {}, [], {}
    for eps in radii:
        res = runner.run(check_key(defense, eps, spec, source), defense, spec, source,
                         x, y, correct, threat=ThreatModel(threat.norm, eps), bar=bar)
        robust = correct.clone()
        robust[res.broken] = False
        accs[f"{eps:.6g}"] = percent(robust)
        intervals[f"{eps:.6g}"] = interval_of(percent(robust), len(y))
        if eps == threat.eps:
            at_eps = [(i, cell_label(spec.label, source), check_key(defense, eps, spec, source)) for i in res.broken]
    final = accs[f"{unbounded:.6g}"]
    limit = max(2.0, 100.0 / max(len(y), 1))
    clean = percent(correct)
    verdict = verdict_unless_certain(final <= limit, clean <= limit, f"more than {limit:.3g}% of the examples clean-correct "
                                     f"(here {clean:.3g}% of {len(y)})")
    return CheckResult("eps_growth", verdict[0], {**verdict[1],
        "attack": spec.label, "source": str(source), "n_examples": len(y), "robust_acc_by_eps": accs,
        "interval_by_eps": intervals,
        "unbounded_eps": unbounded, "limit": limit,
        "measured_on": f"the first {len(y)} test examples ({int(correct.sum())} clean-correct)",
    }), at_eps


def more_iterations(runner: AttackRunner, defense: str, spec: AttackSpec, source: Optional[GradientSource],
                    x: Tensor, y: Tensor, correct: Tensor,
                    bar: Optional[tqdm] = None) -> tuple[CheckResult, list[tuple[int, str, str]]]:
    """The check, and (index, attack label, run key) of the examples either of its two attacks broke
    (at the evaluation's ε; the first attack's where both did)."""
    accs: dict[str, float] = {}
    broken: dict[int, tuple[int, str, str]] = {}
    for s in (spec, doubled(spec)):
        key = check_key(defense, runner.threat.eps, s, source)
        res = runner.run(key, defense, s, source, x, y, correct, bar=bar)
        robust = correct.clone()
        robust[res.broken] = False
        accs[s.label] = percent(robust)
        for i in res.broken:
            broken.setdefault(i, (i, cell_label(s.label, source), key))
    base, more = accs[spec.label], accs[doubled(spec).label]
    tol = noise_tolerance(base / 100.0, len(y))
    clean = percent(correct)
    verdict = verdict_unless_certain(more <= base + tol, base + tol >= clean, examples_to_resolve(base, clean, len(y)))
    return CheckResult("more_iterations", verdict[0], {**verdict[1],
        "source": str(source), "n_examples": len(y), "robust_acc": accs,
        "intervals": {k: interval_of(v, len(y)) for k, v in accs.items()}, "tolerance_points": tol,
        "measured_on": f"the first {len(y)} test examples ({int(correct.sum())} clean-correct)",
    }), [broken[i] for i in sorted(broken)]


def square_vs_white_box(square: Optional[AttackCell], n_examples: int) -> CheckResult:
    if square is None:
        return CheckResult("square_vs_white_box", None, {"skipped": "the suite has no Square attack",
                                                          "needs": "a suite with the Square attack"})
    points = 100.0 * square.n_broken / max(n_examples, 1)
    limit = max(SQUARE_TOLERANCE_POINTS, 100.0 / max(n_examples, 1))  # never below one example
    most = 100.0 * square.n_attacked / max(n_examples, 1)  # Square can break at most every survivor
    verdict = verdict_unless_certain(points <= limit + 1e-9, most <= limit + 1e-9,
                                     f"more white-box survivors than {limit:.3g}% of the examples (here "
                                     f"{square.n_attacked} of {n_examples}; at least {int(100 / SQUARE_TOLERANCE_POINTS)} "
                                     "examples for the 0.5-point limit)")
    return CheckResult("square_vs_white_box", verdict[0], {**verdict[1],
        "square_extra_breaks": square.n_broken, "square_extra_points": points,
        "white_box_survivors": square.n_attacked, "limit_points": limit,
        "measured_on": f"the {square.n_attacked} test examples that survived every white-box attack (of {n_examples})",
    })


def gradients(cells: Sequence[AttackCell]) -> CheckResult:
    computed = sum(c.grad_computed for c in cells)
    zero = sum(c.grad_zero for c in cells)
    nonfinite = sum(c.grad_nonfinite for c in cells)
    bad = {cell_label(c.attack, c.source): {"zero": c.grad_zero, "nonfinite": c.grad_nonfinite}
           for c in cells if c.grad_zero or c.grad_nonfinite}
    return CheckResult("gradients", computed > 0 and zero == 0 and nonfinite == 0, {
        "computed": computed, "zero": zero, "nonfinite": nonfinite, "by_attack": bad,
        "measured_on": f"every per-example gradient of the {len(cells)} attack runs on this defense",
    })


DETERMINISM_PASSES, DETERMINISM_ALONE = 2, 4  # the batch twice, then this many examples alone


def deterministic_forward(runner: AttackRunner, defense: str, x: Tensor, n_single: int = DETERMINISM_ALONE) -> CheckResult:
    first = runner.logits(x, defense)
    second = runner.logits(x, defense)
    repeat_equal = bool(torch.equal(torch.nan_to_num(first, nan=0.0), torch.nan_to_num(second, nan=0.0)))
    single = torch.cat([runner.logits(x[i : i + 1], defense) for i in range(min(n_single, len(x)))])
    batch_diff = float((single - first[: len(single)]).abs().nan_to_num(0.0).max()) if len(single) else 0.0
    same_pred = bool((single.argmax(1) == first[: len(single)].argmax(1)).all())
    passed = repeat_equal and same_pred and batch_diff <= 1e-4
    details = {
        "repeat_bitwise_equal": repeat_equal, "alone_vs_batch_max_abs_diff": batch_diff,
        "alone_vs_batch_same_prediction": same_pred, "n_alone": len(single),
        "measured_on": f"the first {len(x)} test examples (the first {len(single)} also alone)",
    }
    if runner.target.deq is not None and Defense.parse(defense, runner.target.n_states).purify is not None:
        # a test-time defense: randomness would call for EOT
        details["eot"] = ("the purification is deterministic: no attack needs EOT" if passed else
                          "the purified forward is not deterministic: its attacks would need EOT")
    return CheckResult("deterministic_forward", passed, details)


def run_checks(runner: AttackRunner, suite: Suite, defense: Defense, x: Tensor, y: Tensor, correct: Tensor,
               source: Optional[GradientSource], attacked: list[AttackCell], square: Optional[AttackCell],
               mark: Callable[[list[int], str, str], None], robust: Tensor) -> list[CheckResult]:
    """Every check of one defense: the attacks with ``source`` (the strongest matrix source) on the
    first ``suite.sanity_examples`` test examples; ``attacked`` are the matrix and cascade cells whose
    gradients are checked.

    The checks' own attacks at the evaluation's ε are attacks too: what they break is handed to
    ``mark(indices, "attack|source", run key)`` (the per-example worst case, ``robust``, records
    it), and each check says how many of those breaks no suite attack had found
    (``breaks_beyond_suite``).
    """
    n = min(suite.sanity_examples, len(y))
    xs, ys, cs = x[:n], y[:n], correct[:n]
    runs = len(planned_attacks(runner.threat, xs[0].numel(), suite.matrix, suite.eps_multipliers))
    bar = runner.bar(runs, n, f"{defense}: sanity checks")
    name = str(defense)
    growth, growth_broken = eps_growth(runner, name, suite.matrix, source, xs, ys, cs, suite.eps_multipliers, bar=bar)
    iterations, iterations_broken = more_iterations(runner, name, suite.matrix, source, xs, ys, cs, bar=bar)
    bar.close()
    for check, broken in ((growth, growth_broken), (iterations, iterations_broken)):
        new = [(i, label, key) for i, label, key in broken if robust[i]]
        check.details["breaks_beyond_suite"] = len(new)
        by_attack: dict[tuple[str, str], list[int]] = {}
        for i, label, key in new:
            by_attack.setdefault((label, key), []).append(i)
        for (label, key), indices in by_attack.items():  # one mark per attack: its points are taken once
            mark(indices, f"{label} ({check.name} check)", key)
    return [
        growth,
        iterations,
        square_vs_white_box(square, len(y)),
        gradients(attacked),
        deterministic_forward(runner, name, xs),
    ]
