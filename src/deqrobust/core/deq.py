"""The DEQ classifier: ``logits = head(z*)`` with ``z* = f(z*, stem(x))`` found by a solver."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, DEQInputError, DivergenceError
from ..solvers import SOLVER_OPTIONS, SOLVERS, SolverInfo, get_solver
from ..solvers.tracker import Callbacks, validate_options
from .implicit import exact_output
from .jacobian import jacobian_frobenius_loss
from .phantom import phantom_output
from .state import StateSpec

GRAD_MODES = ("exact", "phantom")
DIVERGENCE_POLICIES = ("nan", "raise", "ignore")
RETURN_MODES = ("lowest", "last")


@dataclass
class Solve:
    """A finished forward solve: flat fixed point, its statistics, the injection and the state layout."""

    z_star: Tensor
    info: SolverInfo
    injection: Any
    spec: StateSpec


@dataclass
class DEQOutput:
    """``forward_with_info`` result: logits, the gradient-carrying output state and diagnostics."""

    logits: Tensor
    z_out: Tensor
    info: SolverInfo
    jac_loss: Optional[Tensor] = None


class DEQClassifier(nn.Module):
    """A deep equilibrium classifier ``x -> stem -> solve z = f(z, e) -> head``.

    The solver runs without autograd; gradients come from ``grad``:

    * ``"exact"``: output ``f(z*, e)``; its backward solves ``u = J_f(z*)ᵀ u + c`` with the
      backward solver (``b_solver``, ``b_max_iter``, ``b_tol``).
    * ``"phantom"``: output ``ẑ_k`` of ``phantom_steps`` damped steps (``phantom_damping``, optional
      ``phantom_undamped_first``) from the detached ``z*``; autograd through them.

    Both give input gradients in eval mode, so attacks see the model's real gradient.

    Args:
        stem: ``x -> e`` (the injection; a tensor or a tuple of tensors).
        f: module called as ``f(z, e)``; ``z`` is a tensor or a list of tensors. If it has
            ``init_state(e)`` that gives ``z_0``, else ``z_0 = zeros_like(e)``.
        head: ``z -> logits``.
        f_solver, f_max_iter, f_tol, f_stop_mode: forward solver (TorchDEQ's names).
        f_return: ``"lowest"`` residual iterate (default, as TorchDEQ) or ``"last"``.
        f_solver_options: extra solver options (``memory`` for Broyden, ``m``/``lam``/``beta``
            for Anderson, ``damping`` for fixed point); unknown keys are an error.
        b_solver, b_max_iter, b_tol, b_solver_options: backward solver of the exact gradient.
        grad: ``"exact"`` or ``"phantom"``.
        phantom_steps, phantom_damping, phantom_undamped_first: the phantom unroll.
        on_divergence: per-sample policy when the forward solver diverges: ``"nan"`` (default;
            those samples get NaN logits, so evaluation counts them as errors), ``"raise"``, or
            ``"ignore"`` (keep the lowest-residual iterate; ``info.diverged`` still flags it).
        input_shape: expected per-sample input shape, ``None`` entries free, e.g. ``(3, None, None)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class F(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.lin = nn.Linear(4, 4)
        ...     def forward(self, z, e):
        ...         return torch.tanh(0.5 * self.lin(z) + e)
        >>> model = DEQClassifier(nn.Linear(2, 4), F(), nn.Linear(4, 3), f_max_iter=20, grad="exact")
        >>> model.forward(torch.randn(5, 2)).shape
        torch.Size([5, 3])
    """

    def __init__(
        self,
        stem: nn.Module,
        f: nn.Module,
        head: nn.Module,
        *,
        f_solver: str = "broyden",
        f_max_iter: int = 30,
        f_tol: float = 1e-3,
        f_stop_mode: str = "rel",
        f_return: str = "lowest",
        f_solver_options: Optional[dict] = None,
        b_solver: str = "broyden",
        b_max_iter: int = 30,
        b_tol: float = 1e-6,
        b_solver_options: Optional[dict] = None,
        grad: str = "exact",
        phantom_steps: int = 5,
        phantom_damping: float = 0.5,
        phantom_undamped_first: bool = False,
        on_divergence: str = "nan",
        input_shape: Optional[Sequence[Optional[int]]] = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            valid = [name for name in inspect.signature(DEQClassifier.__init__).parameters
                     if name not in ("self", "stem", "f", "head", "unknown")]
            raise ConfigError(f"unknown DEQClassifier setting(s) {', '.join(map(repr, sorted(unknown)))}; "
                              f"valid: {', '.join(valid)}")
        super().__init__()
        self.stem, self.f, self.head = stem, f, head
        self.f_solver, self.f_max_iter, self.f_tol, self.f_stop_mode = f_solver, f_max_iter, f_tol, f_stop_mode
        self.f_return = f_return
        self.f_solver_options = dict(f_solver_options or {})
        self.b_solver, self.b_max_iter, self.b_tol = b_solver, b_max_iter, b_tol
        self.b_solver_options = dict(b_solver_options or {})
        self.grad = grad
        self.phantom_steps, self.phantom_damping = phantom_steps, phantom_damping
        self.phantom_undamped_first = phantom_undamped_first
        self.on_divergence = on_divergence
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.validate_settings()

    @classmethod
    def from_torchdeq(cls, stem: nn.Module, f: nn.Module, head: nn.Module, deq: Any, *,
                      solver_kwargs: Optional[dict] = None, z_init: Optional[Callable[[Any], Any]] = None,
                      input_shape: Optional[Sequence[Optional[int]]] = None, **overrides: Any) -> "DEQClassifier":
        """A DEQ built with TorchDEQ: ``stem``, ``f(z, e)``, ``head`` and the ``DEQBase`` object that
        ``torchdeq.get_deq(...)`` returned.

        Its settings map to ours — solvers (``fixed_point_iter`` → ``fixed_point``, ``anderson``,
        ``broyden``), ``f_max_iter`` (TorchDEQ's test-time ``eval_f_max_iter``), ``f_tol``,
        ``f_stop_mode``, ``b_*``, ``ift`` → the exact gradient, ``grad=k`` / ``tau`` → phantom steps
        and damping; ``solver_kwargs`` (what its forward is called with, e.g. Anderson's ``m``) map
        to ``f_solver_options``. A setting with no equivalent is an error naming it. Models using
        ``torchdeq.norm`` and ``torchdeq.dropout`` get ``reset_norm`` before every solve and
        ``reset_dropout`` before every forward. ``z_init(e)`` builds ``z_0`` (default: zeros like
        ``e``); ``overrides`` replace mapped settings (e.g. ``on_divergence="raise"``).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from torchdeq import get_deq
            >>> class F(nn.Module):
            ...     def __init__(self): super().__init__(); self.lin = nn.Linear(4, 4)
            ...     def forward(self, z, e): return torch.tanh(0.5 * self.lin(z) + e)
            >>> deq = get_deq(core="indexing", f_solver="broyden", f_max_iter=20, ift=True)
            >>> model = DEQClassifier.from_torchdeq(nn.Linear(3, 4), F(), nn.Linear(4, 2), deq).eval()
            >>> model.f_solver, model.f_max_iter, model.grad, model(torch.randn(5, 3)).shape
            ('broyden', 20, 'exact', torch.Size([5, 2]))
        """
        from .torchdeq import TorchDEQFunction, settings_from_torchdeq

        settings = settings_from_torchdeq(deq, solver_kwargs)
        settings.update(overrides)
        return cls(stem, TorchDEQFunction(f, z_init), head, input_shape=input_shape, **settings)

    # ------------------------------------------------------------------ settings
    def validate_settings(self) -> None:
        """Check every solver/gradient setting; raise :class:`ConfigError` naming the bad one."""

        def choice(name: str, value: str, valid: Sequence[str]) -> None:
            if value not in valid:
                raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")

        choice("f_solver", self.f_solver, tuple(SOLVERS))
        choice("b_solver", self.b_solver, tuple(SOLVERS))
        choice("f_stop_mode", self.f_stop_mode, ("abs", "rel"))
        choice("f_return", self.f_return, RETURN_MODES)
        choice("grad", self.grad, GRAD_MODES)
        choice("on_divergence", self.on_divergence, DIVERGENCE_POLICIES)
        for name in ("f_max_iter", "b_max_iter"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.phantom_steps < 0:
            raise ConfigError(f"phantom_steps must be >= 0, got {self.phantom_steps}")
        if not 0.0 < self.phantom_damping <= 1.0:
            raise ConfigError(f"phantom_damping must be in (0, 1], got {self.phantom_damping}")
        for solver, options in ((self.f_solver, self.f_solver_options), (self.b_solver, self.b_solver_options)):
            validate_options(solver, options, SOLVER_OPTIONS[solver])

    @property
    def n_states(self) -> int:
        """N, the number of forward solver steps (states z_1..z_N)."""
        return self.f_max_iter

    # ------------------------------------------------------------------ building blocks
    def validate_input(self, x: Tensor) -> None:
        """Raise :class:`DEQInputError` for a non-tensor, wrong shape, wrong dtype or non-finite input."""
        if not isinstance(x, Tensor):
            raise DEQInputError(f"expected a torch.Tensor input, got {type(x).__name__}")
        if not x.is_floating_point():
            raise DEQInputError(f"expected a floating-point input, got dtype {x.dtype}")
        if self.input_shape is not None:
            expected = self.input_shape
            ok = x.dim() == len(expected) + 1 and all(
                e is None or e == s for e, s in zip(expected, x.shape[1:])
            )
            if not ok:
                shape = ", ".join("*" if e is None else str(e) for e in expected)
                raise DEQInputError(f"expected input of shape (B, {shape}), got {tuple(x.shape)}")
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1) if x.dim() > 0 and x.shape[0] else None
        if bad is not None and bool(bad.any()):
            idx = bad.nonzero().flatten()[:8].tolist()
            raise DEQInputError(f"input contains NaN or Inf (samples {idx}{'…' if int(bad.sum()) > 8 else ''})")

    def injection(self, x: Tensor) -> Any:
        """``e = stem(x)`` after input validation."""
        self.validate_input(x)
        return self.stem(x)

    def initial_state(self, e: Any) -> Any:
        own_init = getattr(self.f, "init_state", None)
        if callable(own_init):
            return own_init(e)
        if isinstance(e, Tensor):
            return torch.zeros_like(e)
        raise ConfigError("f has no init_state(e) and the injection is not a tensor; give f an init_state method")

    def flat_f(self, e: Any, spec: StateSpec) -> Callable[[Tensor], Tensor]:
        """``f`` on flattened states with the injection bound."""

        def f(z: Tensor) -> Tensor:
            out = self.f(spec.unflatten(z), e)
            return spec.flatten(out).to(z.dtype)

        return f

    def logits_from_state(self, z: Tensor, spec: StateSpec) -> Tensor:
        return self.head(spec.unflatten(z))

    def reset_dropout(self) -> None:
        """Draw new variational-dropout masks (one mask per forward, reused at every iteration).

        An ``f`` with its own ``reset_dropout()`` (e.g. a TorchDEQ model, :meth:`from_torchdeq`)
        resets itself; otherwise every submodule's ``reset_mask()`` is called."""
        own = getattr(self.f, "reset_dropout", None)
        if callable(own):
            own()
            return
        for module in self.f.modules():
            reset = getattr(module, "reset_mask", None)
            if callable(reset):
                reset()

    @contextlib.contextmanager
    def cached_weights(self) -> Iterator[None]:
        """Compute weight-normalised weights once per solve instead of at every iteration."""
        with parametrize.cached():
            yield

    # ------------------------------------------------------------------ solving
    def solve(
        self,
        x: Optional[Tensor] = None,
        *,
        injection: Any = None,
        max_iter: Optional[int] = None,
        trace: bool = False,
        callback: Callbacks = None,
        stop_early: bool = True,
        f_override: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> Solve:
        """Run the forward solver without autograd and return :class:`Solve`.

        Give ``x`` or a precomputed ``injection``. ``max_iter`` defaults to ``f_max_iter``;
        a shorter solve reproduces the first states of a longer one exactly. ``f_override``
        replaces the flat map (used by the simultaneous adjoint to keep a graph per step).
        """
        refresh = getattr(self.f, "refresh_weights", None)
        if callable(refresh):  # e.g. TorchDEQ's reset_norm: normalised weights computed once per solve
            refresh()
        if injection is None:
            if x is None:
                raise ValueError("solve() needs x or injection")
            with torch.no_grad():
                injection = self.injection(x)
        with torch.no_grad():
            z0 = self.initial_state(injection)
            spec = StateSpec.of(z0)
            f = f_override if f_override is not None else self.flat_f(injection, spec)
            solver = get_solver(self.f_solver)
            z_star, info = solver(
                f,
                spec.flatten(z0),
                max_iter=max_iter or self.f_max_iter,
                tol=self.f_tol,
                stop_mode=self.f_stop_mode,
                trace=trace,
                callback=callback,
                return_final=self.f_return == "last",
                stop_early=stop_early,
                **self.f_solver_options,
            )
        return Solve(z_star, info, injection, spec)

    def output_state(self, solve: Solve, injection: Any = None, grad: Optional[str] = None) -> Tensor:
        """The final output state from ``z*`` carrying the gradient of ``grad`` (default: the model's)."""
        e = solve.injection if injection is None else injection
        f = self.flat_f(e, solve.spec)
        mode = grad or self.grad
        if mode == "exact":
            return exact_output(
                f, solve.z_star, self.b_solver, self.b_max_iter, self.b_tol, self.f_stop_mode, self.b_solver_options
            )
        if mode == "phantom":
            return phantom_output(f, solve.z_star, self.phantom_steps, self.phantom_damping, self.phantom_undamped_first)
        raise ConfigError(f"unknown grad {mode!r}; valid: {', '.join(GRAD_MODES)}")

    def apply_divergence_policy(self, z: Tensor, info: SolverInfo) -> Tensor:
        diverged = info.diverged
        if not bool(diverged.any()) or self.on_divergence == "ignore":
            return z
        if self.on_divergence == "raise":
            idx = diverged.nonzero().flatten()[:8].tolist()
            raise DivergenceError(
                f"forward solver {self.f_solver!r} diverged on {int(diverged.sum())} of {len(diverged)} samples "
                f"(e.g. {idx}); lower the learning rate, add Jacobian regularisation, or raise f_max_iter"
            )
        return torch.where(diverged.unsqueeze(1), torch.full_like(z, float("nan")), z)

    # ------------------------------------------------------------------ forward passes
    def forward_with_info(self, x: Tensor, *, jac_loss: bool = False, max_iter: Optional[int] = None) -> DEQOutput:
        """Forward pass returning logits, the output state, solver info and (optionally) the Jacobian loss."""
        self.reset_dropout()
        e = self.injection(x)
        with self.cached_weights():
            solve = self.solve(injection=e, max_iter=max_iter)
        z_out = self.output_state(solve, e)
        z_out = self.apply_divergence_policy(z_out, solve.info)
        logits = self.logits_from_state(z_out, solve.spec)
        loss = jacobian_frobenius_loss(self.flat_f(e, solve.spec), solve.z_star) if jac_loss else None
        return DEQOutput(logits, z_out, solve.info, loss)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the final output state (the ``final`` defense)."""
        return self.forward_with_info(x).logits

    def unrolled_forward(self, x: Tensor, layers: int) -> Tensor:
        """Weight-tied explicit network ``z_{l} = f(z_{l-1}, e)``, l = 1..layers (clean pretraining, as MDEQ)."""
        if layers < 1:
            raise ConfigError(f"unrolled layers must be >= 1, got {layers}")
        self.reset_dropout()
        e = self.injection(x)
        z0 = self.initial_state(e)
        spec = StateSpec.of(z0)
        f = self.flat_f(e, spec)
        z = spec.flatten(z0)
        for _ in range(layers):
            z = f(z)
        return self.logits_from_state(z, spec)

    def extra_repr(self) -> str:
        return (
            f"f_solver={self.f_solver!r}, f_max_iter={self.f_max_iter}, f_tol={self.f_tol}, "
            f"b_solver={self.b_solver!r}, b_max_iter={self.b_max_iter}, grad={self.grad!r}"
        )
