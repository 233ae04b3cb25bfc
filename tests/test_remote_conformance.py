"""One behaviour suite for every Remote backend (the fsspec/restic shape).

Each backend gets a factory below; SSH and object-store backends add theirs (with the real
servers their fixtures start) and must pass the same tests unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from s3servers import s3_remote
from sshd import ssh_remote
from tether.errors import InvalidPath, VerificationError
from tether.remotes import LocalRemote, Remote
from tether.remotes.base import ErrorKind

RemoteFactory = Callable[[Path], Remote]


def _local(tmp: Path) -> Remote:
    root = tmp / "remote-root"
    root.mkdir()
    return LocalRemote(str(root), root)


BACKENDS: dict[str, RemoteFactory] = {"local": _local, "ssh": ssh_remote}  # ssh: a real sshd (tests/sshd.py)
BACKENDS["s3"] = s3_remote  # rclone serve s3 on 127.0.0.1 (tests/s3servers.py)
BACKENDS["s3-moto"] = functools.partial(s3_remote, kind="moto")  # enforces If-None-Match


@pytest.fixture(params=sorted(BACKENDS))
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Remote]:
    backend = BACKENDS[request.param](tmp_path)
    backend.check()
    yield backend
    backend.close()


def _file(tmp_path: Path, name: str, data: bytes) -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_is_a_remote(remote: Remote) -> None:
    assert isinstance(remote, Remote)


def test_put_then_list_stat_and_read(remote: Remote, tmp_path: Path) -> None:
    src, digest = _file(tmp_path, "a", b"hello")
    remote.put_file(src, "ds/sub dir/a b.txt", digest=digest, mtime_ns=1_700_000_000_000_000_000)
    listed = {s.path: s for s in remote.list_files("ds")}
    assert set(listed) == {"sub dir/a b.txt"}
    assert listed["sub dir/a b.txt"].size == 5
    assert remote.read_bytes("ds/sub dir/a b.txt") == b"hello"
    assert remote.exists("ds/sub dir/a b.txt")
    if remote.capabilities.preserves_mtime:
        assert listed["sub dir/a b.txt"].mtime_ns == 1_700_000_000_000_000_000


def test_listing_a_missing_prefix_is_empty(remote: Remote) -> None:
    assert list(remote.list_files("nothing/here")) == []


def test_listing_hides_state_folder_and_temp_names(remote: Remote, tmp_path: Path) -> None:
    src, digest = _file(tmp_path, "a", b"x")
    remote.put_file(src, "ds/a", digest=digest, mtime_ns=0)
    remote.write_bytes_atomic("ds/.tether/index", b"idx")
    remote.write_bytes_atomic("ds/.b.tether-tmp-abc123", b"partial")
    assert [s.path for s in remote.list_files("ds")] == ["a"]


def test_wrong_digest_never_reaches_the_final_name(remote: Remote, tmp_path: Path) -> None:
    good, good_digest = _file(tmp_path, "good", b"old content")
    remote.put_file(good, "ds/f", digest=good_digest, mtime_ns=0)
    bad, _ = _file(tmp_path, "bad", b"new content")
    with pytest.raises(VerificationError):
        remote.put_file(bad, "ds/f", digest="0" * 64, mtime_ns=0)
    assert remote.read_bytes("ds/f") == b"old content"
    assert [s.path for s in remote.list_files("ds")] == ["f"]
    assert remote.cleanup_temp("ds") == 0  # nothing was left behind


def test_get_file_verifies(remote: Remote, tmp_path: Path) -> None:
    src, digest = _file(tmp_path, "a", b"payload")
    remote.put_file(src, "ds/a", digest=digest, mtime_ns=1_600_000_000_000_000_000)
    dest = tmp_path / "staging" / "a"
    remote.get_file("ds/a", dest, digest=digest, mtime_ns=1_600_000_000_000_000_000)
    assert dest.read_bytes() == b"payload"
    assert dest.stat().st_mtime_ns == 1_600_000_000_000_000_000
    other = tmp_path / "staging" / "b"
    with pytest.raises(VerificationError):
        remote.get_file("ds/a", other, digest="f" * 64, mtime_ns=0)
    assert not other.exists()
    assert os.listdir(other.parent) == ["a"]


def test_get_file_replaces_what_a_killed_run_left_at_the_staging_path(remote: Remote, tmp_path: Path) -> None:
    """Backends may write the staging path in place: a longer partial file is truncated away, a
    planted link is replaced, never followed (its target keeps its bytes), and a folder left by
    an earlier run is removed."""
    src, digest = _file(tmp_path, "a", b"payload")
    remote.put_file(src, "ds/a", digest=digest, mtime_ns=1_600_000_000_000_000_000)
    staging = tmp_path / "staging"
    staging.mkdir()
    partial = staging / "a"
    partial.write_bytes(b"a much longer partial file from a killed run")
    remote.get_file("ds/a", partial, digest=digest, mtime_ns=1_600_000_000_000_000_000)
    assert partial.read_bytes() == b"payload"
    victim = tmp_path / "victim"
    victim.write_bytes(b"not tether's")
    link = staging / "b"
    link.symlink_to(victim)
    remote.get_file("ds/a", link, digest=digest, mtime_ns=1_600_000_000_000_000_000)
    assert not link.is_symlink() and link.read_bytes() == b"payload"
    assert victim.read_bytes() == b"not tether's"
    folder = staging / "c"  # staged files of an earlier plan, where this file now goes
    (folder / "deeper").mkdir(parents=True)
    (folder / "deeper" / "old.txt").write_bytes(b"staged before")
    remote.get_file("ds/a", folder, digest=digest, mtime_ns=1_600_000_000_000_000_000)
    assert folder.read_bytes() == b"payload"


def test_create_exclusive_is_exclusive(remote: Remote) -> None:
    assert remote.create_exclusive("ds/.tether/lock", b"one") is True
    assert remote.create_exclusive("ds/.tether/lock", b"two") is False
    assert remote.read_bytes("ds/.tether/lock") == b"one"


def test_create_exclusive_within_an_existing_folder_makes_what_lies_below(
    remote: Remote, tmp_path: Path
) -> None:
    src, digest = _file(tmp_path, "a", b"data")
    remote.put_file(src, "ds/a", digest=digest, mtime_ns=1_700_000_000_000_000_000)
    assert remote.create_exclusive("ds/.tether/lock", b"one", within="ds") is True
    assert remote.create_exclusive("ds/.tether/lock", b"two", within="ds") is False
    assert remote.read_bytes("ds/.tether/lock") == b"one"


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_create_exclusive_within_a_missing_folder_makes_nothing(kind: str, tmp_path: Path) -> None:
    """A lock taken before the run has looked: a dataset the remote lacks gets no folder."""
    remote = BACKENDS[kind](tmp_path)
    try:
        with pytest.raises(FileNotFoundError):
            remote.create_exclusive("ns/ds/.tether/lock", b"one", within="ns/ds")
        (tmp_path / "remote-root" / "ns").mkdir()
        (tmp_path / "remote-root" / "ns" / "ds").write_bytes(b"a file, not a folder")
        with pytest.raises(FileNotFoundError):
            remote.create_exclusive("ns/ds/.tether/lock", b"one", within="ns/ds")
        assert [p.name for p in (tmp_path / "remote-root").rglob("*")] == ["ns", "ds"]
    finally:
        remote.close()


def test_write_bytes_atomic_replaces(remote: Remote) -> None:
    remote.write_bytes_atomic("ds/.tether/index", b"v1")
    remote.write_bytes_atomic("ds/.tether/index", b"v2")
    assert remote.read_bytes("ds/.tether/index") == b"v2"


def test_read_missing_raises_file_not_found(remote: Remote) -> None:
    with pytest.raises(FileNotFoundError):
        remote.read_bytes("ds/.tether/none")


def test_delete_is_idempotent(remote: Remote, tmp_path: Path) -> None:
    src, digest = _file(tmp_path, "a", b"x")
    remote.put_file(src, "ds/deep/a", digest=digest, mtime_ns=0)
    remote.delete("ds/deep/a")
    remote.delete("ds/deep/a")
    assert not remote.exists("ds/deep/a")
    assert list(remote.list_files("ds")) == []


def test_hash_files_where_the_data_lives(remote: Remote, tmp_path: Path) -> None:
    src, digest = _file(tmp_path, "a", b"abc" * 1000)
    remote.put_file(src, "ds/a", digest=digest, mtime_ns=0)
    assert remote.hash_files(["ds/a"]) == {"ds/a": digest}


def test_open_read_streams(remote: Remote, tmp_path: Path) -> None:
    src, digest = _file(tmp_path, "a", b"stream me")
    remote.put_file(src, "ds/a", digest=digest, mtime_ns=0)
    with remote.open_read("ds/a") as f:
        assert f.read() == b"stream me"


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "ds/../../x", "ds/.tether/../../x", "a\\b"])
def test_paths_that_escape_are_refused_before_io(remote: Remote, tmp_path: Path, bad: str) -> None:
    src, digest = _file(tmp_path, "a", b"x")
    with pytest.raises(InvalidPath):
        remote.put_file(src, bad, digest=digest, mtime_ns=0)
    with pytest.raises(InvalidPath):
        remote.read_bytes(bad)


def test_flush_and_classify(remote: Remote) -> None:
    remote.flush()
    assert remote.classify_error(ValueError("x")) == ErrorKind.PERMANENT


def test_read_range(remote: Remote, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    src, digest = _file(tmp_path, "r", data)
    remote.put_file(src, "ds/r.bin", digest=digest, mtime_ns=1_700_000_000_000_000_000)
    assert remote.read_range("ds/r.bin", 0, 10) == data[:10]
    assert remote.read_range("ds/r.bin", len(data) - 8, 8) == data[-8:]
    assert remote.read_range("ds/r.bin", 1000, 3000) == data[1000:4000]
