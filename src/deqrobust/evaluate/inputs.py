"""What an evaluation reads: a dataset split, or labelled examples given as tensors ``(x, y)``,
checked where they enter and read only when their phase comes (the test split after every choice)."""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any, Optional, Union, overload

import torch
from torch import Tensor

from ..attacks import ThreatModel
from ..data.splits import Split
from ..errors import ConfigError, DEQInputError
from ..validate import check_dtype, check_examples, check_labels_in_range, check_model, model_dtype, probe_model


@dataclass(frozen=True, eq=False)
class Examples:
    """Labelled examples given as tensors, ``(x, y)``: any input shape with a batch dimension,
    floats in [0, 1], int64 labels (a dataset's :class:`~deqrobust.data.Split` works as it is)."""

    images: Tensor
    labels: Tensor
    name: str

    def __len__(self) -> int:
        return len(self.labels)


Data = Union[Split, Examples, tuple[Tensor, Tensor]]
Labelled = Union[Split, Examples]  # what :func:`as_examples` makes of a :data:`Data`


@overload
def as_examples(data: None, name: str) -> None: ...
@overload
def as_examples(data: Data, name: str) -> Labelled: ...
def as_examples(data: Any, name: str) -> Any:
    """A split as the protocol reads it: an ``(x, y)`` pair becomes :class:`Examples` (validated by
    :func:`deqrobust.validate.check_examples`: finite, in [0, 1], int64 labels >= 0); a split object
    is passed through untouched (its tensors are read later, when their phase comes)."""
    if data is None or (not isinstance(data, (tuple, list, Tensor)) and hasattr(data, "__len__")):
        return data  # a split, or any object read as one (its tensors are read when their phase comes)
    if not isinstance(data, (tuple, list)) or len(data) != 2 or not all(isinstance(t, Tensor) for t in data):
        got = f"a {type(data).__name__}" + (f" of {len(data)} item(s)" if isinstance(data, (tuple, list)) else "")
        raise ConfigError(f"{name} must be a Split or a pair of tensors (x, y), got {got}")
    x, y = data
    check_examples(x, y, name)
    return Examples(x, y, name)


def check_call(model: Any, dev: Optional[Labelled], test: Labelled, threat: Any) -> int:
    """Everything an evaluation or an estimate is handed, checked before any attack: the model is
    an ``nn.Module`` that reads one example of the data in its own dtype (one forward, no autograd),
    ``threat`` a :class:`~deqrobust.attacks.ThreatModel` whose radius fits the inputs, and the
    labels of tensor inputs (and of the dev split, read anyway) within the model's classes. Returns
    the number of classes. The test split's images stay unread when there is a dev split."""
    check_model(model)
    if not isinstance(threat, ThreatModel):
        raise ConfigError(f"threat must be a ThreatModel, e.g. ThreatModel(\"Linf\", \"8/255\") (from deqrobust.attacks), "
                          f"got {type(threat).__name__} {threat!r}")
    shaped = dev if dev is not None and len(dev) else test
    if not len(shaped):
        raise ConfigError(f"the {shaped.name} split is empty: nothing to evaluate")
    x_one, _ = split_tensors(shaped, 1, torch.device("cpu"), model_dtype(model))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n_classes = probe_model(model, x_one.to(device), f"{shaped.name} inputs")
    if threat.norm == "L2" and threat.eps > math.sqrt(x_one[0].numel()):
        raise ConfigError(f"L2 eps {threat.eps:g} exceeds {math.sqrt(x_one[0].numel()):.4g}, the largest distance between "
                          f"two inputs of {x_one[0].numel()} values in [0, 1]")
    if isinstance(test, Examples) and test is not shaped and tuple(test.images.shape[1:]) != tuple(x_one.shape[1:]):
        raise DEQInputError(f"test inputs have shape {tuple(test.images.shape[1:])} per example but {shaped.name} inputs "
                            f"{tuple(x_one.shape[1:])}: both splits must be inputs of the same model")
    if isinstance(test, Examples):
        check_dtype(model, test.images.dtype, "test inputs")
    for split in (dev, test):
        if isinstance(split, Examples) or (split is dev and split is not None):
            check_labels_in_range(split.labels, n_classes, split.name)
    return n_classes


def split_tensors(split: Labelled, n: Optional[int], device: torch.device,
                  dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """The first ``n`` examples of a split as [0,1] inputs of ``dtype`` (default float32: the
    model's own, see :func:`~deqrobust.validate.model_dtype`) and int64 labels. Tensor inputs keep
    their dtype (a mismatch with the model is an error of :func:`check_call`)."""
    count = len(split.labels) if n is None else min(int(n), len(split.labels))
    images = split.images[:count]
    dtype = dtype or torch.float32
    if images.dtype == torch.uint8:
        x = images.to(dtype) / 255.0
    else:
        x = images if isinstance(split, Examples) else images.to(dtype)
    return x.to(device), split.labels[:count].to(device)
