"""The bundled scikit-learn digits: shapes, range, and splits fixed by constants and dev_seed."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from deqrobust.data import load_dataset
from deqrobust.data.digits import load_digits
from deqrobust.errors import ConfigError


def _rows(split):
    return {tuple(r) for r in split.images.flatten(1).mul(16).round().long().tolist()}


@pytest.fixture(scope="module")
def default():
    return load_digits()


def test_shapes_and_range(default):
    assert (len(default.train), len(default.dev), len(default.test)) == (1237, 200, 360)
    for split in (default.train, default.dev, default.test):
        assert split.images.dtype == torch.float32 and split.images.shape[1:] == (1, 8, 8)
        assert float(split.images.min()) >= 0.0 and float(split.images.max()) <= 1.0
        assert split.labels.dtype == torch.int64
    assert float(default.train.images.max()) == 1.0
    assert default.info.in_channels == 1 and default.info.num_classes == 10


def test_splits_partition_the_data(default):
    """train + dev + test is exactly the full set as a multiset of (image, label): disjoint, covering."""
    from sklearn.datasets import load_digits as sk

    bunch = sk()
    pixels = bunch.images.reshape(len(bunch.images), -1).astype(int).tolist()
    full = Counter(zip(map(tuple, pixels), bunch.target.tolist()))
    parts = Counter()
    for split in (default.train, default.dev, default.test):
        pixels = split.images.flatten(1).mul(16).round().long().tolist()
        parts.update(zip(map(tuple, pixels), split.labels.tolist()))
    assert parts == full
    assert default.dev.labels.bincount().min() >= 19 and default.test.labels.bincount().min() >= 35


def test_dev_seed(default):
    same = load_digits(dev_seed=0)
    other = load_digits(dev_seed=1)
    assert torch.equal(same.dev.images, default.dev.images)
    assert not torch.equal(other.dev.images, default.dev.images)
    assert torch.equal(other.test.images, default.test.images)  # test split independent of the seed
    assert torch.equal(other.test.labels, default.test.labels)
    assert _rows(other.train) | _rows(other.dev) == _rows(default.train) | _rows(default.dev)


def test_dev_size(default):
    splits = load_dataset("digits", dev_size=50)
    assert len(splits.dev) == 50 and len(splits.train) == 1387
    assert torch.equal(splits.test.images, default.test.images)
    with pytest.raises(ConfigError, match="dev_size"):
        load_digits(dev_size=1437)
