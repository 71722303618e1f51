"""BatchLoader: determinism, exact mid-epoch resume, sharding, and batched augmentation."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deqrobust.data import Augmentation, BatchLoader, Split, crop_with_offsets, flip_where
from deqrobust.errors import ConfigError


def _split(n=23, c=3, h=6, w=5, seed=0, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, c, h, w), generator=g, dtype=torch.uint8)  # no zeros: padding is visible
    if dtype == torch.float32:
        images = images.float() / 255
    return Split(images, torch.arange(n) % 7, "train")


def _collect(loader, limit=None):
    """The batches of one pass (or its first ``limit``, pulling no more than that)."""
    return [tuple(t.clone() for t in batch) for batch in itertools.islice(loader, limit)]


def _same(a, b):
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


AUG = Augmentation(padding=2, flip=True)


def test_same_seed_same_batches():
    split = _split()
    a = _collect(BatchLoader(split, 5, shuffle=True, augment=AUG, seed=3))
    b = _collect(BatchLoader(split, 5, shuffle=True, augment=AUG, seed=3))
    c = _collect(BatchLoader(split, 5, shuffle=True, augment=AUG, seed=4))
    assert _same(a, b) and not _same(a, c)
    assert [len(x) for x, _ in a] == [5, 5, 5, 5, 3]


def test_epochs_differ_and_global_rng_untouched():
    loader = BatchLoader(_split(), 5, shuffle=True, augment=AUG, seed=0)
    state = torch.random.get_rng_state()
    first = _collect(loader)
    assert _same(first, _collect(loader))  # iterating again repeats the epoch
    loader.set_epoch(1)
    assert not _same(first, _collect(loader))
    assert torch.equal(state, torch.random.get_rng_state())


def test_no_shuffle_no_augment_is_exact():
    split = _split()
    batches = _collect(BatchLoader(split, 10, with_indices=True))
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and torch.equal(x, split.images.float() / 255)
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(23))
    floats = _split(dtype=torch.float32)
    assert torch.equal(torch.cat([b[0] for b in BatchLoader(floats, 7)]), floats.images)


@pytest.mark.parametrize("k", [0, 1, 3, 5])
@pytest.mark.parametrize("epoch", [0, 2])
def test_resume_mid_epoch(k, epoch):
    split = _split()
    make = lambda: BatchLoader(split, 5, shuffle=True, augment=AUG, seed=11, drop_last=True)  # noqa: E731
    reference = make()
    reference.set_epoch(epoch)
    full = _collect(reference)
    interrupted = make()
    interrupted.set_epoch(epoch)
    head = _collect(interrupted, limit=k)
    state = interrupted.state_dict()
    assert state["batch"] == min(k, len(full))
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)  # a training loop's set_epoch at the top of the epoch keeps the position
    tail = _collect(resumed)
    assert _same(head + tail, full)
    assert _same(_collect(resumed), full)  # the next pass of the epoch starts from the beginning


def test_resume_then_next_epoch_matches():
    split = _split()
    ref = BatchLoader(split, 4, shuffle=True, augment=AUG, seed=1)
    ref.set_epoch(5)
    _collect(ref)
    state = ref.state_dict()  # end of epoch 5
    resumed = BatchLoader(split, 4, shuffle=True, augment=AUG, seed=1)
    resumed.load_state_dict(state)
    assert _collect(resumed) == []
    ref.set_epoch(6)
    resumed.set_epoch(6)
    assert _same(_collect(ref), _collect(resumed))


def test_state_mismatch_rejected():
    state = BatchLoader(_split(), 5, shuffle=True, seed=0).state_dict()
    with pytest.raises(ConfigError, match="seed"):
        BatchLoader(_split(), 5, shuffle=True, seed=1).load_state_dict(state)
    with pytest.raises(ConfigError, match="unknown"):
        BatchLoader(_split(), 5, shuffle=True, seed=0).load_state_dict({**state, "extra": 1})


@pytest.mark.parametrize("n, world", [(23, 3), (10, 4), (2, 3)])
def test_shards_disjoint_and_covering(n, world):
    split = _split(n=n)
    exact = [BatchLoader(split, 4, rank=r, world_size=world, with_indices=True) for r in range(world)]
    seen = [int(i) for loader in exact for batch in _collect(loader) for i in batch[2]]
    assert sorted(seen) == list(range(n))  # disjoint and covering, no padding
    padded = [BatchLoader(split, 4, shuffle=True, seed=2, rank=r, world_size=world) for r in range(world)]
    idx = [loader.indices() for loader in padded]
    assert len({len(i) for i in idx}) == 1 and len(idx[0]) * world >= n  # equal lengths for DDP
    assert set(torch.cat(idx).tolist()) == set(range(n))
    assert len({len(loader) for loader in padded}) == 1


def test_bad_config():
    with pytest.raises(ConfigError):
        BatchLoader(_split(), 0)
    with pytest.raises(ConfigError):
        BatchLoader(_split(), 4, rank=2, world_size=2)


def test_augmentation_changes_images_within_range():
    split = _split(n=64)
    plain = torch.cat([x for x, _ in BatchLoader(split, 16)])
    loader = BatchLoader(split, 16, augment=AUG, seed=0)
    batches = _collect(loader)
    aug = torch.cat([x for x, _ in batches])
    assert aug.shape == plain.shape and aug.dtype == torch.float32
    assert float(aug.min()) >= 0.0 and float(aug.max()) <= 1.0
    changed = (aug != plain).flatten(1).any(1)
    assert changed.float().mean() > 0.5
    assert (aug == 0).any()  # zero padding shows up (the source has no zero pixels)
    assert torch.equal(torch.cat([y for _, y in batches]), split.labels)
    flip_only = torch.cat([x for x, _ in BatchLoader(split, 16, augment=Augmentation(0, True), seed=0)])
    flipped = (flip_only != plain).flatten(1).any(1)
    assert torch.equal(flip_only[flipped], plain[flipped].flip(-1)) and 0 < flipped.sum() < 64


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    padding=st.integers(0, 4),
    data=st.data(),
)
def test_crop_is_shifted_copy(b, h, w, padding, data):
    x = torch.arange(1, b * 2 * h * w + 1, dtype=torch.float32).view(b, 2, h, w)
    top = torch.tensor(data.draw(st.lists(st.integers(0, 2 * padding), min_size=b, max_size=b)))
    left = torch.tensor(data.draw(st.lists(st.integers(0, 2 * padding), min_size=b, max_size=b)))
    out = crop_with_offsets(x, padding, top, left)
    assert out.shape == x.shape
    for s in range(b):
        dy, dx = int(top[s]) - padding, int(left[s]) - padding
        expected = torch.zeros(2, h, w)
        for i in range(h):
            for j in range(w):
                if 0 <= i + dy < h and 0 <= j + dx < w:
                    expected[:, i, j] = x[s, :, i + dy, j + dx]
        assert torch.equal(out[s], expected)


@settings(max_examples=30, deadline=None)
@given(mask=st.lists(st.booleans(), min_size=1, max_size=5))
def test_flip_where(mask):
    x = torch.rand(len(mask), 1, 3, 4)
    out = flip_where(x, torch.tensor(mask))
    for i, m in enumerate(mask):
        assert torch.equal(out[i], x[i].flip(-1) if m else x[i])
