"""Gradient-source specifications (``"exact"``, ``"adjoint:3"``, ``"unrolled:ensemble"``, ...)
and the state weights of gradient ensembles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..errors import ConfigError

READY_MADE = ("exact", "phantom")
ESTIMATORS = ("adjoint", "unrolled")
ENSEMBLE_WEIGHTS = ("uniform", "authors")


@dataclass(frozen=True)
class GradientSource:
    """Where an attack's input gradient comes from.

    ``kind`` is ``"exact"`` / ``"phantom"`` (ready-made, through the final output) or an
    estimator ``"adjoint"`` / ``"unrolled"`` at ``state`` n (1-based) or over all states
    (``state is None``: the gradient ensemble).
    """

    kind: str
    state: Optional[int] = None

    @property
    def is_ready_made(self) -> bool:
        return self.kind in READY_MADE

    @property
    def is_ensemble(self) -> bool:
        return self.kind in ESTIMATORS and self.state is None

    def __str__(self) -> str:
        if self.is_ready_made:
            return self.kind
        return f"{self.kind}:{'ensemble' if self.state is None else self.state}"

    @classmethod
    def parse(cls, spec: "str | GradientSource", n_states: int) -> "GradientSource":
        """Parse and validate against the model's number of states N."""
        if isinstance(spec, GradientSource):
            spec = str(spec)
        valid = valid_sources(n_states)
        text = str(spec).strip().lower()
        if text in READY_MADE:
            return cls(text)
        kind, _, arg = text.partition(":")
        if kind in ESTIMATORS and arg == "ensemble":
            return cls(kind, None)
        if kind in ESTIMATORS and arg.isdigit() and 1 <= int(arg) <= n_states:
            return cls(kind, int(arg))
        raise ConfigError(f"invalid gradient source {spec!r} for a DEQ with N={n_states} states; valid: {valid}")


def valid_sources(n_states: int) -> str:
    return (
        f"exact, phantom, adjoint:<n>, unrolled:<n> (1 <= n <= {n_states}), adjoint:ensemble, unrolled:ensemble"
    )


def all_sources(n_states: int) -> list[GradientSource]:
    """Every source the white-box protocol attacks with, ready-made first."""
    sources = [GradientSource("exact"), GradientSource("phantom")]
    for kind in ESTIMATORS:
        sources += [GradientSource(kind, n) for n in range(1, n_states + 1)]
        sources.append(GradientSource(kind, None))
    return sources


def ensemble_weights(n_states: int, weights: "str | Tensor" = "uniform") -> Tensor:
    """Weights a_1..a_N (summing to 1) of the gradient ensemble ``Σ a_n G_n``.

    ``"uniform"`` is the paper's Eq. 17. ``"authors"`` reproduces the authors' PGD code, which never
    zeroed ``x.grad`` between states and so weighted state n by (N + 1 - n).

    Example:
        >>> ensemble_weights(3, "authors").tolist()
        [0.5, 0.3333333333333333, 0.16666666666666666]
    """
    if isinstance(weights, Tensor):
        if weights.shape != (n_states,):
            raise ConfigError(f"ensemble weights must have shape ({n_states},), got {tuple(weights.shape)}")
        return weights / weights.sum()
    if weights == "uniform":
        return torch.full((n_states,), 1.0 / n_states, dtype=torch.float64)
    if weights == "authors":
        w = torch.arange(n_states, 0, -1, dtype=torch.float64)
        return w / w.sum()
    raise ConfigError(f"unknown ensemble weights {weights!r}; valid: {', '.join(ENSEMBLE_WEIGHTS)} or a tensor")
