"""Checks of what a user hands the library, made before any compute that could be skipped: the
radius, the examples (finite, in [0, 1], labels in range) and the model (a module that reads them).

One place, shared by the attacks (:class:`~deqrobust.attacks.Attack` calls), the Python API
(:func:`~deqrobust.evaluate.evaluate`, :func:`~deqrobust.evaluate.estimate`) and the command line.
Each error is :class:`~deqrobust.errors.DEQInputError` (the examples) or
:class:`~deqrobust.errors.ConfigError` (everything else), names the problem and says how to fix it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .errors import ConfigError, DEQInputError
from .utils.numbers import parse_fraction

__all__ = ["check_dtype", "check_examples", "check_labels_in_range", "check_model", "model_dtype", "parse_eps",
           "probe_model"]


def parse_eps(value: Any, name: str = "eps") -> float:
    """A radius given as a number or a fraction string (``"8/255"``), finite and > 0.

    Example:
        >>> parse_eps("8/255") == 8 / 255, parse_eps(0.1), parse_eps(1)
        (True, 0.1, 1.0)
        >>> parse_eps("eight")
        Traceback (most recent call last):
        ...
        deqrobust.errors.ConfigError: invalid eps 'eight': give a number such as 0.1 or a fraction such as '8/255'
    """
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ConfigError(f"invalid {name} {value!r}: give a number such as 0.1 or a fraction such as '8/255'")
    try:
        radius = parse_fraction(value) if isinstance(value, str) else float(value)
    except ValueError:
        raise ConfigError(f"invalid {name} {value!r}: give a number such as 0.1 or a fraction such as '8/255'") from None
    if not math.isfinite(radius) or radius <= 0:
        raise ConfigError(f"{name} must be > 0 and finite, got {value!r}")
    return radius


def check_model(model: Any) -> nn.Module:
    """``model`` if it is an ``nn.Module``; otherwise an error saying how to wrap a function."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a function f as "
                          "`class Net(nn.Module): def forward(self, x): return f(x)` (a DEQ: deqrobust.DEQClassifier)")
    return model


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The floating dtype of the model's parameters (``None`` for a model without floating parameters)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _indices(mask: Tensor, limit: int = 5) -> str:
    idx = mask.nonzero().flatten().tolist()
    return ", ".join(map(str, idx[:limit])) + (f", ... ({len(idx)} in all)" if len(idx) > limit else "")


def check_examples(x: Tensor, y: Optional[Tensor] = None, name: str = "inputs") -> None:
    """Examples as the threat model reads them: a floating tensor with a batch dimension, finite,
    in [0, 1]; labels (when given) an int64 vector as long as the batch, non-negative.

    Example:
        >>> check_examples(torch.tensor([[0.5, float("nan")], [0.1, 0.2]]), name="test")
        Traceback (most recent call last):
        ...
        deqrobust.errors.DEQInputError: test inputs hold NaN or Inf at example(s) 0; replace or drop them
    """
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        shape = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise DEQInputError(f"{name} inputs must be a floating-point tensor (N, ...), got {shape}")
    if x.numel():
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            raise DEQInputError(f"{name} inputs hold NaN or Inf at example(s) {_indices(~finite)}; replace or drop them")
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise DEQInputError(f"{name} inputs must lie in [0, 1] (the threat model's domain); got [{float(x.min()):.3g}, "
                                f"{float(x.max()):.3g}] — normalise inside the model instead")
    if y is None:
        return
    if not isinstance(y, Tensor) or y.dim() != 1 or y.dtype != torch.int64 or len(y) != len(x):
        shape = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise DEQInputError(f"{name} labels must be an int64 tensor of shape ({len(x)},), got {shape}")
    if len(y) and bool((y < 0).any()):
        raise DEQInputError(f"{name} labels must be class indices >= 0; negative at example(s) {_indices(y < 0)}")


def check_labels_in_range(y: Tensor, n_classes: int, name: str = "inputs") -> None:
    """Labels in ``[0, n_classes)`` (the width of the model's logits).

    Example:
        >>> check_labels_in_range(torch.tensor([0, 12, 3]), 10, "dev")
        Traceback (most recent call last):
        ...
        deqrobust.errors.DEQInputError: dev labels must lie in [0, 10) (the model returns 10 logits); 12 at example(s) 1
    """
    bad = (y < 0) | (y >= n_classes)
    if len(y) and bool(bad.any()):
        raise DEQInputError(f"{name} labels must lie in [0, {n_classes}) (the model returns {n_classes} logits); "
                            f"{int(y[bad][0])} at example(s) {_indices(bad)}")


def check_dtype(model: nn.Module, dtype: torch.dtype, name: str = "inputs") -> None:
    """Inputs of ``dtype`` for ``model``: an error naming both dtypes and the two fixes if they differ."""
    want = model_dtype(model)
    if want is not None and dtype != want:
        fix = {torch.float64: "x.double()", torch.float32: "x.float()"}.get(want, f"x.to({want})")
        back = {torch.float64: "model.double()", torch.float32: "model.float()"}.get(dtype, f"model.to({dtype})")
        raise DEQInputError(f"{name} are {dtype} but the model's parameters are {want}; convert one of them "
                            f"({fix} or {back})")


def probe_model(model: nn.Module, x: Tensor, name: str = "inputs") -> int:
    """Run the model once on one example (no autograd) and return the number of classes; a clear
    error if the dtypes differ or the model does not take the input or does not return logits.

    Example:
        >>> probe_model(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), torch.rand(2, 4))
        3
        >>> probe_model(nn.Linear(4, 3).double(), torch.rand(2, 4))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        deqrobust.errors.DEQInputError: inputs are torch.float32 but the model's parameters are torch.float64; ...
    """
    check_model(model)
    check_dtype(model, x.dtype, name)
    one = x[:1]
    try:
        with torch.no_grad():
            out = model(one)
    except ConfigError:
        raise
    except Exception as exc:  # the model's own error, named with the input it was given
        first = str(exc).splitlines()[0] if str(exc) else ""
        f = getattr(model, "f", None)
        hint = ("; f has no init_state(e), so its state starts as one tensor, zeros_like(e): a DEQ whose state is a "
                "list needs f.init_state(e)" if isinstance(exc, (ValueError, IndexError, TypeError)) and isinstance(f, nn.Module)
                and not callable(getattr(f, "init_state", None)) and hasattr(model, "solve") else "")
        raise DEQInputError(f"the model does not accept {name} of shape {tuple(one.shape[1:])} per example "
                            f"({one.dtype}): {type(exc).__name__}: {first}{hint}") from None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise DEQInputError(f"the model returned {shape} for one example of {name}; expected logits of shape (1, classes)")
    return int(out.shape[1])
