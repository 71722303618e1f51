"""The adaptive protocol: candidates chosen on dev only, both adjoint pairings attacked, the kept
candidates recorded (and schema-checked), exhaustive = every source, train mode, the cost estimate."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from deqrobust import DEQClassifier
from deqrobust.attackable import attackable
from deqrobust.attacks import ThreatModel
from deqrobust.evaluate import EvaluationOptions, estimate, evaluate, result_schema
from deqrobust.evaluate import protocol as protocol_module
from deqrobust.evaluate.candidates import keep
from deqrobust.evaluate.dev import DevOutcome
from deqrobust.evaluate.protocol import plan_for
from deqrobust.evaluate.runner import AttackRunner
from deqrobust.evaluate.runs import assumed_runs, count_by_kind
from deqrobust.evaluate.state import EvalState
from deqrobust.gradients import GradientSource, all_sources
from deqrobust.gradients.spec import PAIRINGS
from deqrobust.utils.modes import TrainModeWarning

from .test_protocol import EPS, GuardedSplit, small_suite


@pytest.fixture(scope="module")
def adaptive(clean_tiny, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("adaptive")
    result = evaluate(clean_tiny, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", EPS),
                      suite=small_suite(), n_examples=24, seed=0, out_dir=out, progress=False, paper_columns=True)
    return result, out


def test_the_default_lean_matrix_runs_the_candidates_only_and_names_the_paper_columns_not_run(clean_tiny, digits,
                                                                                             adaptive):
    lean = evaluate(clean_tiny, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", EPS),
                    suite=small_suite(), n_examples=24, seed=0, progress=False, defenses=["final"])
    full, _ = adaptive
    kept = lean.candidate_selection.for_defense("final")
    assert kept.columns == full.candidate_selection.for_defense("final").columns  # the same dev rule
    final = lean.defense("final")
    assert sorted(c.source for c in final.matrix) == sorted(kept.matrix) == sorted(kept.cascade)  # nothing else
    unrun = [c for c, source in kept.columns.items() if source not in kept.cascade]
    assert unrun and all(final.table[c] is None for c in unrun)
    assert any("paper columns not run" in note and all(c in note for c in unrun) for note in lean.notes)
    assert not any("paper columns not run" in note for note in full.notes)
    assert len(final.matrix) < len(full.defense("final").matrix)


def test_the_default_is_adaptive_and_with_paper_columns_keeps_them_and_the_top_k(adaptive, clean_tiny):
    result, _ = adaptive
    assert result.protocol["mode"] == "adaptive" and result.candidate_selection is not None
    n = clean_tiny.n_states
    sel = result.candidate_selection
    assert {d.defense for d in sel.defenses} == {d.defense for d in result.defenses}
    for d in result.defenses:
        kept = sel.for_defense(d.defense)
        # Every source was attacked on dev, both adjoint pairings included.
        assert {s.source for s in kept.sources} == {str(s) for s in all_sources(n, PAIRINGS)}
        assert set(kept.pairing) == {*map(str, range(1, n + 1)), "ensemble"}
        # The test matrix runs exactly the kept sources; the cascade algorithms only the top-k.
        assert sorted(c.source for c in d.matrix) == sorted(kept.matrix)
        for algo in [spec.label for spec in small_suite().boost] + ["apgd-ce", "apgd-t", "fab-t"]:
            assert sorted(c.source for c in d.cascade if c.attack == algo) == sorted(kept.cascade)
        # The top-k, plus the defense's own exact gradient where one source is it.
        own = {"final": "exact"}.get(d.defense) or (f"unrolled:{d.defense[6:]}" if d.defense.startswith("early:") else None)
        assert kept.cascade[0] == clean_tiny.grad and len(kept.cascade) in (sel.top_k, sel.top_k + 1)
        assert own is None or own in kept.cascade
        assert set(kept.columns.values()) <= set(kept.matrix) and {"exact", "phantom"} <= set(kept.matrix)
        assert set(kept.cascade) <= set(kept.matrix)
        # The paper-table columns are the dev-chosen sources, and their cells are those sources' test numbers.
        cells = {c.source: c.robust_acc for c in d.matrix if c.attack == "pgd4"}
        for column, source in kept.columns.items():
            assert d.table[column] == cells[source], column
        assert d.table["adjoint_intermediate_state"] == kept.intermediate_state["adjoint"]


def test_the_kept_candidates_are_in_results_json_which_validates_and_broken_variants_fail(adaptive):
    jsonschema = pytest.importorskip("jsonschema")
    _, out = adaptive
    data = json.loads((out / "results.json").read_text())
    jsonschema.validate(data, result_schema())
    assert data["candidate_selection"]["split"] == "dev" and data["protocol"]["mode"] == "adaptive"
    assert data["estimate"]["predicted_s"] > 0 and data["estimate"]["actual_s"] > 0
    report = (out / "report.md").read_text()
    assert "## Candidate selection (dev split)" in report and "adjoint:1:fresh" in report

    def broken(edit):
        bad = copy.deepcopy(data)
        edit(bad)
        return bad

    first = lambda d: d["candidate_selection"]["defenses"][0]  # noqa: E731
    mutations = {
        "candidates chosen on test": lambda d: d["candidate_selection"].update(split="test"),
        "unknown kept source": lambda d: first(d)["cascade"].append("adjoint:2:stale"),
        "empty cascade": lambda d: first(d).update(cascade=[]),
        "dev accuracy out of range": lambda d: first(d)["sources"][0].update(dev_acc=101.0),
        "unknown pairing": lambda d: first(d)["pairing"].update({"1": "late"}),
        "missing candidate selection": lambda d: d.pop("candidate_selection"),
        "unknown protocol mode": lambda d: d["protocol"].update(mode="lucky"),
        "estimate without a prediction": lambda d: d["estimate"].pop("predicted_s"),
        "estimate probe on test": lambda d: d["estimate"]["probe"].update(split="test"),
        "unknown phase": lambda d: d["data_access"][0].update(phase="peek"),
    }
    for name, edit in mutations.items():
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken(edit), result_schema())
            pytest.fail(f"validated although: {name}")


def test_candidate_selection_reads_only_dev(clean_tiny, digits, monkeypatch):
    seen, gate = {}, {"open": False}
    original = protocol_module.run_dev_phase

    def spy(runner, plan, x_dev, y_dev):
        assert not gate["open"]
        seen["x"], seen["y"] = x_dev.clone(), y_dev.clone()
        outcomes = original(runner, plan, x_dev, y_dev)
        gate["open"] = True  # the test split may be read from now on, and only now
        return outcomes

    monkeypatch.setattr(protocol_module, "run_dev_phase", spy)
    result = evaluate(clean_tiny, dev=digits.dev, test=GuardedSplit(digits.test, gate), threat=ThreatModel("Linf", EPS),
                      suite=small_suite(cascade=(), square=None, boost=()), n_examples=8, defenses=["final"],
                      progress=False)
    assert gate["open"] and result.candidate_selection is not None
    assert torch.equal(seen["x"], digits.dev.images.float()[: len(seen["y"])])
    test_rows = {tuple(r.flatten().tolist()) for r in digits.test.images.float()}
    assert not any(tuple(r.flatten().tolist()) in test_rows for r in seen["x"])
    assert [(e["phase"], e["split"]) for e in result.data_access] == [
        ("chance_check", "dev"), ("candidate_selection", "dev"), ("test_evaluation", "test")]


def test_exhaustive_attacks_with_every_source_in_the_matrix_and_the_cascade(clean_tiny, digits):
    result = evaluate(clean_tiny, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", EPS),
                      suite=small_suite(square=None), n_examples=12, defenses=["final"], exhaustive=True,
                      progress=False)
    every = [str(s) for s in all_sources(clean_tiny.n_states, PAIRINGS)]
    # Today's full matrix (2N+4 sources, literal pairing) and the fresh pairing on top of it.
    assert set(map(str, all_sources(clean_tiny.n_states))) < set(every)
    final = result.defense("final")
    assert [c.source for c in final.matrix] == every
    for algo in ("apgd-ce", "apgd-t", "fab-t"):
        assert [c.source for c in final.cascade if c.attack == algo] == every
    boost = {spec.label for spec in small_suite().boost}
    assert boost and not [c for c in final.cascade if c.attack in boost]  # the boost belongs to the adaptive protocol
    assert result.candidate_selection is None and result.protocol["mode"] == "exhaustive"


def outcome_with(extra: dict[str, int], n_states: int, ready: str = "phantom") -> DevOutcome:
    """A dev outcome in which each source broke ``extra[source]`` of 40 survivors (0 if absent)."""
    broken, start = {}, 0
    for s in all_sources(n_states, PAIRINGS):
        if str(s) != ready:
            broken[str(s)] = list(range(start, start + extra.get(str(s), 0)))
    correct = torch.ones(100, dtype=torch.bool)
    return DevOutcome("final", 100, correct, GradientSource(ready), list(range(60, 100)), broken)


def test_the_rule_keeps_the_strongest_sources_and_the_stronger_pairing(clean_tiny):
    runner = AttackRunner(clean_tiny, ThreatModel("Linf", EPS), 0, EvalState(None, {}))
    n = clean_tiny.n_states  # 3
    kept = keep(outcome_with({"unrolled:2": 9, "adjoint:1:fresh": 7, "adjoint:1": 2, "adjoint:2": 5,
                              "adjoint:ensemble": 1, "adjoint:ensemble:fresh": 3, "unrolled:1": 4}, n), runner, 3)
    assert kept.cascade == ["phantom", "unrolled:2", "adjoint:1:fresh", "exact"]  # + final's own exact gradient
    assert kept.pairing["1"] == "fresh" and kept.pairing["2"] == "literal" and kept.pairing["ensemble"] == "fresh"
    assert kept.intermediate_state == {"adjoint": 1, "unrolled": 2}  # states n < N only
    assert kept.columns["adjoint_intermediate"] == "adjoint:1:fresh"
    assert kept.columns["adjoint_ensemble"] == "adjoint:ensemble:fresh"
    assert kept.columns["adjoint_final"] == f"adjoint:{n}"  # a tie between the pairings keeps the paper's
    assert kept.matrix[:2] == ["exact", "phantom"] and set(kept.cascade) <= set(kept.matrix)
    assert keep(outcome_with({}, n), runner, 1).cascade == ["phantom", "exact"]
    early = outcome_with({"adjoint:1": 3}, n)
    early.defense = "early:2"
    assert keep(early, runner, 2).cascade == ["phantom", "adjoint:1", "unrolled:2"]  # early:2's own exact gradient
    ensemble = outcome_with({"adjoint:1": 3}, n)
    ensemble.defense = "ensemble"
    assert keep(ensemble, runner, 2).cascade == ["phantom", "adjoint:1"]  # no source is the ensemble's own gradient


def test_the_second_pairing_is_attacked(clean_tiny, digits, monkeypatch):
    attackable_module = sys.modules["deqrobust.attackable"]  # the package exports a function of the same name
    pairings = []
    original = attackable_module.simultaneous_adjoint

    def spy(*args, **kwargs):
        pairings.append(kwargs["pairing"])
        return original(*args, **kwargs)

    monkeypatch.setattr(attackable_module, "simultaneous_adjoint", spy)
    evaluate(clean_tiny, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", EPS),
             suite=small_suite(cascade=(), square=None, boost=()), n_examples=8, defenses=["final"], progress=False)
    assert {"literal", "fresh"} <= set(pairings)


class DropoutF(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.drop = nn.Linear(6, 6), nn.Dropout(0.5)

    def forward(self, z, e):
        return torch.tanh(0.5 * self.drop(self.lin(z)) + e)


def dropout_bn_deq() -> DEQClassifier:
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    return DEQClassifier(stem, DropoutF(), nn.Linear(6, 3), f_max_iter=5, grad="phantom")


def test_a_model_in_train_mode_is_attacked_in_eval_mode_and_switched_back():
    model = dropout_bn_deq()
    x = torch.randn(8, 4)
    expected = attackable(model.eval(), "early:3", "adjoint:3")(x)
    model.train()
    running = model.stem[1].running_mean.clone()
    wrapped = attackable(model, "early:3", "adjoint:3")
    with pytest.warns(TrainModeWarning, match="train mode"):
        out = wrapped(x)
    assert torch.equal(out, expected)  # no dropout mask, no batch statistics
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainModeWarning)
        g1 = torch.autograd.grad(wrapped(xg).sum(), xg)[0]
        g2 = torch.autograd.grad(wrapped(xg).sum(), xg)[0]
    assert torch.equal(g1, g2)  # deterministic: dropout off in the backward too
    assert torch.equal(model.stem[1].running_mean, running)  # BatchNorm statistics untouched
    assert model.training and model.f.drop.training  # mode restored


def test_evaluate_switches_a_train_mode_model_to_eval_and_back(clean_tiny, digits):
    clean_tiny.train()
    try:
        with pytest.warns(TrainModeWarning):
            evaluate(clean_tiny, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", EPS),
                     suite=small_suite(cascade=(), square=None, boost=()), n_examples=4, defenses=["final"],
                     progress=False, exhaustive=True, sources=["phantom"])
        assert clean_tiny.training
    finally:
        clean_tiny.eval()


def test_estimate_predicts_without_reading_the_test_split(clean_tiny, digits):
    gate = {"open": False}
    est = estimate(clean_tiny, dev=digits.dev, test=GuardedSplit(digits.test, gate), threat=ThreatModel("Linf", EPS),
                   suite=small_suite(), n_examples=100)
    assert est.predicted_s > 0 and est.probe["split"] == "dev"
    assert {"dev early-exit selection", "dev candidate selection", "test matrix", "cascade"} <= set(est.breakdown)
    assert est.breakdown["test matrix"] > 0 and est.breakdown["dev candidate selection"] > 0
    exhaustive = estimate(clean_tiny, dev=digits.dev, test=GuardedSplit(digits.test, gate),
                          threat=ThreatModel("Linf", EPS), suite=small_suite(), n_examples=100, exhaustive=True)
    assert exhaustive.breakdown["dev candidate selection"] == 0
    # Every source vs the top-k: counted on the planned runs, as two timing probes differ by more than
    # the price of the extra runs.
    threat = ThreatModel("Linf", EPS)
    cascades = [sum(n for kind, n in count_by_kind(assumed_runs(plan_for(
        clean_tiny, EvaluationOptions(suite=small_suite(), n_examples=100, exhaustive=exhaustive_mode), threat,
        digits.dev, digits.test))).items() if kind.startswith("test/cascade")) for exhaustive_mode in (False, True)]
    assert cascades[1] > cascades[0] > 0
    assert "assumed" in type(est).render(est.to_dict())


def test_an_estimate_for_more_examples_than_the_test_split_says_it_was_capped(clean_tiny, digits):
    est = estimate(clean_tiny, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", EPS), suite=small_suite(),
                   n_examples=100_000, defenses=["final"])
    n = len(digits.test.labels)
    assert est.assumptions[0] == f"{n} test examples: 100000 were asked for, the test split has {n}"
    assert "100000 were asked for" in type(est).render(est.to_dict())


@pytest.mark.slow
def test_cli_estimate_prints_a_prediction_and_exits(tmp_path, clean_tiny):
    from .conftest import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(clean_tiny, tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "deqrobust", "evaluate", "--checkpoint", str(ckpt), "--estimate",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "predicted wall time" in done.stdout and "assumed" in done.stdout
    assert not out.exists()  # nothing written, nothing evaluated


def test_every_evaluation_starts_with_a_banner_even_without_progress_bars(clean_tiny, digits, capsys):
    # progress=False (the CLI's --no-progress) drops the bars, not the banner: what runs, on how many
    # examples (and why, when capped), and its price, before any attack runs.
    x, y = digits.test.images[:6], digits.test.labels[:6]
    evaluate(clean_tiny, dev=digits.dev, test=(x, y), threat=ThreatModel("Linf", EPS),
             suite=small_suite(cascade=(), square=None, boost=()), n_examples=50, defenses=["final"], progress=False)
    err = capsys.readouterr().err
    banner = err[:err.index("predicted wall time")]
    assert banner.startswith("evaluating ") and f"Linf eps={EPS:.4g}" in banner
    assert "test examples: 6 of 6 (capped: the test split has 6)" in banner
    assert "defenses: final" in banner and "attack runs: about " in banner
    assert "evaluation finished in " in err
