"""Figure 6: PGD-AT training throughput (images/s) with the phantom vs the exact gradient, in the
paper's 8/7 Broyden setting, for MDEQ-tiny (8x8 inputs) and MDEQ-small (32x32 inputs)."""

from __future__ import annotations

import time

import torch

from deqrobust.attacks import ThreatModel
from deqrobust.models import mdeq
from deqrobust.train.objectives import pgd_craft
from deqrobust.utils.modes import evaluation_mode

from .common import SHAPES


def images_per_second(size: str, grad: str, batch: int, iterations: int) -> float:
    torch.manual_seed(0)
    channels, hw = SHAPES[size]
    model = mdeq(size, 10, channels, grad=grad, f_max_iter=8, b_max_iter=7).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    threat = ThreatModel("Linf", 8 / 255)
    x = torch.rand(batch, channels, hw, hw)
    y = torch.randint(0, 10, (batch,))

    def iteration():
        with evaluation_mode(model, warn=False):
            x_adv, _ = pgd_craft(model, x, y, threat, threat.eps / 4, 10)
        loss = torch.nn.functional.cross_entropy(model(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    iteration()  # warm-up
    start = time.perf_counter()
    for _ in range(iterations):
        iteration()
    return batch * iterations / (time.perf_counter() - start)


def run(quick: bool) -> list[dict]:
    rows = []
    for size, batch, iters in (("tiny", 64, 2 if quick else 4), ("small", 16, 1 if quick else 2)):
        rates = {g: images_per_second(size, g, batch, iters) for g in ("phantom", "exact")}
        rows.append({"figure": "6 training throughput", "case": f"PGD-AT phantom / exact img/s, {size} b{batch}, 8/7",
                     "ratio": rates["phantom"] / rates["exact"], "target": "report", "met": None,
                     "details": {"phantom_img_per_s": rates["phantom"], "exact_img_per_s": rates["exact"]}})
    return rows
