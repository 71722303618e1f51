"""The Python API's first hour: every bad input raises the library's own error, naming the
problem, before any solver step of the attack phase (counted, not timed)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from deqrobust import DEQClassifier
from deqrobust.attacks import PGD, ThreatModel
from deqrobust.errors import ConfigError, DEQInputError, NotADEQWarning
from deqrobust.evaluate import estimate, evaluate
from deqrobust.evaluate.suites import get_suite
from dataclasses import replace


class Tanh(nn.Module):
    """f(z, e) = tanh(W z + e): the researcher's own small DEQ."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.lin.weight, std=0.3 / dim**0.5)

    def forward(self, z, e):
        return torch.tanh(self.lin(z) + e)


class Branches(nn.Module):
    """A two-branch state (a list) and no ``init_state``."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, z, e):
        return [torch.tanh(self.a(z[0]) + e), torch.tanh(self.b(z[1]) + e)]


class FirstBranch(nn.Module):
    def __init__(self, dim: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, classes)

    def forward(self, z):
        return self.lin(z[0])


def own_deq(f: nn.Module | None = None, head: nn.Module | None = None) -> DEQClassifier:
    torch.manual_seed(0)
    return DEQClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), f or Tanh(), head or nn.Linear(16, 10),
                         f_max_iter=6, b_max_iter=6).eval()


@pytest.fixture
def solves(monkeypatch):
    """Counts every DEQ solve (each forward of a DEQClassifier solves once)."""
    count = {"n": 0}
    original = DEQClassifier.solve

    def counted(self, *args, **kwargs):
        count["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DEQClassifier, "solve", counted)
    return count


def data(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def nan_at_3():
    x, y = data()
    x[3, 0, 2, 2] = float("nan")
    return x, y


def bad_labels():
    x, y = data()
    return x, y + 10


THREAT = ThreatModel("Linf", 0.1)
SUITE = replace(get_suite("quick"), dev_examples=4, sanity_examples=4)

# (what is wrong, keyword arguments replaced, model, error class, words the message must hold)
CASES = [
    ("wrong input shape", {"dev": (torch.rand(12, 3, 5, 5), data()[1])}, own_deq, DEQInputError,
     ["does not accept", "(3, 5, 5)"]),
    ("test inputs shaped unlike dev", {"test": (torch.rand(12, 3, 5, 5), data()[1])}, own_deq, DEQInputError,
     ["(3, 5, 5)", "(1, 8, 8)"]),
    ("labels out of range", {"test": bad_labels()}, own_deq, DEQInputError, ["labels must lie in [0, 10)"]),
    ("labels out of range on dev", {"dev": bad_labels()}, own_deq, DEQInputError, ["dev labels must lie in [0, 10)"]),
    ("negative labels", {"test": (data()[0], data()[1] - 20)}, own_deq, DEQInputError, ["labels must be class indices >= 0"]),
    ("float labels", {"test": (data()[0], data()[1].float())}, own_deq, DEQInputError, ["int64"]),
    ("NaN pixel", {"test": nan_at_3()}, own_deq, DEQInputError, ["NaN or Inf", "example(s) 3"]),
    ("Inf pixel on dev", {"dev": (data()[0].index_put((torch.tensor([5]),), torch.tensor(float("inf"))), data()[1])},
     own_deq, DEQInputError, ["dev inputs hold NaN or Inf", "example(s) 5"]),
    ("headline 'early' without a dev split", {"dev": None, "headline": "early"}, own_deq, ConfigError,
     ["headline 'early'", "dev"]),
    ("pixels above 1", {"test": (data()[0] * 255, data()[1])}, own_deq, DEQInputError, ["[0, 1]", "normalise"]),
    ("threat as a number", {"threat": 0.1}, own_deq, ConfigError, ["threat must be a ThreatModel", "8/255"]),
    ("L2 radius beyond the input range", {"threat": ThreatModel("L2", 9.0)}, own_deq, ConfigError, ["L2 eps 9", "exceeds 8"]),
    ("a lambda as the model", {}, lambda: (lambda x: x), ConfigError, ["torch.nn.Module"]),
    ("float32 inputs, float64 model", {}, lambda: own_deq().double(), DEQInputError, ["torch.float32", "torch.float64", "x.double()"]),
    ("a list state without init_state", {}, lambda: own_deq(Branches(), FirstBranch()), (ConfigError, DEQInputError),
     ["init_state"]),
    ("an unknown defense", {"defenses": "finall"}, own_deq, ConfigError, ["invalid defense 'finall'"]),
    ("a test split that is not a pair", {"test": data()[0]}, own_deq, ConfigError, ["pair of tensors"]),
]


CALLS = [(case, call) for case in CASES for call in ("evaluate", "estimate")
         if not (call == "estimate" and case[1].get("dev", 0) is None)]  # an estimate needs a dev split by definition


@pytest.mark.parametrize("case, call", CALLS, ids=[f"{c[0]}-{call}" for c, call in CALLS])
def test_each_bad_input_is_named_before_any_attack(case, call, solves, tmp_path):
    _, replaced, build, error, words = case
    kwargs = dict(dev=data(seed=1), test=data(), threat=THREAT, suite=SUITE, n_examples=8, batch_size=8)
    if call == "evaluate":
        kwargs.update(progress=False, out_dir=tmp_path / "out")
    kwargs.update(replaced)
    with pytest.raises(error) as caught:
        (evaluate if call == "evaluate" else estimate)(build(), **kwargs)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
    assert solves["n"] <= 1  # the one-example probe at most: no attack, no estimate, no dev phase
    assert not (tmp_path / "out").exists()  # nothing written


def test_threat_model_reads_fractions_and_refuses_a_radius_in_grey_levels():
    assert ThreatModel("Linf", "8/255").eps == 8 / 255
    with pytest.raises(ConfigError, match="did you mean 8/255"):
        ThreatModel("Linf", 8)
    with pytest.raises(ConfigError, match="invalid eps"):
        ThreatModel("Linf", "eight")


def test_an_attack_names_labels_out_of_range_and_warns_once_for_train_mode():
    model = own_deq()
    x, y = data(4)
    with pytest.raises(DEQInputError, match=r"labels must lie in \[0, 10\)"):
        PGD(model, THREAT, steps=2)(x, y + 5)
    model.train()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        from deqrobust import attackable

        PGD(attackable(model, "final", "unrolled:3"), THREAT, steps=3)(x, y)
    assert sum(w.category.__name__ == "TrainModeWarning" for w in seen) == 1
    assert model.training


def test_defenses_as_one_string_is_one_name(solves):
    result = evaluate(own_deq(), dev=data(seed=1), test=data(), threat=THREAT, suite=SUITE, n_examples=4, batch_size=4,
                      defenses="final", progress=False)
    assert [d.defense for d in result.defenses] == ["final"]
    assert result.dataset == "tensors"


class PlainFixedPoint(nn.Module):
    """A DEQ written in plain PyTorch: the library cannot reach its solver."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.f, self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), Tanh(), nn.Linear(16, 10)

    def forward(self, x):
        e = self.stem(x)
        z = torch.zeros_like(e)
        for _ in range(6):
            z = self.f(z, e)
        return self.head(z)


def test_a_plain_deq_is_not_silently_downgraded(tmp_path, capsys):
    with pytest.warns(NotADEQWarning, match="not a DEQ"):
        result = evaluate(PlainFixedPoint().eval(), dev=data(seed=1), test=data(), threat=THREAT, suite=SUITE, n_examples=4,
                          batch_size=4, progress=False, out_dir=tmp_path)
    note = next(n for n in result.notes if n.startswith("not a DEQ"))
    for word in ("own gradient (autograd) only", "not available", "DEQClassifier", "from_torchdeq"):
        assert word in note
    assert note in (tmp_path / "results.json").read_text()
    assert "not a DEQ" in capsys.readouterr().err  # the banner


# ---------------------------------------------------------------- results per example, float64, the headline
def small_suite():
    from deqrobust.evaluate.suites import AttackSpec

    return replace(get_suite("quick", dev_examples=12, sanity_examples=8),
                   cascade=(AttackSpec("apgd-ce", steps=3),), square=AttackSpec("square", queries=20),
                   matrix=AttackSpec("pgd", steps=4))


@pytest.fixture(scope="module")
def per_example(clean_tiny, digits):
    return evaluate(clean_tiny, dev=digits.dev, test=digits.test, threat=THREAT, suite=small_suite(), n_examples=24,
                    defenses=["final", "early:2"], progress=False, return_adversarial=True)


def test_per_example_flags_agree_with_the_accuracies_and_name_what_broke_each(per_example):
    assert per_example.dataset == "digits"  # splits carry their dataset's name
    for d in per_example.defenses:
        assert len(d.robust) == per_example.n_examples
        assert 100.0 * sum(d.robust) / len(d.robust) == pytest.approx(d.worst_case_acc)
        assert set(d.broken_by) == {i for i, ok in enumerate(d.robust) if not ok}
        clean_wrong = sum(v == "clean" for v in d.broken_by.values())
        assert 100.0 * (len(d.robust) - clean_wrong) / len(d.robust) == pytest.approx(d.clean_acc)
        attacked = [v for v in d.broken_by.values() if v != "clean"]
        assert attacked and all("|" in v for v in attacked)
        labels = {f"{c.attack}|{c.source}" for c in d.matrix + d.cascade}
        assert all(v.split(" (")[0] in labels or "check" in v for v in attacked)
        lo, hi = d.intervals["worst_case_acc"]
        assert lo <= d.worst_case_acc <= hi and hi - lo > 10  # 24 examples: a wide interval


def test_a_returned_adversarial_example_is_misclassified_and_in_the_ball(per_example, clean_tiny, digits):
    from deqrobust.defenses import defended_logits

    x = digits.test.images[: per_example.n_examples].float()
    y = digits.test.labels[: per_example.n_examples]
    for d in per_example.defenses:
        broken = [i for i, v in d.broken_by.items() if v != "clean"]
        points = d.adversarial[broken]
        assert float((points - x[broken]).abs().max()) <= THREAT.eps + 1e-6
        assert float(points.min()) >= 0 and float(points.max()) <= 1
        with torch.no_grad():
            predicted = defended_logits(clean_tiny, points, d.defense).argmax(1)
        assert bool((predicted != y[broken]).all())
        robust = [i for i, ok in enumerate(d.robust) if ok]
        assert torch.equal(d.adversarial[robust], x[robust])  # untouched where nothing broke it
    assert all("adversarial" not in d for d in per_example.to_dict()["defenses"])


def test_the_headline_is_fixed_on_dev_and_carries_intervals(per_example, digits):
    assert "dev" in per_example.best_defense_rule and "before the test split" in per_example.best_defense_rule
    lo, hi = per_example.autoattack_acc_interval
    assert lo <= per_example.autoattack_acc <= hi
    text = str(per_example)
    assert per_example.best_defense in text and "[" in text and "Wilson" in text
    assert len(repr(per_example)) < 300


def test_select_headline_reads_dev_not_test():
    from deqrobust.evaluate.dev import DevOutcome
    from deqrobust.evaluate.selection import select_headline
    from deqrobust.gradients import GradientSource

    def outcome(name, correct, broken):
        return DevOutcome(name, 10, torch.tensor([True] * correct + [False] * (10 - correct)), GradientSource("exact"),
                          list(range(broken)))

    outcomes = {"final": outcome("final", 9, 6), "early:2": outcome("early:2", 8, 3), "ensemble": outcome("ensemble", 9, 5)}
    assert select_headline(outcomes, ["final", "early:2", "ensemble"])[0] == "early:2"  # 50% on dev beats 30%, 40%
    assert select_headline(outcomes, ["final", "early:2"], named="final") == ("final", "named by the user")


def test_float64_end_to_end_agrees_with_float32(clean_tiny, digits):
    import copy

    kwargs = dict(threat=THREAT, suite=small_suite(), n_examples=16, defenses=["final"], progress=False, batch_size=8)
    x_dev, y_dev = digits.dev.images[:12].float(), digits.dev.labels[:12]
    x, y = digits.test.images[:16].float(), digits.test.labels[:16]
    single = evaluate(clean_tiny, dev=(x_dev, y_dev), test=(x, y), **kwargs)
    double_model = copy.deepcopy(clean_tiny).double()
    double = evaluate(double_model, dev=(x_dev.double(), y_dev), test=(x.double(), y), **kwargs)
    assert single.clean_acc == double.clean_acc
    assert abs(single.autoattack_acc - double.autoattack_acc) <= 100 / 16 + 1e-9  # within one example
    with pytest.raises(DEQInputError, match="float64"):
        evaluate(double_model, dev=(x_dev, y_dev), test=(x, y), **kwargs)


def test_a_check_that_cannot_fail_at_this_size_is_inconclusive():
    from deqrobust.evaluate import checks
    from deqrobust.evaluate.results import AttackCell

    # 20 examples, 2 white-box survivors: Square cannot break more than 10 points — the limit is 5
    some = checks.square_vs_white_box(AttackCell("square250", "none", "cascade", 2, 2, 0.0), 20)
    assert some.status == "fail"
    one = checks.square_vs_white_box(AttackCell("square250", "none", "cascade", 1, 1, 0.0), 20)
    assert one.status == "inconclusive" and one.passed is None and "needs" in one.details
    assert checks.examples_to_resolve(50.0, 60.0, 16).startswith("about ")
    assert "broke none" in checks.examples_to_resolve(60.0, 60.0, 16)


def test_estimate_then_evaluate_pays_the_probe_once(clean_tiny, digits, monkeypatch):
    from deqrobust.evaluate import protocol

    kwargs = dict(dev=digits.dev, test=digits.test, threat=THREAT, suite=small_suite(), n_examples=8, defenses=["final"],
                  batch_size=8)
    est = estimate(clean_tiny, **kwargs)
    assert str(est).startswith("predicted wall time")
    calls = []
    monkeypatch.setattr(protocol, "estimate_cost", lambda *a, **k: calls.append(1))
    result = evaluate(clean_tiny, progress=False, estimate=est, **kwargs)
    assert not calls and result.estimate["reused"] and result.estimate["predicted_s"] == est.predicted_s
    with pytest.raises(ConfigError, match="n_examples"):
        evaluate(clean_tiny, progress=False, estimate=est, **dict(kwargs, n_examples=6))


def test_the_command_line_names_bad_input_with_exit_2_before_any_work(cli, tmp_path):
    run = cli("evaluate", "--model", "torch.nn:Identity", "--dataset", "digits", "--eps", "8", "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "did you mean 8/255" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


def test_an_estimate_probes_a_model_in_train_mode_in_eval_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10)).train()
    before = model[2].running_mean.clone()
    with pytest.warns(UserWarning):
        est = estimate(model, dev=data(seed=1), test=data(), threat=THREAT, suite=SUITE, n_examples=4, batch_size=4)
    assert est.predicted_s > 0 and model.training and torch.equal(model[2].running_mean, before)
