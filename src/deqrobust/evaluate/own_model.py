"""Any model from the command line, as RobustBench loads models: a factory ``module:function`` (or
``path/to/file.py:function``) that returns a :class:`~deqrobust.DEQClassifier` (every source and
defense) or any ``nn.Module`` classifier (its own gradient and the ``final`` defense), and weights
loaded safely (``.safetensors``, or a plain state dict read with ``torch.load(weights_only=True)``).

Everything is checked before any evaluation starts and before anything is written: the factory
imports and returns a module, the weights fit it (the first mismatched keys are listed), the
dataset exists, and the model accepts that dataset's inputs and returns one logit per class.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..errors import ConfigError, DEQInputError
from ..validate import model_dtype, probe_model


def import_factory(spec: str):
    """The callable named by ``module.path:function`` or ``file.py:function``.

    Example:
        >>> import_factory("torch.nn:Identity")()
        Identity()
    """
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--model {spec!r}: give the factory as module:function (e.g. mypkg.models:build) or "
                          "path/to/file.py:function")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"--model {spec!r}: no such file {path}")
            loaded = importlib.util.spec_from_file_location(f"deqrobust_user_model_{abs(hash(path.resolve()))}", path)
            assert loaded is not None and loaded.loader is not None
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # as `python -m` would: modules next to where the command runs
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:  # an import error, or an exception raised while importing the user's module
        raise ConfigError(f"--model {spec!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"--model {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ConfigError(f"--model {spec!r}: {attr!r} is a {type(factory).__name__}, not a function")
    return factory


def load_own_model(spec: str, weights: Optional[Union[str, os.PathLike]] = None,
                   device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Build the model with the factory, load ``weights`` safely, and return it in eval mode."""
    from ..checkpoint import check_state_dict, load_checkpoint

    try:
        model = import_factory(spec)()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--model {spec!r}: the factory raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        state = load_checkpoint(weights).state_dict  # safetensors or weights-only pickles; code is refused
        check_state_dict(model, state, f"weights {weights}")
        model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def check_inputs(model: nn.Module, x: torch.Tensor, num_classes: int, spec: str, dataset: str) -> None:
    """Run the model once on one dataset example, in the model's dtype (:func:`deqrobust.validate.probe_model`):
    a clear error, naming ``--model``, if it does not take it or does not return one logit per class."""
    try:
        classes = probe_model(model, x[:1].to(model_dtype(model) or x.dtype), f"{dataset} inputs")
    except (ConfigError, DEQInputError) as exc:
        raise ConfigError(f"--model {spec!r}: {exc}") from None
    if classes != num_classes:
        raise ConfigError(f"--model {spec!r} returned {classes} logits for {dataset} inputs of shape "
                          f"{tuple(x[:1].shape)}; expected {num_classes} (one per class)")
