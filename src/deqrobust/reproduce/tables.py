"""Our numbers beside the paper's (``paper_results.json``, read from the paper's tables), in the
paper's layouts. Cells read ``ours / paper``, ours with its 95 % Wilson interval."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterator, Optional

from ..evaluate.checks import cell_label
from ..evaluate.columns import HEADERS as COLUMN_HEADERS
from ..evaluate.columns import REPRODUCED_COLUMNS
from ..evaluate.random_depth import HEADERS as DEPTH_HEADERS
from ..evaluate.random_depth import RandomDepthResult
from ..evaluate.results import EvaluationResult
from ..utils.stats import with_interval
from .experiments import Experiment, Run

HEADERS = [COLUMN_HEADERS[c] for c in REPRODUCED_COLUMNS]


def paper_results() -> dict[str, Any]:
    """The paper's numbers (CIFAR-10, L-inf 8/255, %), as shipped with the package."""
    return json.loads(resources.files("deqrobust.reproduce").joinpath("paper_results.json").read_text())


def pair(ours: Optional[float], paper: Any, n: Optional[int] = None) -> str:
    """``ours / paper``; ours with its 95 % Wilson interval over ``n`` examples when ``n`` is given."""
    left = "—" if ours is None else (f"{ours:.2f}" if n is None else with_interval(ours, n))
    if isinstance(paper, list):
        right = "/".join("—" if p is None else f"{p:.2f}" for p in paper)
    else:
        right = "—" if paper is None else f"{paper:.2f}"
    return f"{left} / {right}"


def mark(d: Any) -> str:
    """A defense's failed sanity checks, for the cell next to its numbers ("" when all pass)."""
    failed = [c.name for c in d.sanity_checks if c.failed]
    return f" (checks FAILED: {', '.join(failed)})" if failed else ""


def evaluated(exp: Experiment, results: dict[str, EvaluationResult]) -> Iterator[tuple[Run, EvaluationResult]]:
    """Each run of ``exp`` that has a result, with it, in the experiment's order."""
    return ((run, results[run.key]) for run in exp.runs if run.key in results)


def run_notes(exp: Experiment, results: dict[str, EvaluationResult]) -> list[str]:
    """Per run: a model at chance, and every defense whose sanity checks failed."""
    notes = []
    for run, res in evaluated(exp, results):
        if res.model_at_chance:
            notes.append(f"{run.label}: MODEL AT CHANCE (clean {res.undefended_clean_acc:.2f}%): its numbers say nothing "
                         "about robustness — train longer (see the training warnings)")
        for d in res.defenses:
            if mark(d):
                notes.append(f"{run.label}, {d.defense}:{mark(d)} — see its report for the numbers")
    return notes


def defense_rows(result: EvaluationResult) -> dict[str, Any]:
    """The paper's three rows: final, early (paper's dev rule), ensemble."""
    rows = {"final": result.defense("final")}
    if result.early_exit is not None:
        rows["early"] = result.defense(f"early:{result.early_exit.paper_rule}")
    if any(d.defense == "ensemble" for d in result.defenses):
        rows["ensemble"] = result.defense("ensemble")
    return rows


def table2(exp: Experiment, results: dict[str, EvaluationResult]) -> str:
    paper = paper_results()["table2_pgd10_large"]
    lines = ["| Training | Defense | " + " | ".join(HEADERS) + " | Worst case (ours) |",
             "|---|---|" + "---|" * (len(HEADERS) + 1)]
    overall = []
    for run, res in evaluated(exp, results):
        ref = paper.get(run.key, {})
        for row, d in defense_rows(res).items():
            cells = [pair(d.table.get(c), (ref.get(row) or [None] * 7)[i], res.n_examples)
                     for i, c in enumerate(REPRODUCED_COLUMNS)]
            name = (d.defense if row != "early" else f"early ({d.defense})") + mark(d)
            lines.append(f"| {run.label} | {name} | " + " | ".join(cells) + f" | {with_interval(d.worst_case_acc, res.n_examples)} |")
        best = max(defense_rows(res).values(), key=lambda d: d.min_over_attacks_acc)
        overall.append(f"- {run.label}: overall white-box robustness (max over defenses of the min over attacks) "
                       f"{pair(best.min_over_attacks_acc, paper['overall_white_box'].get(run.key), res.n_examples)} "
                       f"({best.defense}); per-example worst case of the headline defense ({res.best_defense}, fixed on "
                       f"dev) {with_interval(res.autoattack_acc, res.n_examples)}")
    return "\n".join(lines + [""] + overall)


def matrix_cells(d: Any) -> dict[str, float]:
    """A defense's matrix as ``{"attack|source": robust accuracy}``."""
    return {cell_label(c.attack, c.source): c.robust_acc for c in d.matrix}


def table1(exp: Experiment, results: dict[str, EvaluationResult]) -> str:
    paper = paper_results()["table1_exact_trained_large_8_7"]
    run = exp.runs[0]
    if run.key not in results:
        return "_no result_"
    d = results[run.key].defense("final")
    n = results[run.key].n_examples
    cell = matrix_cells(d)
    lines = [f"Defense: final{mark(d)}.", "", "| Gradient | Clean | PGD-10 | PGD-1000 | Square |", "|---|---|---|---|---|"]
    lines.append(f"| Exact | {pair(d.clean_acc, paper['clean'], n)} | {pair(cell.get('pgd10|exact'), paper['exact']['pgd10'], n)} | "
                 f"{pair(cell.get('pgd1000|exact'), paper['exact']['pgd1000'], n)} | "
                 f"{pair(cell.get('square5000|none'), paper['square'], n)} |")
    lines.append(f"| Unrolling (phantom) | | {pair(cell.get('pgd10|phantom'), paper['unrolling']['pgd10'], n)} | "
                 f"{pair(cell.get('pgd1000|phantom'), paper['unrolling']['pgd1000'], n)} | |")
    return "\n".join(lines + ["", table1_gap(results[run.key], paper)])


def table1_gap(result: EvaluationResult, paper: dict[str, Any]) -> str:
    """What Table 1 is about, in one line: how far the per-example worst case over every attack falls
    below exact-gradient PGD-10 (the ready-made number), beside the paper's lowest cell, and the
    model's residual at its last state (a lost fixed point is the paper's explanation)."""
    d = result.defense("final")
    ready_made = matrix_cells(d).get("pgd10|exact")
    paper_lowest = min(paper["square"], paper["unrolling"]["pgd10"], paper["unrolling"]["pgd1000"])
    gap = "" if ready_made is None else f", {ready_made - d.worst_case_acc:.2f} points below exact-gradient PGD-10"
    rel = (result.residuals or {}).get("rel_mean") or []
    residual = f"; mean relative residual at the last state (test) {rel[-1]:.3g}" if rel else ""
    return (f"Ours, per-example worst case over every attack the suite ran (the PGD-10 white-box matrix, PGD-1000, Square): "
            f"{with_interval(d.worst_case_acc, result.n_examples)}{gap}{residual}. Paper: its lowest cell is "
            f"{paper['exact']['pgd10'] - paper_lowest:.2f} points below exact-gradient PGD-10, at a residual above "
            "0.75 at every state.")


def table3(exp: Experiment, results: dict[str, EvaluationResult]) -> str:
    paper = paper_results()["table3_unrolling_trained_pgd10_and_autoattack"]
    lines = ["Cells: ours PGD-10 / paper [PGD-10/AA]. Our AA column: per-example worst case after the "
             "AutoAttack cascade with every gradient source.", "",
             "| Arch. | Defense | " + " | ".join(HEADERS) + " | AA worst case (ours) |",
             "|---|---|" + "---|" * (len(HEADERS) + 1)]
    for run, arch in zip(exp.runs, ("large", "xl")):
        if run.key not in results:
            continue
        ref = paper.get(arch, {})
        for row, d in defense_rows(results[run.key]).items():
            refs = ref.get(row) or [None] * 7
            n = results[run.key].n_examples
            cells = [pair(d.table.get(c), refs[i], n) for i, c in enumerate(REPRODUCED_COLUMNS)]
            lines.append(f"| {run.label} | {d.defense}{mark(d)} | " + " | ".join(cells) + f" | {with_interval(d.worst_case_acc, n)} |")
    return "\n".join(lines)


def table4(exp: Experiment, results: dict[str, EvaluationResult], params: dict[str, int]) -> str:
    paper = paper_results()["table4_vs_deep_networks"]
    names = {"unrolling_trained_8_7": "DEQ-Large", "xl": "DEQ-XL", "ResNet-18": "ResNet-18", "WRN-34-10": "WRN-34-10"}
    lines = ["DEQ rows: ensemble defense, weakest PGD-10 cell and per-example worst case over every attack.", "",
             "| Model | Clean | PGD-10 (weakest) | AA / worst case | Params (M) |", "|---|---|---|---|---|"]
    for run, res in evaluated(exp, results):
        d = next((x for x in res.defenses if x.defense == "ensemble"), res.defense("final"))
        ref = paper.get(names[run.key], [None] * 4)
        pgd = min(c.robust_acc for c in d.matrix if c.attack == "pgd10")
        n = res.n_examples
        lines.append(f"| {run.label}{mark(d)} | {pair(d.clean_acc, ref[0], n)} | {pair(pgd, ref[1], n)} | "
                     f"{pair(d.worst_case_acc, ref[2], n)} | "
                     f"{params.get(run.key, 0) / 1e6:.2f} / {ref[3]} |")
    return "\n".join(lines)


def fig2_table(exp: Experiment, results: dict[str, EvaluationResult]) -> str:
    lines = [f"Paper (CIFAR-10, L-inf 8/255): {paper_results()['fig2b']}", "",
             "| Run | State | Ready-made acc (dev) | White-box acc (dev) | Mean rel. residual (test) |",
             "|---|---|---|---|---|"]
    dev = sorted({res.early_exit.n_examples for res in results.values() if res.early_exit is not None})
    if dev:
        lines[1:1] = ["", f"Accuracy per state on {' / '.join(map(str, dev))} dev examples (the early-exit selection's); "
                      "residual per state on the test examples."]
    for run, res in evaluated(exp, results):
        if res.early_exit is None:
            continue
        rel = res.residuals.get("rel_mean", [])
        for s in res.early_exit.per_state:
            r = rel[s.state] if s.state < len(rel) else None
            n = res.early_exit.n_examples
            lines.append(f"| {run.label} | {s.state} | {with_interval(s.ready_made_acc, n)} | {with_interval(s.white_box_acc, n)} | "
                         f"{'—' if r is None else f'{r:.3g}'} |")
    return "\n".join(lines)


FOLLOW_UP = (("non-adaptive", "Non-adaptive (the follow-up's own)"), ("bpda", "BPDA"),
             ("through-loop:straight-through", "Through the loop (ST sign)"), ("through-loop:raw", "Through the loop (raw)"),
             ("confident", "Confident loss"), ("transfer", "Transfer"))


def followup_table(exp: Experiment, results: dict[str, EvaluationResult]) -> str:
    """Each model with and without input entropy reduction: the follow-up's own (non-adaptive)
    number first, then clean, each adaptive family, the worst case and the defense's wall time."""
    lines = ["| Model | Defense | " + " | ".join(name for _, name in FOLLOW_UP) + " | Clean | Worst case | Wall time |",
             "|---|---|" + "---|" * (len(FOLLOW_UP) + 3)]
    for run, result in evaluated(exp, results):
        n = result.n_examples
        for d in result.defenses:
            columns = (d.follow_up or {}).get("columns", {})
            cells = [with_interval(columns[k], n) if columns.get(k) is not None else "—" for k, _ in FOLLOW_UP]
            lines.append(f"| {run.label} | `{d.defense}` | " + " | ".join(cells)
                         + f" | {with_interval(d.clean_acc, n)} | {with_interval(d.worst_case_acc, n)} | {d.seconds:.0f} s |")
    return "\n".join(lines)


def random_depth_table(exp: Experiment, random_depth: dict[str, RandomDepthResult],
                       results: dict[str, EvaluationResult]) -> str:
    """Each random-states model at a random depth: expected accuracy, clean and under each attack
    (EOT and the two that ignore the randomness), the worst case, and, for comparison, the protocol's
    worst case at full depth (``final``)."""
    attacks = list(DEPTH_HEADERS)
    lines = ["| Model | Clean | " + " | ".join(DEPTH_HEADERS[a] for a in attacks)
             + " | Worst case | Full depth, worst case (protocol) | Wall time |",
             "|---|---|" + "---|" * (len(attacks) + 3)]
    for run in exp.runs:
        rd = random_depth.get(run.key)
        if rd is None:
            continue
        result = results.get(run.key)
        final = next((d for d in result.defenses if d.defense == "final"), None) if result is not None else None
        full = "—" if final is None else with_interval(final.worst_case_acc, result.n_examples if result else 0)
        lines.append(f"| {run.label} | {rd.clean_acc:.2f} | " + " | ".join(f"{rd.attacks[a]:.2f}" for a in attacks)
                     + f" | {rd.worst_case_acc:.2f} | {full} | {rd.seconds:.0f} s |")
    return "\n".join(lines)


def render(exp: Experiment, results: dict[str, EvaluationResult], params: dict[str, int],
           random_depth: Optional[dict[str, RandomDepthResult]] = None) -> str:
    if exp.target == "followup":
        head = [f"## {exp.title}", "", "Robust accuracy (%) with 95 % Wilson intervals; each column the per-example "
                "union of that attack family's cells (docs/protocol.md, step 6). The follow-up reports no digits "
                "numbers: ours only."]
        extra: list[str] = []
        if random_depth:
            some = next(iter(random_depth.values()))
            extra = ["", f"### At a random depth (d uniform on 1..{some.n_states}), attacked with EOT", "",
                     f"Expected accuracy (%) over the {some.n_states} equally likely depths, computed exactly, on "
                     f"{some.n_examples} test examples; PGD-{some.steps} from a random start, each attack keeping "
                     "every example's iterate of lowest expected accuracy (docs/method.md, section 8).", "",
                     random_depth_table(exp, random_depth, results)]
        return "\n".join(head + ["", followup_table(exp, results)] + extra + [""]
                         + [f"- {n}" for n in (*run_notes(exp, results), *exp.notes)])
    body = {
        "table1": lambda: table1(exp, results),
        "table2": lambda: table2(exp, results),
        "table3": lambda: table3(exp, results),
        "table4": lambda: table4(exp, results, params),
        "fig2": lambda: fig2_table(exp, results),
    }[exp.target]()
    cells = ("Cells: ours (accuracy %); the paper's Figure 2 is a plot, its finding in words below." if exp.target == "fig2"
             else "Cells: ours / paper (accuracy %, paper: CIFAR-10, L-inf 8/255).")
    head = [f"## {exp.title}", "", cells]
    if results:
        any_result = next(iter(results.values()))
        head.append(f"Ours: {any_result.dataset}, {any_result.threat_model} eps={any_result.eps:.4g}, "
                    f"{any_result.n_examples} test examples, suite {any_result.suite['name']}.")
    return "\n".join(head + [""] + [body] + [""] + [f"- {n}" for n in (*run_notes(exp, results), *exp.notes)])


@dataclass(frozen=True)
class Fig2Series:
    """One run's curves in Fig. 2: robust accuracy per state on dev, under ready-made PGD-10 (the
    paper's panel a) and under the per-example worst white-box attack, and the test residual per state."""

    label: str
    states: list[int]
    ready_made_acc: list[float]
    white_box_acc: list[float]
    residual_states: list[int]
    rel_residual: list[float]


def fig2_series(exp: Experiment, results: dict[str, EvaluationResult]) -> list[Fig2Series]:
    """The curves of Fig. 2, one per run that has a result, in the experiment's order."""
    series = []
    for run, res in evaluated(exp, results):
        per_state = res.early_exit.per_state if res.early_exit is not None else []
        residuals = res.residuals or {}
        series.append(Fig2Series(run.label, [s.state for s in per_state], [s.ready_made_acc for s in per_state],
                                 [s.white_box_acc for s in per_state], list(residuals.get("states", [])),
                                 list(residuals.get("rel_mean", []))))
    return series


def plot_fig2(exp: Experiment, results: dict[str, EvaluationResult], path) -> None:
    """Draws :func:`fig2_series` to ``path`` (PNG): ready-made robustness solid, white-box dashed in the
    same colour, so the space between the two lines is what the ready-made attack missed."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    from ..utils.io import atomic_write

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = []
    for i, curve in enumerate(fig2_series(exp, results)):
        colour = f"C{i}"
        if curve.states:
            left.plot(curve.states, curve.ready_made_acc, marker="o", color=colour)
            left.plot(curve.states, curve.white_box_acc, marker="x", linestyle="--", color=colour)
        if curve.residual_states:
            right.plot(curve.residual_states, curve.rel_residual, marker="o", color=colour)
        runs.append(Line2D([], [], color=colour, marker="o", label=curve.label))
    left.set(xlabel="state n", ylabel="robust accuracy (%)", title="(a) robustness per state (dev)")
    right.set(xlabel="state n", ylabel="relative residual", title="(b) fixed-point residual (test)", yscale="log")
    left.legend(handles=[Line2D([], [], color="k", marker="o", label="ready-made PGD-10 (aimed at the output)"),
                         Line2D([], [], color="k", marker="x", linestyle="--", label="white-box worst case")],
                fontsize=8)
    right.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))  # 0.3, not 3 x 10^-1
    right.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(handles=runs, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8, frameon=False)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
