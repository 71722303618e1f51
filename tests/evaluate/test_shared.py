"""Runs that differ only in defense share one PGD trajectory (one solve judges every defense):
the shared path gives each defense exactly what its own run gives."""

from __future__ import annotations

import pytest
import torch

from deqrobust.attacks import ThreatModel
from deqrobust.defenses import Defense
from deqrobust.evaluate.runner import AttackRunner
from deqrobust.evaluate.state import EvalState
from deqrobust.evaluate.suites import AttackSpec
from deqrobust.gradients import GradientSource

from .test_protocol import EPS

N = 48
DEFENSES = [Defense("final"), Defense("early", 1), Defense("ensemble"), Defense("early", 2)]


def runner_for(model, path=None, batch_size=16):
    return AttackRunner(model, ThreatModel("Linf", EPS), 3, EvalState(path, {"test": "shared"}), batch_size)


def populations(runner, x, y):
    """Per defense: its clean-correct examples, minus a defense-specific few (so the sets differ)."""
    todos = []
    for j, defense in enumerate(DEFENSES):
        correct, _ = runner.clean(defense, x, y)
        correct[j::len(DEFENSES) + 1] = False
        todos.append(correct)
    return todos


@pytest.mark.parametrize("source, restarts", [("adjoint:ensemble", 1), ("unrolled:2", 2)])
def test_the_shared_trajectory_gives_every_defense_its_own_runs_result(clean_tiny, digits, source, restarts):
    x, y = digits.test.images[:N], digits.test.labels[:N]
    spec = AttackSpec("pgd", steps=5, restarts=restarts)
    src = GradientSource.parse(source, clean_tiny.n_states)
    alone, shared = runner_for(clean_tiny), runner_for(clean_tiny)
    assert alone.shareable(spec, src)
    todos = populations(alone, x, y)
    keys = [f"test/{d}/matrix/{spec.label}/{source}" for d in DEFENSES]
    expected = [alone.run(k, d, spec, src, x, y, t) for k, d, t in zip(keys, DEFENSES, todos)]

    shared.run_shared(list(zip(keys, DEFENSES, todos)), spec, src, x, y)
    got = [shared.run(k, d, spec, src, x, y, t) for k, d, t in zip(keys, DEFENSES, todos)]
    for d, e, g in zip(DEFENSES, expected, got):
        assert sorted(g.broken) == sorted(e.broken), d
        assert sorted(g.nonfinite) == sorted(e.nonfinite) and g.attacked == e.attacked, d
    assert sum(len(e.broken) for e in expected) > 0  # the attack broke something: the comparison has teeth
    assert len({tuple(sorted(e.broken)) for e in expected}) > 1  # and the defenses differ
    assert shared.executed == keys


def test_the_shared_path_costs_less_than_one_run_per_defense(clean_tiny, digits, monkeypatch):
    x, y = digits.test.images[:N], digits.test.labels[:N]
    spec, src = AttackSpec("pgd", steps=4), GradientSource("adjoint", None)
    counts = {"solves": 0}
    solve = type(clean_tiny).solve

    def counting(self, *args, **kwargs):
        counts["solves"] += 1
        return solve(self, *args, **kwargs)

    runner = runner_for(clean_tiny, batch_size=N)
    todos = populations(runner, x, y)
    keys = [f"dev/{d}/{spec.label}/{src}" for d in DEFENSES]
    monkeypatch.setattr(type(clean_tiny), "solve", counting)
    for k, d, t in zip(keys, DEFENSES, todos):
        runner_for(clean_tiny, batch_size=N).run(k, d, spec, src, x, y, t)
    separate, counts["solves"] = counts["solves"], 0
    runner.run_shared(list(zip(keys, DEFENSES, todos)), spec, src, x, y)
    assert counts["solves"] < 0.6 * separate


def test_a_shared_run_resumes_from_its_saved_units(clean_tiny, digits, tmp_path, monkeypatch):
    x, y = digits.test.images[:N], digits.test.labels[:N]
    spec, src = AttackSpec("pgd", steps=3), GradientSource("unrolled", None)
    first = runner_for(clean_tiny, tmp_path / "state.json")
    todos = populations(first, x, y)
    runs = [(f"dev/{d}/{spec.label}/{src}", d, t) for d, t in zip(DEFENSES, todos)]
    first.run_shared(runs, spec, src, x, y)
    results = [first.run(k, d, spec, src, x, y, t).broken for k, d, t in runs]

    again = AttackRunner(clean_tiny, ThreatModel("Linf", EPS), 3, EvalState(tmp_path / "state.json", {"test": "shared"}),
                         16)
    monkeypatch.setattr("deqrobust.evaluate.runner.SharedPGD", None)  # nothing may run again
    again.run_shared(runs, spec, src, x, y)
    assert [again.run(k, d, spec, src, x, y, t).broken for k, d, t in runs] == results


def test_a_ready_made_source_is_not_shared(clean_tiny):
    runner = runner_for(clean_tiny)
    assert not runner.shareable(AttackSpec("pgd", steps=3), runner.target.ready_made)
    assert not runner.shareable(AttackSpec("apgd-ce", steps=3), GradientSource("adjoint", 2))
    with pytest.raises(ValueError, match="cannot share"):
        x = torch.rand(4, 1, 8, 8)
        runner.run_shared([("a/final/x", Defense("final"), torch.ones(4, dtype=torch.bool)),
                           ("a/early:2/x", Defense("early", 2), torch.ones(4, dtype=torch.bool))],
                          AttackSpec("pgd", steps=3), runner.target.ready_made, x, torch.zeros(4, dtype=torch.long))
