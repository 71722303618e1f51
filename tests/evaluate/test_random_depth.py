"""A DEQ at a random depth at test time: expected accuracy over the depths, attacked with EOT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deqrobust.attacks import ThreatModel
from deqrobust.errors import ConfigError
from deqrobust.evaluate.random_depth import (DEPTH_ATTACKS, RandomDepthResult, depth_correct, depth_gradient,
                                              draw_depths, eot_gradient, evaluate_random_depth, expected_correct)
from deqrobust.train.tasks import DepthSampler

N = 5


@pytest.fixture
def model(small_deq):
    # A weak contraction and few steps: the prediction really changes with the depth.
    return small_deq(dim=6, in_dim=4, classes=3, scale=0.95, f_max_iter=N, f_solver="fixed_point",
                     b_max_iter=20, b_tol=1e-8)


def test_depth_correct_reads_the_output_that_training_draws(model):
    x = torch.rand(12, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    correct = depth_correct(model, x, y)
    sampler = DepthSampler(model, N)  # the training forward at a random depth
    for _ in range(2 * N):
        with torch.no_grad():
            hit = sampler(x).argmax(dim=1) == y
        assert torch.equal(hit, correct[:, sampler.depths[-1] - 1])
    assert torch.equal(expected_correct(model, x, y), correct.double().mean(dim=1))


def test_the_eot_gradient_is_the_gradient_of_the_mean_loss_over_the_depths(model):
    x = torch.rand(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    leaf = x.clone().requires_grad_(True)
    mean_loss = sum(F.cross_entropy(model.forward_with_info(leaf, max_iter=d).logits, y, reduction="sum")
                    for d in range(1, N + 1)) / N
    (hand,) = torch.autograd.grad(mean_loss, leaf)
    torch.testing.assert_close(eot_gradient(model, x, y), hand)
    # not the full depth's gradient alone (the attack that ignores the randomness)
    assert not torch.allclose(hand, depth_gradient(model, x, y, torch.full((7,), N)), atol=1e-6)


def test_a_depth_per_example_equals_each_example_alone(model):
    x = torch.rand(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    depths = torch.tensor([1, 3, 3, 5, 2, 1])
    mixed = depth_gradient(model, x, y, depths)
    for i, d in enumerate(depths.tolist()):
        torch.testing.assert_close(mixed[i:i + 1], depth_gradient(model, x[i:i + 1], y[i:i + 1], torch.tensor([d])))


def test_the_one_depth_attack_draws_uniformly_from_1_to_n():
    draws = torch.cat([draw_depths(8, torch.arange(400), step, seed=0) for step in range(20)])
    counts = torch.bincount(draws, minlength=9)
    assert counts[0] == 0 and int(counts.sum()) == 8000
    assert ((counts[1:] - 1000).abs() < 120).all(), counts.tolist()  # 1000 expected per depth, sd ~30
    # an example's draws do not depend on the rows beside it
    assert torch.equal(draw_depths(8, torch.tensor([5, 9]), 3, 0)[1], draw_depths(8, torch.tensor([9]), 3, 0)[0])


def test_attacks_lower_the_expected_accuracy_and_the_worst_case_is_the_minimum(model):
    torch.manual_seed(1)
    x = torch.rand(16, 4, dtype=torch.float64)
    y = model(x).argmax(dim=1)  # correct at full depth
    threat = ThreatModel("Linf", 0.3)
    result = evaluate_random_depth(model, x, y, threat, steps=4, seed=0, batch_size=7)
    assert set(result.attacks) == set(DEPTH_ATTACKS)
    assert result.attacks["eot"] < result.clean_acc
    assert result.worst_case_acc <= min(result.attacks.values())
    assert len(result.clean_per_depth) == N and result.clean_per_depth[-1] == 100.0
    assert result.clean_acc == pytest.approx(sum(result.clean_per_depth) / N)
    again = evaluate_random_depth(model, x, y, threat, steps=4, seed=0, batch_size=16)
    assert again.attacks == result.attacks  # seeded per example: the batch size changes nothing
    assert RandomDepthResult.from_json(result.to_json()) == result


@pytest.mark.parametrize("kwargs, match", [(dict(steps=0), "steps"), (dict(alpha=-0.1), "alpha"),
                                           (dict(batch_size=0), "batch_size")])
def test_bad_settings_are_named_before_any_compute(model, kwargs, match, monkeypatch):
    import deqrobust.evaluate.random_depth as module

    monkeypatch.setattr(module, "depth_correct", lambda *a, **k: pytest.fail("computed before the check"))
    with pytest.raises(ConfigError, match=match):
        evaluate_random_depth(model, torch.rand(2, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long),
                              ThreatModel("Linf", 0.1), **kwargs)


def test_a_network_without_a_solver_is_refused():
    with pytest.raises(ConfigError, match="needs a DEQ"):
        evaluate_random_depth(nn.Linear(4, 3), torch.rand(2, 4), torch.zeros(2, dtype=torch.long),  # type: ignore[arg-type]
                              ThreatModel("Linf", 0.1))
