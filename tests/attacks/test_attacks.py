"""Attacks stay in the ε-ball ∩ [0,1], run unmodified on attackable DEQs, and are seeded."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deqrobust.attackable import attackable
from deqrobust.attacks import APGD, APGDT, FABT, PGD, Square, ThreatModel, project
from deqrobust.attacks.base import distance
from deqrobust.models import mdeq

EPS = 0.1


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mdeq("tiny", num_classes=10, in_channels=1, f_max_iter=4, b_max_iter=4).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


def in_ball(x_adv, x, threat):
    return bool((distance(x_adv, x, threat.norm) <= threat.eps + 1e-6).all()) and x_adv.min() >= 0 and x_adv.max() <= 1


@given(
    x=st.lists(st.floats(0, 1), min_size=8, max_size=8),
    delta=st.lists(st.floats(-3, 3) | st.sampled_from([float("nan"), float("inf"), -float("inf")]), min_size=8, max_size=8),
    eps=st.floats(1e-3, 1.0),
    norm=st.sampled_from(["Linf", "L2"]),
)
@settings(max_examples=200, deadline=None)
def test_projection_lands_in_the_ball_and_the_box(x, delta, eps, norm):
    """Also for NaN/Inf coordinates (an attack fed NaN gradients): those fall back to the clean value."""
    x = torch.tensor([x], dtype=torch.float64)
    x_adv = x + torch.tensor([delta], dtype=torch.float64)
    threat = ThreatModel(norm, eps)
    projected = project(x_adv, x, threat)
    assert bool(torch.isfinite(projected).all()) and in_ball(projected, x, threat)
    bad = ~torch.isfinite(x_adv)
    if norm == "Linf":
        assert torch.equal(projected[bad], x[bad])


@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.01, 0.5), norm=st.sampled_from(["Linf", "L2"]))
@settings(max_examples=25, deadline=None)
def test_pgd_never_leaves_the_ball(seed, eps, norm):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    x = torch.rand(5, 1, 4, 4)
    y = torch.randint(0, 4, (5,))
    threat = ThreatModel(norm, eps)
    assert in_ball(PGD(model, threat, steps=3, seed=seed)(x, y), x, threat)


def test_pgd_is_seeded_and_lowers_accuracy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    x = torch.rand(64, 1, 4, 4)
    y = model(x).argmax(1)
    threat = ThreatModel("Linf", 0.3)
    a, b = PGD(model, threat, seed=3)(x, y), PGD(model, threat, seed=3)(x, y)
    assert torch.equal(a, b)
    assert not torch.equal(a, PGD(model, threat, seed=4)(x, y))
    assert (model(a).argmax(1) == y).float().mean() < 0.5


@pytest.mark.parametrize("gradient", ["exact", "phantom", "adjoint:2", "unrolled:3", "adjoint:ensemble", "unrolled:ensemble"])
def test_our_attacks_on_an_attackable_tiny_mdeq_stay_in_the_ball(tiny, batch, gradient):
    x, y = batch
    model = attackable(tiny, defense="early:2" if "adjoint" in gradient else "ensemble", gradient=gradient)
    threat = ThreatModel("Linf", EPS)
    attack = PGD(model, threat, steps=3)
    assert in_ball(attack(x, y), x, threat)
    assert attack.grad_stats["computed"] > 0 and attack.grad_stats["nonfinite"] == 0


@pytest.mark.slow
def test_pyautoattack_attacks_run_unmodified_on_an_attackable_tiny_mdeq(tiny, batch, caplog):
    from pyautoattack import AutoAttack

    x, y = batch
    threat = ThreatModel("Linf", EPS)
    model = attackable(tiny, defense="ensemble", gradient="unrolled:2")
    for attack in (
        APGD(model, threat, steps=4),
        APGDT(model, threat, steps=3, n_targets=2),
        FABT(model, threat, steps=3, n_targets=2),
        Square(model, threat, queries=30),
    ):
        x_adv = attack.perturb(x, y)  # the raw pyautoattack output, before our projection
        assert in_ball(x_adv, x, threat), attack

    # And AutoAttack's own driver, unmodified, with its checks (dynamic defense, classes).
    adversary = AutoAttack(attackable(tiny, "early:3", "adjoint:3"), norm="Linf", eps=EPS, version="custom",
                           attacks=["apgd-ce", "apgd-t", "fab-t", "square"], seed=0)
    adversary.apgd.n_iter = 3
    adversary.apgd_targeted.n_iter, adversary.apgd_targeted.n_target_classes = 2, 2
    adversary.fab.n_iter, adversary.fab.n_target_classes = 2, 2
    adversary.square.n_queries = 20
    with caplog.at_level(logging.DEBUG):
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=6)
    assert in_ball(x_adv, x, threat)
    assert "dynamic defense" not in caplog.text


@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 0.6)])
def test_square_attacks_flat_inputs_that_are_not_images(norm, eps):
    # A linear classifier on 16 flat features: Square (laid out on a padded grid) must break about
    # as many examples as white-box PGD does, within the ball of the real features.
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 3)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(24, 16, generator=g)
    y = model(x).argmax(1)
    threat = ThreatModel(norm, eps)
    x_adv = Square(lambda z: model(z).detach(), threat, queries=200, seed=0).perturb(x, y)
    assert x_adv.shape == x.shape and in_ball(x_adv, x, threat)
    broken = int((model(x_adv).argmax(1) != y).sum())
    white_box = int((model(PGD(model, threat, steps=20)(x, y)).argmax(1) != y).sum())
    assert broken >= 3 and 2 * broken >= white_box, (broken, white_box)


def test_torchattacks_pgd_runs_on_an_attackable_tiny_mdeq(tiny, batch):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    model = attackable(tiny, defense="early:2", gradient="unrolled:2")
    attack = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=3, random_start=True)
    x_adv = attack(x, y)
    assert in_ball(x_adv, x, ThreatModel("Linf", EPS))
    targeted = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=2)
    targeted.set_mode_targeted_by_function(lambda images, labels: (labels + 1) % 10)
    assert in_ball(targeted(x, y), x, ThreatModel("Linf", EPS))


def test_fab_untargeted_asks_for_per_class_gradients(tiny, batch):
    x, y = batch
    threat = ThreatModel("Linf", EPS)
    model = attackable(tiny, defense="final", gradient="adjoint:ensemble")
    assert in_ball(FABT(model, threat, steps=2, targeted=False)(x, y), x, threat)


def test_attack_input_validation():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="must lie in"):
        PGD(model, ThreatModel("Linf", 0.1))(torch.full((2, 4), 2.0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown norm"):
        ThreatModel("L1", 0.1)


class _Linear(torch.nn.Module):
    def __init__(self, masked: bool):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(64, 10)
        self.masked = masked

    def forward(self, x):
        x = x.detach() + 0 * x if self.masked else x  # masked: the value flows, the gradient is zero
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("make", [
    lambda m, t: APGD(m, t, steps=4), lambda m, t: APGDT(m, t, steps=4, n_targets=2),
    lambda m, t: FABT(m, t, steps=4, n_targets=2), lambda m, t: PGD(m, t, steps=4),
], ids=["apgd-ce", "apgd-t", "fab-t", "pgd"])
def test_every_gradient_attack_reports_its_gradient_statistics(make, batch):
    x, y = batch
    threat = ThreatModel("Linf", EPS)
    healthy = make(_Linear(masked=False).eval(), threat)
    healthy(x, y)
    assert healthy.grad_stats["computed"] > 0 and healthy.grad_stats["zero"] == 0
    masked = make(_Linear(masked=True).eval(), threat)
    masked(x, y)
    assert masked.grad_stats["computed"] > 0
    assert masked.grad_stats["zero"] == masked.grad_stats["computed"]  # every gradient was zero: caught
