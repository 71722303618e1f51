"""Every reproduction target builds its runs at every scale it has: configs validate and models construct.

(Training them is the GPU-scale job; ``tests/test_cli.py`` runs ``table2 --scale tiny`` end to end.)
"""

from __future__ import annotations

import pytest

from deqrobust.data import dataset_info
from deqrobust.errors import ConfigError
from deqrobust.models import build_model
from deqrobust.reproduce.experiments import EXPERIMENTS, SMALL_OVERRIDES, SMALL_SETTING, SMALL_TARGETS, experiment
from deqrobust.train import apply_overrides, load_config
from deqrobust.train.trainer import _model_kwargs


SCALED = [(target, scale) for target in sorted(EXPERIMENTS) for scale in ("tiny", "paper")] + [
    (target, "small") for target in SMALL_TARGETS]


@pytest.mark.parametrize(("target", "scale"), SCALED)
def test_every_run_of_every_target_has_a_valid_config(target, scale):
    exp = experiment(target, scale)
    assert exp.runs, f"{target} at {scale} scale has no runs"
    for run in exp.runs:
        config = apply_overrides(load_config(run.config), list(run.overrides))
        assert config.validate() is config
        if scale != "paper":
            assert config.data.dataset == "digits"


def test_the_small_scale_is_the_fixed_point_studys_setting_and_its_unrolled_twin():
    from benchmarks.fixed_point_study import SETTINGS

    config, overrides = SETTINGS[SMALL_SETTING]
    assert tuple(overrides) == SMALL_OVERRIDES
    (exact,) = experiment("table1", "small").runs
    assert (exact.config, exact.overrides) == (config, SMALL_OVERRIDES)
    fig2 = experiment("fig2", "small")
    assert [(r.config, r.overrides) for r in fig2.runs] == [(config, SMALL_OVERRIDES),
                                                           ("digits-tiny-unroll", SMALL_OVERRIDES)]
    assert any("50/50" in note and "--scale small" in note for note in fig2.notes)
    assert "small scale" in fig2.title
    for target in sorted(set(EXPERIMENTS) - set(SMALL_TARGETS)):
        with pytest.raises(ConfigError, match="--scale small exists for table1 and fig2 only"):
            experiment(target, "small")


@pytest.mark.parametrize("target", sorted(EXPERIMENTS))
def test_every_tiny_run_builds_its_model(target):
    for run in experiment(target, "tiny").runs:
        config = apply_overrides(load_config(run.config), list(run.overrides))
        info = dataset_info(config.data.dataset)
        model = build_model(config.model.name, info.num_classes, info.in_channels, **_model_kwargs(config))
        assert sum(p.numel() for p in model.parameters()) > 0


def test_table4_tiny_keeps_the_resnet_baseline_and_names_what_it_drops():
    exp = experiment("table4", "tiny")
    assert "ResNet-18" in {run.key for run in exp.runs}
    assert any("WRN-34-10" in note for note in exp.notes)


def test_unknown_target_or_scale_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="table1"):
        experiment("table9", "tiny")
    with pytest.raises(ConfigError, match="tiny"):
        experiment("table1", "huge")
