"""A TorchDEQ model through DEQClassifier.from_torchdeq: the same logits as TorchDEQ's own eval-mode
output, the same exact (IFT) and phantom input gradients, every setting mapped or refused by name,
and the whole protocol on it.

Tolerances (float64, a contractive f with weight norm and variational dropout, solves converged to
1e-12): logits and gradients agree to 1e-8 absolute. They are not bitwise equal by design: TorchDEQ
stops a batch when its worst sample converges and returns f of its best iterate (fixed point,
Anderson), we stop per sample and return the lowest-residual iterate.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

torchdeq = pytest.importorskip("torchdeq")
from torchdeq import get_deq  # noqa: E402
from torchdeq.dropout import VariationalDropout, reset_dropout  # noqa: E402
from torchdeq.norm import apply_norm, reset_norm  # noqa: E402

from deqrobust import DEQClassifier  # noqa: E402
from deqrobust.attackable import attackable  # noqa: E402
from deqrobust.attacks import ThreatModel  # noqa: E402
from deqrobust.errors import ConfigError  # noqa: E402

D_IN, D, CLASSES = 5, 12, 3


class F(nn.Module):
    def __init__(self, p: float = 0.2):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.drop = VariationalDropout(p)

    def forward(self, z, u):
        return torch.tanh(0.6 * self.drop(self.lin(z)) + u)


class TorchDEQModel(nn.Module):
    """A model written the TorchDEQ way: reset_norm / reset_dropout at every forward."""

    def __init__(self, deq_kwargs: dict, solver_kwargs: dict | None = None, p: float = 0.2):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.f, self.head = nn.Linear(D_IN, D), F(p), nn.Linear(D, CLASSES)
        apply_norm(self.f, "weight_norm")
        self.deq = get_deq(core="indexing", **deq_kwargs)
        self.solver_kwargs = solver_kwargs or {}

    def forward(self, x):
        reset_norm(self.f)
        reset_dropout(self.f)
        u = self.stem(x)
        z0 = torch.zeros(x.shape[0], D, dtype=x.dtype)
        z_out, _ = self.deq(lambda z: self.f(z, u), z0, solver_kwargs=dict(self.solver_kwargs))
        return self.head(z_out[-1])

    def ours(self, **overrides) -> DEQClassifier:
        return DEQClassifier.from_torchdeq(self.stem, self.f, self.head, self.deq, solver_kwargs=self.solver_kwargs,
                                           **overrides)


SETTINGS = {
    "fixed_point": dict(f_solver="fixed_point_iter", f_max_iter=200, f_tol=1e-12, b_solver="fixed_point_iter",
                        b_max_iter=200, b_tol=1e-12),
    "anderson": dict(f_solver="anderson", f_max_iter=100, f_tol=1e-12, b_solver="anderson", b_max_iter=100,
                     b_tol=1e-12),
    "broyden": dict(f_solver="broyden", f_max_iter=60, f_tol=1e-12, b_solver="broyden", b_max_iter=60, b_tol=1e-12),
}


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, D_IN, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("solver", list(SETTINGS))
def test_final_logits_equal_torchdeq_eval_output(solver):
    model = TorchDEQModel(dict(SETTINGS[solver], ift=True), {"m": 5} if solver == "anderson" else None).double().eval()
    x, _ = batch()
    with torch.no_grad():
        theirs = model(x)
    ours = model.ours().eval()
    assert ours.f_solver == solver and ours.grad == "exact"
    assert torch.allclose(ours(x), theirs, rtol=0, atol=1e-8)


def input_grad(fn, x, y):
    xg = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(fn(xg), y, reduction="sum")
    return torch.autograd.grad(loss, xg)[0]


@pytest.mark.parametrize("solver", ["fixed_point", "broyden"])
def test_exact_input_gradient_equals_torchdeqs_ift_gradient(solver):
    model = TorchDEQModel(dict(SETTINGS[solver], ift=True), p=0.0).double()
    x, y = batch()
    model.train()  # TorchDEQ gives input gradients in train mode only (dropout is off: p = 0)
    theirs = input_grad(model, x, y)
    ours = model.ours().eval()
    assert torch.allclose(input_grad(attackable(ours, "final", "exact"), x, y), theirs, rtol=0, atol=1e-8)
    assert theirs.abs().max() > 1e-3


def test_phantom_input_gradient_equals_torchdeqs_phantom_gradient():
    model = TorchDEQModel(dict(SETTINGS["broyden"], ift=False, grad=4, tau=0.6), p=0.0).double()
    x, y = batch()
    model.train()
    theirs = input_grad(model, x, y)
    ours = model.ours().eval()
    assert (ours.grad, ours.phantom_steps, ours.phantom_damping, ours.phantom_undamped_first) == ("phantom", 4, 0.6, False)
    assert torch.allclose(input_grad(attackable(ours, "final", "phantom"), x, y), theirs, rtol=0, atol=1e-8)
    # The phantom gradient is not the exact one: the comparison would catch a wrong mapping.
    exact = input_grad(attackable(model.ours(grad="exact").eval(), "final", "exact"), x, y)
    assert (exact - theirs).abs().max() > 1e-4


def test_weight_norm_is_reset_before_each_solve():
    model = TorchDEQModel(dict(SETTINGS["anderson"], ift=True)).double().eval()
    ours = model.ours().eval()
    x, _ = batch()
    before = ours(x)
    with torch.no_grad():
        model.f.lin.weight_g.mul_(0.5)  # a new weight: TorchDEQ sees it only after reset_norm
    after = ours(x)
    with torch.no_grad():
        assert torch.allclose(after, model(x), rtol=0, atol=1e-8)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("kwargs, solver_kwargs, message", [
    (dict(hook_ift=True), None, "hook_ift"),
    (dict(n_states=2), None, "n_states"),
    (dict(b_stop_mode="rel"), None, "b_stop_mode"),
    (dict(grad=[2, 3], n_states=2), None, "n_states"),
    (dict(f_solver="simple_fixed_point_iter"), None, "simple_fixed_point_iter"),
    (dict(sup_gap=2), None, "sup_gap"),
    (dict(typo_setting=1), None, "typo_setting"),
    (dict(f_solver="broyden"), {"ls": True}, "ls"),
])
def test_a_setting_with_no_equivalent_is_an_error_naming_it(kwargs, solver_kwargs, message):
    deq = get_deq(core="indexing", **kwargs)
    with pytest.raises(ConfigError, match=message):
        DEQClassifier.from_torchdeq(nn.Linear(D_IN, D), F(), nn.Linear(D, CLASSES), deq, solver_kwargs=solver_kwargs)


def test_settings_map_to_ours():
    deq = get_deq(core="indexing", f_solver="anderson", f_max_iter=9, eval_f_max_iter=14, f_tol=1e-5, f_stop_mode="rel",
                  b_solver="broyden", b_max_iter=11, b_tol=1e-7, b_stop_mode="rel", grad=3, tau=0.7)
    model = DEQClassifier.from_torchdeq(nn.Linear(D_IN, D), F(), nn.Linear(D, CLASSES), deq,
                                        solver_kwargs={"m": 4, "lam": 1e-3, "tau": 0.9})
    assert (model.f_solver, model.f_max_iter, model.f_tol, model.f_stop_mode) == ("anderson", 14, 1e-5, "rel")
    assert (model.b_solver, model.b_max_iter, model.b_tol) == ("broyden", 11, 1e-7)
    assert (model.grad, model.phantom_steps, model.phantom_damping) == ("phantom", 3, 0.7)
    assert model.f_solver_options == {"m": 4, "lam": 1e-3, "beta": 0.9}


@pytest.mark.slow
def test_the_protocol_runs_on_a_torchdeq_model():
    from deqrobust.evaluate import evaluate, get_suite
    from deqrobust.evaluate.suites import AttackSpec

    model = TorchDEQModel(dict(f_solver="broyden", f_max_iter=6, f_tol=1e-4, b_solver="broyden", b_max_iter=6,
                               ift=True))
    ours = model.ours().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, D_IN, generator=g)
    with torch.no_grad():
        y = ours(x).argmax(1)  # labels the model gets right, so there is something to attack
    suite = get_suite("quick", dev_examples=12, sanity_examples=8, matrix=AttackSpec("pgd", steps=3),
                      cascade=(AttackSpec("apgd-ce", steps=2),), square=AttackSpec("square", queries=10),
                      boost=())
    result = evaluate(ours, dev=(x[:20], y[:20]), test=(x[20:], y[20:]), threat=ThreatModel("Linf", 0.3), suite=suite,
                      progress=False)
    assert result.protocol["mode"] == "adaptive" and result.candidate_selection is not None
    assert result.defense("final").clean_acc == 100.0
    assert result.autoattack_acc < 100.0  # ε = 0.3 on inputs in [0, 1]: the attacks break something
