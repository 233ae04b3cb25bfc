"""Unit tests for the local-path remote, the verified-write primitives and remote URL parsing.

Backend-independent behaviour lives in test_remote_conformance.py; this file covers what is
specific to LocalRemote and tether.fileio (temp names, mtime, folders, errno mapping) and
tether.remotes.parse_url/open_remote.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from tether import forked
from tether.config import RemoteConfig
from tether.errors import (
    DiskFullError,
    ExitCode,
    InvalidPath,
    RemotePermissionError,
    RemoteUnavailable,
    ScanError,
    UsageError,
    VerificationError,
)
from tether.fileio import (
    copy_verified,
    fsync_dir,
    os_error_to_tether,
    syncfs,
    temp_sibling,
    write_bytes_atomic,
)
from tether.paths import TEMP_MARKER, is_temp_name
from tether.remotes import LocalRemote, ParsedURL, Remote, open_remote, parse_url
from tether.remotes.base import SMALL_FILE_BYTES, Capabilities, ErrorKind, RemoteStat, lanes

MTIME = 1_600_000_000_123_456_789


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def temp_files(root: Path) -> list[str]:
    return sorted(
        str(Path(folder, name).relative_to(root))
        for folder, _dirs, files in os.walk(root)
        for name in files
        if TEMP_MARKER in name
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "remote"
    r.mkdir()
    return r


@pytest.fixture
def remote(root: Path) -> LocalRemote:
    return LocalRemote(str(root), root)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return put(tmp_path / "src" / "payload.bin", b"payload bytes")


# -- check ---------------------------------------------------------------------------------------


def test_check_ok(remote: LocalRemote) -> None:
    remote.check()
    assert isinstance(remote, Remote)
    assert repr(remote) == f"LocalRemote({remote.url!r})"


def test_check_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"
    with pytest.raises(RemoteUnavailable) as info:
        LocalRemote(str(missing), missing).check()
    err = info.value
    assert err.exit_code == ExitCode.UNREACHABLE == 5
    assert str(missing) in err.message
    assert f"mkdir -p {missing}" in err.hint
    assert isinstance(err, ConnectionError)
    assert not missing.exists()  # never created behind the user's back


def test_check_file_instead_of_folder(tmp_path: Path) -> None:
    f = put(tmp_path / "afile")
    with pytest.raises(RemoteUnavailable, match="is a file") as info:
        LocalRemote(str(f), f).check()
    assert info.value.exit_code == 5


def test_check_unreadable_folder(remote: LocalRemote, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root; fake the access check instead of chmod.
    monkeypatch.setattr("tether.remotes.local.os.access", lambda *_a, **_k: False)
    with pytest.raises(RemotePermissionError) as info:
        remote.check()
    assert info.value.exit_code == 5


# -- list_files ----------------------------------------------------------------------------------


def test_list_files_relative_to_prefix_skipping_state_and_temp(remote: LocalRemote, root: Path) -> None:
    ds = root / "ns" / "ds"
    os.utime(put(ds / "a.csv", b"12"), ns=(MTIME, MTIME))
    put(ds / "sub" / "b", b"")
    put(ds / "a.b")
    put(ds / ".tether" / "index")
    put(ds / ".tether" / ".index.tether-tmp-0a1b2c")
    put(ds / ".a.csv.tether-tmp-deadbeef0000")
    put(ds / "sub" / ".b.tether-tmp-123")
    put(root / "ns" / "other" / "x")  # a sibling dataset is not listed
    listed = list(remote.list_files("ns/ds"))
    assert [s.path for s in listed] == ["a.b", "a.csv", "sub/b"]
    assert listed[1] == RemoteStat("a.csv", 2, MTIME)
    assert listed[2].size == 0


def test_list_files_missing_or_file_prefix_is_empty(remote: LocalRemote, root: Path) -> None:
    assert list(remote.list_files("ns/none")) == []
    put(root / "ns" / "file")
    assert list(remote.list_files("ns/file")) == []


def test_list_files_whole_remote(remote: LocalRemote, root: Path) -> None:
    put(root / "ns" / "ds" / "f")
    put(root / ".tether" / "x")
    assert [s.path for s in remote.list_files("")] == ["ns/ds/f"]


@pytest.mark.parametrize("prefix", ["../x", "/etc", "ns/../..", ".tether"])
def test_list_files_refuses_escaping_prefix(remote: LocalRemote, prefix: str) -> None:
    with pytest.raises(InvalidPath):
        list(remote.list_files(prefix))


def test_list_files_refuses_symlinks_and_names_the_remote(remote: LocalRemote, root: Path) -> None:
    put(root / "ds" / "a")
    (root / "ds" / "link").symlink_to(root / "ds" / "a")
    with pytest.raises(ScanError) as info:
        list(remote.list_files("ds"))
    assert info.value.paths == ["link"]
    assert str(info.value).startswith(f"remote {root}:")


# -- put_file / get_file / copy_verified -------------------------------------------------------


def test_put_file_writes_through_a_temp_name(remote: LocalRemote, root: Path, src: Path) -> None:
    final = root / "ns" / "ds" / "sub" / "out.bin"
    seen: list[tuple[bool, list[str]]] = []

    def on_bytes(n: int) -> None:
        seen.append((final.exists(), temp_files(root)))

    remote.put_file(src, "ns/ds/sub/out.bin", digest=sha(b"payload bytes"), mtime_ns=MTIME, on_bytes=on_bytes)
    assert seen, "on_bytes is called while copying"
    exists_during, temps_during = seen[0]
    assert not exists_during
    assert len(temps_during) == 1
    temp_name = Path(temps_during[0])
    assert temp_name.parent == Path("ns/ds/sub")  # same folder, so the rename is atomic
    assert temp_name.name.startswith(".out.bin" + TEMP_MARKER)
    assert final.read_bytes() == b"payload bytes"
    assert final.stat().st_mtime_ns == MTIME
    assert temp_files(root) == []


def test_put_file_reports_bytes(remote: LocalRemote, tmp_path: Path) -> None:
    data = b"z" * (2 * 1024 * 1024 + 5)
    src = put(tmp_path / "big", data)
    counts: list[int] = []
    remote.put_file(src, "ds/big", digest=sha(data), mtime_ns=MTIME, on_bytes=counts.append)
    assert sum(counts) == len(data)
    assert len(counts) == 3  # one call per chunk


def test_put_file_wrong_digest_promotes_nothing(remote: LocalRemote, root: Path, src: Path) -> None:
    with pytest.raises(VerificationError) as info:
        remote.put_file(src, "ns/ds/new.bin", digest="0" * 64, mtime_ns=MTIME)
    err = info.value
    assert err.exit_code == ExitCode.VERIFY_FAILED == 4
    assert err.paths == ["ns/ds/new.bin"]
    assert "mismatch" in err.message
    assert not (root / "ns" / "ds" / "new.bin").exists()
    assert temp_files(root) == []


def test_put_file_wrong_digest_leaves_existing_file_untouched(
    remote: LocalRemote, root: Path, src: Path
) -> None:
    old = put(root / "ds" / "f", b"old content")
    os.utime(old, ns=(MTIME, MTIME))
    inode = old.stat().st_ino
    with pytest.raises(VerificationError):
        remote.put_file(src, "ds/f", digest=sha(b"something else"), mtime_ns=MTIME + 1)
    assert old.read_bytes() == b"old content"
    assert old.stat().st_mtime_ns == MTIME
    assert old.stat().st_ino == inode
    assert temp_files(root) == []


def test_put_file_replaces_existing_file(remote: LocalRemote, root: Path, src: Path) -> None:
    put(root / "ds" / "f", b"old")
    remote.put_file(src, "ds/f", digest=sha(b"payload bytes"), mtime_ns=MTIME)
    assert (root / "ds" / "f").read_bytes() == b"payload bytes"


def test_put_file_missing_source_leaves_nothing(remote: LocalRemote, root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        remote.put_file(tmp_path / "gone", "ds/f", digest=sha(b""), mtime_ns=MTIME)
    assert temp_files(root) == []
    assert not (root / "ds" / "f").exists()


def test_put_empty_file(remote: LocalRemote, root: Path, tmp_path: Path) -> None:
    src = put(tmp_path / "empty", b"")
    remote.put_file(src, "ds/empty", digest=sha(b""), mtime_ns=MTIME)
    assert (root / "ds" / "empty").read_bytes() == b""
    assert (root / "ds" / "empty").stat().st_mtime_ns == MTIME


def test_get_file_into_staging(remote: LocalRemote, root: Path, tmp_path: Path) -> None:
    put(root / "ds" / "sub" / "f", b"remote bytes")
    dest = tmp_path / "staging" / "deep" / "f"
    remote.get_file("ds/sub/f", dest, digest=sha(b"remote bytes"), mtime_ns=MTIME)
    assert dest.read_bytes() == b"remote bytes"
    assert dest.stat().st_mtime_ns == MTIME
    assert temp_files(dest.parent) == []


def test_get_file_wrong_digest_leaves_no_bytes_at_the_staging_path(
    remote: LocalRemote, root: Path, tmp_path: Path
) -> None:
    """get_file writes its staging destination in place (Remote.get_file): on a mismatch the
    unverified bytes are removed, never left for promotion."""
    put(root / "ds" / "f", b"corrupted on the remote")
    dest = put(tmp_path / "staging" / "f", b"an earlier staged copy")
    with pytest.raises(VerificationError) as info:
        remote.get_file("ds/f", dest, digest=sha(b"what the index says"), mtime_ns=MTIME)
    assert info.value.exit_code == 4
    assert os.listdir(dest.parent) == []


def test_copy_verified_without_mtime_keeps_current_time(tmp_path: Path) -> None:
    src = put(tmp_path / "s", b"abc")
    os.utime(src, ns=(MTIME, MTIME))
    final = tmp_path / "out" / "f"
    copy_verified(src, final, digest=sha(b"abc"), mtime_ns=None, label="f")
    assert final.read_bytes() == b"abc"
    assert final.stat().st_mtime_ns != MTIME


def test_copy_verified_interrupted_leaves_no_temp(tmp_path: Path) -> None:
    src = put(tmp_path / "s", b"abc")
    final = tmp_path / "out" / "f"

    def boom(_n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        copy_verified(src, final, digest=sha(b"abc"), mtime_ns=None, label="f", on_bytes=boom)
    assert os.listdir(final.parent) == []


def test_temp_sibling_is_hidden_unique_and_recognised(tmp_path: Path) -> None:
    final = tmp_path / "d" / "data.csv"
    a, b = temp_sibling(final), temp_sibling(final)
    assert a != b
    assert a.parent == final.parent
    assert a.name.startswith(".data.csv" + TEMP_MARKER)
    assert is_temp_name(a.name)
    assert not is_temp_name(final.name)


# -- small files: create_exclusive, write_bytes_atomic, read, exists, delete --------------------


def test_create_exclusive_true_once_then_false(remote: LocalRemote, root: Path) -> None:
    assert remote.create_exclusive("ns/ds/.tether/lock", b"first") is True
    assert remote.create_exclusive("ns/ds/.tether/lock", b"second") is False
    assert (root / "ns" / "ds" / ".tether" / "lock").read_bytes() == b"first"


def test_a_full_disk_refusing_the_records_folder_is_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in a bench run: the disk filled up before a pull wrote its base, and creating the
    base's folder failed. That is a DiskFullError naming the record (exit 3), not an
    unclassified I/O error."""
    real_mkdir = Path.mkdir

    def full(self: Path, *args: object, **kwargs: object) -> None:
        if self.name == "store":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", full)
    target = tmp_path / "bases" / "store" / "ns" / "ds"
    with pytest.raises(DiskFullError, match="no space left") as info:
        write_bytes_atomic(target, b"base")
    assert info.value.exit_code == ExitCode.REFUSED
    assert not target.exists()


def test_write_bytes_atomic_replaces_without_leftovers(remote: LocalRemote, root: Path) -> None:
    remote.write_bytes_atomic("ds/.tether/index", b"v1")
    target = root / "ds" / ".tether" / "index"
    inode = target.stat().st_ino
    remote.write_bytes_atomic("ds/.tether/index", b"v2")
    assert remote.read_bytes("ds/.tether/index") == b"v2"
    assert target.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert temp_files(root) == []


def test_write_bytes_atomic_not_durable(tmp_path: Path) -> None:
    final = tmp_path / "a" / "b"
    write_bytes_atomic(final, b"data", durable=False)
    assert final.read_bytes() == b"data"
    assert os.listdir(final.parent) == ["b"]


def test_write_bytes_atomic_failure_cleans_temp(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    put(tmp_path / "dir" / "inside", b"kept")
    with pytest.raises(OSError):
        write_bytes_atomic(tmp_path / "dir", b"new")  # cannot replace a non-empty folder by a file
    assert (tmp_path / "dir" / "inside").read_bytes() == b"kept"
    assert temp_files(tmp_path) == []


def test_read_exists_open(remote: LocalRemote, root: Path) -> None:
    put(root / "ds" / "f", b"abc")
    assert remote.exists("ds/f")
    assert not remote.exists("ds/g")
    assert remote.read_bytes("ds/f") == b"abc"
    with remote.open_read("ds/f") as f:
        assert f.read() == b"abc"
    with pytest.raises(FileNotFoundError):
        remote.read_bytes("ds/g")


def test_delete_removes_empty_parents_but_keeps_dataset_with_state(remote: LocalRemote, root: Path) -> None:
    ds = root / "ns" / "ds"
    put(ds / ".tether" / "index")
    put(ds / "a" / "b" / "c" / "f")
    put(ds / "a" / "keep")
    remote.delete("ns/ds/a/b/c/f")
    assert not (ds / "a" / "b").exists()
    assert (ds / "a" / "keep").exists()
    remote.delete("ns/ds/a/keep")
    assert not (ds / "a").exists()
    assert ds.is_dir()
    assert (ds / ".tether" / "index").exists()


def test_delete_missing_file_is_fine(remote: LocalRemote, root: Path) -> None:
    remote.delete("ns/ds/never/was")
    assert sorted(os.listdir(root)) == []


def test_delete_lock_keeps_state_folder(remote: LocalRemote, root: Path) -> None:
    put(root / "ns" / "ds" / ".tether" / "lock")
    remote.delete("ns/ds/.tether/lock")
    assert (root / "ns" / "ds" / ".tether").is_dir()


def test_delete_never_removes_the_remote_root(remote: LocalRemote, root: Path) -> None:
    put(root / "f")
    remote.delete("f")
    assert root.is_dir()


def test_delete_keeps_the_dataset_root(remote: LocalRemote, root: Path) -> None:
    put(root / "ns" / "ds" / "sub" / "f")
    (root / "ns" / "ds" / ".tether").mkdir()  # every dataset tether wrote has its state folder
    remote.delete("ns/ds/sub/f")
    assert not (root / "ns" / "ds" / "sub").exists()
    assert (root / "ns" / "ds").is_dir()


@pytest.mark.parametrize("bad", ["../x", "/abs", "a//b", "a\x00b"])
def test_every_primitive_checks_paths(remote: LocalRemote, src: Path, tmp_path: Path, bad: str) -> None:
    calls = [
        lambda: remote.exists(bad),
        lambda: remote.read_bytes(bad),
        lambda: remote.write_bytes_atomic(bad, b"x"),
        lambda: remote.create_exclusive(bad, b"x"),
        lambda: remote.put_file(src, bad, digest=sha(b"payload bytes"), mtime_ns=0),
        lambda: remote.get_file(bad, tmp_path / "dest", digest="0" * 64, mtime_ns=0),
        lambda: remote.open_read(bad),
        lambda: remote.delete(bad),
        lambda: remote.hash_files([bad]),
        lambda: remote.cleanup_temp(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidPath):
            call()


# -- cleanup_temp, hash_files, classify_error, flush -------------------------------------------


def test_cleanup_temp_removes_leftovers_only(remote: LocalRemote, root: Path) -> None:
    ds = root / "ns" / "ds"
    put(ds / "keep.csv")
    put(ds / ".keep.csv.tether-tmp-a1b2c3d4e5f6")
    put(ds / "sub" / ".x.tether-tmp-000000000000")
    put(ds / ".tether" / ".index.tether-tmp-111111111111")
    put(ds / ".tether" / "index")
    put(root / "ns" / "other" / ".y.tether-tmp-222222222222")  # another dataset: not touched
    assert remote.cleanup_temp("ns/ds") == 3
    assert temp_files(ds) == []
    assert (ds / "keep.csv").exists()
    assert (ds / ".tether" / "index").exists()
    assert temp_files(root) == ["ns/other/.y.tether-tmp-222222222222"]
    assert remote.cleanup_temp("ns/ds") == 0
    assert remote.cleanup_temp("ns/missing") == 0


def test_hash_files(remote: LocalRemote, root: Path) -> None:
    put(root / "ds" / "a", b"A")
    put(root / "ds" / "sub" / "b", b"")
    assert remote.hash_files(["ds/a", "ds/sub/b"]) == {"ds/a": sha(b"A"), "ds/sub/b": sha(b"")}
    assert remote.hash_files([]) == {}
    with pytest.raises(FileNotFoundError):
        remote.hash_files(["ds/none"])


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (OSError(errno.EAGAIN, "again"), ErrorKind.RETRYABLE),
        (OSError(errno.EINTR, "intr"), ErrorKind.RETRYABLE),
        (OSError(errno.EIO, "io"), ErrorKind.RETRYABLE),
        (OSError(errno.ESTALE, "stale nfs handle"), ErrorKind.RETRYABLE),
        (OSError(errno.ETIMEDOUT, "timeout"), ErrorKind.RETRYABLE),
        (OSError(errno.EBUSY, "busy"), ErrorKind.RETRYABLE),
        (FileNotFoundError(errno.ENOENT, "gone"), ErrorKind.PERMANENT),
        (PermissionError(errno.EACCES, "denied"), ErrorKind.PERMANENT),
        (OSError(errno.ENOSPC, "full"), ErrorKind.PERMANENT),
        (ValueError("x"), ErrorKind.PERMANENT),
        (VerificationError("bad"), ErrorKind.PERMANENT),
    ],
)
def test_classify_error(remote: LocalRemote, exc: BaseException, kind: ErrorKind) -> None:
    assert remote.classify_error(exc) == kind


def test_flush_and_close(remote: LocalRemote, root: Path) -> None:
    put(root / "f")
    remote.flush()
    remote.close()


def test_syncfs_and_fsync_dir(tmp_path: Path) -> None:
    syncfs(tmp_path)
    syncfs(tmp_path / "missing")  # falls back to a global sync
    fsync_dir(tmp_path)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOSPC, DiskFullError),
        (errno.EDQUOT, DiskFullError),
        (errno.EACCES, RemotePermissionError),
        (errno.EPERM, RemotePermissionError),
        (errno.EROFS, RemotePermissionError),
    ],
)
def test_os_error_to_tether(tmp_path: Path, code: int, expected: type) -> None:
    err = os_error_to_tether(OSError(code, os.strerror(code)), tmp_path)
    assert isinstance(err, expected)
    assert str(tmp_path) in str(err)


def test_os_error_to_tether_passes_others_through(tmp_path: Path) -> None:
    original = OSError(errno.EIO, "io")
    assert os_error_to_tether(original, tmp_path) is original


def test_disk_full_while_writing_is_disk_full_error(remote: LocalRemote, root: Path, src: Path) -> None:
    def full(_n: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as info:
        remote.put_file(src, "ds/f", digest=sha(b"payload bytes"), mtime_ns=MTIME, on_bytes=full)
    assert info.value.exit_code == ExitCode.REFUSED
    assert isinstance(info.value.__cause__, OSError)
    assert temp_files(root) == []
    assert not (root / "ds" / "f").exists()


# -- parse_url -------------------------------------------------------------------------------------


def test_parse_plain_absolute_path() -> None:
    assert parse_url("/mnt/nfs/store") == ParsedURL("file", None, "/mnt/nfs/store")


def test_parse_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_url("store/x", base_dir=tmp_path) == ParsedURL("file", None, str(tmp_path / "store/x"))
    assert parse_url("../up", base_dir=tmp_path).path == str(tmp_path / "../up")
    monkeypatch.chdir(tmp_path)
    assert parse_url("./here").path == str(tmp_path / "here")


def test_parse_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_url("~/store") == ParsedURL("file", None, str(tmp_path / "store"))


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("file:///mnt/store", "/mnt/store"),
        ("file:///a%20b/c", "/a b/c"),
        ("file://localhost/x", "/x"),
        ("FILE:///x", "/x"),
        ("file://", "/"),
    ],
)
def test_parse_file_urls(url: str, path: str) -> None:
    assert parse_url(url) == ParsedURL("file", None, path)


def test_parse_file_url_with_host_is_refused() -> None:
    with pytest.raises(UsageError, match="names a host") as info:
        parse_url("file://server/share")
    assert info.value.exit_code == ExitCode.USAGE


def test_parse_ssh_url() -> None:
    assert parse_url("ssh://alice@login.hpc.example:2222/scratch/data") == ParsedURL(
        "ssh", "login.hpc.example", "/scratch/data", "alice", 2222
    )
    assert parse_url("ssh://hpc/p") == ParsedURL("ssh", "hpc", "/p", None, None)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("hpc:/scratch/data", ParsedURL("ssh", "hpc", "/scratch/data")),
        ("hpc:data", ParsedURL("ssh", "hpc", "data")),
        ("alice@hpc:data/x", ParsedURL("ssh", "hpc", "data/x", "alice")),
    ],
)
def test_parse_scp_shorthand(url: str, expected: ParsedURL) -> None:
    assert parse_url(url) == expected


def test_parse_colon_after_slash_is_a_path(tmp_path: Path) -> None:
    assert parse_url("./a:b", base_dir=tmp_path).scheme == "file"
    assert parse_url("dir/a:b", base_dir=tmp_path) == ParsedURL("file", None, str(tmp_path / "dir/a:b"))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/prefix/deeper", ParsedURL("s3", "bucket", "/prefix/deeper")),
        ("s3://bucket", ParsedURL("s3", "bucket", "")),
        ("gs://b/p", ParsedURL("gs", "b", "/p")),
        ("az://container/p", ParsedURL("az", "container", "/p")),
    ],
)
def test_parse_object_store_urls(url: str, expected: ParsedURL) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize("url", ["http://example.com/x", "ftp://h/p", "sftp://h/p", "rsync://h/p"])
def test_parse_unknown_scheme(url: str) -> None:
    with pytest.raises(UsageError, match="unknown URL scheme") as info:
        parse_url(url)
    assert "ssh://" in info.value.hint


@pytest.mark.parametrize("url", ["ssh://h:abc/p", "ssh://h:99999/p", "s3://b:-1/p"])
def test_parse_bad_port(url: str) -> None:
    with pytest.raises(UsageError, match="invalid port"):
        parse_url(url)


@pytest.mark.parametrize("url", ["", "   ", "\t"])
def test_parse_empty(url: str) -> None:
    with pytest.raises(UsageError, match="empty"):
        parse_url(url)


@pytest.mark.parametrize("url", ["ssh:///p", "s3:///p", "ssh://user@/p"])
def test_parse_missing_host(url: str) -> None:
    with pytest.raises(UsageError, match="no host"):
        parse_url(url)


def test_parse_scp_shorthand_without_host() -> None:
    with pytest.raises(UsageError):
        parse_url(":data")


# -- open_remote -----------------------------------------------------------------------------------


def test_open_remote_local_path(tmp_path: Path) -> None:
    r = open_remote(RemoteConfig("store", str(tmp_path), {}, "?"))
    assert isinstance(r, LocalRemote)
    assert r.root == tmp_path
    assert r.url == str(tmp_path)


def test_open_remote_relative_to_workspace(tmp_path: Path) -> None:
    r = open_remote(RemoteConfig("store", "../shared", {}, "?"), workspace_root=tmp_path / "ws")
    assert isinstance(r, LocalRemote)
    assert r.root == tmp_path / "ws" / "../shared"


def test_open_remote_file_url(tmp_path: Path) -> None:
    r = open_remote(RemoteConfig("store", f"file://{tmp_path}", {}, "?"))
    assert isinstance(r, LocalRemote)
    assert r.root == tmp_path


def test_open_remote_unknown_scheme_is_usage_error() -> None:
    with pytest.raises(UsageError):
        open_remote(RemoteConfig("x", "http://example.com", {}, "?"))


def test_small_files_go_one_at_a_time_on_a_local_disk(tmp_path: Path) -> None:
    from tether.remotes.local import filesystem_type

    remote = LocalRemote(str(tmp_path), tmp_path)
    if filesystem_type(tmp_path).startswith(("nfs", "cifs", "fuse", "9p")):
        pytest.skip("the temporary folder is on a network filesystem here")
    assert remote.capabilities.small_file_jobs == 1
    assert remote.capabilities.parallel_connections > 1


def test_filesystem_type_reads_the_longest_mount_prefix() -> None:
    from tether.remotes.local import filesystem_type

    assert filesystem_type(Path("/proc/self")) == "proc"


# -- lanes: how mirror and versioned transfers split files among workers -----------------------
def _shape(found: list) -> list[tuple[int, int, bool, bool]]:  # type: ignore[type-arg]
    return [(len(lane.items), lane.workers, lane.forked, lane.small) for lane in found]


@pytest.mark.skipif(not forked.available(), reason="forked workers are Linux-only")
def test_lanes_split_small_files_the_way_the_backend_does_best(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_FORK_MIN_FILES", raising=False)
    local_disk = Capabilities(small_file_jobs=1, small_file_processes=8)
    big = [SMALL_FILE_BYTES] * 3
    many = big + [10] * forked.MIN_FILES
    few = big + [10] * (forked.MIN_FILES - 1)
    n = forked.MIN_FILES
    assert _shape(lanes(many, int, local_disk, 8)) == [(3, 8, False, False), (n, 8, True, True)]
    assert _shape(lanes(few, int, local_disk, 8)) == [(3, 8, False, False), (n - 1, 1, False, True)]
    assert _shape(lanes(many, int, local_disk, 2))[1] == (forked.MIN_FILES, 2, True, True)  # --jobs caps them
    # a network share (small_file_jobs None) or an object store: everything in one lane
    assert _shape(lanes(many, int, Capabilities(), 8)) == [(len(many), 8, False, False)]
