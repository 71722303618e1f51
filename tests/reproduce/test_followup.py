"""``reproduce followup --scale tiny`` end to end on small settings: the random-states model with and
without input entropy reduction (the follow-up's own, non-adaptive column first),
and at a random depth with EOT. One model, no full-depth defense and two purification steps keep it
to minutes; the rest runs the same code path (``experiment`` is the only thing replaced)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from deqrobust.reproduce import runner

# Above chance in four short epochs (a model at chance gets the at-chance protocol, final only). Three
# epochs left 2 of the 6 test examples correct at z_3, which is within noise of chance (scikit-learn 1.9.1).
SMALL = ["--set", "run.epochs=4", "--set", "pretrain.iterations=40", "--set", "pretrain.layers=4",
         "--set", "optim.lr=5e-3", "--set", "eval.dev_examples=32", "--set", "attack.steps=2",
         # 4 states: the released read-out z_3, one purification after z_2
         "--set", "deq.f_max_iter=4", "--set", "deq.b_max_iter=4"]


@pytest.fixture
def one_model_followup(monkeypatch):
    real = runner.experiment

    def smaller(target: str, scale: str):
        exp = real(target, scale)
        assert exp.defenses == ("entropy",) and exp.defenses_for(exp.runs[0]) == ("final", "entropy")
        return replace(exp, runs=(replace(exp.runs[0], defenses=("entropy(steps=2)",)),))

    monkeypatch.setattr(runner, "experiment", smaller)


@pytest.mark.slow
def test_reproduce_followup_tiny_prints_the_non_adaptive_column_first(cli, tmp_path, one_model_followup):
    run = cli("reproduce", "followup", "--scale", "tiny", "--out", str(tmp_path / "rep"), "--n-examples", "6",
              "--dev-examples", "6", "--no-progress", *SMALL)
    assert run.returncode == 0, run.stderr[-3000:]
    text = (tmp_path / "rep" / "tiny" / "followup.md").read_text()
    assert text.strip() in run.stdout
    header = next(line for line in text.splitlines() if line.startswith("| Model |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:3] == ["Model", "Defense", "Non-adaptive (the follow-up's own)"]
    assert {"BPDA", "Through the loop (ST sign)", "Through the loop (raw)", "Confident loss", "Transfer", "Clean",
            "Worst case", "Wall time"} <= set(cells)
    assert "MODEL AT CHANCE" not in text
    rows = [line for line in text.splitlines() if line.startswith("| MDEQ-tiny") and "`" in line]
    assert len(rows) == 2  # the static twin early:3, entropy
    assert rows[0].split("|")[2].strip() == "`early:3`"
    assert "`entropy(chunk=2,steps=2," in rows[1] and rows[1].split("|")[3].strip() != "—"  # non-adaptive measured
    # the random-states model also at a random depth, attacked with EOT (expected accuracy)
    assert "At a random depth (d uniform on 1..4), attacked with EOT" in text
    depth_rows = [line for line in text.splitlines() if line.startswith("| MDEQ-tiny") and "`" not in line]
    assert len(depth_rows) == 1
    numbers = [c.strip() for c in depth_rows[0].strip("|").split("|")]
    assert numbers[6] == "—"  # the protocol's full depth (final) was not asked for here
    saved = json.loads(next((tmp_path / "rep" / "tiny" / "eval").glob("digits-tiny-random-states*/random_depth.json"))
                       .read_text())
    assert saved["result"]["n_examples"] == 6
    assert f"{saved['result']['worst_case_acc']:.2f}" == numbers[5]
