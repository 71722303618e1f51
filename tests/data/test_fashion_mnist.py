"""Fashion-MNIST: IDX parsing from small fixtures, and the real files of the Debian package if present."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from deqrobust.data import fashion_mnist
from deqrobust.data.download import md5_of
from deqrobust.data.fashion_mnist import DEBIAN_DIR, find_local_fashion_mnist, load_fashion_mnist, read_idx
from deqrobust.errors import DatasetError


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_set(folder, n_train=12, n_test=5, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(_idx(array)))
        else:
            (folder / name).write_bytes(_idx(array))
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_parse_fixture(tmp_path, gz):
    arrays = _write_set(tmp_path / "fm", gz=gz)
    splits = load_fashion_mnist(path=tmp_path / "fm", dev_size=0)
    assert splits.train.images.shape == (12, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert splits.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert splits.info.augmentation.padding == 2 and splits.info.augmentation.flip


def test_download_with_overrides(tmp_path, http_server):
    url, _ = http_server
    _write_set(tmp_path / "served")
    md5s = {role: md5_of(tmp_path / "served" / name) for role, (name, _) in fashion_mnist.FASHION_MNIST_FILES.items()}
    splits = load_fashion_mnist(
        tmp_path / "cache", base_url=url, md5s=md5s, use_debian=False, dev_size=2, progress=False
    )
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (10, 2, 5)


def test_no_source(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, download=False)
    with pytest.raises(DatasetError, match="must hold"):
        load_fashion_mnist(path=tmp_path)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x01\x08\x01" + struct.pack(">I", 2) + b"\x00\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x00", "magic"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "header truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x00", "truncated or corrupted"),
        (gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00")[:-6], "cannot read"),
    ],
    ids=["magic", "dtype", "header", "short-data", "bad-gzip"],
)
def test_bad_idx(tmp_path, data, message):
    (tmp_path / "f").write_bytes(data)
    with pytest.raises(DatasetError, match=message):
        read_idx(tmp_path / "f")


def test_inconsistent_set(tmp_path):
    arrays = _write_set(tmp_path / "fm")
    labels = arrays["train-labels-idx1-ubyte"][:-1]
    (tmp_path / "fm" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    with pytest.raises(DatasetError, match="expected 12 uint8 labels"):
        load_fashion_mnist(path=tmp_path / "fm")


def test_read_idx_other_dtypes(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 0.0]], dtype=">f4")
    (tmp_path / "f").write_bytes(struct.pack(">BBBB", 0, 0, 0x0D, 2) + struct.pack(">2I", 2, 2) + values.tobytes())
    out = read_idx(tmp_path / "f")
    assert out.dtype == np.float32 and out.tolist() == values.tolist()


@pytest.mark.skipif(
    find_local_fashion_mnist(DEBIAN_DIR) is None,
    reason=f"Debian package dataset-fashion-mnist not installed ({DEBIAN_DIR} missing); "
    "`apt-get install dataset-fashion-mnist` to run this check on the real data",
)
def test_debian_package_real_data():
    splits = load_fashion_mnist(download=False, dev_size=2000)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (58000, 2000, 10000)
    assert splits.train.images.shape[1:] == (1, 28, 28) and splits.test.images.shape == (10000, 1, 28, 28)
    labels = torch.cat([splits.train.labels, splits.dev.labels])
    assert labels.bincount().tolist() == [6000] * 10 and splits.test.labels.bincount().tolist() == [1000] * 10
