"""Objectives are task modules chosen from a registry; training's inner attacks are the one PGD."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deqrobust.attacks import PGD, ThreatModel
from deqrobust.attacks.steps import random_start, start_noise
from deqrobust.errors import ConfigError
from deqrobust.train import apply_overrides, load_config, train
from deqrobust.train.objectives import pgd_craft, trades_craft
from deqrobust.train.tasks import TASKS, Task, register_task

SMALL = ["run.epochs=2", "data.train_subset=64", "run.batch_size=32", "pretrain.iterations=1", "attack.steps=1",
         "eval.pgd_steps=1", "eval.dev_examples=16"]


def test_a_new_objective_is_one_class_and_one_registry_line(tmp_path):
    calls = {"inputs": 0, "loss": 0}

    class NoisyClean(Task):  # a toy objective: cross-entropy on uniformly noised inputs
        name = "toy-noisy-clean"

        def inputs(self, model, x, y):
            calls["inputs"] += 1
            return [(x + self.threat.eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)]

        def loss(self, logits, y):
            calls["loss"] += 1
            return F.cross_entropy(logits[0], y), logits[0]

    with pytest.raises(ConfigError, match="toy-noisy-clean"):
        apply_overrides(load_config("digits-tiny-unroll"), ["attack.objective=toy-noisy-clean"])
    register_task(NoisyClean)
    try:
        config = apply_overrides(load_config("digits-tiny-unroll"), [*SMALL, "attack.objective=toy-noisy-clean"])
        result = train(config, tmp_path, progress=False)
    finally:
        TASKS.pop("toy-noisy-clean")
    # 4 iterations: the first is the clean pretraining (its own task), the other 3 are the toy's.
    assert result.iterations == 4 and calls == {"inputs": 3, "loss": 3}
    assert [r["objective"] for r in result.history] == ["toy-noisy-clean"] * 2
    assert math.isfinite(result.history[-1]["train_loss"])


def test_register_task_refuses_what_is_not_a_named_task():
    with pytest.raises(TypeError):
        register_task(Task)
    with pytest.raises(TypeError):
        register_task(nn.Linear)  # type: ignore[arg-type]


def test_training_crafts_with_the_evaluation_pgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    x, y = torch.rand(12, 1, 4, 4), torch.randint(0, 5, (12,))
    for norm, eps in (("Linf", 0.1), ("L2", 0.5)):
        threat = ThreatModel(norm, eps)
        torch.manual_seed(3)
        crafted, _ = pgd_craft(model, x, y, threat, eps / 4, 4)
        torch.manual_seed(3)  # the same global-RNG start, through the evaluation's class
        attack = PGD(model, threat, steps=4, alpha=eps / 4, seed=None, early_stop=False)
        assert torch.equal(crafted, attack.perturb(x, y))
    x_adv = trades_craft(model, x, ThreatModel("Linf", 0.1), 0.025, 3)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(x_adv, x)


def test_the_l2_random_start_has_a_uniform_radius_for_every_caller():
    # One rule: direction of the noise, radius ε·|noise[0]| ~ U(0, ε). A start on the sphere (radius
    # ε for all) or a radius drawn another way for one caller would fail here.
    x = torch.full((4000, 1, 4, 4), 0.5)
    threat = ThreatModel("L2", 0.4)
    g = torch.Generator().manual_seed(0)
    starts = [random_start(x, threat), random_start(x, threat, start_noise(x, g))]
    attack = PGD(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), threat, steps=1, seed=5)
    starts.append(attack._start(x, torch.Generator().manual_seed(5)))
    seeded = PGD(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), threat, steps=1, example_seeds=torch.arange(len(x)))
    starts.append(seeded._start(x, None))  # the evaluation's per-example starts
    for start in starts:
        radius = torch.linalg.vector_norm((start - x).flatten(1), dim=1) / threat.eps
        assert radius.max() <= 1 + 1e-5
        assert abs(radius.mean().item() - 0.5) < 0.02 and abs((radius < 0.25).float().mean().item() - 0.25) < 0.03
