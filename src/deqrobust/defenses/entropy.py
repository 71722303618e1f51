"""Input entropy reduction: a test-time defense that purifies the input while the solver runs.

The follow-up of the paper (Yang, Li, Pang, Liu, ICML 2023; docs/method.md §8) runs the solver in
chunks of ``chunk`` steps. After each chunk that more steps follow, ``steps`` signed gradient steps
on the *input* lower the prediction entropy read at the current state ``z`` (held fixed),

    x' ← clip_[0, 1](clip_[x0 ± radius](x' - step · sign ∇_x' H(softmax(head(f(z, stem(x')))))))

with ``x0`` the received input (the ball is around it, so it is cumulative over chunks); then the
solve continues from ``z`` on the new input, Broyden's low-rank memory carried over and lifted
(:meth:`~deqrobust.solvers.broyden.BroydenState.retarget`). The released defaults: chunks of 2
steps, 10 entropy steps of ε/4 in the ε-ball, Broyden memory 2, the prediction read at the last
but one state (``early:N-1``). Each example is purified on its own (the entropy is summed over the
batch, so an example's step never depends on the others).

Imports :mod:`deqrobust.core`, :mod:`deqrobust.solvers` and :mod:`deqrobust.validate` only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from ..core import DEQClassifier
from ..core.state import StateSpec
from ..errors import ConfigError
from ..solvers.broyden import BroydenState
from ..validate import parse_eps

NAME = "entropy"
SOLVERS = ("broyden", "fixed_point")
# option name in a defense string -> field
OPTION_FIELDS = {"chunk": "chunk", "steps": "steps", "step": "step_size", "radius": "radius", "memory": "memory"}


@dataclass(frozen=True)
class EntropyReduction:
    """The purification's hyper-parameters (defaults as released).

    ``chunk``: solver steps between purifications (T); ``steps``: signed entropy steps per
    purification (R); ``step_size``: their size (default ``radius / 4``); ``radius``: of the ball
    around the received input (default: the evaluation's ε, :meth:`resolved`); ``memory``: Broyden's
    rank-one terms.

    Example:
        >>> EntropyReduction.parse("steps=5, radius=8/255").resolved(eps=0.1)
        EntropyReduction(chunk=2, steps=5, step_size=0.00784313725490196, radius=0.03137254901960784, memory=2)
        >>> str(EntropyReduction(radius=0.1).resolved(eps=0.1))
        'entropy(chunk=2,steps=10,step=0.025,radius=0.1,memory=2)'
    """

    chunk: int = 2
    steps: int = 10
    step_size: Optional[float] = None
    radius: Optional[float] = None
    memory: int = 2

    def __post_init__(self) -> None:
        for name in ("chunk", "steps", "memory"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"entropy reduction: {name} must be a positive integer, got {value!r}")
        for name in ("step_size", "radius"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ConfigError(f"entropy reduction: {name} must be a number in (0, 1], got {value!r}")

    @classmethod
    def parse(cls, text: str) -> "EntropyReduction":
        """``"chunk=2,steps=10,step=0.025,radius=8/255,memory=2"``, any subset, in any order."""
        values: dict = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in OPTION_FIELDS:
                raise ConfigError(f"entropy reduction: unknown option {part!r}; valid: "
                                  + ", ".join(f"{k}=..." for k in OPTION_FIELDS))
            name = OPTION_FIELDS[key]
            if name in ("step_size", "radius"):
                try:
                    values[name] = parse_eps(value.strip(), name=f"entropy reduction {key}")
                except ConfigError:
                    raise ConfigError(f"entropy reduction: {key} must be a number in (0, 1] (e.g. 8/255), "
                                      f"got {value.strip()!r}") from None
            else:
                try:
                    values[name] = int(value)
                except ValueError:
                    raise ConfigError(f"entropy reduction: {key} must be a positive integer, got {value.strip()!r}") from None
        return cls(**values)

    def resolved(self, eps: float) -> "EntropyReduction":
        """The radius defaulted to ``eps`` and the step to a quarter of the radius."""
        radius = self.radius if self.radius is not None else float(eps)
        step = self.step_size if self.step_size is not None else radius / 4
        return replace(self, radius=radius, step_size=step)

    def __str__(self) -> str:
        keys = {field: key for key, field in OPTION_FIELDS.items()}
        parts = [f"{keys[f.name]}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) is not None]
        return f"{NAME}({','.join(parts)})"

    def purification_steps(self, n_steps: int) -> int:
        """Entropy gradient steps in a solve of ``n_steps`` (a purification after each full chunk
        that more steps follow)."""
        return ((n_steps - 1) // self.chunk) * self.steps


@dataclass
class PurifiedSolve:
    """A solve with input entropy reduction: the kept raw states, the last state, the input the last
    chunk ran on (``purified``) and its injection."""

    states: dict[int, Tensor]
    z_last: Tensor
    purified: Tensor
    injection: object
    spec: StateSpec


class _FixedPointState:
    """(Damped) fixed-point iteration one step at a time; :meth:`retarget` just swaps the map."""

    def __init__(self, f: Callable[[Tensor], Tensor], z0: Tensor, damping: float) -> None:
        self.f, self.z, self.damping = f, z0, damping

    def step(self) -> Tensor:
        fz = self.f(self.z)
        self.z = fz if self.damping == 1.0 else torch.lerp(self.z, fz, self.damping)
        return self.z

    def retarget(self, f: Callable[[Tensor], Tensor]) -> None:
        self.f = f


def check_model(model: DEQClassifier) -> None:
    """Raise :class:`ConfigError` when ``model``'s solver cannot run the chunked solve."""
    if model.f_solver not in SOLVERS:
        raise ConfigError(f"input entropy reduction runs the solver in chunks with Broyden (as released) or fixed-point "
                          f"iteration; this model's f_solver is {model.f_solver!r}")


SignGradient = Literal["straight-through", "raw"]


def entropy_steps(model: DEQClassifier, z: Tensor, x: Tensor, x0: Tensor, spec: StateSpec,
                  purify: EntropyReduction, differentiable: Optional[SignGradient] = None) -> Tensor:
    """``purify.steps`` signed steps on ``x`` lowering the prediction entropy at the fixed state ``z``,
    each projected to the ``radius``-ball around ``x0`` and to [0, 1].

    ``differentiable`` keeps the steps in the autograd graph of ``x0`` (through the loop): the sign
    ``"straight-through"`` (forward sign, backward identity: the entropy's Hessian enters) or
    ``"raw"`` (its true gradient, zero: only the projections carry the input's gradient)."""
    radius, step = float(purify.radius or 0.0), float(purify.step_size or 0.0)
    if differentiable is None:
        x, x0 = x.detach(), x0.detach()
    low, high = (x0 - radius).clamp(min=0.0), (x0 + radius).clamp(max=1.0)
    z = z.detach()
    for _ in range(purify.steps):
        with torch.enable_grad():
            leaf = x if differentiable is not None else x.detach().requires_grad_(True)
            logits = model.logits_from_state(model.flat_f(model.stem(leaf), spec)(z), spec)
            grad = torch.autograd.grad(prediction_entropy(logits).sum(), leaf,
                                       create_graph=differentiable == "straight-through")[0]
            direction = grad + (grad.sign() - grad).detach() if differentiable == "straight-through" else grad.sign()
            x = torch.minimum(torch.maximum(x - step * direction, low), high)
    return x if differentiable is not None else x.detach()


def prediction_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of ``softmax(logits)`` per example (nats).

    Example:
        >>> [round(h, 4) for h in prediction_entropy(torch.tensor([[0.0, 0.0], [100.0, 0.0]])).tolist()]
        [0.6931, 0.0]
    """
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def purified_solve(model: DEQClassifier, x: Tensor, purify: EntropyReduction, n_steps: int,
                   keep: set[int], differentiable: Optional[SignGradient] = None) -> PurifiedSolve:
    """``n_steps`` solver steps on ``x`` with the input purified after every chunk that more steps
    follow; keeps the raw states listed in ``keep``. The solver never builds a graph; with
    ``differentiable`` (see :func:`entropy_steps`) the purified input keeps its graph to ``x``."""
    if purify.radius is None:
        raise ConfigError("input entropy reduction needs a radius: give entropy(radius=8/255) or evaluate it "
                          "under a threat model (the radius defaults to its ε)")
    check_model(model)
    purify = purify.resolved(purify.radius)
    x0 = x
    with torch.no_grad():
        e = model.injection(x)
        z0 = model.initial_state(e)
    spec = StateSpec.of(z0)
    with model.cached_weights():
        with torch.no_grad():
            f = model.flat_f(e, spec)
            solver: "BroydenState | _FixedPointState"
            if model.f_solver == "broyden":
                solver = BroydenState(f, spec.flatten(z0), purify.memory)
            else:
                solver = _FixedPointState(f, spec.flatten(z0), float(model.f_solver_options.get("damping", 1.0)))
        states: dict[int, Tensor] = {}
        z = solver.z
        for n in range(1, n_steps + 1):
            with torch.no_grad():
                z = solver.step()
            if n in keep:
                states[n] = z
            if n % purify.chunk == 0 and n < n_steps:
                x = entropy_steps(model, z, x, x0, spec, purify, differentiable)
                with torch.no_grad():
                    e = model.stem(x)
                    solver.retarget(model.flat_f(e, spec))
    return PurifiedSolve(states, z, x, e, spec)
