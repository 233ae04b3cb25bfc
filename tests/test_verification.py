"""Every transfer is verified by content hash; the remote index is a cache, never the truth.

Covers bit rot the index cannot see, edits and deletes behind tether's back, a malicious remote
index (invariant 5) and the audit record that states what was actually done.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Result, WorkspaceFixture, snapshot
from tether.hashing import digest_bytes
from tether.manifest import MANIFEST_FORMAT, MANIFEST_VERSION
from tether.paths import STATE_DIR
from tether.remotes.base import RemoteStat
from tether.remotes.local import LocalRemote

DS = "ns/ds"


# -- helpers -------------------------------------------------------------------------------------
def all_files(root: Path) -> set[str]:
    return {str(Path(f, n).relative_to(root)) for f, _d, names in os.walk(root) for n in names}


def flip_byte_keep_stat(path: Path, offset: int = 10) -> None:
    """Silent corruption: one bit changes, size and mtime stay as the index remembers them."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def diff_json(tether, ws: WorkspaceFixture, *extra: str) -> tuple[int, dict]:
    r = tether("diff", DS, "store", "--json", *extra, cwd=ws.root)
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.stdout)


def by_path(report: dict) -> dict[str, dict]:
    return {c["path"]: c for c in report["changes"]}


def ok(tether, ws: WorkspaceFixture, *args: str) -> Result:
    r = tether(*args, cwd=ws.root)
    assert r.exit_code == 0, r.output
    return r


def last_audit(ws: WorkspaceFixture) -> dict:
    return json.loads((ws.root / ".tether" / "audit.jsonl").read_text().splitlines()[-1])


def write_index(ws: WorkspaceFixture, entries: list[dict], **header: object) -> None:
    """A hand-made remote index in the documented format (gzip JSON lines, header first)."""
    head = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "algorithm": "sha256",
        "count": len(entries),
        "bytes": sum(int(e["size"]) for e in entries),
        "dataset": DS,
        **header,
    }
    lines = [json.dumps(head)] + [json.dumps(e) for e in entries]
    index = ws.remote_dir / DS / STATE_DIR / "index"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


@pytest.fixture
def pushed(ws: WorkspaceFixture, tether) -> WorkspaceFixture:
    ws.write("a.txt", "alpha\n" * 20)
    ws.write("b/c.bin", bytes(range(256)) * 8)
    ws.write("d.bin", b"delta" * 40)
    ok(tether, ws, "push", DS, "store", "-y")
    return ws


# -- bit rot -------------------------------------------------------------------------------------
def test_bit_rot_on_the_remote_fails_the_pull_and_promotes_nothing(
    pushed: WorkspaceFixture, ws2: WorkspaceFixture, tether
) -> None:
    ws = pushed
    ok(tether, ws2, "pull", DS, "store", "-y")
    ws.write("b/c.bin", bytes(reversed(range(256))) * 8)  # same size, new content
    ws.write("e.bin", b"echo" * 30)
    ok(tether, ws, "push", DS, "store", "-y")
    flip_byte_keep_stat(ws.remote_file("b/c.bin"))

    dataset = ws2.data / DS
    before = snapshot(dataset)
    base = ws2.workspace().base_path("store", DS)
    base_before = base.read_bytes()
    r = tether("pull", DS, "store", "-y", cwd=ws2.root)
    assert r.exit_code == 4, r.output
    assert "b/c.bin" in r.output
    assert "mismatch" in r.output
    assert snapshot(dataset) == before  # e.bin, fine on the remote, was not promoted either
    assert base.read_bytes() == base_before
    assert last_audit(ws2)["state"] == "failed"

    # The index still vouches for the rotten file by size and mtime; --checksum looks at bytes.
    code, report = diff_json(tether, ws, "--checksum")
    assert code == 1
    change = by_path(report)["b/c.bin"]
    assert change["status"] == "modified_remote"
    assert change["remote"]["digest"] == digest_bytes(ws.remote_file("b/c.bin").read_bytes())
    assert change["local"]["digest"] == digest_bytes((ws.data / DS / "b/c.bin").read_bytes())
    assert change["action"] == {"push": "refuse", "pull": "download"}  # never overwritten blindly
    assert set(by_path(report)) == {"b/c.bin"}

    # A second attempt fails the same way: a staged file is only reused once verified.
    r = tether("pull", DS, "store", "-y", cwd=ws2.root)
    assert r.exit_code == 4, r.output
    assert snapshot(dataset) == before


def test_audit_of_a_failed_pull_states_what_was_done(
    pushed: WorkspaceFixture, ws2: WorkspaceFixture, tether
) -> None:
    ws = pushed
    ws.write("e.bin", b"echo" * 30)
    ws.write("f.bin", b"foxtrot" * 30)
    ok(tether, ws, "push", DS, "store", "-y")
    flip_byte_keep_stat(ws.remote_file("b/c.bin"))
    r = tether("pull", DS, "store", "-y", cwd=ws2.root)
    assert r.exit_code == 4, r.output
    assert not (ws2.data / DS / "e.bin").exists()
    audit = last_audit(ws2)
    assert audit["state"] == "failed"
    assert [f["path"] for f in audit["failed"]] == ["b/c.bin"]
    # Nothing reached the local dataset ...
    assert audit["files"].get("download", 0) == 0, audit["files"]
    assert audit["bytes_transferred"] == 0
    # ... and the verification result names the file that failed it.
    assert audit["verification"]["mismatches"] == ["b/c.bin"], audit["verification"]


# -- the index is a cache, never the truth ---------------------------------------------------------
def test_same_size_edit_on_the_remote_is_seen_without_checksum(pushed: WorkspaceFixture, tether) -> None:
    ws = pushed
    remote = ws.remote_file("d.bin")
    st = remote.stat()
    remote.write_bytes(b"DELTA" * 40)  # same size, different bytes, new mtime
    assert remote.stat().st_size == st.st_size and remote.stat().st_mtime_ns != st.st_mtime_ns

    code, report = diff_json(tether, ws)
    assert code == 1
    change = by_path(report)["d.bin"]
    assert change["status"] == "modified_remote"
    assert change["remote"]["digest"] == digest_bytes(b"DELTA" * 40)
    assert change["action"] == {"push": "refuse", "pull": "download"}
    r = tether("push", DS, "store", "-y", cwd=ws.root)
    assert r.exit_code == 3, r.output  # an unseen remote change is never overwritten
    assert remote.read_bytes() == b"DELTA" * 40


def test_file_deleted_on_the_remote_behind_tethers_back(
    pushed: WorkspaceFixture, ws2: WorkspaceFixture, tether
) -> None:
    ws = pushed
    ws.remote_file("b/c.bin").unlink()  # the index still lists it
    code, report = diff_json(tether, ws)
    assert code == 1
    change = by_path(report)["b/c.bin"]
    assert change["status"] == "deleted_remote"
    assert change["remote"] is None
    assert report["summary"]["remote_files"] == 2
    # A fresh pull fetches what is really there and does not trip over the missing file.
    ok(tether, ws2, "pull", DS, "store", "-y")
    assert sorted(snapshot(ws2.data / DS)) == ["a.txt", "d.bin"]
    # Restoring it takes an explicit choice.
    ok(tether, ws, "push", DS, "store", "-y", "--prefer", "local")
    assert ws.remote_file("b/c.bin").read_bytes() == bytes(range(256)) * 8


def test_damaged_index_is_ignored_and_rebuilt_from_the_files(pushed: WorkspaceFixture, tether) -> None:
    ws = pushed
    index = ws.remote_dir / DS / STATE_DIR / "index"
    index.write_bytes(index.read_bytes()[:20])  # truncated
    r = tether("diff", DS, "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "damaged remote index" in r.output
    assert r.output.count("damaged remote index") == 1  # parsed beside the listing, said once


def test_index_is_read_while_the_remote_lists(
    pushed: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index read overlaps the listing (a cold walk mostly waits on the disk): the listing
    here cannot finish until the index has been read, which would hang if they ran in turn."""
    index_read = threading.Event()
    read_bytes, list_files = LocalRemote.read_bytes, LocalRemote.list_files

    def reading(self: LocalRemote, path: str) -> bytes:
        data = read_bytes(self, path)
        if path.endswith("/.tether/index"):
            index_read.set()
        return data

    def listing(self: LocalRemote, prefix: str) -> Iterator[RemoteStat]:
        assert index_read.wait(timeout=30), "the index was not read until the listing ended"
        return list_files(self, prefix)

    monkeypatch.setattr(LocalRemote, "read_bytes", reading)
    monkeypatch.setattr(LocalRemote, "list_files", listing)
    code, report = diff_json(tether, pushed)
    assert code == 0 and report["in_sync"], report


def test_unreadable_index_is_an_error_not_a_guess(
    pushed: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index that exists but cannot be read fails the run (read in the background, it still
    reaches the user); only a missing index means "no index"."""
    read_bytes = LocalRemote.read_bytes

    def refusing(self: LocalRemote, path: str) -> bytes:
        if path.endswith("/.tether/index"):
            raise PermissionError(13, "Permission denied", path)
        return read_bytes(self, path)

    monkeypatch.setattr(LocalRemote, "read_bytes", refusing)
    r = tether("diff", DS, "store", cwd=pushed.root)
    assert r.exit_code == 7, r.output
    assert "Permission denied (ns/ds/.tether/index)" in r.output
    assert "Traceback" not in r.output


def test_index_vouching_for_wrong_digests_is_caught_by_checksum(pushed: WorkspaceFixture, tether) -> None:
    """An index that lies about a file's digest (size and mtime right) misleads only a cached diff."""
    ws = pushed
    entries = []
    for rel in ("a.txt", "b/c.bin", "d.bin"):
        st = ws.remote_file(rel).stat()
        digest = digest_bytes(ws.remote_file(rel).read_bytes())
        if rel == "a.txt":
            digest = "0" * 64
        entries.append({"path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": digest})
    write_index(ws, entries)
    code, report = diff_json(tether, ws, "--checksum")
    assert code == 0, report


# -- a malicious remote index (invariant 5) ----------------------------------------------------------
@pytest.mark.parametrize(
    "bad_path",
    ["../escape", "/etc/passwd", "a/../../escape", ".tether/lock", "a\\..\\..\\escape", "nul\x00byte"],
)
def test_malicious_index_is_refused_before_any_io(
    pushed: WorkspaceFixture, ws2: WorkspaceFixture, tether, bad_path: str
) -> None:
    ws = pushed
    real = []
    for rel in ("a.txt", "b/c.bin", "d.bin"):
        st = ws.remote_file(rel).stat()
        real.append(
            {
                "path": rel,
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "digest": digest_bytes(ws.remote_file(rel).read_bytes()),
            }
        )
    write_index(ws, [*real, {"path": bad_path, "size": 5, "mtime_ns": 1, "digest": "0" * 64}])
    passwd = Path("/etc/passwd")
    passwd_before = passwd.read_bytes() if passwd.exists() else None
    everything_before = all_files(ws.root.parent)

    r = tether("diff", DS, "store", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "refused" in r.output
    assert "Traceback" not in r.output

    r = tether("pull", DS, "store", "-y", cwd=ws2.root)
    assert r.exit_code == 2, r.output
    assert "refused" in r.output
    assert not (ws2.data / DS).exists() or snapshot(ws2.data / DS) == {}

    r = tether("push", DS, "store", "-y", cwd=ws.root)
    assert r.exit_code == 2, r.output

    # Nothing written anywhere except tether's own bookkeeping in the two workspaces.
    new_files = {
        p for p in all_files(ws.root.parent) - everything_before if f"{os.sep}.tether{os.sep}" not in p
    }
    assert new_files == set()
    assert not (ws.remote_dir / "ns" / "escape").exists()
    assert not (ws2.data / "ns" / "escape").exists()
    if passwd_before is not None:
        assert passwd.read_bytes() == passwd_before


def test_remote_listing_with_an_unsafe_name_is_refused(pushed: WorkspaceFixture, tether) -> None:
    ws = pushed
    (ws.remote_dir / DS / "evil\\..\\name").write_bytes(b"x")
    r = tether("diff", DS, "store", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "backslash" in r.output


def test_index_from_a_newer_format_version_is_a_clear_error(pushed: WorkspaceFixture, tether) -> None:
    ws = pushed
    write_index(ws, [], version=MANIFEST_VERSION + 1)
    r = tether("diff", DS, "store", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "format version" in r.output


# -- the audit record --------------------------------------------------------------------------------
def test_audit_record_after_push_states_what_was_done(
    pushed: WorkspaceFixture, tether, tmp_path: Path
) -> None:
    ws = pushed
    ws.write("a.txt", "alpha, longer now\n" * 20)  # modified
    ws.write("new/one.txt", "one")
    ws.write("new/two.bin", b"\x00" * 1234)
    (ws.data / DS / "d.bin").unlink()  # deleted: mirrored by --mode mirror
    out = tmp_path / "reports" / "audit.json"
    r = ok(tether, ws, "push", DS, "store", "-y", "--mode", "mirror", "--audit-json-out", str(out))

    audit = last_audit(ws)
    assert audit["format"] == "tether-audit" and audit["version"] == 2
    assert (audit["operation"], audit["dataset"], audit["remote"], audit["mode"]) == (
        "push",
        DS,
        "store",
        "mirror",
    )
    assert audit["state"] == "transferred"
    assert audit["error"] is None and audit["failed"] == []
    uploaded = len("alpha, longer now\n" * 20) + 3 + 1234
    assert audit["files"] == {"upload": 3, "delete_remote": 1}
    assert audit["bytes"] == {"upload": uploaded, "delete_remote": 200}
    assert audit["bytes_transferred"] == uploaded
    assert audit["unchanged"] == 1  # b/c.bin
    assert audit["verification"] == {
        "mode": "sha256",
        "ok": True,
        "files_verified": 3,
        "bytes_verified": uploaded,
        "mismatches": [],
        "parquet": {},
        "sidecar_check": True,
        "sidecars": None,
        "fallbacks": [],
    }
    assert audit["parts"] == {
        "other": {
            "changed": 4,
            "transferred_files": 3,
            "transferred_bytes": uploaded,
            "deleted": 1,
            "verified": "sha256",
            "ok": True,
        }
    }
    assert json.loads(out.read_text()) == audit
    assert "3 uploaded" in r.stdout and "1 deleted on remote" in r.stdout
    assert not ws.remote_file("d.bin").exists()


def test_audit_record_after_pull(pushed: WorkspaceFixture, ws2: WorkspaceFixture, tether) -> None:
    ok(tether, ws2, "pull", DS, "store", "-y", "--json")
    audit = last_audit(ws2)
    assert audit["operation"] == "pull" and audit["state"] == "transferred"
    assert audit["files"] == {"download": 3}
    total = len("alpha\n" * 20) + 256 * 8 + 200
    assert audit["bytes_transferred"] == total
    assert audit["verification"]["ok"] is True
    assert audit["verification"]["files_verified"] == 3
    assert audit["verification"]["bytes_verified"] == total
    assert audit["reused_staged"] == 0


def test_noop_push_is_audited_as_noop(pushed: WorkspaceFixture, tether) -> None:
    ws = pushed
    lines_before = len((ws.root / ".tether" / "audit.jsonl").read_text().splitlines())
    ok(tether, ws, "push", DS, "store", "-y")
    lines = (ws.root / ".tether" / "audit.jsonl").read_text().splitlines()
    assert len(lines) == lines_before + 1
    audit = json.loads(lines[-1])
    assert audit["state"] == "no-op" and audit["files"] == {} and audit["unchanged"] == 3
