"""Defense specifications and the defended forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from ..core import DEQClassifier, Solve
from ..errors import ConfigError
from ..solvers import KeepStates, RunningMean
from ..utils.modes import evaluation_mode
from .entropy import NAME as ENTROPY, EntropyReduction, PurifiedSolve, check_model, purified_solve

KINDS = ("final", "early", "ensemble")
ENSEMBLE_SETS = ("output", "trajectory")


def valid_defenses(n_states: int) -> str:
    return (f"final, early:<n> (1 <= n <= {n_states}), ensemble, ensemble:trajectory, entropy[(options)][:final|:early:<n>] "
            "(input entropy reduction)")


@dataclass(frozen=True)
class Defense:
    """``kind`` in final / early / ensemble; ``step`` for early exit; ``ensemble_set`` says which
    states enter the mean: ``"output"`` (z_1..z_N plus the final output, as the authors) or
    ``"trajectory"`` (z_1..z_N); ``purify``: input entropy reduction while the solver runs
    (:mod:`~deqrobust.defenses.entropy`), read at ``final`` or ``early:<n>``."""

    kind: str
    step: Optional[int] = None
    ensemble_set: str = "output"
    purify: Optional[EntropyReduction] = None

    def __str__(self) -> str:
        if self.kind == "early":
            base = f"early:{self.step}"
        elif self.kind == "ensemble" and self.ensemble_set == "trajectory":
            base = "ensemble:trajectory"
        else:
            base = self.kind
        return base if self.purify is None else f"{self.purify}:{base}"

    @property
    def static(self) -> "Defense":
        """The same read-out without the purification."""
        return replace(self, purify=None)

    def read_state(self, n_states: int) -> int:
        """The solver steps the read-out needs: n for ``early:n``, N otherwise."""
        return int(self.step) if self.kind == "early" and self.step is not None else n_states

    def resolved(self, eps: float) -> "Defense":
        """A purified defense with its radius defaulted to ``eps`` (see :meth:`EntropyReduction.resolved`)."""
        return self if self.purify is None else replace(self, purify=self.purify.resolved(eps))

    @classmethod
    def parse(cls, spec: "str | Defense", n_states: int) -> "Defense":
        """Parse ``"final"``, ``"early:3"``, ``"ensemble"``, ``"ensemble:trajectory"``, and input entropy
        reduction: ``"entropy"`` (the released settings, read at the last but one state),
        ``"entropy:final"``, ``"entropy(steps=5,radius=8/255):early:3"``.

        Example:
            >>> Defense.parse("early:3", n_states=8)
            Defense(kind='early', step=3, ensemble_set='output', purify=None)
            >>> str(Defense.parse("entropy(steps=5)", n_states=8))
            'entropy(chunk=2,steps=5,memory=2):early:7'
        """
        text = str(spec).strip().lower()
        if text.startswith(ENTROPY):
            return cls._parse_purified(text, n_states)
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

    @classmethod
    def _parse_purified(cls, text: str, n_states: int) -> "Defense":
        rest = text[len(ENTROPY):]
        options = ""
        if rest.startswith("("):
            close = rest.find(")")
            if close < 0:
                raise ConfigError(f"invalid defense {text!r}: the options of entropy(...) need a closing parenthesis")
            options, rest = rest[1:close], rest[close + 1:]
        purify = EntropyReduction.parse(options)
        if rest == "":
            read = cls("early", n_states - 1) if n_states > 1 else cls("final")
        elif rest.startswith(":"):
            read = cls.parse(rest[1:], n_states)
        else:
            raise ConfigError(f"invalid defense {text!r}; valid: {valid_defenses(n_states)}")
        if read.kind == "ensemble" or read.purify is not None:
            raise ConfigError(f"invalid defense {text!r}: input entropy reduction reads final or early:<n>")
        n_read = read.read_state(n_states)
        if purify.purification_steps(n_read) == 0:
            raise ConfigError(f"invalid defense {text!r}: with chunks of {purify.chunk} steps the state read "
                              f"(z_{n_read}) comes before the first purification; read a later state or use a shorter "
                              "chunk, e.g. entropy(chunk=1)")
        return replace(read, purify=purify)


@dataclass
class DefendedForward:
    """Defended logits plus what gradient estimators may need from the same solve."""

    logits: Tensor
    solve: Optional[Solve]
    states: dict[int, Tensor] = field(default_factory=dict)
    purified: Optional[Tensor] = None  # the input the read state was computed on (input entropy reduction)


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
    if defense.purify is not None:
        purified = _purified(model, x, defense, keep)
        return DefendedForward(_purified_logits(model, purified, defense), None, purified.states, purified.purified)
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


def _purified(model: DEQClassifier, x: Tensor, defense: Defense, keep: set[int]) -> PurifiedSolve:
    """The chunked solve of a purified defense: as many steps as its read-out needs."""
    if defense.purify is None:
        raise RuntimeError("not a purified defense")
    check_model(model)
    n_steps = defense.read_state(model.n_states)
    return purified_solve(model, x, defense.purify, max([n_steps, *keep]), keep | {n_steps})


def _purified_logits(model: DEQClassifier, purified: PurifiedSolve, defense: Defense) -> Tensor:
    """``head(z_n)`` for ``early:n``; for ``final``, ``head(f(z_N, x'))`` with the last chunk's input."""
    with torch.no_grad():
        if defense.kind == "early":
            z = purified.states[int(defense.step or 0)]
        else:
            with model.cached_weights():
                z = model.flat_f(purified.injection, purified.spec)(purified.z_last)
        return model.logits_from_state(z, purified.spec)


def purify_input(model: DEQClassifier, x: Tensor, defense: "str | Defense") -> Tensor:
    """The input a purified defense's read state is computed on (no autograd): BPDA's point.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deqrobust import DEQClassifier
        >>> class F(nn.Module):
        ...     def __init__(self): super().__init__(); self.lin = nn.Linear(3, 3)
        ...     def forward(self, z, e): return torch.tanh(0.3 * self.lin(z) + e)
        >>> model = DEQClassifier(nn.Linear(2, 3), F(), nn.Linear(3, 2), f_max_iter=6).eval()
        >>> x = torch.rand(4, 2)
        >>> moved = purify_input(model, x, "entropy(radius=0.1)") - x
        >>> bool(moved.abs().max() <= 0.1 + 1e-6)
        True
    """
    with evaluation_mode(model):
        parsed = Defense.parse(defense, model.n_states)
        if parsed.purify is None:
            return x
        return _purified(model, x, parsed, set()).purified


def defended_logits_many(model: DEQClassifier, x: Tensor, defenses: Sequence["str | Defense"]) -> list[Tensor]:
    """The logits under each of ``defenses`` from **one** solve (no autograd): each equals
    :func:`defended_logits` under that defense alone (a longer solve reproduces the early states;
    the example there shows both). A purified defense runs its own solve."""
    with evaluation_mode(model):
        parsed = [Defense.parse(d, model.n_states) for d in defenses]
        static = [d for d in parsed if d.purify is None]
        solved = _solve(model, x, static, set(), False) if static else None
        return [solved.logits(d) if d.purify is None and solved is not None
                else _defended_forward(model, x, d, set(), False).logits for d in parsed]


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
