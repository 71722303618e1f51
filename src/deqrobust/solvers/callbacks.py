"""Consumers of the trajectory that run while the solver runs, so defenses need O(1) memory in N.

Pass one or several to a solver's ``callback=``. Each sees every :class:`SolverStep`; the initial
guess (n = 0) is never a "state" and is ignored.
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import Tensor

from .info import SolverStep


class KeepStates:
    """Keep the raw iterates ``z_n`` for the given 1-based steps (all steps when ``steps`` is None).

    Example:
        >>> import torch
        >>> from deqrobust.solvers import fixed_point
        >>> keep = KeepStates([2])
        >>> _ = fixed_point(lambda z: 0.5 * z + 1, torch.zeros(1, 1), max_iter=3, tol=0, callback=keep)
        >>> keep.states[2].item()
        1.5
    """

    def __init__(self, steps: Optional[Iterable[int]] = None) -> None:
        self.steps = None if steps is None else set(int(s) for s in steps)
        self.states: dict[int, Tensor] = {}

    def __call__(self, step: SolverStep) -> None:
        if step.n >= 1 and (self.steps is None or step.n in self.steps):
            self.states[step.n] = step.z


class RunningMean:
    """Running sum of the states ``z_1..z_N`` (nothing stored per step).

    ``mean(extra)`` returns ``(Σ z_n + Σ extra) / (N + len(extra))``.

    Example:
        >>> import torch
        >>> from deqrobust.solvers import fixed_point
        >>> acc = RunningMean()
        >>> _ = fixed_point(lambda z: z + 1, torch.zeros(1, 1), max_iter=3, tol=0, callback=acc)
        >>> acc.mean().item()  # (1 + 2 + 3) / 3
        2.0
    """

    def __init__(self) -> None:
        self.total: Optional[Tensor] = None
        self.count = 0

    def __call__(self, step: SolverStep) -> None:
        if step.n < 1:
            return
        self.total = step.z.clone() if self.total is None else self.total.add_(step.z)
        self.count += 1

    def mean(self, extra: Iterable[Tensor] = ()) -> Tensor:
        if self.total is None:
            raise RuntimeError("RunningMean saw no state; was it passed to the solver?")
        total, count = self.total, self.count
        for z in extra:
            total = total + z
            count += 1
        return total / count
