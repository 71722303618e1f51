"""CIFAR-10/100: download + verify + extract + parse from files in the official python format."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch

from deqrobust.data import load_dataset
from deqrobust.data.cifar import CIFAR10_MD5, CIFAR10_URL, load_cifar10, load_cifar100, read_cifar_batch
from deqrobust.data.download import md5_of
from deqrobust.errors import DatasetError

from .conftest import CIFAR10_TRAIN, cifar_batch, write_cifar10_folder


def _check_images(split_images: torch.Tensor, data: np.ndarray) -> None:
    """Channel order: each row is 1024 R, 1024 G, 1024 B values, each plane row-major."""
    assert split_images.dtype == torch.uint8
    for c in range(3):
        expected = data[:, c * 1024 : (c + 1) * 1024].reshape(-1, 32, 32)
        assert torch.equal(split_images[:, c], torch.from_numpy(expected))


def test_defaults_are_official():
    assert CIFAR10_URL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert CIFAR10_MD5 == "c58f30108f718f92721af3b95e74349a"


def test_download_extract_parse_round_trip(tmp_path, cifar10_archive, http_server):
    archive, batches = cifar10_archive
    url, requests = http_server
    root = tmp_path / "cache"
    splits = load_cifar10(root, url=url + archive.name, md5=md5_of(archive), dev_size=0, progress=False)
    train_data = np.concatenate([batches[n][b"data"] for n in CIFAR10_TRAIN])
    train_labels = sum((batches[n][b"labels"] for n in CIFAR10_TRAIN), [])
    _check_images(splits.train.images, train_data)
    assert splits.train.labels.tolist() == train_labels and splits.train.labels.dtype == torch.int64
    _check_images(splits.test.images, batches["test_batch"][b"data"])
    assert splits.test.labels.tolist() == batches["test_batch"][b"labels"]
    assert (root / "cifar10" / "cifar-10-batches-py" / "batches.meta").is_file()
    assert md5_of(root / "cifar10" / "cifar-10-python.tar.gz") == md5_of(archive)
    assert sorted(p.name for p in (root / "cifar10").iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    # second load: from the cache, no request, and a dev split held out of train
    again = load_cifar10(root, download=False, url=url + archive.name, md5=md5_of(archive), dev_size=5)
    assert requests == ["/" + archive.name]
    assert len(again.train) == 25 and len(again.dev) == 5 and again.dev.name == "dev"
    rows = torch.cat([again.train.images, again.dev.images]).flatten(1)
    assert len(torch.unique(rows, dim=0)) == 30  # disjoint (random rows are distinct)


def test_corrupted_download_rejected(tmp_path, cifar10_archive, http_server):
    archive, _ = cifar10_archive
    url, _ = http_server
    good_md5 = md5_of(archive)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    root = tmp_path / "cache"
    with pytest.raises(DatasetError, match=good_md5):
        load_cifar10(root, url=url + archive.name, md5=good_md5, progress=False)
    assert list((root / "cifar10").iterdir()) == []


def test_truncated_download_rejected(tmp_path, cifar10_archive, http_server):
    archive, _ = cifar10_archive
    url, _ = http_server
    root = tmp_path / "cache"
    with pytest.raises(DatasetError, match="incomplete"):
        load_cifar10(root, url=url + "truncated/" + archive.name, md5=md5_of(archive), progress=False)
    assert list((root / "cifar10").iterdir()) == []


def test_existing_corrupted_archive_not_used(tmp_path, cifar10_archive, http_server):
    archive, _ = cifar10_archive
    url, requests = http_server
    cached = tmp_path / "cache" / "cifar10" / archive.name
    cached.parent.mkdir(parents=True)
    data = bytearray(archive.read_bytes())
    cached.write_bytes(bytes(data[:-100]))
    with pytest.raises(DatasetError, match="MD5 mismatch"):
        load_cifar10(tmp_path / "cache", url=url + archive.name, md5=md5_of(archive), progress=False)
    assert not (cached.parent / "cifar-10-batches-py").exists() and requests == []


def test_missing_without_download(tmp_path):
    with pytest.raises(DatasetError, match="download=True"):
        load_cifar10(tmp_path, download=False)


def test_read_existing_folder(tmp_path):
    batches = write_cifar10_folder(tmp_path / "cifar-10-batches-py")
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the folder or its parent
        splits = load_dataset("cifar10", path=path, dev_size=3)
        assert len(splits.train) + len(splits.dev) == 30 and len(splits.test) == 7
        assert splits.info.class_names[0] == "airplane"
    _check_images(splits.test.images, batches["test_batch"][b"data"])
    with pytest.raises(DatasetError, match="not an extracted"):
        load_cifar10(path=tmp_path / "nowhere")


class _Evil:
    def __init__(self, reduce):
        self._reduce = reduce

    def __reduce__(self):
        return self._reduce


@pytest.mark.parametrize("attack", ["open", "system"])
def test_malicious_pickle_refused(tmp_path, attack):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_folder(folder)
    marker = tmp_path / "pwned"
    reduce = (open, (str(marker), "w")) if attack == "open" else (os.system, (f"touch {marker}",))
    entry = cifar_batch(6, 10, "labels", 0)
    entry[b"labels"] = _Evil(reduce)
    (folder / "data_batch_3").write_bytes(pickle.dumps(entry))
    with pytest.raises(DatasetError, match="refusing to unpickle"):
        load_cifar10(path=folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: e.__setitem__(b"data", e[b"data"].astype(np.int16)), "uint8"),
        (lambda e: e.__setitem__(b"data", e[b"data"][:, :3000]), r"\(N, 3072\)"),
        (lambda e: e.__setitem__(b"labels", e[b"labels"][:-1]), "shape"),
        (lambda e: e.__setitem__(b"labels", [10] * 6), "outside"),
        (lambda e: e.pop(b"data"), "no 'data'"),
    ],
    ids=["dtype", "width", "label-count", "label-range", "missing-key"],
)
def test_malformed_batch(tmp_path, change, message):
    entry = cifar_batch(6, 10, "labels", 0)
    change(entry)
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(entry))
    with pytest.raises(DatasetError, match=message):
        read_cifar_batch(path, "labels", 10)


def test_truncated_pickle(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(cifar_batch(6, 10, "labels", 0))[:-500])
    with pytest.raises(DatasetError, match="not a readable"):
        read_cifar_batch(path, "labels", 10)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = cifar_batch(8, 100, "fine_labels", 1), cifar_batch(4, 100, "fine_labels", 2)
    train[b"coarse_labels"] = [0] * 8
    train[b"fine_labels"][0] = 99
    for name, entry in (("train", train), ("test", test)):
        (folder / name).write_bytes(pickle.dumps(entry, protocol=5))
    splits = load_cifar100(path=tmp_path, dev_size=0)
    assert splits.train.labels.tolist() == train[b"fine_labels"]
    _check_images(splits.train.images, train[b"data"])
    _check_images(splits.test.images, test[b"data"])
    assert splits.info.num_classes == 100 and len(splits.info.class_names) == 100
    shutil.rmtree(folder)
    with pytest.raises(DatasetError):
        load_cifar100(path=tmp_path)


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING), as in the official archives made with Python 2."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def test_python2_style_pickle(tmp_path):
    """Python 2 pickles: str keys after latin-1 decoding, array data as str, numpy.core globals."""
    entry = cifar_batch(5, 10, "labels", 7)
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(entry)
    data = buf.getvalue().replace(b"numpy._core.", b"numpy.core.")
    assert b"_codecs" not in data and b"cnumpy.core.multiarray\n_reconstruct" in data
    (tmp_path / "batch").write_bytes(data)
    images, labels = read_cifar_batch(tmp_path / "batch", "labels", 10)
    assert np.array_equal(images.reshape(5, 3072), entry[b"data"]) and labels.tolist() == entry[b"labels"]
