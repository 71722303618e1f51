"""Attackable models (docs/method.md §7): forward = the defended logits, backward = a chosen gradient source.

``attackable(model, defense="early:3", gradient="adjoint:3")`` is an ``nn.Module`` that any
off-the-shelf attack (AutoAttack, torchattacks, ours) runs unmodified. Its forward value is the
real defended output, so success is always judged on the defended model; its backward replaces the
(non-existent or obfuscated) gradient by the estimator's surrogate, like BPDA. All VJPs run in the
backward pass, so AutoAttack's ``check_dynamic`` sees a static forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union, get_args

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .core import DEQClassifier
from .defenses import Defense, defended_forward
from .defenses.entropy import SignGradient, purified_solve
from .errors import ConfigError
from .gradients.adjoint import simultaneous_adjoint
from .gradients.objective import CotangentObjective, Objective
from .gradients.spec import GradientSource, Pairing, ensemble_weights
from .gradients.unrolled import UnrollSettings, unrolled_gradients
from .models import is_deq
from .utils.modes import evaluation_mode


@dataclass(frozen=True)
class EstimatorSettings:
    """Knobs of the intermediate-state estimators (defaults: β = 1, uniform ensemble, the model's
    own phantom unroll). The adjoint's pairing belongs to the source (``adjoint:n:fresh``)."""

    adjoint_beta: float = 1.0
    unroll: Optional[UnrollSettings] = None
    ensemble_weights: Union[str, Tensor] = "uniform"

    def __post_init__(self) -> None:
        if not 0.0 < self.adjoint_beta <= 1.0:
            raise ConfigError(f"adjoint_beta must be in (0, 1], got {self.adjoint_beta}")


def surrogate_gradient(
    model: DEQClassifier,
    x: Tensor,
    source: GradientSource,
    objective: Objective,
    settings: EstimatorSettings,
    states: Optional[dict[int, Tensor]] = None,
    z_star_solve=None,
) -> Tensor:
    """Input gradient of ``objective`` from ``source``. ``states``/``z_star_solve`` may carry what a
    forward pass already computed (raw states, the final solve); missing pieces are recomputed.
    A model in train mode runs in eval mode (see :func:`~deqrobust.utils.modes.evaluation_mode`)."""
    with evaluation_mode(model):
        return _surrogate_gradient(model, x, source, objective, settings, states, z_star_solve)


def _surrogate_gradient(model: DEQClassifier, x: Tensor, source: GradientSource, objective: Objective,
                        settings: EstimatorSettings, states: Optional[dict[int, Tensor]], z_star_solve) -> Tensor:
    n_states = model.n_states
    if source.kind in ("exact", "phantom"):
        solve = z_star_solve if z_star_solve is not None else model.solve(x)
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_()
            e = model.injection(x_leaf)
            z_out = model.output_state(solve, e, grad=source.kind)
            value = objective(model.logits_from_state(z_out, solve.spec))
            return torch.autograd.grad(value, x_leaf)[0]
    if source.kind == "adjoint":
        result = simultaneous_adjoint(
            model,
            x,
            objective,
            states=None if source.is_ensemble else source.states(n_states),
            ensemble=settings.ensemble_weights if source.is_ensemble else None,
            beta=settings.adjoint_beta,
            pairing=source.pairing,
        )
        if source.state is not None:
            return result.grads[source.state]
        if result.ensemble is None:
            raise RuntimeError("the simultaneous adjoint returned no ensemble gradient")
        return result.ensemble
    if source.kind == "unrolled":
        needed = source.states(n_states)
        if states is None or any(n not in states for n in needed):
            states = defended_forward(model, x, "final", keep_states=needed).states
        picked = {n: states[n] for n in needed}
        weights = ensemble_weights(n_states, settings.ensemble_weights) if source.is_ensemble else None
        grads = unrolled_gradients(model, x, picked, objective, settings.unroll, weights)
        return grads if isinstance(grads, Tensor) else grads[needed[0]]
    raise ConfigError(f"unknown gradient source {source}")


PurificationGradient = Literal["bpda", "non-adaptive", "through-loop:straight-through", "through-loop:raw"]
PURIFICATION_GRADIENTS: tuple[str, ...] = get_args(PurificationGradient)


def purification_gradient(model: DEQClassifier, x: Tensor, purified: Tensor, defense: Defense, source: GradientSource,
                          objective: Objective, settings: EstimatorSettings, mode: PurificationGradient) -> Tensor:
    """The input gradient against a purified defense (input entropy reduction, docs/method.md §8):

    * ``"bpda"`` — the purification taken as the identity: ``source``'s gradient at the purified input;
    * ``"non-adaptive"`` — the follow-up's own evaluation: ``source``'s gradient of the undefended
      model at the received input (the defense is never differentiated, nor run);
    * ``"through-loop:straight-through"`` / ``"through-loop:raw"`` — BPDA's gradient at the purified
      input carried back through the purification steps by autograd, the sign straight-through
      (the entropy's Hessian enters) or with its true, zero gradient (only the projections act).
    """
    if mode == "non-adaptive":
        return surrogate_gradient(model, x, source, objective, settings)
    if mode == "bpda":
        return surrogate_gradient(model, purified, source, objective, settings)
    if defense.purify is None:
        raise ConfigError(f"{mode} needs a purified defense, got {defense}")
    sign: SignGradient = "straight-through" if mode == "through-loop:straight-through" else "raw"
    n_read = defense.read_state(model.n_states)
    with evaluation_mode(model), torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        again = purified_solve(model, leaf, defense.purify, n_read, set(), differentiable=sign).purified
        at_purified = surrogate_gradient(model, again.detach(), source, objective, settings)
        if not again.requires_grad:  # no purification step before the read state
            return at_purified
        return torch.autograd.grad(again, leaf, at_purified)[0]


class _DefendedWithSurrogate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, wrapper: "AttackableDEQ") -> Tensor:
        out = wrapper._defended(x, keep_for_backward=True)
        ctx.save_for_backward(x)
        ctx.wrapper = wrapper
        ctx.saved = out
        return out.logits

    @staticmethod
    @once_differentiable
    def backward(ctx, cotangent: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        w: AttackableDEQ = ctx.wrapper
        saved = ctx.saved
        if saved.purified is not None:
            grad = purification_gradient(w.model, x, saved.purified, w.defense, w.source, CotangentObjective(cotangent),
                                         w.settings, w.purification)
            return grad.to(x.dtype), None
        grad = surrogate_gradient(
            w.model,
            x,
            w.source,
            CotangentObjective(cotangent),
            w.settings,
            states=saved.states,
            z_star_solve=saved.solve if w.source.is_ready_made else None,
        )
        return grad.to(x.dtype), None


class AttackableDEQ(nn.Module):
    """See :func:`attackable`. ``forward(x)`` = defended logits; backward = ``gradient``'s surrogate."""

    def __init__(self, model: DEQClassifier, defense: "str | Defense", gradient: "str | GradientSource",
                 settings: Optional[EstimatorSettings] = None, purification: PurificationGradient = "bpda") -> None:
        super().__init__()
        if not is_deq(model):
            raise ConfigError(f"attackable() needs a DEQClassifier, got {type(model).__name__}")
        self.model = model
        # The wrapper reports the model's mode: attack libraries that restore "the model's mode" after
        # attacking (torchattacks calls .train() when the wrapper says training) leave an eval model in eval.
        self.training = model.training
        self.defense = Defense.parse(defense, model.n_states)
        self.source = GradientSource.parse(gradient, model.n_states)
        self.settings = settings or EstimatorSettings()
        if purification not in PURIFICATION_GRADIENTS:
            raise ConfigError(f"unknown purification gradient {purification!r}; valid: {', '.join(PURIFICATION_GRADIENTS)}")
        if purification != "bpda" and self.defense.purify is None:
            raise ConfigError(f"purification={purification!r} needs a purified defense (entropy...), got {self.defense}")
        self.purification: PurificationGradient = purification

    def _needed_states(self) -> list[int]:
        if self.source.kind != "unrolled":
            return []
        return self.source.states(self.model.n_states)

    def _defended(self, x: Tensor, keep_for_backward: bool):
        if self.defense.purify is not None:  # the backward runs at the purified input (BPDA)
            return defended_forward(self.model, x, self.defense)
        keep = self._needed_states() if keep_for_backward else []
        full = keep_for_backward and self.source.is_ready_made
        return defended_forward(self.model, x, self.defense, keep_states=keep, full_solve=full)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _DefendedWithSurrogate.apply(x, self)
        return self._defended(x, keep_for_backward=False).logits

    def extra_repr(self) -> str:
        extra = f", purification={self.purification}" if self.defense.purify is not None else ""
        return f"defense={self.defense}, gradient={self.source}{extra}"


def attackable(
    model: DEQClassifier,
    defense: "str | Defense" = "final",
    gradient: "str | GradientSource" = "exact",
    *,
    adjoint_beta: float = 1.0,
    adjoint_pairing: Optional[Pairing] = None,
    unroll: Optional[UnrollSettings] = None,
    ensemble_weights: Union[str, Tensor] = "uniform",
    purification: PurificationGradient = "bpda",
) -> AttackableDEQ:
    """Wrap a DEQ so that attacks see ``defense``'s logits and ``gradient``'s input gradient.

    Args:
        model: a :class:`~deqrobust.DEQClassifier` (put it in eval mode for attacks).
        defense: ``"final"``, ``"early:<n>"``, ``"ensemble"``, ``"ensemble:trajectory"``, or input
            entropy reduction ``"entropy[(options)][:final|:early:<n>]"``.
        gradient: ``"exact"``, ``"phantom"`` (ready-made, through the final output),
            ``"adjoint:<n>"``, ``"unrolled:<n>"``, ``"adjoint:ensemble"``, ``"unrolled:ensemble"``.
        adjoint_beta: simultaneous-adjoint step size β.
        adjoint_pairing: ``"literal"`` or ``"fresh"``, for an adjoint ``gradient`` that names no
            pairing (``"adjoint:3"``); the same as writing ``"adjoint:3:fresh"``.
        unroll: :class:`~deqrobust.gradients.unrolled.UnrollSettings` for ``unrolled:*``
            (default: the model's phantom settings).
        ensemble_weights: ``"uniform"`` (paper Eq. 17) or ``"authors"`` ((N+1-n) weighting).
        purification: against a purified defense (``"entropy..."``), how the gradient treats the
            purification (:func:`purification_gradient`): ``"bpda"`` (default), ``"non-adaptive"``,
            ``"through-loop:straight-through"``, ``"through-loop:raw"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deqrobust import DEQClassifier
        >>> class F(nn.Module):
        ...     def __init__(self): super().__init__(); self.lin = nn.Linear(3, 3)
        ...     def forward(self, z, e): return torch.tanh(0.3 * self.lin(z) + e)
        >>> model = DEQClassifier(nn.Linear(2, 3), F(), nn.Linear(3, 2), f_max_iter=6).eval()
        >>> wrapped = attackable(model, defense="early:2", gradient="unrolled:2")
        >>> x = torch.rand(4, 2, requires_grad=True)
        >>> loss = torch.nn.functional.cross_entropy(wrapped(x), torch.tensor([0, 1, 1, 0]))
        >>> torch.autograd.grad(loss, x)[0].shape
        torch.Size([4, 2])
    """
    settings = EstimatorSettings(adjoint_beta, unroll, ensemble_weights)
    source = GradientSource.parse(gradient, model.n_states) if is_deq(model) else gradient
    if adjoint_pairing is not None and isinstance(source, GradientSource):
        if source.kind == "adjoint" and source.pairing != "literal" and source.pairing != adjoint_pairing:
            raise ConfigError(f"gradient {str(source)!r} names the pairing {source.pairing!r}, "
                              f"but adjoint_pairing={adjoint_pairing!r}")
        source = source.with_pairing(adjoint_pairing)
    return AttackableDEQ(model, defense, source, settings, purification)
