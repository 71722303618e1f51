"""Reusable layers for DEQ models: variational dropout, weight normalisation, input normalisation.

Everything here is a plain ``torch.nn`` building block with no knowledge of solvers or attacks.
Imports only ``torch`` and :mod:`deqrobust.errors`.
"""

from .dropout import VariationalDropout2d
from .normalize import InputNormalization, input_normalization
from .weight_norm import is_weight_normed, remove_weight_norm, weight_norm

__all__ = [
    "InputNormalization",
    "VariationalDropout2d",
    "input_normalization",
    "is_weight_normed",
    "remove_weight_norm",
    "weight_norm",
]
