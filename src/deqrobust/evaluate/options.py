"""What a user asks of an evaluation, as one value.

The CLI, the Python API (:func:`~deqrobust.evaluate.evaluate`), ``reproduce`` and checkpoint loading
each build one :class:`EvaluationOptions`; it is checked where it is built, before any compute, and
handed on whole (no keyword relay). :class:`~deqrobust.evaluate.plan.EvaluationPlan` resolves it
against a model and the sizes of the splits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..attackable import EstimatorSettings
from ..errors import ConfigError
from ..utils.names import split_names
from .suites import Suite, get_suite


def dev_size(suite_dev_examples: int, n_examples: Optional[int], dev_examples: Optional[int]) -> int:
    """The dev examples the selections read: ``dev_examples`` when given; otherwise the suite's,
    never more than the test examples asked for (a small run stays small: choosing among the
    candidates on more dev examples than the number being measured on test buys nothing).

    Example:
        >>> dev_size(80, None, None), dev_size(80, 32, None), dev_size(80, 32, 50)
        (80, 32, 50)
    """
    if dev_examples is not None:
        return dev_examples
    return suite_dev_examples if n_examples is None else min(suite_dev_examples, n_examples)


def _positive(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _names(name: str, value: Any) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):  # one name, or several separated by commas as on the command line
        value = split_names(value)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        example = '["final"]' if name == "defenses" else '["exact"]'
        raise ConfigError(f"{name} must be a name or a list of names, e.g. {example}, got {value!r}")
    if not value:
        raise ConfigError(f"{name} must name at least one (None: the default), got an empty list")
    return tuple(value)


@dataclass(frozen=True)
class EvaluationOptions:
    """Everything a user chooses about an evaluation (the model, the data and the threat model aside).

    ``n_examples`` test examples (default: the whole test split); ``dev_examples`` for the dev
    selections (default: the suite's, bounded by ``n_examples``, see :func:`dev_size`);
    ``sanity_examples`` for the ε-growth and iteration checks; ``defenses`` and ``sources`` restrict
    what is evaluated; ``exhaustive`` attacks with every source instead of the candidates chosen on
    dev; ``top_k`` sources enter the cascade. The adaptive protocol's test matrix runs the candidates
    chosen on dev (the cascade's sources); ``paper_columns=True`` (``--paper-columns``, and
    ``reproduce``) adds the source of every column of the paper's tables. With ``out_dir`` the run is resumable (``resume``).
    ``headline`` names the headline defense (default: the best worst case on dev, fixed before the
    test split is read); ``return_adversarial`` keeps, per defense, the point that broke each example.

    Example:
        >>> options = EvaluationOptions(suite="quick", n_examples=32, defenses=["final"])
        >>> options.resolved_suite().dev_examples, options.defenses
        (32, ('final',))
        >>> EvaluationOptions(defenses="final,early:2").defenses
        ('final', 'early:2')
        >>> EvaluationOptions(defenses=3)
        Traceback (most recent call last):
        ...
        deqrobust.errors.ConfigError: defenses must be a name or a list of names, e.g. ["final"], got 3
    """

    suite: Union[str, Suite] = "quick"
    n_examples: Optional[int] = None
    dev_examples: Optional[int] = None
    sanity_examples: Optional[int] = None
    seed: int = 0
    batch_size: int = 128
    defenses: Union[str, Sequence[str], None] = None  # kept as a tuple (a string: comma-separated names)
    sources: Union[str, Sequence[str], None] = None  # kept as a tuple
    exhaustive: bool = False
    top_k: Optional[int] = None
    paper_columns: bool = False
    settings: Optional[EstimatorSettings] = None
    out_dir: Union[str, Path, None] = None  # kept as a Path
    resume: bool = True
    progress: bool = True
    headline: Optional[str] = None  # the headline defense; default: the best dev worst case
    return_adversarial: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.suite, str):
            get_suite(self.suite)  # an unknown name is reported here
        elif not isinstance(self.suite, Suite):
            raise ConfigError(f"suite must be a suite name or a Suite, got {self.suite!r}")
        for name in ("n_examples", "dev_examples", "sanity_examples", "batch_size", "top_k"):
            _positive(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "defenses", _names("defenses", self.defenses))
        object.__setattr__(self, "sources", _names("sources", self.sources))
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.headline is not None and not isinstance(self.headline, str):
            raise ConfigError(f"headline must be a defense name such as 'final', got {self.headline!r}")

    def resolved_suite(self) -> Suite:
        """The suite with the dev size of :func:`dev_size` and ``sanity_examples`` applied."""
        suite = get_suite(self.suite) if isinstance(self.suite, str) else self.suite
        dev = dev_size(suite.dev_examples, self.n_examples, self.dev_examples)
        sanity = self.sanity_examples or suite.sanity_examples
        if (dev, sanity) == (suite.dev_examples, suite.sanity_examples):
            return suite
        return replace(suite, dev_examples=dev, sanity_examples=sanity)
