"""Weight norm survives repeated forwards, parametrize.cached(), deepcopy, state_dict and torch.func."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deqrobust.nn import is_weight_normed, remove_weight_norm, weight_norm


@pytest.fixture
def conv():
    torch.manual_seed(0)
    return weight_norm(nn.Conv2d(3, 5, 3, padding=1))


def test_function_unchanged_and_weight_has_norm_g():
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    before = plain(x)
    normed = weight_norm(plain)
    torch.testing.assert_close(normed(x), before)
    g = normed.parametrizations.weight.original0
    torch.testing.assert_close(normed.weight.flatten(1).norm(dim=1), g.flatten())
    assert is_weight_normed(normed)


def test_repeated_forwards_and_cached(conv):
    x = torch.randn(2, 3, 6, 6)
    ref = conv(x)
    for _ in range(3):
        assert conv(x).equal(ref)
    with parametrize.cached():
        assert conv(x).equal(ref)
        assert conv(x).equal(ref)
    # a parameter change is seen after the cache is left
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(2.0)
    assert not conv(x).equal(ref)


def test_backward_inside_cached_reaches_g_and_v(conv):
    x = torch.randn(2, 3, 6, 6)
    with parametrize.cached():
        loss = conv(x).pow(2).sum() + conv(x).sum()
    loss.backward()
    for p in conv.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_deepcopy_gives_equal_independent_copy(conv):
    x = torch.randn(2, 3, 6, 6)
    conv(x)
    with parametrize.cached():
        conv(x)
        twin = copy.deepcopy(conv)
    assert twin(x).equal(conv(x))
    with torch.no_grad():
        twin.parametrizations.weight.original1.add_(1.0)
    assert not twin(x).equal(conv(x))


def test_state_dict_round_trip(conv, tmp_path):
    x = torch.randn(2, 3, 6, 6)
    path = tmp_path / "wn.pt"
    torch.save(conv.state_dict(), path)
    torch.manual_seed(1)
    fresh = weight_norm(nn.Conv2d(3, 5, 3, padding=1))
    assert not fresh(x).equal(conv(x))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh(x).equal(conv(x))


def test_torch_func_and_double_backward(conv):
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    params = dict(conv.named_parameters())
    out, vjp_fn = torch.func.vjp(lambda p: torch.func.functional_call(conv, p, (x,)), params)
    grads = vjp_fn(torch.ones_like(out))[0]
    assert set(grads) == set(params)
    (gx,) = torch.autograd.grad(conv(x).pow(2).sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
    assert conv.parametrizations.weight.original1.grad.abs().sum() > 0


def test_errors_and_removal(conv):
    with pytest.raises(ValueError, match="already"):
        weight_norm(conv)
    with pytest.raises(ValueError, match="no parameter"):
        weight_norm(nn.ReLU())
    x = torch.randn(1, 3, 4, 4)
    y = conv(x)
    remove_weight_norm(conv)
    assert not is_weight_normed(conv)
    torch.testing.assert_close(conv(x), y)
    with pytest.raises(ValueError, match="not weight-normalised"):
        remove_weight_norm(conv)
