"""``reproduce followup --scale tiny`` end to end on small settings: both trainings, each model with
and without input entropy reduction, the follow-up's own (non-adaptive) column first."""

from __future__ import annotations

import json

import pytest

SMALL = ["--set", "run.epochs=1", "--set", "data.train_subset=256", "--set", "pretrain.iterations=4",
         "--set", "eval.dev_examples=32", "--set", "attack.steps=2",
         # 4 states: the released read-out z_3, one purification after z_2
         "--set", "deq.f_max_iter=4", "--set", "deq.b_max_iter=4"]


@pytest.mark.slow
def test_reproduce_followup_tiny_prints_the_non_adaptive_column_first(cli, tmp_path):
    run = cli("reproduce", "followup", "--scale", "tiny", "--out", str(tmp_path / "rep"), "--n-examples", "8",
              "--dev-examples", "8", "--no-progress", *SMALL)
    assert run.returncode == 0, run.stderr[-3000:]
    text = (tmp_path / "rep" / "tiny" / "followup.md").read_text()
    assert text.strip() in run.stdout
    header = next(line for line in text.splitlines() if line.startswith("| Model |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:3] == ["Model", "Defense", "Non-adaptive (the follow-up's own)"]
    assert {"BPDA", "Through the loop (ST sign)", "Through the loop (raw)", "Confident loss", "Transfer", "Clean",
            "Worst case", "Wall time"} <= set(cells)
    rows = [line for line in text.splitlines() if line.startswith("| MDEQ-tiny")]
    assert len(rows) == 4  # 2 models x (static twin early:3, entropy)
    purified = [r for r in rows if "entropy(" in r]
    assert len(purified) == 2 and all(":early:3`" in r for r in purified)
    assert any("random intermediate states" in r for r in purified) and any("unrolling" in r for r in purified)
    # the random-states model also at a random depth, attacked with EOT (expected accuracy)
    assert "At a random depth (d uniform on 1..4), attacked with EOT" in text
    depth_rows = [line for line in text.splitlines() if line.startswith("| MDEQ-tiny, random intermediate states")
                  and "`" not in line]
    assert len(depth_rows) == 1
    numbers = [float(c) for c in depth_rows[0].strip("|").split("|")[1:6]]
    clean, attacks, worst = numbers[0], numbers[1:4], numbers[4]
    assert worst <= min(attacks) <= max(attacks) <= clean
    saved = json.loads(next((tmp_path / "rep" / "tiny" / "eval").glob("digits-tiny-random-states*/random_depth.json"))
                       .read_text())
    assert saved["result"]["n_examples"] == 8 and saved["result"]["worst_case_acc"] == pytest.approx(worst, abs=0.006)
