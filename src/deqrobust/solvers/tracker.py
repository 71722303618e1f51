"""Bookkeeping shared by every solver: residuals, per-sample stopping, lowest iterate, divergence.

A solver only proposes the next iterate; :class:`SolveTracker` evaluates ``f`` there, freezes the
samples that have stopped, records residuals and calls the callbacks. All of it is per sample, so a
sample's trajectory never depends on which other samples share its batch.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import ConfigError
from .info import SolverInfo, SolverStep, batch_norm, negative_identity

StepCallback = Callable[[SolverStep], None]
Callbacks = Union[None, StepCallback, Sequence[StepCallback]]

STOP_MODES = ("abs", "rel")


def _as_list(callback: Callbacks) -> list[StepCallback]:
    if callback is None:
        return []
    if callable(callback):
        return [callback]
    return list(callback)


class SolveTracker:
    """Runs the shared part of a solve. Solvers call :meth:`step` with their proposal.

    Args:
        f: map on flattened states, (B, D) -> (B, D).
        z0: initial guess (B, D).
        max_iter: number of steps N (states z_1..z_N).
        tol: per-sample stopping threshold on the ``stop_mode`` residual (0 never stops early).
        stop_mode: ``"rel"`` or ``"abs"``.
        trace: keep the raw iterates z_1..z_N in ``info.states``.
        callback: callable(s) receiving a :class:`SolverStep` after every step (and for n = 0).
        return_final: return the last raw iterate instead of the lowest-residual one.
        div_factor: a sample whose absolute residual exceeds ``div_factor`` times its initial one
            (or that turns non-finite) is marked diverged and frozen.
        stop_early: stop the whole loop once every sample has stopped (the remaining steps are
            then reported as repeats of the frozen states, without evaluating ``f``).
    """

    def __init__(
        self,
        f: Callable[[Tensor], Tensor],
        z0: Tensor,
        max_iter: int,
        tol: float,
        stop_mode: str = "rel",
        trace: bool = False,
        callback: Callbacks = None,
        return_final: bool = False,
        div_factor: float = 1e4,
        stop_early: bool = True,
    ) -> None:
        if stop_mode not in STOP_MODES:
            raise ValueError(f"unknown stop_mode {stop_mode!r}; valid: {', '.join(STOP_MODES)}")
        if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        if not (tol >= 0):
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        if z0.dim() != 2:
            raise ValueError(f"solvers work on flattened states of shape (B, D); got shape {tuple(z0.shape)}")
        self.f = f
        self.max_iter = max_iter
        self.tol = float(tol)
        self.stop_mode = stop_mode
        self.return_final = return_final
        self.div_factor = float(div_factor)
        self.stop_early = stop_early
        self.callbacks = _as_list(callback)
        self.states: Optional[list[Tensor]] = [] if trace else None
        self.inverse_jacobian_t: Callable[[Tensor], Tensor] = negative_identity

        bsz = z0.shape[0]
        device = z0.device
        self.n = 0
        self.z = z0
        self.fz = self._evaluate(z0)
        self.g = self.fz - self.z
        abs_res, rel_res, finite = self._residuals(self.g, self.fz)
        self.abs_scale = torch.nan_to_num(abs_res, nan=0.0, posinf=0.0).clamp_min(1e-8)
        self.abs_traces = [abs_res]
        self.rel_traces = [rel_res]
        self.diverged = ~finite
        self.converged = torch.zeros(bsz, dtype=torch.bool, device=device)
        self._set_active(finite.clone())
        self.nstep = torch.zeros(bsz, dtype=torch.long, device=device)
        self.lowest_z = z0.clone()
        self.lowest_abs = torch.full((bsz,), float("inf"), dtype=z0.dtype, device=device)
        self.lowest_rel = torch.full_like(self.lowest_abs, float("inf"))
        self.lowest_step = torch.zeros(bsz, dtype=torch.long, device=device)
        self._notify(evaluated=True)

    def _set_active(self, active: Tensor) -> None:
        self.active = active
        self.all_active = bool(active.all())  # one host sync per step, reused by every fast path
        self.any_active = self.all_active or bool(active.any())

    # ------------------------------------------------------------------ helpers
    def _evaluate(self, z: Tensor) -> Tensor:
        fz = self.f(z)
        if fz.shape != z.shape:
            raise ValueError(f"f changed the state's shape: {tuple(z.shape)} -> {tuple(fz.shape)}")
        return fz

    @staticmethod
    def _residuals(g: Tensor, fz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Absolute and relative residuals and finiteness, from per-sample norms only: a non-finite
        entry in ``z`` or ``f(z)`` makes ``||f(z) - z||`` or ``||f(z)||`` non-finite."""
        abs_res = batch_norm(g)
        fz_norm = batch_norm(fz)
        finite = torch.isfinite(abs_res) & torch.isfinite(fz_norm)
        return abs_res, abs_res / (fz_norm + 1e-9), finite

    def _notify(self, evaluated: bool) -> None:
        if not self.callbacks:
            return
        step = SolverStep(self.n, self.z, self.fz, self.active, self.inverse_jacobian_t, evaluated)
        for callback in self.callbacks:
            callback(step)

    # ------------------------------------------------------------------ public
    def running(self) -> bool:
        if self.n >= self.max_iter:
            return False
        return self.any_active or not self.stop_early

    def step(self, z_next: Tensor) -> None:
        """Accept the proposal for the active samples, evaluate f, record and notify."""
        self.advance(z_next)
        self.notify()

    def notify(self) -> None:
        """Hand the current step to the callbacks (solvers with extra state call it after updating it)."""
        self._notify(evaluated=True)

    def advance(self, z_next: Tensor) -> None:
        """Accept the proposal for the active samples, evaluate f there and record residuals."""
        self.n += 1
        active = self.active
        all_active = self.all_active
        keep = active.unsqueeze(1)
        z_new = z_next if all_active else torch.where(keep, z_next, self.z)
        fz_new = self._evaluate(z_new)
        if not all_active:
            fz_new = torch.where(keep, fz_new, self.fz)
        g_new = fz_new - z_new
        abs_res, rel_res, finite = self._residuals(g_new, fz_new)
        if not all_active:  # frozen samples keep their last residual (identical values; avoids NaN noise)
            abs_res = torch.where(active, abs_res, self.abs_traces[-1])
            rel_res = torch.where(active, rel_res, self.rel_traces[-1])

        diverged_now = active & (~finite | (abs_res > self.div_factor * self.abs_scale))
        healthy = active & ~diverged_now
        residual = rel_res if self.stop_mode == "rel" else abs_res
        lowest = self.lowest_rel if self.stop_mode == "rel" else self.lowest_abs
        better = healthy & (residual < lowest)
        # Updated in place: one preallocated state whatever N and however residuals fluctuate.
        if bool(better.all()):
            self.lowest_z.copy_(z_new)
        elif bool(better.any()):
            torch.where(better.unsqueeze(1), z_new, self.lowest_z, out=self.lowest_z)
        self.lowest_abs = torch.where(better, abs_res, self.lowest_abs)
        self.lowest_rel = torch.where(better, rel_res, self.lowest_rel)
        self.lowest_step = torch.where(better, torch.full_like(self.lowest_step, self.n), self.lowest_step)

        converged_now = healthy & (residual < self.tol)
        self.nstep = torch.where(active, torch.full_like(self.nstep, self.n), self.nstep)
        self.diverged = self.diverged | diverged_now
        self.converged = self.converged | converged_now
        self._set_active(active & ~diverged_now & ~converged_now)

        self.z, self.fz, self.g = z_new, fz_new, g_new
        self.abs_traces.append(abs_res)
        self.rel_traces.append(rel_res)
        if self.states is not None:
            self.states.append(z_new)
    def finish(self) -> tuple[Tensor, SolverInfo]:
        """Pad the steps skipped by an early stop with the frozen states; return ``(z, info)``."""
        while self.n < self.max_iter:
            self.n += 1
            self.abs_traces.append(self.abs_traces[-1])
            self.rel_traces.append(self.rel_traces[-1])
            if self.states is not None:
                self.states.append(self.z)
            self._notify(evaluated=False)
        never_improved = torch.isinf(self.lowest_abs if self.stop_mode == "abs" else self.lowest_rel)
        lowest_z = torch.where(never_improved.unsqueeze(1), self.z, self.lowest_z)
        z_out = self.z if self.return_final else lowest_z
        info = SolverInfo(
            nstep=self.nstep,
            abs_trace=torch.stack(self.abs_traces, dim=1),
            rel_trace=torch.stack(self.rel_traces, dim=1),
            abs_lowest=torch.where(never_improved, self.abs_traces[-1], self.lowest_abs),
            rel_lowest=torch.where(never_improved, self.rel_traces[-1], self.lowest_rel),
            lowest_step=self.lowest_step,
            converged=self.converged,
            diverged=self.diverged,
            stop_mode=self.stop_mode,
            max_iter=self.max_iter,
            states=self.states,
        )
        return z_out, info


def validate_options(solver: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Raise a clear error for solver options the solver does not know."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for solver {solver!r}; "
            f"valid options: {', '.join(sorted(valid)) or '(none)'}"
        )
