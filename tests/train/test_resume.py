"""Exact resumption: a run SIGKILLed mid-epoch and resumed ends with the same weights, bit for bit,
as an uninterrupted run with the same seed; plus the CLI around it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from deqrobust.checkpoint import read_metadata
from deqrobust.errors import CheckpointError

from .conftest import REPO, assert_same_weights, cli_env, run_cli

# 8 iterations per epoch, 3 epochs, a resumable checkpoint every 2 iterations; ~0.3 s per iteration.
ARGS = [
    "--config", "digits-tiny-unroll", "--no-progress", "--seed", "3",
    "--set", "data.train_subset=256", "--set", "run.batch_size=32", "--set", "run.epochs=3",
    "--set", "pretrain.iterations=3", "--set", "attack.steps=5", "--set", "eval.pgd_steps=2",
    "--set", "eval.dev_examples=40", "--set", "jacobian.stop_epoch=2", "--set", "jacobian.prob=0.3",
    "--set", "run.checkpoint_every_iters=2",
]  # fmt: skip


def metrics(path):
    drop = ("epoch_time", "wall_time")
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    cmd = [sys.executable, "-m", "deqrobust", "train", *ARGS]
    straight = subprocess.Popen([*cmd, "--out", str(straight_dir)], cwd=REPO, env=cli_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    victim = subprocess.Popen([*cmd, "--out", str(killed_dir)], cwd=REPO, env=cli_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    last = killed_dir / "checkpoints" / "last.safetensors"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and victim.poll() is None:
            try:
                state = read_metadata(last)["training_state"]
            except (CheckpointError, KeyError):
                state = None
            if state and state["epoch"] == 1 and not state["epoch_done"] and state["global_iter"] >= 10:
                victim.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        victim.kill()
        victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed mid-epoch"
    state = read_metadata(last)["training_state"]
    assert state["epoch"] == 1 and not state["epoch_done"] and 8 < state["global_iter"] < 16  # mid-epoch 2

    resumed = run_cli("--out", str(killed_dir), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out

    assert_same_weights(straight_dir / "checkpoints" / "last.safetensors", last)
    assert_same_weights(
        straight_dir / "checkpoints" / "best.safetensors", killed_dir / "checkpoints" / "best.safetensors"
    )
    assert metrics(straight_dir / "metrics.jsonl") == metrics(killed_dir / "metrics.jsonl")
    assert len(metrics(killed_dir / "metrics.jsonl")) == 3


@pytest.mark.slow
def test_cli_default_out_dir_summary_and_refusals(tmp_path):
    tiny = ["--set", "data.train_subset=64", "--set", "run.batch_size=32", "--set", "run.epochs=1",
            "--set", "pretrain.iterations=1", "--set", "attack.steps=1", "--set", "eval.pgd_steps=1",
            "--set", "eval.dev_examples=16"]  # fmt: skip
    env = cli_env()
    run = subprocess.run([sys.executable, "-m", "deqrobust", "train", "--config", "digits-tiny-exact", "--no-progress",
                          *tiny], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = tmp_path / "runs" / "digits-tiny-exact"
    assert (out / "checkpoints" / "best.safetensors").is_file()
    assert "checkpoints: runs/digits-tiny-exact/checkpoints/best.safetensors" in run.stdout
    assert "best dev accuracy: clean" in run.stdout and "robust (PGD)" in run.stdout
    again = subprocess.run([sys.executable, "-m", "deqrobust", "train", "--config", "digits-tiny-exact", *tiny],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--overwrite" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "deqrobust", "train", "--config", "digits-tiny-exact",
                          "--set", "optim.learning_rate=1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "valid keys: name, lr" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "deqrobust", "train", "--config", "digits-tiny-exact", "--resume",
                              "--out", "elsewhere"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert missing.returncode == 1 and "cannot resume" in missing.stderr
