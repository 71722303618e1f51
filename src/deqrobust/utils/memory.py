"""Peak tensor memory of a piece of code, on CPU (live-storage tracking) or CUDA (allocator stats)."""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the mode that are still alive.

    Storages created outside (inputs, parameters) are not counted, so the peak is the extra memory
    the code needs. Tensors kept only by autograd's saved variables are invisible: use it for
    inference (no_grad) code, or on CUDA where the allocator is exact.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self.live.get(key)
        if entry is None:
            if t._base is not None:  # a view of a storage made outside: not ours
                return
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out


def peak_memory(fn: Callable[[], Any], device: "str | torch.device" = "cpu") -> int:
    """Peak extra bytes of live tensors while ``fn()`` runs.

    Example:
        >>> import torch
        >>> peak_memory(lambda: torch.zeros(1000) + 1) >= 8000   # two 4 kB tensors alive at once
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    tracker = _LiveStorageTracker()
    with tracker:
        result = fn()
    del result
    return tracker.peak
