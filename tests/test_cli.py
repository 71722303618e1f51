"""End to end through the command line: ``demo --quick`` and ``reproduce --scale tiny table2``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deqrobust.evaluate.report import FILES
from deqrobust.gradients import all_sources
from deqrobust.gradients.spec import PAIRINGS
from deqrobust.reproduce import paper_results

pytestmark = pytest.mark.slow
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def deqrobust(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "deqrobust", *args], cwd=cwd, env=ENV, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run


def test_demo_quick_runs_the_pipeline_and_reports_its_chance_level_model_in_seconds(tmp_path):
    """The quick demo's model (2 epochs on 512 images, 16 iterations) guesses on dev: the evaluation says so, with
    every report file, instead of running the full protocol on it."""
    run = deqrobust("demo", "--quick", "--out", "demo", "--no-progress", cwd=tmp_path)
    out = tmp_path / "demo"
    for name in FILES:
        assert (out / name).exists(), name
    data = json.loads((out / "results.json").read_text())
    assert data["protocol"]["mode"] == "at-chance" and [d["defense"] for d in data["defenses"]] == ["final"]
    assert sum(data["estimate"]["attack_runs"].values()) <= 10
    assert "note: model at chance on dev" in run.stdout
    assert "demo wall time" in run.stdout
    # Running it again resumes: nothing is recomputed, the numbers are the same.
    again = deqrobust("demo", "--quick", "--out", "demo", "--no-progress", cwd=tmp_path)
    assert json.loads((out / "results.json").read_text())["autoattack_acc"] == data["autoattack_acc"]
    assert "headline defense" in again.stdout


def test_cli_evaluate_of_an_accurate_model_runs_every_defense_and_attack(tmp_path):
    from deqrobust.data import load_dataset

    from .evaluate.conftest import save_tiny_checkpoint, train_clean_tiny

    checkpoint = save_tiny_checkpoint(train_clean_tiny(load_dataset("digits")),
                                      tmp_path / "tiny" / "checkpoints" / "best.safetensors")
    run = deqrobust("evaluate", "--checkpoint", str(checkpoint), "--n-examples", "16", "--batch-size", "8",
                    "--sanity-examples", "8", "--out", "eval", "--no-progress", "--paper-columns", cwd=tmp_path)
    out = tmp_path / "eval"
    for name in FILES:
        assert (out / name).exists(), name
    data = json.loads((out / "results.json").read_text())
    defenses = [d["defense"] for d in data["defenses"]]
    assert defenses[0] == "final" and defenses[-1] == "ensemble" and any(d.startswith("early:") for d in defenses)
    n_states = data["model"]["f_max_iter"]
    sources = {str(s) for s in all_sources(n_states, PAIRINGS)}
    assert data["protocol"]["mode"] == "adaptive"  # the default: candidates chosen on dev
    for d in data["defenses"]:
        kept = next(c for c in data["candidate_selection"]["defenses"] if c["defense"] == d["defense"])
        assert {s["source"] for s in kept["sources"]} == sources  # every source attacked on dev
        assert sorted(c["source"] for c in d["matrix"]) == sorted(kept["matrix"])
        assert {"exact", "phantom", f"unrolled:{n_states}", "unrolled:ensemble"} <= set(kept["matrix"])
        attacks = {c["attack"] for c in d["cascade"]}
        assert {"apgd-ce", "apgd-t", "fab-t"} <= attacks and any(a.startswith("square") for a in attacks)
    # The printed summary table has every defense row and every attack column.
    header = next(line for line in run.stdout.splitlines() if line.startswith("| Defense |"))
    for column in ("Clean", "Ready-made exact", "Ready-made phantom", "Adjoint final", "Adjoint intermediate",
                   "Adjoint ensemble", "Unrolled final", "Unrolled intermediate", "Unrolled ensemble",
                   "Min over attacks", "Worst case"):
        assert column in header
    for d in defenses:
        assert any(line.startswith(f"| {d}") for line in run.stdout.splitlines()), d


def test_reproduce_tiny_table2_prints_the_paper_layout_beside_the_paper_numbers(tmp_path):
    run = deqrobust("reproduce", "table2", "--scale", "tiny", "--out", "rep", "--n-examples", "12",
                    "--dev-examples", "8", "--no-progress",
                    "--set", "run.epochs=1", "--set", "data.train_subset=256", "--set", "pretrain.iterations=4",
                    "--set", "eval.dev_examples=32", "--set", "attack.steps=3",
                    # 4 states for both models (8/7 and 16/16 otherwise): 17 gradient sources instead of 29 and 53.
                    "--set", "deq.f_max_iter=4", "--set", "deq.b_max_iter=4", "--set", "jacobian.f_thres_delta=1",
                    cwd=tmp_path)
    text = (tmp_path / "rep" / "tiny" / "table2.md").read_text()
    assert text.strip() in run.stdout
    header = next(line for line in text.splitlines() if line.startswith("| Training |"))
    for column in ("Clean", "Adjoint final", "Adjoint intermediate", "Adjoint ensemble", "Unrolled final",
                   "Unrolled intermediate", "Unrolled ensemble"):
        assert column in header
    paper = paper_results()["table2_pgd10_large"]
    rows = [line for line in text.splitlines() if line.startswith("| MDEQ-tiny")]
    assert len(rows) >= 5  # 2 trainings x (final, early, ensemble), early rules may coincide
    # Every cell is "ours / paper", with the paper's numbers for that row.
    final_unroll = next(r for r in rows if "unrolling-trained" in r and "| final |" in r)
    for value in paper["unrolling_trained_8_7"]["final"]:
        assert f"/ {value:.2f}" in final_unroll
    final_exact = next(r for r in rows if "exact-trained" in r and "| final |" in r)
    for value in paper["exact_trained_50_50"]["final"]:
        assert f"/ {value:.2f}" in final_exact
    assert "overall white-box robustness" in text


def test_reproduce_refuses_paper_scale_on_cpu_with_a_cost_estimate(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    run = subprocess.run([sys.executable, "-m", "deqrobust", "reproduce", "table1", "--out", "rep"], cwd=tmp_path,
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert "refusing to run table1 at paper scale on the CPU" in run.stderr
    assert "CPU-hours" in run.stderr and "--scale tiny" in run.stderr
    assert not (tmp_path / "rep").exists()
