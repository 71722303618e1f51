"""Every reproduction target builds its runs at both scales: configs validate and models construct.

(Training them is the GPU-scale job; ``tests/test_cli.py`` runs ``table2 --scale tiny`` end to end.)
"""

from __future__ import annotations

import pytest

from deqrobust.data import dataset_info
from deqrobust.errors import ConfigError
from deqrobust.models import build_model
from deqrobust.reproduce.experiments import EXPERIMENTS, experiment
from deqrobust.train import apply_overrides, load_config
from deqrobust.train.trainer import _model_kwargs


@pytest.mark.parametrize("target", sorted(EXPERIMENTS))
@pytest.mark.parametrize("scale", ["tiny", "paper"])
def test_every_run_of_every_target_has_a_valid_config(target, scale):
    exp = experiment(target, scale)
    assert exp.runs, f"{target} at {scale} scale has no runs"
    for run in exp.runs:
        config = apply_overrides(load_config(run.config), list(run.overrides))
        assert config.validate() is config
        if scale == "tiny":
            assert config.data.dataset == "digits"


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
