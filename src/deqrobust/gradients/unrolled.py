"""Unrolled intermediates (paper Sec. 4.2; docs/method.md §5): for state n, detach ``z_n``, unroll k damped
steps ``ẑ_t = (1-λ) ẑ_{t-1} + λ f(ẑ_{t-1}, e)`` (optionally after one undamped ``f``), and
backpropagate the objective at ``h(ẑ_k)`` to the input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
from torch import Tensor

from ..core import DEQClassifier
from ..core.phantom import phantom_output
from .injection import InjectionGraph, grads_or_zeros
from ..utils.modes import evaluation_mode
from .objective import Objective


@dataclass(frozen=True)
class UnrollSettings:
    """k steps, damping λ and an optional undamped first step (the authors' code adds one)."""

    steps: int = 5
    damping: float = 0.5
    undamped_first: bool = False

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        if self.steps < 0 or self.steps + int(self.undamped_first) < 1:
            raise ConfigError(f"an unroll needs at least one step (steps={self.steps}, undamped_first={self.undamped_first})")
        if not 0.0 < self.damping <= 1.0:
            raise ConfigError(f"unroll damping must be in (0, 1], got {self.damping}")

    @classmethod
    def of_model(cls, model: DEQClassifier) -> "UnrollSettings":
        return cls(model.phantom_steps, model.phantom_damping, model.phantom_undamped_first)


def unrolled_gradients(
    model: DEQClassifier,
    x: Tensor,
    states: Mapping[int, Tensor],
    objective: Objective,
    settings: Optional[UnrollSettings] = None,
    weights: Optional[Union[Tensor, Mapping[int, float]]] = None,
) -> Union[dict[int, Tensor], Tensor]:
    """Input gradients ``G_n`` from unrolling the given (flat, detached) states ``{n: z_n}``.

    Returns ``{n: G_n}``, or ``Σ_n w_n G_n`` when ``weights`` (indexed by n) is given. The stem
    is differentiated once, whatever the number of states. A model in train mode runs in eval mode
    (see :func:`~deqrobust.utils.modes.evaluation_mode`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deqrobust import DEQClassifier
        >>> from deqrobust.gradients.objective import CotangentObjective
        >>> class F(nn.Module):
        ...     def __init__(self): super().__init__(); self.lin = nn.Linear(3, 3)
        ...     def forward(self, z, e): return torch.tanh(0.3 * self.lin(z) + e)
        >>> model = DEQClassifier(nn.Linear(2, 3), F(), nn.Linear(3, 2), f_max_iter=4).eval()
        >>> x = torch.randn(5, 2)
        >>> solve = model.solve(x, trace=True)
        >>> g = unrolled_gradients(model, x, {2: solve.info.states[1]}, CotangentObjective(torch.ones(5, 2)))
        >>> g[2].shape
        torch.Size([5, 2])
    """
    with evaluation_mode(model):
        return _unroll(model, x, states, objective, settings or UnrollSettings.of_model(model), weights)


def _unroll(model: DEQClassifier, x: Tensor, states: Mapping[int, Tensor], objective: Objective,
            settings: UnrollSettings, weights: Optional[Union[Tensor, Mapping[int, float]]]
            ) -> Union[dict[int, Tensor], Tensor]:
    graph = InjectionGraph.build(model, x)
    pulled: dict[int, tuple[Tensor, ...]] = {}
    total: Optional[list[Tensor]] = None
    with torch.enable_grad(), model.cached_weights():
        for n, z_n in sorted(states.items()):
            z_k = phantom_output(graph.flat_f, z_n, settings.steps, settings.damping, settings.undamped_first)
            grads = grads_or_zeros(objective(model.logits_from_state(z_k, graph.spec)), graph.inputs)
            if weights is None:
                pulled[n] = grads
            else:
                w = float(weights[n - 1] if isinstance(weights, Tensor) else weights[n])
                scaled = [w * g for g in grads]
                total = scaled if total is None else [t + s for t, s in zip(total, scaled)]
    if weights is not None:
        if total is None:
            raise ValueError("unrolled_gradients got no states")
        return graph.pull_back([total])[0]
    return dict(zip(sorted(pulled), graph.pull_back([pulled[n] for n in sorted(pulled)])))
