"""How a pull promotes what it staged: one rename of the whole tree into an empty dataset
folder, file by file otherwise; and a plan that went stale before the lock is refused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import tether
from conftest import WorkspaceFixture
from tether import transfer
from tether.errors import StalePlanError
from tether.manifest import Entry
from tether.plan import Action, Change, Status
from tether.remotes import LocalRemote
from tether.transfer import pull_changes


def _remote_with(tmp_path: Path, files: dict[str, bytes]) -> tuple[LocalRemote, list[Change]]:
    root = tmp_path / "remote"
    changes = []
    for rel, data in files.items():
        path = root / "ds" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        st = path.stat()
        entry = Entry(rel, st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest())
        changes.append(Change(rel, Status.REMOTE_ONLY, Action.DOWNLOAD, None, entry, None, "new"))
    return LocalRemote(str(root), root), changes


FILES = {"records.parquet": b"p" * 100, "_derived/a.bin": b"a" * 10, "_derived/deep/b.bin": b"b"}


def test_into_an_empty_folder_the_staged_tree_is_renamed_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote, changes = _remote_with(tmp_path, FILES)
    local, staging = tmp_path / "local", tmp_path / "staging"
    local.mkdir()
    staged_inode: list[int] = []
    real = transfer.rename_onto_empty

    def spy(folder: str, empty: str) -> bool:
        staged_inode.append(os.stat(folder).st_ino)
        return real(folder, empty)

    monkeypatch.setattr(transfer, "rename_onto_empty", spy)
    result = pull_changes(remote, "ds", local, staging, changes, jobs=1)
    assert not result.failed
    assert local.stat().st_ino == staged_inode[0]  # the staging folder itself became the dataset
    assert not staging.exists()
    assert {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()} == FILES
    landed = list(transfer.landed_states(str(local), FILES, result.promoted_at_ns))
    assert sorted(st.path for st in landed) == sorted(FILES)  # none changed since its promotion
    for st in landed:  # what the hash cache learns is the file as it is now
        now = os.stat(local / st.path)
        assert (st.inode, st.size, st.mtime_ns, st.ctime_ns) == (
            now.st_ino,
            now.st_size,
            now.st_mtime_ns,
            now.st_ctime_ns,
        )


def test_a_leftover_staged_file_outside_the_plan_is_never_promoted(tmp_path: Path) -> None:
    remote, changes = _remote_with(tmp_path, FILES)
    local, staging = tmp_path / "local", tmp_path / "staging"
    local.mkdir()
    (staging / "_derived").mkdir(parents=True)
    (staging / "_derived/old.bin").write_bytes(b"from an earlier plan")
    result = pull_changes(remote, "ds", local, staging, changes, jobs=1)
    assert not result.failed
    assert not (local / "_derived/old.bin").exists()
    assert {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()} == set(FILES)


def test_into_a_folder_with_other_files_each_file_is_moved(tmp_path: Path) -> None:
    remote, changes = _remote_with(tmp_path, FILES)
    local, staging = tmp_path / "local", tmp_path / "staging"
    local.mkdir()
    (local / "notes.md").write_text("git owns this")  # say, a tracked file tether leaves alone
    result = pull_changes(remote, "ds", local, staging, changes, jobs=1)
    assert not result.failed
    assert (local / "notes.md").read_text() == "git owns this"
    assert all((local / rel).read_bytes() == data for rel, data in FILES.items())


def test_a_file_that_appears_in_a_new_folder_during_the_pull_is_not_overwritten(tmp_path: Path) -> None:
    """The re-check before promotion looks at each folder once: a planned-absent file whose
    folder did not exist is still absent, unless the folder appeared meanwhile (a job writing
    there during the download): then the file in it is found and the pull refused."""
    remote, changes = _remote_with(tmp_path, FILES)
    local, staging = tmp_path / "local", tmp_path / "staging"
    local.mkdir()

    class Intruding(LocalRemote):
        def get_file(self, path: str, dest: Path, **kw: object) -> None:  # type: ignore[override]
            (local / "_derived/deep").mkdir(parents=True, exist_ok=True)
            (local / "_derived/deep/b.bin").write_bytes(b"a job wrote this")
            return super().get_file(path, dest, **kw)  # type: ignore[arg-type]

    with pytest.raises(StalePlanError, match=r"_derived/deep/b\.bin"):
        pull_changes(Intruding(remote.url, remote.root), "ds", local, staging, changes, jobs=1)
    assert (local / "_derived/deep/b.bin").read_bytes() == b"a job wrote this"
    assert not (local / "records.parquet").exists()  # nothing was promoted


# -- the plan is checked again under the lock -------------------------------------------------


def _change_the_remote(ws: WorkspaceFixture) -> None:
    target = ws.remote_file("a.txt")
    target.write_text("edited on the remote after the plan")


def test_pull_refuses_when_the_remote_changed_after_the_plan(
    ws: WorkspaceFixture, ws2: WorkspaceFixture
) -> None:
    ws.write("a.txt", "A")
    ws.write("b.txt", "B")
    tether.push("ns/ds", "store", workspace=ws.root)
    ws.write("b.txt", "B2")
    tether.push("ns/ds", "store", workspace=ws.root)

    def meanwhile(plan: object) -> bool:
        _change_the_remote(ws)  # another writer, between the plan and the lock
        return True

    with pytest.raises(StalePlanError, match="changed after the plan") as info:
        tether.pull("ns/ds", "store", workspace=ws2.root, confirm=meanwhile)
    assert info.value.exit_code == 3
    assert not (ws2.data / "ns/ds").exists() or list((ws2.data / "ns/ds").iterdir()) == []
    result = tether.pull("ns/ds", "store", workspace=ws2.root)  # the rerun plans afresh
    assert result.state == "transferred"
    assert (ws2.data / "ns/ds/a.txt").read_text() == "edited on the remote after the plan"


def test_push_refuses_when_the_remote_changed_after_the_plan(ws: WorkspaceFixture) -> None:
    ws.write("a.txt", "A")
    tether.push("ns/ds", "store", workspace=ws.root)
    ws.write("c.txt", "C")

    def meanwhile(plan: object) -> bool:
        _change_the_remote(ws)
        return True

    with pytest.raises(StalePlanError, match="changed after the plan"):
        tether.push("ns/ds", "store", workspace=ws.root, confirm=meanwhile)
    assert not ws.remote_file("c.txt").exists()
    assert ws.remote_file("a.txt").read_text() == "edited on the remote after the plan"
