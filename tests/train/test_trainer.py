"""End-to-end training on digits: accuracy above chance, files written, seeding, divergence policies,
run-directory safety, and that the test split is never read."""

from __future__ import annotations

import json

import pytest
import torch

import deqrobust.train.trainer as trainer_module
import deqrobust.train.tasks as tasks_module
from deqrobust.checkpoint import load_checkpoint, load_model, read_metadata
from deqrobust.data import load_dataset
from deqrobust.errors import ConfigError, DivergenceError
from deqrobust.train import Trainer, load_training_data, train

from .conftest import QUICK, assert_same_weights, config, weights


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    result = train(config(preset=QUICK), out, progress=False)
    return out, result


def test_quick_run_beats_chance_clean_and_robust(quick_run):
    _, result = quick_run
    assert result.epochs == 2 and result.iterations == 2 * (1200 // 64)
    assert result.best_dev_clean_acc > 0.3, result.history
    assert result.best_dev_robust_acc > 0.15, result.history
    assert result.best_dev_robust_acc < result.best_dev_clean_acc


def test_trades_trains_end_to_end_above_chance(tmp_path):
    result = train(config("attack.objective=trades", "attack.trades_beta=6.0", preset=QUICK), tmp_path, progress=False)
    assert result.best_dev_clean_acc > 0.3, result.history
    assert result.best_dev_robust_acc > 0.15, result.history
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    assert read_metadata(result.best_checkpoint)["config"]["attack"]["objective"] == "trades"


def test_quick_run_writes_metrics_checkpoints_and_config(quick_run):
    out, result = quick_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and lines == result.history
    for key in ("dev_clean_acc", "dev_robust_acc", "train_loss", "train_acc", "solver_steps", "solver_rel_residual",
                "lr", "wall_time", "epoch_time"):  # fmt: skip
        assert lines[-1][key] is not None, key
    assert lines[-1]["dev_examples"] == 100 and lines[-1]["solver_steps"] > 0
    assert (out / "config.toml").is_file() and (out / "summary.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors"]
    meta = read_metadata(result.best_checkpoint)
    assert meta["kind"] == "best" and meta["model"]["name"] == "mdeq-tiny" and meta["model"]["in_channels"] == 1
    assert meta["threat_model"] == {"norm": "Linf", "eps": 0.1} and meta["dataset"]["name"] == "digits"
    assert meta["best"]["epoch"] == result.best_epoch and meta["config"]["deq"]["grad"] == "phantom"
    last = read_metadata(result.last_checkpoint)
    assert last["kind"] == "last" and last["epoch"] == 2 and last["iteration"] == result.iterations
    assert "training_state" in last and "training_state" not in meta


def test_load_model_round_trip_gives_identical_logits(quick_run):
    _, result = quick_run
    model, meta = load_model(result.best_checkpoint)
    assert model.grad == "phantom" and model.f_max_iter == 8 and model.phantom_undamped_first
    splits = load_dataset("digits")
    x = splits.dev.images[:50]
    again, _ = load_model(result.best_checkpoint)
    assert torch.equal(model(x), again(x))
    acc = (model(x).argmax(1) == splits.dev.labels[:50]).float().mean()
    assert acc > 0.3


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    cfg = config("run.epochs=1")
    a = train(cfg, tmp_path / "a", progress=False, seed=7)
    b = train(cfg, tmp_path / "b", progress=False, seed=7)
    c = train(cfg, tmp_path / "c", progress=False, seed=8)
    assert_same_weights(a.last_checkpoint, b.last_checkpoint)
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == 1
    wa, wc = weights(a.last_checkpoint), weights(c.last_checkpoint)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert read_metadata(c.last_checkpoint)["config"]["run"]["seed"] == 8


def test_the_test_split_is_never_read(tmp_path, monkeypatch):
    real = trainer_module.load_dataset

    class NoTest:
        def __init__(self, splits):
            self.train, self.dev, self.info = splits.train, splits.dev, splits.info

        @property
        def test(self):
            raise AssertionError("training touched the test split")

    monkeypatch.setattr(trainer_module, "load_dataset", lambda *a, **k: NoTest(real(*a, **k)))
    result = train(config("run.epochs=1"), tmp_path / "run", progress=False)
    assert result.epochs == 1
    with pytest.raises(TypeError, match="train and dev splits only"):
        Trainer(config(), load_dataset("digits"), tmp_path / "x", dist=None)  # type: ignore[arg-type]
    assert not hasattr(load_training_data(config()), "test")


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = config("run.epochs=1")
    first = train(cfg, tmp_path, progress=False)
    before = first.last_checkpoint.read_bytes()
    with pytest.raises(FileExistsError, match="--resume .*--overwrite"):
        train(cfg, tmp_path, progress=False)
    assert first.last_checkpoint.read_bytes() == before
    again = train(cfg, tmp_path, progress=False, overwrite=True)
    assert_same_weights(first.last_checkpoint, again.last_checkpoint)
    # Resuming a finished run is a no-op; resuming with another config is refused.
    done = train(cfg, tmp_path, progress=False, resume=True)
    assert done.iterations == first.iterations
    with pytest.raises(ConfigError, match="different config: optim.lr"):
        train(config("run.epochs=1", "optim.lr=0.1"), tmp_path, progress=False, resume=True)


def nan_at(monkeypatch, calls: set[int]):
    """Make the PGD-AT loss NaN at the given (1-based) call numbers (pretraining's loss included)."""
    real = tasks_module.pgd_at_loss
    count = {"n": 0}

    def loss(*args, **kwargs):
        count["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if count["n"] in calls else value

    monkeypatch.setattr(tasks_module, "pgd_at_loss", loss)


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    nan_at(monkeypatch, {6})  # epoch 2 (4 iterations per epoch), its 2nd iteration
    with pytest.raises(DivergenceError) as info:
        train(config(), tmp_path, progress=False)
    message = str(info.value)
    assert "non-finite loss at epoch 2, iteration 6" in message
    assert "last good checkpoint" in message and "last.safetensors (epoch 1, iteration 4)" in message
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert ckpt.metadata["epoch"] == 1 and all(
        torch.isfinite(v).all() for v in ckpt.state_dict.values() if v.is_floating_point()
    )
    model, _ = load_model(tmp_path / "checkpoints" / "best.safetensors")
    assert torch.isfinite(model(torch.rand(2, 1, 8, 8))).all()


def test_nan_policy_skip_counts_the_batch(tmp_path, monkeypatch):
    nan_at(monkeypatch, {3})
    result = train(config("run.nan_policy=skip"), tmp_path, progress=False)
    assert result.skipped_batches == 1 and result.iterations == 8
    assert [r["skipped_batches"] for r in result.history] == [1, 0]


def test_nan_policy_lower_lr_retries_from_last_checkpoint(tmp_path, monkeypatch):
    nan_at(monkeypatch, {6})
    result = train(config("run.nan_policy=lower_lr"), tmp_path, progress=False)
    assert result.lr_retries == 1 and result.epochs == 2 and result.iterations == 8
    assert [r["epoch"] for r in result.history] == [1, 2]
    reference = train(config(), tmp_path / "ref", progress=False)
    assert result.history[1]["lr"] == pytest.approx(reference.history[1]["lr"] / 2)
    assert read_metadata(result.last_checkpoint)["training_state"]["lr_scale"] == 0.5


def test_nan_policy_lower_lr_gives_up_after_the_limit(tmp_path, monkeypatch):
    nan_at(monkeypatch, set(range(5, 100)))
    with pytest.raises(DivergenceError, match="already halved run.nan_max_retries = 2 times"):
        train(config("run.nan_policy=lower_lr", "run.nan_max_retries=2"), tmp_path, progress=False)
    assert read_metadata(tmp_path / "checkpoints" / "last.safetensors")["epoch"] == 1


def test_diverging_solver_stops_training(tmp_path, monkeypatch):
    """A forward solve that diverges in a training step gives NaN logits (the model's ``on_divergence``
    policy), hence a NaN loss: training stops and the last good checkpoint stays loadable."""
    from deqrobust.core.deq import DEQClassifier

    real_solve = DEQClassifier.solve
    calls = {"n": 0}

    def solve(self, *args, **kwargs):
        result = real_solve(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 4:  # the 4th training-mode solve: epoch 2, iteration 6 (2 pretraining iterations)
                result.info.diverged = torch.ones_like(result.info.diverged)
        return result

    monkeypatch.setattr(DEQClassifier, "solve", solve)
    with pytest.raises(DivergenceError, match="non-finite loss at epoch 2, iteration 6 .*epoch 1, iteration 4"):
        train(config(), tmp_path, progress=False)
    model, meta = load_model(tmp_path / "checkpoints" / "last.safetensors")
    assert meta["epoch"] == 1 and torch.isfinite(model(torch.rand(2, 1, 8, 8))).all()
