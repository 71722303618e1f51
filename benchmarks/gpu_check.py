"""``python -m benchmarks.gpu_check [--device cuda|cpu]`` (``make gpu-check``): the CUDA paths, checked
in minutes on one GPU, and the paper's recipes priced in GPU-hours.

Runs from the source tree with the torch it finds (``PYTHONPATH=src python3 -m benchmarks.gpu_check``),
no install step; parts that need a missing package say so and are skipped.

1. **Agreement**: a tiny MDEQ trained on the CPU (seconds, digits) gives the same logits and input
   gradients (exact, phantom, ``adjoint:n``, ``unrolled:n``) on the device as on the CPU, per solver.
2. **Paths**: one short epoch of ``deqrobust train`` on the device; the same under
   ``torchrun --nproc_per_node=1`` (NCCL on CUDA); one bf16-autocast step of the ResNet-18 baseline;
   a quick evaluation with ``--device``.
3. **Prices**: MDEQ-Large and MDEQ-XL at batch 96 on 32×32×3 synthetic inputs: img/s of the forward
   solve, of one PGD-AT step (PGD-10 crafting + update, 8/7, phantom and exact) and of one PGD-10
   evaluation step per kind of gradient source; from them the GPU-hours of the paper's training recipe
   (220 epochs, pretraining included) and of the ``paper`` suite on 10,000 test images (priced by the
   evaluation's own cost model); peak GPU memory of each.

With ``--device cpu`` everything runs at tiny sizes (under a minute, for CI) and the report says
plainly that the CUDA rows were not run. Prints a Markdown table and writes ``<out>/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
SOLVERS = ("fixed_point", "anderson", "broyden")
AGREE_TOL = 1e-4  # float32, relative to the largest entry: the same solve on two devices
CIFAR_TRAIN, CIFAR_TEST, CIFAR_DEV = 49_000, 10_000, 1_000


def env() -> dict[str, str]:
    """A child process's environment: the source tree first on the path, one thread per process."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))


def missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def row(section: str, case: str, ok: bool | None, value: str, detail: str = "", **extra: Any) -> dict[str, Any]:
    return {"section": section, "case": case, "ok": ok, "value": value, "detail": detail, **extra}


def guarded(section: str, case: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one check; an exception becomes a failed row with its error (the next checks still run)."""
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:  # report every failure, keep going
        last = traceback.format_exc().strip().splitlines()[-1]
        return row(section, case, False, "error", f"{type(exc).__name__}: {exc}"[:400] or last)
    out.setdefault("seconds", time.perf_counter() - start)
    return out


# ---------------------------------------------------------------------- 1. agreement
def tiny_trained(solver: str):
    """MDEQ-tiny on digits, 30 clean Adam steps on the CPU (a few seconds)."""
    from deqrobust.data import load_dataset
    from deqrobust.models import mdeq

    torch.manual_seed(0)
    data = load_dataset("digits")
    x = data.train.images.float()
    x = x / 255.0 if data.train.images.dtype == torch.uint8 else x
    model = mdeq("tiny", 10, 1, f_solver=solver, f_max_iter=8, b_solver=solver, b_max_iter=7, grad="phantom",
                 phantom_steps=3, f_tol=1e-6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(30):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), data.train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt = data.test.images[:32].float()
    return model.eval(), (xt / 255.0 if data.test.images.dtype == torch.uint8 else xt), data.test.labels[:32]


def agreement(solver: str, device: torch.device) -> dict[str, Any]:
    import copy

    from deqrobust.attackable import attackable

    model, x, y = tiny_trained(solver)
    other = copy.deepcopy(model).to(device)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b.cpu()).abs().max() / a.abs().max().clamp_min(1e-12))

    diffs = {"logits": rel(model(x).detach(), other(x.to(device)).detach())}
    for source in ("exact", "phantom", "adjoint:4", "unrolled:4"):
        grads = []
        for m, dev in ((model, torch.device("cpu")), (other, device)):
            xg = x.clone().to(dev).requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(attackable(m, "final", source)(xg), y.to(dev), reduction="sum")
            grads.append(torch.autograd.grad(loss, xg)[0].detach())
        diffs[source] = rel(grads[0], grads[1])
    worst = max(diffs.values())
    return row("agreement", f"{solver}: CPU vs {device.type}", worst <= AGREE_TOL, f"max rel. diff {worst:.1e}",
               ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), diffs=diffs, tolerance=AGREE_TOL)


# ---------------------------------------------------------------------- 2. paths
def cli(section: str, case: str, args: list[str], launcher: list[str], timeout: int) -> dict[str, Any]:
    start = time.perf_counter()
    run = subprocess.run([*launcher, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or [""]
    return row(section, case, run.returncode == 0, f"exit {run.returncode}, {seconds:.0f} s",
               "" if run.returncode == 0 else tail[0][:300], seconds=seconds)


def train_args(device: str, out: Path) -> list[str]:
    return ["train", "--config", "digits-tiny-unroll", "--device", device, "--out", str(out), "--overwrite",
            "--no-progress", "--set", "run.epochs=1", "--set", "data.train_subset=256", "--set",
            "pretrain.iterations=2", "--set", "eval.dev_examples=32", "--set",
            f"run.threads={os.environ.get('OMP_NUM_THREADS', '2')}"]


def bf16_step(device: torch.device, size: int) -> dict[str, Any]:
    from deqrobust.models import build_model

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return row("paths", "bf16 autocast step (ResNet-18)", None, "skipped", "this GPU has no bf16")
    model = build_model("resnet18", 10, 3).to(device).train()
    x, y = torch.rand(8, 3, size, size, device=device), torch.randint(0, 10, (8,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    opt.step()
    finite = bool(torch.isfinite(loss)) and all(torch.isfinite(p).all() for p in model.parameters())
    return row("paths", "bf16 autocast step (ResNet-18)", finite and logits.dtype == torch.bfloat16,
               f"loss {float(loss):.3f}", f"logits dtype {logits.dtype}")


# ---------------------------------------------------------------------- 3. prices
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 2) -> float:
    fn()  # warm-up (kernels, cudnn, allocator)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def prices(size: str, device: torch.device, batch: int, hw: int, channels: int = 3) -> list[dict[str, Any]]:
    """img/s of the paper's workloads for one MDEQ size, and the recipe's GPU-hours."""
    from deqrobust.attackable import attackable
    from deqrobust.attacks import PGD, ThreatModel
    from deqrobust.models import mdeq
    from deqrobust.train import load_config

    recipe = load_config("cifar10-large-unroll-8-7")
    threat = ThreatModel("Linf", 8 / 255)
    rows = []
    torch.manual_seed(0)
    x = torch.rand(batch, channels, hw, hw, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def reset_peak() -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    img_s: dict[str, float] = {}
    for grad in ("phantom", "exact"):
        model = mdeq(size, 10, channels, f_solver="broyden", f_max_iter=8, b_solver="broyden", b_max_iter=7, grad=grad,
                     phantom_steps=5, phantom_undamped_first=True).to(device)
        if grad == "phantom":
            model.eval()
            reset_peak()
            with torch.no_grad():
                t = timed(lambda: model(x), device)
            img_s["forward"] = batch / t
            rows.append(row("prices", f"{size}: forward solve (Broyden 8)", True, f"{batch / t:,.0f} img/s",
                            f"peak {peak(device):.2f} GiB", img_s=batch / t, peak_gib=peak(device)))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def pgd_at_step() -> None:
            model.eval()
            x_adv = PGD(model, threat, steps=10, alpha=2 / 255, seed=0)(x, y)
            model.train()
            loss = torch.nn.functional.cross_entropy(model(x_adv), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        reset_peak()
        t = timed(pgd_at_step, device, repeats=1)
        img_s[f"pgd-at {grad}"] = batch / t
        rows.append(row("prices", f"{size}: PGD-AT step, PGD-10 + update, 8/7 {grad}", True, f"{batch / t:,.1f} img/s",
                        f"peak {peak(device):.2f} GiB", img_s=batch / t, peak_gib=peak(device)))
    model.eval()
    n = model.n_states
    for source in ("phantom", "exact", f"adjoint:{n}", f"unrolled:{n}", "adjoint:ensemble", "unrolled:ensemble"):
        wrapped = attackable(model, "final", source)

        def eval_step() -> None:
            xg = x.clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(wrapped(xg), y, reduction="sum")
            torch.autograd.grad(loss, xg)

        reset_peak()
        t = timed(eval_step, device, repeats=1) * 10  # one PGD-10 = 10 gradient evaluations
        img_s[f"pgd10 {source}"] = batch / t
        rows.append(row("prices", f"{size}: PGD-10 evaluation, source {source}", True, f"{batch / t:,.1f} img/s",
                        f"peak {peak(device):.2f} GiB", img_s=batch / t, peak_gib=peak(device)))
    # The recipe: clean 8-layer unroll pretraining (~ a forward+backward, priced as a third of a PGD-AT
    # image-step: 1 of its ~11 passes x 3 for the unrolled graph), then PGD-AT on every epoch's images,
    # and PGD-10 on 1,000 dev images per epoch.
    per_epoch = CIFAR_TRAIN / img_s["pgd-at phantom"] + CIFAR_DEV / img_s["pgd10 phantom"]
    pretrain = recipe.pretrain.iterations * recipe.run.batch_size / (3 * img_s["pgd-at phantom"])
    hours = (recipe.run.epochs * per_epoch + pretrain) / 3600
    rows.append(row("prices", f"{size}: the paper's training recipe (220 epochs, 8/7 phantom)", True,
                    f"{hours:,.1f} GPU-h", f"{recipe.run.epochs} epochs x ({CIFAR_TRAIN:,} PGD-AT + {CIFAR_DEV:,} dev "
                    "PGD-10 images) + 16k pretraining iterations", gpu_hours=hours))
    rows.append(paper_suite_price(model, size, x, y, threat))
    return rows


def paper_suite_price(model, size: str, x, y, threat) -> dict[str, Any]:
    """The ``paper`` suite on 10,000 test images, adaptive and exhaustive, by the evaluation's own
    cost model (timed on these synthetic inputs; the paper's shares for DEQ-Large assumed)."""
    from deqrobust.evaluate.cost import estimate_cost
    from deqrobust.evaluate.options import EvaluationOptions
    from deqrobust.evaluate.plan import prepare
    from deqrobust.evaluate.runner import AttackRunner
    from deqrobust.evaluate.runs import assumed_runs
    from deqrobust.evaluate.state import EvalState

    hours = {}
    for exhaustive in (False, True):
        options = EvaluationOptions(suite="paper", batch_size=len(y), exhaustive=exhaustive)
        plan = prepare(model, options, threat, n_test_available=CIFAR_TEST, n_dev_available=CIFAR_DEV,
                       input_numel=int(x[0].numel()))
        runner = AttackRunner(model, threat, 0, EvalState(None, {}), len(y))
        est = estimate_cost(runner, plan, assumed_runs(plan), x, y, shares=(0.78, 0.45))
        hours["exhaustive" if exhaustive else "adaptive"] = est.predicted_s / 3600
    return row("prices", f"{size}: `paper` suite, 10,000 test images (adaptive / exhaustive)", True,
               f"{hours['adaptive']:,.1f} / {hours['exhaustive']:,.1f} GPU-h",
               "cost model of --estimate, timed here; assumed 78% clean, 45% robust (the paper's DEQ-Large)",
               gpu_hours=hours)


# ---------------------------------------------------------------------- main
def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| Section | Check | Result | Value | Detail |", "|---|---|---|---|---|"]
    for r in rows:
        mark = {True: "pass", False: "**FAIL**", None: "skipped"}[r["ok"]]
        lines.append(f"| {r['section']} | {r['case']} | {mark} | {r['value']} | {r['detail']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (default when "
                        "available) or cpu (tiny sizes, for CI)")
    parser.add_argument("--out", default=".bench", help="folder for gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    started = time.perf_counter()
    gpu = device.type == "cuda"
    rows: list[dict[str, Any]] = []
    if not gpu:
        rows.append(row("note", "CUDA rows", None, "not run", "no GPU: CPU mode, tiny sizes (the CUDA, NCCL and GPU "
                        "price rows need --device cuda on a GPU)"))
    lacking = missing("pyautoattack", "torchdeq")
    if lacking:
        rows.append(row("note", "missing packages", None, ", ".join(lacking), "the parts that need them are skipped"))

    for solver in SOLVERS:
        rows.append(guarded("agreement", solver, lambda s=solver: agreement(s, device)))

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    python = [sys.executable, "-m", "deqrobust"]
    rows.append(guarded("paths", "deqrobust train, one short epoch", lambda: cli(
        "paths", f"deqrobust train --device {device.type}, one short epoch", train_args(device.type, work / "run"),
        python, 300)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "deqrobust"]
    rows.append(guarded("paths", "torchrun", lambda: cli(
        "paths", f"torchrun --nproc_per_node=1 ({'NCCL' if gpu else 'Gloo'}), one short epoch",
        train_args(device.type, work / "ddp"), torchrun, 300)))
    rows.append(guarded("paths", "bf16", lambda: bf16_step(device, 32 if gpu else 8)))
    checkpoint = work / "run" / "checkpoints" / "best.safetensors"
    if "pyautoattack" in lacking:
        rows.append(row("paths", "quick evaluation", None, "skipped", "needs pyautoattack (the AutoAttack cascade)"))
    else:
        # On a CPU the path only has to run: the smallest sizes and one defense (measured 124 s -> 36 s).
        sizes_args = (["--n-examples", "32", "--dev-examples", "16", "--sanity-examples", "8", "--defenses",
                       "final,ensemble"] if gpu else
                      ["--n-examples", "8", "--dev-examples", "8", "--sanity-examples", "4", "--defenses", "final"])
        rows.append(guarded("paths", "quick evaluation", lambda: cli(
            "paths", f"deqrobust evaluate --suite quick --device {device.type}",
            ["evaluate", "--checkpoint", str(checkpoint), "--device", device.type, *sizes_args, "--no-progress",
             "--out", str(work / "eval")], python, 300)))

    sizes = [("large", 96, 32), ("xl", 96, 32)] if gpu else [("tiny", 4, 8)]
    for size, batch, hw in sizes:
        channels = 3 if gpu else 1  # CPU mode: the same code at a size a CPU runs in seconds
        rows += guarded_list(lambda s=size, b=batch, h=hw, c=channels: prices(s, device, b, h, c), size)

    report = table(rows)
    print(report)
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if gpu else "cpu", "cuda": torch.version.cuda,
               "date": time.strftime("%Y-%m-%d"), "total_s": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"machine": machine, "rows": rows, "markdown": report}, indent=2))
    print(f"\n{len(rows)} rows in {machine['total_s']:.0f} s on {machine['device']}; written to {out / 'gpu_check.json'}")
    return 0 if all(r["ok"] is not False for r in rows) else 1


def guarded_list(fn: Callable[[], list[dict[str, Any]]], size: str) -> list[dict[str, Any]]:
    try:
        return fn()
    except Exception as exc:
        return [row("prices", size, False, "error", f"{type(exc).__name__}: {exc}"[:400])]


if __name__ == "__main__":
    sys.exit(main())
