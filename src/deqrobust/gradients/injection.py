"""The stem's graph shared by the estimators: every VJP of ``f`` stops at a detached copy of the
injection ``e``, and the stem is differentiated once per requested gradient at the very end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..core import DEQClassifier
from ..core.state import StateSpec


def detached_leaf(e: Any) -> Any:
    if isinstance(e, Tensor):
        return e.detach().requires_grad_()
    return type(e)(t.detach().requires_grad_() for t in e)


def as_tuple(e: Any) -> tuple[Tensor, ...]:
    return (e,) if isinstance(e, Tensor) else tuple(e)


@dataclass
class InjectionGraph:
    """``e = stem(x)`` with its graph, a detached leaf copy ``e_leaf``, and ``f`` bound to it."""

    x_leaf: Tensor
    e: Any
    e_leaf: Any
    spec: StateSpec
    flat_f: Callable[[Tensor], Tensor]

    @classmethod
    def build(cls, model: DEQClassifier, x: Tensor) -> "InjectionGraph":
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_()
            e = model.injection(x_leaf)
        e_leaf = detached_leaf(e)
        with torch.no_grad():
            spec = StateSpec.of(model.initial_state(e_leaf))
        return cls(x_leaf, e, e_leaf, spec, model.flat_f(e_leaf, spec))

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        return as_tuple(self.e_leaf)

    def pull_back(self, cotangents: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """Input gradients ``J_stemᵀ w`` for each cotangent ``w`` on the injection."""
        out = []
        for i, w in enumerate(cotangents):
            (g,) = torch.autograd.grad(as_tuple(self.e), self.x_leaf, tuple(w), retain_graph=i + 1 < len(cotangents))
            out.append(g)
        return out


def grads_or_zeros(outputs: Any, inputs: tuple[Tensor, ...], cotangent: Any = None, retain_graph: bool = False) -> tuple[Tensor, ...]:
    """``torch.autograd.grad`` with zeros for inputs the outputs do not depend on."""
    grads = torch.autograd.grad(outputs, inputs, cotangent, retain_graph=retain_graph, allow_unused=True)
    return tuple(torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs))
