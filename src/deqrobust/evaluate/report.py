"""Writes the report of an evaluation: ``results.json``, ``report.md`` (tables laid out like the
paper's Tables 2–3) and the PNG plots (Fig. 2a per-state robustness, Fig. 2b residuals)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..utils.io import atomic_write_text
from .columns import HEADERS, PAPER_COLUMNS
from ..utils.stats import with_interval
from .results import DefenseResult, EvaluationResult, checks_verdict

FILES = ("results.json", "report.md", "residuals.png", "robustness_per_state.png")
def attack_shares(results: list[DefenseResult]) -> dict[str, float]:
    """Share of the attack wall time taken by each algorithm (all defenses, all sources)."""
    totals: dict[str, float] = {}
    for r in results:
        for c in r.matrix + r.cascade:
            key = f"{c.attack} ({c.mode})"
            totals[key] = totals.get(key, 0.0) + c.seconds
    whole = sum(totals.values()) or 1.0
    return {k: v / whole for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def notes_for(results: list[DefenseResult]) -> list[str]:
    """What a reader must know about the numbers: failed checks, breaks only the checks found, NaNs."""
    notes = []
    for r in results:
        failed = [c.name for c in r.sanity_checks if c.failed]
        square = next((c for c in r.sanity_checks if c.name == "square_vs_white_box" and c.failed), None)
        for c in r.sanity_checks:
            if c.status == "inconclusive":
                notes.append(f"{r.defense}: the {c.name} check is inconclusive — no outcome could have failed it at "
                             f"this size; it needs {c.details.get('needs', 'more examples')}")
        others = [name for name in failed if name != "square_vs_white_box"]
        if square is not None:
            notes.append(f"{r.defense}: Square broke {square.details['square_extra_breaks']} example(s) that every "
                         "white-box attack missed (counted in the worst case) — a sign of gradient masking: the "
                         "white-box attacks alone overestimate this defense")
        if others:
            notes.append(f"{r.defense}: sanity check(s) failed: {', '.join(others)} — the robust accuracy may be "
                         "overestimated (gradient masking); see sanity_checks for the numbers")
        extra = sum(int(c.details.get("breaks_beyond_suite", 0)) for c in r.sanity_checks)
        if extra:
            notes.append(f"{r.defense}: the sanity checks' own attacks at eps broke {extra} example(s) that every suite "
                         "attack missed (counted in the worst case) — the suite's budgets are too small for this model")
        if r.n_nonfinite_clean or r.n_nonfinite_adversarial:
            notes.append(f"{r.defense}: {r.n_nonfinite_clean} clean and {r.n_nonfinite_adversarial} adversarial "
                         "inputs gave NaN/Inf logits (counted as errors)")
    return notes


def fmt(value: Optional[float], n: Optional[int] = None) -> str:
    """An accuracy (percent), with its 95 % Wilson interval over ``n`` examples when ``n`` is given."""
    if value is None:
        return "—"
    return f"{value:.2f}" if n is None else with_interval(value, n)


def summary_table(result: EvaluationResult) -> str:
    """Paper Table 2/3 layout: defenses × (clean, ready-made, adjoint, unrolled, worst case)."""
    n = result.n_examples
    head = ("| Defense | " + " | ".join(HEADERS[c] for c in ("clean", *PAPER_COLUMNS))
            + " | Min over attacks | Worst case (all attacks) | Sanity checks |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for d in result.defenses:
        t = d.table

        def cell(column: str) -> str:
            if column == "ready_made_exact":  # a plain network's one ready-made gradient: its own
                return fmt(t.get(column, t.get("ready_made")), n)
            value = t.get(column)
            state = t.get(f"{column}_state") if column.endswith("_intermediate") else None
            return f"{fmt(value, n)} (n={state})" if value is not None and state is not None else fmt(value, n)

        marker = (" **(headline)**" if result.best_defense_checks_passed else " **(headline; checks failed)**") \
            if d.defense == result.best_defense else ""
        cells = [fmt(t["clean"], n)] + [cell(c) for c in PAPER_COLUMNS] + [
            fmt(t["min_over_attacks"], n), f"**{fmt(t['worst_case'], n)}**", checks_verdict(d.sanity_checks, "**FAIL**")]
        lines.append(f"| {d.defense}{marker} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cascade_table(d: DefenseResult, n: int) -> str:
    rows: dict[str, dict[str, Any]] = {}
    for c in d.cascade:
        entry = rows.setdefault(c.attack, {"attacked": 0, "broken": 0, "after": c.robust_acc, "s": 0.0, "sources": 0})
        entry["attacked"] = max(entry["attacked"], c.n_attacked)
        entry["broken"] += c.n_broken
        entry["after"] = c.robust_acc
        entry["s"] += c.seconds
        entry["sources"] += 1
    lines = ["| Attack (cascade) | Sources | Examples attacked (first source) | Broken | Robust acc after | Time (s) |",
             "|---|---|---|---|---|---|"]
    for name, e in rows.items():
        lines.append(f"| {name} | {e['sources']} | {e['attacked']} | {e['broken']} | {fmt(e['after'], n)} | {e['s']:.1f} |")
    return "\n".join(lines)


def matrix_table(result: EvaluationResult) -> str:
    defenses = [d.defense for d in result.defenses]
    by_source: dict[str, dict[str, float]] = {}
    label = result.defenses[0].matrix[0].attack if result.defenses and result.defenses[0].matrix else "attack"
    for d in result.defenses:
        for c in d.matrix:
            by_source.setdefault(c.source, {})[d.defense] = c.robust_acc
    lines = [f"| Gradient source ({label}) | " + " | ".join(defenses) + " |", "|---|" + "---|" * len(defenses)]
    for source, accs in by_source.items():
        lines.append(f"| {source} | " + " | ".join(fmt(accs.get(d), result.n_examples) for d in defenses) + " |")
    return "\n".join(lines)


def checks_table(result: EvaluationResult) -> str:
    lines = ["| Defense | Check | Result | Numbers |", "|---|---|---|---|"]
    for d in result.defenses:
        for c in d.sanity_checks:
            numbers = ", ".join(f"{k}={v}" for k, v in c.details.items() if k != "by_attack")
            verdict = {"pass": "pass", "fail": "**FAIL**", "inconclusive": "inconclusive"}[c.status]
            lines.append(f"| {d.defense} | {c.name} | {verdict} | {numbers} |")
    return "\n".join(lines)


def selection_table(result: EvaluationResult) -> str:
    sel = result.early_exit
    if sel is None:
        return "_No early-exit selection (not a DEQ, or early exit not requested)._"
    lines = [f"Chosen on the **{sel.split}** split ({sel.n_examples} examples), attack {sel.attack}. "
             f"Paper rule (best under ready-made `{sel.ready_made_source}`): **early:{sel.paper_rule}**; "
             f"white-box rule: **early:{sel.white_box_rule}**.", "",
             "| State n | Clean | Ready-made | White-box (worst case) |", "|---|---|---|---|"]
    for s in sel.per_state:
        lines.append(f"| {s.state} | {fmt(s.clean_acc, sel.n_examples)} | {fmt(s.ready_made_acc, sel.n_examples)} | "
                     f"{fmt(s.white_box_acc, sel.n_examples)} |")
    return "\n".join(lines)


def candidates_section(result: EvaluationResult) -> str:
    """Every source's dev numbers per defense and what the adaptive protocol kept."""
    sel = result.candidate_selection
    if sel is None:
        why = result.protocol.get("why", "")
        return f"_No candidate selection: {why}._" if why else "_No candidate selection._"
    names = [d.defense for d in sel.defenses]
    lines = [f"Chosen on the **{sel.split}** split ({sel.n_examples} examples), attack {sel.attack}: the ready-made "
             "source attacks every clean-correct dev example, every other source the examples it left. Cells: robust "
             "dev accuracy after the ready-made attack and that source (examples it broke beyond the ready-made one). "
             f"**M** = kept for the test matrix, **C** = kept for the cascade (top {sel.top_k}).", "",
             "| Source | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows: dict[str, list[str]] = {}
    for d in sel.defenses:
        for s in d.sources:
            mark = ("M" if s.source in d.matrix else "") + ("C" if s.source in d.cascade else "")
            rows.setdefault(s.source, []).append(f"{fmt(s.dev_acc, sel.n_examples)} ({s.extra_broken})"
                                                 + (f" **{mark}**" if mark else ""))
    for source, cells in rows.items():
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    lines += ["", "| Defense | Dev clean | Ready-made | Every source | Kept pairing (fresh at) | Matrix | Cascade |",
              "|---|---|---|---|---|---|---|"]
    for d in sel.defenses:
        fresh = ", ".join(n for n, p in d.pairing.items() if p == "fresh") or "none"
        lines.append(f"| {d.defense} | {fmt(d.clean_acc, sel.n_examples)} | {fmt(d.ready_made_acc, sel.n_examples)} | "
                     f"{fmt(d.white_box_acc, sel.n_examples)} | {fresh} | "
                     f"{', '.join(d.matrix)} | {', '.join(d.cascade)} |")
    return "\n".join(lines)


def estimate_line(result: EvaluationResult) -> str:
    est = result.estimate
    if not est or "skipped" in est:
        return f"No cost estimate: {est['skipped']}." if est else ""
    ratio = est.get("actual_over_predicted")
    return (f"Predicted before the run: {est['predicted_s']:.0f} s; actual: {est.get('actual_s', 0):.0f} s"
            + (f" ({ratio:.2f}× the prediction)" if ratio else "") + (" — resumed run" if est.get("resumed") else "")
            + ". Breakdown: " + ", ".join(f"{k} {v:.0f} s" for k, v in est["breakdown"].items()) + ".")


FOLLOW_UP_COLUMNS = {"non-adaptive": "Non-adaptive (the follow-up's own)", "bpda": "BPDA",
                     "through-loop:straight-through": "Through the loop (sign straight-through)",
                     "through-loop:raw": "Through the loop (raw sign)", "confident": "Confident loss (BPDA)",
                     "transfer": "Transfer from the static model"}


def follow_up_section(result: EvaluationResult) -> list[str]:
    """Each purified defense: its attack families as columns, the follow-up's own number first."""
    purified = [d for d in result.defenses if d.follow_up]
    if not purified:
        return []
    n = result.n_examples
    head = "| Defense | " + " | ".join(FOLLOW_UP_COLUMNS.values()) + " | Worst case | Static model's worst case |"
    lines = ["## Input entropy reduction, judged adaptively", "",
             "Robust accuracy (%) per attack family, each the per-example union of its cells on every clean-correct "
             "example: the follow-up's own evaluation (PGD with the undefended model's gradient, judged on the defended "
             "output) first; BPDA takes the purification as the identity and runs each source at the purified input; "
             "through the loop differentiates the purification steps; the confident loss is CE minus the prediction "
             "entropy; transfer judges every point that broke the static model. The worst case also counts the "
             "cascade, Square and the sanity checks' attacks.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for d in purified:
        f = d.follow_up or {}
        cells = [fmt(f["columns"].get(k), n) for k in FOLLOW_UP_COLUMNS]
        lines.append(f"| `{d.defense}` | " + " | ".join(cells) + f" | {fmt(d.worst_case_acc, n)} | "
                     f"{fmt(f.get('static_worst_case_acc'), n)} |")
    lines.append("")
    for d in purified:
        f = d.follow_up or {}
        gap = float(f["gap_points"])
        relation = (f"exceeds the worst case {f['worst_case_acc']:.2f}% by {gap:.2f} points" if gap > 0
                    else f"equals the worst case {f['worst_case_acc']:.2f}%")
        lines.append(f"- `{d.defense}`: the non-adaptive number {f['non_adaptive_acc']:.2f}% {relation}; "
                     "through the loop, the stronger sign handling: "
                     f"{f['stronger_through_loop']}. "
                     + ("Would have caught the non-adaptive number: " + "; ".join(f["caught_by"]) + "."
                        if f["caught_by"] else "No attack broke an example the non-adaptive attack left."))
    return lines + [""]


def markdown(result: EvaluationResult) -> str:
    eps = result.eps
    eps_text = f"{eps:.4g}" + (f" (= {eps * 255:.3g}/255)" if result.threat_model == "Linf" else "")
    parts = [
        f"# White-box robustness report — {result.dataset or 'unnamed dataset'}",
        "",
        f"Threat model {result.threat_model}, ε = {eps_text}; {result.n_examples} test examples; seed {result.seed}; "
        f"suite `{result.suite['name']}`, {result.protocol['mode']} protocol ({result.protocol['why']}; matrix attack "
        f"{result.suite['matrix']['label']}, cascade "
        f"{', '.join(c['label'] for c in result.suite['cascade'])}"
        + (f", then {result.suite['square']['label']}" if result.suite.get("square") else "") + ").",
        "",
        *[line for n in result.notes if n.startswith("not a DEQ") for line in (f"**{n[0].upper() + n[1:]}.**", "")],
        f"**Headline defense: {result.headline()}"
        + ("" if result.best_defense_checks_passed else "; its sanity checks FAILED (see below)")
        + f".** The undefended model's clean accuracy: {with_interval(result.undefended_clean_acc, result.n_examples)}%. "
        "Robust accuracy is the per-example worst case over every attack; every defense's test numbers are below.",
        *([f"**Model at chance:** {result.notes[[n.startswith('model at chance') for n in result.notes].index(True)]}",
           ""] if result.model_at_chance else []),
        "",
        "## Summary (paper Tables 2–3 layout)",
        "",
        "Cells are robust accuracy (%) under the matrix attack with that gradient source, run standalone, with "
        f"the 95 % interval in brackets ({result.interval_method}). "
        "'Intermediate' is the strongest intermediate state n < N. 'Min over attacks' is the paper's metric "
        "(the weakest cell); 'worst case' counts an example as robust only if it survived every attack, "
        "the AutoAttack-style cascade included.",
        "",
        summary_table(result),
        "",
        "## Early-exit selection (dev split)",
        "",
        selection_table(result),
        "",
        "## Candidate selection (dev split)",
        "",
        candidates_section(result),
        "",
        "## Every gradient source (matrix attack, standalone)",
        "",
        matrix_table(result),
        "",
    ]
    parts += follow_up_section(result)
    for d in result.defenses:
        parts += [f"## Cascade on `{d.defense}`", "", cascade_table(d, result.n_examples), ""]
    parts += ["## Obfuscation sanity checks", "", checks_table(result), ""]
    if result.notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    timing = result.timing
    parts += ["## Timing", "", f"Wall time {timing.get('total_s', 0):.1f} s"
              + (f" = {timing['total_over_reference']:.1f}× one {timing['reference_attack']} run on the final "
                 f"state (attacks alone: {timing['attack_time_over_reference']:.1f}×; all phases, summed over "
                 "processes)" if timing.get("total_over_reference") else "") + ".", "", estimate_line(result), ""]
    parts += ["Plots: `robustness_per_state.png` (paper Fig. 2a), `residuals.png` (paper Fig. 2b).", ""]
    return "\n".join(parts)


def write_reports(result: EvaluationResult, out_dir: Path) -> dict[str, Path]:
    from .plots import plot_residuals, plot_robustness_per_state

    out_dir = Path(out_dir)
    paths = {
        "results.json": atomic_write_text(out_dir / "results.json", result.to_json()),
        "report.md": atomic_write_text(out_dir / "report.md", markdown(result)),
        "residuals.png": plot_residuals(result, out_dir / "residuals.png"),
        "robustness_per_state.png": plot_robustness_per_state(result, out_dir / "robustness_per_state.png"),
    }
    return paths
