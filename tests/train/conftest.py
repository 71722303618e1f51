"""Shared helpers for the training tests: shrunken digits configs and a module-scoped quick run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqrobust.checkpoint import load_checkpoint
from deqrobust.train import TrainConfig, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[2]

# 2 epochs of digits-tiny-unroll on a 1200-image subset: ~10 s, clearly above chance.
QUICK = [
    "data.train_subset=1200", "run.epochs=2", "pretrain.iterations=2", "optim.lr=5e-3", "attack.steps=1",
    "attack.clean_weight=0.5", "jacobian.stop_epoch=1", "eval.pgd_steps=3", "eval.dev_examples=100",
]  # fmt: skip
# A few iterations only: for mechanics (seeding, resume, divergence), not accuracy.
TINY = [
    "data.train_subset=128", "run.batch_size=32", "run.epochs=2", "pretrain.iterations=2", "attack.steps=2",
    "eval.pgd_steps=2", "eval.dev_examples=32", "jacobian.stop_epoch=1", "jacobian.prob=0.5",
]  # fmt: skip


def config(*overrides: str, base: str = "digits-tiny-unroll", preset: list[str] = TINY) -> TrainConfig:
    return apply_overrides(load_config(base), [*preset, *overrides])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ: {different[:5]}"


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deqrobust", "train", *args], cwd=REPO, env=cli_env(), capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on a busy 2-core machine can be 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
