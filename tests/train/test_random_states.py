"""Random intermediate states (the follow-up's training method): every forward at a depth drawn
uniformly from 1..N — each of the inner attack's and each of the loss's."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from deqrobust import DEQClassifier
from deqrobust.data import load_dataset
from deqrobust.errors import ConfigError
from deqrobust.models import build_model
from deqrobust.train import apply_overrides, load_config, train
from deqrobust.train.tasks import DepthSampler, RandomStates, StepSetup, TrainForward, objective_task

SMALL = ["run.epochs=2", "data.train_subset=64", "run.batch_size=32", "pretrain.iterations=1", "attack.steps=2",
         "eval.pgd_steps=1", "eval.dev_examples=16"]


def tiny(n: int = 8) -> DEQClassifier:
    torch.manual_seed(0)
    return build_model("mdeq-tiny", 10, 1, f_max_iter=n, b_max_iter=n, grad="phantom")


def test_the_depth_is_uniform_over_one_to_n():
    sampler = DepthSampler(tiny(), n=8)
    torch.manual_seed(0)
    draws = Counter(sampler.draw() for _ in range(8000))
    assert set(draws) == set(range(1, 9))
    assert all(abs(count - 1000) < 4 * math.sqrt(1000 * 7 / 8) for count in draws.values()), draws  # 4 sigma


def test_every_forward_of_a_step_runs_at_its_own_drawn_depth(monkeypatch):
    config = apply_overrides(load_config("digits-tiny-random-states"), ["attack.steps=3"])
    task = objective_task(config)
    assert isinstance(task, RandomStates)
    model = tiny(config.deq.f_max_iter).train()
    seen: list = []
    original = DEQClassifier.forward_with_info

    steps_taken: list = []
    jacobian: list = []

    def recorded(self, x, *, jac_loss=False, max_iter=None):
        seen.append(max_iter)
        out = original(self, x, jac_loss=jac_loss, max_iter=max_iter)
        steps_taken.append(int(out.info.nstep.max()))
        jacobian.append(out.jac_loss is not None)
        return out

    monkeypatch.setattr(DEQClassifier, "forward_with_info", recorded)
    digits = load_dataset("digits")
    x, y = digits.train.images[:16].float(), digits.train.labels[:16]
    torch.manual_seed(1)
    out = task(model, TrainForward(model), x, y, StepSetup(use_jacobian=True, seed=3))
    # the clean probabilities, 3 attack steps, then the loss's clean and adversarial passes
    assert len(seen) == 1 + 3 + 2
    assert all(isinstance(k, int) and 1 <= k <= config.deq.f_max_iter for k in seen)
    assert len(set(seen)) > 1  # drawn, not fixed
    assert seen == task.sampler.depths
    assert all(taken <= k for taken, k in zip(steps_taken, seen))  # the solver stopped at the drawn depth
    assert jacobian == [False] * 5 + [True]  # the Jacobian term on the adversarial pass, at its drawn depth
    # The step's depths come from its seed: the same on every rank, and again after a resume.
    first = list(seen)

    def depths(seed):
        seen.clear()
        task(model, TrainForward(model), x, y, StepSetup(seed=seed))
        return list(seen)

    assert depths(3) == first == task.sampler.depths
    assert depths(4) != first
    assert math.isfinite(float(out.loss))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_short_run_trains_and_selects_on_dev(tmp_path):
    config = apply_overrides(load_config("digits-tiny-random-states"), SMALL)
    result = train(config, tmp_path, progress=False)
    assert [r["objective"] for r in result.history] == ["random-states"] * 2
    assert math.isfinite(result.history[-1]["train_loss"])
    assert all(r["dev_robust_acc"] is not None for r in result.history)  # selected on dev, as any run
    best = max(result.history, key=lambda r: r["dev_robust_acc"])
    assert result.best_dev_robust_acc == best["dev_robust_acc"]
    assert (tmp_path / "checkpoints" / "best.safetensors").exists()


@pytest.mark.parametrize("name, override, message", [
    ("digits-resnet18-pgdat", ["attack.objective=random-states"], "not a DEQ"),
    ("digits-tiny-random-states", ["deq.grad=exact"], "deq.grad = 'phantom'"),
    ("digits-tiny-random-states", ["jacobian.f_thres_delta=2"], "f_thres_delta = 0"),
])
def test_settings_that_are_not_the_method_are_refused_before_any_work(name, override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_config(name), override)
