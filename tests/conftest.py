"""Shared fixtures: small contractive DEQs in float64 for exact numerical checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from deqrobust import DEQClassifier

# Under pytest-xdist every worker gets one core: two OpenMP threads per worker on a 2-core machine
# oversubscribe it (tiny ops on a busy machine can be 10x slower).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


class ContractiveF(nn.Module):
    """``f(z, e) = tanh(W z + e)`` with ``||W||_2 = scale < 1``: a unique, attracting fixed point."""

    def __init__(self, dim: int, scale: float = 0.6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, dim, generator=g)
        w = w / torch.linalg.matrix_norm(w, ord=2) * scale
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(0.1 * torch.randn(dim, generator=g))

    def forward(self, z, e):
        return torch.tanh(z @ self.weight.T + e + self.bias)


def make_small_deq(dim: int = 6, in_dim: int = 4, classes: int = 3, scale: float = 0.6, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    defaults = dict(f_solver="broyden", f_max_iter=60, f_tol=1e-12, b_max_iter=80, b_tol=1e-12)
    defaults.update(kwargs)
    model = DEQClassifier(nn.Linear(in_dim, dim), ContractiveF(dim, scale, seed), nn.Linear(dim, classes), **defaults)
    return model.double().eval()


@pytest.fixture
def purifications(monkeypatch):
    """Counts the purifications of input entropy reduction run (one per chunk boundary crossed)."""
    from deqrobust.defenses import entropy

    count = {"n": 0}
    original = entropy.entropy_steps

    def counted(*args, **kwargs):
        count["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(entropy, "entropy_steps", counted)
    return count


@pytest.fixture
def small_deq():
    return make_small_deq


def result_numbers(out_dir: Path) -> dict:
    """``results.json`` of an evaluation without its wall-clock timings (for equality checks)."""
    data = json.loads((Path(out_dir) / "results.json").read_text())
    data.pop("timing")
    data.pop("estimate")
    for d in data["defenses"]:
        d.pop("seconds")
        for c in d["matrix"] + d["cascade"]:
            c.pop("seconds")
    return data


@pytest.fixture
def cli(monkeypatch, capsys):
    """``deqrobust <args>`` run in this process: the command's exit code, stdout and stderr, as
    ``subprocess.run`` would give them, without a new interpreter and torch import (seconds per call).
    For checks of what the command does; a few tests keep a real subprocess for the exit codes."""
    from deqrobust.cli.main import main
    from deqrobust.utils.malloc import MARKER

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        monkeypatch.setenv(MARKER, "1")  # no re-exec for malloc tuning: it would replace pytest itself
        monkeypatch.setattr(sys, "path", list(sys.path))  # what the command adds to it is undone
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own errors exit 2
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            import torch

            torch.set_flush_denormal(False)  # the command sets it for its process; later tests in this one need IEEE floats
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["deqrobust", *args], code, out, err)

    return run
