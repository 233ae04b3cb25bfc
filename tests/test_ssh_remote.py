"""The SSH backend against a real sshd (tests/sshd.py): what the shared conformance suite does
not cover. Streams, resume of interrupted large uploads, dropped links, the remote hash cache,
hostile names, symlinks on the remote, the helper on an old Python, and options."""

from __future__ import annotations

import ast
import dataclasses
import errno
import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import WorkspaceFixture, make_workspace, run_subprocess
from serverutil import wait_until
from sshd import HOST, Relay, SshServer, add_remote, get_server, ssh_remote, sshd_fixture  # noqa: F401
from tether import sync
from tether.config import RemoteConfig
from tether.errors import (
    ConfigError,
    DiskFullError,
    ExitCode,
    InvalidPath,
    LockHeld,
    RemoteUnavailable,
    ScanError,
    StalePlanError,
    VerificationError,
)
from tether.lock import Lease, LockRecord, lock_path
from tether.manifest import UNHASHED, Entry, Manifest
from tether.paths import TEMP_MARKER
from tether.progress import Progress
from tether.remotes import open_remote, ssh_helper
from tether.remotes import ssh as ssh_mod
from tether.remotes.base import BatchTransfers, ListingDelta, TransferItem
from tether.remotes.ssh import PythonMissing, SshRemote
from tether.scan import StatEntry

HELPER = Path(ssh_mod.__file__).with_name("ssh_helper.py")
HOSTILE = [
    "with space.txt",
    'quote\'s "double".txt',
    "$(touch PWNED).txt",
    "back`tick`;|&>.txt",
    "new\nline.txt",
    "naïve-日本語-😀.txt",
    "-dash-first.txt",
    "sub dir/*glob?[x].txt",
]


def _item(root: Path, rel: str, data: bytes, remote_path: str, mtime_ns: int = 1_650_000_000_123_456_789):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return TransferItem(remote_path, str(path), len(data), hashlib.sha256(data).hexdigest(), mtime_ns)


def _temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if TEMP_MARKER in p.name and p.is_file()]


@pytest.fixture
def remote(tmp_path: Path, sshd: SshServer) -> Iterator[SshRemote]:
    r = ssh_remote(tmp_path)
    r.check()
    yield r
    r.close()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(thread name, op) of every request any channel sends from now on."""
    seen: list[tuple[str, str]] = []
    real_send = ssh_mod._Channel.send

    def recording(self, header, payload=b"", **kw):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name, header.get("op")))
        return real_send(self, header, payload, **kw)

    monkeypatch.setattr(ssh_mod._Channel, "send", recording)
    return seen


def remote_root(r: SshRemote) -> Path:
    return Path(r.settings.path)


# -- the helper itself --------------------------------------------------------------------------
def test_helper_is_python_38_syntax() -> None:
    ast.parse(HELPER.read_text(), feature_version=(3, 8))


def test_helper_keeps_runs_of_one_folders_small_files_on_one_writer() -> None:
    """Small files of one folder go to one writer thread per LANE_RUN of them (threads creating
    in one folder spin on its lock); a big flat folder still spreads over several writers."""
    helper = ssh_helper.Helper.__new__(ssh_helper.Helper)  # no connection needed for lane_for
    helper._lanes = [object() for _ in range(4)]
    helper.folder_counts = {}
    run = ssh_helper.LANE_RUN
    assert len({id(helper.lane_for(f"/r/ds/d1/f{i}")) for i in range(run)}) == 1
    flat = [helper.lane_for(f"/r/ds/flat/f{i}") for i in range(16 * run)]
    assert len({id(lane) for lane in flat}) > 1
    assert all(flat[i] is flat[i - i % run] for i in range(len(flat)))  # whole runs stay together


def test_helper_starts_without_thread_pools_or_their_imports() -> None:
    """A no-op's control helper never moves a file: it must not pay for concurrent.futures
    (and the logging module it imports) at start, which a cluster's shared filesystem makes
    slow. Run in a fresh interpreter: the test process has them imported already."""
    code = (
        "import sys; sys.argv = ['x']; import runpy; "
        f"ns = runpy.run_path({str(HELPER)!r}, run_name='helper_check'); "
        "h = ns['Helper'].__new__(ns['Helper']); h._pool = None; h._lanes = []; h.shutdown(); "
        "print(sorted(m for m in ('concurrent.futures', 'logging', 'secrets', 'gzip') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _old_python(version: str) -> str | None:
    """A real interpreter of that version (pyenv's shims only work for the selected one)."""
    hits = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}")))
    for found in [*hits, shutil.which(f"python{version}")]:
        if found and "/shims/" not in found:
            return found
    return None


def test_helper_runs_on_python_38(tmp_path: Path, sshd: SshServer) -> None:
    python = _old_python("3.8")
    if python is None:
        pytest.skip("no python3.8 on this machine to run the helper with")
    r = ssh_remote(tmp_path, python=python)
    try:
        r.check()
        assert r.control().hello["python"][:2] == [3, 8]
        items = [_item(tmp_path / "src", f"d/f{i}", os.urandom(i * 1000), f"ds/d/f{i}") for i in range(5)]
        items.append(_item(tmp_path / "src", "big", os.urandom(3 * 1024 * 1024 + 7), "ds/big"))
        done: list[object] = []
        r.put_many(items, on_bytes=lambda n: None, on_done=lambda i, e: done.append(e))
        assert done == [None] * 6
        assert sorted(s.path for s in r.list_files("ds")) == ["big", *(f"d/f{i}" for i in range(5))]
        assert r.hash_files(["ds/big"]) == {"ds/big": items[-1].digest}
    finally:
        r.close()


def test_too_old_python_is_exit_5_with_the_fix(tmp_path: Path, sshd: SshServer) -> None:
    python = _old_python("3.7")
    if python is None:
        pytest.skip("no python3.7 on this machine")
    r = ssh_remote(tmp_path, python=python)
    with pytest.raises(PythonMissing) as info:
        r.check()
    r.close()
    assert "3.7" in info.value.message and "3.8" in info.value.message
    assert info.value.exit_code == ExitCode.UNREACHABLE
    assert "python =" in info.value.hint


def test_missing_python_is_exit_5(tmp_path: Path, sshd: SshServer) -> None:
    r = ssh_remote(tmp_path, python="/nonexistent/python3")
    with pytest.raises(PythonMissing) as info:
        r.check()
    r.close()
    assert "/nonexistent/python3" in info.value.message
    assert info.value.exit_code == ExitCode.UNREACHABLE


def test_is_a_batch_backend(remote: SshRemote) -> None:
    assert isinstance(remote, BatchTransfers)


# -- streams ------------------------------------------------------------------------------------
def test_hostile_names_round_trip_and_inject_nothing(remote: SshRemote, tmp_path: Path) -> None:
    items = [
        _item(tmp_path / "src", f"f{i}", name.encode() * 3, f"ds/{name}") for i, name in enumerate(HOSTILE)
    ]
    errors: list[object] = []
    remote.put_many(items, on_bytes=lambda n: None, on_done=lambda i, e: errors.append(e))
    assert errors == [None] * len(items)
    listed = {s.path: s for s in remote.list_files("ds")}
    assert set(listed) == set(HOSTILE)
    assert all(listed[n].mtime_ns == 1_650_000_000_123_456_789 for n in HOSTILE)
    back = [
        TransferItem(i.path, str(tmp_path / "back" / str(n)), i.size, i.digest, i.mtime_ns)
        for n, i in enumerate(items)
    ]
    errors.clear()
    remote.get_many(back, on_bytes=lambda n: None, on_done=lambda i, e: errors.append(e))
    assert errors == [None] * len(items)
    for n, name in enumerate(HOSTILE):
        assert (tmp_path / "back" / str(n)).read_bytes() == name.encode() * 3
    assert remote.hash_files([f"ds/{n}" for n in HOSTILE]) == {i.path: i.digest for i in items}
    assert not list(Path.home().glob("PWNED*")) and not list(remote_root(remote).rglob("PWNED"))


def test_stream_helper_starts_on_first_use_or_when_prepared(tmp_path: Path, sshd: SshServer) -> None:
    """Listing uses the control helper alone; the stream helper starts on first use without
    prepare_transfers, and prepare_transfers starts it once however often it is called."""
    src = tmp_path / "src"
    for prepare in (False, True):
        (tmp_path / str(prepare)).mkdir()
        r = ssh_remote(tmp_path / str(prepare))
        try:
            before = sshd.helper_starts()
            r.check()
            assert list(r.list_files("ds")) == []
            assert sshd.helper_starts() - before == 1
            if prepare:
                r.prepare_transfers()
                r.prepare_transfers()
            item = _item(src, f"f{prepare}", b"payload", f"ds/f{prepare}")
            errors: list[BaseException | None] = []
            r.put_many([item], on_bytes=lambda n: None, on_done=lambda _i, e: errors.append(e))  # noqa: B023
            assert errors == [None]
            assert r.hash_files([item.path]) == {item.path: item.digest}
            assert sshd.helper_starts() - before == 2
        finally:
            r.close()


def test_asked_before_connecting_both_helpers_start_at_once(
    tmp_path: Path, sshd: SshServer, sent: list[tuple[str, str]]
) -> None:
    """A push or pull says it may transfer before its check connects: that costs no I/O, and
    connecting then starts the stream helper beside the control one instead of after its
    answer (0.15 s of a 20 ms push spent waiting for it)."""
    r = ssh_remote(tmp_path)
    try:
        r.prepare_transfers()
        assert sent == [] and r._control is None
        before = sshd.helper_starts()
        r.check()
        assert [op for _t, op in sent][:2] == ["init", "init"], sent  # both sent before an answer
        assert r._bulk is not None and r._warming is not None
        r._warming.result(60)
        assert sshd.helper_starts() - before == 2
        item = _item(tmp_path / "src", "f", b"payload", "ds/f")
        errors: list[BaseException | None] = []
        r.put_many([item], on_bytes=lambda n: None, on_done=lambda _i, e: errors.append(e))
        assert errors == [None] and sshd.helper_starts() - before == 2
    finally:
        r.close()


def test_the_link_is_timed_while_the_stream_helper_warms_up(
    tmp_path: Path, sshd: SshServer, sent: list[tuple[str, str]]
) -> None:
    """prepare_transfers (said before the check connects) has the stream helper waited for and
    one ping on it timed in a background thread, before any transfer asks: the first transfer
    then sends no ping of its own (it cost every push and pull a round trip before its first
    byte)."""

    def pings() -> list[str]:
        return [thread for thread, op in sent if op == "ping"]

    r = ssh_remote(tmp_path)
    try:
        r.prepare_transfers()
        r.check()
        assert r._warming is not None
        r._warming.result(60)  # what a scan, a plan and a lock take longer than
        assert pings() == ["tether-ssh-warm"] and r.rtt_s is not None
        items = [_item(tmp_path / "src", f"f{i}", b"x%d" % i, f"ds/f{i}") for i in range(3)]
        errors: list[BaseException | None] = []
        r.put_many(items, on_bytes=lambda n: None, on_done=lambda _i, e: errors.append(e))
        assert errors == [None] * 3
        assert pings() == ["tether-ssh-warm"]
    finally:
        r.close()


def test_one_stream_many_files_with_failures_reported_per_file(remote: SshRemote, tmp_path: Path) -> None:
    src = tmp_path / "src"
    items = [
        _item(src, f"f{i:04d}", f"content {i}".encode() * (i % 7), f"ds/d{i % 10}/f{i:04d}")
        for i in range(1500)
    ]
    bad = items[700]
    items[700] = TransferItem(bad.path, bad.local, bad.size, "0" * 64, bad.mtime_ns)  # wrong digest
    missing = _item(src, "gone", b"x", "ds/gone")
    Path(missing.local).unlink()  # deleted after the scan
    outcome: dict[str, BaseException | None] = {}
    sent: list[int] = []
    remote.put_many(
        [*items, missing], on_bytes=sent.append, on_done=lambda i, e: outcome.__setitem__(i.path, e)
    )
    assert len(outcome) == 1501, sorted({i.path for i in items} - set(outcome))[:10]
    assert isinstance(outcome[bad.path], VerificationError)
    assert isinstance(outcome["ds/gone"], FileNotFoundError)
    assert sum(1 for e in outcome.values() if e is None) == 1499
    listed = {s.path for s in remote.list_files("ds")}
    assert len(listed) == 1499 and "d0/f0700" not in listed
    assert _temp_files(remote_root(remote)) == []


def test_small_uploads_travel_in_runs_that_keep_order_around_large_files(
    remote: SshRemote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small files leave RUN_FILES to a frame; a large file between them closes the run before
    it, and a file refused inside a run fails alone."""
    sent: list[tuple[str, int]] = []
    real_send, real_head = ssh_mod._Channel.send, ssh_mod._Channel.send_head

    def counting(self, header, payload=b"", **kw):  # type: ignore[no-untyped-def]
        sent.append((header.get("op"), len(header.get("items", ()))))
        return real_send(self, header, payload, **kw)

    def counting_head(self, header, n):  # type: ignore[no-untyped-def]
        sent.append((header.get("op"), 1))
        return real_head(self, header, n)

    monkeypatch.setattr(ssh_mod._Channel, "send", counting)
    monkeypatch.setattr(ssh_mod._Channel, "send_head", counting_head)
    src = tmp_path / "src"
    run = ssh_helper.RUN_FILES
    before = [_item(src, f"a{i:03d}", b"a%d" % i, f"ds/a/{i:03d}") for i in range(run + 5)]
    big = _item(src, "big", os.urandom(ssh_helper.SMALL + 1), "ds/big")
    after = [_item(src, f"b{i:03d}", b"b%d" % i, f"ds/b/{i:03d}") for i in range(10)]
    bad = after[3]
    after[3] = TransferItem(bad.path, bad.local, bad.size, "0" * 64, bad.mtime_ns)  # wrong digest
    outcome: dict[str, BaseException | None] = {}
    remote.put_many(
        [*before, big, *after], on_bytes=lambda n: None, on_done=lambda i, e: outcome.__setitem__(i.path, e)
    )
    streamed = sent[sent.index(("puts", run)) :]  # after the channel's start-up requests
    assert streamed == [("puts", run), ("puts", 5), ("put", 1), ("puts", 10), ("barrier", 0)]
    assert isinstance(outcome.pop(bad.path), VerificationError)
    assert len(outcome) == len(before) + 1 + 9 and all(e is None for e in outcome.values())
    root = remote_root(remote)
    assert (root / "ds/big").read_bytes() == Path(big.local).read_bytes()
    assert (root / "ds/b/004").read_bytes() == b"b4" and not (root / "ds/b/003").exists()
    assert _temp_files(root) == []


@pytest.fixture
def slow_link(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Loopback treated as a link with latency, batches cut in pieces of 40 files, and the
    (channel label, op) of every streamed request recorded. The first stream waits for another
    stream's first piece before its second, so several take part however fast helpers start."""
    monkeypatch.setattr(ssh_mod, "STREAMS_MIN_RTT_S", 0.0)
    monkeypatch.setattr(ssh_mod, "PIECE_FILES", 40)
    streamed: list[tuple[str, str]] = []
    real_send, real_take = ssh_mod._Channel.send, ssh_mod._Pieces.take
    other_took = threading.Event()

    def recording(self, header, payload=b"", **kw):  # type: ignore[no-untyped-def]
        if header.get("op") in ("puts", "get"):
            streamed.append((self.label, header["op"]))
        return real_send(self, header, payload, **kw)

    def take(self):  # type: ignore[no-untyped-def]
        if threading.current_thread() is not threading.main_thread():
            other_took.set()
        elif self._next == 1 and len(self.pieces) > 1:
            assert other_took.wait(60), "no second stream took a piece"
        return real_take(self)

    monkeypatch.setattr(ssh_mod._Channel, "send", recording)
    monkeypatch.setattr(ssh_mod._Pieces, "take", take)
    return streamed


def test_a_batch_over_a_link_with_latency_is_spread_over_streams(
    tmp_path: Path, sshd: SshServer, slow_link: list[tuple[str, str]]
) -> None:
    """Each channel of the one connection moves 2 MiB per round trip; a batch goes over
    `streams` of them, every file once, both ways, and only one login."""
    src = tmp_path / "src"
    items = [_item(src, f"f{i:03d}", os.urandom(i * 37 % 3000), f"ds/d{i % 3}/f{i:03d}") for i in range(200)]
    big = _item(src, "big", os.urandom(ssh_helper.SMALL * 2 + 5), "ds/big")
    items.insert(100, big)
    r = ssh_remote(tmp_path, streams=2)
    try:
        logins, helpers = sshd.auth_count(), sshd.helper_starts()
        outcome: dict[str, BaseException | None] = {}
        r.put_many(items, on_bytes=lambda n: None, on_done=lambda i, e: outcome.__setitem__(i.path, e))
        assert outcome == {i.path: None for i in items}
        assert {label for label, op in slow_link if op == "puts"} == {"bulk", "stream"}
        assert sshd.helper_starts() - helpers == 3  # control, bulk and one more stream
        root = remote_root(r)
        assert all((root / i.path).read_bytes() == Path(i.local).read_bytes() for i in items)

        dest = tmp_path / "dest"
        back = [i._replace(local=str(dest / i.path)) for i in items]
        got: dict[str, BaseException | None] = {}
        r.get_many(back, on_bytes=lambda n: None, on_done=lambda i, e: got.__setitem__(i.path, e))
        assert got == {i.path: None for i in items}
        # A download borrows the idle control helper for its second stream.
        assert {label for label, op in slow_link if op == "get"} == {"bulk", "control"}
        pairs = zip(back, items, strict=True)
        assert all(Path(b.local).read_bytes() == Path(i.local).read_bytes() for b, i in pairs)
        assert r.exists(items[0].path)  # the control helper answers small requests again
        assert sshd.auth_count() - logins == 1 and sshd.helper_starts() - helpers == 3  # one login
    finally:
        r.close()


def _pushed(tmp_path: Path, r: SshRemote, n: int) -> list[TransferItem]:
    """``n`` small files put on the remote, as items to download into ``tmp_path/back``."""
    src = tmp_path / "src"
    items = [_item(src, f"f{i:03d}", os.urandom(100 + i), f"ds/f{i:03d}") for i in range(n)]
    r.put_many(items, on_bytes=lambda n: None, on_done=lambda i, e: None)
    return [i._replace(local=str(tmp_path / "back" / i.path)) for i in items]


def test_a_small_request_during_a_download_does_not_wait_behind_the_borrowed_control_helper(
    tmp_path: Path, sshd: SshServer, slow_link: list[tuple[str, str]]
) -> None:
    """A lease renewal must get through while the control helper carries a stream: it goes to
    a spare helper. Here the control stream's first file waits until such a request is
    answered, so a request queued behind that stream would never be."""
    r = ssh_remote(tmp_path, streams=2)
    try:
        back = _pushed(tmp_path, r, 200)
        answered: list[bool] = []

        def done(item: TransferItem, error: BaseException | None) -> None:
            assert error is None
            if threading.current_thread() is not threading.main_thread() and not answered:
                asker = threading.Thread(target=lambda: answered.append(r.exists(back[0].path)))
                asker.start()
                asker.join(20)
                assert answered == [True], "the small request waited for the stream"

        r.get_many(back, on_bytes=lambda n: None, on_done=done)
        assert answered == [True]
        assert {label for label, op in slow_link if op == "get"} == {"bulk", "control"}
        assert all(Path(b.local).is_file() for b in back)
        assert r.exists(back[1].path)  # lent back: the control helper answers again
    finally:
        r.close()


def test_a_download_stream_that_fails_on_the_control_helper_leaves_a_working_connection(
    tmp_path: Path, sshd: SshServer, slow_link: list[tuple[str, str]]
) -> None:
    """A stream cut mid-file cannot be resumed in step, so its helper is killed; when that was
    the control helper, the next small request (the lock's release) starts a new one."""
    r = ssh_remote(tmp_path, streams=2)
    try:
        back = _pushed(tmp_path, r, 200)

        def done(item: TransferItem, error: BaseException | None) -> None:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("the control stream fails")

        with pytest.raises(RuntimeError, match="control stream fails"):
            r.get_many(back, on_bytes=lambda n: None, on_done=done)
        assert ("control", "get") in slow_link
        helpers = sshd.helper_starts()
        assert r.exists(back[0].path) and r.read_bytes(back[0].path) == Path(back[0].local).read_bytes()
        assert sshd.helper_starts() - helpers == 1  # a new control helper, on the same login
        assert _temp_files(remote_root(r)) == []
    finally:
        r.close()


def test_a_download_does_not_borrow_the_control_helper_while_a_small_request_uses_it(
    tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ssh_mod, "STREAMS_MIN_RTT_S", 0.0)
    r = ssh_remote(tmp_path, streams=3)
    try:
        control = r.control()
        with r._small_channel() as channel:
            assert channel is control
            busy = r.streams(10, borrow_control=True)
        assert control not in busy and len(busy) == 3
        idle = r.streams(10, borrow_control=True)
        assert idle[1] is control and len(idle) == 3
        with r._small_channel() as channel:
            assert channel is not control and channel.label == "spare"
        r._return_control()
        with r._small_channel() as channel:
            assert channel is control
    finally:
        r.close()


def _pushed_for_two_streams(tmp_path: Path, tether: Any) -> tuple[WorkspaceFixture, dict[str, bytes]]:
    """150 files pushed through the CLI over two streams, and a second workspace to pull them
    into (both with the remote ``hpc``, streams = 2)."""
    ws = make_workspace(tmp_path, remote_dir=tmp_path / "remote")
    other = make_workspace(tmp_path, "other", remote_dir=tmp_path / "remote")
    for w in (ws, other):
        _add_remote(w, get_server(), streams=2)
    files = {f"d{i % 5}/f{i:03d}.bin": os.urandom(i * 53 % 4000) for i in range(150)}
    for rel, data in files.items():
        ws.write(rel, data)
    assert tether("push", "ns/ds", "hpc", "-y", cwd=ws.root).exit_code == 0
    return other, files


def test_push_and_pull_over_several_streams_through_the_cli(
    tmp_path: Path, sshd: SshServer, slow_link: list[tuple[str, str]], tether: Any
) -> None:
    other, files = _pushed_for_two_streams(tmp_path, tether)
    before = sshd.helper_starts()
    assert tether("pull", "ns/ds", "hpc", "-y", cwd=other.root).exit_code == 0
    assert sshd.helper_starts() - before == 2  # control and bulk: the control helper streams too
    assert set(slow_link) == {("bulk", "puts"), ("stream", "puts"), ("bulk", "get"), ("control", "get")}
    pulled = other.root / "data" / "ns" / "ds"
    assert {rel: (pulled / rel).read_bytes() for rel in files} == files
    assert tether("diff", "ns/ds", "hpc", cwd=other.root).exit_code == 0


def test_a_pull_whose_borrowed_control_stream_fails_releases_the_lock_and_the_rerun_converges(
    tmp_path: Path,
    sshd: SshServer,
    slow_link: list[tuple[str, str]],
    tether: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full local disk met by the stream on the borrowed control helper ends the pull (exit 3,
    the disk named); that helper is killed with its stream, so the lock is released through a
    new one, nothing is promoted, and the rerun pulls everything."""
    other, files = _pushed_for_two_streams(tmp_path, tether)
    real_create = ssh_mod.create_in_place

    def full_in_the_second_stream(path: str) -> int:
        if threading.current_thread().name == "tether-ssh-stream":
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_create(path)

    monkeypatch.setattr(ssh_mod, "create_in_place", full_in_the_second_stream)
    r = tether("pull", "ns/ds", "hpc", "-y", cwd=other.root)
    assert r.exit_code == ExitCode.REFUSED, r.output
    assert "no space left on the device" in r.output
    assert ("control", "get") in slow_link
    assert not (tmp_path / "remote" / lock_path("ns/ds")).exists()  # released, not left to expire
    pulled = other.root / "data" / "ns" / "ds"
    assert not any(p.is_file() for p in pulled.rglob("*") if ".tether" not in p.parts)

    monkeypatch.setattr(ssh_mod, "create_in_place", real_create)
    assert tether("pull", "ns/ds", "hpc", "-y", cwd=other.root).exit_code == 0
    assert {rel: (pulled / rel).read_bytes() for rel in files} == files
    assert tether("diff", "ns/ds", "hpc", cwd=other.root).exit_code == 0


def test_a_large_file_pushed_through_the_cli_is_read_ahead_of_its_sender(
    tmp_path: Path, sshd: SshServer, tether: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tether import readahead

    ws = make_workspace(tmp_path, remote_dir=tmp_path / "remote")
    _add_remote(ws, get_server())
    data = os.urandom(3 * ssh_helper.SMALL + 11)
    ws.write("big.bin", data)
    asked: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        if length == readahead.SequentialReadAhead.STEP:
            asked.append((os.fstat(fd).st_size, offset))
        real(fd, offset, length, advice)

    monkeypatch.setattr(ssh_mod, "RESUME_MIN", 2 * ssh_helper.SMALL)  # sent resumably, as from 64 MiB
    monkeypatch.setattr(readahead.os, "posix_fadvise", fadvise)
    r = tether("push", "ns/ds", "hpc", "-y", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert asked == [(len(data), 0)]
    assert (tmp_path / "remote" / "ns" / "ds" / "big.bin").read_bytes() == data


def test_closing_tells_every_helper_to_finish_before_waiting_for_any(
    tmp_path: Path, sshd: SshServer, slow_link: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each helper's exit takes a round trip to be confirmed: at the end of a run they overlap."""
    events: list[tuple[str, str]] = []
    real_end, real_close = ssh_mod._Channel.end_input, ssh_mod._Channel.close

    def end_input(self):  # type: ignore[no-untyped-def]
        events.append(("eof", self.label))
        return real_end(self)

    def close(self, **kw):  # type: ignore[no-untyped-def]
        events.append(("wait", self.label))
        return real_close(self, **kw)

    monkeypatch.setattr(ssh_mod._Channel, "end_input", end_input)
    monkeypatch.setattr(ssh_mod._Channel, "close", close)
    src = tmp_path / "src"
    items = [_item(src, f"f{i:03d}", b"y%d" % i, f"ds/f{i:03d}") for i in range(100)]
    r = ssh_remote(tmp_path, streams=2)
    r.put_many(items, on_bytes=lambda n: None, on_done=lambda i, e: None)
    r.close()
    assert sorted(label for _, label in events if _ == "eof") == ["bulk", "control", "stream"]
    first_wait = next(i for i, (what, _) in enumerate(events) if what == "wait")
    assert all(what == "eof" for what, _ in events[:first_wait]) and first_wait == 3
    assert not any(p.poll() is None for p in (c.proc for c in r._session.channels))


def test_a_stream_that_cannot_start_leaves_its_share_to_the_others(
    tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that refuses a further session (MaxSessions), or a helper that dies at start,
    costs the extra stream, not the run."""
    monkeypatch.setattr(ssh_mod, "STREAMS_MIN_RTT_S", 0.0)
    monkeypatch.setattr(ssh_mod, "PIECE_FILES", 40)
    real_command = ssh_mod.helper_command
    started: list[str] = []

    def third_fails(python: str) -> str:
        started.append(python)
        return "exit 3" if len(started) >= 3 else real_command(python)

    monkeypatch.setattr(ssh_mod, "helper_command", third_fails)
    src = tmp_path / "src"
    items = [_item(src, f"f{i:03d}", b"x%d" % i, f"ds/f{i:03d}") for i in range(200)]
    r = ssh_remote(tmp_path, streams=3)
    try:
        outcome: dict[str, BaseException | None] = {}
        r.put_many(items, on_bytes=lambda n: None, on_done=lambda i, e: outcome.__setitem__(i.path, e))
        assert len(started) == 4  # control, bulk, two extra streams that never said hello
        assert outcome == {i.path: None for i in items}
        assert sorted(s.path for s in r.list_files("ds")) == [i.path[3:] for i in items]
    finally:
        r.close()


def test_one_download_stream_keeps_order_and_reports_changed_files_per_file(
    remote: SshRemote, tmp_path: Path
) -> None:
    """The helper reads small files in runs and frames them together; large ones stream alone.
    Files changed on the remote since the listing fail alone, and the rest arrive intact."""
    src = tmp_path / "src"
    big = os.urandom(ssh_helper.SMALL + 12_345)
    items = [_item(src, f"f{i:04d}", os.urandom(i % 300), f"ds/d{i % 7}/f{i:04d}") for i in range(400)]
    items.insert(150, _item(src, "big1", big, "ds/big1"))
    items.insert(151, _item(src, "big2", big[::-1], "ds/big2"))
    remote.put_many(items, on_bytes=lambda n: None, on_done=lambda i, e: None)
    root = remote_root(remote)
    gone, grown, linked = items[10], items[200], items[300]
    (root / gone.path).unlink()
    with open(root / grown.path, "ab") as f:
        f.write(b"appended after the listing")
    secret = tmp_path / "secret"
    secret.write_bytes(b"not to be sent")
    (root / linked.path).unlink()
    (root / linked.path).symlink_to(secret)
    back = [i._replace(local=str(tmp_path / "back" / i.path)) for i in items]
    order: list[str] = []
    outcome: dict[str, BaseException | None] = {}

    def done(item: TransferItem, error: BaseException | None) -> None:
        order.append(item.path)
        outcome[item.path] = error

    remote.get_many(back, on_bytes=lambda n: None, on_done=done)
    assert order == [i.path for i in items]  # answered in the order asked
    assert isinstance(outcome[gone.path], FileNotFoundError)
    assert isinstance(outcome[grown.path], VerificationError)
    # A link made since the listing is not followed: refused there, its target never sent.
    assert isinstance(outcome[linked.path], OSError), outcome[linked.path]
    failed = {gone.path, grown.path, linked.path}
    for sent, got in zip(items, back, strict=True):
        if sent.path in failed:
            assert not Path(got.local).exists()
            continue
        assert outcome[sent.path] is None, (sent.path, outcome[sent.path])
        assert Path(got.local).read_bytes() == Path(sent.local).read_bytes()
        assert Path(got.local).stat().st_mtime_ns == sent.mtime_ns
    assert b"not to be sent" not in b"".join(
        p.read_bytes() for p in (tmp_path / "back").rglob("*") if p.is_file()
    )


def test_requests_do_not_grow_with_the_number_of_files(
    tmp_path: Path,
    sshd: SshServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A no-op diff is one listing told against the index; a push streams: no per-file requests."""
    calls: list[str] = []
    real_call = ssh_mod._Channel.call

    def counting(self, op, payload=b"", **fields):  # type: ignore[no-untyped-def]
        calls.append(op)
        return real_call(self, op, payload, **fields)

    monkeypatch.setattr(ssh_mod._Channel, "call", counting)
    counts = {}
    for n in (5, 300):
        ws = make_workspace(tmp_path / f"n{n}", remote_dir=tmp_path / f"n{n}" / "remote")
        _add_remote(ws, get_server())
        for i in range(n):
            ws.write(f"d{i % 7}/f{i}.txt", f"file {i}")
        calls.clear()
        sync.push("ns/ds", "hpc", workspace=ws.root, confirm=lambda plan: True)
        pushed = sorted(calls)  # the warm-up's ping races the control requests: order aside
        calls.clear()
        assert sync.diff("ns/ds", "hpc", workspace=ws.root).in_sync
        counts[n] = (pushed, list(calls))
    assert counts[5] == counts[300]
    assert counts[300][1] == ["list_delta"]  # after the pipelined init at start


def _add_remote(ws: WorkspaceFixture, server: SshServer, name: str = "hpc", **options: object) -> None:
    add_remote(ws.root, name, f"ssh://{HOST}{ws.remote_dir}", server.options(**options))


# -- resume and dropped links -------------------------------------------------------------------
@pytest.fixture
def relay(sshd: SshServer) -> Iterator[Relay]:
    r = Relay(sshd.port)
    yield r
    r.close()


def _relay_remote(tmp_path: Path, server: SshServer, relay: Relay, name: str = "remote-root") -> SshRemote:
    config = server.client_config(tmp_path / f"relay_config_{relay.port}", port=relay.port)
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    return open_remote(RemoteConfig("r", f"ssh://{HOST}{root}", server.options(config), "test"))  # type: ignore[return-value]


@pytest.mark.parametrize("unhashed", [False, True], ids=["hashed", "first-push"])
def test_interrupted_large_upload_resumes_from_its_verified_prefix(
    tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch, unhashed: bool
) -> None:
    """A first push's large file has no digest yet: its partial is named by the file's scanned
    state, and a rerun on the unchanged file resumes it and still reports the whole digest."""
    monkeypatch.setattr(ssh_mod, "RESUME_MIN", 1024 * 1024)
    data = os.urandom(12 * 1024 * 1024)
    item = _item(tmp_path / "src", "big.bin", data, "ds/big.bin")
    item = _unhashed(item) if unhashed else item
    root = tmp_path / "remote-root"

    def parts() -> list[Path]:
        return (
            [p for p in (root / "ds").iterdir() if p.name.endswith(".part")] if (root / "ds").is_dir() else []
        )

    def drop_once_some_landed() -> None:
        # Cut only once the helper wrote part of the file: a cut right after 5 MiB crossed the
        # relay could find sshd, on a loaded machine, not yet through its first MiB.
        wait_until(lambda: any(p.stat().st_size >= 1024 * 1024 for p in parts()), 60, "a MiB to land")
        first.drop()

    first = Relay(sshd.port)
    first.stall_after(5 * 1024 * 1024)  # the link hangs mid-file, then dies
    cutter = threading.Thread(target=drop_once_some_landed, daemon=True)
    cutter.start()
    r = _relay_remote(tmp_path, sshd, first)
    with pytest.raises(RemoteUnavailable) as info:
        _put(r, [item])
    cutter.join()
    r.close()
    first.close()
    assert "lost the connection" in info.value.message
    sshd.wait_sessions_closed()
    [part] = parts()
    have = part.stat().st_size
    assert 0 < have < len(data)
    assert not (root / "ds" / "big.bin").exists()  # nothing torn under the real name

    second = Relay(sshd.port)
    r = _relay_remote(tmp_path, sshd, second)
    assert r.cleanup_temp("ds") == 0  # a recent resumable .part is kept by the clean-up
    done, learnt = _put(r, [item])
    r.close()
    second.close()
    assert done == [None]
    assert learnt == ({"ds/big.bin": hashlib.sha256(data).hexdigest()} if unhashed else {})
    assert (root / "ds" / "big.bin").read_bytes() == data
    assert second.bytes_up < len(data) - have + 1024 * 1024  # only the rest crossed the link
    assert _temp_files(root) == []


def test_interrupted_large_download_resumes_from_what_arrived(
    tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ssh_mod, "RESUME_MIN", 1024 * 1024)
    data = os.urandom(12 * 1024 * 1024)
    root = tmp_path / "remote-root"
    (root / "ds").mkdir(parents=True)
    (root / "ds" / "big.bin").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    staged = tmp_path / "staging" / "big.bin"
    item = TransferItem("ds/big.bin", str(staged), len(data), digest, 1_650_000_000_123_456_789)

    def get(relay: Relay) -> list[BaseException | None]:
        r = _relay_remote(tmp_path, sshd, relay)
        outcomes: list[BaseException | None] = []
        try:
            r.get_many([item], on_bytes=lambda n: None, on_done=lambda i, e: outcomes.append(e))
        finally:
            r.close()
            relay.close()
        return outcomes

    def drop_once_some_landed() -> None:
        # As for the upload: cut once part of the file is on disk here, not after a byte count.
        def landed() -> bool:
            parts = (
                [p for p in staged.parent.iterdir() if p.name.endswith(".part")]
                if staged.parent.is_dir()
                else []
            )
            return any(p.stat().st_size >= 1024 * 1024 for p in parts)

        wait_until(landed, 60, "a MiB to land")
        first.drop()

    first = Relay(sshd.port)
    first.stall_after_down(5 * 1024 * 1024)  # the link hangs mid-file, then dies
    cutter = threading.Thread(target=drop_once_some_landed, daemon=True)
    cutter.start()
    with pytest.raises(RemoteUnavailable):
        get(first)
    cutter.join()
    sshd.wait_sessions_closed()
    assert not staged.exists()  # nothing torn under the real name
    (part,) = [p for p in staged.parent.iterdir() if p.name.endswith(".part")]
    have = part.stat().st_size
    assert 0 < have < len(data)

    second = Relay(sshd.port)
    assert get(second) == [None]
    assert staged.read_bytes() == data
    assert second.bytes_down < len(data) - have + 1024 * 1024  # only the rest crossed the link
    assert _temp_files(staged.parent) == []


def test_a_download_partial_of_other_bytes_is_not_resumed(
    tmp_path: Path, remote: SshRemote, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ssh_mod, "RESUME_MIN", 1024 * 1024)
    data = os.urandom(3 * 1024 * 1024)
    folder = remote_root(remote) / "ds"
    folder.mkdir()
    (folder / "big.bin").write_bytes(data)
    staged = tmp_path / "staging" / "big.bin"
    staged.parent.mkdir()
    item = TransferItem("ds/big.bin", str(staged), len(data), hashlib.sha256(data).hexdigest(), 1)
    part = staged.with_name(f".big.bin{TEMP_MARKER}{item.digest[:16]}.part")
    part.write_bytes(b"garbage" * 1000)  # not a prefix of the remote file
    outcomes: list[BaseException | None] = []
    remote.get_many([item], on_bytes=lambda n: None, on_done=lambda i, e: outcomes.append(e))
    assert outcomes == [None] and staged.read_bytes() == data  # the helper sent it all
    assert not part.exists()


def test_a_partial_that_does_not_match_is_not_resumed(
    remote: SshRemote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ssh_mod, "RESUME_MIN", 1024 * 1024)
    data = os.urandom(3 * 1024 * 1024)
    item = _item(tmp_path / "src", "big.bin", data, "ds/big.bin")
    folder = remote_root(remote) / "ds"
    folder.mkdir()
    part = folder / f".big.bin{TEMP_MARKER}{item.digest[:16]}.part"
    part.write_bytes(b"garbage" * 1000)  # not a prefix of our file
    stale = folder / f".big.bin{TEMP_MARKER}{'0' * 16}.part"
    stale.write_bytes(b"an older version's partial upload")
    remote.put_file(Path(item.local), item.path, digest=item.digest, mtime_ns=item.mtime_ns)
    assert (folder / "big.bin").read_bytes() == data
    assert not part.exists() and not stale.exists()


def test_cleanup_keeps_only_recent_resumable_parts(remote: SshRemote) -> None:
    folder = remote_root(remote) / "ds" / "sub"
    folder.mkdir(parents=True)
    recent = folder / f".a{TEMP_MARKER}0123456789abcdef.part"
    old = folder / f".b{TEMP_MARKER}0123456789abcdef.part"
    plain = folder / f".c{TEMP_MARKER}abc123"
    for p in (recent, old, plain):
        p.write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    assert remote.cleanup_temp("ds") == 2
    assert recent.exists() and not old.exists() and not plain.exists()


def test_killed_master_mid_push_is_exit_5_and_rerun_converges(
    tmp_path: Path,
    sshd: SshServer,
    relay: Relay,
) -> None:
    ws = make_workspace(tmp_path)
    config = sshd.client_config(tmp_path / "relay_config", port=relay.port)
    _add_remote(ws, sshd, ssh_config=str(config))
    files = {f"d{i % 5}/f{i:03d}.bin": os.urandom(64 * 1024) for i in range(60)}
    for rel, data in files.items():
        ws.write(rel, data)
    relay.stall_after(1024 * 1024)  # about a quarter of the push, then the link hangs
    push = subprocess.Popen(
        [sys.executable, "-m", "tether", "push", "ns/ds", "hpc", "-y"],
        cwd=ws.root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert relay.stalled.wait(30)
        masters = _master_pids(config)
        assert len(masters) == 1
        os.kill(masters[0], signal.SIGKILL)  # the ssh master dies: every channel over it is gone
        out, err = push.communicate(timeout=60)
    finally:
        if push.poll() is None:
            push.kill()
        relay.drop()
    assert push.returncode == ExitCode.UNREACHABLE, out + err
    assert "Traceback" not in err and "hint:" in err
    sshd.wait_sessions_closed()
    relay.limit = None
    r = run_subprocess(["push", "ns/ds", "hpc", "-y"], cwd=ws.root)
    assert r.exit_code == 0, r.output
    for rel, data in files.items():
        assert (ws.remote_dir / "ns/ds" / rel).read_bytes() == data
    assert _temp_files(ws.remote_dir) == []
    assert sync.diff("ns/ds", "hpc", workspace=ws.root).in_sync


def _master_pids(config: Path) -> list[int]:
    """ssh master processes started with this test's private config (found by their argv)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(config).encode() in argv and b"ControlMaster=yes" in argv:
            found.append(int(entry.name))
    return found


# -- the remote filesystem ----------------------------------------------------------------------
def test_remote_hash_cache_is_reused_and_invalidated_by_ctime(remote: SshRemote, tmp_path: Path) -> None:
    root = remote_root(remote) / "ds"
    (root / ".tether").mkdir(parents=True)
    target = root / "a.bin"
    target.write_bytes(b"one" * 1000)
    old = time.time() - 100
    os.utime(target, (old, old))  # not racy: written well before it is hashed
    first = remote.hash_files(["ds/a.bin"])
    assert first == {"ds/a.bin": hashlib.sha256(b"one" * 1000).hexdigest()}
    assert (root / ".tether" / "hashcache.json").exists()
    st = target.stat()
    target.write_bytes(b"two" * 1000)  # same size, mtime put back: only ctime tells
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert remote.hash_files(["ds/a.bin"]) == {"ds/a.bin": hashlib.sha256(b"two" * 1000).hexdigest()}
    assert remote.hash_files(["ds/a.bin"], use_cache=False) == {
        "ds/a.bin": hashlib.sha256(b"two" * 1000).hexdigest()
    }


def test_symlinks_on_the_remote_are_refused(remote: SshRemote, tmp_path: Path) -> None:
    root = remote_root(remote) / "ds"
    root.mkdir()
    (root / "real.txt").write_text("x")
    (root / "link.txt").symlink_to(root / "real.txt")
    with pytest.raises(ScanError) as info:
        list(remote.list_files("ds"))
    assert "link.txt" in info.value.message
    (root / "link.txt").unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "sub").symlink_to(outside)
    item = _item(tmp_path / "src", "f", b"data", "ds/sub/f")
    with pytest.raises(InvalidPath):
        remote.put_file(Path(item.local), item.path, digest=item.digest, mtime_ns=0)
    assert list(outside.iterdir()) == []


def test_a_lock_within_a_symlinked_dataset_folder_is_not_made(remote: SshRemote, tmp_path: Path) -> None:
    """A lock taken before the look (``within``) goes only into a real folder: through a link
    the record would land outside the remote; the locked write path then refuses the link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (remote_root(remote) / "ds").symlink_to(outside)
    with pytest.raises(FileNotFoundError):
        remote.create_exclusive("ds/.tether/lock", b"one", within="ds")
    with pytest.raises(InvalidPath):
        remote.create_exclusive("ds/.tether/lock", b"one")
    assert list(outside.iterdir()) == []


def test_create_exclusive_has_one_winner(tmp_path: Path, sshd: SshServer) -> None:
    a = ssh_remote(tmp_path, name="shared")
    b = SshRemote(a.url, a.settings)
    try:
        a.check()
        b.check()
        results: list[bool] = []
        barrier = threading.Barrier(2)

        def take(r: SshRemote, tag: bytes) -> None:
            barrier.wait()
            results.append(r.create_exclusive("ds/.tether/lock", tag))

        threads = [threading.Thread(target=take, args=(r, t)) for r, t in ((a, b"a"), (b, b"b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False, True]
        assert a.read_bytes("ds/.tether/lock") in (b"a", b"b")
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("meanwhile", ["nothing", "broken and taken", "torn", "gone"])
def test_a_lease_is_released_in_one_request_and_only_while_it_is_ours(
    remote: SshRemote, sent: list[tuple[str, str]], meanwhile: str
) -> None:
    """Releasing over SSH is one "release" request (no read, then delete). A record someone
    else wrote after breaking ours, a torn one and a missing one are left as they are."""
    lease = Lease(remote, "ns/ds", operation="push", host="here")
    ours = lease.acquire()
    record = remote_root(remote) / lock_path("ns/ds")
    assert LockRecord.loads(record.read_bytes()) == ours
    theirs = dataclasses.replace(ours, token="b" * 32, host="elsewhere")
    if meanwhile == "broken and taken":
        record.write_bytes(theirs.dumps())
    elif meanwhile == "torn":
        record.write_bytes(b'{"format": "tether-lo')
    elif meanwhile == "gone":
        record.unlink()
    left = record.read_bytes() if record.exists() else None
    sent.clear()
    lease.release()
    assert [op for _, op in sent] == ["release"]
    assert (record.read_bytes() if record.exists() else None) == (None if meanwhile == "nothing" else left)


def test_the_index_is_written_in_one_request_and_only_under_our_lock(
    remote: SshRemote, sent: list[tuple[str, str]]
) -> None:
    """The commit point (the index) is checked and written by the helper in one request; once
    someone else holds the lock it is not written, and the error names the holder."""
    lease = Lease(remote, "ns/ds", operation="push", host="here")
    ours = lease.acquire()
    index = remote_root(remote) / "ns/ds/.tether/index"
    sent.clear()
    lease.write_while_held("ns/ds/.tether/index", b"first")
    assert [op for _, op in sent] == ["write_locked"] and index.read_bytes() == b"first"

    theirs = dataclasses.replace(ours, token="c" * 32, host="elsewhere")
    (remote_root(remote) / lock_path("ns/ds")).write_bytes(theirs.dumps())
    with pytest.raises(LockHeld, match="elsewhere"):
        lease.write_while_held("ns/ds/.tether/index", b"second", release=True)
    assert index.read_bytes() == b"first"
    assert (
        LockRecord.loads((remote_root(remote) / lock_path("ns/ds")).read_bytes()) == theirs
    )  # left as it was
    lease.release()


def test_a_push_lets_its_lock_go_in_the_index_request(remote: SshRemote, sent: list[tuple[str, str]]) -> None:
    """A push's index is its last remote step: written and the record deleted in one request,
    so releasing the lease afterwards sends nothing; the next run takes the lock at once."""
    lease = Lease(remote, "ns/ds", operation="push", host="here")
    lease.acquire()
    sent.clear()
    lease.write_while_held("ns/ds/.tether/index", b"index", release=True)
    lease.release()
    assert [op for _, op in sent] == ["write_locked"]
    assert (remote_root(remote) / "ns/ds/.tether/index").read_bytes() == b"index"
    assert not (remote_root(remote) / lock_path("ns/ds")).exists()
    Lease(remote, "ns/ds", operation="push", host="here").acquire()


def test_full_remote_disk_is_disk_full_error(tmp_path: Path, sshd: SshServer) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    try:
        r = open_remote(RemoteConfig("r", f"ssh://{HOST}{mount}", sshd.options(), "test"))
        r.check()
        items = [_item(tmp_path / "src", f"f{i}", os.urandom(300 * 1024), f"ds/f{i}") for i in range(6)]
        done: list[BaseException | None] = []
        with pytest.raises(DiskFullError) as info:
            r.put_many(items, on_bytes=lambda n: None, on_done=lambda i, e: done.append(e))  # type: ignore[attr-defined]
        assert info.value.exit_code == ExitCode.REFUSED
        assert "no space left" in info.value.message
        assert 1 <= done.count(None) < 6
        r.close()
        assert _temp_files(mount) == []
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# -- settings -----------------------------------------------------------------------------------
def test_unknown_or_mistyped_options_are_config_errors(tmp_path: Path) -> None:
    for options, words in (
        ({"identity": "~/.ssh/id"}, "unknown SSH option"),
        ({"port": "22"}, "port"),
        ({"batch_mode": "no"}, "batch_mode"),
        ({"ssh_options": 3}, "ssh_options"),
        ({"streams": 0}, "streams"),
        ({"streams": 17}, "streams"),
        ({"streams": "2"}, "streams"),
    ):
        with pytest.raises(ConfigError) as info:
            open_remote(RemoteConfig("r", "ssh://h/p", options, "test"))
        assert words in info.value.message


def test_aes_gcm_goes_first_only_where_nobody_chose_ciphers() -> None:
    default = "chacha20-poly1305@openssh.com,aes128-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com"
    assert ssh_mod.faster_ciphers(default, default) == (
        "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr"
    )
    assert ssh_mod.faster_ciphers("aes256-ctr", default) is None  # someone chose
    only_chacha = "chacha20-poly1305@openssh.com,aes128-ctr"
    assert ssh_mod.faster_ciphers(only_chacha, only_chacha) is None  # none to prefer
    first = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr"
    assert ssh_mod.faster_ciphers(first, first) is None  # already first


def test_the_cipher_order_is_left_to_a_user_who_set_one(
    tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read from ``ssh -G`` (no network): tether's reordering shows on the command line only
    when the configuration ssh would use names ssh's own default ciphers."""
    monkeypatch.setattr(ssh_mod, "cpu_has_aes", lambda: True)
    settings = _settings_for(sshd, tmp_path)
    plain = ssh_mod.SshConnection(settings)
    chosen = ssh_mod.SshConnection(dataclasses.replace(settings, ssh_options=("-o", "Ciphers=aes256-ctr")))
    ciphers = plain.ciphers()
    assert ciphers is not None and ciphers.startswith("aes128-gcm@openssh.com,")
    assert f"Ciphers={ciphers}" in plain.args(control=False)
    assert chosen.ciphers() is None
    assert not any(a.startswith("Ciphers=aes128-gcm") for a in chosen.args(control=False))
    monkeypatch.setattr(ssh_mod, "cpu_has_aes", lambda: False)  # a CPU without AES instructions
    assert ssh_mod.SshConnection(settings).ciphers() is None


def test_an_ssh_wrapper_that_refuses_the_default_query_leaves_ciphers_to_ssh(
    tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ssh_mod, "cpu_has_aes", lambda: True)
    wrapper = tmp_path / "site-ssh"
    wrapper.write_text('#!/bin/sh\ncase "$*" in *"-F /dev/null"*) exit 2;; esac\nexec ssh "$@"\n')
    wrapper.chmod(0o755)
    settings = dataclasses.replace(_settings_for(sshd, tmp_path), ssh_command=str(wrapper))
    connection = ssh_mod.SshConnection(settings)
    assert connection.ciphers() is None
    assert not any(a.startswith("Ciphers=") for a in connection.args(control=False))


def _settings_for(sshd: SshServer, tmp_path: Path) -> ssh_mod.SshSettings:
    return ssh_mod.SshSettings.from_options(
        name="r", host=HOST, path=str(tmp_path), user=None, port=None, options=sshd.options()
    )


def test_a_login_that_may_prompt_is_said_so() -> None:
    """batch_mode = false lets ssh ask for a password or 2FA code: sync then checks the remote
    before anything else writes to the terminal (see sync.open_context)."""
    interactive = open_remote(RemoteConfig("r", "ssh://h/p", {"batch_mode": False}, "test"))
    batch = open_remote(RemoteConfig("r", "ssh://h/p", {}, "test"))
    assert interactive.capabilities.login_may_prompt
    assert not batch.capabilities.login_may_prompt
    assert not SshRemote.capabilities.login_may_prompt  # the class default stays untouched


def test_settings_from_url_and_options(tmp_path: Path) -> None:
    r = open_remote(
        RemoteConfig(
            "r",
            "ssh://alice@hpc:2222/~/data",
            {"ssh_options": ["-o ProxyJump=login", "Compression=yes"], "identity_file": "~/.ssh/k"},
            "test",
        )
    )
    assert isinstance(r, SshRemote)
    s = r.settings
    assert (s.host, s.user, s.port, s.path) == ("hpc", "alice", 2222, "~/data")
    assert s.ssh_options == ("-o", "ProxyJump=login", "-o", "Compression=yes")
    assert s.identity_file == os.path.expanduser("~/.ssh/k")
    short = open_remote(RemoteConfig("r", "hpc:data", {}, "test"))
    assert isinstance(short, SshRemote) and short.settings.path == "data"  # below the remote home


def test_shell_startup_chatter_before_the_helper_is_skipped(tmp_path: Path, sshd: SshServer) -> None:
    """A ~/.bashrc that prints (a module system's banner) must not break the protocol."""
    r = ssh_remote(tmp_path, python="echo 'Welcome to the cluster!'; printf '\\000\\001junk'; python3")
    try:
        r.check()
        assert r.control().chatter > 20
        r.write_bytes_atomic("ds/x", b"ok")
        assert r.read_bytes("ds/x") == b"ok"
    finally:
        r.close()


# -- small files sent before they were ever hashed (a first push) --------------------------------
def _put(remote: SshRemote, items: list[TransferItem]) -> tuple[list[object], dict[str, str]]:
    """put_many of ``items``: each one's error, and the digests learnt from the unhashed ones."""
    done: list[object] = []
    learnt: dict[str, str] = {}
    remote.put_many(
        items,
        on_bytes=lambda n: None,
        on_done=lambda i, e: done.append(e),
        on_digest=lambda i, d: learnt.__setitem__(i.path, d),
    )
    return done, learnt


def _unhashed(item: TransferItem) -> TransferItem:
    st = Path(item.local).stat()
    state = StatEntry(Path(item.local).name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    return item._replace(digest=UNHASHED, expect=state)


def test_unhashed_small_files_are_hashed_as_sent_and_checked_on_arrival(
    remote: SshRemote, tmp_path: Path
) -> None:
    items = [_item(tmp_path / "src", f"d/f{i}", os.urandom(100 + i), f"ds/d/f{i}") for i in range(20)]
    done, learnt = _put(remote, [_unhashed(i) for i in items])
    assert done == [None] * 20
    assert learnt == {i.path: i.digest for i in items}
    assert remote.hash_files([i.path for i in items]) == learnt


def test_unhashed_file_changed_since_the_scan_is_not_sent(remote: SshRemote, tmp_path: Path) -> None:
    good = _unhashed(_item(tmp_path / "src", "a", b"A" * 50, "ds/a"))
    stale = _unhashed(_item(tmp_path / "src", "b", b"B" * 50, "ds/b"))
    Path(stale.local).write_bytes(b"C" * 60)  # a job rewrote it after the scan
    big = _unhashed(_item(tmp_path / "src", "big", os.urandom(2 * 1024 * 1024), "ds/big"))
    Path(big.local).write_bytes(os.urandom(2 * 1024 * 1024))  # the same size, other bytes
    errors: dict[str, object] = {}
    remote.put_many(
        [good, stale, big], on_bytes=lambda n: None, on_done=lambda i, e: errors.__setitem__(i.path, e)
    )
    assert errors["ds/a"] is None
    assert isinstance(errors["ds/b"], StalePlanError)
    assert isinstance(errors["ds/big"], StalePlanError)
    assert sorted(s.path for s in remote.list_files("ds")) == ["a"]
    assert _temp_files(remote_root(remote)) == []


@pytest.mark.parametrize("resumable", [False, True], ids=["streamed", "resumable"])
def test_unhashed_large_files_are_hashed_as_sent_and_checked_on_arrival(
    remote: SshRemote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resumable: bool
) -> None:
    """A first push reads a large file once: its digest follows its bytes, the helper checks it."""
    if resumable:
        monkeypatch.setattr(ssh_mod, "RESUME_MIN", 1024 * 1024)
    src = tmp_path / "src"
    items = [_item(src, f"big{i}", os.urandom(3 * 1024 * 1024 + i), f"ds/big{i}") for i in range(2)]
    done, learnt = _put(remote, [_unhashed(i) for i in items])
    assert done == [None, None]
    assert learnt == {i.path: i.digest for i in items}
    root = remote_root(remote)
    assert {f"ds/{p.name}": p.read_bytes() for p in (root / "ds").iterdir()} == {
        i.path: Path(i.local).read_bytes() for i in items
    }
    assert _temp_files(root) == []


def test_unhashed_large_file_changed_while_sent_is_refused(remote: SshRemote, tmp_path: Path) -> None:
    big = _unhashed(_item(tmp_path / "src", "big", os.urandom(4 * 1024 * 1024), "ds/big"))
    sent: list[int] = []

    def meanwhile(n: int) -> None:  # a job appends to the file while it is being sent
        sent.append(n)
        if len(sent) == 1:
            with open(big.local, "ab") as f:
                f.write(b"appended")

    errors: dict[str, object] = {}
    learnt: dict[str, str] = {}
    remote.put_many(
        [big],
        on_bytes=meanwhile,
        on_done=lambda i, e: errors.__setitem__(i.path, e),
        on_digest=lambda i, d: learnt.__setitem__(i.path, d),
    )
    assert isinstance(errors["ds/big"], StalePlanError), errors
    assert learnt == {}
    assert list(remote.list_files("ds")) == []
    assert _temp_files(remote_root(remote)) == []


# -- listings told against the index (IndexedListing) ------------------------------------------
@pytest.fixture
def deltas(monkeypatch: pytest.MonkeyPatch) -> list[ListingDelta]:
    """Every ListingDelta the SSH backend returns, in order."""
    seen: list[ListingDelta] = []
    real = SshRemote.list_against_index

    def spy(self, prefix, index, **options):  # type: ignore[no-untyped-def]
        delta = real(self, prefix, index, **options)
        seen.append(delta)
        return delta

    monkeypatch.setattr(SshRemote, "list_against_index", spy)
    return seen


def _pushed_workspace(tmp_path: Path, name: str = "ws", files: int = 40) -> WorkspaceFixture:
    ws = make_workspace(tmp_path, name, remote_dir=tmp_path / "remote")
    _add_remote(ws, get_server())
    for i in range(files):
        ws.write(f"d{i % 4}/f{i}.txt", f"file {i}")
    sync.push("ns/ds", "hpc", workspace=ws.root, confirm=lambda plan: True)
    return ws


@pytest.mark.parametrize("change", ["none", "lost", "edited", "new", "excluded"])
def test_index_entries_taken_as_confirmed_give_the_state_of_a_full_look(
    tmp_path: Path, sshd: SshServer, change: str
) -> None:
    """scan_remote takes the index entries the helper confirmed as they are (no rebuild, no
    sort). Its state must equal the one built by matching every listed file against the index
    (the path a run with fresh uploads takes): in step, a file lost or edited in place on the
    remote, a file the index does not know, a file the rules now leave alone."""
    ws = _pushed_workspace(tmp_path, files=12)
    remote = ws.remote_dir / "ns/ds"
    if change == "lost":
        (remote / "d1/f5.txt").unlink()
    elif change == "edited":
        (remote / "d2/f6.txt").write_text("file X")  # same size, new mtime
    elif change == "new":
        (remote / "d0/zz.txt").write_text("arrived on the cluster")
    elif change == "excluded":
        toml = ws.root / "tether.toml"
        toml.write_text(toml.read_text().replace("exclude = []", 'exclude = ["d3/**"]'))
    with sync.open_context("ns/ds", "hpc", workspace=ws.root) as ctx:
        quick = sync.scan_remote(ctx)
        # A fresh entry for a path nobody lists changes nothing, but takes the matching path.
        full = sync.scan_remote(ctx, fresh={"never/listed.txt": Entry("never/listed.txt", 1, 1, "0" * 64)})
    assert quick.manifest == full.manifest
    assert quick.unowned == full.unowned and quick.exists == full.exists
    assert quick.index_current == full.index_current
    assert quick.index_current == (change in ("none", "excluded"))
    assert len(quick.unowned) == (3 if change == "excluded" else 0)


def test_the_look_under_the_lock_clears_what_killed_writers_left_in_the_same_request(
    tmp_path: Path, sshd: SshServer, sent: list[tuple[str, str]]
) -> None:
    """Temporary files of a killed run (beside the data and in .tether/) are removed by the
    listing under the lock, without a request of their own; a recent resumable part stays."""
    ws = _pushed_workspace(tmp_path, files=8)
    remote = ws.remote_dir / "ns/ds"
    dead = [remote / f"d1/.f1.txt{TEMP_MARKER}dead", remote / f".tether/.index{TEMP_MARKER}dead"]
    part = remote / f"d2/.big{TEMP_MARKER}{'0' * 16}.part"
    for path in [*dead, part]:
        path.write_bytes(b"left by a killed run")
    sent.clear()
    ws.write("d0/f0.txt", "changed")
    sync.push("ns/ds", "hpc", workspace=ws.root, confirm=lambda plan: True)
    assert not any(p.exists() for p in dead) and part.exists()
    ops = [op for _, op in sent]
    assert "cleanup" not in ops and ops.count("list_delta") == 2
    assert (remote / "d0/f0.txt").read_text() == "changed"


def test_no_op_listing_sends_neither_entries_nor_the_index(
    tmp_path: Path, sshd: SshServer, deltas: list[ListingDelta], monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = _pushed_workspace(tmp_path)
    copy = ws.workspace().remote_index_path("hpc", "ns/ds")
    assert copy.read_bytes() == (ws.remote_dir / "ns/ds/.tether/index").read_bytes()
    deltas.clear()
    parsed_on: list[str] = []
    loads = Manifest.loads.__func__  # type: ignore[attr-defined]

    def counting_loads(cls: type[Manifest], data: bytes, **kwargs: Any) -> Manifest:
        parsed_on.append(threading.current_thread().name)
        return loads(cls, data, **kwargs)

    monkeypatch.setattr(Manifest, "loads", classmethod(counting_loads))
    assert sync.diff("ns/ds", "hpc", workspace=ws.root).in_sync
    (delta,) = deltas
    assert (delta.changed, delta.missing, delta.index) == ([], [], None)
    # The copy was parsed once, while the remote listed (sync._parse_meanwhile), not after.
    assert parsed_on == ["tether-index"]
    assert delta.index_digest == hashlib.sha256(copy.read_bytes()).hexdigest()


def test_changes_behind_the_index_are_listed_and_planned(
    tmp_path: Path, sshd: SshServer, deltas: list[ListingDelta]
) -> None:
    """The index is a cache, never the truth: an edit, a deletion and a new file made on the
    cluster without tether all reach the plan."""
    ws = _pushed_workspace(tmp_path)
    edited = ws.remote_file("d1/f1.txt")
    edited.write_bytes(b"edited on the cluster")
    ws.remote_file("d2/f2.txt").unlink()
    ws.remote_file("d3/new.txt").write_bytes(b"made on the cluster")
    deltas.clear()
    result = sync.diff("ns/ds", "hpc", workspace=ws.root)
    (delta,) = deltas
    assert sorted(st.path for st in delta.changed) == ["d1/f1.txt", "d3/new.txt"]
    assert delta.missing == ["d2/f2.txt"]
    statuses = {c.path: c.status.value for c in result.pull.changes}
    assert statuses == {
        "d1/f1.txt": "modified_remote",
        "d2/f2.txt": "deleted_remote",
        "d3/new.txt": "remote_only",
    }


def test_a_same_size_edit_with_its_mtime_restored_is_not_vouched_twice(
    tmp_path: Path, sshd: SshServer, deltas: list[ListingDelta]
) -> None:
    """Size and mtime are what the index vouches by (as for every backend): a rewrite that keeps
    both is only caught by --checksum, and --checksum still sees it through a delta listing."""
    ws = _pushed_workspace(tmp_path)
    target = ws.remote_file("d0/f0.txt")
    st = target.stat()
    target.write_bytes(b"file X")  # same size as "file 0"
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sync.diff("ns/ds", "hpc", workspace=ws.root).in_sync
    checked = sync.diff("ns/ds", "hpc", workspace=ws.root, checksum=True)
    assert [c.path for c in checked.pull.changes] == ["d0/f0.txt"]


def test_a_stale_index_copy_is_replaced_and_parsed_while_the_remote_lists(
    tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a current copy of the index, the helper sends the index as soon as it has read
    it, before its walk ends: the client parses it meanwhile, not after the listing."""
    ws = _pushed_workspace(tmp_path)
    ws.workspace().remote_index_path("hpc", "ns/ds").unlink()
    events: list[tuple[str, bytes | None]] = []
    real_parse, real_list = sync._parse_meanwhile, SshRemote.list_against_index

    def parse(ctx, data):  # type: ignore[no-untyped-def]
        events.append(("parse", data))
        return real_parse(ctx, data)

    def listing(self, *args, **options):  # type: ignore[no-untyped-def]
        delta = real_list(self, *args, **options)
        events.append(("listed", delta.index))
        return delta

    monkeypatch.setattr(sync, "_parse_meanwhile", parse)
    monkeypatch.setattr(SshRemote, "list_against_index", listing)
    assert sync.diff("ns/ds", "hpc", workspace=ws.root).in_sync
    remote_index = (ws.remote_dir / "ns/ds/.tether/index").read_bytes()
    assert events == [("parse", None), ("parse", remote_index), ("listed", remote_index)]
    assert ws.workspace().remote_index_path("hpc", "ns/ds").read_bytes() == remote_index


def test_a_stale_or_damaged_index_copy_is_replaced(
    tmp_path: Path, sshd: SshServer, deltas: list[ListingDelta]
) -> None:
    ws = _pushed_workspace(tmp_path)
    other = make_workspace(tmp_path, "other", remote_dir=tmp_path / "remote")
    _add_remote(other, get_server())
    sync.pull("ns/ds", "hpc", workspace=other.root, confirm=lambda plan: True)
    other.write("d0/f0.txt", "changed by a colleague")
    sync.push("ns/ds", "hpc", workspace=other.root, confirm=lambda plan: True)
    remote_index = (ws.remote_dir / "ns/ds/.tether/index").read_bytes()
    copy = ws.workspace().remote_index_path("hpc", "ns/ds")
    assert copy.read_bytes() != remote_index

    deltas.clear()
    result = sync.diff("ns/ds", "hpc", workspace=ws.root)
    assert [c.path for c in result.pull.changes] == ["d0/f0.txt"]
    assert deltas[0].index == remote_index and deltas[0].changed == []
    assert copy.read_bytes() == remote_index

    copy.write_bytes(b"torn")
    deltas.clear()
    assert [c.path for c in sync.diff("ns/ds", "hpc", workspace=ws.root).pull.changes] == ["d0/f0.txt"]
    assert deltas[0].index == remote_index
    assert copy.read_bytes() == remote_index


def test_the_helper_reads_the_index_beside_the_walk_and_keeps_its_errors(tmp_path: Path) -> None:
    """read_index_into runs on a thread while the helper walks: a missing index vouches for
    nothing, a damaged one is returned raw with nothing vouched, and one that cannot be read
    keeps its error for the listing to raise (never an empty, trusting answer)."""
    ws = make_workspace(tmp_path)
    ws.write("a.txt", "alpha")
    sync.push("ns/ds", "store", workspace=ws.root, confirm=lambda plan: True)
    index = ws.remote_dir / "ns/ds/.tether/index"

    found: dict[str, Any] = {}
    ssh_helper.read_index_into(str(index), found)
    assert found["raw"] == index.read_bytes()
    assert found["stats"] == {"a.txt": [5, (ws.data / "ns/ds/a.txt").stat().st_mtime_ns]}

    missing: dict[str, Any] = {}
    ssh_helper.read_index_into(str(tmp_path / "nowhere"), missing)
    assert missing == {}

    index.write_bytes(b"torn")
    damaged: dict[str, Any] = {}
    ssh_helper.read_index_into(str(index), damaged)
    assert damaged == {"raw": b"torn", "stats": {}}

    index.unlink()
    index.mkdir()
    unreadable: dict[str, Any] = {}
    ssh_helper.read_index_into(str(index), unreadable)
    assert isinstance(unreadable["error"], IsADirectoryError)


def test_the_helper_parses_an_unchanged_index_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The look under the lock lists again with the same index: the helper reuses its parse
    while the file is the same (inode, size, mtime, ctime), and hands out a fresh dict each time
    (the listing pops what it vouched for). A rewritten index is read again."""
    ws = make_workspace(tmp_path)
    ws.write("a.txt", "alpha")
    sync.push("ns/ds", "store", workspace=ws.root, confirm=lambda plan: True)
    index = ws.remote_dir / "ns/ds/.tether/index"
    reads: list[str] = []
    real = ssh_helper.read_index_into
    monkeypatch.setattr(ssh_helper, "read_index_into", lambda p, out: (reads.append(p), real(p, out)))
    helper = ssh_helper.Helper(None)  # type: ignore[arg-type]  # no connection: read_index only

    first: dict[str, Any] = {}
    helper.read_index(str(index), first)
    first["stats"].pop("a.txt")
    second: dict[str, Any] = {}
    helper.read_index(str(index), second)
    assert reads == [str(index)]
    assert second["raw"] == index.read_bytes() and "a.txt" in second["stats"]

    ws.write("b.txt", "beta")
    sync.push("ns/ds", "store", workspace=ws.root, confirm=lambda plan: True)  # a new index
    third: dict[str, Any] = {}
    helper.read_index(str(index), third)
    assert reads == [str(index)] * 2
    assert set(third["stats"]) == {"a.txt", "b.txt"}

    index.unlink()
    gone: dict[str, Any] = {}
    helper.read_index(str(index), gone)
    assert gone == {}


def test_a_damaged_remote_index_falls_back_to_the_full_listing(
    tmp_path: Path, sshd: SshServer, deltas: list[ListingDelta]
) -> None:
    ws = _pushed_workspace(tmp_path)
    (ws.remote_dir / "ns/ds/.tether/index").write_bytes(b"\x1f\x8b not gzip at all")
    messages: list[str] = []

    class Collect(Progress):
        def message(self, text: str) -> None:
            messages.append(text)

    deltas.clear()
    result = sync.diff("ns/ds", "hpc", workspace=ws.root, progress=Collect())
    assert result.in_sync
    assert len(deltas[0].changed) == 40  # nothing vouched: everything listed, then rehashed
    assert any("ignoring damaged remote index" in m for m in messages)

    # The workspace's copy now holds the same damaged bytes; it is parsed while the remote
    # lists (sync._parse_meanwhile), and the damage is still said once, not once per parse.
    messages.clear()
    assert sync.diff("ns/ds", "hpc", workspace=ws.root, progress=Collect()).in_sync
    assert sum("ignoring damaged remote index" in m for m in messages) == 1


# -- masters shared between runs (control_persist) ---------------------------------------------
def _persisting_workspace(
    tmp_path: Path, server: SshServer, relay: Relay, name: str = "ws"
) -> WorkspaceFixture:
    """A workspace whose remote goes through its own relay port: a master of its own, shared
    only by the runs of this test."""
    ws = make_workspace(tmp_path, name, remote_dir=tmp_path / "remote")
    config = server.client_config(tmp_path / f"{name}_config", port=relay.port)
    add_remote(ws.root, "hpc", f"ssh://{HOST}{ws.remote_dir}", server.options(config, control_persist=60))
    return ws


def _stop_shared_master(ws: WorkspaceFixture) -> None:
    remote = open_remote(ws.workspace().remote("hpc"), workspace_root=ws.root)
    assert isinstance(remote, SshRemote)
    remote.conn.connect()
    remote.conn._stop_master()
    remote.close()


def test_the_next_run_borrows_the_master_and_logs_in_no_more(
    tmp_path: Path, sshd: SshServer, relay: Relay
) -> None:
    ws = _persisting_workspace(tmp_path, sshd, relay)
    for i in range(5):
        ws.write(f"f{i}.txt", f"file {i}")
    before = sshd.auth_count()
    sync.push("ns/ds", "hpc", workspace=ws.root, confirm=lambda plan: True)
    assert sshd.auth_count() - before == 1
    assert sync.diff("ns/ds", "hpc", workspace=ws.root).in_sync
    ws.write("f9.txt", "one more")
    sync.push("ns/ds", "hpc", workspace=ws.root, confirm=lambda plan: True)
    assert sshd.auth_count() - before == 1  # three runs, one login (one 2FA prompt)
    assert relay.connections == 1
    _stop_shared_master(ws)


def test_runs_starting_together_log_in_once(tmp_path: Path, sshd: SshServer, relay: Relay) -> None:
    first = _persisting_workspace(tmp_path, sshd, relay, "one")
    second = _persisting_workspace(tmp_path, sshd, relay, "two")
    first.write("a.txt", "A")
    sync.push("ns/ds", "hpc", workspace=first.root, confirm=lambda plan: True)
    _stop_shared_master(first)
    before = sshd.auth_count()
    start = threading.Barrier(2)
    results: list[bool] = []

    def diff(ws: WorkspaceFixture) -> None:
        start.wait()
        results.append(sync.diff("ns/ds", "hpc", workspace=ws.root).remote_exists)

    threads = [threading.Thread(target=diff, args=(ws,)) for ws in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True, True]
    assert sshd.auth_count() - before == 1
    _stop_shared_master(first)


def test_a_borrowed_master_whose_link_died_is_replaced(
    tmp_path: Path, sshd: SshServer, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A laptop that slept: the master process is still there, its link is not. The next run
    notices that the helper does not answer and logs in afresh instead of hanging."""
    monkeypatch.setattr(ssh_mod, "BORROWED_HELLO_S", 1.0)
    ws = _persisting_workspace(tmp_path, sshd, relay)
    ws.write("a.txt", "A")
    sync.push("ns/ds", "hpc", workspace=ws.root, confirm=lambda plan: True)
    relay.freeze()
    before = sshd.auth_count()
    assert sync.diff("ns/ds", "hpc", workspace=ws.root).in_sync
    assert sshd.auth_count() - before == 1
    assert relay.connections == 2
    relay.drop()
    _stop_shared_master(ws)


def test_remote_test_logs_in_for_real_even_beside_a_shared_master(
    tmp_path: Path, sshd: SshServer, relay: Relay, tether
) -> None:
    ws = _persisting_workspace(tmp_path, sshd, relay)
    ws.write("a.txt", "A")
    sync.push("ns/ds", "hpc", workspace=ws.root, confirm=lambda plan: True)
    before = sshd.auth_count()
    r = tether("remote", "test", "hpc", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert sshd.auth_count() - before == 1
    _stop_shared_master(ws)


@pytest.mark.parametrize("problem", ["too open", "a link", "a file"])
def test_an_unsafe_shared_socket_folder_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, problem: str
) -> None:
    monkeypatch.setattr(ssh_mod, "_short_tmp", lambda: str(tmp_path))
    shared = tmp_path / f"tether-ssh-{os.geteuid()}"
    if problem == "too open":
        shared.mkdir(mode=0o755)
        shared.chmod(0o755)
    elif problem == "a link":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        shared.symlink_to(tmp_path / "elsewhere")
    else:
        shared.write_text("")
    assert ssh_mod._shared_control_dir() is None
    shared.unlink() if shared.is_symlink() or shared.is_file() else shared.rmdir()
    assert ssh_mod._shared_control_dir() == str(shared)
    assert shared.stat().st_mode & 0o777 == 0o700


def test_stale_private_master_folders_are_removed_and_nothing_else(tmp_path: Path) -> None:
    """A run killed with SIGKILL leaves its empty private folder; the next private-master run
    removes such folders once they are an hour old, and never a live, young, shared or foreign
    one."""
    now = time.time()
    old = now - ssh_mod.STALE_PRIVATE_S - 10

    def folder(name: str, *, age: float, files: int = 0) -> Path:
        path = tmp_path / name
        path.mkdir()
        for i in range(files):
            (path / f"socket{i}").write_bytes(b"")
        os.utime(path, (age, age))
        return path

    stale = [folder("tether-ssh-abcd1234", age=old), folder("tether-ssh-zz9_x0yq", age=old)]
    kept = [
        folder("tether-ssh-live0001", age=old, files=1),  # a live master's socket inside
        folder("tether-ssh-young001", age=now),  # a run between mkdtemp and its master
        folder(f"tether-ssh-{os.geteuid()}", age=old),  # the shared folder, even when empty
        folder("other-abcd1234", age=old),
    ]
    (tmp_path / "tether-ssh-afile000").write_bytes(b"")
    (tmp_path / "tether-ssh-link0000").symlink_to(stale[0])
    assert ssh_mod.remove_stale_private_dirs(str(tmp_path), now=now) == 2
    assert not any(p.exists() for p in stale)
    assert all(p.is_dir() for p in kept)
    assert (tmp_path / "tether-ssh-afile000").is_file() and (tmp_path / "tether-ssh-link0000").is_symlink()
    assert ssh_mod.remove_stale_private_dirs(str(tmp_path / "missing"), now=now) == 0


def test_a_large_upload_keeps_the_kernel_reading_ahead_of_it(
    remote: SshRemote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large file is read chunk by chunk in the thread that hashes and sends it: the next
    window of it is asked for ahead (posix_fadvise), so those reads do not wait on the disk."""
    from tether import readahead

    asked: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        asked.append((os.fstat(fd).st_size, offset, length))
        real(fd, offset, length, advice)

    # Files from RESUME_MIN up are sent resumably and left out of the small-file Prefetcher.
    monkeypatch.setattr(ssh_mod, "RESUME_MIN", 2 * ssh_helper.SMALL)
    monkeypatch.setattr(readahead.os, "posix_fadvise", fadvise)
    size = 3 * ssh_helper.SMALL + 7
    big = _item(tmp_path / "src", "big", os.urandom(size), "ds/big")
    outcome: dict[str, BaseException | None] = {}
    remote.put_many([big], on_bytes=lambda n: None, on_done=lambda i, e: outcome.__setitem__(i.path, e))
    assert outcome == {"ds/big": None}
    assert asked == [(size, 0, readahead.SequentialReadAhead.STEP)]  # one step covers 3 MiB
    assert (remote_root(remote) / "ds/big").read_bytes() == Path(big.local).read_bytes()
