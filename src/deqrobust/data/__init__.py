"""Datasets (train / dev / test splits) and a deterministic batch loader.

What lives here: verified downloads and safe extraction (``download``), split containers and the
seeded dev hold-out (``splits``), one module per dataset (``digits``, ``fashion_mnist``, ``cifar``,
``svhn``), and :class:`BatchLoader` (``loader``). Images stay in [0, 1] with no normalisation; the
dev split is held out from the training set for model selection, never taken from the test set.

Downloads are cached under ``root``, else ``$DEQROBUST_DATA``, else ``~/.cache/deqrobust``, one
folder per dataset. This package is a leaf: it imports nothing from ``deqrobust`` except
``deqrobust.errors``.

Example:
    >>> from deqrobust.data import BatchLoader, load_dataset
    >>> splits = load_dataset("digits")
    >>> loader = BatchLoader(splits.train, 64, shuffle=True, augment=splits.info.augmentation, seed=0)
    >>> x, y = next(iter(loader))
    >>> tuple(x.shape), x.dtype, float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    ((64, 1, 8, 8), torch.float32, True)
"""

from __future__ import annotations

import os
from collections.abc import Callable

from deqrobust.errors import ConfigError

from . import cifar, digits, fashion_mnist, svhn
from .download import cache_root, download_file, extract_tar_gz, md5_of
from .loader import BatchLoader, crop_with_offsets, flip_where, random_augment
from .splits import Augmentation, DatasetInfo, DatasetSplits, Split, hold_out

__all__ = [
    "DATASETS",
    "Augmentation",
    "BatchLoader",
    "DatasetInfo",
    "DatasetSplits",
    "Split",
    "cache_root",
    "crop_with_offsets",
    "dataset_info",
    "download_file",
    "extract_tar_gz",
    "flip_where",
    "hold_out",
    "load_dataset",
    "md5_of",
    "random_augment",
]

_INFOS: dict[str, DatasetInfo] = {
    "digits": digits.INFO,
    "fashion_mnist": fashion_mnist.INFO,
    "cifar10": cifar.CIFAR10_INFO,
    "cifar100": cifar.CIFAR100_INFO,
    "svhn": svhn.INFO,
}
_LOADERS: dict[str, Callable[..., DatasetSplits]] = {
    "fashion_mnist": fashion_mnist.load_fashion_mnist,
    "cifar10": cifar.load_cifar10,
    "cifar100": cifar.load_cifar100,
    "svhn": svhn.load_svhn,
}

#: Registered dataset names.
DATASETS: tuple[str, ...] = tuple(_INFOS)


def _check_name(name: str) -> None:
    if name not in _INFOS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def dataset_info(name: str) -> DatasetInfo:
    """Metadata of a registered dataset, without loading it.

    Example:
        >>> info = dataset_info("cifar10")
        >>> info.num_classes, info.image_size, info.augmentation
        (10, (32, 32), Augmentation(padding=4, flip=True))
    """
    _check_name(name)
    return _INFOS[name]


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    dev_size: int | None = None,
    dev_seed: int = 0,
    path: str | os.PathLike[str] | None = None,
) -> DatasetSplits:
    """Load a registered dataset as train / dev / test splits.

    Args:
        name: One of :data:`DATASETS`.
        root: Cache folder (default ``$DEQROBUST_DATA`` or ``~/.cache/deqrobust``).
        download: Download missing files (MD5-verified) into the cache.
        dev_size: Training samples held out as dev (default: ``dataset_info(name).default_dev_size``).
        dev_seed: Seed of the dev hold-out.
        path: A local copy of the dataset files to read instead of the cache (not for ``digits``,
            which ships with scikit-learn).

    Raises:
        ConfigError: for an unknown name or an invalid ``dev_size``.
        DatasetError: if files are missing, corrupted or malformed.

    Example:
        >>> splits = load_dataset("digits", dev_size=100, dev_seed=1)
        >>> len(splits.dev), splits.info.num_classes
        (100, 10)
    """
    _check_name(name)
    if name == "digits":
        if path is not None:
            raise ConfigError("digits ships with scikit-learn; it takes no path=")
        return digits.load_digits(dev_size=dev_size, dev_seed=dev_seed)
    return _LOADERS[name](root, download=download, path=path, dev_size=dev_size, dev_seed=dev_seed)
