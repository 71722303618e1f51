"""Resumable training state as JSON + tensors: RNG states and nested structures (optimizer state).

:func:`encode` turns a nested structure into JSON, moving its tensors into a flat dict (stored as
checkpoint ``extra`` tensors); :func:`decode` reverses it exactly (tuples, non-string dict keys and
NumPy arrays included). :func:`capture_rng` / :func:`restore_rng` cover Python, NumPy and torch
(CPU and CUDA). Imports torch and numpy only.

Example:
    >>> tensors = {}
    >>> obj = {"state": {0: {"step": torch.tensor(3.0)}}, "groups": [{"betas": (0.9, 0.999)}]}
    >>> blob = encode(obj, "optim", tensors)
    >>> list(tensors), decode(blob, tensors) == obj
    (['optim/state/0/step'], True)
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["capture_rng", "decode", "encode", "restore_rng"]


def encode(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-compatible form of ``obj``; tensors go to ``tensors`` under ``prefix/...`` keys."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[encode(k, f"{prefix}/k{i}", tensors), encode(v, f"{prefix}/{k}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}  # fmt: skip
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint ({prefix})")


def decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


def capture_rng() -> dict[str, Any]:
    """This process's RNG states: Python, NumPy, torch CPU and every CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` returned (after :func:`decode`)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8).cpu() for t in cuda])
