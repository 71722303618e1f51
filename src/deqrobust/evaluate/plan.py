"""What an evaluation will run, decided once, before any compute: the suite with its dev size, the
mode (adaptive, exhaustive, matrix-only), the sizes, the defenses and, per defense, the sources of
the test matrix and of the cascade. :mod:`.runs` lists the attack runs of a plan; the protocol
executes that list and the cost estimate prices it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Optional, Sequence, Union

from torch import nn

from ..attacks import ThreatModel
from ..defenses import Defense
from ..errors import ConfigError
from ..gradients import GradientSource
from ..utils.stats import with_interval
from .columns import assumed_sources
from .options import EvaluationOptions
from .results import CandidateSelection
from .suites import AttackSpec, Suite
from .target import AttackTarget


def white_box_sources(n: int) -> list[GradientSource]:
    """The estimators aimed at state n, and both gradient ensembles (each pairing of the adjoint)."""
    return [
        GradientSource("adjoint", n),
        GradientSource("adjoint", n, "fresh"),
        GradientSource("unrolled", n),
        GradientSource("adjoint", None),
        GradientSource("adjoint", None, "fresh"),
        GradientSource("unrolled", None),
    ]


class ProtocolMode(str, Enum):
    """How the sources are chosen: on dev (adaptive), all of them (exhaustive), or a suite that is
    a matrix only (the paper's Tables 1–2)."""

    ADAPTIVE = "adaptive"
    EXHAUSTIVE = "exhaustive"
    MATRIX_ONLY = "matrix-only"
    AT_CHANCE = "at-chance"  # the model guesses on dev: one attack, no selection (:meth:`EvaluationPlan.at_chance`)


@dataclass(frozen=True)
class Pending:
    """A source the plan cannot name before it runs: one the dev selection will choose
    (``chosen-on-dev``), or the strongest matrix source on test, which the sanity checks reuse
    (``strongest-on-test``). The price takes an average source for it."""

    why: str

    def __str__(self) -> str:
        return f"<{self.why}>"


CHOSEN_ON_DEV = Pending("chosen-on-dev")
STRONGEST_ON_TEST = Pending("strongest-on-test")
SourceRef = Union[GradientSource, None, Pending]  # None: a gradient-free attack (Square)


@dataclass(frozen=True)
class DefensePlan:
    """What the test phase runs against one defense: the matrix sources (standalone, every
    clean-correct example), the cascade sources (survivors only) and the extra cascade attacks run
    first (``boost``, adaptive only); ``columns`` names each paper column's source when chosen on dev."""

    defense: Defense
    matrix: tuple[SourceRef, ...]
    cascade: tuple[SourceRef, ...]
    boost: tuple[AttackSpec, ...] = ()
    columns: Optional[dict[str, str]] = None


@dataclass(frozen=True)
class EvaluationPlan:
    """An evaluation's settings, resolved once from its options and checked before any compute."""

    suite: Suite  # with the dev and sanity sizes applied
    target: AttackTarget
    threat: ThreatModel
    mode: ProtocolMode
    n_test: int
    n_dev: int  # dev examples the selections read (0: no dev split)
    input_numel: int  # values per input (the L2 check's unbounded radius)
    top_k: int
    paper_columns: bool
    requested_defenses: Optional[tuple[str, ...]]
    requested_sources: Optional[tuple[str, ...]]
    requested_n_test: Optional[int] = None
    chosen_as_asked: bool = True  # False: the suite is adaptive but there is no dev split to choose on
    dev_clean: Optional[str] = None  # at chance: what the dev check measured
    headline: Optional[str] = None  # the headline defense named by the user ("early": the white-box rule's state)

    def at_chance(self, correct: int, n: int, classes: int) -> "EvaluationPlan":
        """The plan for a model whose clean accuracy on dev is within noise of guessing: nothing is
        chosen and no cascade runs — the final output under the matrix attack with the ready-made
        source, and the sanity checks. Its numbers say nothing, and the report says so in seconds
        instead of a full plan's minutes."""
        suite = replace(self.suite, cascade=(), square=None, standalone=(), boost=())
        measured = (f"{correct} of {n} dev examples correct ({with_interval(100 * correct / max(n, 1), n)}%; guessing: "
                    f"{100 / classes:.1f}%)")
        return replace(self, suite=suite, mode=ProtocolMode.AT_CHANCE, requested_defenses=("final",),
                       requested_sources=(str(self.target.ready_made),), dev_clean=measured, headline=None)

    @property
    def n_sanity(self) -> int:
        return min(self.suite.sanity_examples, self.n_test)

    @property
    def boost(self) -> tuple[AttackSpec, ...]:
        """The extra cascade attacks on the few candidates: adaptive only (an exhaustive run attacks
        with every source instead)."""
        return self.suite.boost if self.mode is ProtocolMode.ADAPTIVE else ()

    @property
    def early_exit_selection(self) -> bool:
        """Whether the dev phase evaluates every early-exit state (``early`` asked for, or the default)."""
        return self.n_dev > 0 and self.target.wants_early_exit_selection(self.requested_defenses)

    def sources(self) -> list[GradientSource]:
        """The sources of a run that is not adaptive: the requested ones, or every source (both
        adjoint pairings when exhaustive; the paper's literal pairing in a matrix-only suite, e.g.
        Table 2)."""
        if self.requested_sources is not None:
            return self.target.sources(self.requested_sources)
        return self.target.sources(both_pairings=self.mode is ProtocolMode.EXHAUSTIVE)

    def defenses(self, early_states: Sequence[int] = ()) -> list[Defense]:
        """The defenses evaluated on test, ``early`` expanded to the states chosen on dev."""
        return [d.resolved(self.threat.eps) for d in self.target.defenses(self.requested_defenses, early_states)]

    def dev_defenses(self) -> list[Defense]:
        """The defenses attacked on dev: every early-exit state when the early exit is chosen on
        dev, and every other defense the test phase will evaluate (adaptive: its candidates are
        chosen there; every mode: the headline defense is fixed there, :func:`~.selection.select_headline`)
        — when there is a choice to make."""
        if not self.n_dev or self.mode is ProtocolMode.AT_CHANCE or not self.target.is_deq:
            return []
        early = [Defense("early", n) for n in range(1, self.target.n_states + 1)] if self.early_exit_selection else []
        known = [d for d in (self.requested_defenses or ("final", "early", "ensemble")) if d != "early"]
        others = [d.resolved(self.threat.eps) for d in (self.target.defenses(known) if known else []) if d not in early]
        if self.mode is not ProtocolMode.ADAPTIVE and (len(others) + bool(early) < 2 or self.headline):
            others = []  # nothing to choose among (one defense, or the user named the headline)
        return early + others

    def dev_sources(self, defense: Defense) -> list[GradientSource]:
        """The sources attacking ``defense`` on dev after the ready-made one: every source
        (adaptive: any defense may be chosen, and its candidates are chosen from these); otherwise
        the white-box sources aimed at the defense's state (:func:`white_box_sources`:
        the early-exit selection's at state n; at N for ``final``, with its own exact gradient, and
        for the ensembles)."""
        if self.mode is ProtocolMode.ADAPTIVE:
            return [s for s in self.target.sources(both_pairings=True) if s != self.target.ready_made]
        if defense.kind == "early":
            return white_box_sources(int(defense.step or 0))
        own = self.target.own_gradient(defense)
        extra = [own] if own is not None and own != self.target.ready_made else []
        return extra + white_box_sources(self.target.n_states)

    def assumed_early_states(self) -> list[int]:
        """For the price, before dev: the two rules pick two different middle states."""
        if not self.early_exit_selection:
            return []
        n = self.target.n_states
        return list(dict.fromkeys([max(1, n // 2), min(n, n // 2 + 1)]))

    def defense_plans(self, defenses: Sequence[Defense], candidates: Optional[CandidateSelection]) -> list[DefensePlan]:
        """Per defense, the test phase's sources: those chosen on dev (adaptive) or every source."""
        if candidates is None:
            every = tuple(self.sources())
            return [DefensePlan(d, every, every) for d in defenses]
        plans = []
        for name in defenses:
            kept = candidates.for_defense(str(name))
            plans.append(DefensePlan(name, tuple(self.target.sources(kept.matrix)), tuple(self.target.sources(kept.cascade)),
                                     self.boost, kept.columns))
        return plans

    def assumed_defense_plans(self) -> list[DefensePlan]:
        """The test phase as priced before dev: the paper columns' sources with the literal pairing
        and the middle state, and ``top_k - 1`` sources still to be chosen."""
        names = self.defenses(self.assumed_early_states())
        if self.mode is not ProtocolMode.ADAPTIVE:
            return self.defense_plans(names, None)
        extra = (CHOSEN_ON_DEV,) * max(0, self.top_k - 1)
        paper = tuple(assumed_sources(self.target.n_states)) if self.paper_columns else (self.target.ready_made,)
        plans = []
        for name in names:
            own = self.target.own_gradient(name)
            cascade = (self.target.ready_made,) + extra + ((own,) if own is not None and own != self.target.ready_made
                                                           else ())
            matrix = paper + tuple(s for s in cascade if isinstance(s, Pending) or s not in paper)
            plans.append(DefensePlan(name, matrix, cascade, self.boost))
        return plans

    def describe(self) -> dict[str, Any]:
        why = {ProtocolMode.ADAPTIVE: "candidates chosen on the dev split (the suite's default)"
               + ("; the matrix runs every paper column's source too" if self.paper_columns else ""),
               ProtocolMode.EXHAUSTIVE: "every source in the matrix and in the cascade (--exhaustive)",
               ProtocolMode.MATRIX_ONLY: "the suite has no cascade: every source in the matrix",
               ProtocolMode.AT_CHANCE: f"the model is at chance on dev ({self.dev_clean}): the final output under "
               f"{self.suite.matrix.label} with the ready-made source, and the sanity checks; nothing else"}[self.mode]
        if not self.chosen_as_asked:
            why = ("no dev split, so nothing is chosen (never on test data): every source in the matrix and in "
                   "the cascade")
        return {"mode": self.mode.value, "why": why, "top_k": self.top_k if self.mode is ProtocolMode.ADAPTIVE else None,
                "sources_available": len(self.target.sources(both_pairings=True))}


def prepare(model: nn.Module, options: EvaluationOptions, threat: ThreatModel, *, n_test_available: int,
            n_dev_available: Optional[int], input_numel: int) -> EvaluationPlan:
    """Resolve ``options`` against the model and the sizes of the splits (``n_dev_available=None``:
    no dev split) and say what will run. Reads no data: only sizes."""
    suite = options.resolved_suite()
    has_dev = n_dev_available is not None
    defenses = tuple(options.defenses) if options.defenses else None
    target = AttackTarget(model)
    target.validate_defenses(defenses)
    if not has_dev and defenses and "early" in defenses:
        raise ConfigError("'early' is chosen on the dev split, and none was given: pass dev=... or early:<n>")
    if not has_dev and defenses is None and target.is_deq:
        defenses = ("final", "ensemble")
    if options.sources is not None:
        target.sources(options.sources)  # validates
    adaptive = suite.adaptive and not options.exhaustive and options.sources is None and target.is_deq and has_dev
    if adaptive:
        mode = ProtocolMode.ADAPTIVE
    elif not suite.cascade and suite.square is None:
        mode = ProtocolMode.MATRIX_ONLY
    else:
        mode = ProtocolMode.EXHAUSTIVE
    headline = options.headline
    if headline == "early" and not has_dev:
        raise ConfigError("headline 'early' is the early-exit state chosen on the dev split, and none was given: "
                          "pass dev=... or name early:<n>")
    if headline is not None:
        target.validate_defenses([headline])
        evaluated = defenses or (("final", "early", "ensemble") if target.is_deq else ("final",))
        if headline not in evaluated:
            raise ConfigError(f"headline {headline!r} is not among the defenses evaluated ({', '.join(evaluated)}); "
                              "name one of them ('early': the early-exit state the dev split chooses)")
    n_test = n_test_available if options.n_examples is None else min(options.n_examples, n_test_available)
    n_dev = min(suite.dev_examples, n_dev_available) if n_dev_available is not None else 0
    return EvaluationPlan(suite, target, threat, mode, n_test, n_dev, input_numel, options.top_k or suite.top_k,
                          options.paper_columns,
                          defenses, tuple(options.sources) if options.sources else None, options.n_examples,
                          has_dev or not (suite.adaptive and target.is_deq), headline=headline)
