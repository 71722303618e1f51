"""A clean-trained MDEQ-tiny on digits (a few seconds) and a deliberately gradient-masked one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deqrobust.checkpoint import model_spec, save_checkpoint
from deqrobust.data import load_dataset
from deqrobust.models import mdeq


def clean_train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int = 4, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        for start in range(0, len(labels), 64):
            idx = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


TINY_SETTINGS = {"f_max_iter": 3, "b_max_iter": 3, "phantom_steps": 2}


def train_clean_tiny(digits) -> nn.Module:
    """MDEQ-tiny with 3 states, clean-trained on digits (a few seconds; well above chance)."""
    torch.manual_seed(0)
    return clean_train(mdeq("tiny", 10, 1, **TINY_SETTINGS), digits.train.images.float(), digits.train.labels)


def save_tiny_checkpoint(model: nn.Module, path: Path) -> Path:
    """``model`` (built as :func:`train_clean_tiny` builds it) as a checkpoint the CLI evaluates on digits."""
    meta = {"model": model_spec("mdeq-tiny", 10, 1, TINY_SETTINGS),
            "dataset": {"name": "digits", "dev_size": None, "dev_seed": 0}, "threat_model": {"norm": "Linf", "eps": 0.1}}
    return save_checkpoint(path, model, meta)


@pytest.fixture(scope="session")
def clean_tiny(digits):
    return train_clean_tiny(digits)


class Quantise(nn.Module):
    """Rounds the input to 4 grey levels: zero gradient almost everywhere (gradient masking)."""

    def forward(self, x):
        return torch.round(x * 3) / 3


@pytest.fixture(scope="session")
def masked_tiny(clean_tiny):
    masked = mdeq("tiny", 10, 1, **TINY_SETTINGS)
    masked.load_state_dict(clean_tiny.state_dict())
    masked.stem = nn.Sequential(Quantise(), masked.stem)
    return masked.eval()
