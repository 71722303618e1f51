"""Sampling noise of accuracies measured on a finite number of examples (one definition, used by the
sanity checks and by the chance-level warnings)."""

from __future__ import annotations

import math


def noise_points(p: float, n: int) -> float:
    """Two binomial standard errors of a share ``p`` measured on ``n`` examples, in percentage points,
    and never less than one example.

    Example:
        >>> round(noise_points(0.5, 100), 2), noise_points(0.0, 32)
        (10.0, 3.125)
    """
    if n <= 0:
        return 0.0
    return 100.0 * max(1.0 / n, 2.0 * math.sqrt(max(p * (1 - p), 0.0) / n))


def at_chance(accuracy: float, n: int, classes: int) -> bool:
    """Whether an accuracy (a fraction in [0, 1]) is within sampling noise of guessing, ``1/classes``.

    Example:
        >>> at_chance(0.1, 200, 10), at_chance(0.12, 200, 10), at_chance(0.86, 200, 10)
        (True, True, False)
    """
    if classes < 2 or n <= 0:
        return False
    return accuracy <= 1.0 / classes + noise_points(1.0 / classes, n) / 100.0
