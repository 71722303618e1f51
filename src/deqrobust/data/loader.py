"""A deterministic, resumable, shardable batch iterator with batched tensor augmentation.

Everything random (sample order, crop offsets, flips) is drawn from :class:`torch.Generator`
objects seeded from ``(seed, epoch)`` only, never from the global RNG: the same seed gives the same
batches on every machine and device, a run resumed from :meth:`BatchLoader.state_dict` continues
with exactly the batches it would have seen, and changing ``world_size`` only re-shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deqrobust.errors import ConfigError

from .splits import Augmentation, Split

__all__ = ["BatchLoader", "crop_with_offsets", "flip_where", "random_augment"]

_MASK64 = (1 << 64) - 1


def _derive_seed(*parts: int) -> int:
    """Mix integers into a 63-bit seed (SplitMix64 finaliser per part): distinct parts, distinct streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def crop_with_offsets(images: Tensor, padding: int, top: Tensor, left: Tensor) -> Tensor:
    """Zero-pad each image by ``padding`` and crop it back to (H, W) at per-sample offsets.

    ``top[b], left[b]`` in ``0 .. 2 * padding`` index the padded image, so output pixel ``(i, j)``
    of sample ``b`` is input pixel ``(i + top[b] - padding, j + left[b] - padding)``, or 0 outside.

    Example:
        >>> import torch
        >>> x = torch.arange(1., 5.).view(1, 1, 2, 2)
        >>> crop_with_offsets(x, 1, torch.tensor([2]), torch.tensor([1]))[0, 0].tolist()
        [[3.0, 4.0], [0.0, 0.0]]
    """
    if padding == 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dev = images.device
    rows = top.to(dev).view(b, 1, 1, 1) + torch.arange(h, device=dev).view(1, 1, h, 1)
    cols = left.to(dev).view(b, 1, 1, 1) + torch.arange(w, device=dev).view(1, 1, 1, w)
    batch = torch.arange(b, device=dev).view(b, 1, 1, 1)
    chan = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[batch, chan, rows, cols]


def flip_where(images: Tensor, mask: Tensor) -> Tensor:
    """Flip horizontally the images whose ``mask`` entry is true.

    Example:
        >>> import torch
        >>> x = torch.tensor([[[[1., 2.]]], [[[3., 4.]]]])
        >>> flip_where(x, torch.tensor([True, False])).flatten().tolist()
        [2.0, 1.0, 3.0, 4.0]
    """
    return torch.where(mask.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)


def _draw(n: int, augment: Augmentation, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    high = 2 * augment.padding + 1
    top = torch.randint(0, high, (n,), generator=generator)
    left = torch.randint(0, high, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    return top, left, flip


def _apply(images: Tensor, augment: Augmentation, top: Tensor, left: Tensor, flip: Tensor) -> Tensor:
    images = crop_with_offsets(images, augment.padding, top, left)
    return flip_where(images, flip) if augment.flip else images


def random_augment(images: Tensor, augment: Augmentation, generator: torch.Generator) -> Tensor:
    """Random crop (after zero padding) and random horizontal flip of a (B, C, H, W) batch.

    Offsets and flips are drawn on the CPU from ``generator``, one per sample.

    Example:
        >>> import torch
        >>> x = torch.rand(4, 3, 8, 8)
        >>> y = random_augment(x, Augmentation(2, True), torch.Generator().manual_seed(0))
        >>> y.shape == x.shape
        True
    """
    return _apply(images, augment, *_draw(len(images), augment, generator))


class BatchLoader:
    """Deterministic batches ``(images, labels)`` of a :class:`Split`, float32 in [0, 1] on ``device``.

    Args:
        split: The data; uint8 images are divided by 255.
        batch_size: Samples per batch (the last one may be smaller unless ``drop_last``).
        shuffle: Permute the samples each epoch (seeded by ``(seed, epoch)``).
        augment: Random crop / flip to apply (``None``: none), e.g. ``splits.info.augmentation``.
        seed: The only source of randomness, with the epoch.
        drop_last: Drop this rank's last incomplete batch.
        rank, world_size: Shard like ``DistributedSampler``: rank ``r`` takes positions
            ``r, r + world_size, ...`` of the epoch's order.
        even_shards: Pad the order (by repeating its start) so every rank gets the same number of
            samples, as distributed training needs. ``False`` gives each rank its exact disjoint
            subset (for evaluation). Default: ``shuffle``.
        device: Where batches are put.
        with_indices: Yield ``(images, labels, indices)``; ``indices`` (into ``split``) stay on the CPU.

    Example:
        >>> import torch
        >>> split = Split(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.arange(10), "train")
        >>> loader = BatchLoader(split, 4, shuffle=True, augment=Augmentation(1, True), seed=0)
        >>> [tuple(x.shape) for x, y in loader]
        [(4, 1, 4, 4), (4, 1, 4, 4), (2, 1, 4, 4)]
        >>> loader.set_epoch(1)
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: Augmentation | None = None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool | None = None,
        device: torch.device | str = "cpu",
        with_indices: bool = False,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment if augment is not None and augment != Augmentation() else None
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.even_shards = shuffle if even_shards is None else even_shards
        self.device = torch.device(device)
        self.with_indices = with_indices
        self._epoch = 0
        self._batch = 0  # batches handed out in the current (or last) pass of this epoch
        self._resume_at = 0  # where the next pass starts; set by load_state_dict only
        self._plan_cache: tuple[int, tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]] | None = None

    # -------------------------------------------------------------- epoch plan

    @property
    def epoch(self) -> int:
        """The current epoch (set with :meth:`set_epoch`)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentations are used next.

        Setting the epoch the loader is already in changes nothing, so a resumed loader keeps its
        position when a training loop calls ``set_epoch(epoch)`` at the top of every epoch.
        """
        if epoch != self._epoch:
            self._epoch = int(epoch)
            self._batch = 0
            self._resume_at = 0

    def _num_padded(self) -> int:
        n = len(self.split)
        return math.ceil(n / self.world_size) * self.world_size if self.even_shards else n

    def _plan(self) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        if self._plan_cache is not None and self._plan_cache[0] == self._epoch:
            return self._plan_cache[1]
        n, total = len(self.split), self._num_padded()
        if self.shuffle:
            gen = torch.Generator().manual_seed(_derive_seed(self.seed, self._epoch, 0))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if total > n:
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        positions = torch.arange(self.rank, total, self.world_size)
        top = left = flip = None
        if self.augment is not None:
            gen = torch.Generator().manual_seed(_derive_seed(self.seed, self._epoch, 1))
            top, left, flip = (t[positions] for t in _draw(total, self.augment, gen))
        plan = (order[positions], top, left, flip)
        self._plan_cache = (self._epoch, plan)
        return plan

    def indices(self) -> Tensor:
        """This rank's sample indices (into ``split``) for the current epoch, in batch order."""
        return self._plan()[0].clone()

    def __len__(self) -> int:
        n = len(range(self.rank, self._num_padded(), self.world_size))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # -------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        start, self._resume_at = self._resume_at, 0
        return self._batches(start)

    def _batches(self, start: int) -> Iterator[tuple[Tensor, ...]]:
        idx, top, left, flip = self._plan()
        self._batch = start
        for b in range(start, len(self)):
            sel = slice(b * self.batch_size, (b + 1) * self.batch_size)
            rows = idx[sel]
            x = self.split.images[rows].to(self.device)
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
            if self.augment is not None:
                x = _apply(x, self.augment, top[sel], left[sel], flip[sel])  # type: ignore[index]
            y = self.split.labels[rows].to(self.device)
            self._batch = b + 1
            yield (x, y, rows) if self.with_indices else (x, y)

    # -------------------------------------------------------------- resuming

    def _config(self) -> dict[str, Any]:
        aug = self.augment or Augmentation()
        return {
            "seed": self.seed,
            "num_samples": len(self.split),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "augment_padding": aug.padding,
            "augment_flip": aug.flip,
            "drop_last": self.drop_last,
            "rank": self.rank,
            "world_size": self.world_size,
            "even_shards": self.even_shards,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position (epoch, batches already handed out this epoch) and the settings it depends on."""
        return {"epoch": self._epoch, "batch": self._batch, **self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next pass yields the remaining batches of that epoch,
        identical (order and augmentation) to those of the uninterrupted run.

        Raises:
            ConfigError: if ``state`` has missing or unknown keys, or was made with other settings.
        """
        config = self._config()
        expected = {"epoch", "batch", *config}
        if set(state) != expected:
            raise ConfigError(
                f"BatchLoader state: missing {sorted(expected - set(state))}, unknown {sorted(set(state) - expected)}"
            )
        diff = {k: (state[k], v) for k, v in config.items() if state[k] != v}
        if diff:
            raise ConfigError(f"BatchLoader state was saved with other settings (saved, current): {diff}")
        self._epoch = int(state["epoch"])
        self._batch = self._resume_at = int(state["batch"])
        if not 0 <= self._batch <= len(self):
            raise ConfigError(f"BatchLoader state: batch {self._batch} outside 0..{len(self)}")
