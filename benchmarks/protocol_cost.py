"""Figure 5: the full white-box suite (every defense x every attack candidate) on the demo model and
256 test examples — its whole wall time (dev selection, matrix, cascade, sanity checks) times the 2
worker processes — divided by one PGD-10 run on the final state (seconds summed over the workers);
each attack's share; how many example-attacks the cascade saved; and the floor no cascade can go
under (the attack time spent on the examples that survive every attack, which each candidate must
attack). One measurement (it takes minutes), not a median."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DEMO_CHECKPOINT = Path("runs/demo/train/checkpoints/best.safetensors")


def demo_model(work: Path) -> Path:
    """The demo's checkpoint (``make demo``), or the same training run here."""
    if DEMO_CHECKPOINT.exists():
        return DEMO_CHECKPOINT
    from deqrobust.cli.demo import DEMO_CONFIG, DEMO_TRAIN
    from deqrobust.train import apply_overrides, load_config, train

    out = work / "demo-model"
    last = out / "checkpoints" / "last.safetensors"
    train(apply_overrides(load_config(DEMO_CONFIG), DEMO_TRAIN), out, resume=last.exists(), progress=False)
    return out / "checkpoints" / "best.safetensors"


def run(quick: bool, work: Path = Path(".bench")) -> list[dict]:
    checkpoint = demo_model(work)
    out = work / "protocol"
    n = 64 if quick else 256
    cmd = [sys.executable, "-m", "deqrobust", "evaluate", "--checkpoint", str(checkpoint), "--suite", "quick",
           "--n-examples", str(n), "--batch-size", str(n // 2), "--workers", "2", "--out", str(out), "--fresh",
           "--no-progress"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    data = json.loads((out / "results.json").read_text())
    timing = data["timing"]
    candidates = sum(len(d["matrix"]) + len(d["cascade"]) for d in data["defenses"])
    # What the cascade saved: example-attacks run on survivors only vs every clean-correct example.
    cascade_run = sum(c["n_attacked"] for d in data["defenses"] for c in d["cascade"])
    cascade_full = sum(len(d["cascade"]) * max(c["n_attacked"] for c in d["matrix"]) for d in data["defenses"])
    total = timing["total_over_reference"]
    # The floor no cascade can go under: the share of every attack's time spent on the examples that
    # survive all attacks (each candidate must attack those), assuming cost proportional to examples.
    floor = sum(c["seconds"] * min(1.0, d["worst_case_acc"] * data["n_examples"] / 100 / c["n_attacked"])
                for d in data["defenses"] for c in d["matrix"] + d["cascade"] if c["n_attacked"])
    return [{
        "figure": "5 protocol cost",
        "case": f"quick suite, demo model, {n} examples, {len(data['defenses'])} defenses, {candidates} attack runs",
        "ratio": total,
        "target": f"well below {candidates} (attack runs)", "met": total < candidates / 2,
        "details": {"wall_s": timing["total_s"], "total_over_reference": total,
                    "attack_time_over_reference": timing["attack_time_over_reference"],
                    "attack_s": timing["attack_s"],
                    "attack_time_on_robust_examples_over_reference": floor / timing["reference_attack_s"],
                    "early_exit_selection_s": timing.get("early_exit_selection_s"),
                    "reference": timing["reference_attack"], "reference_s": timing["reference_attack_s"],
                    "cascade_example_attacks": cascade_run, "cascade_example_attacks_without_cascading": cascade_full,
                    "share_by_attack": timing["share_by_attack"], "command": " ".join(cmd[1:])},
    }]
