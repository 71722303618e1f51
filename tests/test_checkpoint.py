"""Checkpoints: safetensors round trip, metadata, and refusal of pickled code, truncation, corruption
and foreign architectures."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from deqrobust.checkpoint import (
    check_state_dict,
    load_checkpoint,
    load_model,
    model_spec,
    read_metadata,
    save_checkpoint,
)
from deqrobust.errors import CheckpointError
from deqrobust.models import build_model


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mdeq-tiny", num_classes=10, in_channels=1, f_max_iter=6).eval()


def save_tiny(path: Path, **meta) -> Path:
    model = tiny_model()
    metadata = {"model": model_spec("mdeq-tiny", 10, 1, {"f_max_iter": 6}), "epoch": 3, **meta}
    return save_checkpoint(path, model, metadata, extra={"rng": torch.arange(5, dtype=torch.uint8)})


def test_round_trip_identical_logits_and_metadata(tmp_path):
    path = save_tiny(tmp_path / "ckpt.safetensors", threat_model={"norm": "Linf", "eps": 0.1})
    model, meta = load_model(path)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(model(x), tiny_model()(x))
    assert not model.training and model.f_max_iter == 6
    assert meta["epoch"] == 3 and meta["threat_model"]["eps"] == 0.1
    assert meta["format"] == "deqrobust-checkpoint" and "deqrobust_version" in meta
    assert read_metadata(path) == meta
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.extra["rng"], torch.arange(5, dtype=torch.uint8))
    assert set(ckpt.state_dict) == set(tiny_model().state_dict())


class Evil:
    """Pickles to a call that would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"weight": torch.zeros(2), "payload": Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match="refused .*pickle.*nothing was executed"):
            load(path)
    assert not marker.exists()


def test_plain_weights_only_state_dict_is_accepted_but_has_no_metadata(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_model().state_dict(), path)
    ckpt = load_checkpoint(path)
    assert ckpt.metadata == {} and torch.equal(
        ckpt.state_dict["head.classifier.weight"], tiny_model().head.classifier.weight
    )
    with pytest.raises(CheckpointError, match="no deqrobust model metadata"):
        load_model(path)
    with pytest.raises(CheckpointError, match="not a deqrobust safetensors checkpoint"):
        read_metadata(path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 12 / 1e9])
def test_truncated_file_gives_clear_error(tmp_path, keep):
    path = save_tiny(tmp_path / "ckpt.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: max(4, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="truncated|corrupted|not a checkpoint"):
        load_model(path)


def test_flipped_tensor_bytes_are_detected(tmp_path):
    path = save_tiny(tmp_path / "ckpt.safetensors")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted.*SHA-256"):
        load_checkpoint(path)


def test_wrong_architecture_names_the_mismatch(tmp_path):
    path = save_tiny(tmp_path / "ckpt.safetensors")
    ckpt = load_checkpoint(path)
    other = build_model("mdeq-small", num_classes=10, in_channels=1)
    with pytest.raises(CheckpointError, match="does not fit DEQClassifier: .*(missing keys|shape mismatch)"):
        check_state_dict(other, ckpt.state_dict)
    # The metadata says mdeq-tiny but the weights come from mdeq-small: a mismatch, not a crash.
    meta = {"model": model_spec("mdeq-tiny", 10, 1, {})}
    bad = save_checkpoint(tmp_path / "bad.safetensors", other, meta)
    with pytest.raises(CheckpointError, match="shape mismatch|missing keys"):
        load_model(bad)
    meta = {"model": model_spec("no-such-net", 10, 1, {})}
    with pytest.raises(CheckpointError, match="cannot build"):
        load_model(save_checkpoint(tmp_path / "unknown.safetensors", other, meta))


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "junk.bin")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_tiny(tmp_path / "ckpt.safetensors", epoch=1)
    before = path.read_bytes()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_tiny(path, epoch=2)
    assert path.read_bytes() == before
    assert read_metadata(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temporary file left


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "x.safetensors", nn.Linear(2, 2), {"bad": object()})



def test_safetensors_size_check_during_a_concurrent_replace_is_a_checkpoint_error(tmp_path, monkeypatch):
    # A reader polling last.safetensors while training os.replace()s it once got safetensors'
    # "size <n> is smaller than the required mapping size" as a bare RuntimeError (CI, test_resume).
    import safetensors

    path = save_tiny(tmp_path / "ckpt.safetensors")

    def racing_open(*args, **kwargs):
        raise RuntimeError(f"file <{path}> size <564288> is smaller than the required mapping size <564296>")

    monkeypatch.setattr(safetensors, "safe_open", racing_open)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_metadata(path)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)


def test_a_header_length_with_low_byte_0x80_is_still_read_as_safetensors(tmp_path):
    # A safetensors file starts with its header length (8 bytes, little-endian): when the low byte is
    # 0x80 the file starts like a pickle, and was once loaded as one, losing its metadata.
    import struct

    model = nn.Linear(3, 2)
    for pad in range(300):
        path = save_checkpoint(tmp_path / "m.safetensors", model, metadata={"note": "x" * pad, "model": {"name": "m"}})
        (size,) = struct.unpack("<Q", path.read_bytes()[:8])
        if size % 256 == 0x80:
            break
    else:  # pragma: no cover - the header grows in 8-byte steps, so some padding reaches it
        pytest.fail("no padding gave a header length with low byte 0x80")
    ckpt = load_checkpoint(path)
    assert ckpt.metadata["note"] == "x" * pad and ckpt.metadata["model"] == {"name": "m"}
    assert ckpt.state_dict["weight"].equal(model.weight.detach())
