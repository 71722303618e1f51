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
from ..validate import check_model, model_dtype
from .cost import CostEstimate, estimate_cost
from .inputs import Data, Examples, as_examples, check_call, split_tensors
from .options import EvaluationOptions
from .plan import ProtocolMode
from .protocol import plan_for, plan_key, run_protocol, unless_guessing, warn_if_downgraded
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
    defenses: Union[str, Sequence[str], None] = None,
    sources: Union[str, Sequence[str], None] = None,
    exhaustive: bool = False,
    top_k: Optional[int] = None,
    paper_columns: bool = False,
    settings: Optional[EstimatorSettings] = None,
    model_info: Optional[dict[str, Any]] = None,
    dataset: Optional[str] = None,
    headline: Optional[str] = None,
    return_adversarial: bool = False,
    estimate: Optional[CostEstimate] = None,
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

    Every input is checked before any attack (:func:`~.inputs.check_call`), each bad one with the
    library's own error. The headline (``best_defense``, ``autoattack_acc``) is the defense
    ``headline`` names, or the one with the best worst case on dev — fixed before the test split
    is read; every accuracy carries its 95 % Wilson interval. Per defense, ``robust`` flags each
    test example and ``broken_by`` names the attack that broke each broken one;
    ``return_adversarial=True`` also keeps the point that broke it (``adversarial``, the test inputs
    with those points in place). ``estimate=`` reuses :func:`estimate`'s timing probe. A model that
    is not a DEQ is attacked with its own gradient only, with a warning and a note saying so.

    Example (the tutorial in ``docs/tutorial.md`` runs it on a trained model)::

        result = evaluate(model, dev=splits.dev, test=splits.test, threat=ThreatModel("Linf", "8/255"),
                          suite="quick", n_examples=100, out_dir="runs/eval")
        print(result)  # per defense: clean and worst case with 95 % intervals; the headline
    """
    options = EvaluationOptions(suite=suite, n_examples=n_examples, dev_examples=dev_examples, seed=seed,
                                batch_size=batch_size, defenses=defenses, sources=sources, exhaustive=exhaustive,
                                top_k=top_k, paper_columns=paper_columns, settings=settings, out_dir=out_dir,
                                resume=resume, progress=progress, headline=headline,
                                return_adversarial=return_adversarial)
    if estimate is not None and not isinstance(estimate, CostEstimate):
        raise ConfigError(f"estimate must be what estimate(...) returned, got {type(estimate).__name__}")
    dev_split, test_split = as_examples(dev, "dev"), as_examples(test, "test")
    with evaluation_mode(check_model(model)):
        return run_protocol(model, dev=dev_split, test=test_split, threat=threat, options=options,
                            model_info=model_info, dataset=dataset or data_name(test_split), rank=rank,
                            world_size=world_size, given_estimate=estimate)


def data_name(split: Any) -> str:
    """What the report calls data given without a dataset name: ``"tensors"`` for ``(x, y)``
    pairs, else the split's ``dataset`` attribute, else ``"unnamed dataset"``."""
    if isinstance(split, Examples):
        return "tensors"
    return str(getattr(split, "dataset", "") or "unnamed dataset")


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
    defenses: Union[str, Sequence[str], None] = None,
    sources: Union[str, Sequence[str], None] = None,
    exhaustive: bool = False,
    top_k: Optional[int] = None,
    paper_columns: bool = False,
    settings: Optional[EstimatorSettings] = None,
    headline: Optional[str] = None,
    rank: int = 0,
    world_size: int = 1,
) -> CostEstimate:
    """Predict the wall time of :func:`evaluate` with the same arguments, without running it.

    Times one batch of each kind of work on dev examples (see :mod:`deqrobust.evaluate.cost`) and
    prices the plan's attack runs; of the test split only its size is read. ``print(estimate(...))``
    shows the prediction; ``evaluate(..., estimate=it)`` reuses its probe.
    """
    options = EvaluationOptions(suite=suite, n_examples=n_examples, dev_examples=dev_examples, seed=seed,
                                batch_size=batch_size, defenses=defenses, sources=sources, exhaustive=exhaustive,
                                top_k=top_k, paper_columns=paper_columns, settings=settings, progress=False,
                                headline=headline)
    return estimate_with(model, dev=as_examples(dev, "dev"), test=as_examples(test, "test"), threat=threat,
                         options=options, rank=rank, world_size=world_size)


def estimate_with(model: nn.Module, *, dev: Any, test: Any, threat: ThreatModel, options: EvaluationOptions,
                  rank: int = 0, world_size: int = 1) -> CostEstimate:
    """:func:`estimate` with its options already built (checkpoint loading, the CLI)."""
    if dev is None:
        raise ConfigError("the cost estimate times the work on dev examples; pass dev=...")
    with evaluation_mode(check_model(model)):  # the probe too: a model in train mode is probed in eval mode
        check_call(model, dev, test, threat)
        plan = plan_for(model, options, threat, dev, test)
        warn_if_downgraded(plan, rank)
        seed_everything(options.seed)
        device = next(model.parameters()).device
        runner = AttackRunner(model, threat, options.seed, EvalState(None, {}), options.batch_size, options.settings,
                              plan.suite.adjoint_variant, False, rank, world_size)
        x_dev, y_dev = split_tensors(dev, plan.n_dev, device, model_dtype(model))
        key = plan_key(model, plan, options, world_size)
        if plan.mode in (ProtocolMode.ADAPTIVE, ProtocolMode.EXHAUSTIVE):
            plan = unless_guessing(plan, x_dev, y_dev, options.batch_size)  # what the evaluation will run
        priced = estimate_cost(runner, plan, assumed_runs(plan), x_dev, y_dev, world_size)
        priced.plan_key = key
        return priced
