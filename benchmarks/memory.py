"""Figure 4: peak memory of ensemble and early-exit inference at N = 64 divided by N = 8 (target
<= 1.05: O(1) in N). The defenses keep a running sum / one state; a solver's own history (Anderson's
m iterates, Broyden's low-rank terms) is bounded by its memory setting."""

from __future__ import annotations

import torch

from deqrobust.defenses import defended_logits
from deqrobust.models import mdeq
from deqrobust.utils.memory import peak_memory

TARGET = 1.05
SOLVERS = (("anderson", {}), ("broyden", {"memory": 8}), ("broyden", {}))


def run(quick: bool) -> list[dict]:
    rows = []
    x = torch.rand(64, 1, 8, 8)
    for solver, options in SOLVERS:
        for defense in ("ensemble", "early:4"):
            peaks = {}
            for n in (8, 64):
                torch.manual_seed(0)
                model = mdeq("tiny", 10, 1, f_solver=solver, f_max_iter=n, f_tol=0.0, f_solver_options=options).eval()
                peaks[n] = peak_memory(lambda: defended_logits(model, x, defense))
            ratio = peaks[64] / peaks[8]
            label = f"{solver}" + (f"(memory={options['memory']})" if options else ("(full memory)" if solver == "broyden" else ""))
            rows.append({"figure": "4 memory", "case": f"{defense}, {label}, tiny b64", "ratio": ratio,
                         "target": f"<= {TARGET}", "met": ratio <= TARGET,
                         "details": {"peak_bytes_N8": peaks[8], "peak_bytes_N64": peaks[64]}})
    return rows
