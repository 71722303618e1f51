"""What makes a small DEQ lose its fixed point under adversarial training (docs/fixed-point-study.md).

``python -m benchmarks.fixed_point_study [--only NAME,...] [--out runs/study] [--no-eval] [--table]`` trains each
setting below with ``deqrobust train`` and, unless ``--no-eval``, evaluates its final defense with
``deqrobust evaluate --suite pgd10 --defenses final`` on the whole digits test split (360 examples),
with six gradient sources: both ready-made ones, adjoint and unrolled at the last state, both ensembles.
One JSON line per setting goes to ``<out>/study.jsonl``: the training's solver residual per epoch, the last
epoch's dev accuracies, the test residual per state, the ready-made exact-gradient PGD-10 accuracy, the
per-example worst case, their gap, and the wall times. Finished runs are reused (``train --resume``
reports them complete; the evaluation resumes from its own state), so the script can be re-run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from deqrobust.train.config import load_config

# name -> (config, overrides): every setting the study tried. The levers: no Jacobian term, longer training,
# a larger eps, fewer solver steps, a larger input; the unrolling-trained twin swaps only the gradient.
NO_JAC = ("jacobian.weight=0",)
STEPS_4_3 = ("deq.f_max_iter=4", "deq.b_max_iter=3")
SETTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "exact-nojac-20ep": ("digits-tiny-exact", NO_JAC + ("run.epochs=20",)),
    "exact-nojac-eps0.2-20ep": ("digits-tiny-exact", NO_JAC + ("run.epochs=20", "attack.eps=0.2", "attack.alpha=0.05")),
    "exact-nojac-4-3-20ep": ("digits-tiny-exact", NO_JAC + ("run.epochs=20",) + STEPS_4_3),
    "exact-nojac-4-3-40ep": ("digits-tiny-exact", NO_JAC + ("run.epochs=40",) + STEPS_4_3),
    "unroll-nojac-4-3-20ep": ("digits-tiny-unroll", NO_JAC + ("run.epochs=20",) + STEPS_4_3),
    # Fashion-MNIST (28x28, Debian's offline copy), a fixed random 2,000-image subset: what an epoch costs.
    "fmnist-exact-nojac-4ep": ("digits-tiny-exact", NO_JAC + ("run.epochs=4", "data.dataset=fashion_mnist",
                                                              "data.train_subset=2000")),
    # The levers the first six left unmeasured, each one change from exact-nojac-4-3-20ep (the largest residual).
    "exact-jac-4-3-20ep": ("digits-tiny-exact", STEPS_4_3 + ("run.epochs=20", "jacobian.stop_epoch=none")),
    "exact-nojac-4-3-20ep-lr3x": ("digits-tiny-exact", NO_JAC + STEPS_4_3 + ("run.epochs=20", "optim.lr=6e-3")),
    "exact-nojac-4-3-20ep-nonorm": ("digits-tiny-exact", NO_JAC + STEPS_4_3 + ("run.epochs=20", "model.final_norm=false")),
    "small-exact-nojac-4-3-10ep": ("digits-tiny-exact", NO_JAC + STEPS_4_3 + ("run.epochs=10", "model.name=mdeq-small")),
    # The shipped recipe (Jacobian term until epoch 6 of 10) at the paper's 8/7 steps and at 4/3.
    "exact-8-7-shipped": ("digits-tiny-exact", ()),
    "exact-4-3-shipped": ("digits-tiny-exact", STEPS_4_3),
}
# Timed only: evaluating on Fashion-MNIST's 10,000 test images is out of reach on 2 cores.
TRAIN_ONLY = {"fmnist-exact-nojac-4ep"}


def _run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit {done.returncode}; see {log}")
    return time.perf_counter() - start


def study(name: str, out: Path, evaluate: bool, seed: int) -> dict:
    config, overrides = SETTINGS[name]
    run = out / name
    log = out / f"{name}.log"
    deqrobust = [sys.executable, "-m", "deqrobust"]
    train_cmd = deqrobust + ["train", "--config", config, "--out", str(run / "train"), "--seed", str(seed), "--no-progress"]
    train_cmd += [arg for o in overrides for arg in ("--set", o)]
    if (run / "train" / "summary.json").exists() or (run / "train" / "checkpoints").exists():
        train_cmd.append("--resume")
    train_s = _run(train_cmd, log)
    epochs = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = epochs[-1]
    row: dict = {"setting": name, "config": config, "overrides": list(overrides), "seed": seed,
                 "train_seconds_this_call": round(train_s, 1), "train_wall_time": round(last["wall_time"], 1),
                 "train_residual_per_epoch": [None if e["solver_rel_residual"] is None else round(e["solver_rel_residual"], 4)
                                              for e in epochs],
                 "train_epoch_seconds": [round(e["epoch_time"], 1) for e in epochs],
                 "dev_clean_acc": last["dev_clean_acc"], "dev_robust_acc": last["dev_robust_acc"]}
    if evaluate and name not in TRAIN_ONLY:
        eval_dir = run / "eval"
        n = load_config(run / "train" / "config.toml").deq.f_max_iter  # the run's own config, overrides applied
        sources = f"exact,phantom,adjoint:{n},unrolled:{n},adjoint:ensemble,unrolled:ensemble"
        eval_cmd = deqrobust + ["evaluate", "--checkpoint", str(run / "train" / "checkpoints" / "best.safetensors"),
                                "--suite", "pgd10", "--defenses", "final", "--sources", sources,
                                "--seed", str(seed), "--out", str(eval_dir), "--no-progress"]
        row["eval_seconds_this_call"] = round(_run(eval_cmd, log), 1)
        res = json.loads((eval_dir / "results.json").read_text())
        table = res["defenses"][0]["table"]
        rel = res["residuals"]["rel_mean"]
        row.update({"n_examples": res["n_examples"], "test_rel_residual_mean_per_state": [round(r, 4) for r in rel],
                    "min_rel_residual_after_state_0": round(min(rel[1:]), 4),
                    "clean": round(table["clean"], 2), "ready_made_exact": round(table["ready_made_exact"], 2),
                    "worst_case": round(table["worst_case"], 2),
                    "gap": round(table["ready_made_exact"] - table["worst_case"], 2)})
    return row


def _fmt(value: object) -> str:
    return "—" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def table(rows: list[dict]) -> str:
    """The study's Markdown table: the latest row of each setting, in the order of SETTINGS."""
    latest = {row["setting"]: row for row in rows}
    lines = ["| Setting | Overrides | Train (s) | Train residual, first → last adversarial epoch | Dev clean / PGD-10 | "
             "Test residual at the last state (min over states ≥ 1) | Clean | Ready-made exact | Worst case | Gap |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in [n for n in SETTINGS if n in latest]:
        r = latest[name]
        train = [v for v in r["train_residual_per_epoch"] if v is not None]
        test = r.get("test_rel_residual_mean_per_state")
        residual = f"{test[-1]:.3f} ({r['min_rel_residual_after_state_0']:.3f})" if test else "not evaluated"
        lines.append(f"| {name} | `{' '.join(r['overrides']) or '(config as shipped)'}` | {r['train_wall_time']:.0f} | "
                     f"{train[0]:.3f} → {train[-1]:.3f} | {r['dev_clean_acc']:.3f} / {r['dev_robust_acc']:.3f} | {residual} | "
                     f"{_fmt(r.get('clean'))} | {_fmt(r.get('ready_made_exact'))} | {_fmt(r.get('worst_case'))} | "
                     f"{_fmt(r.get('gap'))} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-eval", action="store_true", help="train only")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of <out>/study.jsonl and exit")
    args = parser.parse_args(argv)
    if args.table:
        rows = [json.loads(line) for line in (args.out / "study.jsonl").read_text().splitlines() if line.strip()]
        print(table(rows))
        return
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(SETTINGS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        row = study(name, args.out, not args.no_eval, args.seed)
        with open(args.out / "study.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
