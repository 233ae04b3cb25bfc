"""The Python API: the same operations as the CLI, returning plan and result objects."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import tether
from conftest import WorkspaceFixture, make_workspace
from tether import sync
from tether.errors import (
    DatasetNotFound,
    Interrupted,
    InvalidPath,
    RefusedError,
    RemoteUnavailable,
    UnknownRemote,
    WorkspaceNotFound,
)
from tether.plan import Plan
from tether.progress import Progress
from tether.remotes.local import LocalRemote


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run API calls from a folder outside any workspace (a notebook's cwd)."""
    folder = tmp_path / "notebook"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def test_public_names() -> None:
    for name in ("diff", "push", "pull", "Mode", "Status", "Action", "Side", "TetherError", "ExitCode"):
        assert hasattr(tether, name), name
    assert tether.Mode("mirror") is tether.Mode.MIRROR
    assert tether.Status.CONFLICT == "conflict"
    assert int(tether.ExitCode.REFUSED) == 3
    assert tether.__version__


def test_diff_returns_plans_in_both_directions(ws: WorkspaceFixture, elsewhere: Path) -> None:
    ws.write("a.txt", "AA")
    ws.write("sub/b.txt", "B")
    result = tether.diff("ns/ds", "store", workspace=ws.root)
    assert isinstance(result, tether.DiffResult)
    assert result.dataset.id == "ns/ds"
    assert result.dataset.path == ws.data / "ns/ds"
    assert result.remote_name == "store"
    assert not result.in_sync
    assert result.local_exists and not result.remote_exists
    assert isinstance(result.push, tether.Plan) and isinstance(result.pull, tether.Plan)
    assert result.push.direction is tether.Direction.PUSH
    assert result.pull.direction is tether.Direction.PULL
    assert {c.path: c.status for c in result.push.changes} == {
        "a.txt": tether.Status.LOCAL_ONLY,
        "sub/b.txt": tether.Status.LOCAL_ONLY,
    }
    assert {c.action for c in result.push.changes} == {tether.Action.UPLOAD}
    assert {c.action for c in result.pull.changes} == {tether.Action.SKIP}
    assert result.push.action_bytes() == {"upload": 3}
    change = result.push.changes[0]
    assert change.local is not None and change.local.size == 2
    assert change.remote is None
    assert change.reason
    assert list(ws.remote_dir.iterdir()) == []  # diff changed nothing


def test_diff_accepts_a_workspace_object_and_mode(ws: WorkspaceFixture, elsewhere: Path) -> None:
    ws.write("a.txt", "A")
    tether.push("ns/ds", "store", workspace=ws.root)
    (ws.data / "ns/ds/a.txt").unlink()
    ws.write("b.txt", "B")
    result = tether.diff("ns/ds", "store", workspace=tether.Workspace(ws.root), mode=tether.Mode.MIRROR)
    actions = {c.path: c.action for c in result.push.changes}
    assert actions == {"a.txt": tether.Action.DELETE_REMOTE, "b.txt": tether.Action.UPLOAD}


def test_push_and_pull_return_sync_results(ws: WorkspaceFixture, ws2: WorkspaceFixture, elsewhere) -> None:
    ws.write("a.txt", "AAA")
    ws.write("b.txt", "B")
    seen: list[Plan] = []

    def confirm(plan: Plan) -> bool:
        seen.append(plan)
        return True

    result = tether.push("ns/ds", "store", workspace=ws.root, confirm=confirm)
    assert isinstance(result, tether.SyncResult)
    assert result.state == "transferred"
    assert result.record.state == "transferred"
    assert result.record.done == {"upload": 2}
    assert result.record.done_bytes == {"upload": 4}
    assert result.record.bytes_transferred == 4
    assert result.verification is not None and result.verification.ok
    assert result.plan is seen[0]
    assert [c.path for c in result.plan.transfers] == ["a.txt", "b.txt"]
    assert ws.remote_file("a.txt").read_text() == "AAA"

    pulled = tether.pull("ns/ds", "store", workspace=ws2.root)
    assert pulled.state == "transferred"
    assert pulled.record.done == {"download": 2}
    assert (ws2.data / "ns/ds/b.txt").read_text() == "B"

    again = tether.pull("ns/ds", "store", workspace=ws2.root)
    assert again.state == "no-op"
    assert again.record.unchanged == 2
    assert not again.plan.has_work


def test_dry_run_and_string_options(ws: WorkspaceFixture, elsewhere: Path) -> None:
    ws.write("a.txt", "A")
    result = tether.push("ns/ds", "store", workspace=ws.root, dry_run=True, mode="new", max_delete="10")
    assert result.state == "dry-run"
    assert result.plan.options.mode is tether.Mode.NEW
    assert list(ws.remote_dir.iterdir()) == []


def test_prefer_resolves_a_conflict(ws: WorkspaceFixture, ws2: WorkspaceFixture, elsewhere: Path) -> None:
    ws.write("a.txt", "base")
    tether.push("ns/ds", "store", workspace=ws.root)
    tether.pull("ns/ds", "store", workspace=ws2.root)
    ws2.write("a.txt", "theirs")
    tether.push("ns/ds", "store", workspace=ws2.root)
    ws.write("a.txt", "mine")
    with pytest.raises(RefusedError) as info:
        tether.push("ns/ds", "store", workspace=ws.root)
    assert info.value.exit_code == tether.ExitCode.REFUSED == 3
    assert info.value.paths == ["a.txt"]
    assert "--prefer" in info.value.hint
    assert tether.diff("ns/ds", "store", workspace=ws.root).push.changes[0].status is tether.Status.CONFLICT
    result = tether.push("ns/ds", "store", workspace=ws.root, prefer=tether.Side.LOCAL)
    assert result.record.done == {"upload": 1}
    assert ws.remote_file("a.txt").read_text() == "mine"


def test_declining_raises_interrupted_and_changes_nothing(ws: WorkspaceFixture, elsewhere: Path) -> None:
    ws.write("a.txt", "A")
    with pytest.raises(Interrupted) as info:
        tether.push("ns/ds", "store", workspace=ws.root, confirm=lambda plan: False)
    assert isinstance(info.value, tether.TetherError)
    assert info.value.exit_code == 130
    assert "Declined" in info.value.message
    assert info.value.hint
    assert list(ws.remote_dir.iterdir()) == []
    audit = ws.root / ".tether/audit.jsonl"
    assert not audit.exists() or '"transferred"' not in audit.read_text()


def test_declining_a_pull_changes_nothing(ws: WorkspaceFixture, ws2: WorkspaceFixture, elsewhere) -> None:
    ws.write("a.txt", "A")
    tether.push("ns/ds", "store", workspace=ws.root)
    with pytest.raises(Interrupted) as info:
        tether.pull("ns/ds", "store", workspace=ws2.root, confirm=lambda plan: False)
    assert info.value.exit_code == 130
    assert not (ws2.data / "ns/ds/a.txt").exists()


def test_no_confirm_call_when_nothing_to_do(ws: WorkspaceFixture, elsewhere: Path) -> None:
    ws.write("a.txt", "A")
    tether.push("ns/ds", "store", workspace=ws.root)

    def never(plan: Plan) -> bool:
        raise AssertionError("confirm must not be called for a no-op")

    assert tether.push("ns/ds", "store", workspace=ws.root, confirm=never).state == "no-op"


def test_progress_callback_object(ws: WorkspaceFixture, elsewhere: Path) -> None:
    ws.write("a.txt", "A" * 1000)
    os.symlink("a.txt", ws.data / "ns/ds/link")

    class Recorder(Progress):
        def __init__(self) -> None:
            self.stages: list[str] = []
            self.bytes = 0
            self.messages: list[str] = []

        def stage(self, name: str, *, files: int | None = None, bytes: int | None = None) -> None:
            self.stages.append(name)

        def advance(self, *, files: int = 0, bytes: int = 0) -> None:
            self.bytes += bytes

        def message(self, text: str) -> None:
            self.messages.append(text)

    rec = Recorder()
    tether.push("ns/ds", "store", workspace=ws.root, progress=rec, skip_symlinks=True)
    assert "uploading" in rec.stages
    assert rec.bytes >= 1000
    assert any("link" in m for m in rec.messages)


@pytest.mark.parametrize(
    ("call", "error", "builtin", "code", "hint_word"),
    [
        (lambda ws: tether.diff("ns/ds", "nope", workspace=ws.root), UnknownRemote, KeyError, 2, "remote"),
        (
            lambda ws: tether.diff("ns/typo", "store", workspace=ws.root),
            DatasetNotFound,
            FileNotFoundError,
            2,
            "ls",
        ),
        (lambda ws: tether.push("a//b", "store", workspace=ws.root), InvalidPath, ValueError, 2, "namespace"),
        (
            lambda ws: tether.push("ns/ds", "gone", workspace=ws.root),
            RemoteUnavailable,
            ConnectionError,
            5,
            "mount",
        ),
    ],
)
def test_errors_are_tether_errors_with_exit_code_and_hint(
    ws: WorkspaceFixture, elsewhere: Path, tmp_path: Path, call, error, builtin, code: int, hint_word: str
) -> None:
    ws.write("a.txt", "A")
    (ws.root / ".tether/config.local.toml").write_text(f'[remotes.gone]\nurl = "{tmp_path / "missing"}"\n')
    with pytest.raises(error) as info:
        call(ws)
    exc = info.value
    assert isinstance(exc, tether.TetherError)
    assert isinstance(exc, builtin)  # catchable without knowing tether's types
    assert exc.exit_code == code
    assert hint_word in exc.hint
    assert str(exc) == exc.message


def test_workspace_not_found(tmp_path: Path, elsewhere: Path) -> None:
    with pytest.raises(WorkspaceNotFound) as info:
        tether.diff("ns/ds", "store", workspace=tmp_path / "nowhere")
    assert info.value.exit_code == 2
    assert "tether init" in info.value.hint
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(WorkspaceNotFound):
        tether.push("ns/ds", "store")  # no workspace=: discovered from the cwd, which has none


def test_workspace_discovered_from_cwd(ws: WorkspaceFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    ws.write("a.txt", "A")
    monkeypatch.chdir(ws.data / "ns")
    assert tether.push("ns/ds", "store").state == "transferred"


def test_two_workspaces_are_independent(tmp_path: Path, elsewhere: Path) -> None:
    a = make_workspace(tmp_path, "a", tmp_path / "shared")
    b = make_workspace(tmp_path, "b", tmp_path / "shared")
    a.write("x.txt", "from a")
    b.write("y.txt", "from b")
    tether.push("ns/ds", "store", workspace=a.root)
    tether.push("ns/ds", "store", workspace=b.root)
    tether.pull("ns/ds", "store", workspace=a.root)
    assert (a.data / "ns/ds/y.txt").read_text() == "from b"


def test_id_is_not_shadowed_by_a_folder_in_the_cwd(ws: WorkspaceFixture, elsewhere: Path) -> None:
    ws.write("a.txt", "A")
    (elsewhere / "ns" / "ds").mkdir(parents=True)
    (elsewhere / "ns" / "ds" / "unrelated.txt").write_text("not the dataset")
    result = tether.diff("ns/ds", "store", workspace=ws.root)
    assert result.dataset.path == ws.data / "ns/ds"
    assert result.dataset.id == "ns/ds"


# -- the remote's check runs beside the local walk -----------------------------------------------
def test_the_remote_is_checked_while_the_local_tree_is_walked(
    ws: WorkspaceFixture, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logging in to a cluster and walking 20,000 local files each take about half a second:
    the check must not wait for the walk, nor the walk for the check."""
    import threading

    import tether.sync as sync_module

    ws.write("a.txt", "A")
    walking = threading.Event()
    real_check, real_scan = LocalRemote.check, sync_module.scan_tree

    def check_during_walk(self) -> None:  # type: ignore[no-untyped-def]
        assert walking.wait(timeout=30), "the check waited for the walk to end"
        real_check(self)

    def walk(*args, **kwargs):  # type: ignore[no-untyped-def]
        walking.set()
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(LocalRemote, "check", check_during_walk)
    monkeypatch.setattr(sync_module, "scan_tree", walk)
    assert tether.push("ns/ds", "store", workspace=ws.root).state == "transferred"
    assert tether.diff("ns/ds", "store", workspace=ws.root).in_sync


def test_an_unreachable_remote_is_reported_before_anything_is_hashed(
    ws: WorkspaceFixture, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tether.hashing as hashing_module

    ws.write("a.txt", "A")
    ws.remote_dir.rmdir()  # an unmounted share, say

    def never(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a file was read before the remote's check failed")

    monkeypatch.setattr(hashing_module, "digest_file_stat", never)
    for call in (tether.diff, tether.push, tether.pull):
        with pytest.raises(RemoteUnavailable, match="does not exist") as info:
            call("ns/ds", "store", workspace=ws.root)
        assert info.value.exit_code == 5


def test_the_hash_cache_is_consulted_while_the_remote_is_still_being_checked(
    ws: WorkspaceFixture, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A no-op diff reads no file: its cache lookup need not wait for a slow login. The check
    here cannot end until the lookup ran (bounded: on code that waits, it fails after 30 s)."""
    import threading

    from tether.hashing import HashCache

    ws.write("a.txt", "A")
    assert tether.push("ns/ds", "store", workspace=ws.root).state == "transferred"
    looked_up = threading.Event()
    real_get_many, real_check = HashCache.get_many, LocalRemote.check

    def get_many(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        looked_up.set()
        return real_get_many(self, *args, **kwargs)

    def slow_check(self):  # type: ignore[no-untyped-def]
        assert looked_up.wait(30), "the cache lookup waited for the remote's check"
        real_check(self)

    monkeypatch.setattr(HashCache, "get_many", get_many)
    monkeypatch.setattr(LocalRemote, "check", slow_check)
    assert tether.diff("ns/ds", "store", workspace=ws.root).in_sync


def test_a_remote_whose_login_may_prompt_is_checked_before_the_walk(
    ws: WorkspaceFixture, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password or 2FA prompt must not share the terminal with the scan's progress."""
    import dataclasses
    import threading

    import tether.sync as sync_module

    ws.write("a.txt", "A")
    walking = threading.Event()
    checked_while_walking: list[tuple[bool, bool]] = []
    real_init, real_check, real_scan = (
        LocalRemote.__init__,
        LocalRemote.check,
        sync_module.scan_tree,
    )

    def prompting(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        real_init(self, *args, **kwargs)
        self.capabilities = dataclasses.replace(self.capabilities, login_may_prompt=True)

    def check(self) -> None:  # type: ignore[no-untyped-def]
        # (walking already?, in the caller's own thread?)
        in_caller = threading.current_thread() is threading.main_thread()
        checked_while_walking.append((walking.is_set(), in_caller))
        real_check(self)

    def walk(*args, **kwargs):  # type: ignore[no-untyped-def]
        walking.set()
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(LocalRemote, "__init__", prompting)
    monkeypatch.setattr(LocalRemote, "check", check)
    monkeypatch.setattr(sync_module, "scan_tree", walk)
    assert tether.push("ns/ds", "store", workspace=ws.root).state == "transferred"
    assert checked_while_walking == [(False, True)]


class _Closing:
    """A backend that remembers which thread closed it, and may fail to close."""

    def __init__(self, error: Exception | None = None) -> None:
        self.closed_by: list[str] = []
        self.error = error

    def close(self) -> None:
        self.closed_by.append(threading.current_thread().name)
        if self.error is not None:
            raise self.error


def test_a_run_done_with_its_remote_closes_it_meanwhile_and_close_waits() -> None:
    """close_soon (after the lock is released) closes the remote in a thread while the run
    writes its audit record; close() then waits for it, closes nothing twice, and raises what
    the background close raised."""
    for error in (None, OSError("ssh -O exit failed")):
        backend = _Closing(error)
        ctx = sync.Context(None, None, "hpc", backend)  # type: ignore[arg-type]
        ctx.close_soon()
        ctx.close_soon()
        if error is None:
            ctx.close()
        else:
            with pytest.raises(OSError, match="ssh -O exit failed"):
                ctx.close()
        assert backend.closed_by == ["tether-close"]


@pytest.fixture
def closes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The thread that closed each local remote, from now on."""
    seen: list[str] = []
    real = LocalRemote.close

    def counting(self: LocalRemote) -> None:
        seen.append(threading.current_thread().name)
        real(self)

    monkeypatch.setattr(LocalRemote, "close", counting)
    return seen


def test_a_push_and_a_diff_close_their_remote_once_in_the_background(
    ws: WorkspaceFixture, closes: list[str]
) -> None:
    """A push once its lock is released, a diff once it has listed: the remote closes while the
    run writes its audit record or makes its plan."""
    ws.write("a.txt", "alpha")
    tether.push("ns/ds", "store", workspace=ws.root, confirm=lambda plan: True)
    assert closes == ["tether-close"]
    assert tether.diff("ns/ds", "store", workspace=ws.root).in_sync
    assert closes == ["tether-close"] * 2
