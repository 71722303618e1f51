"""The paper's table columns (its Tables 2–3), owned here: their names and headers, which gradient
source fills each column — chosen on dev (the adaptive protocol) or, when nothing was chosen, the
strongest on test — and the sources assumed for them before dev (the price).

The "intermediate" column is one state n < N per estimator (the one that broke the most); an
adjoint column takes the stronger of the two pairings (``adjoint:n`` or ``adjoint:n:fresh``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from ..gradients import GradientSource

PAPER_COLUMNS = ("ready_made_exact", "ready_made_phantom", "adjoint_final", "adjoint_intermediate", "adjoint_ensemble",
                 "unrolled_final", "unrolled_intermediate", "unrolled_ensemble")
HEADERS = {"clean": "Clean", "ready_made_exact": "Ready-made exact", "ready_made_phantom": "Ready-made phantom",
           "adjoint_final": "Adjoint final", "adjoint_intermediate": "Adjoint intermediate",
           "adjoint_ensemble": "Adjoint ensemble", "unrolled_final": "Unrolled final",
           "unrolled_intermediate": "Unrolled intermediate", "unrolled_ensemble": "Unrolled ensemble"}
# The columns of the paper's Tables 2 and 3 that `reproduce` sets ours beside (no ready-made columns there).
REPRODUCED_COLUMNS = ("clean",) + tuple(c for c in PAPER_COLUMNS if not c.startswith("ready_made"))


@dataclass(frozen=True)
class DevColumns:
    """Each column's source as chosen on dev, with the adjoint pairing kept per state and the
    intermediate state per estimator."""

    columns: dict[str, str]
    pairing: dict[str, str]
    intermediate_state: dict[str, Optional[int]]


def dev_columns(extra: Mapping[str, int], n_states: int) -> DevColumns:
    """The dev rule: ``extra`` is what each source (other than the ready-made one) broke on dev.

    Example:
        >>> extra = {"adjoint:1": 2, "adjoint:1:fresh": 3, "adjoint:2": 1, "adjoint:2:fresh": 0,
        ...          "adjoint:ensemble": 1, "adjoint:ensemble:fresh": 1, "unrolled:1": 4, "unrolled:2": 1,
        ...          "unrolled:ensemble": 2, "exact": 0}
        >>> dev_columns(extra, 2).columns["adjoint_intermediate"]
        'adjoint:1:fresh'
    """

    def stronger(literal: str) -> str:
        fresh = f"{literal}:fresh"
        return fresh if extra.get(fresh, -1) > extra.get(literal, -1) else literal

    adjoint = {str(n): stronger(f"adjoint:{n}") for n in [*range(1, n_states + 1), "ensemble"]}
    pairing = {n: "fresh" if name.endswith(":fresh") else "literal" for n, name in adjoint.items()}

    def strongest_intermediate(name_of) -> Optional[int]:
        if n_states < 2:
            return None
        return max(range(1, n_states), key=lambda n: (extra.get(name_of(n), -1), -n))

    inter_adjoint = strongest_intermediate(lambda n: adjoint[str(n)])
    inter_unrolled = strongest_intermediate(lambda n: f"unrolled:{n}")
    columns = {"ready_made_exact": "exact", "ready_made_phantom": "phantom", "adjoint_final": adjoint[str(n_states)],
               "adjoint_ensemble": adjoint["ensemble"], "unrolled_final": f"unrolled:{n_states}",
               "unrolled_ensemble": "unrolled:ensemble"}
    if inter_adjoint is not None:
        columns["adjoint_intermediate"] = adjoint[str(inter_adjoint)]
        columns["unrolled_intermediate"] = f"unrolled:{inter_unrolled}"
    return DevColumns(columns, pairing, {"adjoint": inter_adjoint, "unrolled": inter_unrolled})


def test_columns(cells: Mapping[str, float], n_states: int) -> dict[str, str]:
    """The fallback when nothing was chosen on dev (an exhaustive or matrix-only run): each column
    takes its strongest source among the matrix cells (source -> robust accuracy)."""
    columns = {"ready_made_exact": "exact", "ready_made_phantom": "phantom"}
    for kind in ("adjoint", "unrolled"):
        pairings = ("", ":fresh") if kind == "adjoint" else ("",)
        for column, states in (("final", [n_states]), ("intermediate", range(1, n_states)), ("ensemble", ["ensemble"])):
            present = [f"{kind}:{n}{p}" for n in states for p in pairings if f"{kind}:{n}{p}" in cells]
            if present:
                columns[f"{kind}_{column}"] = min(present, key=lambda name: (cells[name], present.index(name)))
    return columns


def assumed_sources(n_states: int) -> list[GradientSource]:
    """The columns' sources before dev has chosen (for the price): the literal pairing, n = N // 2.

    Example:
        >>> [str(s) for s in assumed_sources(4)]
        ['exact', 'phantom', 'adjoint:4', 'adjoint:2', 'adjoint:ensemble', 'unrolled:4', 'unrolled:2', 'unrolled:ensemble']
    """
    middle = max(1, n_states // 2)
    by_column = {"ready_made_exact": GradientSource("exact"), "ready_made_phantom": GradientSource("phantom"),
                 "adjoint_final": GradientSource("adjoint", n_states), "adjoint_ensemble": GradientSource("adjoint", None),
                 "unrolled_final": GradientSource("unrolled", n_states),
                 "unrolled_ensemble": GradientSource("unrolled", None)}
    if n_states > 1:
        by_column["adjoint_intermediate"] = GradientSource("adjoint", middle)
        by_column["unrolled_intermediate"] = GradientSource("unrolled", middle)
    return [by_column[c] for c in PAPER_COLUMNS if c in by_column]


def paper_row(is_deq: bool, n_states: int, clean: float, cells: Mapping[str, float], worst: float, minimum: float,
              columns: Optional[Mapping[str, str]] = None) -> dict[str, object]:
    """One defense's row in the paper's layout from its matrix cells (source -> robust accuracy);
    ``columns`` as chosen on dev, else :func:`test_columns`."""
    table: dict[str, object] = {"clean": clean, "min_over_attacks": minimum, "worst_case": worst}
    if not is_deq:
        table.update({k: None for k in PAPER_COLUMNS if not k.startswith("ready_made")})
        table["ready_made"] = cells.get("autograd")
        table["sources"] = {"ready_made": "autograd"}
        return table
    chosen = dict(columns) if columns is not None else test_columns(cells, n_states)
    for column in PAPER_COLUMNS:
        table[column] = cells.get(chosen[column]) if column in chosen else None
    for kind in ("adjoint", "unrolled"):
        source = chosen.get(f"{kind}_intermediate")
        table[f"{kind}_intermediate_state"] = int(source.split(":")[1]) if source else None
    table["sources"] = {c: chosen[c] for c in PAPER_COLUMNS if c in chosen and chosen[c] in cells}
    return table
