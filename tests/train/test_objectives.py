"""Inner attacks, losses, the LR schedule, state encoding and sharded dev evaluation."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deqrobust.attacks.base import ThreatModel
from deqrobust.data import Split
from deqrobust.models import build_model
from deqrobust.train import evaluate_dev, load_config
from deqrobust.train.objectives import pgd_at_loss, pgd_craft, random_start, trades_craft, trades_loss
from deqrobust.train.state import capture_rng, decode, encode, restore_rng
from deqrobust.train.schedule import lr_at as _lr_at


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Dropout(0.5))


@settings(max_examples=25, deadline=None)
@given(eps=st.floats(0.01, 0.5), steps=st.integers(1, 4), norm=st.sampled_from(["Linf", "L2"]), seed=st.integers(0, 99))
def test_pgd_and_trades_stay_in_the_ball(eps, steps, norm, seed):
    torch.manual_seed(seed)
    model = linear_model(seed)
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 5, (6,))
    threat = ThreatModel(norm, eps)
    for x_adv in (pgd_craft(model, x, y, threat, eps / 4, steps)[0], trades_craft(model, x, threat, eps / 4, steps)):
        delta = (x_adv - x).reshape(6, -1)
        size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
        assert bool((size <= eps * (1 + 1e-5) + 1e-6).all()) and x_adv.min() >= 0 and x_adv.max() <= 1


def test_crafting_uses_eval_mode_and_leaves_parameters_alone():
    model = build_model("mdeq-tiny", num_classes=10, in_channels=1, grad="phantom").train()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    pgd_craft(model, x, y, ThreatModel("Linf", 0.1), 0.025, 2)
    assert seen and not any(seen) and model.training
    assert all(p.grad is None for p in model.parameters())


def test_pgd_hurts_a_trained_linear_model_and_tracks_fooled():
    torch.manual_seed(0)
    w = torch.randn(16, 5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    model[1].weight.data = w.T.clone()
    x = torch.rand(200, 1, 4, 4)
    y = model(x).argmax(1)
    x_adv, fooled = pgd_craft(model, x, y, ThreatModel("Linf", 0.2), 0.05, 10, track=True)
    adv_wrong = model(x_adv).argmax(1) != y
    noise_wrong = model(random_start(x, ThreatModel("Linf", 0.2))).argmax(1) != y
    assert adv_wrong.float().mean() > 0.25 and adv_wrong.float().mean() > 2 * noise_wrong.float().mean()
    assert bool((fooled | ~adv_wrong).all())  # anything wrong at the end was flagged


def test_random_start_is_uniform_in_the_box():
    x = torch.full((1, 1, 100, 100), 0.5)
    x0 = random_start(x, ThreatModel("Linf", 0.1))
    d = (x0 - x).flatten()
    assert d.abs().max() <= 0.1 + 1e-7 and abs(d.mean()) < 0.01 and d.std() > 0.05


def test_losses():
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    clean = torch.randn(8, 10)
    assert torch.isclose(pgd_at_loss(logits, y), F.cross_entropy(logits, y))
    mixed = pgd_at_loss(logits, y, clean, 0.25)
    assert torch.isclose(mixed, 0.75 * F.cross_entropy(logits, y) + 0.25 * F.cross_entropy(clean, y))
    kl = F.kl_div(F.log_softmax(logits, 1), F.softmax(clean, 1), reduction="sum") / 8
    assert torch.isclose(trades_loss(clean, logits, y, 6.0), F.cross_entropy(clean, y) + 6.0 * kl)


def test_cosine_schedule_per_iteration():
    config = load_config("cifar10-large-unroll-8-7")
    total = 220 * 100
    assert _lr_at(config, 0, total) == 1e-3
    assert math.isclose(_lr_at(config, total // 2, total), 5e-4)
    assert _lr_at(config, total, total) == 0.0
    lrs = [_lr_at(config, i, total) for i in range(0, total, 997)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_state_encoding_round_trips_optimizer_and_rng():
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors: dict = {}
    blob = encode({"optim": opt.state_dict(), "rng": capture_rng()}, "x", tensors)
    draws = (random.random(), np.random.rand(), torch.rand(3))
    restored = decode(json.loads(json.dumps(blob)), tensors)
    restore_rng(restored["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[0] == again[0] and draws[1] == again[1] and torch.equal(draws[2], again[2])
    opt2 = torch.optim.Adam(nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(restored["optim"])
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        for name, value in a["state"][k].items():
            assert torch.equal(value, b["state"][k][name])


def test_dev_evaluation_is_independent_of_sharding_and_batching():
    torch.manual_seed(0)
    model = build_model("mdeq-tiny", num_classes=10, in_channels=1)
    # Give BatchNorm sensible running statistics.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(64, 1, 8, 8))
    images = torch.rand(30, 1, 8, 8)
    labels = model.eval()(images).argmax(1)
    labels[::3] = (labels[::3] + 1) % 10
    split = Split(images, labels, "dev")
    kw = dict(alpha=0.025, steps=2, seed=3)
    whole = evaluate_dev(model, split, ThreatModel("Linf", 0.1), batch_size=30, **kw)
    parts = [
        evaluate_dev(model, split, ThreatModel("Linf", 0.1), batch_size=7, rank=r, world_size=2, **kw) for r in (0, 1)
    ]
    assert whole.total == 30 and sum(p.total for p in parts) == 30
    assert whole.clean_correct == sum(p.clean_correct for p in parts) == 20
    assert whole.robust_correct == sum(p.robust_correct for p in parts)
    assert whole.robust_correct <= whole.clean_correct
