"""Attackable models: forward = defended logits exactly; backward = the chosen estimator."""

from __future__ import annotations

import pytest
import torch

from deqrobust.attackable import attackable
from deqrobust.defenses import defended_logits
from deqrobust.errors import ConfigError
from deqrobust.gradients import all_sources, cross_entropy_objective, simultaneous_adjoint, unrolled_gradients

from .conftest import make_small_deq

DEFENSES = ["final", "early:1", "early:3", "ensemble", "ensemble:trajectory"]


@pytest.mark.parametrize("grad", ["exact", "phantom"])
def test_forward_equals_the_defended_logits_for_every_source(grad):
    model = make_small_deq(f_max_iter=5, f_tol=1e-5, grad=grad, scale=0.9)
    x = torch.randn(4, 4, dtype=torch.float64)
    for defense in DEFENSES:
        expected = defended_logits(model, x, defense)
        for source in all_sources(model.n_states):
            wrapped = attackable(model, defense, source)
            assert torch.equal(wrapped(x), expected), (defense, source)
            xg = x.clone().requires_grad_(True)
            out = wrapped(xg)
            assert torch.equal(out.detach(), expected), (defense, source)
            (g,) = torch.autograd.grad(out.sum(), xg)
            assert torch.isfinite(g).all() and g.abs().sum() > 0, (defense, source)


def test_backward_is_the_estimator_for_the_incoming_cotangent():
    model = make_small_deq(f_max_iter=5, f_tol=0.0)
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])

    def attack_grad(defense, source):
        xg = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(attackable(model, defense, source)(xg), y, reduction="sum")
        return torch.autograd.grad(loss, xg)[0]

    # The cotangent of a CE loss at the defended logits (here: the final output).
    logits = defended_logits(model, x, "final")
    c = torch.softmax(logits, 1) - torch.nn.functional.one_hot(y, 3)
    from deqrobust.gradients.objective import CotangentObjective

    adj = simultaneous_adjoint(model, x, CotangentObjective(c), states="all", ensemble="uniform")
    assert torch.allclose(attack_grad("final", "adjoint:3"), adj.grads[3], rtol=1e-10, atol=1e-13)
    assert torch.allclose(attack_grad("final", "adjoint:ensemble"), adj.ensemble, rtol=1e-10, atol=1e-13)
    states = {n: z for n, z in enumerate(model.solve(x, trace=True).info.states, start=1)}
    unr = unrolled_gradients(model, x, states, CotangentObjective(c))
    assert torch.allclose(attack_grad("final", "unrolled:2"), unr[2], rtol=1e-10, atol=1e-13)
    # Ready-made exact: the model's own gradient.
    xg = x.clone().requires_grad_(True)
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)[0]
    assert torch.allclose(attack_grad("final", "exact"), ref, rtol=1e-10, atol=1e-13)


def generic_and_paper_adjoint(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = make_small_deq(f_max_iter=n, f_tol=0.0)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 1, 0])
    paper = simultaneous_adjoint(model, x, cross_entropy_objective(y), states=[n]).grads[n]
    # attackable's backward is the generic variant: it pulls back dCE/dlogits of the defended output
    # (here early:n), a cotangent fixed for the whole solve; the paper-exact variant evaluates the
    # loss at every state along the way, so the two differ only while the states still move.
    x_in = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(attackable(model, f"early:{n}", f"adjoint:{n}")(x_in), y, reduction="sum")
    return torch.autograd.grad(loss, x_in)[0], paper


def test_generic_adjoint_matches_the_paper_exact_variant_once_the_states_settle():
    generic, paper = generic_and_paper_adjoint(4)
    assert paper.abs().max() > 1e-3
    assert torch.nn.functional.cosine_similarity(generic.flatten(), paper.flatten(), dim=0) > 0.999
    assert not torch.allclose(generic, paper, rtol=1e-6)  # early states still move: not the same objective
    generic, paper = generic_and_paper_adjoint(30)
    assert torch.allclose(generic, paper, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "defense,gradient,match",
    [
        ("final", "adjoint:0", r"invalid gradient source 'adjoint:0' for a DEQ with N=5 states; valid: exact, phantom"),
        ("final", "unrolled:6", "invalid gradient source"),
        ("final", "ajdoint:2", "invalid gradient source"),
        ("early:6", "exact", r"invalid defense 'early:6'.*valid: final, early:<n>"),
    ],
)
def test_bad_specs_give_errors_listing_the_valid_ones(defense, gradient, match):
    model = make_small_deq(f_max_iter=5)
    with pytest.raises(ConfigError, match=match):
        attackable(model, defense, gradient)


def test_an_attack_library_that_restores_the_mode_leaves_an_eval_model_in_eval():
    # torchattacks restores "the model's mode" after an attack: model.train() when the wrapper says
    # training. A fresh nn.Module says training, so the wrapper has to report the DEQ's own mode.
    torchattacks = pytest.importorskip("torchattacks")
    model = make_small_deq().eval()
    x, y = torch.rand(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    wrapped = attackable(model, "final", "unrolled:3")
    assert not wrapped.training
    torchattacks.PGD(wrapped, eps=0.1, alpha=0.025, steps=2)(x, y)
    assert not any(m.training for m in model.modules())
