"""The registry: names, metadata, and errors."""

from __future__ import annotations

import pytest

from deqrobust.data import DATASETS, dataset_info, load_dataset
from deqrobust.errors import ConfigError, DatasetError


def test_names_and_info():
    assert DATASETS == ("digits", "fashion_mnist", "cifar10", "cifar100", "svhn")
    expected = {
        "digits": (10, 1, (8, 8), 1, False, 200),
        "fashion_mnist": (10, 1, (28, 28), 2, True, 2000),
        "cifar10": (10, 3, (32, 32), 4, True, 1000),
        "cifar100": (100, 3, (32, 32), 4, True, 1000),
        "svhn": (10, 3, (32, 32), 4, False, 2000),
    }
    for name, (classes, channels, size, pad, flip, dev) in expected.items():
        info = dataset_info(name)
        assert info.name == name
        got = (info.num_classes, info.in_channels, info.image_size, info.augmentation.padding, info.augmentation.flip)
        assert got + (info.default_dev_size,) == (classes, channels, size, pad, flip, dev)
        assert info.class_names is None or len(info.class_names) == classes


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError, match="cifar10.*svhn"):
        load_dataset("mnist")
    with pytest.raises(ConfigError, match="digits"):
        dataset_info("imagenet")


def test_cache_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQROBUST_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match=str(tmp_path / "cifar10")):
        load_dataset("cifar10", download=False)


def test_digits_rejects_path(tmp_path):
    with pytest.raises(ConfigError, match="path"):
        load_dataset("digits", path=tmp_path)
