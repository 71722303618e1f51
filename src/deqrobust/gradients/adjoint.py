"""Simultaneous adjoint (paper Sec. 4.1; docs/method.md §4): one forward solve yields a surrogate input
gradient ``G_n`` for every state ``z_n``.

An adjoint state runs alongside the forward solver and reuses its inverse-Jacobian estimate::

    u_0 = 0
    v_n     = J_f(z_n)ᵀ u_n + ∂L(h(z_n))/∂z_n - u_n
    u_{n+1} = u_n - β B_nᵀ v_n                 (B_n = -I for fixed-point / Anderson)
    G_n     = J_{f,x}(z_n)ᵀ u_n                ("literal" pairing, one VJP per step)
           or J_{f,x}(z_n)ᵀ u_{n+1}             ("fresh" pairing, one extra VJP per state)

The f evaluation of each solver step is done with autograd enabled and its graph reused for the
VJP, so the cost per step is about one forward plus one backward of f.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from ..core import DEQClassifier
from ..errors import ConfigError
from ..solvers import SolverInfo, SolverStep
from .injection import InjectionGraph, as_tuple, grads_or_zeros
from .objective import Objective
from ..utils.modes import evaluation_mode
from .spec import PAIRINGS, ensemble_weights


@dataclass
class AdjointResult:
    """Surrogate input gradients: ``grads[n]`` for the requested states, ``ensemble`` = Σ a_n G_n."""

    grads: dict[int, Tensor] = field(default_factory=dict)
    ensemble: Optional[Tensor] = None
    info: Optional[SolverInfo] = None
    adjoint_norms: list[Tensor] = field(default_factory=list)


class _AdjointRecursion:
    """Solver callback that advances the adjoint state at every step."""

    def __init__(self, model, spec, e_leaf, objective, beta, pairing, last_graph, n_steps, record, weights):
        self.model, self.spec, self.e_leaf, self.objective = model, spec, e_leaf, objective
        self.beta, self.pairing, self.last = beta, pairing, last_graph
        self.n_steps, self.record, self.weights = n_steps, record, weights
        self.u: Optional[Tensor] = None
        self.recorded: dict[int, tuple[Tensor, ...]] = {}
        self.weighted: Optional[list[Tensor]] = None
        self.norms: list[Tensor] = []

    def source(self, z: Tensor) -> Tensor:
        """``∂ objective(h(z)) / ∂z`` at one state."""
        with torch.enable_grad():
            zl = z.detach().requires_grad_()
            value = self.objective(self.model.logits_from_state(zl, self.spec))
            (grad,) = torch.autograd.grad(value, zl)
        return grad

    def vjp(self, cotangent: Tensor, need_z: bool) -> tuple[Optional[Tensor], tuple[Tensor, ...]]:
        zl, fz = self.last["z"], self.last["fz"]
        inputs = ((zl,) if need_z else ()) + as_tuple(self.e_leaf)
        grads = grads_or_zeros(fz, inputs, cotangent, retain_graph=True)
        if need_z:
            return grads[0], grads[1:]
        return None, grads

    def accumulate(self, n: int, w_e: tuple[Tensor, ...]) -> None:
        if n in self.record:
            self.recorded[n] = w_e
        if self.weights is not None:
            a = float(self.weights[n - 1])
            scaled = [a * w for w in w_e]
            self.weighted = scaled if self.weighted is None else [s + t for s, t in zip(self.weighted, scaled)]

    def __call__(self, step: SolverStep) -> None:
        n = step.n
        if self.u is None:
            self.u = torch.zeros_like(step.z)
        u = self.u
        needs_next = n < self.n_steps or self.pairing == "fresh"
        jtu: Optional[Tensor]
        if n == 0:
            jtu = torch.zeros_like(u)  # u_0 = 0: nothing to pull back
        else:
            jtu, w_e = self.vjp(u, need_z=needs_next)  # J^T u is computed exactly when it is needed
            if self.pairing == "literal":
                self.accumulate(n, w_e)
        if not needs_next or jtu is None:
            return
        v = jtu + self.source(step.z) - u
        u_next = u - self.beta * step.inverse_jacobian_t(v)
        if n >= 1 and self.pairing == "fresh":
            _, w_e = self.vjp(u_next, need_z=False)
            self.accumulate(n, w_e)
        self.u = u_next
        self.norms.append(torch.linalg.vector_norm(u_next, dim=1))


def simultaneous_adjoint(
    model: DEQClassifier,
    x: Tensor,
    objective: Objective,
    *,
    states: Union[str, Iterable[int], None] = "all",
    ensemble: Union[None, str, Tensor] = None,
    beta: float = 1.0,
    pairing: str = "literal",
    max_iter: Optional[int] = None,
) -> AdjointResult:
    """Run the forward solve with the simultaneous adjoint and return surrogate input gradients.

    Args:
        model: the DEQ (its forward solver, settings and ``B_n`` are used as they are).
        x: inputs (B, ...).
        objective: :class:`~deqrobust.gradients.objective.LossObjective` (paper-exact) or
            :class:`~deqrobust.gradients.objective.CotangentObjective` (generic).
        states: 1-based states whose ``G_n`` to return (``"all"``, an iterable, or None).
        ensemble: also return ``Σ a_n G_n`` with weights ``"uniform"``/``"authors"``/tensor.
        beta: adjoint step size β in (0, 1].
        pairing: ``"literal"`` (G_n uses u_n; paper) or ``"fresh"`` (G_n uses u_{n+1}).
        max_iter: number of solver steps N (default: the model's ``f_max_iter``). States beyond
            the last requested one are not computed unless an ensemble is asked for.

    A model in train mode runs in eval mode (see :func:`~deqrobust.utils.modes.evaluation_mode`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deqrobust import DEQClassifier
        >>> from deqrobust.gradients.objective import cross_entropy_objective
        >>> class F(nn.Module):
        ...     def __init__(self): super().__init__(); self.lin = nn.Linear(3, 3)
        ...     def forward(self, z, e): return torch.tanh(0.3 * self.lin(z) + e)
        >>> model = DEQClassifier(nn.Linear(2, 3), F(), nn.Linear(3, 2), f_max_iter=6).eval()
        >>> out = simultaneous_adjoint(model, torch.randn(4, 2), cross_entropy_objective(torch.tensor([0, 1, 0, 1])))
        >>> sorted(out.grads), out.grads[6].shape
        ([1, 2, 3, 4, 5, 6], torch.Size([4, 2]))
    """
    if pairing not in PAIRINGS:
        raise ConfigError(f"unknown adjoint pairing {pairing!r}; valid: {', '.join(PAIRINGS)}")
    if not 0.0 < beta <= 1.0:
        raise ConfigError(f"adjoint step size beta must be in (0, 1], got {beta}")
    n_total = max_iter or model.f_max_iter
    if states == "all":
        record = set(range(1, n_total + 1))
    else:
        record = set(int(n) for n in (states or ()))
    bad = [n for n in record if not 1 <= n <= n_total]
    if bad:
        raise ConfigError(f"adjoint states {sorted(bad)} out of range; valid: 1..{n_total}")
    if not record and ensemble is None:
        raise ConfigError("simultaneous_adjoint needs states to record or an ensemble")
    n_steps = n_total if ensemble is not None else max(record)
    weights = ensemble_weights(n_total, ensemble) if ensemble is not None else None
    with evaluation_mode(model):
        return _run(model, x, objective, beta, pairing, n_steps, record, weights)


def _run(model: DEQClassifier, x: Tensor, objective: Objective, beta: float, pairing: str, n_steps: int,
         record: set[int], weights: Optional[Tensor]) -> AdjointResult:
    graph = InjectionGraph.build(model, x)
    last: dict[str, Tensor] = {}

    def f_with_graph(z: Tensor) -> Tensor:
        with torch.enable_grad():
            zl = z.detach().requires_grad_()
            fz = graph.flat_f(zl)
        last["z"], last["fz"] = zl, fz
        return fz.detach()

    recursion = _AdjointRecursion(model, graph.spec, graph.e_leaf, objective, beta, pairing, last, n_steps,
                                  record, weights)
    with model.cached_weights():
        solve = model.solve(injection=graph.e_leaf, max_iter=n_steps, callback=recursion, stop_early=False,
                            f_override=f_with_graph)
    last.clear()

    keys: list[Any] = sorted(recursion.recorded)
    cotangents = [recursion.recorded[n] for n in keys]
    if recursion.weighted is not None:
        keys.append("ensemble")
        cotangents.append(tuple(recursion.weighted))
    result = AdjointResult(info=solve.info, adjoint_norms=recursion.norms)
    for key, g in zip(keys, graph.pull_back(cotangents)):
        if key == "ensemble":
            result.ensemble = g
        else:
            result.grads[key] = g
    return result
