"""The Python entry points: :func:`evaluate` runs the protocol on a model, :func:`estimate` prices
it. Each builds one :class:`~.options.EvaluationOptions` from its keywords and hands it to the
driver (:mod:`.protocol`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import nn

from ..attackable import EstimatorSettings
from ..attacks import ThreatModel
from ..errors import ConfigError
from ..utils.modes import evaluation_mode
from ..utils.seeding import seed_everything
from .cost import CostEstimate, estimate_cost
from .inputs import Data, as_examples, split_tensors
from .options import EvaluationOptions
from .protocol import plan_for, run_protocol
from .results import EvaluationResult
from .runner import AttackRunner
from .runs import assumed_runs
from .state import EvalState
from .suites import Suite


def evaluate(
    model: nn.Module,
    *,
    dev: Optional[Data],
    test: Data,
    threat: ThreatModel,
    suite: Union[str, Suite] = "quick",
    n_examples: Optional[int] = None,
    dev_examples: Optional[int] = None,
    seed: int = 0,
    out_dir: Optional[Union[str, Path]] = None,
    resume: bool = True,
    progress: bool = True,
    batch_size: int = 128,
    defenses: Optional[Sequence[str]] = None,
    sources: Optional[Sequence[str]] = None,
    exhaustive: bool = False,
    top_k: Optional[int] = None,
    paper_columns: bool = False,
    settings: Optional[EstimatorSettings] = None,
    model_info: Optional[dict[str, Any]] = None,
    dataset: str = "",
    rank: int = 0,
    world_size: int = 1,
) -> EvaluationResult:
    """Run the white-box protocol and return (and, with ``out_dir``, write) the results.

    The early-exit step and (adaptive protocol, the default of the ``quick``, ``paper`` and ``full``
    suites) the attack candidates are chosen on the first dev examples only (the suite's
    ``dev_examples``, never more than ``n_examples``: see :func:`~.options.dev_size`); the test split
    is read once, after that. ``exhaustive=True`` attacks with every gradient source in the matrix
    and in the cascade instead; ``sources`` restricts the sources of an exhaustive run. With
    ``out_dir`` a state file makes the run resumable (``resume=False`` starts over).
    ``rank``/``world_size`` shard the batches across processes (results are gathered exactly). A model
    in train mode is evaluated in eval mode and switched back afterwards (with a warning).

    ``dev`` and ``test`` are dataset splits or ``(x, y)`` tensor pairs. With ``dev=None`` nothing is
    chosen: no early-exit defense, every source attacked (exhaustive), no cost estimate — never a
    selection made on test data; the report says so.

    Example (the tutorial in ``docs/tutorial.md`` runs it on a trained model)::

        result = evaluate(model, dev=splits.dev, test=splits.test, threat=ThreatModel("Linf", 0.1),
                          suite="quick", n_examples=100, out_dir="runs/eval")
        print(result.best_defense, result.autoattack_acc)
    """
    options = EvaluationOptions(suite=suite, n_examples=n_examples, dev_examples=dev_examples, seed=seed,
                                batch_size=batch_size, defenses=defenses, sources=sources, exhaustive=exhaustive,
                                top_k=top_k, paper_columns=paper_columns, settings=settings, out_dir=out_dir,
                                resume=resume, progress=progress)
    dev_split, test_split = as_examples(dev, "dev"), as_examples(test, "test")
    with evaluation_mode(model):
        return run_protocol(model, dev=dev_split, test=test_split, threat=threat, options=options,
                            model_info=model_info, dataset=dataset, rank=rank, world_size=world_size)


def estimate(
    model: nn.Module,
    *,
    dev: Data,
    test: Data,
    threat: ThreatModel,
    suite: Union[str, Suite] = "quick",
    n_examples: Optional[int] = None,
    dev_examples: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 128,
    defenses: Optional[Sequence[str]] = None,
    sources: Optional[Sequence[str]] = None,
    exhaustive: bool = False,
    top_k: Optional[int] = None,
    paper_columns: bool = False,
    settings: Optional[EstimatorSettings] = None,
    rank: int = 0,
    world_size: int = 1,
) -> CostEstimate:
    """Predict the wall time of :func:`evaluate` with the same arguments, without running it.

    Times one batch of each kind of work on dev examples (see :mod:`deqrobust.evaluate.cost`) and
    prices the plan's attack runs; of the test split only its size is read.
    """
    options = EvaluationOptions(suite=suite, n_examples=n_examples, dev_examples=dev_examples, seed=seed,
                                batch_size=batch_size, defenses=defenses, sources=sources, exhaustive=exhaustive,
                                top_k=top_k, paper_columns=paper_columns, settings=settings, progress=False)
    return estimate_with(model, dev=as_examples(dev, "dev"), test=as_examples(test, "test"), threat=threat,
                         options=options, rank=rank, world_size=world_size)


def estimate_with(model: nn.Module, *, dev: Any, test: Any, threat: ThreatModel, options: EvaluationOptions,
                  rank: int = 0, world_size: int = 1) -> CostEstimate:
    """:func:`estimate` with its options already built (checkpoint loading, the CLI)."""
    if dev is None:
        raise ConfigError("the cost estimate times the work on dev examples; pass dev=...")
    with evaluation_mode(model):
        plan = plan_for(model, options, threat, dev, test)
        seed_everything(options.seed)
        device = next(model.parameters()).device
        runner = AttackRunner(model, threat, options.seed, EvalState(None, {}), options.batch_size, options.settings,
                              plan.suite.adjoint_variant, False, rank, world_size)
        x_dev, y_dev = split_tensors(dev, plan.n_dev, device)
        return estimate_cost(runner, plan, assumed_runs(plan), x_dev, y_dev, world_size)
