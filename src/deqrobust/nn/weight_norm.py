"""Weight normalisation ``w = g · v / ||v||`` as a ``torch.nn.utils.parametrize`` parametrization.

The parametrization (unlike the legacy hook-based ``torch.nn.utils.weight_norm``) survives repeated
forwards, ``parametrize.cached()`` (the DEQ computes ``w`` once per solve), ``copy.deepcopy``,
``state_dict`` round trips, ``torch.func`` transforms and double backward. Whole-module pickling
(``torch.save(model)``) is refused by PyTorch for parametrized modules: save ``state_dict()``.
State-dict keys are ``parametrizations.<name>.original0`` (g) and ``...original1`` (v).
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn
from torch.nn.utils import parametrizations, parametrize

M = TypeVar("M", bound=nn.Module)


def weight_norm(module: M, name: str = "weight", dim: int = 0) -> M:
    """Reparametrise ``module.<name>`` as ``g · v / ||v||`` (norm over all dims but ``dim``); returns ``module``.

    ``g`` starts at ``||v||``, so the module computes the same function as before.

    Example:
        >>> import torch
        >>> conv = nn.Conv2d(3, 4, 3)
        >>> x = torch.randn(1, 3, 5, 5); before = conv(x)
        >>> conv = weight_norm(conv)
        >>> bool(torch.allclose(conv(x), before, atol=1e-6)), is_weight_normed(conv)
        (True, True)
    """
    if is_weight_normed(module, name):
        raise ValueError(f"{type(module).__name__}.{name} is already weight-normalised")
    if not isinstance(getattr(module, name, None), nn.Parameter):
        raise ValueError(f"{type(module).__name__} has no parameter {name!r} to weight-normalise")
    return parametrizations.weight_norm(module, name=name, dim=dim)


def is_weight_normed(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` carries a parametrization (as :func:`weight_norm` installs)."""
    return parametrize.is_parametrized(module, name)


def remove_weight_norm(module: M, name: str = "weight") -> M:
    """Fold the weight norm back into a plain parameter holding the current ``g · v / ||v||``.

    Example:
        >>> import torch
        >>> conv = weight_norm(nn.Linear(3, 2)); x = torch.randn(4, 3); y = conv(x)
        >>> conv = remove_weight_norm(conv)
        >>> bool(torch.allclose(conv(x), y)), is_weight_normed(conv)
        (True, False)
    """
    if not is_weight_normed(module, name):
        raise ValueError(f"{type(module).__name__}.{name} is not weight-normalised")
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module
