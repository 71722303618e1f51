"""Input entropy reduction inside the protocol: priced with its purification, named errors first."""

from __future__ import annotations

import json

import pytest

from deqrobust.attacks import ThreatModel
from deqrobust.core import DEQClassifier
from deqrobust.errors import ConfigError
from deqrobust.evaluate import estimate, evaluate

PURIFIED = "entropy(chunk=1,steps=3)"  # MDEQ-tiny with 3 states here: read at z_2, purified after z_1


def test_the_estimate_times_the_purified_forward_and_gradient(clean_tiny, digits, purifications):
    kwargs = dict(dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", 0.1), suite="quick", n_examples=16,
                  dev_examples=16, batch_size=16)
    static = estimate(clean_tiny, defenses=["early:2"], **kwargs)
    assert purifications["n"] == 0
    purified = estimate(clean_tiny, defenses=[PURIFIED], **kwargs)
    assert purifications["n"] > 0  # its runs are priced with the purification timed
    assert str(purified.plan_key["defenses"]) != str(static.plan_key["defenses"])
    # every gradient against the purified defense is timed through its purified forward; no timing compared here
    name = "entropy(chunk=1,steps=3,step=0.025,radius=0.1,memory=2)"
    assert f"clean:{name} per call" in purified.unit_costs
    assert f"grad:phantom@{name} per call" in purified.unit_costs
    assert not any("entropy" in key for key in static.unit_costs)


@pytest.mark.parametrize("name, words", [
    ("entropy(steps=0)", "steps must be a positive integer"),
    ("entropy(radius=-0.1)", "radius must be a number in (0, 1]"),
    ("entropy(step=-1)", "step must be a number in (0, 1]"),
    ("entropi", "invalid defense 'entropi'"),
    ("entropy:early:1", "before the first purification"),
])
def test_bad_settings_are_named_before_any_solve(clean_tiny, digits, name, words, monkeypatch, tmp_path):
    solves = {"n": 0}
    original = DEQClassifier.solve

    def counted(self, *args, **kwargs):
        solves["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DEQClassifier, "solve", counted)
    for call in (evaluate, estimate):
        extra = {"out_dir": tmp_path / "out", "progress": False} if call is evaluate else {}
        with pytest.raises(ConfigError) as err:
            call(clean_tiny, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", 0.1), defenses=[name],
                 n_examples=8, **extra)
        assert words in str(err.value)
    assert solves["n"] <= 2  # at most the one-example probe per call
    assert not (tmp_path / "out").exists()


def test_the_cli_evaluates_a_purified_defense_named_with_its_options(clean_tiny, cli, tmp_path):
    from .conftest import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(clean_tiny, tmp_path / "ck" / "checkpoints" / "best.safetensors")
    common = ["evaluate", "--checkpoint", str(checkpoint), "--n-examples", "6", "--dev-examples", "6",
              "--sanity-examples", "4", "--suite", "pgd10", "--sources", "phantom,unrolled:2", "--batch-size", "6",
              "--no-progress"]
    bad = cli(*common, "--defenses", "final,entropy(chunk=1,steps=0)", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "steps must be a positive integer" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
    done = cli(*common, "--defenses", "early:2,entropy(chunk=1,steps=2)", "--out", str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "eval" / "results.json").read_text())
    names = [d["defense"] for d in data["defenses"]]
    assert names == ["early:2", "entropy(chunk=1,steps=2,step=0.025,radius=0.1,memory=2):early:2"]
    purified = data["defenses"][1]
    assert {c["source"] for c in purified["matrix"]} >= {"phantom", "unrolled:2"}
    assert 0.0 <= purified["worst_case_acc"] <= purified["clean_acc"]


def test_the_follow_up_columns_enter_the_worst_case_and_the_report(clean_tiny, digits, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from deqrobust.evaluate import result_schema

    result = evaluate(clean_tiny, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", 0.1), suite="pgd10",
                      n_examples=16, dev_examples=8, sources=["phantom", "unrolled:2"], defenses=[PURIFIED],
                      batch_size=16, out_dir=tmp_path, progress=False)
    twin, purified = result.defenses
    assert twin.defense == "early:2" and twin.follow_up is None
    follow = purified.follow_up
    assert follow["settings"]["read"] == "early:2"
    columns = follow["columns"]
    assert set(columns) == {"non-adaptive", "bpda", "through-loop:straight-through", "through-loop:raw", "confident",
                            "transfer"}
    # every family is a per-example union: no column is below the worst case, each at most the clean accuracy
    for value in columns.values():
        assert purified.worst_case_acc - 1e-9 <= value <= purified.clean_acc + 1e-9
    assert follow["non_adaptive_acc"] == columns["non-adaptive"]
    assert follow["gap_points"] == pytest.approx(columns["non-adaptive"] - purified.worst_case_acc)
    # each non-adaptive cell broke at most what the union broke
    cells = {c.attack: c for c in purified.matrix}
    assert min(c.robust_acc for c in purified.matrix if c.attack == "pgd10:non-adaptive") >= columns["non-adaptive"] - 1e-9
    # the transfer judged the points that broke the static twin in its own runs, on the purified model's correct ones
    correct = [i for i in range(16) if purified.broken_by.get(i) != "clean"]
    twin_broken = [i for i, label in twin.broken_by.items() if label != "clean" and not label.startswith("check")]
    assert 0 < cells["transfer"].n_attacked <= len(set(twin_broken) & set(correct))
    (determinism,) = [c for c in purified.sanity_checks if c.name == "deterministic_forward"]
    assert determinism.status == "pass" and "no attack needs EOT" in determinism.details["eot"]
    data = json.loads((tmp_path / "results.json").read_text())
    jsonschema.validate(data, result_schema())
    report = (tmp_path / "report.md").read_text()
    assert "## Input entropy reduction, judged adaptively" in report and "Non-adaptive (the follow-up's own)" in report
