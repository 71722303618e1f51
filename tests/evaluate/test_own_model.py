"""Your own model: tensors straight into evaluate(), a factory from the command line (a model file
outside the package), safe weights, and a clear error for each bad input with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deqrobust.attacks import ThreatModel
from deqrobust.errors import ConfigError, DEQInputError
from deqrobust.evaluate import evaluate, result_schema

from ..test_checkpoint import Evil
from .test_protocol import EPS, small_suite

MODELS = textwrap.dedent('''
    import torch
    from torch import nn
    from deqrobust import DEQClassifier

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
        def forward(self, z, e):
            return torch.tanh(0.5 * self.conv(z) + e)

    def build():
        torch.manual_seed(0)
        head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
        return DEQClassifier(nn.Conv2d(1, 4, 3, padding=1), F(), head, f_max_iter=3, b_max_iter=3, grad="phantom",
                             phantom_steps=2, input_shape=(1, 8, 8))

    def build_plain():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def build_cifar():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))

    def not_a_module():
        return 3
''')


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / "mymodels.py").write_text(MODELS)
    (folder / "broken.py").write_text("raise RuntimeError('this module fails to import')\n")
    sys.path.insert(0, str(folder))
    import mymodels  # noqa: F401  (the same file the CLI imports)

    from safetensors.torch import save_file

    save_file(mymodels.build().state_dict(), str(folder / "deq.safetensors"))
    save_file(mymodels.build_plain().state_dict(), str(folder / "plain.safetensors"))
    torch.save(mymodels.build_plain().state_dict(), folder / "plain.pt")
    save_file({"1.weight": torch.zeros(10, 7), "1.bias": torch.zeros(10)}, str(folder / "wrong.safetensors"))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("mymodels", None)


def deqrobust(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "deqrobust", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


SMALL = ["--n-examples", "8", "--dev-examples", "8", "--sanity-examples", "4", "--no-progress"]


@pytest.mark.slow
def test_a_deq_from_a_file_outside_the_package_is_evaluated(user_dir, tmp_path):
    run = deqrobust("evaluate", "--model", f"{user_dir / 'mymodels.py'}:build", "--weights",
                    str(user_dir / "deq.safetensors"), "--dataset", "digits", "--eps", "0.1", "--suite", "pgd10",
                    "--defenses", "final,ensemble", "--out", str(tmp_path / "out"), *SMALL, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["model"]["factory"].endswith("mymodels.py:build") and data["model"]["is_deq"]
    assert {d["defense"] for d in data["defenses"]} == {"final", "ensemble"}
    assert any(c["source"] == "adjoint:3" for c in data["defenses"][0]["matrix"])  # every source of a DEQ


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["plain.safetensors", "plain.pt"])
def test_a_plain_network_from_an_importable_module_gets_its_own_gradient(user_dir, tmp_path, weights):
    out = tmp_path / "out"
    run = deqrobust("evaluate", "--model", "mymodels:build_plain", "--weights", str(user_dir / weights), "--dataset",
                    "digits", "--eps", "8/255", "--out", str(out), *SMALL, cwd=user_dir)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert [c["source"] for c in data["defenses"][0]["matrix"]] == ["autograd"]
    assert "own gradient" in (out / "report.md").read_text()


GOOD = ["--dataset", "digits", "--eps", "0.1"]


@pytest.mark.parametrize("args, message", [
    (["--model", "no_such_module:build", *GOOD], "cannot import 'no_such_module'"),
    (["--model", "broken:build", *GOOD], "this module fails to import"),
    (["--model", "mymodels:missing", *GOOD], "has no attribute 'missing'"),
    (["--model", "mymodels:not_a_module", *GOOD], "returned a int, not a torch.nn.Module"),
    (["--model", "mymodels:build_plain", "--weights", "wrong.safetensors", *GOOD], "shape mismatch 1.weight: weights (10, 7) vs model (10, 64)"),
    (["--model", "mymodels:build_plain", "--weights", "evil.pt", *GOOD], "refused to load"),
    (["--model", "mymodels:build_plain", "--dataset", "imagenet-9000", "--eps", "0.1"], "imagenet-9000"),
    (["--model", "mymodels:build_cifar", *GOOD], "does not accept digits inputs of shape (1, 8, 8)"),
    (["--model", "mymodels:build_plain", "--dataset", "digits"], "needs --eps"),
    (["--model", "mymodels", *GOOD], "module:function"),
])
def test_each_bad_input_gets_a_clear_error_and_nothing_is_written(user_dir, tmp_path, args, message, cli):
    marker = user_dir / "pwned"
    torch.save({"weight": torch.zeros(2), "payload": Evil(marker)}, user_dir / "evil.pt")
    out = tmp_path / "out"
    run = cli("evaluate", *args, "--out", str(out), *SMALL, cwd=user_dir)
    assert run.returncode == 2, run.stdout[-1000:] + run.stderr[-2000:]
    assert message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert not out.exists() and not marker.exists()


def tensors(split, n):
    x = split.images[:n]
    return (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()), split.labels[:n]


def test_tensor_pairs_give_the_same_numbers_as_splits(clean_tiny, digits):
    kwargs = dict(threat=ThreatModel("Linf", EPS), suite=small_suite(cascade=(), square=None, boost=()), n_examples=8,
                  defenses=["early:2"], progress=False)  # one defense: the inputs are what differs
    from_splits = evaluate(clean_tiny, dev=digits.dev, test=digits.test, **kwargs)
    from_tensors = evaluate(clean_tiny, dev=tensors(digits.dev, 12), test=tensors(digits.test, 8), **kwargs)
    strip = lambda r: [(d.defense, d.worst_case_acc, [(c.source, c.n_broken) for c in d.matrix]) for d in r.defenses]  # noqa: E731
    assert strip(from_splits) == strip(from_tensors)
    assert from_tensors.data_access[-1] == {"phase": "test_evaluation", "split": "test", "n_examples": 8}


def test_without_a_dev_split_nothing_is_chosen_and_the_report_says_why(clean_tiny, digits, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    result = evaluate(clean_tiny, dev=None, test=tensors(digits.test, 8), threat=ThreatModel("Linf", EPS),
                      suite=small_suite(square=None, boost=()), progress=False, out_dir=tmp_path)
    assert [d.defense for d in result.defenses] == ["final", "ensemble"]  # no early exit: it is chosen on dev
    assert result.candidate_selection is None and result.early_exit is None
    assert result.protocol["mode"] == "exhaustive" and "no dev split" in result.protocol["why"]
    assert [e["split"] for e in result.data_access] == ["test"]
    assert "skipped" in result.estimate and any("no dev split" in n for n in result.notes)
    assert "no dev split" in (tmp_path / "report.md").read_text()
    jsonschema.validate(json.loads((tmp_path / "results.json").read_text()), result_schema())
    with pytest.raises(ConfigError, match="'early' is chosen on the dev split"):
        evaluate(clean_tiny, dev=None, test=tensors(digits.test, 8), threat=ThreatModel("Linf", EPS),
                 defenses=["early"], progress=False)


@pytest.mark.parametrize("bad, message", [
    ((torch.rand(4, 1, 8, 8),), "pair of tensors"),
    ((torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.long)), "labels must be an int64 tensor of shape (4,)"),
    ((torch.rand(4, 1, 8, 8) * 3, torch.zeros(4, dtype=torch.long)), "must lie in [0, 1]"),
])
def test_bad_tensor_pairs_are_clear_errors(clean_tiny, digits, bad, message):
    with pytest.raises((ConfigError, DEQInputError), match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        evaluate(clean_tiny, dev=digits.dev, test=bad, threat=ThreatModel("Linf", EPS), progress=False)
