"""End-to-end CLI tests of diff / push / pull: behaviour, safety rules, exit codes, audit.

``ws`` and ``ws2`` are two workspaces (two laptops) sharing the local-path remote ``store``.
stdin is not a terminal here, so a plan that overwrites or deletes needs ``-y``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import Result, WorkspaceFixture
from tether.errors import ExitCode
from tether.remotes.local import LocalRemote

OLD_MTIME_NS = 1_000_000_000_123_456_789  # 2001-09-09, with a sub-second part


def run(tether, command: str, ws: WorkspaceFixture, *args: str, target: str = "ns/ds") -> Result:
    return tether(command, target, "store", *args, cwd=ws.root)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``root`` (tether's state included): content and mtime."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def data_files(root: Path) -> dict[str, bytes]:
    """Data files below a dataset folder (local or remote), without tether's state."""
    return {k: v[0] for k, v in tree(root).items() if ".tether" not in k.split("/")}


def audit_lines(ws: WorkspaceFixture) -> list[dict]:
    path = ws.root / ".tether/audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def diff_data(tether, ws: WorkspaceFixture, *args: str, target: str = "ns/ds") -> dict:
    r = tether("diff", target, "store", "--json", *args, cwd=ws.root)
    assert r.exit_code in (0, 1), r.output
    return json.loads(r.stdout)


def statuses(data: dict) -> dict[str, str]:
    return {c["path"]: c["status"] for c in data["changes"]}


@pytest.fixture
def synced(ws: WorkspaceFixture, ws2: WorkspaceFixture, tether) -> tuple[WorkspaceFixture, WorkspaceFixture]:
    """ws pushed a.txt, b.txt, sub/c.txt, d.txt; ws2 pulled them: all three copies agree."""
    for name in ("a.txt", "b.txt", "sub/c.txt", "d.txt"):
        ws.write(name, f"content of {name}\n")
    ok(run(tether, "push", ws))
    ok(run(tether, "pull", ws2))
    return ws, ws2


# -- diff ------------------------------------------------------------------------------------------
def test_diff_exit_1_with_differences_0_in_sync(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    r = run(tether, "diff", ws)
    assert r.exit_code == 1, r.output
    assert "push would: 1 upload" in r.stdout
    assert "a.txt" in r.stdout
    ok(run(tether, "push", ws))
    r = run(tether, "diff", ws)
    assert r.exit_code == 0, r.output
    assert "In sync" in r.stdout
    assert "1 files" in r.stdout


def test_diff_changes_nothing(ws: WorkspaceFixture, ws2: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    ok(run(tether, "push", ws))
    ws.write("a.txt", "changed")
    ws.write("new.txt", "N")
    remote_before = tree(ws.remote_dir)
    local_before = tree(ws.data)
    assert run(tether, "diff", ws).exit_code == 1
    assert run(tether, "diff", ws2).exit_code == 1
    assert tree(ws.remote_dir) == remote_before
    assert tree(ws.data) == local_before
    assert not (ws2.data / "ns/ds").exists()


def test_diff_json_contract(synced, tether) -> None:
    ws, ws2 = synced
    ws.write("a.txt", "edited here\n")  # modified_local
    (ws.data / "ns/ds/b.txt").unlink()  # deleted_local
    ws.write("new.txt", "brand new\n")  # local_only
    ws2.write("sub/c.txt", "edited there\n")  # modified_remote
    ws2.write("theirs.txt", "theirs\n")  # remote_only
    ok(run(tether, "push", ws2, "-y"))
    r = run(tether, "diff", ws, "--json")
    assert r.exit_code == 1, r.output
    data = json.loads(r.stdout)  # the whole of stdout is ONE JSON object
    assert r.stderr == ""
    assert {"dataset", "remote", "direction", "summary", "changes"} <= set(data)
    assert data["dataset"] == "ns/ds"
    assert data["remote"] == "store"
    assert data["direction"] == "both"
    assert statuses(data) == {
        "a.txt": "modified_local",
        "b.txt": "deleted_local",
        "new.txt": "local_only",
        "sub/c.txt": "modified_remote",
        "theirs.txt": "remote_only",
    }
    summary = data["summary"]
    assert summary["status"] == {
        "deleted_local": 1,
        "local_only": 1,
        "modified_local": 1,
        "modified_remote": 1,
        "remote_only": 1,
        "unchanged": 1,
    }
    assert summary["action"]["push"] == {"upload": 2, "skip": 2, "refuse": 1, "none": 1}
    assert summary["action"]["pull"] == {"download": 2, "skip": 2, "refuse": 1, "none": 1}
    assert summary["bytes"]["push"] == {"upload": len("edited here\n") + len("brand new\n")}
    assert summary["bytes"]["pull"] == {"download": len("edited there\n") + len("theirs\n")}
    by_path = {c["path"]: c for c in data["changes"]}
    for change in data["changes"]:
        assert set(change) == {"path", "status", "action", "local", "remote", "reason"}
        assert change["reason"]
    new = by_path["new.txt"]
    assert new["local"] == {"size": len("brand new\n"), "digest": sha("brand new\n")}
    assert new["remote"] is None
    assert new["action"] == {"push": "upload", "pull": "skip"}
    theirs = by_path["theirs.txt"]
    assert theirs["local"] is None
    assert theirs["remote"] == {"size": len("theirs\n"), "digest": sha("theirs\n")}
    assert theirs["action"] == {"push": "skip", "pull": "download"}
    gone = by_path["b.txt"]
    assert gone["local"] is None
    assert gone["remote"]["digest"] == sha("content of b.txt\n")
    edited = by_path["a.txt"]
    assert edited["local"]["digest"] == sha("edited here\n")
    assert edited["remote"]["digest"] == sha("content of a.txt\n")
    assert edited["action"] == {"push": "upload", "pull": "refuse"}
    assert by_path["sub/c.txt"]["action"] == {"push": "refuse", "pull": "download"}


def test_diff_json_in_sync(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    ok(run(tether, "push", ws))
    r = run(tether, "diff", ws, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["changes"] == []
    assert data["summary"]["status"] == {"unchanged": 1}


def test_diff_against_remote_without_copy_is_all_local_only(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    ws.write("sub/b.txt", "BB")
    data = diff_data(tether, ws)
    assert statuses(data) == {"a.txt": "local_only", "sub/b.txt": "local_only"}
    assert data["summary"]["action"]["push"] == {"upload": 2}
    assert data["summary"]["bytes"]["push"] == {"upload": 3}
    assert all(c["remote"] is None for c in data["changes"])


@pytest.mark.parametrize("command", ["diff", "pull"])
def test_dataset_that_exists_nowhere_exit_2_naming_both_places(
    ws: WorkspaceFixture, tether, command: str
) -> None:
    r = run(tether, command, ws, target="ns/typo")
    assert r.exit_code == 2, r.output
    assert "ns/typo" in r.stderr
    assert str(ws.data / "ns/typo") in r.stderr  # the local place
    assert f"{ws.remote_dir}/ns/typo" in r.stderr  # the remote place
    assert "tether ls" in r.stderr
    assert not (ws.data / "ns/typo").exists()
    assert not (ws.remote_dir / "ns/typo").exists()


def test_push_of_missing_local_dataset_exit_2(ws: WorkspaceFixture, tether) -> None:
    r = run(tether, "push", ws, target="ns/typo")
    assert r.exit_code == 2, r.output
    assert "no local dataset 'ns/typo'" in r.stderr
    assert not (ws.remote_dir / "ns/typo").exists()


@pytest.mark.parametrize("fork_min", ["1", "100000"], ids=["forked", "threads"])
def test_a_file_failing_with_an_io_error_is_exit_7_and_the_rest_is_kept(
    ws: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch, fork_min: str
) -> None:
    """A failing disk under one file: the run says which file and exits 7 (rerun), the other
    files are on the remote and verified, and the rerun sends only the one that failed."""
    monkeypatch.setenv("TETHER_FORK_MIN_FILES", fork_min)
    for name in ("a.txt", "b.txt", "c.txt"):
        ws.write(name, f"content of {name}")
    real = {name: getattr(LocalRemote, name) for name in ("put_file", "put_file_hashing")}

    def eio_on_b(name: str) -> Any:
        def put(self: LocalRemote, source: Path, path: str, **kwargs: Any) -> Any:
            if path.endswith("/b.txt"):
                raise OSError(errno.EIO, "Input/output error", str(source))
            return real[name](self, source, path, **kwargs)

        return put

    for name in real:
        monkeypatch.setattr(LocalRemote, name, eio_on_b(name))
    r = run(tether, "push", ws, "-y")
    assert r.exit_code == ExitCode.TRANSFER_FAILED == 7, r.output
    assert "1 file(s) failed, first: b.txt: [Errno 5] Input/output error" in r.stderr
    assert "Rerun" in r.stderr and "Traceback" not in r.output
    assert ws.remote_file("a.txt").read_text() == "content of a.txt"
    assert ws.remote_file("c.txt").read_text() == "content of c.txt"
    assert not ws.remote_file("b.txt").exists()

    monkeypatch.undo()
    again = ok(run(tether, "push", ws, "-y"))
    assert "1 uploaded" in again.stdout, again.output
    assert ws.remote_file("b.txt").read_text() == "content of b.txt"
    ok(run(tether, "diff", ws))


def test_unknown_remote_lists_known_ones(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    for command in ("diff", "push", "pull"):
        r = tether(command, "ns/ds", "nope", cwd=ws.root)
        assert r.exit_code == 2, r.output
        assert "unknown remote 'nope'" in r.stderr
        assert "known: store" in r.stderr
        assert "tether remote add" in r.stderr


def test_bad_remote_name_argument(ws: WorkspaceFixture, tether) -> None:
    r = tether("push", "ns/ds", "../evil", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "not allowed" in r.stderr


def test_bad_mode_is_usage_error(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    r = run(tether, "push", ws, "--mode", "sideways")
    assert r.exit_code == 2, r.output
    assert "sideways" in r.stderr


# -- push / pull round trip ------------------------------------------------------------------------
def test_round_trip_two_workspaces(ws: WorkspaceFixture, ws2: WorkspaceFixture, tether) -> None:
    payload = {
        "a.txt": b"alpha\n",
        "sub/deeper/b.bin": bytes(range(256)) * 40,
        "empty.dat": b"",
    }
    for rel, content in payload.items():
        path = ws.write(rel, content)
        os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    r = ok(run(tether, "push", ws))
    assert "Pushed ns/ds to store: 3 uploaded" in r.stdout
    assert "Verified (sha256): 3 file(s)" in r.stdout
    assert data_files(ws.remote_dir / "ns/ds") == payload
    assert (ws.remote_dir / "ns/ds/.tether/index").is_file()
    assert not (ws.remote_dir / "ns/ds/.tether/lock").exists()

    r = ok(run(tether, "pull", ws2))
    assert "Pulled ns/ds from store: 3 downloaded" in r.stdout
    assert data_files(ws2.data / "ns/ds") == payload
    for rel in payload:
        assert (ws.remote_dir / "ns/ds" / rel).stat().st_mtime_ns == OLD_MTIME_NS
        assert (ws2.data / "ns/ds" / rel).stat().st_mtime_ns == OLD_MTIME_NS
    staging = ws2.root / ".tether/staging"
    assert not staging.exists() or not any(p.is_file() for p in staging.rglob("*"))
    assert run(tether, "diff", ws).exit_code == 0
    assert run(tether, "diff", ws2).exit_code == 0


def test_second_pull_is_a_no_op_that_writes_nothing(synced, tether) -> None:
    _ws, ws2 = synced
    remote_before = tree(ws2.remote_dir)
    local_before = tree(ws2.data)
    r = ok(run(tether, "pull", ws2))
    assert "Already up to date" in r.stdout
    assert tree(ws2.remote_dir) == remote_before  # same files, bytes and mtimes
    assert not (ws2.remote_dir / "ns/ds/.tether/lock").exists()
    assert tree(ws2.data) == local_before
    record = audit_lines(ws2)[-1]
    assert record["operation"] == "pull"
    assert record["state"] == "no-op"
    assert record["files"] == {}
    assert record["unchanged"] == 4


def test_second_push_is_a_no_op(synced, tether) -> None:
    ws, _ = synced
    before = tree(ws.remote_dir)
    r = ok(run(tether, "push", ws))
    assert "Already up to date" in r.stdout
    assert tree(ws.remote_dir) == before
    assert audit_lines(ws)[-1]["state"] == "no-op"


def test_dry_run_changes_nothing(synced, tether) -> None:
    ws, ws2 = synced
    ws.write("a.txt", "local edit")
    ws.write("new.txt", "N")
    (ws.data / "ns/ds/b.txt").unlink()
    remote_before, local_before = tree(ws.remote_dir), tree(ws.data)
    audit_before = audit_lines(ws)
    r = ok(run(tether, "push", ws, "--dry-run", "--mode", "mirror"))
    assert "Dry run" in r.stdout
    assert "new.txt" in r.stdout
    assert tree(ws.remote_dir) == remote_before
    assert tree(ws.data) == local_before
    assert audit_lines(ws) == audit_before

    ws2.write("d.txt", "their edit")
    ws2_before = tree(ws2.data)
    r = ok(run(tether, "pull", ws, "--dry-run", "--prefer", "local"))
    assert tree(ws.data) == local_before
    assert tree(ws2.data) == ws2_before
    assert tree(ws.remote_dir) == remote_before

    r = ok(run(tether, "push", ws, "--dry-run", "--json"))
    data = json.loads(r.stdout)
    assert data["state"] == "dry-run"
    assert tree(ws.remote_dir) == remote_before


def test_push_json_contract(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "AAA")
    ws.write("b.txt", "B")
    r = ok(run(tether, "push", ws, "--json"))
    data = json.loads(r.stdout)  # one object, nothing else on stdout
    assert {"dataset", "remote", "direction", "state", "summary", "changes", "audit"} <= set(data)
    assert data["direction"] == "push"
    assert data["state"] == "transferred"
    assert data["summary"]["status"] == {"local_only": 2}
    assert data["summary"]["action"] == {"upload": 2}
    assert data["summary"]["bytes"] == {"upload": 4}
    assert {c["path"]: c["action"] for c in data["changes"]} == {"a.txt": "upload", "b.txt": "upload"}
    for c in data["changes"]:
        assert set(c) == {"path", "status", "action", "local", "remote", "reason"}
    assert data["audit"]["state"] == "transferred"
    assert data["audit"]["files"] == {"upload": 2}
    assert data["audit"]["bytes"] == {"upload": 4}
    assert data["audit"] == audit_lines(ws)[-1]
    r = ok(run(tether, "push", ws, "--json"))
    assert json.loads(r.stdout)["state"] == "no-op"


def test_json_error_leaves_stdout_empty(synced, tether) -> None:
    ws, ws2 = synced
    ws2.write("a.txt", "theirs")
    ok(run(tether, "push", ws2, "-y"))
    ws.write("a.txt", "mine")
    r = run(tether, "push", ws, "--json")
    assert r.exit_code == 3, r.output
    assert r.stdout == ""
    assert "a.txt" in r.stderr


# -- modes -----------------------------------------------------------------------------------------
def test_push_mode_new_only_creates_missing(synced, tether) -> None:
    ws, _ = synced
    ws.write("a.txt", "changed locally")
    ws.write("fresh.txt", "F")
    r = ok(run(tether, "push", ws, "--mode", "new"))
    assert "1 uploaded" in r.stdout
    assert "left alone" in r.stdout
    assert ws.remote_file("fresh.txt").read_text() == "F"
    assert ws.remote_file("a.txt").read_text() == "content of a.txt\n"
    # --mode update (the default) then replaces the changed file (an overwrite: -y off a terminal).
    r = run(tether, "push", ws)
    assert r.exit_code == 3, r.output
    assert "-y" in r.stderr
    ok(run(tether, "push", ws, "-y"))
    assert ws.remote_file("a.txt").read_text() == "changed locally"


def test_pull_mode_new_only_creates_missing(synced, tether) -> None:
    ws, ws2 = synced
    ws2.write("a.txt", "changed there")
    ws2.write("fresh.txt", "F")
    ok(run(tether, "push", ws2, "-y"))
    ok(run(tether, "pull", ws, "--mode", "new"))
    assert (ws.data / "ns/ds/fresh.txt").read_text() == "F"
    assert (ws.data / "ns/ds/a.txt").read_text() == "content of a.txt\n"
    ok(run(tether, "pull", ws, "-y"))
    assert (ws.data / "ns/ds/a.txt").read_text() == "changed there"


def test_push_without_mirror_deletes_nothing(synced, tether) -> None:
    ws, ws2 = synced
    (ws.data / "ns/ds/b.txt").unlink()
    ws2.write("theirs.txt", "T")
    ok(run(tether, "push", ws2))
    r = ok(run(tether, "push", ws, "-y"))
    assert ws.remote_file("b.txt").exists()
    assert ws.remote_file("theirs.txt").exists()
    assert "left alone" in r.stdout


def test_push_mirror_deletes_remote_only_and_deleted_local(synced, tether) -> None:
    ws, ws2 = synced
    for name in ("e.txt", "f.txt", "g.txt", "h.txt"):  # a bigger destination keeps deletes under 50%
        ws.write(name, name)
    ok(run(tether, "push", ws))
    (ws.data / "ns/ds/b.txt").unlink()  # deleted_local
    ws2.write("theirs.txt", "T")  # remote_only for ws
    ok(run(tether, "push", ws2))
    data = diff_data(tether, ws, "--mode", "mirror")
    actions = {c["path"]: c["action"]["push"] for c in data["changes"]}
    assert actions == {"b.txt": "delete_remote", "theirs.txt": "delete_remote"}
    r = run(tether, "push", ws, "--mode", "mirror")
    assert r.exit_code == 3, r.output  # deletes need confirmation
    assert "-y" in r.stderr
    assert ws.remote_file("b.txt").exists()
    r = ok(run(tether, "push", ws, "--mode", "mirror", "-y"))
    assert "2 deleted on remote" in r.stdout
    assert not ws.remote_file("b.txt").exists()
    assert not ws.remote_file("theirs.txt").exists()
    assert ws.remote_file("sub/c.txt").exists()
    assert run(tether, "diff", ws).exit_code == 0


def test_pull_mirror_deletes_local_only_and_deleted_remote(synced, tether) -> None:
    ws, ws2 = synced
    for name in ("e.txt", "f.txt", "g.txt", "h.txt"):
        ws.write(name, name)
    ok(run(tether, "push", ws))
    ok(run(tether, "pull", ws2))
    (ws2.data / "ns/ds/b.txt").unlink()
    ok(run(tether, "push", ws2, "--mode", "mirror", "-y"))
    assert not ws.remote_file("b.txt").exists()
    ws.write("mine.txt", "M")  # local_only for ws
    # Without mirror, pull deletes nothing.
    ok(run(tether, "pull", ws))
    assert (ws.data / "ns/ds/b.txt").exists()
    assert (ws.data / "ns/ds/mine.txt").exists()
    data = diff_data(tether, ws, "--mode", "mirror")
    assert {c["path"]: c["action"]["pull"] for c in data["changes"]} == {
        "b.txt": "delete_local",
        "mine.txt": "delete_local",
    }
    r = run(tether, "pull", ws, "--mode", "mirror")
    assert r.exit_code == 3, r.output
    assert (ws.data / "ns/ds/b.txt").exists()
    r = ok(run(tether, "pull", ws, "--mode", "mirror", "-y"))
    assert "2 deleted locally" in r.stdout
    assert not (ws.data / "ns/ds/b.txt").exists()
    assert not (ws.data / "ns/ds/mine.txt").exists()
    assert data_files(ws.data / "ns/ds") == data_files(ws.remote_dir / "ns/ds")


def test_mirror_prunes_folders_left_empty(synced, tether) -> None:
    ws, _ = synced
    for name in ("e.txt", "f.txt", "g.txt", "h.txt"):
        ws.write(name, name)
    ok(run(tether, "push", ws))
    (ws.data / "ns/ds/sub/c.txt").unlink()
    ok(run(tether, "push", ws, "--mode", "mirror", "-y"))
    assert not ws.remote_file("sub").exists()


# -- safety ----------------------------------------------------------------------------------------
def test_unseen_remote_change_refuses_push(synced, tether) -> None:
    ws, ws2 = synced
    ws2.write("a.txt", "ws2's newer version\n")
    ok(run(tether, "push", ws2, "-y"))
    ws.write("new.txt", "N")
    remote_before = tree(ws.remote_dir)
    for extra in ((), ("-y",), ("-y", "--mode", "mirror", "--max-delete", "100%")):
        r = run(tether, "push", ws, *extra)
        assert r.exit_code == 3, (extra, r.output)
        assert "changed on the destination" in r.stderr
        assert "a.txt" in r.stderr
        assert "--prefer" in r.stderr
        assert tree(ws.remote_dir) == remote_before  # nothing at all was pushed, not even new.txt

    # --prefer remote keeps ws2's copy and pushes the rest.
    ok(run(tether, "push", ws, "--prefer", "remote"))
    assert ws.remote_file("a.txt").read_text() == "ws2's newer version\n"
    assert ws.remote_file("new.txt").read_text() == "N"
    # --prefer local overwrites it with ws's copy (an overwrite, so -y off a terminal).
    ok(run(tether, "push", ws, "--prefer", "local", "-y"))
    assert ws.remote_file("a.txt").read_text() == "content of a.txt\n"


def test_unseen_local_change_refuses_pull(synced, tether) -> None:
    ws, ws2 = synced
    ws2.write("b.txt", "theirs")
    ok(run(tether, "push", ws2, "-y"))
    ws.write("a.txt", "my unpushed edit")
    r = run(tether, "pull", ws, "-y")
    assert r.exit_code == 3, r.output
    assert "a.txt" in r.stderr
    assert (ws.data / "ns/ds/b.txt").read_text() == "content of b.txt\n"
    ok(run(tether, "pull", ws, "--prefer", "local", "-y"))
    assert (ws.data / "ns/ds/a.txt").read_text() == "my unpushed edit"
    assert (ws.data / "ns/ds/b.txt").read_text() == "theirs"


@pytest.mark.parametrize("command", ["push", "pull"])
def test_conflict_refused_both_ways(synced, tether, command: str) -> None:
    ws, ws2 = synced
    ws2.write("a.txt", "theirs\n")
    ok(run(tether, "push", ws2, "-y"))
    ws.write("a.txt", "mine\n")
    assert statuses(diff_data(tether, ws))["a.txt"] == "conflict"
    remote_before, local_before = tree(ws.remote_dir), tree(ws.data)
    for extra in ((), ("-y",)):
        r = run(tether, command, ws, *extra)
        assert r.exit_code == 3, r.output
        assert "a.txt" in r.stderr
        assert "--prefer local" in r.stderr and "--prefer remote" in r.stderr
    assert tree(ws.remote_dir) == remote_before
    assert tree(ws.data) == local_before
    winner = "mine\n" if command == "push" else "theirs\n"
    prefer = "local" if command == "push" else "remote"
    ok(run(tether, command, ws, "--prefer", prefer, "-y"))
    assert ws.remote_file("a.txt").read_text() == winner
    assert (ws.data / "ns/ds/a.txt").read_text() == winner
    assert run(tether, "diff", ws).exit_code == 0


def test_conflict_deleted_here_changed_there(synced, tether) -> None:
    ws, ws2 = synced
    ws2.write("a.txt", "theirs\n")
    ok(run(tether, "push", ws2, "-y"))
    (ws.data / "ns/ds/a.txt").unlink()
    assert statuses(diff_data(tether, ws))["a.txt"] == "conflict"
    r = run(tether, "push", ws, "--mode", "mirror", "-y")
    assert r.exit_code == 3, r.output
    assert ws.remote_file("a.txt").read_text() == "theirs\n"


@pytest.mark.parametrize("command", ["push", "pull"])
def test_differs_without_base_needs_confirmation(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether, command: str
) -> None:
    ws2.write("a.txt", "remote version")
    ok(run(tether, "push", ws2))
    ws.write("a.txt", "local version!")  # never synced: no base to judge by
    assert statuses(diff_data(tether, ws)) == {"a.txt": "differs"}
    r = run(tether, command, ws)
    assert r.exit_code == 3, r.output
    assert "no terminal to confirm" in r.stderr
    assert "-y" in r.stderr
    assert "a.txt" in r.stderr
    assert ws.remote_file("a.txt").read_text() == "remote version"
    assert (ws.data / "ns/ds/a.txt").read_text() == "local version!"
    ok(run(tether, command, ws, "-y"))
    expected = "local version!" if command == "push" else "remote version"
    assert ws.remote_file("a.txt").read_text() == expected
    assert (ws.data / "ns/ds/a.txt").read_text() == expected


def test_differs_with_mode_new_is_left_alone(ws: WorkspaceFixture, ws2: WorkspaceFixture, tether) -> None:
    ws2.write("a.txt", "remote version")
    ok(run(tether, "push", ws2))
    ws.write("a.txt", "local version!")
    ws.write("b.txt", "B")
    ok(run(tether, "push", ws, "--mode", "new"))
    assert ws.remote_file("a.txt").read_text() == "remote version"
    assert ws.remote_file("b.txt").read_text() == "B"


# -- max-delete and empty sources ------------------------------------------------------------------
def test_max_delete_default_is_half(synced, tether) -> None:
    ws, _ = synced  # 4 files on the remote
    for name in ("a.txt", "b.txt", "d.txt"):
        (ws.data / "ns/ds" / name).unlink()
    before = tree(ws.remote_dir)
    r = run(tether, "push", ws, "--mode", "mirror", "-y")
    assert r.exit_code == 3, r.output
    assert "deletes 3 file(s), over the limit of 2" in r.stderr
    assert "--max-delete 50% of 4 files" in r.stderr
    assert "--max-delete 100%" in r.stderr  # the hint
    assert tree(ws.remote_dir) == before
    r = run(tether, "push", ws, "--mode", "mirror", "-y", "--max-delete", "2")
    assert r.exit_code == 3, r.output
    assert tree(ws.remote_dir) == before
    ok(run(tether, "push", ws, "--mode", "mirror", "-y", "--max-delete", "3"))
    assert data_files(ws.remote_dir / "ns/ds") == {"sub/c.txt": b"content of sub/c.txt\n"}


def test_max_delete_percent_allows(synced, tether) -> None:
    ws, _ = synced
    for name in ("a.txt", "b.txt", "d.txt"):
        (ws.data / "ns/ds" / name).unlink()
    ok(run(tether, "push", ws, "--mode", "mirror", "-y", "--max-delete", "100%"))
    assert data_files(ws.remote_dir / "ns/ds") == {"sub/c.txt": b"content of sub/c.txt\n"}


def test_max_delete_exactly_half_is_allowed(synced, tether) -> None:
    ws, _ = synced
    for name in ("a.txt", "b.txt"):
        (ws.data / "ns/ds" / name).unlink()
    ok(run(tether, "push", ws, "--mode", "mirror", "-y"))
    assert set(data_files(ws.remote_dir / "ns/ds")) == {"sub/c.txt", "d.txt"}


@pytest.mark.parametrize("bad", ["abc", "-1", "150%", "%"])
def test_max_delete_invalid(synced, tether, bad: str) -> None:
    ws, _ = synced
    r = run(tether, "push", ws, "--mode", "mirror", "-y", f"--max-delete={bad}")
    assert r.exit_code == 2, r.output
    assert "neither a count nor a percentage" in r.stderr


def test_mirror_push_from_empty_source_refused(synced, tether) -> None:
    ws, _ = synced
    for p in list((ws.data / "ns/ds").rglob("*")):
        if p.is_file():
            p.unlink()
    before = tree(ws.remote_dir)
    for limit in ("100%", "1000"):
        r = run(tether, "push", ws, "--mode", "mirror", "-y", "--max-delete", limit)
        assert r.exit_code == 3, r.output
        assert "source is empty" in r.stderr
    assert tree(ws.remote_dir) == before


def test_mirror_pull_from_empty_remote_refused(synced, tether) -> None:
    ws, _ = synced
    # Someone emptied the remote copy behind tether's back (its index is still there).
    for p in list((ws.remote_dir / "ns/ds").rglob("*")):
        if p.is_file() and ".tether" not in p.parts:
            p.unlink()
    before = tree(ws.data)
    r = run(tether, "pull", ws, "--mode", "mirror", "-y", "--max-delete", "100%")
    assert r.exit_code == 3, r.output
    assert "source is empty" in r.stderr
    assert tree(ws.data) == before


def test_refused_runs_leave_no_audit_of_a_transfer(synced, tether) -> None:
    ws, _ = synced
    for name in ("a.txt", "b.txt", "d.txt"):
        (ws.data / "ns/ds" / name).unlink()
    before = audit_lines(ws)
    assert run(tether, "push", ws, "--mode", "mirror", "-y").exit_code == 3
    assert all(rec["state"] != "transferred" for rec in audit_lines(ws)[len(before) :])


# -- pull edge cases -------------------------------------------------------------------------------
def test_pull_of_local_only_dataset_changes_nothing(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    local_before = tree(ws.data)
    r = ok(run(tether, "pull", ws, "-y", "--mode", "mirror", "--max-delete", "100%"))
    assert "nothing to pull" in r.stderr
    assert tree(ws.data) == local_before
    assert tree(ws.remote_dir) == {}


def test_pull_bootstraps_a_new_dataset(ws: WorkspaceFixture, ws2: WorkspaceFixture, tether) -> None:
    ws.write("x/y.txt", "Y", dataset="team/fresh")
    ok(tether("push", "team/fresh", "store", cwd=ws.root))
    assert not (ws2.data / "team").exists()
    r = ok(tether("pull", "team/fresh", "store", cwd=ws2.root))
    assert "1 downloaded" in r.stdout
    assert (ws2.data / "team/fresh/x/y.txt").read_text() == "Y"
    r = ok(tether("ls", cwd=ws2.root))
    assert "team/fresh" in r.stdout


def test_same_size_edit_is_detected_and_pushed(ws: WorkspaceFixture, tether) -> None:
    path = ws.write("a.txt", "aaaa")
    ok(run(tether, "push", ws))
    assert run(tether, "diff", ws).exit_code == 0  # the hash cache now vouches for a.txt
    path.write_text("bbbb")  # same length, different bytes
    data = diff_data(tether, ws)
    assert statuses(data) == {"a.txt": "modified_local"}
    ok(run(tether, "push", ws, "-y"))
    assert ws.remote_file("a.txt").read_text() == "bbbb"
    r = run(tether, "diff", ws)
    assert r.exit_code == 0, r.output


def test_same_size_edit_with_restored_mtime_found_by_checksum(ws: WorkspaceFixture, tether) -> None:
    path = ws.write("a.txt", "aaaa")
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    ok(run(tether, "push", ws))
    path.write_text("bbbb")
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))  # a tool that preserves mtimes
    data = diff_data(tether, ws, "--checksum")
    assert statuses(data) == {"a.txt": "modified_local"}


def test_remote_edit_behind_tethers_back_is_noticed(synced, tether) -> None:
    ws, _ = synced
    ws.remote_file("a.txt").write_text("edited on the server")
    data = diff_data(tether, ws)
    assert statuses(data) == {"a.txt": "modified_remote"}
    ok(run(tether, "pull", ws, "-y"))
    assert (ws.data / "ns/ds/a.txt").read_text() == "edited on the server"


# -- audit -----------------------------------------------------------------------------------------
def test_audit_records_every_push_and_pull(synced, tether, tmp_path: Path) -> None:
    ws, ws2 = synced
    push_rec = audit_lines(ws)[-1]
    assert push_rec["operation"] == "push"
    assert push_rec["state"] == "transferred"
    assert push_rec["dataset"] == "ns/ds"
    assert push_rec["remote"] == "store"
    assert push_rec["files"] == {"upload": 4}
    total = sum(len(f"content of {n}\n") for n in ("a.txt", "b.txt", "sub/c.txt", "d.txt"))
    assert push_rec["bytes"] == {"upload": total}
    assert push_rec["bytes_transferred"] == total
    assert push_rec["verification"]["ok"] is True
    assert push_rec["verification"]["files_verified"] == 4
    pull_rec = audit_lines(ws2)[-1]
    assert pull_rec["operation"] == "pull"
    assert pull_rec["files"] == {"download": 4}

    for name in ("e.txt", "f.txt", "g.txt"):
        ws.write(name, "x")
    ws.write("a.txt", "edited")
    (ws.data / "ns/ds/b.txt").unlink()
    out = tmp_path / "reports" / "run.json"
    r = ok(run(tether, "push", ws, "--mode", "mirror", "-y", "--audit-json-out", str(out)))
    rec = json.loads(out.read_text())
    assert rec == audit_lines(ws)[-1]
    assert rec["state"] == "transferred"
    assert rec["files"] == {"upload": 4, "delete_remote": 1}
    assert rec["bytes"]["upload"] == 3 + len("edited")
    assert rec["unchanged"] == 2
    assert rec["mode"] == "mirror"
    assert "4 uploaded" in r.stdout and "1 deleted on remote" in r.stdout

    out2 = tmp_path / "noop.json"
    ok(run(tether, "push", ws, "--audit-json-out", str(out2)))
    assert json.loads(out2.read_text())["state"] == "no-op"
    assert len(audit_lines(ws)) == 3


def test_audit_record_of_a_partial_mode(synced, tether) -> None:
    ws, _ = synced
    ws.write("a.txt", "edited")
    ws.write("n.txt", "new")
    ok(run(tether, "push", ws, "--mode", "new"))
    rec = audit_lines(ws)[-1]
    assert rec["files"] == {"upload": 1}
    assert rec["skipped"] == 1


# -- special file names ----------------------------------------------------------------------------
SPECIAL = [
    "with space.txt",
    "it's quoted.txt",
    'double "quoted".txt',
    "$(touch pwned).txt",
    "`touch pwned2`.txt",
    "semi;colon&amp|pipe.txt",
    "données/é.txt",
    "日本語/ファイル.csv",
    "-leading-dash.txt",
    "--also-dashes",
    "tab\there.txt",
    "new\nline.txt",
    "#hash and %percent.txt",
    "star*question?.txt",
    "trailing space .txt",
]


def test_special_file_names_round_trip(ws: WorkspaceFixture, ws2: WorkspaceFixture, tether) -> None:
    for i, name in enumerate(SPECIAL):
        ws.write(name, f"payload {i}")
    ok(run(tether, "push", ws, "--json"))
    expected = {name: f"payload {i}".encode() for i, name in enumerate(SPECIAL)}
    assert data_files(ws.remote_dir / "ns/ds") == expected
    ok(run(tether, "pull", ws2, "--json"))
    assert data_files(ws2.data / "ns/ds") == expected
    assert run(tether, "diff", ws2).exit_code == 0
    # edit and delete round trip too
    ws2.write("données/é.txt", "changed")
    (ws2.data / "ns/ds/-leading-dash.txt").unlink()
    ok(run(tether, "push", ws2, "-y", "--mode", "mirror"))
    ok(run(tether, "pull", ws, "-y", "--mode", "mirror"))
    assert (ws.data / "ns/ds/données/é.txt").read_text() == "changed"
    assert not (ws.data / "ns/ds/-leading-dash.txt").exists()
    for p in (ws.root, ws2.root, ws.remote_dir, Path.cwd()):
        assert not (p / "pwned").exists()
        assert not (p / "pwned2").exists()


def test_special_names_in_human_output(ws: WorkspaceFixture, tether) -> None:
    ws.write("with space.txt", "1")
    ws.write("données/é.txt", "2")
    r = run(tether, "diff", ws)
    assert r.exit_code == 1
    assert "with space.txt" in r.stdout
    assert "données/é.txt" in r.stdout


def test_bracketed_name_shown_verbatim_in_plan(ws: WorkspaceFixture, tether) -> None:
    ws.write("[draft] x.txt", "1")
    r = run(tether, "diff", ws)
    assert r.exit_code == 1
    assert "[draft] x.txt" in r.stdout


def test_markup_like_name_does_not_crash(ws: WorkspaceFixture, tether) -> None:
    ws.write("[/b]x.txt", "1")  # folder '[' holding 'b]x.txt'
    r = run(tether, "diff", ws)
    assert r.exit_code == 1, r.output
    r = ok(run(tether, "push", ws))
    assert ws.remote_file("[/b]x.txt").read_text() == "1"


def test_bracketed_name_shown_verbatim_in_error(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    os.symlink("a.txt", ws.data / "ns/ds/[draft]link")
    r = run(tether, "push", ws)
    assert r.exit_code == 2
    error_line = next(line for line in r.stderr.splitlines() if line.startswith("error:"))
    assert "[draft]link" in error_line


def test_long_plans_are_truncated_unless_all(ws: WorkspaceFixture, tether) -> None:
    for i in range(45):
        ws.write(f"f{i:02d}.txt", "x")
    r = run(tether, "diff", ws)
    assert r.exit_code == 1
    assert "… and 5 more" in r.stdout
    assert "--all" in r.stdout
    assert "f44.txt" not in r.stdout
    r = run(tether, "diff", ws, "--all")
    assert "more" not in r.stdout
    assert "f44.txt" in r.stdout
    r = ok(run(tether, "push", ws))
    assert "45 uploaded" in r.stdout


# -- confirmation on a terminal ----------------------------------------------------------------------
class FakeTerminal(io.StringIO):
    """stdin that claims to be a terminal and answers the prompt with ``text``."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("answer", ["n\n", "\n", ""])
def test_declining_on_a_terminal_exits_130(
    synced, tether, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    ws, _ = synced
    ws.write("a.txt", "edited")
    monkeypatch.setattr(sys, "stdin", FakeTerminal(answer))
    before = tree(ws.remote_dir)
    r = run(tether, "push", ws)
    assert r.exit_code == 130, r.output
    assert "Proceed with this push?" in r.stderr
    assert ("Declined" if answer else "No answer") in r.stderr  # "" is end of input
    assert "error" not in r.stderr  # saying no is a choice, not an error
    assert "a.txt" in r.stdout  # the plan was shown before the question
    assert tree(ws.remote_dir) == before
    assert all(rec["state"] != "transferred" for rec in audit_lines(ws)[1:])


def test_accepting_on_a_terminal_proceeds(synced, tether, monkeypatch: pytest.MonkeyPatch) -> None:
    ws, _ = synced
    ws.write("a.txt", "edited")
    monkeypatch.setattr(sys, "stdin", FakeTerminal("y\n"))
    r = ok(run(tether, "push", ws))
    assert "Proceed with this push?" in r.stderr
    assert ws.remote_file("a.txt").read_text() == "edited"


def test_yes_skips_the_question_on_a_terminal(synced, tether, monkeypatch: pytest.MonkeyPatch) -> None:
    ws, _ = synced
    ws.write("a.txt", "edited")
    monkeypatch.setattr(sys, "stdin", FakeTerminal(""))
    r = ok(run(tether, "push", ws, "-y"))
    assert "Proceed" not in r.stderr
    assert ws.remote_file("a.txt").read_text() == "edited"


def test_an_unattended_run_to_a_path_locks_first_and_walks_the_remote_once(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-y`` on a path remote: the lock, then one walk of the remote copy under it; a run that
    shows its plan walks before the lock and again under it. A pull of a dataset the share
    lacks makes no folder there."""
    from tether import sync

    seen: list[str] = []
    real_scan, real_create = sync.scan_remote, LocalRemote.create_exclusive

    def scan(*args: Any, **kwargs: Any) -> Any:
        seen.append("walk")
        return real_scan(*args, **kwargs)

    def create(self: LocalRemote, path: str, data: bytes, **kwargs: Any) -> bool:
        seen.append("lock")
        return real_create(self, path, data, **kwargs)

    ws.write("a.txt", "a")
    ws.write("d/b.txt", "b")
    ok(run(tether, "push", ws, "-y"))  # a first push: no folder yet, so planned first
    monkeypatch.setattr(sync, "scan_remote", scan)
    monkeypatch.setattr(LocalRemote, "create_exclusive", create)
    ok(run(tether, "pull", ws2, "-y"))
    assert seen == ["lock", "walk"]
    assert data_files(ws2.data / "ns/ds") == {"a.txt": b"a", "d/b.txt": b"b"}
    seen.clear()
    ws.write("a.txt", "a2")
    sync.push("ns/ds", "store", workspace=ws.root, confirm=lambda plan: True)
    assert seen == ["walk", "lock", "walk"]
    before = tree(ws.remote_dir)
    r = run(tether, "pull", ws2, "-y", target="ns/absent")
    assert r.exit_code == ExitCode.USAGE and "exists neither" in r.stderr, r.output
    assert tree(ws.remote_dir) == before and not (ws.remote_dir / "ns/absent").exists()
