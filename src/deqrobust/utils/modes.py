"""Eval mode where a model is attacked or evaluated.

An attack on a model left in train mode would meet stale dropout masks and batch-coupled BatchNorm
(and would update BatchNorm's running statistics). Every place that attacks or evaluates a model —
the defended forward, the gradient estimators, :func:`deqrobust.evaluate.evaluate` — runs it inside
:func:`evaluation_mode`: a model in train mode is switched to eval mode for the duration, with a
warning, and switched back afterwards. A model already in eval mode is left alone, so nesting is free.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

from torch import nn

TRAIN_MODE_WARNING = ("{name} is in train mode: it is attacked and evaluated in eval mode (dropout off, BatchNorm "
                      "running statistics) and switched back to train mode afterwards; call .eval() to silence this")


class TrainModeWarning(UserWarning):
    """A model in train mode was handed to an attack or an evaluation (see :func:`evaluation_mode`)."""


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, warn: bool = True) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode, restoring the train/eval mode of every submodule.

    ``warn=False`` is for callers that switch on purpose (training's inner attacks and dev checks).

    Example:
        >>> import warnings
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     with evaluation_mode(net):
        ...         inside = net.training, net[1].training
        >>> inside, net.training, net[1].training, seen[0].category.__name__
        ((False, False), True, True, 'TrainModeWarning')
    """
    if not any(m.training for m in model.modules()):
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    if warn:
        warnings.warn(TRAIN_MODE_WARNING.format(name=type(model).__name__), TrainModeWarning, stacklevel=3)
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
