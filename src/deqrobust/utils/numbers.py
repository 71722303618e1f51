"""The one parser of numbers written as fractions (``"8/255"``), for configs and the command line."""

from __future__ import annotations

from fractions import Fraction

__all__ = ["parse_fraction"]


def parse_fraction(text: str) -> float:
    """``"8/255"`` → 8/255, ``"0.1"`` → 0.1, ``"1e-3"`` → 0.001; anything else is a ``ValueError``.

    Example:
        >>> parse_fraction("8/255") == 8 / 255, parse_fraction("2.5e-1"), parse_fraction(" 1 / 4 ")
        (True, 0.25, 0.25)
    """
    text = str(text).strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(Fraction(num.strip())) / float(Fraction(den.strip()))
        return float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"not a number or fraction: {text!r}") from exc
