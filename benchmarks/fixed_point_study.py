"""``python -m benchmarks.fixed_point_study [--settings a,b] [--out .bench/fixed-point]``: when does a
small exact-trained DEQ lose its fixed point, and does its ready-made robustness then become an
illusion? (docs/fixed-point-study.md records what it measured.)

Each setting trains a digits config with overrides (``deqrobust train``), then evaluates its best
checkpoint on the whole digits test split (360 examples) with the ``pgd10`` suite on the undefended
``final`` output (``deqrobust evaluate``): PGD-10 with every gradient source, the ready-made exact
gradient among them. It records the training time, the mean relative residual at every state of
the clean test inputs, the ready-made robust accuracy and the per-example worst case over every
source, and the gap between them. Results go to ``<out>/study.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from deqrobust.utils.io import atomic_write_json

#: name -> (config, overrides). The levers the paper points at: the exact gradient, 8/7 Broyden steps,
#: the Jacobian term switched off early, a larger eps, a wider f, longer training.
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "exact-base": ("digits-tiny-exact", []),
    "exact-jac-off-1-20ep": ("digits-tiny-exact", ["jacobian.stop_epoch=1", "run.epochs=20"]),
    "exact-jac-off-1-eps0.2-20ep": ("digits-tiny-exact", ["jacobian.stop_epoch=1", "run.epochs=20", "attack.eps=0.2",
                                                          "attack.alpha=0.05"]),
    "exact-small-jac-off-1-20ep": ("digits-tiny-exact", ["model.name=mdeq-small", "jacobian.stop_epoch=1",
                                                         "run.epochs=20"]),
    "exact-no-jac-4-3-20ep": ("digits-tiny-exact", ["jacobian.weight=0", "deq.f_max_iter=4", "deq.b_max_iter=3",
                                                    "run.epochs=20"]),
    "unroll-base": ("digits-tiny-unroll", []),
    "unroll-jac-off-1-20ep": ("digits-tiny-unroll", ["jacobian.stop_epoch=1", "run.epochs=20"]),
}


def run(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def study(name: str, out: Path, seed: int) -> dict:
    config, overrides = SETTINGS[name]
    folder = out / name
    sets = [x for o in overrides for x in ("--set", o)]
    train_s = run([sys.executable, "-m", "deqrobust", "train", "--config", config, *sets, "--out", str(folder / "train"),
                   "--seed", str(seed), "--no-progress", "--overwrite"])
    eval_s = run([sys.executable, "-m", "deqrobust", "evaluate", "--checkpoint",
                  str(folder / "train" / "checkpoints" / "best.safetensors"), "--suite", "pgd10", "--defenses", "final",
                  "--n-examples", "360", "--dev-examples", "80", "--seed", str(seed), "--out", str(folder / "eval"),
                  "--no-progress"])
    result = json.loads((folder / "eval" / "results.json").read_text())
    final = next(d for d in result["defenses"] if d["defense"] == "final")
    table = final["table"]
    rel = result["residuals"]["rel_mean"][1:]  # states 1..N (state 0 is the initial guess)
    ready = table.get("ready_made_exact", table.get("ready_made"))
    return {
        "setting": name, "config": config, "overrides": overrides, "seed": seed, "train_s": round(train_s),
        "eval_s": round(eval_s), "n_examples": result["n_examples"], "clean": table["clean"], "ready_made_exact": ready,
        "worst_case": table["worst_case"], "gap_points": None if ready is None else ready - table["worst_case"],
        "rel_mean_per_state": rel, "min_rel_over_states": min(rel), "final_rel": rel[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names (default: all)")
    parser.add_argument("--out", default=".bench/fixed-point")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(SETTINGS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "study.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    for name in names:
        rows = [r for r in rows if r["setting"] != name] + [study(name, out, args.seed)]
        atomic_write_json(path, rows)
        r = rows[-1]
        print(f"| {r['setting']} | {r['train_s']} | {r['clean']:.2f} | {r['ready_made_exact']:.2f} | "
              f"{r['worst_case']:.2f} | {r['gap_points']:.2f} | {r['min_rel_over_states']:.3f} | {r['final_rel']:.3f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
