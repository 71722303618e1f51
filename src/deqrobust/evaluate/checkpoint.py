"""Evaluate a checkpoint written by ``deqrobust train``: its dataset, dev split and threat model come
from the checkpoint (each overridable)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..attacks import ThreatModel
from ..errors import ConfigError
from .. import validate
from ..utils.modes import evaluation_mode
from .api import estimate_with
from .options import EvaluationOptions
from .protocol import run_protocol
from .target import AttackTarget


def parse_eps(text: Union[str, float, None]) -> Optional[float]:
    """``"8/255"`` or ``"0.1"`` -> float (None passes through; see :func:`deqrobust.validate.parse_eps`).

    Example:
        >>> round(parse_eps("8/255"), 6), parse_eps("0.1")
        (0.031373, 0.1)
    """
    return None if text is None else validate.parse_eps(text)


def evaluate_checkpoint(
    checkpoint: Union[str, Path],
    options: Optional[EvaluationOptions] = None,
    *,
    dataset: Optional[str] = None,
    data_root: Optional[Union[str, Path]] = None,
    data_path: Optional[Union[str, Path]] = None,
    download: bool = True,
    eps: Union[str, float, None] = None,
    norm: Optional[str] = None,
    device: str = "auto",
    estimate_only: bool = False,
):
    """Load a checkpoint and run the protocol (:func:`~deqrobust.evaluate.evaluate`) on its dataset
    and threat model, with ``options`` (default: :class:`~.options.EvaluationOptions`'s).

    The dev split is rebuilt with the checkpoint's dev settings, so the early-exit step and the
    attack candidates are chosen on the same held-out examples that selected the checkpoint, never
    on test data. Under ``torchrun`` the batches are sharded across the processes and the totals
    gathered exactly. ``estimate_only`` returns the predicted cost
    (:class:`~deqrobust.evaluate.cost.CostEstimate`) instead of running the evaluation.
    """
    from ..checkpoint import load_model
    from ..data import load_dataset
    from ..distributed import init_distributed

    options = options or EvaluationOptions()
    dist = init_distributed(device)
    model, meta = load_model(checkpoint, dist.device)
    data_meta = meta.get("dataset") or {}
    name = dataset or data_meta.get("name")
    if not name:
        raise ConfigError(f"{checkpoint} records no dataset; pass --dataset")
    splits = load_dataset(name, root=data_root, download=download, path=data_path,
                          dev_size=data_meta.get("dev_size"), dev_seed=int(data_meta.get("dev_seed", 0)))
    threat_meta = meta.get("threat_model") or {}
    eps_value = parse_eps(eps) if eps is not None else threat_meta.get("eps")
    if eps_value is None:
        raise ConfigError(f"{checkpoint} records no threat model; pass --eps")
    threat = ThreatModel(norm or threat_meta.get("norm", "Linf"), float(eps_value))
    info = AttackTarget(model).describe()
    info.update({"name": (meta.get("model") or {}).get("name"), "checkpoint": str(checkpoint),
                 "checkpoint_kind": meta.get("kind"), "epoch": meta.get("epoch"),
                 "tensor_sha256": meta.get("tensor_sha256")})
    return _run(model, splits, threat, options, info, name, dist, estimate_only)


def _run(model, splits, threat: ThreatModel, options: EvaluationOptions, info: dict[str, Any], dataset: str, dist,
         estimate_only: bool):
    if estimate_only:
        return estimate_with(model, dev=splits.dev, test=splits.test, threat=threat, options=options,
                             rank=dist.rank, world_size=dist.world_size)
    with evaluation_mode(model):
        return run_protocol(model, dev=splits.dev, test=splits.test, threat=threat, options=options, model_info=info,
                            dataset=dataset, rank=dist.rank, world_size=dist.world_size)


def evaluate_own_model(
    factory: str,
    options: Optional[EvaluationOptions] = None,
    *,
    weights: Optional[Union[str, Path]] = None,
    dataset: Optional[str] = None,
    eps: Union[str, float, None] = None,
    norm: str = "Linf",
    data_root: Optional[Union[str, Path]] = None,
    data_path: Optional[Union[str, Path]] = None,
    download: bool = True,
    device: str = "auto",
    estimate_only: bool = False,
):
    """The protocol on a model built by ``factory`` (``module:function`` or ``file.py:function``)
    with ``weights`` loaded safely, on ``dataset`` at radius ``eps``, with ``options``.

    Every input is checked before anything is evaluated or written (see
    :mod:`deqrobust.evaluate.own_model`).
    """
    from ..data import load_dataset
    from ..distributed import init_distributed
    from .own_model import check_inputs, load_own_model

    options = options or EvaluationOptions()
    if not dataset:
        raise ConfigError("--model needs --dataset (there is no checkpoint to read it from)")
    radius = parse_eps(eps)
    if radius is None:
        raise ConfigError("--model needs --eps, e.g. --eps 8/255 (there is no checkpoint to read it from)")
    threat = ThreatModel(norm or "Linf", radius)
    dist = init_distributed(device)
    splits = load_dataset(dataset, root=data_root, download=download, path=data_path)
    model = load_own_model(factory, weights, dist.device)
    x = splits.dev.images[:2]
    check_inputs(model, (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).to(dist.device),
                 splits.info.num_classes, factory, dataset)
    info = AttackTarget(model).describe()
    info.update({"factory": factory, "weights": None if weights is None else str(weights)})
    return _run(model, splits, threat, options, info, dataset, dist, estimate_only)
