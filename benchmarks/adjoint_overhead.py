"""Figure 3: the simultaneous adjoint (all N surrogate gradients from one solve) divided by a plain
N-step solve plus N vector-Jacobian products of f (target <= 1.2); and all-states unrolled
intermediates (k = 5) divided by the simultaneous adjoint (the adjoint should win by about N)."""

from __future__ import annotations

import torch

from deqrobust.gradients import UnrollSettings, cross_entropy_objective, simultaneous_adjoint, unrolled_gradients

from .common import mdeq_flat, ratio_of_medians

TARGET = 1.2


def run(quick: bool) -> list[dict]:
    rows = []
    for size, batch in (("tiny", 128), ("small", 32)):
        n = 8
        model, f, z0, x = mdeq_flat(size, batch, f_max_iter=n, f_tol=0.0)  # the reference solve runs all N steps
        y = torch.randint(0, 10, (batch,))
        objective = cross_entropy_objective(y)
        repeats = 3 if (quick or size == "small") else 5

        def adjoint():
            simultaneous_adjoint(model, x, objective, states="all")

        def solve_plus_vjps():
            with model.cached_weights():
                solve = model.solve(x)
                z = solve.z_star
                for _ in range(n):  # N VJPs of f: forward with graph + backward
                    with torch.enable_grad():
                        zl = z.detach().requires_grad_()
                        fz = f(zl)
                        torch.autograd.grad(fz, zl, torch.ones_like(fz))

        ratio, t_adj, t_ref = ratio_of_medians(adjoint, solve_plus_vjps, repeats)
        rows.append({"figure": "3 adjoint overhead", "case": f"{size} b{batch} N={n}", "ratio": ratio,
                     "target": f"<= {TARGET}", "met": ratio <= TARGET, "details": {"adjoint_s": t_adj, "solve_plus_vjps_s": t_ref}})

        def plain_solve():
            with torch.no_grad():
                model.solve(x)

        ratio_p, t_adj3, t_solve = ratio_of_medians(adjoint, plain_solve, repeats)
        rows.append({"figure": "3 adjoint overhead", "case": f"adjoint / plain N-step solve, {size} b{batch} N={n}",
                     "ratio": ratio_p, "target": "report (per step: f + VJP of f + head VJP)", "met": None,
                     "details": {"adjoint_s": t_adj3, "plain_solve_s": t_solve}})

        def unrolled_all():
            states = {i + 1: s for i, s in enumerate(model.solve(x, trace=True).info.states)}
            unrolled_gradients(model, x, states, objective, UnrollSettings(5, 0.5))

        ratio_u, t_unr, t_adj2 = ratio_of_medians(unrolled_all, adjoint, repeats)
        rows.append({"figure": "3 adjoint overhead", "case": f"unrolled all states (k=5) / adjoint, {size} b{batch} N={n}",
                     "ratio": ratio_u, "target": "report (~N)", "met": None,
                     "details": {"unrolled_s": t_unr, "adjoint_s": t_adj2}})
    return rows
