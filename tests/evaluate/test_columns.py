"""The paper columns have one owner: the dev rule keeps the stronger adjoint pairing and the strongest
intermediate state, the test fallback the strongest cell, and the report's summary row follows the
columns in their order."""

from __future__ import annotations

from types import SimpleNamespace

from deqrobust.evaluate.columns import HEADERS, PAPER_COLUMNS, REPRODUCED_COLUMNS, dev_columns, paper_row
from deqrobust.evaluate.columns import test_columns as fallback_columns
from deqrobust.evaluate.report import summary_table
from deqrobust.evaluate.results import CheckResult
from deqrobust.utils.stats import with_interval
from deqrobust.gradients import all_sources
from deqrobust.gradients.spec import PAIRINGS


def test_the_dev_rule_keeps_the_stronger_pairing_and_the_strongest_intermediate_state():
    extra = {str(s): 0 for s in all_sources(4, PAIRINGS) if str(s) != "exact"}
    extra.update({"adjoint:4:fresh": 3, "adjoint:4": 2, "adjoint:2": 5, "unrolled:3": 4, "unrolled:1": 4})
    chosen = dev_columns(extra, 4)
    assert chosen.columns["adjoint_final"] == "adjoint:4:fresh" and chosen.pairing["4"] == "fresh"
    assert chosen.columns["adjoint_intermediate"] == "adjoint:2" and chosen.intermediate_state["adjoint"] == 2
    # A tie goes to the earlier state.
    assert chosen.columns["unrolled_intermediate"] == "unrolled:1" and chosen.intermediate_state["unrolled"] == 1
    assert dev_columns(extra, 1).intermediate_state == {"adjoint": None, "unrolled": None}


def test_the_test_fallback_takes_each_columns_strongest_cell():
    cells = {"exact": 50.0, "phantom": 49.0, "adjoint:3": 47.0, "adjoint:3:fresh": 45.0, "adjoint:1": 40.0,
             "adjoint:2:fresh": 38.0, "unrolled:3": 46.0, "unrolled:2": 44.0, "unrolled:1": 42.0}
    columns = fallback_columns(cells, 3)
    assert columns["adjoint_final"] == "adjoint:3:fresh" and columns["adjoint_intermediate"] == "adjoint:2:fresh"
    assert columns["unrolled_intermediate"] == "unrolled:1" and "adjoint_ensemble" not in columns
    row = paper_row(True, 3, 90.0, cells, 30.0, 38.0)
    assert row["adjoint_intermediate"] == 38.0 and row["adjoint_intermediate_state"] == 2
    assert row["adjoint_ensemble"] is None and row["sources"]["unrolled_final"] == "unrolled:3"


def test_the_summary_row_follows_the_columns():
    table = paper_row(True, 3, 90.0, {"exact": 50.0, "phantom": 49.0, "adjoint:2": 41.0, "unrolled:3": 46.0}, 30.0,
                      41.0, {"ready_made_exact": "exact", "ready_made_phantom": "phantom",
                             "adjoint_intermediate": "adjoint:2", "unrolled_final": "unrolled:3"})
    check = CheckResult("gradients", True)
    result = SimpleNamespace(best_defense="final", best_defense_checks_passed=True, n_examples=100,
                             defenses=[SimpleNamespace(defense="final", table=table, sanity_checks=[check])])
    head, _, row = summary_table(result).splitlines()
    names = [c.strip() for c in head.strip("|").split("|")]
    values = dict(zip(names, [c.strip() for c in row.strip("|").split("|")]))
    assert names[1:2 + len(PAPER_COLUMNS)] == [HEADERS[c] for c in ("clean", *PAPER_COLUMNS)]
    assert values["Adjoint intermediate"] == "41.00 [31.87, 50.80] (n=2)" and values["Unrolled final"] == with_interval(46, 100)
    assert values["Adjoint final"] == "—" and values["Worst case (all attacks)"] == "**30.00 [21.89, 39.59]**"
    assert REPRODUCED_COLUMNS[0] == "clean" and not any(c.startswith("ready_made") for c in REPRODUCED_COLUMNS)
