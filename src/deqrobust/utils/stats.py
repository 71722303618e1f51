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


INTERVAL_METHOD = "Wilson score interval, 95%"


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of an accuracy of ``correct`` out of ``n``, in percent.

    Example:
        >>> [round(v, 1) for v in wilson_interval(55, 120)]
        [37.2, 54.7]
        >>> wilson_interval(0, 0)
        (0.0, 100.0)
    """
    if n <= 0:
        return 0.0, 100.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def interval_of(acc: float, n: int) -> list[float]:
    """:func:`wilson_interval` of an accuracy given in percent of ``n`` examples, rounded to 2 decimals.

    Example:
        >>> interval_of(45.83, 120)
        [37.19, 54.74]
    """
    lo, hi = wilson_interval(round(acc * n / 100.0), n)
    return [round(lo, 2), round(hi, 2)]


def with_interval(acc: float, n: int) -> str:
    """``"45.83 [37.19, 54.74]"``: an accuracy (percent of ``n`` examples) with its 95 % interval."""
    lo, hi = interval_of(acc, n)
    return f"{acc:.2f} [{lo:.2f}, {hi:.2f}]"
