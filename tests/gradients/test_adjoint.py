"""Simultaneous adjoint: converges to the exact gradient, per-state locality, ensembles."""

from __future__ import annotations

import pytest
import torch

from deqrobust.gradients import cross_entropy_objective, ensemble_weights, simultaneous_adjoint
from deqrobust.gradients.objective import CotangentObjective

from ..conftest import make_small_deq


def exact_input_gradient(x, y, scale, f_solver):
    model = make_small_deq(scale=scale, grad="exact", f_solver=f_solver, f_max_iter=300, f_tol=1e-13)
    x = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
    return torch.autograd.grad(loss, x)[0]


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("f_solver,scale", [("broyden", 0.9), ("fixed_point", 0.8)])
@pytest.mark.parametrize("beta", [1.0, 0.7])
@pytest.mark.parametrize("pairing", ["literal", "fresh"])
def test_adjoint_at_the_last_state_converges_to_the_exact_gradient(f_solver, scale, beta, pairing):
    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    reference = exact_input_gradient(x, y, scale, f_solver)
    errors = []
    for n in (3, 10, 40):
        model = make_small_deq(scale=scale, f_solver=f_solver, f_max_iter=n, f_tol=0.0)
        out = simultaneous_adjoint(model, x, cross_entropy_objective(y), states=[n], beta=beta, pairing=pairing)
        errors.append(((out.grads[n] - reference).norm() / reference.norm()).item())
        last_cos = cosine(out.grads[n], reference)
    assert last_cos >= 0.99
    assert errors[-1] < errors[0] and errors[-1] <= errors[1] + 1e-12, errors
    assert errors[-1] < 1e-3


def test_adjoint_first_state_depends_only_on_the_first_step():
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    long = make_small_deq(f_max_iter=8, f_tol=0.0)
    short = make_small_deq(f_max_iter=1, f_tol=0.0)
    g_long = simultaneous_adjoint(long, x, cross_entropy_objective(y), states=[1]).grads[1]
    g_short = simultaneous_adjoint(short, x, cross_entropy_objective(y), states=[1]).grads[1]
    assert torch.equal(g_long, g_short)

    # By hand: u_1 = β ∂L(h(z_0))/∂z_0 (B_0 = -I, u_0 = 0) and G_1 = J_{f,x}(z_1)ᵀ u_1.
    beta = 0.8
    g = simultaneous_adjoint(long, x, cross_entropy_objective(y), states=[1], beta=beta).grads[1]
    xl = x.clone().requires_grad_(True)
    e = long.stem(xl)
    z0 = torch.zeros_like(e, requires_grad=True)
    loss0 = torch.nn.functional.cross_entropy(long.head(z0), y, reduction="sum")
    u1 = beta * torch.autograd.grad(loss0, z0)[0]
    z1 = long.f(torch.zeros_like(e), e).detach()
    manual = torch.autograd.grad(long.f(z1, e), xl, u1)[0]
    assert torch.allclose(g, manual, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("weights", ["uniform", "authors"])
def test_adjoint_ensemble_is_the_weighted_mean_of_the_per_state_gradients(weights):
    model = make_small_deq(f_max_iter=6, f_tol=0.0)
    x = torch.randn(4, 4, dtype=torch.float64)
    c = torch.randn(4, 3, dtype=torch.float64)
    out = simultaneous_adjoint(model, x, CotangentObjective(c), states="all", ensemble=weights)
    a = ensemble_weights(6, weights)
    expected = sum(a[n - 1] * out.grads[n] for n in range(1, 7))
    assert torch.allclose(out.ensemble, expected, rtol=1e-10, atol=1e-12)
    if weights == "uniform":
        assert torch.allclose(out.ensemble, torch.stack(list(out.grads.values())).mean(0), rtol=1e-10, atol=1e-12)


def test_cotangent_variant_matches_loss_variant_for_a_linear_loss():
    """<c, logits> as a loss and as a cotangent are the same objective."""
    model = make_small_deq(f_max_iter=5, f_tol=0.0)
    x = torch.randn(3, 4, dtype=torch.float64)
    c = torch.randn(3, 3, dtype=torch.float64)
    from deqrobust.gradients.objective import LossObjective

    a = simultaneous_adjoint(model, x, CotangentObjective(c)).grads
    b = simultaneous_adjoint(model, x, LossObjective(lambda logits, _: (logits * c).sum(1), c)).grads
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-12, atol=1e-14)


def test_adjoint_per_sample_independence():
    model = make_small_deq(f_max_iter=7, f_tol=1e-4, scale=0.9)
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    batch = simultaneous_adjoint(model, x, cross_entropy_objective(y), ensemble="uniform")
    for i in (0, 9):
        alone = simultaneous_adjoint(model, x[i : i + 1], cross_entropy_objective(y[i : i + 1]), ensemble="uniform")
        for n in batch.grads:
            assert torch.allclose(alone.grads[n][0], batch.grads[n][i], rtol=1e-10, atol=1e-13)
        assert torch.allclose(alone.ensemble[0], batch.ensemble[i], rtol=1e-10, atol=1e-13)


def test_bad_adjoint_arguments():
    from deqrobust.errors import ConfigError

    model = make_small_deq(f_max_iter=4)
    x = torch.randn(2, 4, dtype=torch.float64)
    obj = cross_entropy_objective(torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match=r"out of range; valid: 1..4"):
        simultaneous_adjoint(model, x, obj, states=[0])
    with pytest.raises(ConfigError, match="pairing"):
        simultaneous_adjoint(model, x, obj, pairing="late")
    with pytest.raises(ConfigError, match="beta"):
        simultaneous_adjoint(model, x, obj, beta=0.0)
