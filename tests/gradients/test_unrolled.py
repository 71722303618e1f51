"""Unrolled intermediates equal a hand-written unroll of z_n; ensembles are means."""

from __future__ import annotations

import pytest
import torch

from deqrobust.gradients import UnrollSettings, cross_entropy_objective, ensemble_weights, unrolled_gradients
from deqrobust.errors import ConfigError

from ..conftest import make_small_deq


@pytest.mark.parametrize("steps,damping,undamped_first", [(5, 0.5, False), (3, 1.0, True), (1, 0.5, True), (12, 0.3, False)])
def test_unrolled_state_gradient_equals_a_hand_written_unroll(steps, damping, undamped_first):
    model = make_small_deq(f_max_iter=6, f_tol=0.0)
    x = torch.randn(4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    states = model.solve(x, trace=True).info.states
    settings = UnrollSettings(steps, damping, undamped_first)
    grads = unrolled_gradients(model, x, {n: states[n - 1] for n in (1, 4)}, cross_entropy_objective(y), settings)
    for n in (1, 4):
        xl = x.clone().requires_grad_(True)
        e = model.stem(xl)
        z = states[n - 1].detach()
        if undamped_first:
            z = model.f(z, e)
        for _ in range(steps):
            z = (1 - damping) * z + damping * model.f(z, e)
        loss = torch.nn.functional.cross_entropy(model.head(z), y, reduction="sum")
        manual = torch.autograd.grad(loss, xl)[0]
        assert torch.allclose(grads[n], manual, rtol=1e-12, atol=1e-14)


def test_unrolled_first_state_depends_only_on_the_first_state():
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([2, 1, 0])
    g = {}
    for n_iter in (1, 9):
        model = make_small_deq(f_max_iter=n_iter, f_tol=0.0)
        z1 = model.solve(x, trace=True).info.states[0]
        g[n_iter] = unrolled_gradients(model, x, {1: z1}, cross_entropy_objective(y))[1]
    assert torch.equal(g[1], g[9])


@pytest.mark.parametrize("weights", ["uniform", "authors"])
def test_unrolled_ensemble_is_the_weighted_mean(weights):
    model = make_small_deq(f_max_iter=5, f_tol=0.0)
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([2, 1, 0])
    states = {n: z for n, z in enumerate(model.solve(x, trace=True).info.states, start=1)}
    per_state = unrolled_gradients(model, x, states, cross_entropy_objective(y))
    a = ensemble_weights(5, weights)
    ens = unrolled_gradients(model, x, states, cross_entropy_objective(y), weights=a)
    assert torch.allclose(ens, sum(a[n - 1] * per_state[n] for n in states), rtol=1e-10, atol=1e-13)


def test_unroll_settings_are_validated():
    with pytest.raises(ConfigError, match="at least one step"):
        UnrollSettings(steps=0)
    with pytest.raises(ConfigError, match="damping"):
        UnrollSettings(damping=0.0)
