"""Process-group helpers for ``torchrun``: set-up from its environment, device per rank, collectives.

The same code runs single-process (every helper then degrades to a no-op or an identity) and under
``torchrun --nproc_per_node=K`` (NCCL on GPUs, Gloo on CPU). Training and evaluation use these
helpers only, so they never branch on ``torch.distributed`` themselves. Imports torch and
:mod:`deqrobust.errors` only.

Example:
    >>> info = init_distributed("cpu")          # no torchrun variables: a single process
    >>> info.rank, info.world_size, info.is_distributed, str(info.device)
    (0, 1, False, 'cpu')
    >>> import torch
    >>> all_reduce_sum(torch.tensor([3, 4])).tolist(), all_gather_object("a"), is_main_process()
    ([3, 4], ['a'], True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from .errors import ConfigError

__all__ = [
    "DEVICES",
    "DistInfo",
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "resolve_device",
    "shutdown",
]

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_distributed: bool

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None or value == "" else int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from exc


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` → ``cuda:<local_rank>`` when CUDA is available, else CPU; ``"cuda"`` requires CUDA.

    Example:
        >>> str(resolve_device("cpu"))
        'cpu'
    """
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; valid: {', '.join(DEVICES)} (or cuda:N)")
    if device == "cpu":
        return torch.device("cpu")
    if device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if device.startswith("cuda:"):
        return torch.device(device)
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


def init_distributed(device: str | torch.device = "auto", backend: Optional[str] = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``), or describe a single process when those are absent.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` (one GPU per ``LOCAL_RANK``) or a torch device.
        backend: default NCCL on CUDA, Gloo on CPU.

    Calling it again in an initialised process returns the same description.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev, False)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        chosen = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"backend": chosen, "timeout": timedelta(minutes=30)}
        if chosen == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, True)


def is_distributed() -> bool:
    """Whether a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank: from the process group, else from torchrun's ``RANK`` (0 when absent)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_world_size() -> int:
    """The number of processes: from the process group, else from ``WORLD_SIZE`` (1 when absent)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def is_main_process() -> bool:
    """Rank 0, or the only process (also before the process group is joined, via ``RANK``)."""
    return get_rank() == 0


def _collective_device() -> Optional[torch.device]:
    """The device NCCL needs tensors on (``None`` for Gloo, which works on CPU tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place, and return it (identity when not distributed).

    Works for CPU tensors under NCCL too (copied to the GPU and back), so counts can stay on the CPU.
    """
    if not is_distributed():
        return tensor
    target = _collective_device()
    if target is not None and tensor.device != target:
        moved = tensor.to(target)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        tensor.copy_(moved.to(tensor.device))
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """A list with every rank's (picklable) ``obj``, in rank order; ``[obj]`` when not distributed.

    Only for trusted in-process data: objects travel pickled between the ranks of one job.
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shutdown() -> None:
    """Leave the process group if one was joined (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
