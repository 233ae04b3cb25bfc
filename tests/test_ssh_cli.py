"""The command line with SSH remotes against a real sshd: the round trip, one authentication per
run, kills and cut links that a rerun repairs, the remote lock, and every connection failure as
exit 5 with a one-line message and a hint (never a traceback)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import (
    Result,
    WorkspaceFixture,
    backdate,
    cached_digests,
    make_workspace,
    rewrite_at_checkpoint,
    run_subprocess,
)
from sshd import HOST, Relay, SshServer, add_remote, sshd_fixture  # noqa: F401
from tether import faults, fileio
from tether.config import RemoteConfig
from tether.errors import ExitCode
from tether.lock import Lease
from tether.manifest import Manifest
from tether.paths import TEMP_MARKER
from tether.remotes import open_remote
from tether.remotes import ssh as ssh_mod
from tether.remotes.ssh import SshRemote

DS = "ns/ds"


@pytest.fixture
def hpc(tmp_path: Path, sshd: SshServer) -> WorkspaceFixture:
    """A workspace whose remote ``hpc`` is ``ssh://tether-test/<remote_dir>``."""
    ws = make_workspace(tmp_path)
    add_remote(ws.root, "hpc", f"ssh://{HOST}{ws.remote_dir}", sshd.options())
    return ws


def _files(ws: WorkspaceFixture, n: int, prefix: str = "f") -> dict[str, bytes]:
    files = {f"d{i % 4}/{prefix}{i:03d}.txt": f"{prefix} {i}\n".encode() * (i + 1) for i in range(n)}
    for rel, data in files.items():
        ws.write(rel, data)
    return files


def _record_ops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The op of every request any helper channel is sent from now on, in order."""
    ops: list[str] = []
    real_send = ssh_mod._Channel.send

    def recording(self, header, payload=b"", **kw):  # type: ignore[no-untyped-def]
        ops.append(header.get("op"))
        return real_send(self, header, payload, **kw)

    monkeypatch.setattr(ssh_mod._Channel, "send", recording)
    return ops


def _remote_tree(ws: WorkspaceFixture) -> dict[str, bytes]:
    root = ws.remote_dir / DS
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".tether" not in p.relative_to(root).parts
    }


def _no_temp_files(*roots: Path) -> None:
    left = [str(p) for root in roots for p in root.rglob(f"*{TEMP_MARKER}*")]
    assert left == []


def _clean_error(r: Result, code: int, *words: str) -> None:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    assert "error:" in r.stderr and "hint:" in r.stderr
    for word in words:
        assert word in r.stderr, r.stderr


# -- the loop -----------------------------------------------------------------------------------
def test_push_diff_pull_round_trip(
    hpc: WorkspaceFixture, tmp_path: Path, sshd: SshServer, tether: Callable[..., Result]
) -> None:
    files = _files(hpc, 40)
    assert tether("diff", DS, "hpc", cwd=hpc.root).exit_code == 1
    r = tether("push", DS, "hpc", "-y", cwd=hpc.root)
    assert r.exit_code == 0, r.output
    assert _remote_tree(hpc) == files
    assert (hpc.remote_dir / DS / ".tether" / "index").exists()
    assert tether("diff", DS, "hpc", cwd=hpc.root).exit_code == 0

    # a collaborator pulls through the host:path shorthand, changes a file, pushes it back
    other = make_workspace(tmp_path, "ws2", hpc.remote_dir)
    add_remote(other.root, "cluster", f"{HOST}:{hpc.remote_dir}", sshd.options())
    r = tether("pull", DS, "cluster", "-y", cwd=other.root)
    assert r.exit_code == 0, r.output
    assert {k: (other.data / DS / k).read_bytes() for k in files} == files
    other.write("d0/f000.txt", b"edited on the cluster side\n")
    other.write("new.txt", b"new\n")
    assert tether("push", DS, "cluster", "-y", cwd=other.root).exit_code == 0
    r = tether("pull", DS, "hpc", "-y", cwd=hpc.root)
    assert r.exit_code == 0, r.output
    assert (hpc.data / DS / "d0/f000.txt").read_bytes() == b"edited on the cluster side\n"
    assert (hpc.data / DS / "new.txt").read_bytes() == b"new\n"
    assert tether("diff", DS, "hpc", cwd=hpc.root).exit_code == 0
    _no_temp_files(hpc.remote_dir, hpc.root, other.root)


def test_a_diff_runs_one_remote_helper_and_a_push_two(hpc: WorkspaceFixture, sshd: SshServer, tether) -> None:
    """The stream helper (a second remote Python) starts only for runs that may move files: a
    push or pull starts it during its scan, a diff never does."""
    files = _files(hpc, 20)
    runs = ((1, ["diff", DS, "hpc"]), (2, ["push", DS, "hpc", "-y"]), (1, ["diff", DS, "hpc"]))
    for expected, args in runs:
        before = sshd.helper_starts()
        r = tether(*args, cwd=hpc.root)
        assert r.exit_code in (0, 1), r.output
        assert sshd.helper_starts() - before == expected, args
    assert _remote_tree(hpc) == files


def test_a_push_ends_with_one_request_that_writes_the_index_and_lets_the_lock_go(
    hpc: WorkspaceFixture, sshd: SshServer, tmp_path: Path, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the flush, a push's only remote request is the index's, which also deletes the
    lock record; the files were verified (and the parquet checks read the remote) before it.
    A pull lets its lock go once, after its verification, while it writes its base."""
    ops = _record_ops(monkeypatch)
    files = _files(hpc, 20)
    r = tether("push", DS, "hpc", "-y", cwd=hpc.root)
    assert r.exit_code == 0, r.output
    assert ops[ops.index("flush") + 1 :] == ["write_locked"], ops
    assert "release" not in ops
    assert not (hpc.remote_dir / DS / ".tether/lock").exists()
    assert _remote_tree(hpc) == files
    assert tether("diff", DS, "hpc", cwd=hpc.root).exit_code == 0

    other = make_workspace(tmp_path, "ws2", hpc.remote_dir)
    add_remote(other.root, "hpc", f"ssh://{HOST}{hpc.remote_dir}", sshd.options())
    ops.clear()
    assert tether("pull", DS, "hpc", "-y", cwd=other.root).exit_code == 0
    assert ops.count("release") == 1 and ops.count("create") == 1, ops
    assert not (hpc.remote_dir / DS / ".tether/lock").exists()
    assert {
        str(p.relative_to(other.data / DS)): p.read_bytes()
        for p in (other.data / DS).rglob("*")
        if p.is_file()
    } == files


def test_an_unattended_pull_locks_first_and_looks_once_and_a_missing_dataset_gets_no_folder(
    hpc: WorkspaceFixture, sshd: SshServer, tmp_path: Path, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-y``: the lock is taken before the one look at the remote, which is made under it; a
    person reviewing the plan is asked before any lock, and the plan is checked again under it.
    A pull of a dataset the remote lacks makes no folder there (the lock goes only where the
    dataset's folder exists)."""
    from tether import sync

    files = _files(hpc, 12)
    assert tether("push", DS, "hpc", "-y", cwd=hpc.root).exit_code == 0
    ops = _record_ops(monkeypatch)
    unattended = make_workspace(tmp_path, "unattended", hpc.remote_dir)
    add_remote(unattended.root, "hpc", f"ssh://{HOST}{hpc.remote_dir}", sshd.options())
    r = tether("pull", DS, "hpc", "-y", cwd=unattended.root)
    assert r.exit_code == 0, r.output
    looks = [op for op in ops if op in ("create", "list_delta", "release")]
    assert looks == ["create", "list_delta", "release"], ops

    reviewed = make_workspace(tmp_path, "reviewed", hpc.remote_dir)
    add_remote(reviewed.root, "hpc", f"ssh://{HOST}{hpc.remote_dir}", sshd.options())
    ops.clear()
    sync.pull(DS, "hpc", workspace=reviewed.root, confirm=lambda plan: True)
    looks = [op for op in ops if op in ("create", "list_delta", "release")]
    assert looks == ["list_delta", "create", "list_delta", "release"], ops
    for ws in (unattended, reviewed):
        assert {rel: (ws.data / DS / rel).read_bytes() for rel in files} == files

    before = sorted(str(p) for p in hpc.remote_dir.rglob("*"))
    r = tether("pull", "ns/not-there", "hpc", "-y", cwd=unattended.root)
    assert r.exit_code == ExitCode.USAGE, r.output
    assert "exists neither" in r.stderr
    assert sorted(str(p) for p in hpc.remote_dir.rglob("*")) == before


def test_the_connection_closes_while_the_run_writes_its_own_records(
    hpc: WorkspaceFixture, sshd: SshServer, tmp_path: Path, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing touches the remote after a push's index request or a pull's lock release, so the
    helpers and master close then, beside the base and hash-cache writes, not after them."""
    from tether import sync

    events: list[str] = []
    real_close, real_save = SshRemote.close, sync.save_base

    def close(self):  # type: ignore[no-untyped-def]
        events.append("close")
        return real_close(self)

    def save(*args, **kwargs):  # type: ignore[no-untyped-def]
        events.append("base written")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(SshRemote, "close", close)
    monkeypatch.setattr(sync, "save_base", save)
    files = _files(hpc, 8)
    assert tether("push", DS, "hpc", "-y", cwd=hpc.root).exit_code == 0
    assert events[:2] == ["close", "base written"], events
    other = make_workspace(tmp_path, "ws2", hpc.remote_dir)
    add_remote(other.root, "hpc", f"ssh://{HOST}{hpc.remote_dir}", sshd.options())
    events.clear()
    real_execute_pull = sync._execute_pull

    def execute_pull(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_execute_pull(*args, **kwargs)
        events.append("pull done")
        return result

    monkeypatch.setattr(sync, "_execute_pull", execute_pull)
    assert tether("pull", DS, "hpc", "-y", cwd=other.root).exit_code == 0
    assert sorted(events) == ["base written", "close", "pull done"] and events[-1] == "pull done", events
    assert {k: (other.data / DS / k).read_bytes() for k in files} == files


def test_a_login_that_may_prompt_checks_first_and_still_starts_the_stream_helper(
    hpc: WorkspaceFixture, sshd: SshServer, tether
) -> None:
    """batch_mode = false: the remote is checked before the scan (a prompt would come then),
    and a push still gets its stream helper, a diff still does not."""
    add_remote(hpc.root, "ask", f"ssh://{HOST}{hpc.remote_dir}", sshd.options(batch_mode=False))
    files = _files(hpc, 12)
    runs = ((2, ["push", DS, "ask", "-y"]), (1, ["diff", DS, "ask"]))
    for expected, args in runs:
        before = sshd.helper_starts()
        r = tether(*args, cwd=hpc.root)
        assert r.exit_code == 0, r.output
        assert sshd.helper_starts() - before == expected, args
    assert _remote_tree(hpc) == files


def test_a_whole_push_authenticates_once(hpc: WorkspaceFixture, sshd: SshServer, tether) -> None:
    _files(hpc, 200)
    before = sshd.auth_count()
    r = tether("push", DS, "hpc", "-y", cwd=hpc.root)
    assert r.exit_code == 0, r.output
    assert sshd.auth_count() - before == 1
    assert len(_remote_tree(hpc)) == 200


def test_hostile_names_round_trip_through_the_cli(
    hpc: WorkspaceFixture, tmp_path: Path, sshd, tether
) -> None:
    names = [
        "a b.txt",
        "q'uote\".txt",
        "$(touch PWNED).txt",
        "nl\nname.txt",
        "ünï 日本.txt",
        "sp ace/x y.txt",
    ]
    for name in names:
        hpc.write(name, name.encode())
    assert tether("push", DS, "hpc", "-y", cwd=hpc.root).exit_code == 0
    assert _remote_tree(hpc) == {n: n.encode() for n in names}
    other = make_workspace(tmp_path, "ws2", hpc.remote_dir)
    add_remote(other.root, "hpc", f"ssh://{HOST}{hpc.remote_dir}", sshd.options())
    assert tether("pull", DS, "hpc", "-y", cwd=other.root).exit_code == 0
    assert {n: (other.data / DS / n).read_bytes() for n in names} == {n: n.encode() for n in names}
    assert not any(
        p.name == "PWNED" for root in (hpc.root, other.root, hpc.remote_dir) for p in root.rglob("*")
    )


# -- faults -------------------------------------------------------------------------------------
def test_killed_push_then_rerun_converges(hpc: WorkspaceFixture, sshd: SshServer) -> None:
    files = _files(hpc, 30)
    hpc.write("big.bin", os.urandom(3 * 1024 * 1024))
    r = run_subprocess(["push", DS, "hpc", "-y"], cwd=hpc.root, env={"TETHER_FAULT_KILL_AT": "uploaded:12"})
    assert r.exit_code == -9, r.output
    remote = {k: v for k, v in _remote_tree(hpc).items() if TEMP_MARKER not in k}
    assert remote  # the helper completes (verified) what it had received, or removes it
    for rel, data in remote.items():  # whatever landed is complete: nothing torn
        assert data == (hpc.data / DS / rel).read_bytes()
    r = run_subprocess(["push", DS, "hpc", "-y"], cwd=hpc.root)
    assert r.exit_code == 0, r.output
    assert _remote_tree(hpc) == {**files, "big.bin": (hpc.data / DS / "big.bin").read_bytes()}
    _no_temp_files(hpc.remote_dir)
    assert run_subprocess(["diff", DS, "hpc"], cwd=hpc.root).exit_code == 0
    assert not (hpc.remote_dir / DS / ".tether" / "lock").exists()


def test_link_cut_mid_push_is_exit_5_and_rerun_converges(
    hpc: WorkspaceFixture, tmp_path: Path, sshd: SshServer, tether
) -> None:
    files = {f"d/f{i:02d}.bin": os.urandom(128 * 1024) for i in range(24)}
    for rel, data in files.items():
        hpc.write(rel, data)
    relay = Relay(sshd.port)
    try:
        config = sshd.client_config(tmp_path / "relay_config", port=relay.port)
        add_remote(hpc.root, "far", f"ssh://{HOST}{hpc.remote_dir}", sshd.options(config))
        relay.cut_after(1024 * 1024)
        r = run_subprocess(["push", DS, "far", "-y"], cwd=hpc.root)
        _clean_error(r, ExitCode.UNREACHABLE, "lost the connection")
        sshd.wait_sessions_closed()
        landed = {k: v for k, v in _remote_tree(hpc).items() if TEMP_MARKER not in k}
        assert len(landed) < len(files)
        assert all(files[rel] == data for rel, data in landed.items())  # nothing torn
        relay.limit = None
        r = run_subprocess(["push", DS, "far", "-y"], cwd=hpc.root)
        assert r.exit_code == 0, r.output
    finally:
        relay.close()
    assert _remote_tree(hpc) == files
    _no_temp_files(hpc.remote_dir)


def test_lock_held_by_another_process_is_exit_6(hpc: WorkspaceFixture, sshd: SshServer, tether) -> None:
    _files(hpc, 3)
    assert tether("push", DS, "hpc", "-y", cwd=hpc.root).exit_code == 0
    hpc.write("more.txt", "more")
    holder = open_remote(RemoteConfig("hpc", f"ssh://{HOST}{hpc.remote_dir}", sshd.options(), "test"))
    try:
        holder.check()
        with Lease(holder, DS, operation="push", host="another-host"):
            r = run_subprocess(["push", DS, "hpc", "-y"], cwd=hpc.root)
            assert r.exit_code == ExitCode.LOCKED, r.output
            assert "another-host" in r.stderr
            status = tether("lock", "status", DS, "hpc", cwd=hpc.root)
            assert "another-host" in status.stdout
    finally:
        holder.close()
    assert tether("push", DS, "hpc", "-y", cwd=hpc.root).exit_code == 0


# -- connection failures: exit 5, one line, a hint ----------------------------------------------
def _bad_remote(ws: WorkspaceFixture, server: SshServer, tmp_path: Path, **config: object) -> None:
    options = dict(config.pop("options", {}))  # type: ignore[call-overload]
    path = server.client_config(tmp_path / "bad_config", **config)  # type: ignore[arg-type]
    add_remote(ws.root, "bad", f"ssh://{HOST}{ws.remote_dir}", server.options(path, **options))


def test_unknown_host_key_is_exit_5_with_fingerprint(hpc, tmp_path: Path, sshd: SshServer, tether) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    _bad_remote(hpc, sshd, tmp_path, known_hosts=empty)
    r = tether("diff", DS, "bad", cwd=hpc.root)
    _clean_error(r, ExitCode.UNREACHABLE, "host key", "not known", "SHA256:", "ssh-keyscan")
    assert empty.read_text() == ""  # never accepted silently


def test_changed_host_key_is_exit_5_with_the_removal_command(
    hpc, tmp_path: Path, sshd: SshServer, tether
) -> None:
    wrong = tmp_path / "wrong_known_hosts"
    other = (sshd.client_key.with_suffix(".pub")).read_text().split()
    wrong.write_text(f"tether-test-sshd {other[0]} {other[1]}\n")  # some other ed25519 key
    _bad_remote(hpc, sshd, tmp_path, known_hosts=wrong)
    r = tether("push", DS, "bad", "-y", cwd=hpc.root)
    _clean_error(r, ExitCode.UNREACHABLE, "CHANGED", "SHA256:", "ssh-keygen")


def test_wrong_key_is_exit_5(hpc, tmp_path: Path, sshd: SshServer, tether) -> None:
    key = tmp_path / "not_authorized"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    _bad_remote(hpc, sshd, tmp_path, identity=key)
    r = tether("diff", DS, "bad", cwd=hpc.root)
    _clean_error(r, ExitCode.UNREACHABLE, "authentication", "Permission denied")


def test_connection_refused_is_exit_5(hpc, tmp_path: Path, sshd: SshServer, tether) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    _bad_remote(hpc, sshd, tmp_path, port=closed)
    r = tether("pull", DS, "bad", cwd=hpc.root)
    _clean_error(r, ExitCode.UNREACHABLE, "refused", str(closed))


def test_hung_host_times_out_with_exit_5(hpc, tmp_path: Path, sshd: SshServer, tether) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, never says a word
        _bad_remote(hpc, sshd, tmp_path, port=silent.getsockname()[1], options={"connect_timeout": 1})
        r = tether("diff", DS, "bad", cwd=hpc.root)
    _clean_error(r, ExitCode.UNREACHABLE, "cannot reach", "timed out")


def test_missing_python_is_exit_5_with_the_fix(hpc, tmp_path: Path, sshd: SshServer, tether) -> None:
    _bad_remote(hpc, sshd, tmp_path, options={"python": "python3-not-installed"})
    r = tether("diff", DS, "bad", cwd=hpc.root)
    _clean_error(r, ExitCode.UNREACHABLE, "python3-not-installed", "not found", "python =")


def test_missing_ssh_client_is_exit_5(hpc, tmp_path: Path, sshd: SshServer, tether) -> None:
    _bad_remote(hpc, sshd, tmp_path, options={"ssh_command": "ssh-not-installed"})
    r = tether("push", DS, "bad", "-y", cwd=hpc.root)
    _clean_error(r, ExitCode.UNREACHABLE, "ssh-not-installed", "apt-get install openssh-client")


def test_base_path_problems_are_exit_5(hpc: WorkspaceFixture, sshd: SshServer, tether) -> None:
    hpc.write("a.txt", "a")
    as_file = hpc.remote_dir.parent / "a-file"
    as_file.write_text("not a folder")
    add_remote(hpc.root, "file", f"ssh://{HOST}{as_file}", sshd.options())
    _clean_error(tether("push", DS, "file", "-y", cwd=hpc.root), ExitCode.UNREACHABLE, "is a file")
    add_remote(hpc.root, "missing", f"ssh://{HOST}{hpc.remote_dir}/nope", sshd.options())
    _clean_error(
        tether("diff", DS, "missing", cwd=hpc.root), ExitCode.UNREACHABLE, "does not exist", "mkdir -p"
    )


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A folder other users can reach (pytest's tmp_path is private to its owner)."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tether-shared-{tmp_path.name}-{os.getpid()}"
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)  # a test may have made it read-only
        shutil.rmtree(path, ignore_errors=True)


def _without_rights(folder: Path) -> str:
    """The remote ``python3`` for a helper without write rights in ``folder``: as root (who
    bypasses permissions) it runs as ``nobody`` through setpriv, which also keeps it out of a
    0700 folder; as anyone else the tree is made read-only for its owner."""
    if os.geteuid() != 0:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        if os.access(folder, os.W_OK):
            pytest.skip("this user bypasses permissions")
        return "python3"
    if shutil.which("setpriv") is None:
        message = "setpriv (util-linux) is missing to run the helper as nobody"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return "setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3"


def test_a_dataset_the_login_may_only_read_is_pulled_without_the_lock(
    tmp_path: Path, sshd: SshServer, tether, shared: Path
) -> None:
    """A group's shared, read-only copy on the cluster: the lock record cannot be made there, so
    the pull goes ahead without it (saying so), leaving the remote exactly as it was."""
    remote_root = shared / "remote"
    remote_root.mkdir(mode=0o755)
    ws = make_workspace(tmp_path)
    files = {f"d{i % 2}/f{i}.txt": f"file {i}\n".encode() for i in range(6)}
    for rel, data in files.items():
        ws.write(rel, data)
    add_remote(ws.root, "hpc", f"ssh://{HOST}{remote_root}", sshd.options())
    assert tether("push", DS, "hpc", "-y", cwd=ws.root).exit_code == 0
    # and a file a cluster job wrote there since: no index vouches for it, the helper hashes
    # it where it lives and cannot keep that digest (its cache is not writable either)
    (remote_root / DS / "d0" / "from-a-job.txt").write_bytes(b"written on the cluster")
    files["d0/from-a-job.txt"] = b"written on the cluster"
    reader_python = _without_rights(remote_root)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in remote_root.rglob("*"))

    reader = make_workspace(tmp_path, "reader")
    add_remote(reader.root, "hpc", f"ssh://{HOST}{remote_root}", sshd.options(python=reader_python))
    r = tether("pull", DS, "hpc", "-y", cwd=reader.root)
    assert r.exit_code == 0, r.output
    assert "read-only" in r.stderr, r.stderr
    assert {rel: (reader.data / DS / rel).read_bytes() for rel in files} == files
    assert sorted((str(p), p.stat().st_mtime_ns) for p in remote_root.rglob("*")) == before


def test_permission_denied_on_the_base_path_is_exit_5(
    tmp_path: Path, sshd: SshServer, tether, shared: Path
) -> None:
    locked = shared / "locked"
    locked.mkdir(mode=0o700)
    python = _without_rights(locked)
    if python == "python3":
        locked.chmod(0)  # not even readable for its owner
    ws = make_workspace(tmp_path)
    ws.write("a.txt", "a")
    add_remote(ws.root, "hpc", f"ssh://{HOST}{locked}", sshd.options(python=python))
    r = tether("push", DS, "hpc", "-y", cwd=ws.root)
    _clean_error(r, ExitCode.UNREACHABLE, "permission denied")


# -- tether remote test -------------------------------------------------------------------------
def test_remote_test_passes_on_a_good_remote(hpc: WorkspaceFixture, tether) -> None:
    r = tether("remote", "test", "hpc", cwd=hpc.root)
    assert r.exit_code == 0, r.output
    for check in (
        "reachability",
        "authentication",
        "python3",
        "write permission",
        "free space",
        "clock skew",
    ):
        assert any(line.startswith("PASS") and check in line for line in r.stdout.splitlines()), r.stdout
    assert "FAIL" not in r.stdout


def test_remote_test_names_the_failing_check(hpc, tmp_path: Path, sshd: SshServer, tether) -> None:
    _bad_remote(hpc, sshd, tmp_path, options={"python": "/no/python3"})
    r = tether("remote", "test", "bad", cwd=hpc.root)
    assert r.exit_code == ExitCode.UNREACHABLE, r.output
    lines = r.stdout.splitlines()
    assert any(line.startswith("PASS") and "authentication" in line for line in lines)
    failing = [line for line in lines if line.startswith("FAIL")]
    assert len(failing) == 1 and "python3" in failing[0] and "/no/python3" in failing[0]
    assert any("fix:" in line for line in lines)
    assert any(line.startswith("SKIP") and "write permission" in line for line in lines)


def test_remote_test_on_a_local_remote(ws: WorkspaceFixture, tether) -> None:
    r = tether("remote", "test", "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "PASS  base folder" in r.stdout and "write permission" in r.stdout


def test_link_cut_mid_pull_resumes_the_large_file(
    hpc: WorkspaceFixture, tmp_path: Path, sshd: SshServer, tether
) -> None:
    """A pull of a large file over a link that drops: exit 5, nothing torn locally, and the
    rerun moves only the rest (the partial in staging is resumed, not refetched)."""
    data = os.urandom(70 * 1024 * 1024)  # above the 64 MiB resume threshold
    hpc.write("big.bin", data)
    assert tether("push", DS, "hpc", "-y", cwd=hpc.root).exit_code == 0
    ws2 = make_workspace(tmp_path, "ws2", hpc.remote_dir)
    for relay_cut in (30 * 1024 * 1024, None):
        relay = Relay(sshd.port)
        try:
            config = sshd.client_config(tmp_path / f"relay_config_{relay.port}", port=relay.port)
            add_remote(ws2.root, "far", f"ssh://{HOST}{hpc.remote_dir}", sshd.options(config))
            if relay_cut is not None:
                relay.cut_after_down(relay_cut)
            r = run_subprocess(["pull", DS, "far", "-y"], cwd=ws2.root)
        finally:
            relay.close()
        if relay_cut is not None:
            _clean_error(r, ExitCode.UNREACHABLE, "lost the connection")
            sshd.wait_sessions_closed()
            assert not (ws2.data / DS / "big.bin").exists()
            (part,) = [p for p in ws2.workspace().staging_dir.rglob("*.part")]
            have = part.stat().st_size
            assert 0 < have < len(data)
        else:
            assert r.exit_code == 0, r.output
            assert relay.bytes_down < len(data) - have + 8 * 1024 * 1024  # only the rest crossed
    assert (ws2.data / DS / "big.bin").read_bytes() == data
    _no_temp_files(ws2.root / "data")


def test_files_changed_or_deleted_after_the_scan_are_refused_and_the_rest_lands(
    hpc: WorkspaceFixture, tether: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push of known (hashed) files stats nothing before streaming: an edit made after the
    scan fails the helper's digest check, a deleted source fails its open, and both are reported
    as stale (exit 3) while every other file lands; the rerun finishes the job."""
    files = _files(hpc, 8)
    assert tether("push", DS, "hpc", "-y", cwd=hpc.root).exit_code == 0
    names = sorted(files)
    for rel in names:
        hpc.write(rel, files[rel] + b"v2\n")
    edited, deleted = hpc.data / DS / names[0], hpc.data / DS / names[1]
    real = faults.checkpoint

    def at_lock(name: str) -> None:
        if name == "locked":
            edited.write_bytes(b"edited after the scan\n")
            deleted.unlink()
        real(name)

    monkeypatch.setattr(faults, "checkpoint", at_lock)
    r = tether("push", DS, "hpc", "-y", cwd=hpc.root)
    assert r.exit_code == 3, r.output
    assert f"{names[0]} changed locally while it was uploaded" in r.output  # the first of the two
    remote = _remote_tree(hpc)
    assert remote[names[0]] == files[names[0]] and remote[names[1]] == files[names[1]]
    assert all(remote[rel] == files[rel] + b"v2\n" for rel in names[2:])
    monkeypatch.setattr(faults, "checkpoint", real)
    r = tether("push", DS, "hpc", "-y", "--mode", "mirror", cwd=hpc.root)
    assert r.exit_code == 0, r.output
    assert _remote_tree(hpc) == {rel: (hpc.data / DS / rel).read_bytes() for rel in names[:1] + names[2:]}
    _no_temp_files(hpc.remote_dir)


def test_first_push_learns_digests_from_what_it_sends(
    hpc: WorkspaceFixture, tether: Callable[..., Result]
) -> None:
    """New files, small and large, are hashed as they are sent (read once); the index, the base
    and the local hash cache get the real digests, so the next diff reads nothing."""
    files = _files(hpc, 30)
    files["big/stream.bin"] = hpc.write("big/stream.bin", os.urandom(3 * 1024 * 1024)).read_bytes()
    backdate(hpc.data / DS)
    r = tether("push", DS, "hpc", "-y", cwd=hpc.root)
    assert r.exit_code == 0, r.output
    expected = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    index = Manifest.loads((hpc.remote_dir / DS / ".tether" / "index").read_bytes())
    assert {e.path: e.digest for e in index.entries} == expected
    assert cached_digests(hpc) == expected
    assert tether("diff", DS, "hpc", cwd=hpc.root).exit_code == 0


def test_rewrite_with_restored_mtime_during_a_first_push_is_not_sent(
    hpc: WorkspaceFixture, tether: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender checks the scanned state of a small unhashed file (ctime included) before it
    reads it: a rewrite that kept size and mtime is refused (exit 3), and the rerun sends it."""
    files = _files(hpc, 6)
    target = hpc.data / DS / sorted(files)[0]
    stop = rewrite_at_checkpoint(monkeypatch, "locked", target)
    r = tether("push", DS, "hpc", "-y", cwd=hpc.root)
    assert r.exit_code == 3, r.output
    assert "changed locally after it was scanned" in r.output
    assert not (hpc.remote_dir / DS / sorted(files)[0]).exists()
    stop()
    assert tether("push", DS, "hpc", "-y", cwd=hpc.root).exit_code == 0
    assert (hpc.remote_dir / DS / sorted(files)[0]).read_bytes() == target.read_bytes()


# -- listings told against the index, shared masters, through the CLI ----------------------------
def test_cli_diff_sees_cluster_side_changes_through_the_index_copy(hpc: WorkspaceFixture, tether) -> None:
    _files(hpc, 30)
    assert tether("push", DS, "hpc", "-y", cwd=hpc.root).exit_code == 0
    copy = hpc.workspace().remote_index_path("hpc", DS)
    assert copy.read_bytes() == (hpc.remote_dir / DS / ".tether" / "index").read_bytes()
    assert tether("diff", DS, "hpc", cwd=hpc.root).exit_code == 0
    (hpc.remote_dir / DS / "d1" / "f001.txt").write_bytes(b"edited on the cluster\n")
    (hpc.remote_dir / DS / "d2" / "f002.txt").unlink()
    r = tether("diff", DS, "hpc", "--json", cwd=hpc.root)
    assert r.exit_code == 1, r.output
    statuses = {c["path"]: c["status"] for c in json.loads(r.stdout)["changes"]}
    assert statuses == {"d1/f001.txt": "modified_remote", "d2/f002.txt": "deleted_remote"}


def test_cli_runs_within_control_persist_log_in_once(tmp_path: Path, sshd: SshServer, tether) -> None:
    relay = Relay(sshd.port)  # a port of its own: a master no other test shares
    try:
        ws = make_workspace(tmp_path, "persist")
        config = sshd.client_config(tmp_path / "persist_config", port=relay.port)
        add_remote(ws.root, "hpc", f"ssh://{HOST}{ws.remote_dir}", sshd.options(config, control_persist=60))
        _files(ws, 10)
        before = sshd.auth_count()
        for args in (["diff", DS, "hpc"], ["push", DS, "hpc", "-y"], ["diff", DS, "hpc"]):
            r = tether(*args, cwd=ws.root)
            assert r.exit_code in (0, 1), r.output
        assert sshd.auth_count() - before == 1
        assert relay.connections == 1
        remote = open_remote(ws.workspace().remote("hpc"), workspace_root=ws.root)
        remote.conn.connect()
        remote.conn._stop_master()
        remote.close()
    finally:
        relay.drop()
        relay.close()


@pytest.mark.parametrize("value", ["-1", "true", '"60"'])
def test_a_bad_control_persist_is_a_config_error(hpc: WorkspaceFixture, tether, value: str) -> None:
    local = hpc.root / ".tether" / "config.local.toml"
    local.write_text(local.read_text().replace("control_persist = 0", f"control_persist = {value}"))
    r = tether("diff", DS, "hpc", cwd=hpc.root)
    assert r.exit_code == 2, r.output
    assert "option control_persist must be 0 or a number of seconds" in r.output


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("0", "option streams must be a positive integer"),
        ('"2"', "option streams must be a positive integer"),
        ("17", "option streams must be at most 16"),
    ],
)
def test_a_bad_streams_value_is_a_config_error(hpc: WorkspaceFixture, tether, value: str, words: str) -> None:
    toml = hpc.root / "tether.toml"
    toml.write_text(
        toml.read_text() + f'\n[remotes.bad]\nurl = "ssh://{HOST}{hpc.remote_dir}"\nstreams = {value}\n'
    )
    r = tether("push", DS, "bad", "-y", cwd=hpc.root)
    assert r.exit_code == 2, r.output
    assert words in r.output and "remote 'bad'" in r.output


def test_a_run_with_a_private_master_removes_folders_killed_runs_left(hpc: WorkspaceFixture, tether) -> None:
    """Through the CLI: a run killed with SIGKILL leaves its empty private master folder in /tmp;
    the next private-master run removes it once it is an hour old, keeps a young one, and leaves
    no folder of its own behind."""
    import time as _time

    from tether.remotes import ssh as ssh_mod

    tag = os.urandom(4).hex()
    stale = Path(f"/tmp/tether-ssh-stale{tag}")
    young = Path(f"/tmp/tether-ssh-young{tag}")
    try:
        for path in (stale, young):
            path.mkdir(mode=0o700)
        old = _time.time() - ssh_mod.STALE_PRIVATE_S - 60
        os.utime(stale, (old, old))
        before = {p.name for p in Path("/tmp").glob("tether-ssh-*")}
        _files(hpc, 2)
        r = tether("diff", DS, "hpc", cwd=hpc.root)
        assert r.exit_code == 1, r.output
        assert not stale.exists() and young.is_dir()
        after = {p.name for p in Path("/tmp").glob("tether-ssh-*")}
        assert after <= before - {stale.name}  # the run's own folder went with its master
    finally:
        for path in (stale, young):
            with contextlib.suppress(OSError):
                path.rmdir()


def test_the_helper_flushes_behind_what_it_receives_and_before_the_index(
    hpc: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a one-byte step the helper that received the files flushed in the background, and
    the flush the index waits for came after those."""
    monkeypatch.setattr(fileio, "FLUSH_BEHIND_BYTES", 1)
    seen: list[int] = []
    real_flush = SshRemote.flush

    def flush(self: SshRemote) -> None:
        real_flush(self)
        seen.append(self.flushed_behind)

    monkeypatch.setattr(SshRemote, "flush", flush)
    for i in range(12):
        hpc.write(f"d{i % 3}/f{i}.bin", os.urandom(1000 + i))
    r = tether("push", "ns/ds", "hpc", "-y", cwd=hpc.root)
    assert r.exit_code == 0, r.output
    assert seen and seen[-1] >= 1, seen


def test_a_remote_index_that_cannot_be_read_stops_the_diff_with_its_path(
    hpc: WorkspaceFixture, tether, sshd: SshServer
) -> None:
    """The helper reads the index on a thread beside its walk; an index it cannot read (a
    folder in its place) must still stop the listing, never be taken for 'vouches for nothing'."""
    _files(hpc, 6)
    assert tether("push", DS, "hpc", "-y", cwd=hpc.root).exit_code == 0
    index = hpc.remote_dir / DS / ".tether" / "index"
    index.unlink()
    index.mkdir()
    r = tether("diff", DS, "hpc", cwd=hpc.root)
    _clean_error(r, ExitCode.TRANSFER_FAILED, ".tether/index")


def test_a_push_whose_lock_was_taken_over_stops_before_the_index_with_exit_6(
    hpc: WorkspaceFixture, tether: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over SSH the helper checks the lock and writes the index in one request: a lock someone
    else took during the upload leaves the index untouched, and the run exits 6 naming them."""
    hpc.write("a.txt", "alpha")
    assert tether("push", "ns/ds", "hpc", "-y", cwd=hpc.root).exit_code == 0
    index = hpc.remote_dir / "ns/ds/.tether/index"
    before = index.read_bytes()
    lock = hpc.remote_dir / "ns/ds/.tether/lock"

    def checkpoint(name: str) -> None:
        if name == "before_index":  # someone ran `tether lock break --force` and took it
            record = json.loads(lock.read_bytes())
            lock.write_text(json.dumps({**record, "token": "d" * 32, "host": "another-laptop"}))

    monkeypatch.setattr(faults, "checkpoint", checkpoint)
    hpc.write("b.txt", "beta")
    r = tether("push", "ns/ds", "hpc", "-y", cwd=hpc.root)
    assert r.exit_code == ExitCode.LOCKED, r.output
    assert "another-laptop" in r.stderr and "the index was not updated" in r.stderr
    assert index.read_bytes() == before
    assert json.loads(lock.read_bytes())["host"] == "another-laptop"  # their lock is left alone
