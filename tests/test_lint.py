"""The lint and type gates, run by ``make test`` and so by CI: ruff (pyflakes, pycodestyle, line
length from pyproject.toml) on the package and the benchmarks (about a second), and mypy on the
package, which ships ``py.typed`` (about 10 s with mypy's cache in ``.mypy_cache``; a fresh clone's
first run builds the cache of torch's types, about 80 s on 2 cores)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing_in_the_package_and_benchmarks():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff is not None, "ruff is a test dependency (pip install -e '.[test]')"
    run = subprocess.run([ruff, "check", "src", "benchmarks"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]


def test_mypy_finds_nothing_in_the_package():
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    assert mypy is not None, "mypy is a test dependency (pip install -e '.[test]')"
    run = subprocess.run([mypy], cwd=ROOT, capture_output=True, text=True, timeout=600)  # files: pyproject.toml
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
    assert "no issues found" in run.stdout, run.stdout[-1000:]
