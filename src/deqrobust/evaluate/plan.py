"""What an evaluation will run, decided once from its arguments before any compute: the suite, the
mode (adaptive, exhaustive, matrix-only), the number of test examples, the defenses and sources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from torch import nn

from ..errors import ConfigError
from ..gradients import GradientSource
from .inputs import Data
from .suites import Suite, get_suite
from .target import AttackTarget


@dataclass(frozen=True)
class EvaluationPlan:
    """An evaluation's settings, checked before any compute: suite, protocol, sizes, defenses."""

    suite: Suite
    target: AttackTarget
    mode: str
    n_test: int
    top_k: int
    requested_defenses: Optional[tuple[str, ...]]
    requested_sources: Optional[tuple[str, ...]]
    requested_n_test: Optional[int] = None
    chosen_as_asked: bool = True  # False: the suite is adaptive but there is no dev split to choose on

    def sources(self) -> list[GradientSource]:
        """The sources of a run that is not adaptive: the requested ones, or every source (both
        adjoint pairings when exhaustive; the paper's literal pairing in a matrix-only suite, e.g.
        Table 2)."""
        if self.requested_sources is not None:
            return self.target.sources(self.requested_sources)
        return self.target.sources(both_pairings=self.mode == "exhaustive")

    def describe(self) -> dict[str, Any]:
        why = {"adaptive": "candidates chosen on the dev split (the suite's default)",
               "exhaustive": "every source in the matrix and in the cascade (--exhaustive)",
               "matrix-only": "the suite has no cascade: every source in the matrix"}[self.mode]
        if not self.chosen_as_asked:
            why = ("no dev split, so nothing is chosen (never on test data): every source in the matrix and in "
                   "the cascade")
        return {"mode": self.mode, "why": why, "top_k": self.top_k if self.mode == "adaptive" else None,
                "sources_available": len(self.target.sources(both_pairings=True))}


def prepare(model: nn.Module, *, suite: Union[str, Suite], test: Data, n_examples: Optional[int], batch_size: int,
            defenses: Optional[Sequence[str]], sources: Optional[Sequence[str]], exhaustive: bool,
            top_k: Optional[int], has_dev: bool = True) -> EvaluationPlan:
    """Check every argument of an evaluation (before any compute) and say what will run."""
    suite = get_suite(suite) if isinstance(suite, str) else suite
    for name, value in (("n_examples", n_examples), ("batch_size", batch_size), ("top_k", top_k)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    target = AttackTarget(model)
    target.validate_defenses(defenses)
    if not has_dev and defenses and "early" in defenses:
        raise ConfigError("'early' is chosen on the dev split, and none was given: pass dev=... or early:<n>")
    if not has_dev and defenses is None and target.is_deq:
        defenses = ["final", "ensemble"]
    if sources is not None:
        target.sources(sources)  # validates
    adaptive = suite.adaptive and not exhaustive and sources is None and target.is_deq and has_dev
    if adaptive:
        mode = "adaptive"
    elif not suite.cascade and suite.square is None:
        mode = "matrix-only"
    else:
        mode = "exhaustive"
    n_test = len(test) if n_examples is None else min(int(n_examples), len(test))  # the size only: no test data read
    return EvaluationPlan(suite, target, mode, n_test, top_k or suite.top_k,
                          tuple(defenses) if defenses else None, tuple(sources) if sources else None,
                          n_examples, has_dev or not (suite.adaptive and target.is_deq))
