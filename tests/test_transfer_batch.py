"""The streaming-batch path of transfer.py (used by SSH), driven by a local backend that
implements BatchTransfers item by item."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from tether.errors import (
    ConnectionDropped,
    ExitCode,
    RemoteUnavailable,
    StalePlanError,
    TetherError,
    VerificationError,
)
from tether.manifest import Entry
from tether.plan import Action, Change, Status
from tether.remotes import LocalRemote
from tether.remotes.base import BatchTransfers, ErrorKind, OnBytes, OnDone, TransferItem
from tether.transfer import BatchResult, Failure, pull_changes, push_changes, with_retries


class BatchLocal(LocalRemote):
    def __init__(self, root: Path) -> None:
        super().__init__(str(root), root)
        self.batches: list[int] = []

    def put_many(self, items: Sequence[TransferItem], *, on_bytes: OnBytes, on_done: OnDone) -> None:
        self.batches.append(len(items))
        for item in items:
            try:
                self.put_file(
                    Path(item.local), item.path, digest=item.digest, mtime_ns=item.mtime_ns, on_bytes=on_bytes
                )
            except (VerificationError, OSError) as exc:  # as SSH's sender: the open failed
                on_done(item, exc)
            else:
                on_done(item, None)

    def get_many(self, items: Sequence[TransferItem], *, on_bytes: OnBytes, on_done: OnDone) -> None:
        self.batches.append(len(items))
        for item in items:
            try:
                self.get_file(
                    item.path, Path(item.local), digest=item.digest, mtime_ns=item.mtime_ns, on_bytes=on_bytes
                )
            except VerificationError as exc:
                on_done(item, exc)
            else:
                on_done(item, None)


def _entry(root: Path, rel: str) -> Entry:
    path = root / rel
    st = path.stat()
    return Entry(rel, st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())


def _upload(entry: Entry) -> Change:
    return Change(entry.path, Status.LOCAL_ONLY, Action.UPLOAD, entry, None, None, "new")


def _download(entry: Entry) -> Change:
    return Change(entry.path, Status.REMOTE_ONLY, Action.DOWNLOAD, None, entry, None, "new")


@pytest.fixture
def remote(tmp_path: Path) -> BatchLocal:
    root = tmp_path / "remote"
    root.mkdir()
    return BatchLocal(root)


def test_backend_is_recognised_as_batch(remote: BatchLocal) -> None:
    assert isinstance(remote, BatchTransfers)
    assert not isinstance(LocalRemote("x", Path("/")), BatchTransfers)


def test_push_sends_one_batch_and_records_each_file(remote: BatchLocal, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    for i in range(5):
        (local / f"f{i}").write_bytes(b"x" * i)
    changes = [_upload(_entry(local, f"f{i}")) for i in range(5)]
    result = push_changes(remote, "ds", local, changes, jobs=4)
    assert remote.batches == [5]
    assert sorted(c.path for c in result.done) == [f"f{i}" for i in range(5)]
    assert not result.failed
    assert (remote.root / "ds" / "f4").read_bytes() == b"xxxx"


@pytest.mark.parametrize("how", ["edited", "deleted"])
def test_push_reports_a_source_changed_since_scan_as_stale(
    remote: BatchLocal, tmp_path: Path, how: str
) -> None:
    """No stat pass runs before the batch: the digest check of an edited source, or the failed
    open of a vanished one, is what tells; the other file still lands."""
    local = tmp_path / "local"
    local.mkdir()
    (local / "a").write_bytes(b"one")
    (local / "b").write_bytes(b"two")
    changes = [_upload(_entry(local, "a")), _upload(_entry(local, "b"))]
    if how == "edited":
        (local / "a").write_bytes(b"changed!")
    else:
        (local / "a").unlink()
    result = push_changes(remote, "ds", local, changes, jobs=2)
    assert remote.batches == [2]
    assert [c.path for c in result.done] == ["b"]
    assert [f.path for f in result.failed] == ["a"]
    assert isinstance(result.failed[0].error, StalePlanError)
    assert not (remote.root / "ds" / "a").exists()


def test_pull_reuses_verified_staged_files_and_promotes_all(remote: BatchLocal, tmp_path: Path) -> None:
    src = remote.root / "ds"
    src.mkdir()
    for name in ("a", "b", "c"):
        (src / name).write_bytes(name.encode() * 100)
    entries = [_entry(src, n) for n in ("a", "b", "c")]
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "a").write_bytes(b"a" * 100)  # verified leftover of an interrupted run
    local = tmp_path / "local"
    local.mkdir()
    result = pull_changes(remote, "ds", local, staging, [_download(e) for e in entries], jobs=2)
    assert result.reused == 1
    assert remote.batches == [2]
    assert not result.failed
    assert {p.name: p.read_bytes() for p in local.iterdir()} == {n: n.encode() * 100 for n in ("a", "b", "c")}


def test_pull_with_a_corrupt_file_promotes_nothing(remote: BatchLocal, tmp_path: Path) -> None:
    src = remote.root / "ds"
    src.mkdir()
    (src / "good").write_bytes(b"good")
    (src / "bad").write_bytes(b"bad")
    good, bad = _entry(src, "good"), _entry(src, "bad")
    bad = bad._replace(digest="0" * 64)
    local = tmp_path / "local"
    local.mkdir()
    result = pull_changes(
        remote, "ds", local, tmp_path / "staging", [_download(good), _download(bad)], jobs=2
    )
    assert [f.path for f in result.failed] == ["bad"]
    assert isinstance(result.failed[0].error, VerificationError)
    assert list(local.iterdir()) == []


def test_an_unmapped_backend_error_is_reported_in_one_line_with_its_cause_kept() -> None:
    """A backend's error text can run to pages (obstore appends its debug dump): the run's error
    says the first line and how to go on; the full error stays on the chain for --debug."""
    cause = RuntimeError("Generic S3 error: HTTP error\n\nDebug source:\nGeneric {\n    store: S3,\n}")
    result = BatchResult()
    result.failed.append(Failure("d/a.bin", cause))
    with pytest.raises(TetherError) as info:
        result.raise_first()
    assert info.value.message == "1 file(s) failed, first: d/a.bin: Generic S3 error: HTTP error"
    assert info.value.exit_code == ExitCode.TRANSFER_FAILED  # rerun: not usage (2), not refused (3)
    assert "Rerun" in info.value.hint
    assert info.value.__cause__ is cause


class _DropsAreTransient(LocalRemote):
    """Classifies as an object store does: a link dropped mid-file is worth another try."""

    def classify_error(self, exc: BaseException) -> ErrorKind:
        return ErrorKind.RETRYABLE if isinstance(exc, ConnectionDropped) else super().classify_error(exc)


@pytest.mark.parametrize(
    ("error", "calls"),
    [
        (ConnectionDropped("the connection dropped while transferring f"), 4),  # 1 + RETRIES
        (RemoteUnavailable("cannot reach the remote"), 1),  # the whole run is over: no retry
        (OSError(errno.EIO, "Input/output error"), 4),  # the local backend's transient errno
        (VerificationError("f: content hash mismatch"), 1),
    ],
    ids=["dropped-mid-file", "unreachable", "eio", "mismatch"],
)
def test_with_retries_retries_what_the_backend_calls_transient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, calls: int
) -> None:
    import tether.transfer as transfer

    slept: list[float] = []
    monkeypatch.setattr(transfer.time, "sleep", slept.append)
    attempts: list[int] = []

    def always_fails() -> None:
        attempts.append(1)
        raise error

    with pytest.raises(type(error)):
        with_retries(_DropsAreTransient("x", tmp_path), always_fails)
    assert len(attempts) == calls
    assert slept == [0.2, 0.4, 0.8][: calls - 1]

    attempts.clear()

    def fails_once() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise error

    if calls > 1:
        with_retries(_DropsAreTransient("x", tmp_path), fails_once)
        assert len(attempts) == 2
    # a backend that does not call a dropped link transient (SSH: the connection is gone) stops
    attempts.clear()
    with pytest.raises(type(error)):
        with_retries(LocalRemote("x", tmp_path), always_fails)
    assert len(attempts) == (4 if isinstance(error, OSError) and error.errno == errno.EIO else 1)


def test_the_object_store_calls_a_dropped_link_transient_and_a_lost_remote_final() -> None:
    from tether.remotes.objectstore import ObjectStoreRemote

    classify = ObjectStoreRemote.classify_error
    assert classify(None, ConnectionDropped("dropped")) == ErrorKind.RETRYABLE  # type: ignore[arg-type]
    assert classify(None, RemoteUnavailable("gone")) == ErrorKind.PERMANENT  # type: ignore[arg-type]
