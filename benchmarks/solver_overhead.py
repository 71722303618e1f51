"""Figure 1: an N-step Broyden / Anderson solve divided by N plain evaluations of f (floor 1.0;
our solvers evaluate f N+1 times — f(z_0) too — so their own floor is (N+1)/N)."""

from __future__ import annotations

import torch

from deqrobust.solvers import anderson, broyden

from .common import mdeq_flat, ratio_of_medians

TARGET = 1.3


def run(quick: bool) -> list[dict]:
    rows = []
    for size in ("tiny", "small"):
        model, f, z0, _ = mdeq_flat(size, 128)
        for n in (8, 30):
            repeats = 3 if (quick or size == "small") else 7

            def plain():
                z = z0
                for _ in range(n):
                    z = f(z)

            with torch.no_grad(), model.cached_weights():
                for name, solver in (("broyden", broyden), ("anderson", anderson)):
                    ratio, t_solve, t_plain = ratio_of_medians(lambda: solver(f, z0, max_iter=n, tol=0.0), plain, repeats)
                    rows.append({"figure": "1 solver overhead", "case": f"{name} {size} b128 N={n}", "ratio": ratio,
                                 "target": f"<= {TARGET}", "met": ratio <= TARGET,
                                 "details": {"solve_s": t_solve, "n_plain_f_s": t_plain, "floor": (n + 1) / n}})
    return rows
