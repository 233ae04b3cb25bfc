"""Flushing while the copy runs (fileio.FlushBehind), and flushing before anything vouches for
the bytes: the disk starts writing during a transfer, the final flush that the invariants rely
on still runs after the last byte, and a versioned fetch or pull names no cache object and
seeds no hash-cache row before the bytes behind it are flushed.

Unit tests drive FlushBehind with a flush function that signals through events (no sleeps);
the CLI tests push and pull through a local remote with a one-byte step and record every
syncfs: some run on the background thread while files are still arriving, and the last one on
the run's own thread, after every file landed and before the index or the promotion.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Result, WorkspaceFixture
from test_versioned_cli import pushed_clone, versioned_ws
from tether import cli_versioned, fileio, transfer
from tether.fileio import FlushBehind, flushing_behind
from tether.progress import NO_PROGRESS, BytesTap, Progress
from tether.remotes import local as local_remote
from tether.remotes import ssh_helper
from tether.versioned import cache as cache_module
from tether.versioned import checkout, store
from tether.versioned.cache import Cache

Tether = Callable[..., Result]
WAIT_S = 10  # a bound for waits that succeed at once unless something is broken


def test_no_flush_before_a_step_has_landed() -> None:
    calls: list[str] = []
    with FlushBehind(lambda: calls.append("flush"), step=100) as behind:
        behind.landed(60)
        behind.landed(39)
    assert calls == []


def test_a_step_landed_starts_a_flush_in_the_background() -> None:
    ran = threading.Event()
    threads: list[str] = []

    def flush() -> None:
        threads.append(threading.current_thread().name)
        ran.set()

    with FlushBehind(flush, step=100) as behind:
        behind.landed(60)
        behind.landed(40)
        assert ran.wait(WAIT_S)
    assert threads == ["tether-flush-behind"]


def test_close_waits_for_the_flush_in_progress() -> None:
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def flush() -> None:
        started.set()
        release.wait(WAIT_S)
        finished.set()

    behind = FlushBehind(flush, step=1)
    behind.landed(1)
    assert started.wait(WAIT_S)
    closer = threading.Thread(target=behind.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive(), "close() returned while a flush was still running"
    release.set()
    closer.join(WAIT_S)
    assert not closer.is_alive() and finished.is_set()


def test_a_failed_background_flush_is_left_to_the_final_one() -> None:
    attempts: list[int] = []
    second = threading.Event()

    def flush() -> None:
        attempts.append(len(attempts))
        if len(attempts) == 1:
            raise OSError(errno.EIO, "I/O error")
        second.set()

    with FlushBehind(flush, step=1) as behind:
        behind.landed(1)
        behind.landed(1)  # the thread survived the first error and flushes again
        while not second.is_set():
            behind.landed(1)
            second.wait(0.05)
    assert len(attempts) >= 2


def test_nothing_is_flushed_after_close() -> None:
    calls: list[str] = []
    behind = FlushBehind(lambda: calls.append("flush"), step=1)
    behind.close()
    behind.landed(10**9)
    behind.close()
    assert calls == []


class Recording(Progress):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def stage(self, name: str, *, files: int | None = None, bytes: int | None = None) -> None:
        self.calls.append(("stage", (name, files, bytes)))

    def advance(self, *, files: int = 0, bytes: int = 0) -> None:
        self.calls.append(("advance", (files, bytes)))

    def message(self, text: str) -> None:
        self.calls.append(("message", text))

    def close(self) -> None:
        self.calls.append(("close", None))


def test_bytes_tap_forwards_everything_and_hears_the_bytes() -> None:
    inner, heard = Recording(), []
    tap = BytesTap(inner, heard.append)
    tap.stage("copying", files=2, bytes=30)
    tap.advance(files=1)
    tap.advance(bytes=10)
    tap.advance(files=1, bytes=20)
    tap.message("note")
    tap.close()
    assert inner.calls == [
        ("stage", ("copying", 2, 30)),
        ("advance", (1, 0)),
        ("advance", (0, 10)),
        ("advance", (1, 20)),
        ("message", "note"),
        ("close", None),
    ]
    assert heard == [10, 20]


def test_nothing_to_flush_means_the_progress_itself() -> None:
    with flushing_behind(NO_PROGRESS, None) as progress:
        assert progress is NO_PROGRESS


# -- through the CLI ----------------------------------------------------------------------------
FILES = {f"part{i}/f{i}.bin": os.urandom(4096 + i) for i in range(12)}


class SyncfsLog(list[tuple[str, str, int]]):
    """Every syncfs of a run: (thread name, folder, files present below it then). ``clear()``
    starts a new run: its second copy again waits for a background flush."""

    def __init__(self) -> None:
        super().__init__()
        self.behind_ran = threading.Event()
        self.copies = itertools.count(1)  # next() is atomic: copies may run on several threads

    def clear(self) -> None:
        super().clear()
        self.behind_ran.clear()
        self.copies = itertools.count(1)


@pytest.fixture
def syncfs_calls(monkeypatch: pytest.MonkeyPatch) -> SyncfsLog:
    """Every syncfs of a push or pull (see SyncfsLog).

    The second copy of a run waits (up to WAIT_S) for a background flush to have run, so a
    run of a dozen small files cannot end before the flush thread is first scheduled: that is
    allowed (the final flush covers it) but would leave nothing for the test to see. (Counted
    over the push and the pull together, the pull's copies were not held, and the pull test
    failed when the machine was busy.)"""
    log = SyncfsLog()
    real_syncfs, real_copy = fileio.syncfs, local_remote.copy_verified

    def recording(path: Path) -> None:
        present = sum(len(names) for _d, _s, names in os.walk(path))
        log.append((threading.current_thread().name, str(path), present))
        real_syncfs(path)
        if threading.current_thread().name == "tether-flush-behind":
            log.behind_ran.set()

    def copying(source: str | Path, final: str | Path, **kwargs: Any) -> str:
        if next(log.copies) == 2:  # the first file's bytes asked for a flush
            log.behind_ran.wait(WAIT_S)
        return real_copy(source, final, **kwargs)

    monkeypatch.setattr(fileio, "FLUSH_BEHIND_BYTES", 1)
    monkeypatch.setattr(local_remote, "syncfs", recording)
    monkeypatch.setattr(transfer, "syncfs", recording)
    monkeypatch.setattr(local_remote, "copy_verified", copying)
    return log


def test_push_flushes_behind_and_last_after_every_file(
    ws: WorkspaceFixture, tether: Tether, syncfs_calls: SyncfsLog
) -> None:
    for rel, data in FILES.items():
        ws.write(rel, data)
    r = tether("push", "ns/ds", "store", "-y", cwd=ws.root)
    assert r.exit_code == 0, r.err
    remote = [c for c in syncfs_calls if c[1] == str(ws.remote_dir)]
    assert any(name == "tether-flush-behind" for name, _p, _n in remote), remote
    final_name, _path, present = remote[-1]  # the run's own flush, before the index
    assert final_name != "tether-flush-behind" and present >= len(FILES)
    assert {rel: (ws.remote_dir / "ns/ds" / rel).read_bytes() for rel in FILES} == FILES


def test_pull_flushes_staging_behind_and_before_promotion(
    ws: WorkspaceFixture,
    ws2: WorkspaceFixture,
    tether: Tether,
    syncfs_calls: SyncfsLog,
) -> None:
    for rel, data in FILES.items():
        ws.write(rel, data)
    assert tether("push", "ns/ds", "store", "-y", cwd=ws.root).exit_code == 0
    syncfs_calls.clear()
    r = tether("pull", "ns/ds", "store", "-y", cwd=ws2.root)
    assert r.exit_code == 0, r.err
    staging = [c for c in syncfs_calls if ".tether/staging" in c[1]]
    assert any(name == "tether-flush-behind" for name, _p, _n in staging), syncfs_calls
    final_name, _path, present = staging[-1]
    assert final_name != "tether-flush-behind" and present == len(FILES)  # staged, not yet promoted
    assert {rel: (ws2.data / "ns/ds" / rel).read_bytes() for rel in FILES} == FILES


def test_versioned_push_flushes_objects_behind_and_last_before_the_snapshot(
    ws: WorkspaceFixture, tether: Tether, syncfs_calls: SyncfsLog
) -> None:
    vws = versioned_ws(ws)
    for rel, data in FILES.items():
        vws.write(rel, data)
    assert tether("commit", "ns/ds", cwd=vws.root).exit_code == 0
    r = tether("push", "ns/ds", "store", "-y", cwd=vws.root)
    assert r.exit_code == 0, r.err
    remote = [c for c in syncfs_calls if c[1] == str(vws.remote_dir)]
    assert any(name == "tether-flush-behind" for name, _p, _n in remote), remote
    final_name, _path, present = remote[-1]
    assert final_name != "tether-flush-behind" and present >= len(FILES)
    assert len(list((vws.remote_dir / "snapshots").rglob("*.json"))) == 1


# -- versioned fetch and pull: nothing is trusted by name before its bytes are flushed ------------
def _files_below(path: Path) -> int:
    return sum(len(names) for _d, _s, names in os.walk(path))


def test_fetch_names_no_cache_object_before_its_bytes_are_flushed(
    ws: WorkspaceFixture, tmp_path: Path, tether: Tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = pushed_clone(versioned_ws(ws), tmp_path, tether, FILES)
    log: list[tuple[str, str]] = []  # ("written" | "adopted", temp file) and ("syncfs", cache)
    real_syncfs, real_copy, real_adopt = fileio.syncfs, local_remote.copy_verified, Cache.adopt

    def syncing(path: Path) -> None:
        log.append(("syncfs", str(path)))
        real_syncfs(path)

    def copying(source: str | Path, final: str | Path, **kwargs: Any) -> str:
        digest = real_copy(source, final, **kwargs)
        log.append(("written", str(final)))
        return digest

    def adopting(self: Cache, verified: Path, digest: str) -> Path:
        log.append(("adopted", str(verified)))
        return real_adopt(self, verified, digest)

    monkeypatch.setattr(store, "syncfs", syncing)
    monkeypatch.setattr(local_remote, "copy_verified", copying)
    monkeypatch.setattr(Cache, "adopt", adopting)
    monkeypatch.setattr(fileio, "FLUSH_BEHIND_BYTES", 1)
    r = tether("fetch", "ns/ds", "store", cwd=other.root)
    assert r.exit_code == 0, r.output
    adopted = [i for i, (what, _p) in enumerate(log) if what == "adopted"]
    assert len(adopted) == len(FILES)
    for i in adopted:
        written = log.index(("written", log[i][1]))
        flushes = [what for what, _p in log[written:i] if what == "syncfs"]
        assert flushes, f"{log[i][1]} took its name with no flush since its bytes were written"
    assert _files_below(other.root / ".tether/cache/objects") == len(FILES)


def test_pull_flushes_staged_objects_before_placing_and_placed_files_before_the_hash_cache(
    ws: WorkspaceFixture, tmp_path: Path, tether: Tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = pushed_clone(versioned_ws(ws), tmp_path, tether, FILES)
    dataset = other.data / "ns/ds"
    events: list[tuple[str, int]] = []  # (what, files in the dataset folder then)
    real_syncfs, real_remember = fileio.syncfs, cli_versioned.remember_digests

    def recording(path: Path) -> None:
        where = "staging" if "staging" in str(path) else "dataset" if Path(path) == dataset else str(path)
        events.append((f"syncfs {where}", _files_below(dataset) if dataset.exists() else 0))
        real_syncfs(path)

    def remembering(*args: object) -> None:
        events.append(("hash cache", _files_below(dataset)))
        real_remember(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(checkout, "syncfs", recording)
    monkeypatch.setattr(cli_versioned, "remember_digests", remembering)
    r = tether("pull", "ns/ds", "store", cwd=other.root)
    assert r.exit_code == 0, r.output
    n = len(FILES)
    assert events == [("syncfs staging", 0), ("syncfs dataset", n), ("hash cache", n)]


def test_a_copy_into_the_cache_is_flushed_before_it_takes_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"committed, about to be replaced\n"
    source = tmp_path / "f.txt"
    source.write_bytes(data)
    cache = Cache(tmp_path / "cache")
    digest = hashlib.sha256(data).hexdigest()
    seen: list[bool] = []

    def recording(path: Path) -> None:
        seen.append(cache.has(digest))

    monkeypatch.setattr(cache_module, "syncfs", recording)
    assert cache.insert_copy(source, digest).read_bytes() == data
    assert seen == [False]


# -- the SSH helper's own flush-behind (it runs remotely on the standard library alone) ----------
def test_helper_flushes_behind_once_a_step_landed_and_its_last_flush_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, release = threading.Event(), threading.Event()
    flushed: list[str] = []

    def slow_syncfs(path: str) -> None:
        started.set()
        assert release.wait(WAIT_S)
        flushed.append(path)

    monkeypatch.setattr(ssh_helper, "syncfs", slow_syncfs)
    behind = ssh_helper.FlushBehind.for_folder(str(tmp_path), 100, local_remote.NETWORK_FILESYSTEMS)
    assert behind is not None
    behind.landed(99)
    assert behind.asked == 0 and behind.thread is None  # no step yet: no thread, no flush
    behind.landed(1)
    assert started.wait(WAIT_S)  # the step started a flush in the background
    behind.landed(100)  # asked while one runs: served by one more flush, never two at once
    finished: list[int] = []
    waiter = threading.Thread(target=lambda: finished.append(behind.finish()))
    waiter.start()
    assert finished == []  # the final flush waits for the background ones
    release.set()
    waiter.join(WAIT_S)
    assert finished == [2] and flushed == [str(tmp_path)] * 2


def test_helper_does_not_flush_behind_on_network_or_unknown_filesystems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    network = local_remote.NETWORK_FILESYSTEMS  # what the client sends in init
    assert ssh_helper.FlushBehind.for_folder(str(tmp_path), 0, network) is None  # the client said never
    for kind in ("nfs4", "lustre", "fuse.sshfs", "gpfs", "unknown"):
        monkeypatch.setattr(ssh_helper, "filesystem_type", lambda _path, kind=kind: kind)
        assert ssh_helper.FlushBehind.for_folder(str(tmp_path), 1, network) is None, kind
    monkeypatch.setattr(ssh_helper, "filesystem_type", lambda _path: "ext4")
    assert ssh_helper.FlushBehind.for_folder(str(tmp_path), 1, network) is not None
