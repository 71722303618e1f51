"""MDEQ: sizes, shapes, gradients, per-sample independence, dropout/weight-norm plumbing, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from deqrobust.core import DEQClassifier
from deqrobust.errors import ConfigError, DEQInputError
from deqrobust.models import MDEQ_SIZES, count_parameters, mdeq
from deqrobust.nn import VariationalDropout2d, is_weight_normed

FAST = dict(f_max_iter=2, b_max_iter=2, phantom_steps=1)


def on_meta(size: str, **kwargs) -> DEQClassifier:
    with torch.device("meta"):
        return mdeq(size, **kwargs)


@pytest.mark.parametrize(("size", "expected"), [("large", 11.1e6), ("xl", 48.8e6)])
def test_paper_sizes_parameter_counts(size, expected):
    n = count_parameters(on_meta(size))
    assert abs(n - expected) / expected < 0.05, n


def test_small_sizes_are_small():
    assert count_parameters(mdeq("tiny", in_channels=1)) < 60_000
    assert 100_000 < count_parameters(mdeq("small")) < 800_000
    assert MDEQ_SIZES["tiny"].branches == 2 and MDEQ_SIZES["small"].branches == 3


def test_defaults_are_the_papers_8_7_broyden_phantom_setting():
    model = on_meta("large")
    assert (model.f_solver, model.f_max_iter, model.b_solver, model.b_max_iter) == ("broyden", 8, "broyden", 7)
    assert (model.grad, model.phantom_steps, model.phantom_damping) == ("phantom", 5, 0.5)
    assert (model.f_tol, model.f_stop_mode, model.input_shape) == (1e-3, "rel", (3, None, None))
    drops = lambda m: {d.p for d in m.modules() if isinstance(d, VariationalDropout2d)}  # noqa: E731
    assert drops(model) == {0.3} and drops(on_meta("xl")) == {0.3}
    assert drops(on_meta("tiny")) == {0.0} and drops(on_meta("small", dropout=0.1)) == {0.1}
    assert on_meta("tiny", grad="exact", f_max_iter=3).grad == "exact"


def test_weight_norm_where_mdeq_puts_it():
    model = on_meta("small")
    normed = {name for name, m in model.named_modules() if hasattr(m, "parametrizations")}
    assert all(name.startswith("f.") for name in normed)
    block = model.f.blocks[0]
    assert is_weight_normed(block.conv1) and is_weight_normed(block.conv2)
    assert all(is_weight_normed(p[1]) for p in model.f.post_fuse)
    assert not is_weight_normed(model.f.fuse[0][1][0])


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("hw", [8, 32])
def test_f_keeps_state_shapes(size, hw):
    model = mdeq(size).eval()
    with torch.no_grad():
        e = model.stem(torch.rand(2, 3, hw, hw))
        z0 = model.f.init_state(e)
        z1 = model.f(z0, e)
    channels = MDEQ_SIZES[size].channels
    assert [tuple(t.shape) for t in z0] == [(2, c, hw >> i, hw >> i) for i, c in enumerate(channels)]
    assert [t.shape for t in z1] == [t.shape for t in z0]
    assert all(t.abs().sum() == 0 for t in z0)


def _check_param_grads(model):
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("hw", [8, 32])
def test_train_step_small_sizes(size, hw):
    torch.manual_seed(0)
    cin = 1 if hw == 8 else 3
    model = mdeq(size, in_channels=cin, **(FAST if hw == 32 else {})).train()
    logits = model(torch.rand(4, cin, hw, hw))
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    _check_param_grads(model)


@pytest.mark.parametrize("size", ["large", "xl"])
def test_train_step_paper_sizes(size):
    torch.manual_seed(0)
    model = mdeq(size, **FAST).train()
    logits = model(torch.rand(2, 3, 32, 32))
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    _check_param_grads(model)


def _warm_bn(model, x, steps=3):
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return model.eval()


@pytest.mark.parametrize("grad", ["exact", "phantom"])
def test_eval_mode_input_gradient(grad):
    torch.manual_seed(0)
    model = _warm_bn(mdeq("tiny", in_channels=1, grad=grad), torch.rand(16, 1, 8, 8))
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_per_sample_independence_in_eval_mode():
    torch.manual_seed(0)
    model = _warm_bn(mdeq("tiny", in_channels=1), torch.rand(32, 1, 8, 8))
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        batch = model(x)
        for i in (0, 17, 31):
            torch.testing.assert_close(model(x[i : i + 1]), batch[i : i + 1], atol=1e-5, rtol=1e-5)


def test_dropout_mask_is_fixed_within_a_forward_and_redrawn_between():
    torch.manual_seed(0)
    model = mdeq("tiny", in_channels=1, dropout=0.2).train()
    drop = model.f.blocks[0].drop
    seen: list[int] = []
    drop.register_forward_hook(lambda m, i, o: seen.append(id(m.mask)))
    x = torch.rand(4, 1, 8, 8)
    model(x)
    first = drop.mask
    assert len(seen) >= model.f_max_iter and len(set(seen)) == 1
    seen.clear()
    model(x)
    assert len(set(seen)) == 1 and drop.mask is not first and not drop.mask.equal(first)
    model(torch.rand(3, 1, 8, 8))  # a new batch size is fine: the forward resets the masks


def test_deepcopy_and_state_dict_round_trip_give_equal_logits(tmp_path):
    torch.manual_seed(0)
    model = _warm_bn(mdeq("tiny", in_channels=1), torch.rand(8, 1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        assert model(x).equal(ref)
        assert copy.deepcopy(model)(x).equal(ref)
        torch.save(model.state_dict(), tmp_path / "m.pt")
        torch.manual_seed(1)
        fresh = mdeq("tiny", in_channels=1).eval()
        fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
        assert fresh(x).equal(ref)


def test_input_normalisation_inside_the_stem():
    torch.manual_seed(0)
    model = mdeq("tiny", in_channels=1, mean=[0.5], std=[0.25]).eval()
    assert model.stem.normalize.mean.flatten().tolist() == [0.5]
    assert "stem.normalize.std" in model.state_dict()


def test_errors():
    with pytest.raises(ConfigError, match="tiny, small, large, xl"):
        mdeq("medium")
    with pytest.raises(ConfigError, match="f_max_iter"):
        mdeq("tiny", f_maxiter=3)
    with pytest.raises(ConfigError, match="dropout"):
        mdeq("tiny", dropout=1.5)
    model = mdeq("small").eval()
    with pytest.raises(DEQInputError, match="divisible by 4"):
        model(torch.rand(1, 3, 6, 6))
    with pytest.raises(DEQInputError, match=r"\(B, 3, \*, \*\)"):
        model(torch.rand(1, 1, 8, 8))
    with pytest.raises(DEQInputError, match="divisible by 2"):
        mdeq("tiny").eval()(torch.rand(1, 3, 7, 8))
    with pytest.raises(DEQInputError, match=r"\(B, 1, H, W\)"):
        model.stem.__class__(1, 4, 2)(torch.rand(1, 3, 8, 8))


def test_unrolled_forward_and_jacobian_loss():
    torch.manual_seed(0)
    model = mdeq("tiny", in_channels=1, dropout=0.1).train()
    x = torch.rand(4, 1, 8, 8)
    model.unrolled_forward(x, 3).sum().backward()
    assert model.f.blocks[1].conv2.parametrizations.weight.original1.grad.abs().sum() > 0
    out = model.forward_with_info(x, jac_loss=True)
    assert out.jac_loss is not None and torch.isfinite(out.jac_loss) and out.jac_loss > 0
    assert out.info.rel_trace.shape == (4, model.f_max_iter + 1)


def test_final_norm_off_leaves_the_branch_outputs_unnormalised():
    torch.manual_seed(0)
    normed = mdeq("tiny", in_channels=1, **FAST).eval()
    torch.manual_seed(0)
    raw = mdeq("tiny", in_channels=1, final_norm=False, **FAST).eval()
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in raw.f.post_fuse.modules())
    # the same weights (a GroupNorm without affine parameters holds none): only the last normalisation differs
    raw.load_state_dict(normed.state_dict())
    e = normed.stem(torch.rand(3, 1, 8, 8))
    z = [2.0 * torch.randn_like(t) for t in normed.f.init_state(e)]
    with torch.no_grad():
        for out_normed, out_raw, post in zip(normed.f(z, e), raw.f(z, e), normed.f.post_fuse):
            groups = post[-1].num_groups
            per_group = out_normed.reshape(3, groups, -1)
            assert torch.allclose(per_group.mean(-1), torch.zeros(3, groups), atol=1e-5)
            assert torch.allclose(per_group.var(-1, unbiased=False), torch.ones(3, groups), atol=1e-3)
            assert torch.allclose(post[-1](out_raw), out_normed, atol=1e-5)  # raw = normed before its GroupNorm
            assert not torch.allclose(out_raw, out_normed, atol=1e-2)


def test_final_norm_from_the_config_reaches_the_model_and_its_checkpoint(tmp_path):
    from deqrobust.checkpoint import load_model, model_spec, save_checkpoint
    from deqrobust.models import build_model

    from deqrobust.train.config import apply_overrides, load_config
    from deqrobust.train.trainer import _model_kwargs

    config = apply_overrides(load_config("digits-tiny-exact"), ["model.final_norm=false"])
    kwargs = _model_kwargs(config)
    assert kwargs["final_norm"] is False
    assert "final_norm" not in _model_kwargs(load_config("digits-tiny-exact"))  # unset: the model's default
    model = build_model("mdeq-tiny", 10, 1, **kwargs)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, metadata={"model": model_spec("mdeq-tiny", 10, 1, kwargs)})
    loaded, _ = load_model(path)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in loaded.f.post_fuse.modules())
    with pytest.raises(ConfigError, match="final_norm"):
        build_model("resnet18", 10, 1, final_norm=False)
