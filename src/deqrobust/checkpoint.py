"""Safe checkpoints: tensors in one ``safetensors`` file, everything else as JSON in its header.

A checkpoint holds the model weights (``model/<key>``), optional extra tensors (``extra/<key>``:
optimizer moments, RNG states, ...) and a JSON metadata dict (model name and constructor kwargs,
dataset, threat model, config, epoch, ...; see :data:`METADATA_KEYS`). Files are written atomically
(temporary file, fsync, rename), so a crash mid-write leaves the previous checkpoint intact, and carry
a SHA-256 of their tensors, so a corrupted file is detected. Loading never unpickles code: a
``torch.save``/pickle file is only read with ``torch.load(weights_only=True)`` (plain tensors; any
other object, e.g. a malicious ``__reduce__``, is refused before it can run) and gives weights only.

Imports torch, safetensors, :mod:`deqrobust.models`, :mod:`deqrobust.errors`, :mod:`deqrobust.utils`.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from deqrobust.models import build_model
    >>> model = build_model("mdeq-tiny", num_classes=10, in_channels=1).eval()
    >>> meta = {"model": model_spec("mdeq-tiny", 10, 1, {})}
    >>> path = save_checkpoint(Path(tempfile.mkdtemp()) / "m.safetensors", model, meta)
    >>> loaded, metadata = load_model(path)
    >>> x = torch.rand(2, 1, 8, 8)
    >>> bool(torch.equal(model(x), loaded(x))), metadata["model"]["name"]
    (True, 'mdeq-tiny')
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from . import __version__
from .errors import CheckpointError
from .utils.io import atomic_write

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_KEYS",
    "Checkpoint",
    "check_state_dict",
    "load_checkpoint",
    "load_model",
    "model_spec",
    "read_metadata",
    "save_checkpoint",
]

PathLike = Union[str, "os.PathLike[str]"]

FORMAT = "deqrobust-checkpoint"
FORMAT_VERSION = 1
_HEADER_KEY = "deqrobust"
_MAX_HEADER = 100 * 1024 * 1024

#: Metadata keys written by the trainer (all optional for :func:`save_checkpoint`).
METADATA_KEYS = {
    "format": "always 'deqrobust-checkpoint'",
    "format_version": "integer format version",
    "deqrobust_version": "package version that wrote the file",
    "kind": "'last' (resumable: has training_state) or 'best' (weights of the selected model)",
    "model": "{name, num_classes, in_channels, kwargs}: build_model(name, num_classes, in_channels, **kwargs)",
    "dataset": "{name, dev_size, dev_seed, train_subset, num_train, num_dev}",
    "threat_model": "{norm, eps} used in training",
    "config": "the resolved training config (nested dict)",
    "config_name": "shipped config name or file stem",
    "epoch": "completed epochs",
    "iteration": "completed optimizer iterations",
    "best": "{epoch, dev_clean_acc, dev_robust_acc} of the best checkpoint so far",
    "history": "per-epoch metrics so far",
    "training_state": "what --resume needs besides tensors (counters, RNG, data loader, optimizer groups)",
    "tensor_sha256": "SHA-256 over all tensors (keys, dtypes, shapes, bytes)",
}


@dataclass
class Checkpoint:
    """A loaded checkpoint: model ``state_dict``, ``extra`` tensors and ``metadata`` (``{}`` for a bare
    ``torch.load(weights_only=True)`` state dict)."""

    state_dict: dict[str, Tensor]
    metadata: dict[str, Any]
    extra: dict[str, Tensor] = field(default_factory=dict)
    path: Optional[Path] = None


def model_spec(name: str, num_classes: int, in_channels: int, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``metadata["model"]`` entry from which :func:`load_model` rebuilds the architecture."""
    return {"name": name, "num_classes": int(num_classes), "in_channels": int(in_channels), "kwargs": dict(kwargs)}


def _tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _cpu_tensors(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in tensors.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"checkpoint entry {prefix}{key} is a {type(value).__name__}, not a tensor")
        # A private contiguous CPU copy: safetensors refuses shared storage, and training may go on.
        out[prefix + key] = value.detach().to("cpu", copy=True).contiguous()
    return out


def save_checkpoint(
    path: PathLike,
    model: Union[nn.Module, Mapping[str, Tensor]],
    metadata: Optional[Mapping[str, Any]] = None,
    *,
    extra: Optional[Mapping[str, Tensor]] = None,
) -> Path:
    """Write ``model``'s state dict (or a given state dict), ``extra`` tensors and JSON ``metadata``
    atomically to ``path`` (a ``.safetensors`` file).

    ``metadata`` must be JSON-serialisable; ``format``, ``format_version``, ``deqrobust_version`` and
    ``tensor_sha256`` are added. Returns the path.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = _cpu_tensors("model/", state)
    tensors.update(_cpu_tensors("extra/", extra or {}))
    meta = dict(metadata or {})
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, deqrobust_version=__version__)
    meta["tensor_sha256"] = _tensor_digest(tensors)
    try:
        header = json.dumps(meta, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {exc}") from exc

    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={_HEADER_KEY: header}))


def _sniff(path: Path) -> str:
    """``"safetensors"``, ``"zip"`` (torch.save), ``"pickle"``, or ``"unknown"``, from the first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    # Before the pickle test: a safetensors header length whose low byte is 0x80 starts with b"\x80" too.
    if len(head) == 9 and head[8:9] == b"{":
        (size,) = struct.unpack("<Q", head[:8])
        if 0 < size <= _MAX_HEADER:
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _existing(path: PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory; give a checkpoint file (e.g. {p}/checkpoints/best.safetensors)")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def _parse_header(path: Path, raw: Optional[Mapping[str, str]]) -> dict[str, Any]:
    if not raw or _HEADER_KEY not in raw:
        return {}
    try:
        meta = json.loads(raw[_HEADER_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path} has corrupted JSON metadata: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} metadata is not a JSON object")
    version = meta.get("format_version", FORMAT_VERSION)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}; this deqrobust reads up to {FORMAT_VERSION} (upgrade)"
        )
    return meta


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, reading only its header (no tensors).

    Raises:
        CheckpointError: missing, truncated or non-safetensors file.
    """
    p = _existing(path)
    kind = _sniff(p)
    if kind != "safetensors":
        raise CheckpointError(f"{p} is not a deqrobust safetensors checkpoint (looks like: {kind}); it has no metadata")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as fh:
            return _parse_header(p, fh.metadata())
    except (SafetensorError, RuntimeError) as exc:  # RuntimeError: safetensors' own size check
        raise CheckpointError(f"checkpoint {p} is truncated or corrupted: {exc}") from exc


def _load_pickled(path: Path, kind: str) -> dict[str, Tensor]:
    """A plain tensor state dict from a torch.save/pickle file, via the weights-only unpickler only."""
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None:
                    raise CheckpointError(f"checkpoint {path} is a corrupted zip (torch.save) file")
        except zipfile.BadZipFile as exc:
            raise CheckpointError(
                f"checkpoint {path} is a truncated or corrupted zip (torch.save) file: {exc}"
            ) from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "protocol N not the default" noise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refused to load {path}: it is a pickle file carrying objects other than plain tensors, which could "
            f"execute code (nothing was executed). Save weights with safetensors. Detail: {first}"
        ) from None
    except Exception as exc:  # truncated / malformed pickles raise many types
        raise CheckpointError(f"checkpoint {path} could not be read as a torch state dict: {exc}") from None
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path} is not a plain state dict of tensors (got {type(obj).__name__})")
    return dict(obj)


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu", *, verify: bool = True) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` (or a bare weights-only torch state dict).

    Args:
        path: the file.
        map_location: device for the tensors.
        verify: check the stored SHA-256 of the tensors.

    Raises:
        CheckpointError: missing, truncated, corrupted, unknown format, or pickled code (refused).
    """
    p = _existing(path)
    kind = _sniff(p)
    if kind in ("zip", "pickle"):
        state = _load_pickled(p, kind)
        return Checkpoint({k: v.to(map_location) for k, v in state.items()}, {}, {}, p)
    if kind != "safetensors":
        size = p.stat().st_size
        raise CheckpointError(
            f"{p} is not a checkpoint deqrobust can read ({size} bytes, unrecognised or truncated header); "
            "expected a .safetensors file"
        )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            metadata = _parse_header(p, fh.metadata())
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, RuntimeError) as exc:  # RuntimeError: safetensors' own size check
        raise CheckpointError(f"checkpoint {p} is truncated or corrupted: {exc}") from exc
    expected = metadata.get("tensor_sha256")
    if verify and expected is not None and _tensor_digest(tensors) != expected:
        raise CheckpointError(f"checkpoint {p} is corrupted: its tensors do not match the stored SHA-256")
    if not metadata and not any(k.startswith("model/") for k in tensors):
        state = tensors  # a plain safetensors weights file
        return Checkpoint({k: v.to(map_location) for k, v in state.items()}, {}, {}, p)
    state = {k[len("model/") :]: v.to(map_location) for k, v in tensors.items() if k.startswith("model/")}
    extra = {k[len("extra/") :]: v.to(map_location) for k, v in tensors.items() if k.startswith("extra/")}
    return Checkpoint(state, metadata, extra, p)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming missing/unexpected keys and shape mismatches.

    Example:
        >>> try:
        ...     check_state_dict(nn.Linear(2, 3), {"weight": torch.zeros(3, 2), "bias": torch.zeros(4)})
        ... except CheckpointError as exc:
        ...     print(exc)
        checkpoint does not fit Linear: shape mismatch bias: checkpoint (4,) vs model (3,)
    """
    own = model.state_dict()
    kind = source.split()[0]  # "checkpoint", or "weights" for a --weights file
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: {kind} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f", … ({len(keys)} in all)" if len(keys) > 6 else "")

    parts = []
    if missing:
        parts.append(f"missing keys {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {show(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch {show(shapes)}")
    raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))


def load_model(path: PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture recorded in a checkpoint, load its weights, and return
    ``(model in eval mode on device, metadata)``.

    Raises:
        CheckpointError: unreadable file, no model metadata (a bare state dict), unknown model, or
            weights that do not fit the recorded architecture.
    """
    from .errors import ConfigError
    from .models import build_model

    ckpt = load_checkpoint(path)
    spec = ckpt.metadata.get("model")
    if not isinstance(spec, dict) or "name" not in spec:
        raise CheckpointError(
            f"{ckpt.path} has no deqrobust model metadata (a bare state dict?): build the model yourself and "
            "call model.load_state_dict(load_checkpoint(path).state_dict)"
        )
    try:
        model = build_model(
            spec["name"], int(spec.get("num_classes", 10)), int(spec.get("in_channels", 3)), **spec.get("kwargs", {})
        )
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt.path} records a model deqrobust cannot build: {exc}") from exc
    check_state_dict(model, ckpt.state_dict, f"checkpoint {ckpt.path}")
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.to(device).eval(), ckpt.metadata
