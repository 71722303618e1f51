"""From TorchDEQ: the parts of a TorchDEQ model and its ``DEQBase`` settings, as a :class:`DEQClassifier`.

TorchDEQ (``torchdeq.get_deq(...)``) keeps a DEQ's settings on its ``DEQBase`` object and its
per-call solver options in ``forward(solver_kwargs=...)``. :meth:`DEQClassifier.from_torchdeq` maps both to ours
and refuses any setting it cannot honour, naming it. Models that use ``torchdeq.norm`` (weight or
spectral norm) and ``torchdeq.dropout`` get the resets TorchDEQ requires: ``reset_norm`` before
every solve (computed without a graph: the weights are constants under attack) and
``reset_dropout`` before every forward pass.

Known differences (measured in ``tests/core/test_torchdeq.py``): TorchDEQ stops a batch when its
worst sample converges, we stop each sample on its own; TorchDEQ's fixed-point and Anderson solvers
return ``f`` of their best iterate, Broyden the iterate itself, we the lowest-residual iterate. At a
converged fixed point these agree to the solver tolerance.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ..errors import ConfigError

SOLVER_NAMES = {"fixed_point_iter": "fixed_point", "anderson_solver": "anderson", "broyden_solver": "broyden"}
# DEQBase settings we read (every other key in ``deq.args`` is an error naming it).
KNOWN_ARGS = {"core", "f_solver", "b_solver", "no_stat", "f_max_iter", "b_max_iter", "f_tol", "b_tol", "f_stop_mode",
              "b_stop_mode", "eval_factor", "eval_f_max_iter", "ift", "hook_ift", "grad", "tau", "sup_gap", "sup_loc",
              "n_states", "indexing"}
# TorchDEQ solver keyword -> ours, per solver.
SOLVER_KWARGS = {"fixed_point": {"tau": "damping"}, "anderson": {"m": "m", "lam": "lam", "tau": "beta"},
                 "broyden": {"LBFGS_thres": "memory"}}


class TorchDEQFunction(nn.Module):
    """A TorchDEQ ``f(z, injection)`` with the resets TorchDEQ requires, in the form
    :class:`DEQClassifier` calls (``refresh_weights`` before each solve, ``reset_dropout`` before
    each forward, ``init_state`` for ``z_0``)."""

    def __init__(self, f: nn.Module, z_init: Optional[Callable[[Any], Any]] = None) -> None:
        super().__init__()
        self.inner = f
        self._z_init = z_init

    def forward(self, z: Any, e: Any) -> Any:
        return self.inner(z, e)

    def init_state(self, e: Any) -> Any:
        if self._z_init is not None:
            return self._z_init(e)
        if isinstance(e, torch.Tensor):
            return torch.zeros_like(e)
        raise ConfigError("the injection is not a tensor: pass z_init=... to from_torchdeq to build z_0 from it")

    def refresh_weights(self) -> None:
        from torchdeq.norm import reset_norm

        with torch.no_grad():
            reset_norm(self.inner)

    def reset_dropout(self) -> None:
        from torchdeq.dropout import reset_dropout

        reset_dropout(self.inner)


def settings_from_torchdeq(deq: Any, solver_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Our :class:`DEQClassifier` settings for a TorchDEQ ``DEQBase`` (and the ``solver_kwargs`` its
    forward is called with); a setting with no equivalent is a :class:`ConfigError` naming it.

    Example:
        >>> from torchdeq import get_deq
        >>> deq = get_deq(core="indexing", f_solver="anderson", f_max_iter=12, ift=True, b_max_iter=20)
        >>> s = settings_from_torchdeq(deq, {"m": 4})
        >>> s["f_solver"], s["f_max_iter"], s["grad"], s["f_solver_options"], s["b_max_iter"]
        ('anderson', 12, 'exact', {'m': 4}, 20)
    """
    args = dict(getattr(deq, "args").config) if hasattr(deq, "args") else {}
    unknown = sorted(set(args) - KNOWN_ARGS)
    if unknown:
        raise ConfigError(f"TorchDEQ setting(s) {', '.join(map(repr, unknown))} have no deqrobust equivalent "
                          f"(TorchDEQ ignores unknown keys silently; we do not); known: {', '.join(sorted(KNOWN_ARGS))}")

    def refuse(name: str, why: str) -> None:
        raise ConfigError(f"TorchDEQ setting {name} has no deqrobust equivalent: {why}")

    def solver_name(fn: Any, which: str) -> str:
        name = getattr(fn, "__name__", str(fn))
        if name not in SOLVER_NAMES:
            refuse(f"{which}={name!r}", f"supported solvers: {', '.join(SOLVER_NAMES)}")
        return SOLVER_NAMES[name]

    f_solver, b_solver = solver_name(deq.f_solver, "f_solver"), solver_name(deq.b_solver, "b_solver")
    if deq.b_stop_mode != deq.f_stop_mode:
        refuse(f"b_stop_mode={deq.b_stop_mode!r}", f"one stop mode serves both solvers here (f_stop_mode={deq.f_stop_mode!r})")
    if args.get("hook_ift"):
        refuse("hook_ift=True", "its Jacobian is taken at z*, ift's at f(z*); use ift=True")
    n_states, indexing = args.get("n_states", 1), args.get("indexing") or []
    if n_states > 1 or indexing:
        refuse(f"n_states={n_states}, indexing={indexing}", "several supervised states; deqrobust's DEQ has one output "
               "(its intermediate states are what the protocol attacks)")
    if args.get("sup_gap", -1) > 0 or args.get("sup_loc"):
        refuse("sup_gap/sup_loc", "phantom-gradient supervision of several unrolled states")
    grad = args.get("grad", 1)
    if isinstance(grad, (list, tuple)):
        if len(grad) != 1:
            refuse(f"grad={grad}", "one phantom-gradient step count per model")
        grad = grad[0]
    settings: dict[str, Any] = {
        "f_solver": f_solver,
        "f_max_iter": int(deq.eval_f_max_iter),  # the iterations TorchDEQ uses at test time, i.e. when attacked
        "f_tol": float(deq.f_tol),
        "f_stop_mode": deq.f_stop_mode,
        "b_solver": b_solver,
        "b_max_iter": int(deq.b_max_iter),
        "b_tol": float(deq.b_tol),
    }
    if args.get("ift"):
        settings["grad"] = "exact"
    else:
        settings.update(grad="phantom", phantom_steps=int(grad), phantom_damping=float(args.get("tau", 1.0)),
                        phantom_undamped_first=False)
    options: dict[str, Any] = {}
    for key, value in dict(solver_kwargs or {}).items():
        if key == "return_final":
            settings["f_return"] = "last" if value else "lowest"
        elif key == "f_max_iter":
            settings["f_max_iter"] = int(value)
        elif key in SOLVER_KWARGS[f_solver]:
            if f_solver == "fixed_point" and float(value) == 1.0:
                continue
            options[SOLVER_KWARGS[f_solver][key]] = value
        else:
            valid = ", ".join(["return_final", "f_max_iter", *SOLVER_KWARGS[f_solver]])
            refuse(f"solver_kwargs[{key!r}]", f"for {f_solver} the ones that map are: {valid}")
    if options:
        settings["f_solver_options"] = options
    return settings

