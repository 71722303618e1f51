"""Attack candidates chosen on the dev split, per defense (the adaptive protocol).

Every gradient source — ready-made, the adjoint with both pairings and the unrolled estimator at
every state, every gradient ensemble — runs the suite's matrix attack (PGD-10) against the defense
on the dev examples (:mod:`deqrobust.evaluate.dev`: the ready-made source first, each other source
on what it left; this module reads the outcomes). From those numbers, per defense:

* the adjoint pairing that broke more is kept at each state (ties: the paper's literal pairing);
* the **matrix** keeps the paper-table sources — both ready-made ones, adjoint and unrolled at the
  final state, at the intermediate state n < N that broke the most on dev (one n per estimator, the
  paper's single "intermediate" column) and both gradient ensembles — plus the cascade's sources;
* the **cascade** keeps the ready-made source and the ``top_k - 1`` sources that broke the most
  (ties: the cheaper source, in :func:`~deqrobust.gradients.all_sources` order), and the
  defense's own exact gradient where one source is it (``unrolled:n`` for ``early:n``, ``exact``
  for ``final``: :meth:`~deqrobust.evaluate.target.AttackTarget.own_gradient`), whatever dev said.

The test split is not read here: the protocol records what each phase read (``data_access``).
"""

from __future__ import annotations

from typing import Mapping

from .dev import DevOutcome
from .columns import PAPER_COLUMNS, dev_columns
from .results import CandidateSelection, DefenseCandidates, SourceOnDev
from .runner import AttackRunner
from ..utils.stats import interval_of


def keep(outcome: DevOutcome, runner: AttackRunner, top_k: int, paper_columns: bool = True) -> DefenseCandidates:
    """Apply the selection rule to one defense's dev attacks; the matrix keeps the paper columns'
    sources too when ``paper_columns``."""
    target = runner.target
    n_states = target.n_states
    ready = str(target.ready_made)
    order = [str(s) for s in target.sources(both_pairings=True)]
    extra = {name: outcome.extra(name) for name in order if name != ready}

    chosen = dev_columns(extra, n_states)
    paper = [chosen.columns[c] for c in PAPER_COLUMNS if c in chosen.columns]
    ranked = sorted(extra, key=lambda name: (-extra[name], order.index(name)))
    cascade = [ready] + ranked[: max(0, top_k - 1)]
    own = target.own_gradient(outcome.defense)
    if own is not None and str(own) not in cascade:  # the defense's exact gradient always attacks it
        cascade.append(str(own))
    matrix = list(dict.fromkeys(paper + cascade)) if paper_columns else cascade
    n = outcome.n_examples
    accs = {"clean_acc": outcome.clean_acc, "ready_made_acc": outcome.ready_made_acc,
            "white_box_acc": outcome.acc_after_all()}
    return DefenseCandidates(
        **accs,
        defense=outcome.defense,
        sources=[SourceOnDev(ready, len(outcome.ready_broken), outcome.ready_made_acc,
                             interval_of(outcome.ready_made_acc, n))]
        + [SourceOnDev(name, extra[name], outcome.acc_after(name), interval_of(outcome.acc_after(name), n))
           for name in order if name != ready],
        intervals={k: interval_of(v, n) for k, v in accs.items()},
        pairing=chosen.pairing,
        intermediate_state=chosen.intermediate_state,
        columns=chosen.columns,
        matrix=matrix,
        cascade=cascade,
    )


def select_candidates(runner: AttackRunner, defenses: list[str], outcomes: Mapping[str, DevOutcome], attack: str,
                      top_k: int, paper_columns: bool = True) -> CandidateSelection:
    """Keep each defense's candidates from its dev outcome (:func:`~.dev.run_dev_phase`)."""
    kept = [keep(outcomes[defense], runner, top_k, paper_columns) for defense in defenses]
    n = next(iter(outcomes.values())).n_examples if outcomes else 0
    return CandidateSelection(split="dev", n_examples=n, attack=attack, top_k=top_k, defenses=kept)
