"""Fixtures for the data tests: tiny files in the real dataset formats and a local HTTP server."""

from __future__ import annotations

import functools
import http.server
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def cifar_batch(n: int, num_classes: int, label_key: str, seed: int) -> dict:
    """A batch dict as in the official pickles: bytes keys, uint8 (n, 3072) data, list labels."""
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": f"batch {seed}".encode(),
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key.encode(): rng.integers(0, num_classes, size=n).tolist(),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def write_cifar10_folder(folder: Path, n: int = 6) -> dict[str, dict]:
    folder.mkdir(parents=True)
    batches = {name: cifar_batch(n, 10, "labels", seed) for seed, name in enumerate([*CIFAR10_TRAIN, "test_batch"])}
    batches["test_batch"] = cifar_batch(n + 1, 10, "labels", 99)
    for name, entry in batches.items():
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {b"label_names": [b"airplane", b"automobile"], b"num_cases_per_batch": n, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return batches


def tar_gz(src_dir: Path, top: str, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_dir / top, arcname=top)
    return archive


@pytest.fixture
def cifar10_archive(tmp_path):
    """(archive path, batches) for a small cifar-10-python.tar.gz in the official layout."""
    src = tmp_path / "src"
    batches = write_cifar10_folder(src / "cifar-10-batches-py")
    served = tmp_path / "served"
    served.mkdir()
    return tar_gz(src, "cifar-10-batches-py", served / "cifar-10-python.tar.gz"), batches


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``/truncated/NAME`` announces NAME's full length but sends half of it."""

    requests: list[str]

    def do_GET(self):  # noqa: N802
        self.requests.append(self.path)
        if self.path.startswith("/truncated/"):
            body = (Path(self.directory) / self.path.removeprefix("/truncated/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    """A server on 127.0.0.1 (ephemeral port) for ``tmp_path / "served"``; yields (base_url, requests)."""
    served = tmp_path / "served"
    served.mkdir(exist_ok=True)
    handler = type("Handler", (_Handler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

