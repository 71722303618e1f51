"""Verified downloads and safe, atomic archive extraction for the dataset cache.

Nothing here is trusted until its MD5 matches: a download lands in a temporary file next to its
destination and is renamed into place only after the checksum (and the announced length) agree,
and a file already in the cache is re-checked before use.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from tqdm import tqdm

from deqrobust.errors import DatasetError

__all__ = ["cache_root", "download_file", "extract_tar_gz", "md5_of", "verify_md5"]

_CHUNK = 1 << 20
ENV_VAR = "DEQROBUST_DATA"


def cache_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The dataset cache folder: ``root`` if given, else ``$DEQROBUST_DATA``, else ``~/.cache/deqrobust``.

    Example:
        >>> str(cache_root("/tmp/my-data"))
        '/tmp/my-data'
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "deqrobust"


def md5_of(path: str | os.PathLike[str]) -> str:
    """Hex MD5 digest of a file, read in 1 MiB chunks.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = p.write_bytes(b"abc")
        >>> md5_of(p)
        '900150983cd24fb0d6963f7d28e17f72'
    """
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: str | os.PathLike[str], md5: str) -> None:
    """Raise :class:`DatasetError` unless the file at ``path`` has MD5 ``md5``."""
    actual = md5_of(path)
    if actual != md5.lower():
        raise DatasetError(
            f"{path}: MD5 mismatch (expected {md5.lower()}, got {actual}); the file is corrupted or "
            "not the expected release. Delete it and download it again (or pass the right file)."
        )


def download_file(
    url: str,
    dest_path: str | os.PathLike[str],
    md5: str,
    *,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Download ``url`` to ``dest_path``, verifying its MD5 before it appears there.

    The body streams into a temporary file in the destination folder; a short read (fewer bytes
    than ``Content-Length``) or a checksum mismatch deletes it and raises :class:`DatasetError`.
    Only a verified file is renamed (atomically) to ``dest_path``. An existing ``dest_path`` is
    re-verified and returned without downloading; if it is corrupted, :class:`DatasetError` is
    raised and the file is left for the user to inspect and delete.

    Args:
        url: Where to fetch the file from (any scheme ``urllib`` opens).
        dest_path: Final location of the file.
        md5: Expected hex MD5 of the complete file.
        progress: Show a tqdm progress bar.
        timeout: Socket timeout in seconds.

    Returns:
        ``dest_path`` as a :class:`~pathlib.Path`.
    """
    dest = Path(dest_path)
    if dest.exists():
        verify_md5(dest, md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    header = response.headers.get("Content-Length")
                    expected = int(header) if header is not None and header.isdigit() else None
                    received = _stream(response, out, expected, dest.name, progress)
            except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, bad replies
                raise DatasetError(
                    f"{dest.name}: download from {url} failed ({exc}); check the URL and network, "
                    f"or place a verified copy at {dest}."
                ) from exc
        if expected is not None and received != expected:
            raise DatasetError(
                f"{dest.name}: download from {url} is incomplete ({received} of {expected} bytes); "
                "nothing was kept, try again."
            )
        actual = md5_of(tmp)
        if actual != md5.lower():
            raise DatasetError(
                f"{dest.name}: downloaded file from {url} has MD5 {actual}, expected {md5.lower()}; "
                "nothing was kept. Retry, or check that the URL serves the expected release."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _stream(response: Any, out: BinaryIO, expected: int | None, name: str, progress: bool) -> int:
    received = 0
    with tqdm(total=expected, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
        while True:
            chunk = response.read(_CHUNK)
            if not chunk:
                return received
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))


def extract_tar_gz(archive: str | os.PathLike[str], dest_dir: str | os.PathLike[str], top: str) -> Path:
    """Extract folder ``top`` of a tar.gz archive into ``dest_dir``, safely and atomically.

    Every member must be a regular file or folder under ``top`` with a relative name and no ``..``;
    anything else (absolute paths, links, devices, other top-level entries) raises
    :class:`DatasetError` before a byte is written. The archive is unpacked into a temporary folder
    inside ``dest_dir`` and ``top`` is then renamed into place, so ``dest_dir / top`` is either
    absent or complete. An existing ``dest_dir / top`` is returned as is.

    Returns:
        ``dest_dir / top``.
    """
    dest_dir = Path(dest_dir)
    target = dest_dir / top
    if target.exists():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member, top, archive)
                # members are already checked; the "data" filter (where available) is a second guard
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:  # Python < 3.11.4
                    tar.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DatasetError(f"{archive}: cannot extract ({exc}); delete it and download again.") from exc
        if not (tmp / top).is_dir():
            raise DatasetError(f"{archive}: archive has no folder {top!r}; is it the right file?")
        try:
            os.rename(tmp / top, target)
        except OSError:
            if not target.is_dir():  # lost a race to another process only if target now exists
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_member(member: tarfile.TarInfo, top: str, archive: object) -> None:
    name = PurePosixPath(member.name)
    bad = (
        name.is_absolute()
        or ".." in name.parts
        or not name.parts
        or name.parts[0] != top
        or not (member.isfile() or member.isdir())
    )
    if bad:
        raise DatasetError(
            f"{archive}: refusing to extract unsafe or unexpected member {member.name!r} "
            f"(only files and folders under {top}/ are allowed); delete the archive."
        )
