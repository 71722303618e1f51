"""Fig. 2's curves: what each run contributes, and the plot drawn from them."""

from types import SimpleNamespace

from deqrobust.evaluate.results import StateRobustness
from deqrobust.reproduce.experiments import experiment
from deqrobust.reproduce.tables import fig2_series, plot_fig2


def result(ready_made, white_box, residual):
    per_state = [StateRobustness(state=n, clean_acc=90.0, ready_made_acc=r, white_box_acc=w)
                 for n, (r, w) in enumerate(zip(ready_made, white_box), start=1)]
    return SimpleNamespace(early_exit=SimpleNamespace(per_state=per_state, n_examples=200),
                           residuals={"states": list(range(len(residual))), "rel_mean": residual})  # state 0 is the initial guess


def test_each_run_gives_its_ready_made_and_white_box_curves_and_its_residuals(tmp_path):
    exp = experiment("fig2", "small")
    exact, unrolled = exp.runs
    results = {exact.key: result([60.0, 70.0, 80.0], [55.0, 60.0, 74.0], [0.9, 0.5, 0.3]),
               unrolled.key: result([50.0, 60.0, 65.0], [49.0, 59.0, 64.0], [0.5, 0.1, 0.02])}

    series = fig2_series(exp, results)

    assert [s.label for s in series] == [exact.label, unrolled.label]
    assert series[0].states == [1, 2, 3]
    assert series[0].ready_made_acc == [60.0, 70.0, 80.0]
    assert series[0].white_box_acc == [55.0, 60.0, 74.0]
    assert (series[1].residual_states, series[1].rel_residual) == ([0, 1, 2], [0.5, 0.1, 0.02])

    path = tmp_path / "fig2.png"
    plot_fig2(exp, results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_a_result_draws_no_curve():
    exp = experiment("fig2", "small")
    exact = exp.runs[0]
    series = fig2_series(exp, {exact.key: result([60.0], [50.0], [0.4])})
    assert [s.label for s in series] == [exact.label]


def test_table1_says_how_far_the_worst_case_falls_below_the_ready_made_number():
    from deqrobust.evaluate.results import AttackCell, DefenseResult
    from deqrobust.reproduce.tables import paper_results, table1_gap

    def cell(attack, source, acc):
        return AttackCell(attack=attack, source=source, mode="matrix", n_attacked=300, n_broken=0, robust_acc=acc)

    final = DefenseResult(defense="final", clean_acc=97.78, worst_case_acc=76.11, min_over_attacks_acc=79.17,
                          min_over_attacks_attack="square5000|none", n_nonfinite_clean=0, n_nonfinite_adversarial=0,
                          table={}, matrix=[cell("pgd10", "phantom", 80.0), cell("pgd10", "exact", 81.39), cell("pgd10", "unrolled:4", 84.17),
                                            cell("square5000", "none", 79.17)],
                          cascade=[], sanity_checks=[], seconds=1.0)
    result = SimpleNamespace(defense=lambda name: {"final": final}[name], n_examples=360,
                             residuals={"states": [0, 1, 2], "rel_mean": [1.0, 0.49, 0.258]})

    line = table1_gap(result, paper_results()["table1_exact_trained_large_8_7"])

    assert "76.11" in line
    assert "5.28 points below exact-gradient PGD-10" in line  # 81.39 - 76.11: the exact cell, not the others
    assert "last state (test) 0.258" in line
    assert "74.02 points below" in line  # the paper: 79.97 exact PGD-10, Square 5.95


def test_fig2s_table_has_a_row_per_state_and_says_which_split_each_number_is_from():
    from deqrobust.reproduce.tables import fig2_table

    exp = experiment("fig2", "small")
    exact = exp.runs[0]
    text = fig2_table(exp, {exact.key: result([60.0, 70.0], [55.0, 66.0], [1.0, 0.9, 0.258])})  # states 0, 1, 2
    rows = [line for line in text.splitlines() if line.startswith(f"| {exact.label}")]
    assert len(rows) == 2
    assert [c.strip() for c in rows[1].strip("|").split("|")][1:] == ["2", "70.00 [63.32, 75.93]", "66.00 [59.19, 72.21]", "0.258"]
    assert "200 dev examples" in text and "test examples" in text
