"""Model zoo: the multiscale DEQ (MDEQ) in four sizes and the deep baselines ResNet-18 and WRN-34-10.

All models take inputs in [0, 1] (optional normalisation happens inside) and return logits.
:func:`build_model` is the one entry point used by training and evaluation. Imports
:mod:`deqrobust.core`, :mod:`deqrobust.nn` and :mod:`deqrobust.errors` only.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable, TypeGuard

from torch import nn

from ..core import DEQClassifier
from ..errors import ConfigError
from .mdeq import MDEQ_DEQ_DEFAULTS, MDEQ_SIZES, MDEQCore, MDEQHead, MDEQSize, MDEQStem, mdeq
from .resnet import ResNet, resnet18
from .wide_resnet import WideResNet, wrn34_10

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {
    **{f"mdeq-{size}": partial(mdeq, size) for size in MDEQ_SIZES},
    "resnet18": resnet18,
    "wrn34-10": wrn34_10,
}


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered model by name (a key of :data:`MODELS`).

    ``kwargs`` go to the factory: ``mean``/``std`` for every model; ``dropout`` and
    :class:`~deqrobust.core.DEQClassifier` settings (``f_max_iter``, ``grad``, …) for MDEQs.

    Example:
        >>> model = build_model("mdeq-tiny", num_classes=10, in_channels=1)
        >>> is_deq(model), count_parameters(model) > 0
        (True, True)
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    factory = MODELS[name]
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        fixed = ("num_classes", "in_channels")
        valid = [k for k, p in params.items() if p.kind is not p.VAR_POSITIONAL and k not in fixed]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ConfigError(f"unknown argument(s) {', '.join(unknown)} for model {name!r}; valid: {', '.join(valid)}")
    return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once); weight-norm ``g`` and ``v`` both count.

    Example:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


DEQ_MODELS: frozenset[str] = frozenset(f"mdeq-{size}" for size in MDEQ_SIZES)


def is_deq(model: "nn.Module | str") -> TypeGuard[DEQClassifier]:
    """Whether ``model`` is a DEQ — a :class:`~deqrobust.core.DEQClassifier` (a solver and
    intermediate states), or, given a registered model name, one that builds one. The package's
    one answer to "is this a DEQ" (configs, training, the protocol and the attack adapters ask it).

    Example:
        >>> is_deq("mdeq-tiny"), is_deq("resnet18"), is_deq(nn.Linear(2, 2))
        (True, False, False)
    """
    if isinstance(model, str):
        return model in DEQ_MODELS
    return isinstance(model, DEQClassifier)


__all__ = [
    "DEQ_MODELS",
    "MDEQ_DEQ_DEFAULTS",
    "MDEQ_SIZES",
    "MODELS",
    "MDEQCore",
    "MDEQHead",
    "MDEQSize",
    "MDEQStem",
    "ResNet",
    "WideResNet",
    "build_model",
    "count_parameters",
    "is_deq",
    "mdeq",
    "resnet18",
    "wrn34_10",
]
