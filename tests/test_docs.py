"""The README and the pages in docs/ are tested as written: their Python blocks run (with fewer
examples), every ``deqrobust`` command line parses with the command's own parser, and every field
of the results schema is described in docs/results.md."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def command_lines() -> list[tuple[str, str]]:
    """(page, line) for every ``deqrobust ...`` line of a bash block (``torchrun ... -m deqrobust`` too)."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("deqrobust ") or " -m deqrobust " in line:
                    found.append((page.name, line))
    return found


def test_every_page_is_linked_from_the_readme_and_the_readme_is_a_quick_start():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make test" in readme and "make demo" in readme
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"{page.name} is not linked from the README"


@pytest.mark.parametrize("page,line", command_lines())
def test_every_command_line_in_the_docs_parses(page, line):
    from deqrobust.cli.main import build_parser

    words = shlex.split(line)
    args = words[words.index("deqrobust") + 1:]
    parsed = build_parser().parse_args(args)  # an unknown flag or choice exits 2 here
    assert parsed.command == args[0], (page, line)


def test_the_command_lines_cover_every_command():
    assert {shlex.split(line)[shlex.split(line).index("deqrobust") + 1] for _, line in command_lines()} >= {
        "train", "evaluate", "reproduce"}


def test_the_results_page_describes_every_field_of_the_schema():
    from deqrobust.evaluate import result_schema

    schema = result_schema()
    text = (ROOT / "docs" / "results.md").read_text()
    fields = list(schema["properties"])
    for name in ("defense", "cell", "check"):
        fields += list(schema["$defs"][name]["properties"])
    missing = [f for f in fields if f"`{f}`" not in text]
    assert not missing, f"docs/results.md does not describe {missing}"


def test_every_python_block_in_the_docs_is_one_the_tests_run():
    """The README's example, the tutorial's three blocks and method.md's one run below; a new block needs a test."""
    blocks = {page.name: len(python_blocks(page)) for page in PAGES if python_blocks(page)}
    assert blocks == {"README.md": 1, "tutorial.md": 3, "method.md": 1}, blocks


def test_the_entropy_reduction_example_in_the_method_page_runs():
    (block,) = python_blocks(ROOT / "docs" / "method.md")
    assert "purify_input" in block
    exec(compile(block, "docs/method.md", "exec"), {"__name__": "method_example"})


def test_attack_your_own_deq_example_runs():
    pytest.importorskip("torchattacks")
    blocks = [b for b in python_blocks(ROOT / "docs" / "tutorial.md") if "attackable(model" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/tutorial.md", "exec"), {"__name__": "tutorial_example"})


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's example on a checkpoint of the demo's kind; the only changes: the path of the
    checkpoint and fewer test examples (100 -> 4)."""
    from .evaluate.conftest import save_tiny_checkpoint, train_clean_tiny

    from deqrobust.data import load_dataset

    (block,) = python_blocks(ROOT / "README.md")
    path = "runs/demo/train/checkpoints/best.safetensors"
    assert path in block and "n_examples=100" in block
    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint(train_clean_tiny(load_dataset("digits")), tmp_path / path)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(block.replace("n_examples=100", "n_examples=4"), "README.md", "exec"), namespace)
    data = json.loads((tmp_path / "runs" / "eval-100" / "results.json").read_text())
    assert data["n_examples"] == 4 and data["best_defense"] == namespace["result"].best_defense


@pytest.mark.slow
def test_your_own_deq_section_runs_as_written(tmp_path, monkeypatch):
    """The TorchDEQ recipe (saved as my_deq.py), its Python evaluation and the command line, in a
    fresh folder; the only change is fewer test examples (100 -> 8), to keep the suite fast."""
    pytest.importorskip("torchdeq")
    tutorial = ROOT / "docs" / "tutorial.md"
    module = next(b for b in python_blocks(tutorial) if b.startswith("# my_deq.py"))
    usage = next(b for b in python_blocks(tutorial) if "from my_deq import build" in b)
    assert "[:100]" in usage
    (tmp_path / "my_deq.py").write_text(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    exec(compile(usage.replace("[:100]", "[:8]"), "docs/tutorial.md", "exec"), {"__name__": "tutorial_own_deq"})
    assert (tmp_path / "my_deq.safetensors").exists()
    (line,) = [line for _, line in command_lines() if "--model my_deq.py:build" in line]
    args = line.split()[1:] + ["--n-examples", "8", "--dev-examples", "8", "--sanity-examples", "4", "--no-progress",
                               "--out", "out"]
    run = subprocess.run([sys.executable, "-m", "deqrobust", *args], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "results.json").exists() and "headline defense" in run.stdout


def test_every_relative_link_in_the_docs_points_at_a_file():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "#")):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.name}: {target}")
    assert not broken, broken
