"""Each obfuscation check can fail: fed the symptom it looks for, it says so, with the numbers."""

from __future__ import annotations

import torch

from deqrobust.attacks import ThreatModel
from deqrobust.evaluate import checks
from deqrobust.evaluate.results import AttackCell
from deqrobust.evaluate.runner import AttackRunner, UnitResult
from deqrobust.evaluate.state import EvalState
from deqrobust.evaluate.suites import AttackSpec


class ScriptedRunner:
    """Stands in for :class:`AttackRunner`: each attack label breaks the examples it is given."""

    threat = ThreatModel("Linf", 0.1)

    def __init__(self, broken_by_label):
        self.broken_by_label = broken_by_label

    def run(self, key, defense, spec, source, x, y, todo, threat=None, bar=None):
        return UnitResult(broken=[i for i in self.broken_by_label[spec.label] if todo[i]], attacked=int(todo.sum()))


def test_more_iterations_fails_when_more_iterations_help_the_defender():
    x, y, correct = torch.zeros(40, 1, 2, 2), torch.zeros(40, dtype=torch.long), torch.ones(40, dtype=torch.bool)
    # PGD-10 breaks 30 of 40 examples, PGD-20 only 5: robust accuracy 25% -> 87.5%.
    masked = ScriptedRunner({"pgd10": list(range(30)), "pgd20": list(range(5))})
    result, broken = checks.more_iterations(masked, "final", AttackSpec("pgd", steps=10), None, x, y, correct)
    assert not result.passed
    assert result.details["robust_acc"] == {"pgd10": 25.0, "pgd20": 87.5}
    assert [i for i, _, _ in broken] == list(range(30))  # both attacks' breaks go to the worst case
    honest = ScriptedRunner({"pgd10": list(range(30)), "pgd20": list(range(32))})
    assert checks.more_iterations(honest, "final", AttackSpec("pgd", steps=10), None, x, y, correct)[0].passed


class Noisy(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :3] + 1e-3 * torch.randn(len(x), 3)


class BatchDependent(torch.nn.Module):
    def forward(self, x):
        flat = x.flatten(1)[:, :3]
        return flat - flat.mean(dim=0, keepdim=True)  # a sample's output depends on the rest of its batch


def test_deterministic_forward_fails_for_a_random_or_batch_dependent_forward():
    x = torch.rand(6, 1, 2, 2)
    noisy = checks.deterministic_forward(AttackRunner(Noisy(), ThreatModel("Linf", 0.1), 0, EvalState(None, {})), "final", x)
    assert not noisy.passed and noisy.details["repeat_bitwise_equal"] is False
    batchy = checks.deterministic_forward(
        AttackRunner(BatchDependent(), ThreatModel("Linf", 0.1), 0, EvalState(None, {})), "final", x)
    assert not batchy.passed and batchy.details["repeat_bitwise_equal"] is True
    assert batchy.details["alone_vs_batch_max_abs_diff"] > 1e-4
    steady = AttackRunner(torch.nn.Flatten(), ThreatModel("Linf", 0.1), 0, EvalState(None, {}))
    assert checks.deterministic_forward(steady, "final", x).passed


def test_square_and_gradient_checks_fail_on_their_symptoms():
    square = AttackCell("square250", "none", "cascade", n_attacked=50, n_broken=3, robust_acc=40.0)
    assert not checks.square_vs_white_box(square, n_examples=100).passed  # 3 points > 0.5
    assert checks.square_vs_white_box(AttackCell("square250", "none", "cascade", 50, 0, 43.0), 100).passed
    zero = AttackCell("pgd10", "phantom", "matrix", 50, 0, 50.0, grad_computed=500, grad_zero=12)
    nonfinite = AttackCell("apgd-ce", "exact", "cascade", 50, 0, 50.0, grad_computed=300, grad_nonfinite=1)
    assert not checks.gradients([zero]).passed and not checks.gradients([nonfinite]).passed
    assert not checks.gradients([]).passed  # no gradient at all is no evidence
    assert checks.gradients([AttackCell("pgd10", "phantom", "matrix", 50, 0, 50.0, grad_computed=500)]).passed
