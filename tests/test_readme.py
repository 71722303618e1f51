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
