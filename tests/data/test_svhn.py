"""SVHN from small .mat files in the real layout (X: 32x32x3xN uint8, y: Nx1 in 1..10)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch

from deqrobust.data.download import md5_of
from deqrobust.data.svhn import load_svhn, read_svhn_mat
from deqrobust.errors import DatasetError


def _write(path, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
    y[0, 0] = 10
    scipy.io.savemat(path, {"X": x, "y": y})
    return x, y


def test_parse_layout_and_labels(tmp_path):
    x, y = _write(tmp_path / "train_32x32.mat", 9, 0)
    _write(tmp_path / "test_32x32.mat", 4, 1)
    splits = load_svhn(path=tmp_path, dev_size=0)
    images = splits.train.images
    assert images.shape == (9, 3, 32, 32) and images.dtype == torch.uint8
    for n in (0, 5):
        for c in range(3):
            assert torch.equal(images[n, c], torch.from_numpy(x[:, :, c, n]))
    expected = y[:, 0].astype(np.int64) % 10
    assert splits.train.labels.tolist() == expected.tolist() and splits.train.labels[0] == 0
    assert len(splits.test) == 4


def test_download_with_overrides(tmp_path, http_server):
    url, _ = http_server
    served = tmp_path / "served"
    _write(served / "train_32x32.mat", 6, 0)
    _write(served / "test_32x32.mat", 3, 1)
    md5s = {"train": md5_of(served / "train_32x32.mat"), "test": md5_of(served / "test_32x32.mat")}
    splits = load_svhn(tmp_path / "cache", base_url=url, md5s=md5s, dev_size=2, progress=False)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (4, 2, 3)
    with pytest.raises(DatasetError, match="MD5 mismatch"):  # default (official) MD5 vs cached fixture
        load_svhn(tmp_path / "cache", download=False)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"X": np.zeros((32, 32, 1, 2), np.uint8), "y": np.ones((2, 1))}, "X"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))}, "2 labels"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.zeros((2, 1))}, "1..10"),
    ],
)
def test_malformed(tmp_path, content, message):
    scipy.io.savemat(tmp_path / "bad.mat", content)
    with pytest.raises(DatasetError, match=message):
        read_svhn_mat(tmp_path / "bad.mat")


def test_garbage_file(tmp_path):
    (tmp_path / "bad.mat").write_bytes(b"garbage" * 100)
    with pytest.raises(DatasetError, match="not a readable"):
        read_svhn_mat(tmp_path / "bad.mat")
