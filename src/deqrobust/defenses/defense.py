"""Defense specifications and the defended forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from ..core import DEQClassifier, Solve
from ..errors import ConfigError
from ..solvers import KeepStates, RunningMean
from ..utils.modes import evaluation_mode

KINDS = ("final", "early", "ensemble")
ENSEMBLE_SETS = ("output", "trajectory")


def valid_defenses(n_states: int) -> str:
    return f"final, early:<n> (1 <= n <= {n_states}), ensemble, ensemble:trajectory"


@dataclass(frozen=True)
class Defense:
    """``kind`` in final / early / ensemble; ``step`` for early exit; ``ensemble_set`` says which
    states enter the mean: ``"output"`` (z_1..z_N plus the final output, as the authors) or
    ``"trajectory"`` (z_1..z_N)."""

    kind: str
    step: Optional[int] = None
    ensemble_set: str = "output"

    def __str__(self) -> str:
        if self.kind == "early":
            return f"early:{self.step}"
        if self.kind == "ensemble" and self.ensemble_set == "trajectory":
            return "ensemble:trajectory"
        return self.kind

    @classmethod
    def parse(cls, spec: "str | Defense", n_states: int) -> "Defense":
        """Parse ``"final"``, ``"early:3"``, ``"ensemble"``, ``"ensemble:trajectory"``.

        Example:
            >>> Defense.parse("early:3", n_states=8)
            Defense(kind='early', step=3, ensemble_set='output')
        """
        text = str(spec).strip().lower()
        if text == "final":
            return cls("final")
        if text == "ensemble":
            return cls("ensemble")
        kind, _, arg = text.partition(":")
        if kind == "ensemble" and arg in ENSEMBLE_SETS:
            return cls("ensemble", None, arg)
        if kind == "early" and arg.isdigit() and 1 <= int(arg) <= n_states:
            return cls("early", int(arg))
        raise ConfigError(f"invalid defense {spec!r} for a DEQ with N={n_states} states; valid: {valid_defenses(n_states)}")


@dataclass
class DefendedForward:
    """Defended logits plus what gradient estimators may need from the same solve."""

    logits: Tensor
    solve: Solve
    states: dict[int, Tensor] = field(default_factory=dict)


def defended_forward(
    model: DEQClassifier,
    x: Tensor,
    defense: "str | Defense",
    *,
    keep_states: Iterable[int] = (),
    full_solve: bool = False,
) -> DefendedForward:
    """Run one solve that yields the defense's logits (no autograd) and keeps the listed raw states.

    ``full_solve`` forces N steps (e.g. when a ready-made gradient needs ``z*``); a longer solve
    reproduces the early states exactly, so the logits never depend on what else is kept.
    A model in train mode runs in eval mode (see :func:`~deqrobust.utils.modes.evaluation_mode`).
    """
    with evaluation_mode(model):
        return _defended_forward(model, x, Defense.parse(defense, model.n_states), set(int(n) for n in keep_states),
                                 full_solve)


def _defended_forward(model: DEQClassifier, x: Tensor, defense: Defense, keep: set[int],
                      full_solve: bool) -> DefendedForward:
    solved = _solve(model, x, [defense], keep, full_solve)
    return DefendedForward(solved.logits(defense), solved.solve, solved.states)


@dataclass
class _Solved:
    """One solve, read by several defenses."""

    model: DEQClassifier
    injection: Tensor
    solve: Solve
    states: dict[int, Tensor]
    mean: Optional[RunningMean]

    def logits(self, defense: Defense) -> Tensor:
        model, solve = self.model, self.solve
        with torch.no_grad():
            if defense.kind == "early":
                step = int(defense.step or 0)
                z = self.states[step]
                diverged = solve.info.diverged & (solve.info.nstep <= step)
            else:
                with model.cached_weights():
                    z_out = model.output_state(solve, self.injection)
                if defense.kind == "ensemble":
                    if self.mean is None:
                        raise RuntimeError("an ensemble defense needs the solve's running mean")
                    z = self.mean.mean([z_out] if defense.ensemble_set == "output" else [])
                else:
                    z = z_out
                diverged = solve.info.diverged
            if model.on_divergence != "ignore" and bool(diverged.any()):
                if model.on_divergence == "raise":
                    model.apply_divergence_policy(z, solve.info)
                z = torch.where(diverged.unsqueeze(1), torch.full_like(z, float("nan")), z)
            return model.logits_from_state(z, solve.spec)


def _solve(model: DEQClassifier, x: Tensor, defenses: Sequence[Defense], keep: set[int], full_solve: bool) -> _Solved:
    """The one solve that every listed defense can read: N steps unless only early exits are read
    (then as many as the latest of them and of ``keep``)."""
    keep = keep | {int(d.step) for d in defenses if d.kind == "early" and d.step is not None}
    n_steps = model.n_states
    if all(d.kind == "early" for d in defenses) and not full_solve:
        n_steps = max(keep)
    callbacks: list = []
    keeper = KeepStates(keep) if keep else None
    if keeper is not None:
        callbacks.append(keeper)
    mean = RunningMean() if any(d.kind == "ensemble" for d in defenses) else None
    if mean is not None:
        callbacks.append(mean)
    with torch.no_grad():
        e = model.injection(x)
        with model.cached_weights():
            solve = model.solve(injection=e, max_iter=n_steps, callback=callbacks)
    return _Solved(model, e, solve, keeper.states if keeper is not None else {}, mean)


def defended_logits_many(model: DEQClassifier, x: Tensor, defenses: Sequence["str | Defense"]) -> list[Tensor]:
    """The logits under each of ``defenses`` from **one** solve (no autograd): each equals
    :func:`defended_logits` under that defense alone (a longer solve reproduces the early states;
    the example there shows both)."""
    with evaluation_mode(model):
        parsed = [Defense.parse(d, model.n_states) for d in defenses]
        solved = _solve(model, x, parsed, set(), False)
        return [solved.logits(d) for d in parsed]


def defended_logits(model: DEQClassifier, x: Tensor, defense: "str | Defense" = "final") -> Tensor:
    """Logits of ``model`` under ``defense`` (no autograd).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deqrobust import DEQClassifier
        >>> class F(nn.Module):
        ...     def __init__(self): super().__init__(); self.lin = nn.Linear(3, 3)
        ...     def forward(self, z, e): return torch.tanh(0.3 * self.lin(z) + e)
        >>> model = DEQClassifier(nn.Linear(2, 3), F(), nn.Linear(3, 2), f_max_iter=6).eval()
        >>> x = torch.randn(4, 2)
        >>> defended_logits(model, x, "early:2").shape
        torch.Size([4, 2])
        >>> final, early = defended_logits_many(model, x, ["final", "early:2"])  # one solve, both defenses
        >>> torch.equal(early, defended_logits(model, x, "early:2"))
        True
    """
    return defended_forward(model, x, defense).logits
