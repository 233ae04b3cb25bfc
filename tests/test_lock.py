"""Invariant 6: one writer at a time per remote dataset.

A lease lock (owner, host, pid, acquired, expires) at ``<dataset>/.tether/lock`` is held during
every write, renewed while working, stale only after expiry (or when its holder is a dead
process on this same host), and broken only by an explicit command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Result, WorkspaceFixture, make_workspace, run_subprocess
from tether import faults, sync
from tether.errors import LockHeld, StalePlanError
from tether.lock import LOCK_FORMAT, Lease, LockRecord, break_lock, lock_path, read_lock
from tether.progress import Progress
from tether.remotes.local import LocalRemote
from tether.workspace import Workspace

DS = "ns/ds"
HOST = os.uname().nodename  # what Workspace.hostname reports for this machine
OTHER_HOST = "other-host.invalid"


# -- helpers -------------------------------------------------------------------------------------
def remote_of(ws: WorkspaceFixture) -> LocalRemote:
    return LocalRemote(str(ws.remote_dir), ws.remote_dir)


def lock_file(ws: WorkspaceFixture) -> Path:
    return ws.remote_dir / lock_path(DS)


def dead_pid() -> int:
    """The pid of a child that has exited and been reaped: no process runs under it."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def record(
    *,
    host: str = OTHER_HOST,
    pid: int = 4242,
    expires_in: float = 3600.0,
    owner: str = "someone",
    token: str = "f" * 32,
    operation: str = "push",
) -> LockRecord:
    now = time.time()
    return LockRecord(
        owner=owner,
        host=host,
        pid=pid,
        acquired=now - 60,
        expires=now + expires_in,
        token=token,
        operation=operation,
    )


def plant_lock(ws: WorkspaceFixture, rec: LockRecord | bytes) -> bytes:
    data = rec if isinstance(rec, bytes) else rec.dumps()
    path = lock_file(ws)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def push(tether, ws: WorkspaceFixture, *extra: str) -> Result:
    return tether("push", DS, "store", "-y", *extra, cwd=ws.root)


# -- a live lock ---------------------------------------------------------------------------------
def test_live_lock_blocks_a_push_and_names_its_holder(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "hello")
    lease = Lease(remote_of(ws), DS, operation="push", host=HOST)
    with lease:
        assert lease.record is not None
        r = run_subprocess(["push", DS, "store", "-y"], cwd=ws.root)
        assert r.exit_code == 6, r.output
        assert "locked by" in r.output
        assert f"pid {os.getpid()}" in r.output
        assert HOST in r.output
        assert not ws.remote_file("a.txt").exists()  # nothing was written under the lock

        status = tether("lock", "status", DS, "store", cwd=ws.root)
        assert status.exit_code == 0, status.output
        assert f"pid {os.getpid()}" in status.stdout and HOST in status.stdout

        refused = tether("lock", "break", DS, "store", cwd=ws.root)
        assert refused.exit_code == 6, refused.output
        assert "--force" in refused.output
        assert read_lock(remote_of(ws), DS) == lease.record  # still ours

        broke = tether("lock", "break", DS, "store", "--force", cwd=ws.root)
        assert broke.exit_code == 0, broke.output
        assert "broke the lock" in broke.stdout
        assert not lock_file(ws).exists()
    # Releasing a lease that was broken must not fail nor delete anything that is not ours.
    assert not lock_file(ws).exists()
    assert push(tether, ws).exit_code == 0
    assert ws.remote_file("a.txt").read_text() == "hello"
    assert not lock_file(ws).exists()


def test_lock_status_when_unlocked(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "hello")
    r = tether("lock", "status", DS, "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "unlocked" in r.stdout
    r = tether("lock", "break", DS, "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "no lock" in r.stdout


def test_live_lock_blocks_a_pull(ws: WorkspaceFixture, ws2: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "hello")
    assert push(tether, ws).exit_code == 0
    data = plant_lock(ws, record())
    r = tether("pull", DS, "store", "-y", cwd=ws2.root)
    assert r.exit_code == 6, r.output
    assert f"someone@{OTHER_HOST}" in r.output
    assert not (ws2.data / DS / "a.txt").exists()
    assert lock_file(ws).read_bytes() == data


def test_pulls_share_the_lock_and_a_push_meanwhile_stops_the_one_without_it(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tmp_path: Path, tether
) -> None:
    """A job array pulling one dataset: a pull that finds the lock held by a live pull goes
    ahead without it (pulls change nothing on the remote) and leaves the record alone. A push
    that commits while such a pull downloads makes it stop with nothing promoted (exit 3)."""
    files = {f"d{i}/f{i}.txt": f"v1 {i}\n" for i in range(5)}
    for rel, text in files.items():
        ws.write(rel, text)
    assert push(tether, ws).exit_code == 0
    data = plant_lock(ws, record(operation="pull"))
    r = tether("pull", DS, "store", "-y", cwd=ws2.root)
    assert r.exit_code == 0, r.output
    assert f"another pull (someone@{OTHER_HOST} pid 4242)" in r.output
    assert {rel: (ws2.data / DS / rel).read_text() for rel in files} == files
    assert lock_file(ws).read_bytes() == data

    index = ws.remote_dir / DS / ".tether/index"
    ws3 = make_workspace(tmp_path, "ws3", ws.remote_dir)

    class PushMeanwhile(Progress):
        def stage(self, name: str, *, files: int | None = None, bytes: int | None = None) -> None:
            if name == "downloading":  # a push's files, then its index (the commit)
                (ws.remote_dir / DS / "late.txt").write_text("pushed meanwhile")
                index.write_bytes(index.read_bytes() + b"\n")

    with pytest.raises(StalePlanError, match="changed while it was pulled") as stale:
        sync.pull(DS, "store", workspace=ws3.root, progress=PushMeanwhile(), reviewed=False)
    assert stale.value.exit_code == 3
    assert not (ws3.data / DS / "d0").exists()  # nothing promoted
    assert lock_file(ws).read_bytes() == data


# -- stale and foreign locks ---------------------------------------------------------------------
def test_lock_of_a_killed_run_is_taken_over_by_the_next_run(ws: WorkspaceFixture, tether) -> None:
    for i in range(3):
        ws.write(f"f{i}.txt", f"content {i}")
    killed = run_subprocess(
        ["push", DS, "store", "-y"], cwd=ws.root, env={"TETHER_FAULT_KILL_AT": "locked:1"}
    )
    assert killed.exit_code == -9, killed.output
    left = read_lock(remote_of(ws), DS)
    assert left is not None, "the killed run should have left its lock behind"
    assert left.host == HOST and left.pid != os.getpid()
    assert not left.expired(time.time())  # only the dead pid makes it stale

    status = tether("lock", "status", DS, "store", cwd=ws.root)
    assert f"pid {left.pid}" in status.stdout

    r = push(tether, ws)
    assert r.exit_code == 0, r.output
    assert not lock_file(ws).exists()
    for i in range(3):
        assert ws.remote_file(f"f{i}.txt").read_text() == f"content {i}"


def test_lock_break_without_force_removes_a_dead_processes_lock(ws: WorkspaceFixture, tether) -> None:
    plant_lock(ws, record(host=HOST, pid=dead_pid()))
    r = tether("lock", "break", DS, "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "broke the lock" in r.stdout
    assert not lock_file(ws).exists()


def test_expired_lock_from_another_host_is_taken_over(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "hello")
    plant_lock(ws, record(expires_in=-5))
    r = push(tether, ws)
    assert r.exit_code == 0, r.output
    assert ws.remote_file("a.txt").read_text() == "hello"
    assert not lock_file(ws).exists()


def test_live_lock_from_another_host_is_respected_even_with_a_dead_pid(ws: WorkspaceFixture, tether) -> None:
    """A pid means nothing on another machine: only expiry makes a foreign lock stale."""
    ws.write("a.txt", "hello")
    data = plant_lock(ws, record(pid=dead_pid()))
    r = push(tether, ws)
    assert r.exit_code == 6, r.output
    assert f"someone@{OTHER_HOST}" in r.output
    assert lock_file(ws).read_bytes() == data
    assert not ws.remote_file("a.txt").exists()
    # Breaking it needs --force.
    assert tether("lock", "break", DS, "store", cwd=ws.root).exit_code == 6
    assert lock_file(ws).read_bytes() == data


def test_unreadable_lock_record_is_stale(ws: WorkspaceFixture, tether) -> None:
    """A record torn by a crash mid-create is treated as stale, not as a permanent block."""
    ws.write("a.txt", "hello")
    plant_lock(ws, b'{"owner": "someone", "ho')
    r = push(tether, ws)
    assert r.exit_code == 0, r.output
    assert not lock_file(ws).exists()


def test_lock_file_holding_json_null_is_stale(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "hello")
    plant_lock(ws, b"null")
    r = push(tether, ws)
    assert r.exit_code == 0, r.output


# -- no-op runs take no lock ---------------------------------------------------------------------
def test_noop_push_and_pull_take_no_lock(ws: WorkspaceFixture, ws2: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "hello")
    ws.write("sub/b.txt", "world")
    assert push(tether, ws).exit_code == 0
    assert tether("pull", DS, "store", "-y", cwd=ws2.root).exit_code == 0
    data = plant_lock(ws, record())

    r = push(tether, ws)
    assert r.exit_code == 0, r.output
    assert "Already up to date" in r.stdout
    r = tether("pull", DS, "store", "-y", cwd=ws2.root)
    assert r.exit_code == 0, r.output
    assert "Already up to date" in r.stdout
    assert tether("diff", DS, "store", cwd=ws.root).exit_code == 0
    assert lock_file(ws).read_bytes() == data


# -- LockRecord unit tests -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe\x00garbage",
        b"{",
        b'{"owner": "x", "ho',  # torn mid-write
        b"{}",
        b'{"format": "tether-lock"}',  # fields missing
        b'{"format": "something-else", "owner": "x"}',
        record().dumps().replace(LOCK_FORMAT.encode(), b"not-a-lock"),
    ],
)
def test_lockrecord_loads_garbage_is_none(data: bytes) -> None:
    assert LockRecord.loads(data) is None


def _wrong_types(**fields: object) -> bytes:
    raw = json.loads(record().dumps())
    raw.update(fields)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    "data",
    [
        b"null",
        b"[]",
        b"42",
        b'"lock"',
        pytest.param(_wrong_types(expires="soon"), id="expires-not-a-number"),
        pytest.param(_wrong_types(pid="abc"), id="pid-not-an-int"),
    ],
)
def test_lockrecord_loads_wrongly_shaped_json_is_none(data: bytes) -> None:
    assert LockRecord.loads(data) is None


def test_lockrecord_roundtrip() -> None:
    rec = record()
    assert LockRecord.loads(rec.dumps()) == rec


def test_lockrecord_expiry_and_staleness() -> None:
    now = time.time()
    rec = LockRecord("u", OTHER_HOST, 4242, now - 10, now + 10, "t" * 32, "push")
    assert not rec.expired(now)
    assert rec.expired(now + 10)  # expiry is inclusive
    assert rec.expired(now + 11)
    # Another host's pid is never looked up: live until it expires.
    assert not rec.stale(now, HOST)
    assert rec.stale(now + 10, HOST)
    # This host: a live pid keeps it, a dead pid makes it stale before expiry.
    mine = LockRecord("u", HOST, os.getpid(), now - 10, now + 10, "t" * 32, "push")
    assert not mine.stale(now, HOST)
    dead = LockRecord("u", HOST, dead_pid(), now - 10, now + 10, "t" * 32, "push")
    assert dead.stale(now, HOST)
    # A dead pid on another host is not our business.
    assert not dead.stale(now, OTHER_HOST)
    assert "expires in" in rec.describe()
    expired = LockRecord("u", OTHER_HOST, 1, now - 100, now - 50, "t" * 32, "push")
    assert "expired" in expired.describe()


# -- Lease unit tests ----------------------------------------------------------------------------
def test_lease_writes_a_record_naming_us_and_releases_it(tmp_path: Path) -> None:
    remote = LocalRemote(str(tmp_path), tmp_path)
    with Lease(remote, DS, operation="pull", host=HOST) as lease:
        rec = read_lock(remote, DS)
        assert rec is not None and rec == lease.record
        assert (rec.host, rec.pid, rec.operation) == (HOST, os.getpid(), "pull")
        assert rec.acquired <= time.time() < rec.expires
        with pytest.raises(LockHeld) as err:
            Lease(remote, DS, operation="push", host=HOST).acquire()
        assert err.value.holder["token"] == rec.token
    assert not (tmp_path / lock_path(DS)).exists()


def test_a_lease_let_go_with_its_last_write_is_released_once(tmp_path: Path) -> None:
    """write_while_held(release=True) on a backend without a guarded write: checked, written,
    then released; leaving the context afterwards touches nothing (the next run's lock stays)."""
    remote = LocalRemote(str(tmp_path), tmp_path)
    with Lease(remote, DS, operation="push", host=HOST) as lease:
        lease.write_while_held(f"{DS}/.tether/index", b"index", release=True)
        assert (tmp_path / DS / ".tether/index").read_bytes() == b"index"
        assert read_lock(remote, DS) is None
        nxt = Lease(remote, DS, operation="push", host=HOST)
        nxt.acquire()
    assert read_lock(remote, DS) == nxt.record
    nxt.release()


class _CountingReads(LocalRemote):
    def __init__(self, root: Path, *, enforced: bool) -> None:
        super().__init__(str(root), root)
        self.capabilities = dataclasses.replace(self.capabilities, conditional_create=enforced)
        self.reads: list[str] = []

    def read_bytes(self, path: str) -> bytes:
        self.reads.append(path)
        return super().read_bytes(path)


@pytest.mark.parametrize("enforced", [True, False])
def test_the_record_is_read_back_only_where_the_create_is_unenforced(tmp_path: Path, enforced: bool) -> None:
    """A create the backend enforces (hard link, If-None-Match) needs no read-back: one round
    trip less per push or pull over SSH. A store that ignores If-None-Match still reads back."""
    remote = _CountingReads(tmp_path, enforced=enforced)
    lease = Lease(remote, DS, operation="push", host=HOST)
    assert lease.acquire() == read_lock(LocalRemote(str(tmp_path), tmp_path), DS)
    assert remote.reads == ([] if enforced else [lock_path(DS)])
    lease.release()


def test_lease_renewal_moves_expiry_forward(tmp_path: Path) -> None:
    remote = LocalRemote(str(tmp_path), tmp_path)
    lease = Lease(remote, DS, operation="push", host=HOST, ttl_s=0.3)  # renews every 0.1 s
    first = lease.acquire()
    try:
        seen = [first.expires]
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            current = read_lock(remote, DS)
            assert current is not None
            assert current.token == first.token and current.acquired == first.acquired
            if current.expires > seen[-1]:
                seen.append(current.expires)
            time.sleep(0.01)  # polling a condition, bounded by the deadline
        assert len(seen) >= 3, f"expiry did not move forward twice within 10 s: {seen}"
        assert lease.renew_error is None
    finally:
        lease.release()
    assert not (tmp_path / lock_path(DS)).exists()


def test_release_deletes_only_our_own_record(tmp_path: Path) -> None:
    remote = LocalRemote(str(tmp_path), tmp_path)
    lease = Lease(remote, DS, operation="push", host=HOST)
    lease.acquire()
    # Someone breaks our lock and takes it over.
    theirs = record(token="a" * 32)
    remote.write_bytes_atomic(lock_path(DS), theirs.dumps())
    lease.release()
    assert read_lock(remote, DS) == theirs


def test_renewal_never_overwrites_someone_elses_record(tmp_path: Path) -> None:
    remote = LocalRemote(str(tmp_path), tmp_path)
    lease = Lease(remote, DS, operation="push", host=HOST, ttl_s=0.3)
    lease.acquire()
    try:
        theirs = record(token="b" * 32)
        remote.write_bytes_atomic(lock_path(DS), theirs.dumps())
        deadline = time.monotonic() + 10
        while lease.renew_error is None and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a condition, bounded by the deadline
        assert isinstance(lease.renew_error, LockHeld)
        assert read_lock(remote, DS) == theirs
    finally:
        lease.release()
    assert read_lock(remote, DS) == theirs


def test_break_lock_api(tmp_path: Path) -> None:
    remote = LocalRemote(str(tmp_path), tmp_path)
    assert break_lock(remote, DS, host=HOST, force=False) is None
    live = record()
    remote.write_bytes_atomic(lock_path(DS), live.dumps())
    with pytest.raises(LockHeld):
        break_lock(remote, DS, host=HOST, force=False)
    assert break_lock(remote, DS, host=HOST, force=True) == live
    assert not (tmp_path / lock_path(DS)).exists()
    # An unreadable record is removed without --force.
    (tmp_path / lock_path(DS)).write_bytes(b"{torn")
    assert break_lock(remote, DS, host=HOST, force=False) is None
    assert not (tmp_path / lock_path(DS)).exists()


class _InterleavingRemote(LocalRemote):
    """Runs ``before_delete`` once, just before the first delete of the lock record.

    This reproduces, deterministically, two runs that both found the same stale lock: the
    other one takes the lock in the window between our staleness check and our delete.
    """

    def __init__(self, root: Path, before_delete) -> None:
        super().__init__(str(root), root)
        self.before_delete = before_delete

    def delete(self, path: str) -> None:
        hook, self.before_delete = self.before_delete, None
        if hook is not None:
            hook()
        super().delete(path)


def _race_for_a_stale_lock(tmp_path: Path) -> tuple[Lease, Lease]:
    """Two runs find the same expired lock; ``first`` tries to take it between ``second``'s
    staleness check and ``second``'s delete of the stale record."""
    plain = LocalRemote(str(tmp_path), tmp_path)
    plain.write_bytes_atomic(lock_path(DS), record(expires_in=-5).dumps())
    first = Lease(plain, DS, operation="push", host=HOST)
    tried: list[bool] = []

    def first_tries() -> None:
        tried.append(True)
        with contextlib.suppress(LockHeld):  # another process: its refusal is its own business
            first.acquire()

    second = Lease(_InterleavingRemote(tmp_path, first_tries), DS, operation="push", host=HOST)
    with contextlib.suppress(LockHeld):
        second.acquire()
    assert tried  # the interleaved acquire ran
    return first, second


def test_two_takers_of_a_stale_lock_cannot_both_commit(tmp_path: Path) -> None:
    """Whatever happened at acquire time, the check before the commit point lets one through."""
    first, second = _race_for_a_stale_lock(tmp_path)
    try:
        committed = []
        for name, lease in (("first", first), ("second", second)):
            if lease.record is None:
                continue
            try:
                lease.ensure_held()
                committed.append(name)
            except LockHeld as exc:
                assert "lost the lock" in exc.message
        assert len(committed) <= 1, committed
        assert first.record is not None or second.record is not None  # one of them got it
    finally:
        first.release()
        second.release()
    assert not (tmp_path / lock_path(DS)).exists()


def test_two_takers_of_a_stale_lock_never_both_hold_it(tmp_path: Path) -> None:
    first, second = _race_for_a_stale_lock(tmp_path)
    try:
        holders = [name for name, lease in (("first", first), ("second", second)) if lease.record]
        assert len(holders) == 1, f"both runs believe they hold the lock: {holders}"
    finally:
        first.release()
        second.release()


def test_rerun_after_a_late_kill_leaves_no_lock_for_other_hosts(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws.write("a.txt", "hello")
    killed = run_subprocess(
        ["push", DS, "store", "-y"], cwd=ws.root, env={"TETHER_FAULT_KILL_AT": "before_base:1"}
    )
    assert killed.exit_code == -9, killed.output
    r = push(tether, ws)
    assert r.exit_code == 0, r.output
    assert "Already up to date" in r.stdout  # the user is told all is well ...
    # ... so a collaborator on another machine must be able to write now.
    monkeypatch.setattr(Workspace, "hostname", property(lambda self: OTHER_HOST))
    (ws2.data / DS).mkdir(parents=True)
    (ws2.data / DS / "b.txt").write_text("from elsewhere")
    r = push(tether, ws2)
    assert r.exit_code == 0, r.output


def test_run_whose_lock_was_taken_over_does_not_commit(
    ws: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws.write("a.txt", "a")
    ws.write("b.txt", "b")
    leases: list[Lease] = []

    class QuickLease(Lease):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "ttl_s": 0.3})  # renews every 0.1 s
            leases.append(self)

    theirs = record(token="c" * 32)

    def checkpoint(name: str) -> None:
        if name != "before_index":
            return
        # Someone runs `tether lock break --force` and takes the lock while we upload.
        remote_of(ws).write_bytes_atomic(lock_path(DS), theirs.dumps())
        # the lease that holds the lock (one made before the look may have found no folder)
        (ours,) = [lease for lease in leases if lease.record is not None]
        deadline = time.monotonic() + 10
        while ours.renew_error is None and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a condition, bounded by the deadline
        assert ours.renew_error is not None, "the renewer never noticed"

    monkeypatch.setattr(sync, "Lease", QuickLease)
    monkeypatch.setattr(faults, "checkpoint", checkpoint)
    r = push(tether, ws)
    assert read_lock(remote_of(ws), DS) == theirs  # their lock survives our release either way
    assert r.exit_code == 6, r.output
    assert not (ws.remote_dir / DS / ".tether" / "index").exists()
