"""Containers for a dataset's splits and metadata, and the seeded dev hold-out.

Images are stored as (N, C, H, W) tensors, uint8 (0..255) or float32 already in [0, 1]; labels are
int64. No normalisation: models receive images in [0, 1] and normalise inside if they want to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from deqrobust.errors import ConfigError, DatasetError

__all__ = ["Augmentation", "DatasetInfo", "DatasetSplits", "Split", "hold_out", "stratified_indices"]


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation: random crop after zero padding by ``padding`` pixels, and random
    horizontal flip (probability 1/2) if ``flip``. ``Augmentation()`` is the identity."""

    padding: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.padding, int) or self.padding < 0:
            raise ConfigError(f"Augmentation.padding must be an int >= 0, got {self.padding!r}")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a dataset.

    Attributes:
        name: Registry name, e.g. ``"cifar10"``.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        in_channels: Image channels (1 or 3).
        image_size: ``(H, W)``.
        class_names: Class names in label order, or ``None`` if unknown.
        augmentation: Default training augmentation for this dataset.
        default_dev_size: Default number of training images held out as the dev split.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    class_names: tuple[str, ...] | None
    augmentation: Augmentation
    default_dev_size: int

    def __post_init__(self) -> None:
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")


@dataclass(frozen=True, repr=False, eq=False)
class Split:
    """One split: ``images`` (N, C, H, W) uint8 or float32 in [0, 1], ``labels`` (N,) int64.

    Example:
        >>> import torch
        >>> s = Split(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), "train")
        >>> len(s), s
        (4, Split('train', images=(4, 1, 8, 8) float32, labels=(4,)))
    """

    images: Tensor
    labels: Tensor
    name: str
    dataset: str = ""  # the dataset it belongs to (set by :class:`DatasetSplits`)

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if not isinstance(x, Tensor) or x.ndim != 4 or x.dtype not in (torch.uint8, torch.float32):
            raise DatasetError(
                f"split {self.name!r}: images must be a (N, C, H, W) uint8 or float32 tensor, "
                f"got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}"
            )
        if not isinstance(y, Tensor) or y.ndim != 1 or y.dtype != torch.int64 or len(y) != len(x):
            raise DatasetError(
                f"split {self.name!r}: labels must be an int64 tensor of shape ({len(x)},), "
                f"got {getattr(y, 'dtype', type(y))} {tuple(getattr(y, 'shape', ()))}"
            )
        if x.dtype == torch.float32 and x.numel() and not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)).nonzero().flatten()[:5].tolist()
            raise DatasetError(f"split {self.name!r}: float images hold NaN or Inf (examples {bad})")
        if x.dtype == torch.float32 and x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
            raise DatasetError(f"split {self.name!r}: float images must lie in [0, 1]")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        dtype = str(self.images.dtype).removeprefix("torch.")
        return f"Split({self.name!r}, images={tuple(self.images.shape)} {dtype}, labels={tuple(self.labels.shape)})"

    def subset(self, indices: Tensor, name: str | None = None) -> Split:
        """The samples at ``indices`` (in that order) as a new split."""
        return Split(self.images[indices], self.labels[indices], self.name if name is None else name, self.dataset)


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """Train / dev / test splits of one dataset. ``dev`` is held out from the official training set
    (disjoint from ``train``) for model selection; ``test`` is only for the final report."""

    train: Split
    dev: Split
    test: Split
    info: DatasetInfo = field(repr=False)

    def __post_init__(self) -> None:
        shape = (self.info.in_channels, *self.info.image_size)
        for split in (self.train, self.dev, self.test):
            if not split.dataset:
                object.__setattr__(split, "dataset", self.info.name)
            if tuple(split.images.shape[1:]) != shape:
                raise DatasetError(
                    f"{self.info.name} {split.name}: images have shape {tuple(split.images.shape[1:])}, "
                    f"expected {shape}"
                )
            if len(split) and not (0 <= int(split.labels.min()) and int(split.labels.max()) < self.info.num_classes):
                raise DatasetError(
                    f"{self.info.name} {split.name}: labels outside 0..{self.info.num_classes - 1}"
                )


def _check_size(size: int, n: int, what: str) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < n:
        raise ConfigError(f"{what} must be an int in [0, {n}) for {n} training samples, got {size!r}")


def stratified_indices(labels: Tensor, size: int, seed: int) -> Tensor:
    """Pick ``size`` indices with class proportions as in ``labels``, reproducibly from ``seed``.

    Each class gets ``floor(size * n_c / N)`` samples, and the remainder goes to the classes with
    the largest fractional parts (ties: lower label). Within a class the samples are the first of a
    seeded ``torch.randperm``. The result is sorted.

    Example:
        >>> import torch
        >>> y = torch.tensor([0] * 6 + [1] * 4)
        >>> idx = stratified_indices(y, 5, seed=0)
        >>> y[idx].bincount().tolist()
        [3, 2]
    """
    n = len(labels)
    _check_size(size, n + 1, "size")
    gen = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, sorted=True, return_counts=True)
    quota = counts.double() * size / n if n else counts.double()
    take = quota.floor().long()
    remainder = size - int(take.sum())
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]).item(), i))
    for i in order[:remainder]:
        take[i] += 1
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)


def hold_out(train: Split, dev_size: int, dev_seed: int = 0, *, stratify: bool = False) -> tuple[Split, Split]:
    """Split ``train`` into (train, dev) with ``dev_size`` samples chosen by ``dev_seed``.

    The dev indices are the first ``dev_size`` of ``torch.randperm`` under a generator seeded with
    ``dev_seed`` (or :func:`stratified_indices` if ``stratify``); both parts keep the original order.

    Example:
        >>> import torch
        >>> s = Split(torch.zeros(10, 1, 2, 2), torch.arange(10) % 2, "train")
        >>> tr, dev = hold_out(s, 3, dev_seed=0)
        >>> len(tr), len(dev), dev.name
        (7, 3, 'dev')
    """
    n = len(train)
    _check_size(dev_size, n, "dev_size")
    if stratify:
        dev_idx = stratified_indices(train.labels, dev_size, dev_seed)
    else:
        gen = torch.Generator().manual_seed(dev_seed)
        dev_idx = torch.randperm(n, generator=gen)[:dev_size].sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[dev_idx] = False
    return train.subset(torch.nonzero(keep).flatten(), "train"), train.subset(dev_idx, "dev")
