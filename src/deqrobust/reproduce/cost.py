"""What a paper-scale training costs on this machine: one PGD-AT iteration timed at a tiny batch,
extrapolated to the recipe's iterations (an estimate, printed when ``reproduce`` refuses a run)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..train import TrainConfig


@dataclass
class CostEstimate:
    config: str
    seconds_per_image_pass: float
    image_passes: float

    @property
    def cpu_hours(self) -> float:
        return self.seconds_per_image_pass * self.image_passes / 3600.0


def image_passes(config: TrainConfig, n_train: int = 50_000, n_dev: int = 1_000) -> float:
    """Forward+backward passes over single images the recipe needs (pretraining, PGD-AT, dev PGD)."""
    pretrain = config.pretrain.iterations * config.run.batch_size
    adversarial = config.run.epochs * n_train * (config.attack.steps + 1)
    dev = config.run.epochs * n_dev * (config.eval.pgd_steps + 1)
    return float(pretrain + adversarial + dev)


def estimate(config_name: str, config: TrainConfig, batch: int = 2, image_size: int = 32) -> CostEstimate:
    """Time one forward+backward of the config's model on ``batch`` CIFAR-sized images on the CPU."""
    from ..models import build_model, is_deq
    from ..train.config import config_to_dict

    kwargs = config_to_dict(config)
    model_kwargs = dict(kwargs.get("deq") or {}) if is_deq(config.model.name) else {}
    model = build_model(config.model.name, 10, 3, **model_kwargs).train()
    x = torch.rand(batch, 3, image_size, image_size)
    y = torch.zeros(batch, dtype=torch.long)
    torch.nn.functional.cross_entropy(model(x[:1]), y[:1]).backward()  # warm-up (allocations, kernels)
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    elapsed = time.perf_counter() - start
    return CostEstimate(config_name, elapsed / batch, image_passes(config))
