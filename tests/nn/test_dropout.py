"""Variational dropout: one mask per forward, a new one after reset, identity in eval mode."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deqrobust.nn import VariationalDropout2d


def test_mask_reused_until_reset_and_redrawn_after():
    torch.manual_seed(0)
    drop = VariationalDropout2d(0.5).train()
    x = torch.ones(4, 3, 6, 6)
    first = drop(x)
    mask = drop.mask
    for _ in range(5):
        assert drop(x * 2.0).equal(2.0 * first)
        assert drop.mask is mask
    drop.reset_mask()
    assert drop.mask is None
    second = drop(x)
    assert drop.mask is not mask
    assert not second.equal(first)


@settings(max_examples=25, deadline=None)
@given(p=st.floats(0.05, 0.9), seed=st.integers(0, 2**16))
def test_mask_values_are_zero_or_inverse_keep_probability(p, seed):
    torch.manual_seed(seed)
    drop = VariationalDropout2d(p).train()
    out = drop(torch.ones(2, 4, 5, 5))
    values = set(out.unique().tolist())
    assert all(v == 0.0 or abs(v - 1.0 / (1.0 - p)) < 1e-5 for v in values)


def test_mask_has_input_shape_and_is_unbiased():
    torch.manual_seed(0)
    drop = VariationalDropout2d(0.3).train()
    x = torch.ones(8, 16, 16, 16)
    out = drop(x)
    assert drop.mask.shape == x.shape
    assert abs(out.mean().item() - 1.0) < 0.03


def test_identity_in_eval_mode_and_for_zero_p():
    x = torch.randn(2, 3, 4, 4)
    assert VariationalDropout2d(0.5).eval()(x) is x
    assert VariationalDropout2d(0.0).train()(x) is x


def test_new_batch_shape_without_reset_is_an_error():
    drop = VariationalDropout2d(0.2).train()
    drop(torch.ones(4, 3, 4, 4))
    with pytest.raises(RuntimeError, match="reset_mask"):
        drop(torch.ones(5, 3, 4, 4))
    drop.reset_mask()
    assert drop(torch.ones(5, 3, 4, 4)).shape == (5, 3, 4, 4)


def test_gradient_flows_through_kept_units_only():
    drop = VariationalDropout2d(0.5).train()
    x = torch.ones(2, 2, 3, 3, requires_grad=True)
    drop(x).sum().backward()
    assert torch.equal(x.grad, drop.mask)


def test_invalid_probability_and_state_dict_has_no_mask():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        VariationalDropout2d(1.0)
    drop = VariationalDropout2d(0.5).train()
    drop(torch.ones(1, 1, 2, 2))
    assert drop.state_dict() == {}
    assert copy.deepcopy(drop).mask.equal(drop.mask)
