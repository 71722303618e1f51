"""The README's "attack your own DEQ" example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_attack_your_own_deq_example_runs():
    pytest.importorskip("torchattacks")
    blocks = [b for b in python_blocks() if "attackable(model" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme_example"})


def bash_lines(marker: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    return [line for b in blocks for line in b.splitlines() if marker in line]


@pytest.mark.slow
def test_your_own_deq_section_runs_as_written(tmp_path, monkeypatch):
    """The TorchDEQ recipe (saved as my_deq.py), its Python evaluation and the command line, in a
    fresh folder; the only change is fewer test examples (100 -> 8), to keep the suite fast."""
    import os
    import subprocess
    import sys

    pytest.importorskip("torchdeq")
    module = next(b for b in python_blocks() if b.startswith("# my_deq.py"))
    usage = next(b for b in python_blocks() if "from my_deq import build" in b)
    assert "[:100]" in usage
    (tmp_path / "my_deq.py").write_text(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    exec(compile(usage.replace("[:100]", "[:8]"), "README.md", "exec"), {"__name__": "readme_own_deq"})
    assert (tmp_path / "my_deq.safetensors").exists()
    (line,) = bash_lines("--model my_deq.py:build")
    args = line.split()[1:] + ["--n-examples", "8", "--dev-examples", "8", "--sanity-examples", "4", "--no-progress",
                               "--out", "out"]
    run = subprocess.run([sys.executable, "-m", "deqrobust", *args], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "results.json").exists() and "best defense" in run.stdout
