"""CIFAR-10 and CIFAR-100 from the official "python version" archives.

The archive is downloaded and MD5-verified into the cache (or an extracted folder is given by the
user), extracted safely, and its pickled batches are read with a restricted unpickler that builds
numpy arrays and builtin containers only: any other global (a pickle that would run code) raises
:class:`DatasetError` without being called.
"""

from __future__ import annotations

import builtins
import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deqrobust.errors import DatasetError

from .download import cache_root, download_file, extract_tar_gz, verify_md5
from .splits import Augmentation, DatasetInfo, DatasetSplits, Split, hold_out

__all__ = [
    "CIFAR10_INFO",
    "CIFAR100_INFO",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "CIFAR100_MD5",
    "CIFAR100_URL",
    "load_cifar10",
    "load_cifar100",
    "read_cifar_batch",
    "restricted_unpickle",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_FOLDER = "cifar-100-python"

CIFAR10_INFO = DatasetInfo(
    name="cifar10",
    num_classes=10,
    in_channels=3,
    image_size=(32, 32),
    class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    augmentation=Augmentation(padding=4, flip=True),
    default_dev_size=1000,
)

_CIFAR100_NAMES = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel
can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea
seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table
tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
worm
""".split()

CIFAR100_INFO = DatasetInfo(
    name="cifar100",
    num_classes=100,
    in_channels=3,
    image_size=(32, 32),
    class_names=tuple(_CIFAR100_NAMES),
    augmentation=Augmentation(padding=4, flip=True),
    default_dev_size=1000,
)


# ----------------------------------------------------------------------------- restricted unpickling


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles from Python 3 store bytes
    }
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.numeric", "_frombuffer")] = getattr(numeric, "_frombuffer")  # noqa: B009
    for module in ("builtins", "__builtin__"):
        for name in ("list", "dict", "tuple", "set", "frozenset", "bytearray", "bytes", "str", "int", "float", "bool"):
            allowed[(module, name)] = getattr(builtins, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self._source}: refusing to unpickle {module}.{name} (a dataset batch may only contain "
                "numpy arrays and builtin containers); the file is not a genuine dataset file, delete it."
            ) from None


def restricted_unpickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle a dataset file, allowing only numpy arrays/dtypes and builtin containers.

    Raises:
        DatasetError: if the pickle references any other global, or is malformed.
    """
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, str(path)).load()
    except DatasetError:
        raise
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: missing dataset file") from exc
    except Exception as exc:  # truncated or garbled pickles raise many different types
        raise DatasetError(f"{path}: not a readable dataset pickle ({type(exc).__name__}: {exc})") from exc


# ----------------------------------------------------------------------------- parsing


def _key(entry: dict, key: str, source: object) -> Any:
    for k in (key, key.encode()):
        if k in entry:
            return entry[k]
    raise DatasetError(f"{source}: no {key!r} entry (keys: {sorted(map(str, entry))}); not a CIFAR batch")


def read_cifar_batch(
    path: str | os.PathLike[str], label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch file into images (N, 3, 32, 32) uint8 and labels (N,) int64.

    Args:
        path: A pickled batch (``data_batch_1``, ``test_batch``, CIFAR-100 ``train``...).
        label_key: ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100).
        num_classes: Labels must lie in ``0 .. num_classes - 1``.

    Raises:
        DatasetError: for an unsafe pickle or a malformed batch (shape, dtype, label range).
    """
    entry = restricted_unpickle(path)
    if not isinstance(entry, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(entry).__name__}")
    data, labels = _key(entry, "data", path), _key(entry, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: {label_key!r} is not a list of integers") from exc
    if labels.shape != (len(data),):
        raise DatasetError(f"{path}: {len(data)} images but {label_key!r} has shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels outside 0..{num_classes - 1}")
    # each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major 32x32
    return data.reshape(-1, 3, 32, 32), labels


def _read_files(folder: Path, names: tuple[str, ...], label_key: str, num_classes: int, split: str) -> Split:
    parts = [read_cifar_batch(folder / n, label_key, num_classes) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), split)


# ----------------------------------------------------------------------------- locating the files


def _locate(
    name: str,
    folder: str,
    required: tuple[str, ...],
    *,
    root: str | os.PathLike[str] | None,
    download: bool,
    path: str | os.PathLike[str] | None,
    url: str,
    md5: str,
    progress: bool,
) -> Path:
    if path is not None:
        for candidate in (Path(path), Path(path) / folder):
            if all((candidate / r).is_file() for r in required):
                return candidate
        raise DatasetError(
            f"{name}: {path} is not an extracted {folder} folder (or its parent): it needs "
            f"{', '.join(required)}"
        )
    base = cache_root(root) / name
    target = base / folder
    if target.is_dir():
        return target
    archive = base / Path(url).name
    if archive.exists():
        verify_md5(archive, md5)
    elif download:
        download_file(url, archive, md5, progress=progress)
    else:
        raise DatasetError(
            f"{name}: not found in {base}; call with download=True, or pass path= to an extracted {folder} folder"
        )
    return extract_tar_gz(archive, base, folder)


def load_cifar10(
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    path: str | os.PathLike[str] | None = None,
    dev_size: int | None = None,
    dev_seed: int = 0,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
    progress: bool = True,
) -> DatasetSplits:
    """Load CIFAR-10: 50000 training images (minus the dev hold-out) and 10000 test images, uint8.

    Args:
        root: Cache folder (default: :func:`~deqrobust.data.download.cache_root`); files go to
            ``root/cifar10/``.
        download: Download (and verify) the archive if it is not in the cache.
        path: An existing ``cifar-10-batches-py`` folder (or its parent) to read instead.
        dev_size: Training images held out as dev (default 1000), chosen by ``dev_seed``.
        dev_seed: Seed of the dev hold-out.
        url: Archive URL (the official one by default; override for mirrors and tests).
        md5: Expected MD5 of the archive at ``url``.
        progress: Show a download progress bar.
    """
    info = CIFAR10_INFO
    required = (*CIFAR10_TRAIN, "test_batch")
    folder = _locate(
        "cifar10", CIFAR10_FOLDER, required,
        root=root, download=download, path=path, url=url, md5=md5, progress=progress,
    )
    train = _read_files(folder, CIFAR10_TRAIN, "labels", 10, "train")
    test = _read_files(folder, ("test_batch",), "labels", 10, "test")
    train, dev = hold_out(train, info.default_dev_size if dev_size is None else dev_size, dev_seed)
    return DatasetSplits(train, dev, test, info)


def load_cifar100(
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    path: str | os.PathLike[str] | None = None,
    dev_size: int | None = None,
    dev_seed: int = 0,
    url: str = CIFAR100_URL,
    md5: str = CIFAR100_MD5,
    progress: bool = True,
) -> DatasetSplits:
    """Load CIFAR-100 with its 100 fine labels; arguments as in :func:`load_cifar10`, folder
    ``cifar-100-python`` with files ``train`` and ``test``."""
    info = CIFAR100_INFO
    folder = _locate(
        "cifar100", CIFAR100_FOLDER, ("train", "test"),
        root=root, download=download, path=path, url=url, md5=md5, progress=progress,
    )
    train = _read_files(folder, ("train",), "fine_labels", 100, "train")
    test = _read_files(folder, ("test",), "fine_labels", 100, "test")
    train, dev = hold_out(train, info.default_dev_size if dev_size is None else dev_size, dev_seed)
    return DatasetSplits(train, dev, test, info)
