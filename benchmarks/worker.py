"""Runs one figure in this process and prints its rows as JSON (used by ``python -m benchmarks``)."""

from __future__ import annotations

import importlib
import json
import sys

import torch

FIGURES = {
    "1": "solver_overhead",
    "2": "torchdeq_compare",
    "3": "adjoint_overhead",
    "4": "memory",
    "5": "protocol_cost",
    "6": "training_throughput",
}

if __name__ == "__main__":
    figure, quick = sys.argv[1], "--quick" in sys.argv
    torch.set_flush_denormal(True)
    module = importlib.import_module(f"benchmarks.{FIGURES[figure]}")
    print("BENCH-JSON " + json.dumps(module.run(quick)), flush=True)
