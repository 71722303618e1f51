"""One plan: the attack runs the protocol executes are the runs the plan lists and the cost
estimate prices — the same list, the same counts per kind — in the adaptive, exhaustive and
matrix-only modes; the dev size is one rule for the CLI and the Python API."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
import torch

from deqrobust.attacks import ThreatModel
from deqrobust.evaluate import EvaluationOptions, dev_size, evaluate, get_suite
from deqrobust.evaluate.cost import estimate_cost
from deqrobust.evaluate.executor import TestPhase
from deqrobust.evaluate.inputs import split_tensors
from deqrobust.evaluate.plan import ProtocolMode
from deqrobust.evaluate.protocol import plan_for
from deqrobust.evaluate.runner import AttackRunner
from deqrobust.evaluate.runs import count_by_kind, plan_runs, share_groups
from deqrobust.evaluate.state import EvalState

from .test_protocol import EPS, small_suite

N_TEST = 12


def record_runs(monkeypatch) -> list[str]:
    """The key of every attack run the protocol asks the runner for, and of every transfer judged
    (a key asked again: once)."""
    keys: list[str] = []
    original, original_transfer = AttackRunner.run, TestPhase.transfer

    def spy(self, key, *args, **kwargs):
        if key not in keys:
            keys.append(key)
        return original(self, key, *args, **kwargs)

    def spy_transfer(self, ledger, twin, run, bar):
        keys.append(run.key(self.runner.threat.eps))
        return original_transfer(self, ledger, twin, run, bar)

    monkeypatch.setattr(AttackRunner, "run", spy)
    monkeypatch.setattr(TestPhase, "transfer", spy_transfer)
    return keys


def planned_after(model, digits, options, result):
    """The plan's runs with the choices the evaluation made (early states and candidates on dev,
    the sanity checks' source on test)."""
    threat = ThreatModel("Linf", EPS)
    plan = plan_for(model, options, threat, digits.dev, digits.test)
    early = result.early_exit
    states = list(dict.fromkeys([early.paper_rule, early.white_box_rule])) if early else []
    defenses = plan.defense_plans(plan.defenses(states), result.candidate_selection)
    sanity = {d.defense: plan.target.source(d.sanity_checks[0].details["source"]) for d in result.defenses}
    return plan, plan_runs(plan, defenses, sanity)


CASES = {
    "adaptive": dict(suite=small_suite(dev_examples=N_TEST)),
    "exhaustive": dict(suite=small_suite(dev_examples=N_TEST), exhaustive=True, defenses=["final", "ensemble"]),
    "matrix-only": dict(suite=small_suite(dev_examples=N_TEST, cascade=(), square=None, adaptive=False),
                        defenses=["final", "early:2"]),
    "purified": dict(suite=small_suite(dev_examples=N_TEST), defenses=["entropy(chunk=1,steps=2)"]),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_the_runs_executed_are_the_runs_planned_and_priced(mode, clean_tiny, digits, monkeypatch):
    keys = record_runs(monkeypatch)
    options = EvaluationOptions(n_examples=N_TEST, batch_size=N_TEST, progress=False, **CASES[mode])
    result = evaluate(clean_tiny, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", EPS), n_examples=N_TEST,
                      batch_size=N_TEST, progress=False, **CASES[mode])
    expected_mode = "adaptive" if mode == "purified" else mode
    assert result.protocol["mode"] == expected_mode
    plan, planned = planned_after(clean_tiny, digits, options, result)
    assert plan.mode is ProtocolMode(expected_mode)
    eps = EPS
    # The same list, in the same order, and so the same counts per kind.
    assert [run.key(eps) for run in planned] == keys
    kinds = count_by_kind(planned)
    assert sum(kinds.values()) == len(keys)
    assert any(k.startswith("test/sanity") for k in kinds) and any(k.startswith("test/matrix") for k in kinds)
    if mode != "matrix-only":
        assert any(k.startswith("test/cascade") for k in kinds) and any(k.startswith("test/square") for k in kinds)
    if mode == "purified":  # the static twin first; every follow-up column; the transfer after every static run
        assert [d.defense for d in result.defenses] == ["early:2", "entropy(chunk=1,steps=2,step=0.025,radius=0.1,"
                                                        "memory=2):early:2"]
        assert {"test/follow-up/pgd4:non-adaptive", "test/follow-up/pgd4:through-loop:straight-through",
                "test/follow-up/pgd4:through-loop:raw", "test/follow-up/pgd4-confident", "test/transfer/transfer"} <= set(kinds)
        last_static = max(i for i, run in enumerate(planned) if run.phase == "test" and run.step != "sanity"
                          and run.defense.purify is None)
        transfer = next(i for i, run in enumerate(planned) if run.step == "transfer")
        assert transfer > last_static
    if mode == "adaptive":
        assert any(k.startswith("dev/early-exit selection") for k in kinds)
        assert any(k.startswith("dev/candidate selection") for k in kinds)
        # Trajectories shared across defenses, on dev and in the test matrix.
        shared = {(planned[g[0]].phase, planned[g[0]].step) for g in share_groups(plan, planned)}
        assert {("dev", "early-exit selection"), ("test", "matrix")} <= shared
    # The price covers exactly these runs.
    runner = AttackRunner(clean_tiny, ThreatModel("Linf", EPS), 0, EvalState(None, {}), N_TEST)
    x_dev, y_dev = split_tensors(digits.dev, plan.n_dev, digits.dev.images.device)
    priced = estimate_cost(runner, plan, planned, x_dev, y_dev)
    assert priced.attack_runs == dict(Counter(run.phase for run in planned))
    if expected_mode != "adaptive":  # nothing is chosen on dev: the estimate recorded before the run priced these runs
        assert result.estimate["attack_runs"] == priced.attack_runs


def test_a_model_at_chance_on_dev_gets_its_report_without_the_full_plan(digits, tmp_path):
    from deqrobust.evaluate import result_schema
    from deqrobust.models import mdeq

    from .conftest import TINY_SETTINGS

    torch.manual_seed(0)
    untrained = mdeq("tiny", 10, 1, **TINY_SETTINGS).eval()
    result = evaluate(untrained, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", EPS), n_examples=32,
                      out_dir=tmp_path, progress=False)
    assert result.protocol["mode"] == "at-chance" and "at chance on dev" in result.protocol["why"]
    assert [d.defense for d in result.defenses] == ["final"] and result.early_exit is None
    assert result.candidate_selection is None and not result.defense("final").cascade
    assert [c.source for c in result.defense("final").matrix] == [untrained.grad]
    assert any(note.startswith("model at chance on dev") for note in result.notes)
    assert sum(result.estimate["attack_runs"].values()) <= 10
    assert result.data_access[0]["phase"] == "chance_check" and result.data_access[0]["split"] == "dev"
    pytest.importorskip("jsonschema").validate(json.loads((tmp_path / "results.json").read_text()), result_schema())
    assert "at chance on dev" in (tmp_path / "report.md").read_text()


def test_the_dev_size_is_one_rule_for_the_cli_and_the_api(clean_tiny, digits, cli, tmp_path):
    from .conftest import save_tiny_checkpoint

    assert dev_size(80, 16, None) == 16 and dev_size(80, None, None) == 80 and dev_size(80, 16, 40) == 40
    assert EvaluationOptions(suite="quick", n_examples=16).resolved_suite().dev_examples == 16
    suite = replace(get_suite("quick"), dev_examples=80)
    api = evaluate(clean_tiny, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", EPS), suite=suite,
                   n_examples=6, defenses=["early"], sources=["exact"], progress=False, batch_size=6)
    assert api.early_exit is not None and api.early_exit.n_examples == 6
    assert api.suite["dev_examples"] == 6
    checkpoint = save_tiny_checkpoint(clean_tiny, tmp_path / "ck" / "checkpoints" / "best.safetensors")
    done = cli("evaluate", "--checkpoint", str(checkpoint), "--n-examples", "6", "--defenses", "early", "--sources",
               "exact", "--batch-size", "6", "--out", str(tmp_path / "eval"), "--no-progress", "--eps", str(EPS))
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert data["early_exit"]["n_examples"] == 6 and data["suite"]["dev_examples"] == 6


def test_a_shared_group_is_due_after_every_earlier_run_of_its_defenses(clean_tiny, digits):
    """The order of the test phase lets runs share: when a group's first run is due, every run
    its members' defenses list before them is done (so each member's examples are known)."""
    from deqrobust.evaluate.plan import DefensePlan
    from deqrobust.evaluate.runs import test_phase_runs, test_runs
    from deqrobust.gradients import GradientSource

    plan = plan_for(clean_tiny, EvaluationOptions(suite=small_suite(), n_examples=N_TEST), ThreatModel("Linf", EPS),
                    digits.dev, digits.test)
    ready, a1, ens, u2 = (plan.target.ready_made, GradientSource("adjoint", 1), GradientSource("adjoint", None),
                          GradientSource("unrolled", 2))
    defenses = [DefensePlan(plan.target.defenses(["final"])[0], (ready, a1, ens), (ready, ens, a1), plan.boost),
                DefensePlan(plan.target.defenses(["early:2"])[0], (ready, u2, a1), (ready, a1, u2), plan.boost),
                DefensePlan(plan.target.defenses(["ensemble"])[0], (ready, ens), (ready, u2, ens), plan.boost)]
    runs = test_phase_runs(plan, defenses)
    assert sorted(map(repr, runs)) == sorted(repr(r) for d in defenses for r in test_runs(plan, d))
    groups = share_groups(plan, runs)
    assert {(runs[g[0]].step, runs[g[0]].spec.label, str(runs[g[0]].source)) for g in groups} >= {
        ("matrix", "pgd4", "adjoint:1"), ("cascade", "pgd10x2", "adjoint:1"), ("cascade", "pgd10x2", "unrolled:2")}
    for group in groups:
        first = group[0]
        for i in group:
            member = runs[i]
            earlier = [j for j, r in enumerate(runs[:i]) if r.defense == member.defense]
            assert all(j < first or j in group for j in earlier), (member, group)
