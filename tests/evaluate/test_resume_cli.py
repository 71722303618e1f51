"""A killed evaluation resumes where it stopped and ends with the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import result_numbers as numbers
from .conftest import save_tiny_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(clean_tiny, tmp_path_factory):
    return save_tiny_checkpoint(clean_tiny, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def command(checkpoint: Path, out: Path) -> list[str]:
    # One defense chosen on dev ("early"): both dev selections and the test phase are resumed; final and
    # ensemble would add test units of the same kind (220 s -> about 100 s for the whole test).
    return [sys.executable, "-m", "deqrobust", "evaluate", "--checkpoint", str(checkpoint), "--n-examples", "16",
            "--suite", "quick", "--seed", "1", "--out", str(out), "--no-progress", "--batch-size", "8",
            "--dev-examples", "16", "--sanity-examples", "8", "--defenses", "early"]


def test_killed_evaluation_resumes_to_the_same_numbers(checkpoint, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(checkpoint, straight), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(command(checkpoint, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "eval_state.json"
    deadline = time.time() + 300
    units = 0
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                units = len(json.loads(state.read_text())["units"])
            except (json.JSONDecodeError, KeyError):
                units = 0
            if units >= 30:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the evaluation finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()
    before = json.loads(state.read_text())["units"]
    saved = len(before)
    assert saved >= 30

    resumed = subprocess.run(command(checkpoint, killed), check=True, env=env, capture_output=True, text=True)
    assert numbers(killed) == numbers(straight)
    data = json.loads((killed / "results.json").read_text())
    assert data["timing"]["resumed_units"] == saved
    after = json.loads(state.read_text())["units"]
    assert all(after[k] == v for k, v in before.items())  # reused as saved (a recomputed unit has a new time)
    assert "headline defense" in resumed.stdout


def test_evaluate_cli_errors_are_clear(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a checkpoint")
    out = subprocess.run([sys.executable, "-m", "deqrobust", "evaluate", "--checkpoint", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "error" in out.stderr and str(bad) in out.stderr


@pytest.mark.parametrize("flags, message", [
    (["--n-examples", "-3"], "n_examples must be a positive integer"),
    (["--n-examples", "0"], "n_examples must be a positive integer"),
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    (["--dev-examples", "0"], "dev_examples must be a positive integer"),
    (["--eps=-1/255"], "eps must be > 0"),
    (["--eps", "abc"], "invalid eps"),
])
def test_evaluate_cli_rejects_bad_numbers_before_any_work(checkpoint, tmp_path, flags, message, cli):
    out = cli("evaluate", "--checkpoint", str(checkpoint), *flags, "--out", str(tmp_path / "out"), "--no-progress")
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("content", ['[]', '"text"', '{"version": 2, "fingerprint": {}, "units": []}'])
def test_a_state_file_that_is_not_an_evaluation_state_is_refused(tmp_path, content):
    from deqrobust.errors import ConfigError
    from deqrobust.evaluate.state import EvalState

    path = tmp_path / "eval_state.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="not a deqrobust evaluation state"):
        EvalState(path, {})
    assert path.read_text() == content  # nothing overwritten


def test_a_malformed_unit_in_a_matching_state_file_is_refused(tmp_path):
    from deqrobust.errors import ConfigError
    from deqrobust.evaluate.state import STATE_VERSION, EvalState

    path = tmp_path / "eval_state.json"
    good = {"broken": [1], "nonfinite": [], "attacked": 4, "grad_computed": 40, "grad_zero": 0, "grad_nonfinite": 0,
            "seconds": 0.5}
    EvalState(path, {"a": 1}).put("unit/p0", good)
    assert EvalState(path, {"a": 1}).get("unit/p0") == good
    for bad in ([1, 2], {**good, "broken": ["x"]}, {k: v for k, v in good.items() if k != "seconds"}):
        path.write_text(json.dumps({"version": STATE_VERSION, "fingerprint": {"a": 1}, "units": {"unit/p0": bad}}))
        with pytest.raises(ConfigError, match="malformed"):
            EvalState(path, {"a": 1})
