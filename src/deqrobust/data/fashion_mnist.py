"""Fashion-MNIST from IDX files (gzipped or raw).

Where the files come from, in this order: an explicit ``path``; the folder of the Debian package
``dataset-fashion-mnist`` (:data:`DEBIAN_DIR`, ``/usr/share/datasets/fashion-mnist``, real data
offline, installed with ``apt-get install dataset-fashion-mnist``); the cache, downloading the
official files if allowed. Downloaded files are MD5-verified; local files (Debian recompresses the
archives, so their MD5s differ from the official ones) are validated by parsing: IDX magic numbers,
dimensions, sample counts and label range.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from deqrobust.errors import DatasetError

from .download import cache_root, download_file, verify_md5
from .splits import Augmentation, DatasetInfo, DatasetSplits, Split, hold_out

__all__ = [
    "DEBIAN_DIR",
    "FASHION_MNIST_FILES",
    "INFO",
    "find_local_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: role -> (official file name, MD5 of the official .gz)
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train_images": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
}

INFO = DatasetInfo(
    name="fashion_mnist",
    num_classes=10,
    in_channels=1,
    image_size=(28, 28),
    class_names=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
    ),
    augmentation=Augmentation(padding=2, flip=True),
    default_dev_size=2000,
)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or raw, detected by content) into a numpy array.

    The header is two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, and
    one big-endian uint32 per dimension; the data must have exactly the announced size.

    Example:
        >>> import struct, tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "y-idx1-ubyte"
        >>> _ = p.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([7, 0, 9]))
        >>> read_idx(p).tolist()
        [7, 0, 9]
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read ({exc}); delete it and fetch it again") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: IDX header truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path}: IDX dims {dims} need {expected} data bytes, file has {len(raw) - header} (truncated or corrupted)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _file_in(folder: Path, gz_name: str) -> Path | None:
    for name in (gz_name, gz_name.removesuffix(".gz")):
        if (folder / name).is_file():
            return folder / name
    return None


def find_local_fashion_mnist(folder: str | os.PathLike[str] = DEBIAN_DIR) -> dict[str, Path] | None:
    """The four IDX files (``.gz`` or raw) in ``folder`` by role, or ``None`` if any is missing.

    Example:
        >>> find_local_fashion_mnist("/nonexistent") is None
        True
    """
    found = {role: _file_in(Path(folder), name) for role, (name, _) in FASHION_MNIST_FILES.items()}
    return None if any(p is None for p in found.values()) else found  # type: ignore[return-value]


def _read_pair(images_path: Path, labels_path: Path, split: str) -> Split:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(f"{images_path}: expected uint8 images (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(f"{labels_path}: expected {len(images)} uint8 labels, got {labels.dtype} {labels.shape}")
    if len(labels) and labels.max() >= 10:
        raise DatasetError(f"{labels_path}: labels outside 0..9")
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    return Split(x, torch.from_numpy(labels.astype(np.int64)), split)


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    path: str | os.PathLike[str] | None = None,
    dev_size: int | None = None,
    dev_seed: int = 0,
    base_url: str = BASE_URL,
    md5s: dict[str, str] | None = None,
    use_debian: bool = True,
    progress: bool = True,
) -> DatasetSplits:
    """Load Fashion-MNIST: 60000 training images (minus the dev hold-out) and 10000 test images.

    Args:
        root: Cache folder; downloads go to ``root/fashion_mnist/``.
        download: Download the official files into the cache if no local copy is found.
        path: A folder with the four IDX files (``.gz`` or raw) to read instead.
        dev_size: Training images held out as dev (default 2000), chosen by ``dev_seed``.
        dev_seed: Seed of the dev hold-out.
        base_url: Where the official files are served (override for mirrors and tests).
        md5s: Override the expected ``.gz`` MD5 per role (keys of :data:`FASHION_MNIST_FILES`).
        use_debian: Look in :data:`DEBIAN_DIR` before the cache.
        progress: Show download progress bars.
    """
    if path is not None:
        files = find_local_fashion_mnist(path)
        if files is None:
            names = ", ".join(n for n, _ in FASHION_MNIST_FILES.values())
            raise DatasetError(f"fashion_mnist: {path} must hold {names} (gzipped or not)")
    else:
        files = find_local_fashion_mnist(DEBIAN_DIR) if use_debian else None
        if files is None:
            files = {}
            for role, (fname, default_md5) in FASHION_MNIST_FILES.items():
                md5 = (md5s or {}).get(role, default_md5)
                dest = cache_root(root) / "fashion_mnist" / fname
                if dest.exists():
                    verify_md5(dest, md5)
                elif download:
                    download_file(base_url + fname, dest, md5, progress=progress)
                else:
                    raise DatasetError(
                        f"fashion_mnist: {dest} not found; call with download=True, pass path=, or "
                        "`apt-get install dataset-fashion-mnist`"
                    )
                files[role] = dest
    train = _read_pair(files["train_images"], files["train_labels"], "train")
    test = _read_pair(files["test_images"], files["test_labels"], "test")
    train, dev = hold_out(train, INFO.default_dev_size if dev_size is None else dev_size, dev_seed)
    return DatasetSplits(train, dev, test, INFO)
