"""DEQClassifier behaviour: bad input, settings validation, divergence policy, pretraining unroll."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqrobust import DEQClassifier
from deqrobust.errors import ConfigError, DEQInputError, DivergenceError

from ..conftest import ContractiveF, make_small_deq


def test_wrong_shape_nan_and_dtype_inputs_give_clear_errors():
    model = make_small_deq(input_shape=(4,))
    with pytest.raises(DEQInputError, match=r"expected input of shape \(B, 4\), got \(2, 5\)"):
        model(torch.randn(2, 5, dtype=torch.float64))
    x = torch.randn(3, 4, dtype=torch.float64)
    x[1, 2] = float("nan")
    with pytest.raises(DEQInputError, match=r"NaN or Inf \(samples \[1\]"):
        model(x)
    with pytest.raises(DEQInputError, match="floating-point"):
        model(torch.ones(2, 4, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(f_solver="newton"), "unknown f_solver 'newton'; valid: fixed_point, anderson, broyden"),
        (dict(grad="implicit"), "unknown grad 'implicit'; valid: exact, phantom"),
        (dict(f_solver_options={"m": 3}), "unknown option.*'m'.*broyden"),
        (dict(f_max_iter=0), "f_max_iter must be a positive integer"),
        (dict(phantom_damping=1.5), "phantom_damping"),
        (dict(on_divergence="skip"), "on_divergence"),
        (dict(f_maxiter=8), "unknown DEQClassifier setting.*'f_maxiter'.*valid: f_solver, f_max_iter"),
    ],
)
def test_bad_settings_are_rejected_with_the_valid_choices(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_small_deq(**kwargs)


class ExplodingF(nn.Module):
    def forward(self, z, e):
        return 5.0 * z + e  # no attracting fixed point for fixed-point iteration


def test_divergence_policies():
    stem, head = nn.Linear(2, 3), nn.Linear(3, 2)
    x = torch.randn(4, 2)
    for policy, check in (
        ("nan", lambda out: torch.isnan(out).all()),
        ("ignore", lambda out: torch.isfinite(out).all()),
    ):
        model = DEQClassifier(stem, ExplodingF(), head, f_solver="fixed_point", f_max_iter=40, on_divergence=policy)
        assert check(model(x))
        assert model.forward_with_info(x).info.diverged.all()
    model = DEQClassifier(stem, ExplodingF(), head, f_solver="fixed_point", f_max_iter=40, on_divergence="raise")
    with pytest.raises(DivergenceError, match="diverged on 4 of 4 samples"):
        model(x)


def test_forward_equals_head_of_output_state_and_is_deterministic():
    model = make_small_deq(grad="exact")
    x = torch.randn(3, 4, dtype=torch.float64)
    out = model.forward_with_info(x)
    assert torch.equal(model(x), out.logits)
    solve = model.solve(x)
    assert torch.allclose(out.z_out, model.f(solve.z_star, model.stem(x)))


def test_unrolled_forward_is_the_weight_tied_network():
    model = make_small_deq()
    x = torch.randn(2, 4, dtype=torch.float64)
    e = model.stem(x)
    z = torch.zeros_like(e)
    for _ in range(3):
        z = model.f(z, e)
    assert torch.allclose(model.unrolled_forward(x, 3), model.head(z))


def test_jacobian_loss_is_returned_and_differentiable():
    model = make_small_deq().train()
    out = model.forward_with_info(torch.randn(8, 4, dtype=torch.float64), jac_loss=True)
    assert out.jac_loss is not None and out.jac_loss.item() > 0
    out.jac_loss.backward()
    assert model.f.weight.grad is not None and model.f.weight.grad.abs().sum() > 0


def test_state_can_be_a_list_of_tensors():
    class TwoScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = ContractiveF(3, 0.5, 1)
            self.b = ContractiveF(2, 0.5, 2)
            self.mix = nn.Linear(3, 2)

        def init_state(self, e):
            return [torch.zeros(e.shape[0], 3, dtype=e.dtype), torch.zeros(e.shape[0], 2, dtype=e.dtype)]

        def forward(self, z, e):
            za = self.a(z[0], e)
            return [za, self.b(z[1], 0.3 * self.mix(za))]

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 2)

        def forward(self, z):
            return self.lin(torch.cat(z, dim=1))

    model = DEQClassifier(nn.Linear(4, 3), TwoScale(), Head(), f_max_iter=40, f_tol=1e-10, grad="exact").double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    logits = model(x)
    (g,) = torch.autograd.grad(logits.sum(), x)
    assert logits.shape == (3, 2) and torch.isfinite(g).all() and g.abs().sum() > 0
