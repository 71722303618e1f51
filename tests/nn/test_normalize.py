"""Input normalisation inside models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqrobust.nn import InputNormalization, input_normalization


def test_per_channel_and_broadcast():
    norm = input_normalization([0.5, 0.0, 1.0], [0.5, 1.0, 2.0], 3)
    out = norm(torch.ones(1, 3, 1, 1)).flatten().tolist()
    assert out == [1.0, 1.0, 0.0]
    single = input_normalization([0.5], [0.5], 3)
    assert single.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert isinstance(input_normalization(None, None, 3), nn.Identity)
    assert set(InputNormalization([0.1], [0.2]).state_dict()) == {"mean", "std"}


def test_errors():
    with pytest.raises(ValueError, match="both"):
        input_normalization([0.5], None, 3)
    with pytest.raises(ValueError, match="1 or 3"):
        input_normalization([0.5, 0.5], [1.0, 1.0], 3)
    with pytest.raises(ValueError, match="positive"):
        InputNormalization([0.0], [0.0])
    with pytest.raises(ValueError, match="channels"):
        input_normalization([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], 3)(torch.ones(1, 1, 2, 2))
