"""The white-box protocol: every cell, worst case, schema, reports, sanity checks, resume, dev/test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deqrobust.attacks import ThreatModel
from deqrobust.errors import ConfigError
from deqrobust.evaluate import evaluate, get_suite, result_schema
from deqrobust.evaluate import protocol as protocol_module
from deqrobust.evaluate.report import FILES
from deqrobust.gradients import all_sources
from deqrobust.gradients.spec import PAIRINGS

EPS = 0.1
TINY_SUITE = get_suite("quick", dev_examples=12, sanity_examples=8)


def small_suite(**kw):
    from dataclasses import replace

    from deqrobust.evaluate.suites import AttackSpec

    suite = replace(TINY_SUITE, cascade=(AttackSpec("apgd-ce", steps=3), AttackSpec("apgd-t", steps=2, n_targets=1),
                                         AttackSpec("fab-t", steps=2, n_targets=1)),
                    square=AttackSpec("square", queries=20), matrix=AttackSpec("pgd", steps=4))
    return replace(suite, **kw)


@pytest.fixture(scope="module")
def run(clean_tiny, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = evaluate(clean_tiny, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", EPS),
                      suite=small_suite(), n_examples=24, seed=0, out_dir=out, progress=False, exhaustive=True)
    return result, out


def test_matrix_has_every_cell_and_the_worst_case_is_below_every_attack(run, clean_tiny):
    result, _ = run
    sources = {str(s) for s in all_sources(clean_tiny.n_states, PAIRINGS)}
    names = [d.defense for d in result.defenses]
    assert names[0] == "final" and names[-1] == "ensemble" and any(n.startswith("early:") for n in names)
    for d in result.defenses:
        assert {c.source for c in d.matrix} == sources
        for algo in ("apgd-ce", "apgd-t", "fab-t"):
            assert {c.source for c in d.cascade if c.attack == algo} == sources
        assert [c for c in d.cascade if c.attack.startswith("square")]
        for c in d.matrix + d.cascade:
            assert d.worst_case_acc <= c.robust_acc + 1e-9
        assert d.worst_case_acc <= d.min_over_attacks_acc <= d.clean_acc
        assert d.table["worst_case"] == d.worst_case_acc
    # the headline is the defense fixed on dev, so its test worst case need not be the largest on test
    assert result.best_defense in names
    assert result.autoattack_acc == result.defense(result.best_defense).worst_case_acc


def test_json_validates_and_reports_are_written(run):
    jsonschema = pytest.importorskip("jsonschema")
    result, out = run
    for name in FILES:
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    jsonschema.validate(data, result_schema())
    assert data["clean_acc"] == result.clean_acc and data["eps"] == EPS and data["threat_model"] == "Linf"
    report = (out / "report.md").read_text()
    for d in result.defenses:
        assert f"| {d.defense}" in report
    assert (out / "residuals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["suite"]["matrix"]["step"] == pytest.approx(0.25 * EPS)
    # Results that are wrong in any of these ways do not validate.
    import copy

    def broken(edit):
        bad = copy.deepcopy(data)
        edit(bad)
        return bad

    mutations = {
        "missing autoattack_acc": lambda d: d.pop("autoattack_acc"),
        "table cell not a number": lambda d: d["defenses"][0]["table"].update(worst_case="abc"),
        "table cell out of range": lambda d: d["defenses"][0]["table"].update(adjoint_final=-5),
        "unknown table column": lambda d: d["defenses"][0]["table"].update(bogus=1.0),
        "dev accuracy not a number": lambda d: d["early_exit"]["per_state"][0].update(white_box_acc="x"),
        "suite matrix not a setting": lambda d: d["suite"].update(matrix="x"),
        "empty matrix": lambda d: d["defenses"][0].update(matrix=[]),
        "missing sanity checks": lambda d: d["defenses"][0].update(sanity_checks=[]),
        "unknown gradient source": lambda d: d["defenses"][0]["matrix"][0].update(source="bogus"),
        "unknown preset": lambda d: d["suite"]["matrix"].update(presets=["pgd7"]),
    }
    for name, edit in mutations.items():
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken(edit), result_schema())
            pytest.fail(f"validated although: {name}")


def test_a_resumed_evaluation_reports_what_each_defense_cost_the_processes_before_it(run, clean_tiny, digits, tmp_path):
    import shutil

    first, out = run
    shutil.copy(out / "eval_state.json", tmp_path / "eval_state.json")
    again = evaluate(clean_tiny, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", EPS),
                     suite=small_suite(), n_examples=24, seed=0, out_dir=tmp_path, progress=False, exhaustive=True)
    assert again.timing["resumed_units"] > 0
    assert [d.worst_case_acc for d in again.defenses] == [d.worst_case_acc for d in first.defenses]
    # the total is the earlier process's (to its last saved unit) and this one's, not the moment of reading back
    assert 0.8 * first.timing["total_s"] <= again.timing["total_s"] <= 1.2 * first.timing["total_s"] + 2.0 > 0
    assert again.timing["this_process_s"] < 0.5 * again.timing["total_s"]
    for before, after in zip(first.defenses, again.defenses):
        attacks = sum(c.seconds for c in before.matrix + before.cascade)
        # the attacks' recorded time (each cell's units, read back), not the moment it took to read them
        assert after.seconds >= 0.9 * attacks > 0, (before.defense, before.seconds, after.seconds)
        assert after.seconds <= 1.1 * before.seconds + 1.0


def test_clean_trained_model_passes_the_sanity_checks_and_falls_to_zero(run):
    result, _ = run
    final = result.defense("final")
    checks = {c.name: c for c in final.sanity_checks}
    assert set(checks) == {"eps_growth", "more_iterations", "square_vs_white_box", "gradients", "deterministic_forward"}
    growth = checks["eps_growth"]
    assert growth.passed, growth.details
    accs = list(growth.details["robust_acc_by_eps"].values())
    assert accs[-1] <= 2.0 and accs[0] >= accs[-1]
    assert checks["gradients"].passed and checks["deterministic_forward"].passed


def test_a_gradient_masked_model_is_caught(masked_tiny, digits, tmp_path):
    result = evaluate(masked_tiny, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", 0.2),
                      suite=small_suite(square=__import__("deqrobust.evaluate.suites", fromlist=["AttackSpec"]).AttackSpec("square", queries=200)),
                      n_examples=24, seed=0, defenses=["final"], progress=False)
    checks = {c.name: c for c in result.defense("final").sanity_checks}
    assert not checks["gradients"].passed
    assert checks["gradients"].details["zero"] > 0
    assert not (checks["eps_growth"].passed and checks["square_vs_white_box"].passed)
    assert any("sanity check(s) failed" in n for n in result.notes)


class GuardedSplit:
    """A split whose images and labels cannot be read until ``gate["open"]``."""

    def __init__(self, split, gate):
        self._split, self._gate, self.name = split, gate, split.name

    def __len__(self):
        return len(self._split)

    def _read(self, field):
        if not self._gate["open"]:
            raise AssertionError(f"test {field} read before the early-exit selection finished")
        return getattr(self._split, field)

    images = property(lambda self: self._read("images"))
    labels = property(lambda self: self._read("labels"))


def test_early_exit_is_selected_on_dev_only(clean_tiny, digits, monkeypatch):
    seen, gate = {}, {"open": False}
    original = protocol_module.run_dev_phase

    def spy(runner, plan, x_dev, y_dev):
        seen["x"], seen["y"] = x_dev.clone(), y_dev.clone()
        outcomes = original(runner, plan, x_dev, y_dev)
        gate["open"] = True  # the test split may be read from now on, and only now
        return outcomes

    monkeypatch.setattr(protocol_module, "run_dev_phase", spy)
    result = evaluate(clean_tiny, dev=digits.dev, test=GuardedSplit(digits.test, gate), threat=ThreatModel("Linf", EPS),
                      suite=small_suite(cascade=(), square=None), n_examples=8, progress=False,
                      defenses=["early"])  # the defense chosen on dev; final and ensemble read test the same way
    assert gate["open"] and any(d.defense.startswith("early:") for d in result.defenses)
    dev_x = digits.dev.images.float()[: len(seen["y"])]
    assert torch.equal(seen["x"], dev_x) and torch.equal(seen["y"], digits.dev.labels[: len(seen["y"])])
    test_rows = {tuple(r.flatten().tolist()) for r in digits.test.images.float()}
    assert not any(tuple(r.flatten().tolist()) in test_rows for r in seen["x"])
    assert [e["split"] for e in result.data_access] == ["dev", "dev", "dev", "test"]  # chance check, early exit, candidates
    assert result.early_exit.split == "dev"


def test_same_seed_same_numbers(clean_tiny, digits):
    kwargs = dict(dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", EPS), n_examples=12,
                  defenses=["early:2"], progress=False)  # one defense: every attack's randomness is still drawn
    a = evaluate(clean_tiny, suite=small_suite(), seed=3, **kwargs)
    b = evaluate(clean_tiny, suite=small_suite(), seed=3, **kwargs)
    strip = lambda r: [(d.defense, d.worst_case_acc, [(c.attack, c.source, c.n_broken) for c in d.matrix + d.cascade]) for d in r.defenses]
    assert strip(a) == strip(b)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_survivors_are_packed_into_full_batches_shared_evenly(world_size):
    from deqrobust.evaluate.runner import AttackRunner
    from deqrobust.evaluate.state import EvalState

    todo = torch.zeros(1000, dtype=torch.bool)
    todo[torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:301]] = True
    shares = [AttackRunner(torch.nn.Identity(), ThreatModel("Linf", EPS), 0, EvalState(None, {}), batch_size=64,
                           rank=rank, world_size=world_size).packed(todo) for rank in range(world_size)]
    batches = [idx for share in shares for _, idx in share]
    # Exactly the survivors, each once; ceil(301 / 64) = 5 batches rounded up to a multiple of the world size.
    assert sorted(torch.cat(batches).tolist()) == todo.nonzero().flatten().tolist()
    assert len(batches) == -(-5 // world_size) * world_size
    assert max(len(b) for b in batches) <= 64 and max(len(b) for b in batches) - min(len(b) for b in batches) <= 1
    assert len({len(share) for share in shares}) == 1  # every process gets the same number of batches
    assert AttackRunner(torch.nn.Identity(), ThreatModel("Linf", EPS), 0, EvalState(None, {}), 64).packed(
        torch.zeros(5, dtype=torch.bool)) == []


def test_a_cascade_attacks_only_the_survivors_in_as_few_batches_as_they_fill(clean_tiny, digits, monkeypatch):
    """An example broken earlier is never attacked again, and survivors do not drag empty batches along."""
    from deqrobust.evaluate.runner import AttackRunner
    from deqrobust.evaluate.state import EvalState
    from deqrobust.evaluate.suites import AttackSpec

    calls = []
    original = AttackSpec.build

    def counting_build(self, *args, **kwargs):
        attack = original(self, *args, **kwargs)
        inner = attack.__call__

        class Counted:
            def __getattr__(self, name):
                return getattr(attack, name)

            def __call__(self, x, y):
                calls.append(len(y))
                return inner(x, y)

        return Counted()

    monkeypatch.setattr(AttackSpec, "build", counting_build)
    runner = AttackRunner(clean_tiny, ThreatModel("Linf", EPS), 0, EvalState(None, {}), batch_size=8, progress=False)
    x = digits.test.images[:40].float() / 255.0 if digits.test.images.dtype == torch.uint8 else digits.test.images[:40].float()
    y = digits.test.labels[:40]
    todo = torch.zeros(40, dtype=torch.bool)
    todo[[1, 9, 17, 25, 33, 34, 35, 39]] = True  # 8 survivors spread over all 5 batches of 8
    from deqrobust.gradients import GradientSource

    result = runner.run("k", "final", AttackSpec("pgd", steps=2), GradientSource("phantom"), x, y, todo)
    assert calls == [8] and result.attacked == 8
    assert set(result.broken) <= {1, 9, 17, 25, 33, 34, 35, 39}


class NaNAboveBrightness(torch.nn.Module):
    """A linear classifier whose logits are NaN for inputs brighter than ``threshold`` on average."""

    def __init__(self, linear, threshold):
        super().__init__()
        self.linear, self.threshold = linear, threshold

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        bright = x.flatten(1).mean(dim=1, keepdim=True) > self.threshold
        return torch.where(bright, torch.full_like(logits, float("nan")), logits)


def test_nonfinite_logits_count_as_not_robust_and_are_reported(digits):
    torch.manual_seed(0)
    x = digits.train.images.float() / 255.0 if digits.train.images.dtype == torch.uint8 else digits.train.images.float()
    linear = torch.nn.Linear(x[0].numel(), 10)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(linear(x.flatten(1)), digits.train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_test = digits.test.images[:32].float() / 255.0 if digits.test.images.dtype == torch.uint8 else digits.test.images[:32].float()
    means = x_test.flatten(1).mean(dim=1)
    threshold = float(means.quantile(0.75))  # the brightest quarter is NaN even when clean
    model = NaNAboveBrightness(linear, threshold).eval()
    result = evaluate(model, dev=digits.dev, test=digits.test, threat=ThreatModel("Linf", EPS), suite=small_suite(),
                      n_examples=32, seed=0, progress=False)
    final = result.defense("final")
    clean_nan = int((means > threshold).sum())
    assert final.n_nonfinite_clean == clean_nan > 0
    # NaN never counts as correct: clean accuracy is at most the share of finite examples.
    assert final.clean_acc <= 100.0 * (32 - clean_nan) / 32
    # Brightening by eps pushes more inputs over the threshold: those count as broken, and are counted.
    assert final.n_nonfinite_adversarial > 0
    assert sum(c.n_nonfinite for c in final.matrix + final.cascade) >= final.n_nonfinite_adversarial
    assert final.worst_case_acc <= min(c.robust_acc for c in final.matrix + final.cascade)
    assert any("NaN/Inf" in note for note in result.notes)


def test_an_evaluation_resumes_when_its_checkpoint_is_named_by_another_path(clean_tiny, tmp_path, monkeypatch):
    import shutil

    from deqrobust.evaluate import EvaluationOptions, evaluate_checkpoint

    from .conftest import save_tiny_checkpoint

    first = save_tiny_checkpoint(clean_tiny, tmp_path / "a" / "best.safetensors")
    options = EvaluationOptions(suite="pgd10", n_examples=4, dev_examples=4, defenses=("final",), sources=("exact",),
                                out_dir=tmp_path / "eval", progress=False)
    before = evaluate_checkpoint(first.resolve(), options, device="cpu")
    moved = tmp_path / "b" / "best.safetensors"
    moved.parent.mkdir()
    shutil.copy(first, moved)
    monkeypatch.chdir(tmp_path)
    again = evaluate_checkpoint(Path("b") / "best.safetensors", options, device="cpu")  # relative, and elsewhere
    assert again.timing["resumed_units"] == len(json.loads((tmp_path / "eval" / "eval_state.json").read_text())["units"]) > 0
    assert again.defense("final").worst_case_acc == before.defense("final").worst_case_acc
    assert again.model["checkpoint"] == "b/best.safetensors"  # the results still say where it was read from
    with torch.no_grad():
        next(clean_tiny.parameters()).add_(1e-3)
    try:
        other = save_tiny_checkpoint(clean_tiny, tmp_path / "c" / "best.safetensors")
    finally:
        with torch.no_grad():
            next(clean_tiny.parameters()).sub_(1e-3)
    with pytest.raises(ConfigError, match="differs in: model"):  # other weights: another evaluation
        evaluate_checkpoint(other, options, device="cpu")
