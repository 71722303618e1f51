"""The GPU check runs on a CPU too (tiny sizes), so CI tests the script itself; on a CPU it says
plainly that the CUDA rows were not run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_says_the_cuda_rows_were_not_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")  # one core: the other runs a test worker
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| Section | Check |" in run.stdout and "not run" in run.stdout
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = {r["section"] for r in data["rows"]}
    assert {"agreement", "paths", "prices"} <= sections
    agree = [r for r in data["rows"] if r["section"] == "agreement"]
    assert len(agree) == 3 and all(r["ok"] for r in agree)  # CPU vs CPU: identical, every solver
    assert all(r["ok"] is not False for r in data["rows"]), [r for r in data["rows"] if r["ok"] is False]
    prices = {r["case"]: r for r in data["rows"] if r["section"] == "prices"}
    assert any("training recipe" in c and r["gpu_hours"] > 0 for c, r in prices.items())
    suite = next(r for c, r in prices.items() if "`paper` suite" in c)
    assert 0 < suite["gpu_hours"]["adaptive"] < suite["gpu_hours"]["exhaustive"]
