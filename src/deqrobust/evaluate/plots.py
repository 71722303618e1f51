"""PNG plots of an evaluation (matplotlib, Agg backend): paper Fig. 2a and Fig. 2b."""

from __future__ import annotations

from pathlib import Path

from ..utils.io import atomic_write
from .results import EvaluationResult


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))
    _figure().close(fig)
    return path


def plot_residuals(result: EvaluationResult, path: Path) -> Path:
    """Relative residual ``||f(z_n)-z_n|| / ||f(z_n)||`` per state (Fig. 2b)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    res = result.residuals
    if res:
        ax.plot(res["states"], res["rel_mean"], marker="o", label="mean")
        ax.plot(res["states"], res["rel_median"], marker=".", linestyle="--", label="median")
        ax.set_yscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "not a DEQ: no solver states", ha="center", va="center")
    ax.set_xlabel("state n")
    ax.set_ylabel("relative residual")
    ax.set_title(f"Fixed-point residual per state ({result.n_examples} clean test inputs)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_robustness_per_state(result: EvaluationResult, path: Path) -> Path:
    """Robust accuracy of the early-exit defense at every state under the ready-made attack and
    under the white-box attacks (Fig. 2a; dev split), with the test results of each defense."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    sel = result.early_exit
    if sel is not None:
        states = [s.state for s in sel.per_state]
        ax.plot(states, [s.clean_acc for s in sel.per_state], marker=".", color="gray", label="clean")
        ax.plot(states, [s.ready_made_acc for s in sel.per_state], marker="o",
                label=f"ready-made {sel.attack} ({sel.ready_made_source})")
        ax.plot(states, [s.white_box_acc for s in sel.per_state], marker="s", label="white-box worst case")
        ax.set_xlabel(f"early-exit state n ({sel.split} split, {sel.n_examples} examples)")
    else:
        ax.text(0.5, 0.5, "no early-exit selection", ha="center", va="center")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Robustness per state (\"robustness accumulation\")")
    ax.grid(alpha=0.3)
    if sel is not None:
        ax.legend(fontsize=7)
    return _save(fig, path)
