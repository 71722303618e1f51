"""SVHN cropped digits (format 2): ``train_32x32.mat`` and ``test_32x32.mat`` (the "extra" set is
not used). ``X`` is (32, 32, 3, N) uint8 and becomes (N, 3, 32, 32); label 10 (digit zero) becomes 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from deqrobust.errors import DatasetError

from .download import cache_root, download_file, verify_md5
from .splits import Augmentation, DatasetInfo, DatasetSplits, Split, hold_out

__all__ = ["INFO", "SVHN_FILES", "load_svhn", "read_svhn_mat"]

SVHN_BASE_URL = "http://ufldl.stanford.edu/housenumbers/"
#: split -> (file name, MD5)
SVHN_FILES: dict[str, tuple[str, str]] = {
    "train": ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("test_32x32.mat", "eb5a983be6a315427106f1b2a6a6a4a4"),
}

INFO = DatasetInfo(
    name="svhn",
    num_classes=10,
    in_channels=3,
    image_size=(32, 32),
    class_names=tuple(str(d) for d in range(10)),
    augmentation=Augmentation(padding=4, flip=False),
    default_dev_size=2000,
)


def read_svhn_mat(path: str | os.PathLike[str], split: str = "train") -> Split:
    """Read one SVHN ``.mat`` file (MATLAB v5, keys ``X`` and ``y``) into a uint8 split.

    Raises:
        DatasetError: if the file is unreadable or ``X``/``y`` have unexpected shapes or values.
    """
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError... on bad files
        raise DatasetError(f"{path}: not a readable SVHN .mat file ({type(exc).__name__}: {exc})") from exc
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else repr(type(x).__name__)
        raise DatasetError(f"{path}: 'X' must be uint8 of shape (32, 32, 3, N), got {desc}")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3]:
        raise DatasetError(f"{path}: 'y' must hold {x.shape[3]} labels")
    labels = y.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DatasetError(f"{path}: SVHN labels must lie in 1..10")
    labels[labels == 10] = 0
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W)
    return Split(torch.from_numpy(images), torch.from_numpy(labels), split)


def load_svhn(
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    path: str | os.PathLike[str] | None = None,
    dev_size: int | None = None,
    dev_seed: int = 0,
    base_url: str = SVHN_BASE_URL,
    md5s: dict[str, str] | None = None,
    progress: bool = True,
) -> DatasetSplits:
    """Load SVHN: 73257 training images (minus the dev hold-out) and 26032 test images, uint8.

    Args:
        root: Cache folder; files go to ``root/svhn/`` and are MD5-verified.
        download: Download missing files.
        path: A folder holding ``train_32x32.mat`` and ``test_32x32.mat`` to read instead
            (not checksummed; parsed and validated).
        dev_size: Training images held out as dev (default 2000), chosen by ``dev_seed``.
        dev_seed: Seed of the dev hold-out.
        base_url: Where the files are served (official by default; override for mirrors/tests).
        md5s: Override the expected MD5 per split (``{"train": ..., "test": ...}``).
        progress: Show download progress bars.
    """
    files: dict[str, Path] = {}
    for split, (fname, default_md5) in SVHN_FILES.items():
        md5 = (md5s or {}).get(split, default_md5)
        if path is not None:
            files[split] = Path(path) / fname
            if not files[split].is_file():
                raise DatasetError(f"svhn: {files[split]} not found (path= must hold {fname})")
            continue
        dest = cache_root(root) / "svhn" / fname
        if dest.exists():
            verify_md5(dest, md5)
        elif download:
            download_file(base_url + fname, dest, md5, progress=progress)
        else:
            raise DatasetError(f"svhn: {dest} not found; call with download=True or pass path=")
        files[split] = dest
    train, test = read_svhn_mat(files["train"], "train"), read_svhn_mat(files["test"], "test")
    train, dev = hold_out(train, INFO.default_dev_size if dev_size is None else dev_size, dev_seed)
    return DatasetSplits(train, dev, test, INFO)
