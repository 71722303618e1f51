"""scikit-learn's bundled 8x8 handwritten digits (1797 real images, no download): the CPU dataset.

It has no official test split, so one is fixed here once and for all: 20 %, stratified, seed
:data:`TEST_SEED` (independent of the user's ``dev_seed``). The dev split is then held out from the
remaining training images, stratified, by ``dev_seed``.
"""

from __future__ import annotations

import math

import torch

from .splits import Augmentation, DatasetInfo, DatasetSplits, Split, hold_out, stratified_indices

__all__ = ["INFO", "TEST_FRACTION", "TEST_SEED", "load_digits"]

TEST_FRACTION = 0.2
TEST_SEED = 0

INFO = DatasetInfo(
    name="digits",
    num_classes=10,
    in_channels=1,
    image_size=(8, 8),
    class_names=tuple(str(d) for d in range(10)),
    augmentation=Augmentation(padding=1, flip=False),
    default_dev_size=200,
)


def load_digits(*, dev_size: int | None = None, dev_seed: int = 0) -> DatasetSplits:
    """Load the digits as float32 images in [0, 1] (pixel values 0..16 divided by 16).

    Args:
        dev_size: Training images held out as dev (default 200, stratified).
        dev_seed: Seed of the dev hold-out; the test split does not depend on it.

    Example:
        >>> splits = load_digits()
        >>> len(splits.train), len(splits.dev), len(splits.test)
        (1237, 200, 360)
        >>> tuple(splits.train.images.shape[1:])
        (1, 8, 8)
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    full = Split(images, labels, "full")
    n_test = math.ceil(TEST_FRACTION * len(full))
    test_idx = stratified_indices(labels, n_test, TEST_SEED)
    is_train = torch.ones(len(full), dtype=torch.bool)
    is_train[test_idx] = False
    train = full.subset(torch.nonzero(is_train).flatten(), "train")
    test = full.subset(test_idx, "test")
    size = INFO.default_dev_size if dev_size is None else dev_size
    train, dev = hold_out(train, size, dev_seed, stratify=True)
    return DatasetSplits(train, dev, test, INFO)
