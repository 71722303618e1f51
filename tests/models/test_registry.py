"""Model registry and the deep baselines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deqrobust.errors import ConfigError, DEQInputError
from deqrobust.models import MODELS, build_model, count_parameters, is_deq, resnet18, wrn34_10


def test_registry_names_and_errors():
    assert set(MODELS) == {"mdeq-tiny", "mdeq-small", "mdeq-large", "mdeq-xl", "resnet18", "wrn34-10"}
    with pytest.raises(ConfigError, match="mdeq-tiny, .*wrn34-10"):
        build_model("resnet50")
    with pytest.raises(ConfigError, match="resnet18"):
        build_model("resnet18", dropout=0.1)


def test_build_and_is_deq():
    model = build_model("mdeq-tiny", num_classes=7, in_channels=1, f_max_iter=3)
    assert is_deq(model) and model.f_max_iter == 3 and model.head.classifier.out_features == 7
    with torch.device("meta"):
        assert not is_deq(build_model("resnet18"))


def test_baseline_parameter_counts():
    with torch.device("meta"):
        assert count_parameters(resnet18()) == 11_173_962
        assert count_parameters(wrn34_10()) == 46_160_474
        assert count_parameters(build_model("wrn34-10", num_classes=100)) == 46_160_474 + 640 * 90 + 90


@pytest.mark.parametrize("name", ["resnet18", "wrn34-10"])
def test_baseline_forward_backward(name):
    torch.manual_seed(0)
    model = build_model(name, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]).train()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(DEQInputError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 32, 32))
