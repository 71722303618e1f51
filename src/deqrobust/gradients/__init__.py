"""Intermediate-state gradient estimators (the paper's contribution; docs/method.md §4–6).

* :func:`simultaneous_adjoint` — ``G_n`` for every state from one solve (Sec. 4.1).
* :func:`unrolled_gradients` — unroll k damped steps from ``z_n`` (Sec. 4.2).
* gradient ensembles — ``Σ a_n G_n`` with uniform (Eq. 17) or the authors' (N+1-n) weights.
* :class:`GradientSource` — ``"exact"``, ``"phantom"``, ``"adjoint:<n>"``, ``"unrolled:ensemble"``, ...

Imports :mod:`deqrobust.core` and :mod:`deqrobust.solvers`.
"""

from .adjoint import AdjointResult, simultaneous_adjoint
from .objective import CotangentObjective, LossObjective, cross_entropy_objective
from .spec import GradientSource, all_sources, ensemble_weights, valid_sources
from .unrolled import UnrollSettings, unrolled_gradients

__all__ = [
    "AdjointResult",
    "CotangentObjective",
    "GradientSource",
    "LossObjective",
    "UnrollSettings",
    "all_sources",
    "cross_entropy_objective",
    "ensemble_weights",
    "simultaneous_adjoint",
    "unrolled_gradients",
    "valid_sources",
]
