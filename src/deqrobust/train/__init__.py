"""Robust training (docs/method.md §11): PGD-AT and TRADES with exact or phantom DEQ gradients.

What lives here: ``config`` (TOML configs validated into dataclasses, ``--set`` overrides, the
shipped configs in ``configs/*.toml``), ``objectives`` (inner attacks and outer losses),
``evaluation`` (per-epoch dev selection, sharded over ranks), ``state`` (RNG and optimizer state
for exact resumption) and ``trainer`` (the loop and :func:`train`). May import
:mod:`deqrobust.core`, :mod:`deqrobust.models`, :mod:`deqrobust.data`, :mod:`deqrobust.attacks`,
:mod:`deqrobust.checkpoint`, :mod:`deqrobust.distributed` and :mod:`deqrobust.utils`; never
:mod:`deqrobust.cli` or :mod:`deqrobust.evaluate`.

Example:
    >>> from deqrobust.train import list_configs, load_config
    >>> config = load_config("cifar10-large-unroll-8-7")
    >>> config.optim.lr, config.run.epochs, config.run.batch_size, config.pretrain.iterations
    (0.001, 220, 96, 16000)
"""

from .config import (
    AttackConfig,
    DataConfig,
    DEQConfig,
    EvalConfig,
    JacobianConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    list_configs,
    load_config,
    parse_fraction,
)
from .evaluation import DevResult, evaluate_dev
from .trainer import Trainer, TrainingData, TrainResult, load_training_data, train

__all__ = [
    "AttackConfig",
    "DEQConfig",
    "DataConfig",
    "DevResult",
    "EvalConfig",
    "JacobianConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingData",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_toml",
    "evaluate_dev",
    "list_configs",
    "load_config",
    "load_training_data",
    "parse_fraction",
    "train",
]
