"""Exact (implicit) and phantom gradients of DEQClassifier, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from deqrobust.core.phantom import phantom_output
from deqrobust.solvers import SOLVERS

from ..conftest import make_small_deq


def loss_of(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def central_difference(fn, t, eps=1e-6):
    grad = torch.zeros_like(t)
    flat = t.view(-1)
    for i in range(flat.numel()):
        orig = flat[i].item()
        flat[i] = orig + eps
        plus = fn()
        flat[i] = orig - eps
        minus = fn()
        flat[i] = orig
        grad.view(-1)[i] = (plus - minus) / (2 * eps)
    return grad


@pytest.mark.parametrize("b_solver", ["broyden", "fixed_point", "anderson"])
def test_exact_input_and_parameter_gradients_match_finite_differences(b_solver):
    model = make_small_deq(grad="exact", b_solver=b_solver, b_max_iter=200)
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    x.requires_grad_(True)
    loss = loss_of(model, x, y)
    gx, gw, gb = torch.autograd.grad(loss, [x, model.f.weight, model.stem.weight])
    with torch.no_grad():
        x_fd = central_difference(lambda: loss_of(model, x, y).item(), x.data)
        w_fd = central_difference(lambda: loss_of(model, x, y).item(), model.f.weight.data)
        b_fd = central_difference(lambda: loss_of(model, x, y).item(), model.stem.weight.data)
    for analytic, numeric in ((gx, x_fd), (gw, w_fd), (gb, b_fd)):
        rel = (analytic - numeric).norm() / numeric.norm()
        assert rel < 1e-4, rel


def test_exact_gradient_equals_autograd_through_long_unrolled_iteration():
    model = make_small_deq(grad="exact")
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    params = [p for p in model.parameters() if p.requires_grad]
    g_exact = torch.autograd.grad(loss_of(model, x, y), [x, *params])

    e = model.stem(x)
    z = torch.zeros_like(e)
    for _ in range(300):
        z = model.f(z, e)
    loss_unrolled = torch.nn.functional.cross_entropy(model.head(z), y)
    g_unrolled = torch.autograd.grad(loss_unrolled, [x, *params])
    assert len(params) >= 4  # stem, f and head weights and biases all take part
    for a, b in zip(g_exact, g_unrolled):  # the input gradient, then every parameter's
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("undamped_first", [False, True])
@pytest.mark.parametrize("steps,damping", [(5, 0.5), (3, 1.0), (9, 0.5)])
def test_phantom_gradient_equals_autograd_through_the_same_damped_steps(steps, damping, undamped_first):
    model = make_small_deq(grad="phantom", phantom_steps=steps, phantom_damping=damping,
                           phantom_undamped_first=undamped_first, f_max_iter=6, f_tol=0.0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([2, 0, 1])
    loss = loss_of(model, x, y)
    gx, gw = torch.autograd.grad(loss, [x, model.f.weight])

    solve = model.solve(x.detach())
    e = model.stem(x)
    z = solve.z_star.detach()
    if undamped_first:
        z = model.f(z, e)
    for _ in range(steps):
        z = (1 - damping) * z + damping * model.f(z, e)
    ref = torch.nn.functional.cross_entropy(model.head(z), y)
    rx, rw = torch.autograd.grad(ref, [x, model.f.weight])
    assert torch.allclose(gx, rx, rtol=1e-12, atol=1e-14)
    assert torch.allclose(gw, rw, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("grad", ["exact", "phantom"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_eval_mode_gives_nonzero_finite_input_gradient(grad, solver):
    model = make_small_deq(grad=grad, f_solver=solver, f_max_iter=8, f_tol=1e-3, b_max_iter=8).float().eval()
    x = torch.randn(5, 4, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1]))
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all()
    assert (g.abs().sum(dim=1) > 0).all()


def test_exact_gradient_supports_repeated_backward_with_retained_graph():
    """FAB asks for one backward per class on the same graph."""
    model = make_small_deq(grad="exact")
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    logits = model(x)
    rows = []
    for k in range(3):
        (g,) = torch.autograd.grad(logits[:, k].sum(), x, retain_graph=True)
        rows.append(g)
    full = jacobian(lambda inp: model(inp).sum(0), x.detach())  # (3, 2, 4)
    for k in range(3):
        assert torch.allclose(rows[k], full[k], rtol=1e-6, atol=1e-9)


def test_phantom_output_without_steps_is_the_detached_state():
    z = torch.randn(2, 3, requires_grad=True)
    out = phantom_output(lambda t: t * 2, z, steps=0)
    assert not out.requires_grad and torch.equal(out, z.detach())
