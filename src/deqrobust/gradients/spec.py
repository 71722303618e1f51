"""Gradient-source specifications (``"exact"``, ``"adjoint:3"``, ``"adjoint:3:fresh"``,
``"unrolled:ensemble"``, ...) and the state weights of gradient ensembles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch
from torch import Tensor

from ..errors import ConfigError

READY_MADE = ("exact", "phantom")
ESTIMATORS = ("adjoint", "unrolled")
ENSEMBLE_WEIGHTS = ("uniform", "authors")
Pairing = Literal["literal", "fresh"]
PAIRINGS: tuple[Pairing, ...] = get_args(Pairing)
AUTOGRAD = "autograd"  # a plain (non-DEQ) network: autograd through the network itself


@dataclass(frozen=True)
class GradientSource:
    """Where an attack's input gradient comes from.

    ``kind`` is ``"exact"`` / ``"phantom"`` (ready-made, through the final output), an estimator
    ``"adjoint"`` / ``"unrolled"`` at ``state`` n (1-based) or over all states (``state is None``:
    the gradient ensemble), or ``"autograd"`` (a plain network's own gradient). ``pairing`` says
    which adjoint state the simultaneous adjoint pairs with state n (see
    :func:`~deqrobust.gradients.simultaneous_adjoint`): ``"literal"`` (``u_n``, the paper's Eq. 11,
    written ``adjoint:n``) or ``"fresh"`` (``u_{n+1}``, written ``adjoint:n:fresh``).

    Example:
        >>> GradientSource.parse("adjoint:3:fresh", n_states=8)
        GradientSource(kind='adjoint', state=3, pairing='fresh')
        >>> str(GradientSource("adjoint", None, "fresh")), str(GradientSource("unrolled", 2))
        ('adjoint:ensemble:fresh', 'unrolled:2')
    """

    kind: str
    state: Optional[int] = None
    pairing: Pairing = "literal"

    def __post_init__(self) -> None:
        if self.pairing not in PAIRINGS:
            raise ConfigError(f"unknown adjoint pairing {self.pairing!r}; valid: {', '.join(PAIRINGS)}")
        if self.pairing != "literal" and self.kind != "adjoint":
            raise ConfigError(f"only the adjoint has a pairing; {self.kind!r} was given {self.pairing!r}")

    @property
    def is_ready_made(self) -> bool:
        """Through the final output only (what an off-the-shelf attack sees)."""
        return self.kind in READY_MADE or self.kind == AUTOGRAD

    @property
    def is_ensemble(self) -> bool:
        return self.kind in ESTIMATORS and self.state is None

    def states(self, n_states: int) -> list[int]:
        """The states n this source reads: all ``1..N`` for an ensemble, else its own one."""
        return list(range(1, n_states + 1)) if self.state is None else [self.state]

    @property
    def work_kind(self) -> str:
        """The kind of work it costs: ``exact``, ``phantom``, ``adjoint``, ``adjoint:fresh``,
        ``unrolled``, ``adjoint:ensemble``, ``adjoint:ensemble:fresh``, ``unrolled:ensemble``, ``autograd``."""
        if self.is_ready_made:
            return self.kind
        base = f"{self.kind}:ensemble" if self.is_ensemble else self.kind
        return base + (":fresh" if self.pairing == "fresh" else "")

    def with_pairing(self, pairing: Pairing) -> "GradientSource":
        """The same source with another adjoint pairing (other kinds are returned unchanged)."""
        return GradientSource(self.kind, self.state, pairing) if self.kind == "adjoint" else self

    def __str__(self) -> str:
        if self.is_ready_made:
            return self.kind
        text = f"{self.kind}:{'ensemble' if self.state is None else self.state}"
        return text + (":fresh" if self.pairing == "fresh" else "")

    @classmethod
    def parse(cls, spec: "str | GradientSource", n_states: int) -> "GradientSource":
        """Parse and validate against the model's number of states N."""
        if isinstance(spec, GradientSource):
            spec = str(spec)
        text = str(spec).strip().lower()
        if text in READY_MADE:
            return cls(text)
        kind, _, rest = text.partition(":")
        arg, _, pairing = rest.partition(":")
        if kind == "adjoint" and pairing in ("", *PAIRINGS):
            pairing_value: Pairing = "fresh" if pairing == "fresh" else "literal"
        elif kind == "unrolled" and pairing == "":
            pairing_value = "literal"
        else:
            kind = ""  # invalid
        if kind in ESTIMATORS and arg == "ensemble":
            return cls(kind, None, pairing_value)
        if kind in ESTIMATORS and arg.isdigit() and 1 <= int(arg) <= n_states:
            return cls(kind, int(arg), pairing_value)
        raise ConfigError(f"invalid gradient source {spec!r} for a DEQ with N={n_states} states; "
                          f"valid: {valid_sources(n_states)}")


def valid_sources(n_states: int) -> str:
    return (
        f"exact, phantom, adjoint:<n>, unrolled:<n> (1 <= n <= {n_states}), adjoint:ensemble, unrolled:ensemble; "
        "adjoint sources take ':fresh' for the fresh pairing (adjoint:<n>:fresh, adjoint:ensemble:fresh)"
    )


def all_sources(n_states: int, pairings: tuple[Pairing, ...] = ("literal",)) -> list[GradientSource]:
    """Every source the white-box protocol attacks with, ready-made first; the adjoint once per
    pairing in ``pairings``.

    Example:
        >>> [str(s) for s in all_sources(2, pairings=("literal", "fresh"))]  # doctest: +NORMALIZE_WHITESPACE
        ['exact', 'phantom', 'adjoint:1', 'adjoint:2', 'adjoint:ensemble', 'adjoint:1:fresh', 'adjoint:2:fresh',
         'adjoint:ensemble:fresh', 'unrolled:1', 'unrolled:2', 'unrolled:ensemble']
    """
    sources = [GradientSource("exact"), GradientSource("phantom")]
    for kind in ESTIMATORS:
        for pairing in (pairings if kind == "adjoint" else ("literal",)):
            sources += [GradientSource(kind, n, pairing) for n in range(1, n_states + 1)]
            sources.append(GradientSource(kind, None, pairing))
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
