"""Configs: every shipped config parses; the paper recipes carry the recipe's values (docs/method.md §11); unknown keys fail."""

from __future__ import annotations

import dataclasses

import pytest

from deqrobust.errors import ConfigError
from deqrobust.models import MODELS
from deqrobust.train import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_toml,
    list_configs,
    load_config,
    parse_fraction,
)

PAPER_DEQ = {
    # name: (model, grad, forward steps, backward steps)
    "cifar10-large-unroll-8-7": ("mdeq-large", "phantom", 8, 7),
    "cifar10-large-exact-8-7": ("mdeq-large", "exact", 8, 7),
    "cifar10-large-exact-50-50": ("mdeq-large", "exact", 50, 50),
    "cifar10-xl-unroll-8-7": ("mdeq-xl", "phantom", 8, 7),
}
BASELINES = {"cifar10-resnet18-pgdat": "resnet18", "cifar10-wrn34-10-pgdat": "wrn34-10"}
CPU = {"digits-tiny-unroll": "phantom", "digits-tiny-exact": "exact", "digits-tiny-random-states": "phantom"}
FOLLOW_UP = {"cifar10-large-random-states": ("mdeq-large", 8)}  # name: (model, depths drawn from 1..this)


def test_the_follow_up_recipe_is_the_released_one():
    config = load_config("cifar10-large-random-states")
    a, deq = config.attack, config.deq
    assert (config.model.name, deq.f_max_iter) == FOLLOW_UP["cifar10-large-random-states"]
    assert a.objective == "random-states" and a.trades_beta == 6.0 and a.trades_init_std == 0.001
    assert abs(a.eps - 8 / 255) < 1e-9 and abs(a.step_size - 2 / 255) < 1e-9 and a.steps == 10
    assert deq.grad == "phantom" and deq.phantom_steps == 5 and deq.phantom_damping == 0.5
    assert config.pretrain.iterations == 16000 and config.jacobian.weight == 0.4 and config.jacobian.prob == 0.02


def test_the_expected_configs_ship():
    assert set(PAPER_DEQ) | set(BASELINES) | set(CPU) | set(FOLLOW_UP) <= set(list_configs())


@pytest.mark.parametrize("name", list_configs())
def test_every_shipped_config_parses_and_round_trips(name, tmp_path):
    config = load_config(name)
    assert config.name == name and config.description
    assert config.model.name in MODELS
    path = tmp_path / f"{name}.toml"
    path.write_text(config_to_toml(config))
    assert load_config(path) == config


def assert_spec7_pipeline(config: TrainConfig) -> None:
    """The recipe's values (docs/method.md §11) shared by every CIFAR-10 recipe (DEQ and baselines)."""
    assert config.data.dataset == "cifar10" and config.data.augment
    assert config.optim.name == "adam" and config.optim.lr == 1e-3 and config.optim.weight_decay == 0.0
    assert config.optim.schedule == "cosine"
    assert config.run.epochs == 220 and config.run.batch_size == 96
    a = config.attack
    assert a.objective == "pgd-at" and a.norm == "Linf" and a.steps == 10 and a.random_start
    assert a.eps == 8 / 255 and a.step_size == 2 / 255 and a.clean_weight == 0.0
    assert config.eval.pgd_steps == 10 and config.eval.dev_examples is not None  # select on dev, PGD-10


@pytest.mark.parametrize("name", sorted(PAPER_DEQ))
def test_paper_deq_configs_equal_spec7(name):
    model, grad, f_iter, b_iter = PAPER_DEQ[name]
    config = load_config(name)
    assert_spec7_pipeline(config)
    assert config.model.name == model
    assert config.pretrain.iterations == 16000 and config.pretrain.layers == 8
    jac = config.jacobian
    assert (jac.weight, jac.prob, jac.stop_epoch, jac.f_thres_delta) == (0.4, 0.02, 90, 2)
    deq = config.deq
    assert deq is not None
    assert deq.f_solver == "broyden" and deq.b_solver == "broyden"
    assert (deq.f_max_iter, deq.b_max_iter, deq.grad) == (f_iter, b_iter, grad)
    if grad == "phantom":  # docs/method.md §3: k = 5, lambda = 0.5, one undamped f first (authors' code)
        assert (deq.phantom_steps, deq.phantom_damping, deq.phantom_undamped_first) == (5, 0.5, True)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_use_the_same_pipeline(name):
    config = load_config(name)
    assert_spec7_pipeline(config)
    assert config.model.name == BASELINES[name] and config.deq is None
    assert config.pretrain.iterations == 0 and config.jacobian.weight == 0


@pytest.mark.parametrize("name", sorted(CPU))
def test_cpu_configs(name):
    config = load_config(name)
    assert config.data.dataset == "digits" and config.model.name == "mdeq-tiny"
    assert config.deq.grad == CPU[name] and (config.deq.f_max_iter, config.deq.b_max_iter) == (8, 7)
    if CPU[name] == "phantom":
        assert (config.deq.phantom_steps, config.deq.phantom_damping, config.deq.phantom_undamped_first) == (
            5,
            0.5,
            True,
        )
    assert 0.1 <= config.attack.eps <= 0.2 and config.attack.step_size == pytest.approx(config.attack.eps / 4)


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optim]\nlr = 1e-3\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) learning_rate in \[optim\]; valid keys: name, lr, "):
        load_config(path)
    path.write_text("[optimizer]\nlr = 1e-3\n")
    with pytest.raises(ConfigError, match="unknown section.*optimizer.*valid sections: model, deq, data"):
        load_config(path)


def test_unknown_set_key_lists_valid_keys():
    config = load_config("digits-tiny-unroll")
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate' in \[optim\]; valid keys: name, lr"):
        apply_overrides(config, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="unknown section 'optimizer'; valid sections"):
        apply_overrides(config, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(config, ["optim.lr"])


def test_set_converts_types_and_fractions():
    config = load_config("digits-tiny-unroll")
    new = apply_overrides(
        config,
        [
            "optim.lr=5e-4",
            "attack.eps=8/255",
            "run.epochs=3",
            "attack.random_start=false",
            "eval.dev_examples=none",
            "model.mean=[0.5]",
            "deq.grad=exact",
        ],
    )
    assert new.optim.lr == 5e-4 and new.attack.eps == 8 / 255 and new.run.epochs == 3
    assert new.attack.random_start is False and new.eval.dev_examples is None and new.model.mean == [0.5]
    assert new.deq.grad == "exact"
    assert config.optim.lr != 5e-4 and config.deq.grad == "phantom"  # the original is untouched
    with pytest.raises(ConfigError, match="run.epochs"):
        apply_overrides(config, ["run.epochs=three"])
    with pytest.raises(ConfigError, match="valid: stop, skip, lower_lr"):
        apply_overrides(config, ["run.nan_policy=ignore"])


def test_fractions_in_files_and_bad_values(tmp_path):
    assert parse_fraction("8/255") == 8 / 255 and parse_fraction(" 1 / 4 ") == 0.25
    path = tmp_path / "frac.toml"
    path.write_text('[attack]\neps = "16/255"\nalpha = "4/255"\nsteps = 7\n')
    config = load_config(path)
    assert config.attack.eps == 16 / 255 and config.attack.alpha == 4 / 255 and config.name == "frac"
    path.write_text('[attack]\nsteps = "ten"\n')
    with pytest.raises(ConfigError, match="attack.steps"):
        load_config(path)
    path.write_text('[attack]\neps = "8/0"\n')
    with pytest.raises(ConfigError, match="attack.eps"):
        load_config(path)


def test_cross_section_checks():
    with pytest.raises(ConfigError, match=r"\[deq\] only applies to MDEQ"):
        config_from_dict({"model": {"name": "resnet18"}, "deq": {"grad": "exact"}})
    with pytest.raises(ConfigError, match="only apply to MDEQ"):
        config_from_dict({"model": {"name": "resnet18"}, "pretrain": {"iterations": 5}})
    config = config_from_dict({"model": {"name": "mdeq-tiny"}})
    assert config.deq is not None and dataclasses.asdict(config.deq)["grad"] == "phantom"
    with pytest.raises(ConfigError, match="unknown config 'nope'; shipped configs: "):
        load_config("nope")
