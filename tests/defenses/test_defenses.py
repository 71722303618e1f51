"""Defenses: early exit and ensemble of states from the traced solve; O(1) memory in N."""

from __future__ import annotations

import pytest
import torch

from deqrobust.defenses import Defense, defended_forward, defended_logits, defended_logits_many
from deqrobust.errors import ConfigError
from deqrobust.utils.memory import peak_memory

from ..conftest import ContractiveF, make_small_deq


@pytest.mark.parametrize("grad", ["exact", "phantom"])
def test_early_exit_is_the_head_of_the_traced_state(grad):
    model = make_small_deq(f_max_iter=8, f_tol=1e-6, grad=grad)
    x = torch.randn(5, 4, dtype=torch.float64)
    states = model.solve(x, trace=True).info.states
    for n in (1, 3, 8):
        assert torch.equal(defended_logits(model, x, f"early:{n}"), model.head(states[n - 1]))


@pytest.mark.parametrize("grad", ["exact", "phantom"])
def test_ensemble_is_the_head_of_the_mean_of_the_traced_states(grad):
    model = make_small_deq(f_max_iter=8, f_tol=0.0, grad=grad)
    x = torch.randn(5, 4, dtype=torch.float64)
    states = model.solve(x, trace=True).info.states
    z_out = model.forward_with_info(x).z_out.detach()
    with_output = torch.stack(states + [z_out]).mean(0)
    assert torch.allclose(defended_logits(model, x, "ensemble"), model.head(with_output), rtol=1e-12, atol=1e-14)
    trajectory = torch.stack(states).mean(0)
    assert torch.allclose(defended_logits(model, x, "ensemble:trajectory"), model.head(trajectory), rtol=1e-12, atol=1e-14)


def test_final_defense_is_the_model_forward():
    for grad in ("exact", "phantom"):
        model = make_small_deq(f_max_iter=8, grad=grad)
        x = torch.randn(5, 4, dtype=torch.float64)
        assert torch.equal(defended_logits(model, x, "final"), model(x))


def test_keeping_more_states_never_changes_the_logits():
    model = make_small_deq(f_max_iter=8, f_tol=1e-5, scale=0.9)
    x = torch.randn(6, 4, dtype=torch.float64)
    for spec in ("final", "early:2", "ensemble"):
        plain = defended_logits(model, x, spec)
        richer = defended_forward(model, x, spec, keep_states=range(1, 9), full_solve=True)
        assert torch.equal(plain, richer.logits)


@pytest.mark.parametrize("on_divergence", ["nan", "ignore"])
def test_one_solve_gives_every_defense_the_logits_of_its_own_solve(on_divergence):
    model = make_small_deq(f_max_iter=8, f_tol=1e-5, scale=0.9)
    model.on_divergence = on_divergence
    x = torch.randn(6, 4, dtype=torch.float64)
    specs = ["early:2", "final", "ensemble", "early:5", "ensemble:trajectory"]
    for subset in (specs, ["early:2", "early:5"], ["ensemble:trajectory"]):
        shared = defended_logits_many(model, x, subset)
        assert len(shared) == len(subset)
        for spec, logits in zip(subset, shared):
            assert torch.equal(logits, defended_logits(model, x, spec)), spec


def test_one_solve_for_every_defense_runs_the_solver_once(monkeypatch):
    model = make_small_deq(f_max_iter=8, f_tol=0.0)
    calls = []
    original = type(model).solve
    monkeypatch.setattr(type(model), "solve", lambda self, *a, **k: calls.append(k.get("max_iter")) or original(self, *a, **k))
    defended_logits_many(model, torch.randn(3, 4, dtype=torch.float64), ["early:3", "final", "ensemble"])
    assert calls == [8]
    calls.clear()
    defended_logits_many(model, torch.randn(3, 4, dtype=torch.float64), ["early:3", "early:6"])
    assert calls == [6]  # early exits only: as many steps as the latest of them


@pytest.mark.parametrize("spec", ["early:0", "early:9", "middle", "early:two", "ensemble:all"])
def test_bad_defense_specs_list_the_valid_ones(spec):
    with pytest.raises(ConfigError, match=r"valid: final, early:<n> \(1 <= n <= 8\), ensemble"):
        Defense.parse(spec, 8)


class ShiftF(torch.nn.Module):
    """A cheap contraction on large states: ``0.5 tanh(roll(z)) + e`` (no dense matrix)."""

    def forward(self, z, e):
        return 0.5 * torch.tanh(torch.roll(z, 1, dims=1)) + e


def _wide_deq(solver, n_steps, options):
    from deqrobust import DEQClassifier

    torch.manual_seed(0)
    return DEQClassifier(torch.nn.Linear(16, 8192), ShiftF(), torch.nn.Linear(8192, 3), f_solver=solver,
                         f_max_iter=n_steps, f_tol=0.0, f_solver_options=options).eval()


@pytest.mark.parametrize("solver,options", [("fixed_point", {}), ("anderson", {}), ("broyden", {"memory": 8})])
def test_ensemble_and_early_exit_memory_do_not_grow_with_the_number_of_steps(solver, options):
    x = torch.randn(32, 16)
    peak = {n: peak_memory(lambda: defended_logits(_wide_deq(solver, n, options), x, "ensemble")) for n in (8, 64)}
    assert peak[64] <= 1.05 * peak[8], peak
    early = {n: peak_memory(lambda: defended_logits(_wide_deq(solver, n, options), x, "early:4")) for n in (8, 64)}
    assert early[64] <= 1.05 * early[8], early
    # The measurement does see stored states: a traced solve grows by the 64 states it keeps.
    model = _wide_deq(solver, 64, options)
    traced = peak_memory(lambda: model.solve(x, trace=True))
    untraced = peak_memory(lambda: model.solve(x))
    assert traced - untraced >= 0.9 * 64 * x.shape[0] * 8192 * 4
