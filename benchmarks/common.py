"""Timing helpers and the models the benchmarks use."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from deqrobust.core.state import StateSpec
from deqrobust.models import mdeq

# (model size, input channels, image size): tiny on digits-sized inputs, small on CIFAR-sized ones.
SHAPES = {"tiny": (1, 8), "small": (3, 32)}


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ratio_of_medians(num: Callable[[], object], den: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """Alternate the two measurements (so drift hits both) and return (ratio, num s, den s)."""
    num(), den()
    a, b = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        num()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        den()
        b.append(time.perf_counter() - start)
    ma, mb = statistics.median(a), statistics.median(b)
    return ma / mb, ma, mb


def mdeq_flat(size: str, batch: int, seed: int = 0, **deq_kwargs):
    """An eval-mode MDEQ, its flat ``f`` with the injection bound, ``z0`` and the input batch."""
    torch.manual_seed(seed)
    channels, hw = SHAPES[size]
    model = mdeq(size, 10, channels, **deq_kwargs).eval()
    x = torch.rand(batch, channels, hw, hw)
    with torch.no_grad():
        e = model.stem(x)
        z0 = model.f.init_state(e)
        spec = StateSpec.of(z0)
    return model, model.flat_f(e, spec), spec.flatten(z0), x
