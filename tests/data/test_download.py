"""download_file / extract_tar_gz: nothing unverified or unsafe ever lands in the cache."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from deqrobust.data.download import cache_root, download_file, extract_tar_gz, md5_of
from deqrobust.errors import DatasetError


def _serve(tmp_path, name: str, data: bytes) -> str:
    (tmp_path / "served").mkdir(exist_ok=True)
    (tmp_path / "served" / name).write_bytes(data)
    return hashlib.md5(data).hexdigest()


def test_md5_of(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"hello" * 1000)
    assert md5_of(p) == hashlib.md5(b"hello" * 1000).hexdigest()


def test_download_verifies_and_places_file(tmp_path, http_server):
    url, requests = http_server
    md5 = _serve(tmp_path, "blob.bin", bytes(range(256)) * 50)
    dest = tmp_path / "cache" / "sub" / "blob.bin"
    assert download_file(url + "blob.bin", dest, md5, progress=False) == dest
    assert dest.read_bytes() == bytes(range(256)) * 50
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]  # no temp files left
    # an existing verified file is reused without a request
    download_file(url + "blob.bin", dest, md5, progress=False)
    assert requests == ["/blob.bin"]


def test_download_md5_mismatch_leaves_nothing(tmp_path, http_server):
    url, _ = http_server
    _serve(tmp_path, "blob.bin", b"wrong bytes")
    dest = tmp_path / "cache" / "blob.bin"
    expected = hashlib.md5(b"right bytes").hexdigest()
    with pytest.raises(DatasetError, match="blob.bin") as err:
        download_file(url + "blob.bin", dest, expected, progress=False)
    assert expected in str(err.value) and hashlib.md5(b"wrong bytes").hexdigest() in str(err.value)
    assert list(dest.parent.iterdir()) == []


def test_download_truncated_is_rejected(tmp_path, http_server):
    url, _ = http_server
    md5 = _serve(tmp_path, "blob.bin", b"x" * 10_000)
    dest = tmp_path / "cache" / "blob.bin"
    with pytest.raises(DatasetError, match="incomplete"):
        download_file(url + "truncated/blob.bin", dest, md5, progress=False)
    assert list(dest.parent.iterdir()) == []


def test_download_http_error(tmp_path, http_server):
    url, _ = http_server
    dest = tmp_path / "cache" / "missing.bin"
    with pytest.raises(DatasetError, match="failed"):
        download_file(url + "missing.bin", dest, "0" * 32, progress=False)
    assert list(dest.parent.iterdir()) == []


def test_existing_corrupted_file_is_not_used(tmp_path, http_server):
    url, requests = http_server
    md5 = _serve(tmp_path, "blob.bin", b"good")
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"bad!")
    with pytest.raises(DatasetError, match="MD5 mismatch"):
        download_file(url + "blob.bin", dest, md5, progress=False)
    assert requests == []


def _tar_with(tmp_path, members: list[tarfile.TarInfo]) -> str:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for info in members:
            data = b"payload" if info.isfile() else None
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return archive


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    "member",
    [
        _info("top/../../escaped"),
        _info("/tmp/absolute-deqrobust-test"),
        _info("top/link", tarfile.SYMTYPE, "/etc/passwd"),
        _info("top/hard", tarfile.LNKTYPE, "top/ok"),
        _info("other/file"),
    ],
    ids=["dotdot", "absolute", "symlink", "hardlink", "outside-top"],
)
def test_extract_rejects_unsafe_members(tmp_path, member):
    archive = _tar_with(tmp_path, [_info("top", tarfile.DIRTYPE), _info("top/ok"), member])
    dest = tmp_path / "dest"
    with pytest.raises(DatasetError, match="refusing to extract"):
        extract_tar_gz(archive, dest, "top")
    assert not (dest / "top").exists() and not (tmp_path / "escaped").exists()
    assert list(dest.iterdir()) == []


def test_extract_is_complete_and_idempotent(tmp_path):
    archive = _tar_with(tmp_path, [_info("top", tarfile.DIRTYPE), _info("top/a"), _info("top/b")])
    out = extract_tar_gz(archive, tmp_path / "dest", "top")
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["top"]  # temp folder removed
    assert extract_tar_gz(archive, tmp_path / "dest", "top") == out


def test_extract_garbage_archive(tmp_path):
    archive = tmp_path / "garbage.tar.gz"
    archive.write_bytes(b"not a tar file at all")
    with pytest.raises(DatasetError, match="cannot extract"):
        extract_tar_gz(archive, tmp_path / "dest", "top")
    assert list((tmp_path / "dest").iterdir()) == []


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQROBUST_DATA", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DEQROBUST_DATA")
    assert str(cache_root()).endswith(".cache/deqrobust")
