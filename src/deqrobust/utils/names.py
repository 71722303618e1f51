"""Comma-separated name lists, as the command line and the Python API take them."""

from __future__ import annotations


def split_names(text: str) -> list[str]:
    """Split on the commas outside parentheses, so a name may carry options.

    Example:
        >>> split_names("final, early:2, entropy(steps=5,radius=8/255):final")
        ['final', 'early:2', 'entropy(steps=5,radius=8/255):final']
    """
    names: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        depth += (char == "(") - (char == ")")
        if char == "," and depth <= 0:
            names.append("".join(current))
            current = []
        else:
            current.append(char)
    names.append("".join(current))
    return [name.strip() for name in names if name.strip()]
