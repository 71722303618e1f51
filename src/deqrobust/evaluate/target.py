"""What a model offers the protocol: its gradient sources, its defenses, its residuals.

The protocol asks one :class:`AttackTarget` instead of testing ``isinstance(model, DEQClassifier)``
in every phase. A :class:`~deqrobust.DEQClassifier` offers every source (ready-made, adjoint with
both pairings, unrolled, ensembles), every defense (final, early exit, ensembles) and its solver
residuals; any other ``nn.Module`` classifier offers its own autograd gradient and the ``final``
defense only.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..attackable import EstimatorSettings, PurificationGradient, attackable
from ..core import DEQClassifier
from ..defenses import Defense, defended_logits
from ..defenses.entropy import check_model as check_purifiable
from ..errors import ConfigError
from ..gradients import GradientSource, all_sources
from ..gradients.spec import AUTOGRAD, PAIRINGS
from ..models import is_deq

DEFENSE_REQUESTS = ("final", "early", "early:<n>", "ensemble", "ensemble:trajectory")


class AttackTarget:
    """The protocol's view of a model.

    Example:
        >>> from torch import nn
        >>> plain = AttackTarget(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
        >>> plain.is_deq, [str(s) for s in plain.sources()], [str(d) for d in plain.defenses(None)]
        (False, ['autograd'], ['final'])
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.deq: Optional[DEQClassifier] = model if is_deq(model) else None
        self.is_deq = self.deq is not None

    @property
    def n_states(self) -> int:
        """N, the DEQ's number of forward steps (0 for a plain network)."""
        return self.deq.n_states if self.deq is not None else 0

    @property
    def ready_made(self) -> GradientSource:
        """The gradient an off-the-shelf attack sees: the DEQ's own (exact or phantom), or autograd."""
        return GradientSource(self.deq.grad) if self.deq is not None else GradientSource(AUTOGRAD)

    @property
    def offers_early_exit(self) -> bool:
        return self.is_deq

    def downgrade(self) -> Optional[str]:
        """What a plain network misses (``None`` for a DEQ): the note that the call's warning, the
        banner, the result and the report carry, with how to give the library the model's solver.

        Example:
            >>> from torch import nn
            >>> AttackTarget(nn.Linear(4, 3)).downgrade()[:60]
            'not a DEQ (Linear): attacked with its own gradient (autograd'
        """
        if self.is_deq:
            return None
        inner = next((type(m).__name__ for m in self.model.modules() if m is not self.model and "deq" in type(m).__name__.lower()),
                     None)
        seen = (f" (it holds a {inner}, but the library cannot reach its solver or intermediate states)" if inner else "")
        return (f"not a DEQ ({type(self.model).__name__}){seen}: attacked with its own gradient (autograd) only, on its "
                "final output; not available: the exact, phantom, simultaneous-adjoint and unrolled gradients, "
                "the gradient ensembles and the early-exit and ensemble defenses. For the full white-box protocol "
                "wrap it as deqrobust.DEQClassifier(stem, f, head) or DEQClassifier.from_torchdeq(...)")

    # ------------------------------------------------------------------ sources
    def sources(self, names: Optional[Sequence[str]] = None, both_pairings: bool = False) -> list[GradientSource]:
        """Every gradient source (or the listed ones, validated); ``both_pairings`` adds the
        adjoint's fresh pairing (``adjoint:n:fresh``)."""
        if not self.is_deq:
            if names and any(str(n) != AUTOGRAD for n in names):
                raise ConfigError("a plain (non-DEQ) network has only its own gradient ('autograd'); "
                                  f"got {', '.join(map(str, names))}")
            return [GradientSource(AUTOGRAD)]
        if names is None:
            return all_sources(self.n_states, PAIRINGS if both_pairings else ("literal",))
        return [GradientSource.parse(n, self.n_states) for n in names]

    def source(self, name: str) -> Optional[GradientSource]:
        """Parse one source name; ``"none"`` (a gradient-free attack) is ``None``."""
        if name == "none":
            return None
        return self.sources([name])[0]

    def own_gradient(self, defense: Union[str, Defense]) -> Optional[GradientSource]:
        """The exact input gradient of ``defense``'s own output, where one source is it: the
        unrolled estimator at n for ``early:n`` (backpropagation through the n steps it runs), the
        exact implicit gradient for ``final``; ``None`` for an ensemble or a plain network.

        Example:
            >>> from deqrobust.defenses import Defense
            >>> class Deq:  # what is read: the number of states
            ...     n_states = 8
            >>> target = AttackTarget.__new__(AttackTarget); target.deq, target.is_deq = Deq(), True
            >>> str(target.own_gradient("early:3")), str(target.own_gradient("final")), target.own_gradient("ensemble")
            ('unrolled:3', 'exact', None)
        """
        if self.deq is None:
            return None
        parsed = Defense.parse(defense, self.n_states)
        if parsed.kind == "early":
            return GradientSource("unrolled", parsed.step)
        return GradientSource("exact") if parsed.kind == "final" else None

    # ------------------------------------------------------------------ defenses
    def validate_defenses(self, requested: Optional[Sequence[str]]) -> None:
        """Reject a bad defense name before any compute, listing the valid ones."""
        for name in requested or ():
            if not self.is_deq:
                if name != "final":
                    raise ConfigError(f"a plain (non-DEQ) network has only the 'final' defense, got {name!r}")
            elif name != "early":
                try:
                    parsed = Defense.parse(name, self.n_states)
                except ConfigError as err:
                    if str(name).strip().lower().startswith("entropy"):  # its own message names the problem
                        raise
                    raise ConfigError(f"invalid defense {name!r}; valid: final, early (chosen on dev), early:<n> "
                                      f"(1 <= n <= {self.n_states}), ensemble, ensemble:trajectory, "
                                      f"entropy[(options)][:final|:early:<n>] (input entropy reduction)") from err
                if parsed.purify is not None and self.deq is not None:
                    check_purifiable(self.deq)

    def wants_early_exit_selection(self, requested: Optional[Sequence[str]]) -> bool:
        return self.is_deq and (requested is None or "early" in requested)

    def defenses(self, requested: Optional[Sequence[str]], early_states: Sequence[int] = ()) -> list[Defense]:
        """The defenses to evaluate: ``early`` expands to the states the dev selection chose."""
        self.validate_defenses(requested)
        if not self.is_deq:
            return [Defense("final")]
        names: list[str] = []
        for d in requested or ("final", "early", "ensemble"):
            if d == "early":
                if not early_states:
                    raise ConfigError("'early' needs the dev selection; give early:<n> explicitly")
                names += [f"early:{n}" for n in early_states if f"early:{n}" not in names]
            elif d not in names:
                names.append(d)
        parsed = [Defense.parse(name, self.n_states) for name in names]
        # a purified defense is judged against its static twin (the transfer column): evaluated too, before it
        out: list[Defense] = []
        for defense in parsed:
            if defense.purify is not None and defense.static not in parsed and defense.static not in out:
                out.append(defense.static)
            out.append(defense)
        return out

    # ------------------------------------------------------------------ forward passes
    def logits(self, x: Tensor, defense: Union[str, Defense]) -> Tensor:
        """The defended logits, without autograd."""
        with torch.no_grad():
            return defended_logits(self.deq, x, defense) if self.deq is not None else self.model(x)

    def attack_model(self, defense: Union[str, Defense], source: Optional[GradientSource],
                     settings: EstimatorSettings, purification: PurificationGradient = "bpda") -> Callable[[Tensor], Tensor]:
        """What an attack calls: defended logits forward, ``source``'s gradient backward (against a
        purified defense, treating the purification as ``purification`` says)."""
        if self.deq is None:
            return self.model
        if source is None:  # a gradient-free attack queries the defended output only
            return lambda x: self.logits(x, defense)
        return attackable(self.deq, defense, source, adjoint_beta=settings.adjoint_beta, unroll=settings.unroll,
                          ensemble_weights=settings.ensemble_weights, purification=purification)

    def residuals(self, x: Tensor, batch_size: int) -> dict[str, Any]:
        """Relative residual ``r(z_n)`` per state on clean inputs (paper Fig. 2b); ``{}`` for a plain network."""
        if self.deq is None:
            return {}
        traces, steps = [], []
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                solve = self.deq.solve(x[start : start + batch_size])
                traces.append(solve.info.rel_trace.float().cpu())
                steps.append(solve.info.nstep.float().cpu())
        rel = torch.cat(traces)
        finite = torch.where(torch.isfinite(rel), rel, torch.full_like(rel, float("nan")))
        return {
            "states": list(range(rel.shape[1])),
            "rel_mean": torch.nanmean(finite, dim=0).tolist(),
            "rel_median": torch.nanmedian(finite, dim=0).values.tolist(),
            "rel_max": torch.nan_to_num(finite, nan=float("inf")).amax(dim=0).tolist(),
            "mean_nstep": torch.cat(steps).mean().item(),
            "n_examples": int(rel.shape[0]),
        }

    def describe(self) -> dict[str, Any]:
        """Architecture and solver settings, for the results JSON."""
        model = self.model
        info: dict[str, Any] = {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                                "is_deq": self.is_deq}
        if self.is_deq:
            info.update({k: getattr(model, k) for k in (
                "f_solver", "f_max_iter", "f_tol", "f_stop_mode", "b_solver", "b_max_iter", "b_tol", "grad",
                "phantom_steps", "phantom_damping", "phantom_undamped_first")})
        return info
