"""Dataset fidelity through the CLI: profiles with a primary table, sidecar folders and an
append-only ledger; fail-fast primary checks; --primary-only and --skip; --verify modes; strict
sidecar verification; ledger prefix rules; file mode and --strict-id; the audit's parts.

The rules that matter most run on every remote kind (local path, SSH against a real sshd, S3
against `rclone serve s3`); the rest on a local remote, where the same code paths run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomlkit

from conftest import Result, WorkspaceFixture, make_workspace, run_subprocess, snapshot
from s3servers import get_server, unique_prefix
from sshd import HOST, add_remote
from sshd import get_server as get_sshd
from tether.config import RemoteConfig
from tether.lock import Lease
from tether.remotes import Remote, open_remote

DS = "densegen/ds"
Tether = Callable[..., Result]

PROFILE = """
[profiles.usr]
primary = "records.parquet"
sidecars = ["_derived", "_auxiliary", "_snapshots"]
append_only = [{ path = ".events.log", format = "jsonl" }]

[datasets]
"densegen/*" = "usr"
"""


def parquet_bytes(rows: int, tmp: Path) -> bytes:
    path = tmp / f"t{rows}.parquet"
    pq.write_table(pa.table({"id": list(range(rows)), "seq": ["ACGT"] * rows}), path)
    return path.read_bytes()


def events(*numbers: int) -> bytes:
    return b"".join(json.dumps({"event": n}).encode() + b"\n" for n in numbers)


@dataclass
class Site:
    """A workspace (and a collaborator's) with a remote ``r`` of one kind, plus direct access to
    the remote's copy of the dataset (to play the cluster job, the corruption or the attacker)."""

    kind: str
    ws: WorkspaceFixture
    ws2: WorkspaceFixture
    remote: Remote

    def rel(self, path: str) -> str:
        return f"{DS}/{path}"

    def read(self, path: str) -> bytes:
        return self.remote.read_bytes(self.rel(path))

    def write(self, path: str, data: bytes) -> None:
        self.remote.write_bytes_atomic(self.rel(path), data)

    def files(self) -> dict[str, bytes]:
        return {s.path: self.read(s.path) for s in self.remote.list_files(DS)}


def _with_profile(ws: WorkspaceFixture) -> None:
    toml = ws.root / "tether.toml"
    toml.write_text(toml.read_text() + PROFILE)


def _make_site(kind: str, tmp_path: Path) -> Site:
    ws = make_workspace(tmp_path)
    ws2 = make_workspace(tmp_path, "ws2", ws.remote_dir)
    if kind == "local":
        url, options = str(ws.remote_dir), {}
        remote = open_remote(RemoteConfig("r", url, {}, "t"), workspace_root=ws.root)
    elif kind == "ssh":
        sshd = get_sshd()
        url, options = f"ssh://{HOST}{ws.remote_dir}", sshd.options()
        remote = open_remote(RemoteConfig("r", str(ws.remote_dir), {}, "t"), workspace_root=ws.root)
    else:
        server = get_server("rclone")
        url, options = server.url(unique_prefix()), server.options()
        remote = open_remote(RemoteConfig("r", url, options, "t"), workspace_root=ws.root)
    for w in (ws, ws2):
        _with_profile(w)
        if kind == "local":
            doc = tomlkit.parse((w.root / "tether.toml").read_text())
            doc["remotes"]["r"] = {"url": url}
            (w.root / "tether.toml").write_text(tomlkit.dumps(doc))
        else:
            add_remote(w.root, "r", url, options)
    return Site(kind, ws, ws2, remote)


@pytest.fixture(params=["local", "ssh", "s3"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    s = _make_site(request.param, tmp_path)
    yield s
    s.remote.close()


@pytest.fixture
def local_site(tmp_path: Path) -> Iterator[Site]:
    s = _make_site("local", tmp_path)
    yield s
    s.remote.close()


def fill(ws: WorkspaceFixture, tmp: Path, rows: int = 10) -> None:
    ws.write("records.parquet", parquet_bytes(rows, tmp), DS)
    ws.write("_derived/gc_content.bin", b"derived " * 100, DS)
    ws.write("_auxiliary/notes.txt", "aux\n", DS)
    ws.write("_snapshots/2026-11-01.parquet", parquet_bytes(3, tmp), DS)
    ws.write(".events.log", events(1, 2), DS)


def run(tether: Tether, ws: WorkspaceFixture, *args: str) -> Result:
    return tether(*args, cwd=ws.root)


def ok(tether: Tether, ws: WorkspaceFixture, *args: str) -> Result:
    r = run(tether, ws, *args)
    assert r.exit_code == 0, r.output
    return r


def refused(r: Result, code: int, *words: str) -> None:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    for word in words:
        assert word in r.output, r.output


def last_audit(ws: WorkspaceFixture) -> dict:
    lines = (ws.root / ".tether" / "audit.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def local_tree(ws: WorkspaceFixture) -> dict[str, bytes]:
    return {k: v for k, (v, _) in snapshot(ws.data / DS).items()}


# -- the loop on every remote kind --------------------------------------------------------------
def test_round_trip_verifies_primary_sidecars_and_ledger(site: Site, tmp_path: Path, tether: Tether) -> None:
    fill(site.ws, tmp_path)
    ok(tether, site.ws, "push", DS, "r", "-y", "--verify", "parquet")
    audit = last_audit(site.ws)
    assert audit["state"] == "transferred" and audit["profile"] == "usr"
    parts = audit["parts"]
    assert parts["primary"]["transferred_files"] == 1
    assert parts["primary"]["verified"] == "sha256+parquet"
    assert parts["primary"]["parquet"]["records.parquet"]["local"]["rows"] == 10
    assert parts["primary"]["parquet"]["records.parquet"]["remote"]["rows"] == 10
    assert parts["sidecar:_derived"]["sidecar_ok"] is True
    assert parts["sidecar:_derived"]["sidecar_files"] == 1
    assert parts["ledger:.events.log"]["transferred_files"] == 1
    assert site.files() == local_tree(site.ws)

    # The collaborator bootstraps by id, then the cluster appends to the ledger: pull extends it.
    ok(tether, site.ws2, "pull", DS, "r", "-y")
    assert local_tree(site.ws2) == local_tree(site.ws)
    site.write(".events.log", events(1, 2, 3))
    r = ok(tether, site.ws2, "pull", DS, "r", "-y")
    assert (site.ws2.data / DS / ".events.log").read_bytes() == events(1, 2, 3)
    assert "Sidecars identical on both sides" in r.stdout

    # A repeated pull transfers nothing and takes no lock: it succeeds while a cluster job
    # holds the dataset's lock (a run that wanted the lock would exit 6).
    with Lease(site.remote, DS, operation="push", host="cluster-node-7"):
        r = ok(tether, site.ws2, "pull", DS, "r", "-y")
    assert "Already up to date" in r.stdout
    assert last_audit(site.ws2)["state"] == "no-op"


def test_ledger_appended_on_both_sides_is_refused(site: Site, tmp_path: Path, tether: Tether) -> None:
    fill(site.ws, tmp_path)
    ok(tether, site.ws, "push", DS, "r", "-y")
    site.write(".events.log", events(1, 2, 3))  # the cluster job appends
    site.ws.write(".events.log", events(1, 2, 99), DS)  # so does the laptop
    before_local, before_remote = local_tree(site.ws), site.files()
    for command in ("push", "pull"):
        r = run(tether, site.ws, command, DS, "r", "-y", "--prefer", "local")
        refused(r, 3, "diverged", "line 3", '{"event": 99}', '{"event": 3}')
        assert local_tree(site.ws) == before_local and site.files() == before_remote


def test_remote_primary_missing_refuses_pull_before_any_change(
    site: Site, tmp_path: Path, tether: Tether
) -> None:
    fill(site.ws, tmp_path)
    ok(tether, site.ws, "push", DS, "r", "-y")
    site.remote.delete(site.rel("records.parquet"))
    fill(site.ws2, tmp_path, rows=4)
    before = local_tree(site.ws2)
    r = run(tether, site.ws2, "pull", DS, "r", "-y")
    refused(r, 3, "no primary file records.parquet")
    assert local_tree(site.ws2) == before


def test_interrupted_pull_and_push_converge(site: Site, tmp_path: Path, tether: Tether) -> None:
    fill(site.ws, tmp_path)
    for i in range(5):
        site.ws.write(f"_derived/part{i}.bin", os.urandom(2000), DS)
    ok(tether, site.ws, "push", DS, "r", "-y")
    r = run_subprocess(
        ["pull", DS, "r", "-y"], cwd=site.ws2.root, env={"TETHER_FAULT_KILL_AT": "downloaded:3"}
    )
    assert r.exit_code != 0
    ok(tether, site.ws2, "pull", DS, "r", "-y")
    assert local_tree(site.ws2) == local_tree(site.ws)

    site.ws2.write("_derived/part0.bin", os.urandom(2000), DS)
    site.ws2.write(".events.log", events(1, 2, 3, 4), DS)
    r = run_subprocess(["push", DS, "r", "-y"], cwd=site.ws2.root, env={"TETHER_FAULT_KILL_AT": "uploaded:1"})
    assert r.exit_code != 0
    ok(tether, site.ws2, "push", DS, "r", "-y")
    assert site.files() == local_tree(site.ws2)
    ok(tether, site.ws, "pull", DS, "r", "-y")
    assert local_tree(site.ws) == local_tree(site.ws2)


# -- primary ------------------------------------------------------------------------------------
def test_local_primary_missing_refuses_push_before_lock(
    local_site: Site, tmp_path: Path, tether: Tether
) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    (s.ws.data / DS / "records.parquet").unlink()
    r = run(tether, s.ws, "push", DS, "r", "-y")
    refused(r, 3, "no primary file records.parquet locally")
    assert not (s.ws.remote_dir / DS).exists()  # no lock, no file, no index


def test_primary_only_transfers_just_the_primary(local_site: Site, tmp_path: Path, tether: Tether) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", DS, "r", "-y", "--primary-only")
    assert set(s.files()) == {"records.parquet"}
    audit = last_audit(s.ws)
    assert audit["scope"]["primary_only"] is True
    assert audit["verification"]["sidecars"] is None  # verification covers what was transferred
    # The rest follows with a full push; nothing the partial run left out was forgotten.
    ok(tether, s.ws, "push", DS, "r", "-y")
    assert s.files() == local_tree(s.ws)
    # A new primary goes alone; sidecar edits wait.
    s.ws.write("records.parquet", parquet_bytes(20, tmp_path), DS)
    s.ws.write("_derived/gc_content.bin", b"changed", DS)
    ok(tether, s.ws, "push", DS, "r", "-y", "--primary-only")
    assert s.read("records.parquet") == (s.ws.data / DS / "records.parquet").read_bytes()
    assert s.read("_derived/gc_content.bin") == b"derived " * 100
    r = run(tether, s.ws, "diff", DS, "r", "--json")
    assert [c["path"] for c in json.loads(r.stdout)["changes"]] == ["_derived/gc_content.bin"]


def test_primary_only_without_a_declared_primary_is_a_usage_error(
    ws: WorkspaceFixture, tether: Tether
) -> None:
    ws.write("a.txt", "a")
    refused(run(tether, ws, "push", "ns/ds", "store", "-y", "--primary-only"), 2, "declares no primary")


# -- sidecars -----------------------------------------------------------------------------------
def test_skip_snapshots_leaves_the_sidecar_out(local_site: Site, tmp_path: Path, tether: Tether) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", DS, "r", "-y", "--skip-snapshots")
    assert not any(p.startswith("_snapshots/") for p in s.files())
    sidecars = last_audit(s.ws)["verification"]["sidecars"]
    assert set(sidecars) == {"_derived", "_auxiliary"}
    refused(run(tether, s.ws, "push", DS, "r", "-y", "--skip", "_nope"), 2, "not a sidecar")


def test_sidecar_difference_fails_the_run_with_exit_4(
    local_site: Site, tmp_path: Path, tether: Tether
) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", DS, "r", "-y")
    s.write("_derived/extra.bin", b"only on the cluster")  # a sidecar file push will not delete
    s.ws.write("_auxiliary/notes.txt", "aux v2\n", DS)
    r = run(tether, s.ws, "push", DS, "r", "-y")
    refused(r, 4, "_derived", "_derived/extra.bin")
    assert s.read("_auxiliary/notes.txt") == b"aux v2\n"  # the transfer itself happened
    audit = last_audit(s.ws)
    assert audit["state"] == "failed"
    assert audit["parts"]["sidecar:_derived"]["sidecar_mismatches"] == ["_derived/extra.bin"]
    # Opting out says so in the audit record; mirror makes the sidecar identical.
    ok(tether, s.ws, "push", DS, "r", "-y", "--no-verify-sidecars")
    assert last_audit(s.ws)["sidecar_check"] is False
    ok(tether, s.ws, "push", DS, "r", "-y", "--mode", "mirror")
    assert "_derived/extra.bin" not in s.files()


def test_same_size_sidecar_edit_is_a_change(local_site: Site, tmp_path: Path, tether: Tether) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", DS, "r", "-y")
    path = s.ws.data / DS / "_derived" / "gc_content.bin"
    st = path.stat()
    path.write_bytes(b"DERIVED " * 100)  # same name, same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime
    r = run(tether, s.ws, "diff", DS, "r", "--json")
    assert r.exit_code == 1
    changes = json.loads(r.stdout)["changes"]
    assert [(c["path"], c["status"]) for c in changes] == [("_derived/gc_content.bin", "modified_local")]
    ok(tether, s.ws, "push", DS, "r", "-y")
    assert s.read("_derived/gc_content.bin") == b"DERIVED " * 100


def test_sidecar_corrupted_on_the_remote_is_caught(local_site: Site, tmp_path: Path, tether: Tether) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", DS, "r", "-y")
    target = s.ws.remote_dir / DS / "_derived" / "gc_content.bin"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[7] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # silent corruption: size and mtime kept
    r = run(tether, s.ws, "diff", DS, "r", "--checksum", "--json")
    assert r.exit_code == 1
    assert [c["path"] for c in json.loads(r.stdout)["changes"]] == ["_derived/gc_content.bin"]
    refused(run(tether, s.ws, "push", DS, "r", "-y", "--checksum"), 3, "_derived/gc_content.bin")
    ok(tether, s.ws, "push", DS, "r", "-y", "--checksum", "--prefer", "local")
    assert s.read("_derived/gc_content.bin") == b"derived " * 100


# -- ledgers ------------------------------------------------------------------------------------
def test_ledger_rules(local_site: Site, tmp_path: Path, tether: Tether) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", DS, "r", "-y")
    # Local appends: push extends the remote copy.
    s.ws.write(".events.log", events(1, 2, 3), DS)
    ok(tether, s.ws, "push", DS, "r", "-y")
    assert s.read(".events.log") == events(1, 2, 3)
    # The remote grew further: push keeps it (never truncates) and says pull.
    s.write(".events.log", events(1, 2, 3, 4))
    r = run(tether, s.ws, "diff", DS, "r", "--json")
    change = json.loads(r.stdout)["changes"][0]
    assert change["action"] == {"push": "skip", "pull": "download"}
    assert json.loads(r.stdout)["ledgers"][0]["growth"] == "remote_ahead"
    ok(tether, s.ws, "push", DS, "r", "-y")
    assert s.read(".events.log") == events(1, 2, 3, 4)
    ok(tether, s.ws, "pull", DS, "r", "-y")
    assert (s.ws.data / DS / ".events.log").read_bytes() == events(1, 2, 3, 4)


def test_ledger_truncated_on_the_remote_is_refused(local_site: Site, tmp_path: Path, tether: Tether) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    s.ws.write(".events.log", events(1, 2, 3), DS)
    ok(tether, s.ws, "push", DS, "r", "-y")
    s.write(".events.log", events(1))  # truncated at a record boundary: still a prefix
    before = s.files()
    r = run(tether, s.ws, "push", DS, "r", "-y")
    refused(r, 3, "truncated or edited", "--prefer local")
    assert s.files() == before
    refused(run(tether, s.ws, "pull", DS, "r", "-y", "--prefer", "remote"), 3, "truncated")
    # The longer copy is right: the user says so and the remote is restored.
    ok(tether, s.ws, "push", DS, "r", "-y", "--prefer", "local")
    assert s.read(".events.log") == events(1, 2, 3)


def test_ledger_edited_in_place_is_refused(local_site: Site, tmp_path: Path, tether: Tether) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", DS, "r", "-y")
    s.ws.write(".events.log", events(7, 2, 3), DS)  # rewrote record 1 and appended
    r = run(tether, s.ws, "push", DS, "r", "-y", "--prefer", "local")
    refused(r, 3, ".events.log", "line 1")
    assert s.read(".events.log") == events(1, 2)


def test_unterminated_jsonl_record_is_not_sent(local_site: Site, tmp_path: Path, tether: Tether) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", DS, "r", "-y")
    s.ws.write(".events.log", events(1, 2) + b'{"event": 3, "partial', DS)  # a writer mid-append
    refused(run(tether, s.ws, "push", DS, "r", "-y"), 3, "unterminated")
    assert s.read(".events.log") == events(1, 2)
    s.ws.write(".events.log", events(1, 2) + b'{"x": "' + b"y" * (1024 * 1024 + 10) + b'"}\n', DS)
    refused(run(tether, s.ws, "push", DS, "r", "-y"), 3, "limit 1 MiB")
    s.ws.write(".events.log", events(1, 2) + b"[1, 2]\n", DS)
    refused(run(tether, s.ws, "push", DS, "r", "-y"), 3, "not a JSON object")
    s.ws.write(".events.log", events(1, 2, 3), DS)
    ok(tether, s.ws, "push", DS, "r", "-y")


def test_ledger_growing_during_push_is_not_torn(local_site: Site, tmp_path: Path, tether: Tether) -> None:
    """The run works on the snapshot it scanned: bytes appended after the scan make the upload
    fail its digest or its re-check, nothing torn is promoted, and a rerun converges."""
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", DS, "r", "-y")
    ledger = s.ws.data / DS / ".events.log"
    ledger.write_bytes(events(1, 2, 3))
    from tether import sync
    from tether.progress import Progress

    class AppendWhileUploading(Progress):
        def stage(self, name: str, *, files: int | None = None, bytes: int | None = None) -> None:
            if name == "uploading":
                with open(ledger, "ab") as f:
                    f.write(events(4))

    with pytest.raises(Exception) as info:
        sync.push(DS, "r", workspace=s.ws.root, progress=AppendWhileUploading(), confirm=lambda plan: True)
    assert "changed locally" in str(info.value)
    assert s.read(".events.log") == events(1, 2)
    ok(tether, s.ws, "push", DS, "r", "-y")
    assert s.read(".events.log") == events(1, 2, 3, 4)


# -- verification modes -------------------------------------------------------------------------
def test_verify_parquet_on_a_non_parquet_primary_is_an_error(
    local_site: Site, tmp_path: Path, tether: Tether
) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    s.ws.write("records.parquet", b"id,seq\n1,ACGT\n", DS)  # a CSV under a Parquet name
    r = run(tether, s.ws, "push", DS, "r", "-y", "--verify", "parquet")
    refused(r, 2, "cannot check records.parquet", "PAR1")
    assert not (s.ws.remote_dir / DS).exists()
    r = ok(tether, s.ws, "push", DS, "r", "-y", "--verify", "auto")
    assert "fell back" in r.stderr and "records.parquet" in r.stderr
    verification = last_audit(s.ws)["verification"]
    assert verification["mode"] == "auto" and verification["fallbacks"]


def test_verify_size_is_recorded(local_site: Site, tmp_path: Path, tether: Tether) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    r = ok(tether, s.ws, "push", DS, "r", "-y", "--verify", "size")
    assert "Verified (size)" in r.stdout
    assert last_audit(s.ws)["parts"]["primary"]["verified"] == "size"


def test_staged_pull_rejects_a_remote_symlink_or_fifo(
    local_site: Site, tmp_path: Path, tether: Tether
) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", DS, "r", "-y")
    fill(s.ws2, tmp_path, rows=2)
    before = local_tree(s.ws2)
    evil = s.ws.remote_dir / DS / "_derived" / "evil"
    evil.symlink_to("/etc/passwd")
    refused(run(tether, s.ws2, "pull", DS, "r", "-y", "--prefer", "remote"), 2, "_derived/evil", "symlink")
    assert local_tree(s.ws2) == before
    evil.unlink()
    os.mkfifo(evil)
    refused(run(tether, s.ws2, "pull", DS, "r", "-y", "--prefer", "remote"), 2, "_derived/evil")
    assert local_tree(s.ws2) == before


# -- targets and ids ----------------------------------------------------------------------------
def test_file_mode_syncs_one_file(local_site: Site, tmp_path: Path, tether: Tether) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", str(s.ws.data / DS / "_derived" / "gc_content.bin"), "r", "-y")
    assert set(s.files()) == {"_derived/gc_content.bin"}
    assert last_audit(s.ws)["scope"]["file"] == "_derived/gc_content.bin"
    ok(tether, s.ws, "push", DS, "r", "-y")
    s.write("_derived/gc_content.bin", b"from the cluster")
    s.write("_auxiliary/notes.txt", b"also changed")
    ok(tether, s.ws, "pull", str(s.ws.data / DS / "_derived" / "gc_content.bin"), "r", "-y")
    assert (s.ws.data / DS / "_derived" / "gc_content.bin").read_bytes() == b"from the cluster"
    assert (s.ws.data / DS / "_auxiliary" / "notes.txt").read_text() == "aux\n"
    # A file that is not here yet comes down by its path inside the dataset; a typo is an error.
    s.write("_derived/new_column.bin", b"computed on the cluster")
    ok(tether, s.ws, "pull", str(s.ws.data / DS / "_derived" / "new_column.bin"), "r", "-y")
    assert (s.ws.data / DS / "_derived" / "new_column.bin").read_bytes() == b"computed on the cluster"
    assert (s.ws.data / DS / "_auxiliary" / "notes.txt").read_text() == "aux\n"  # still untouched
    r = run(tether, s.ws, "pull", str(s.ws.data / DS / "_derived" / "new_colum.bin"), "r", "-y")
    refused(r, 2, "new_colum.bin", "exists neither")


def test_bare_names_strict_ids_and_bootstrap(local_site: Site, tmp_path: Path, tether: Tether) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", "ds", "r", "-y")  # the one local dataset called ds
    assert last_audit(s.ws)["dataset"] == DS
    s.ws.write("x.txt", "x", "other/ds")
    refused(run(tether, s.ws, "diff", "ds", "r"), 2, "densegen/ds", "other/ds")
    refused(run(tether, s.ws, "push", "ds", "r", "-y", "--strict-id"), 2, "namespace/name")
    refused(run(tether, s.ws, "push", str(s.ws.data / DS), "r", "-y", "--strict-id"), 2, "namespace/name")
    os.environ["TETHER_STRICT_ID"] = "1"
    try:
        refused(run(tether, s.ws, "push", "ds", "r", "-y"), 2, "namespace/name")
    finally:
        del os.environ["TETHER_STRICT_ID"]
    # A dataset that does not exist here yet comes down by its explicit id.
    ok(tether, s.ws2, "pull", DS, "r", "-y", "--strict-id")
    assert local_tree(s.ws2) == local_tree(s.ws)


# -- profiles -----------------------------------------------------------------------------------
def test_profile_configuration_errors_are_clear(ws: WorkspaceFixture, tether: Tether) -> None:
    ws.write("a.txt", "a")
    toml = ws.root / "tether.toml"
    base = toml.read_text()
    for extra, words in [
        ('\n[datasets]\n"ns/*" = "missing"\n', ["missing", "not defined"]),
        ('\n[profiles.p]\nprimay = "x"\n', ["unknown key", "primay"]),
        ('\n[profiles.p]\nappend_only = [{ path = "e.log", format = "xml" }]\n', ["format", "jsonl"]),
        ('\n[profiles.p]\nsidecars = ["../up"]\n', ["sidecars"]),
    ]:
        toml.write_text(base + extra)
        r = run(tether, ws, "diff", "ns/ds", "store")
        refused(r, 2, *words)


def test_profile_matching_prefers_exact_ids_then_longer_globs() -> None:
    from tether.profiles import profile_for

    raw = {
        "profiles": {"a": {"primary": "a.parquet"}, "b": {"primary": "b.parquet"}},
        "datasets": {"*": "a", "densegen/*": "b", "densegen/x": {"primary": "x.parquet"}},
    }
    assert profile_for(raw, "other/y").primary == "a.parquet"
    assert profile_for(raw, "densegen/y").primary == "b.parquet"
    assert profile_for(raw, "densegen/x").primary == "x.parquet"
    assert profile_for({}, "densegen/x").primary is None


def test_audit_json_out_for_diff_and_dry_run(local_site: Site, tmp_path: Path, tether: Tether) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    out = tmp_path / "diff.json"
    assert run(tether, s.ws, "diff", DS, "r", "--audit-json-out", str(out)).exit_code == 1
    record = json.loads(out.read_text())
    assert record["state"] == "diff-only" and record["operation"] == "diff"
    assert record["parts"]["primary"]["changed"] == 1
    ok(tether, s.ws, "push", DS, "r", "--dry-run", "--audit-json-out", str(out))
    assert json.loads(out.read_text())["state"] == "dry-run"


def test_a_symlink_planted_in_staging_is_never_promoted(
    local_site: Site, tmp_path: Path, tether: Tether
) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", DS, "r", "-y")
    secret = tmp_path / "secret.txt"
    secret.write_bytes((s.ws.data / DS / "_auxiliary" / "notes.txt").read_bytes())  # right bytes
    staged = s.ws2.root / ".tether" / "staging" / "r" / DS / "_auxiliary" / "notes.txt"
    staged.parent.mkdir(parents=True)
    staged.symlink_to(secret)
    ok(tether, s.ws2, "pull", DS, "r", "-y")
    landed = s.ws2.data / DS / "_auxiliary" / "notes.txt"
    assert not landed.is_symlink() and landed.read_text() == "aux\n"


def test_ledger_growing_on_the_remote_during_pull_is_not_torn(
    local_site: Site, tmp_path: Path, tether: Tether
) -> None:
    s = local_site
    fill(s.ws, tmp_path)
    ok(tether, s.ws, "push", DS, "r", "-y")
    ok(tether, s.ws2, "pull", DS, "r", "-y")
    s.write(".events.log", events(1, 2, 3))
    from tether import sync
    from tether.errors import TetherError
    from tether.progress import Progress

    class ClusterAppendsWhileDownloading(Progress):
        def stage(self, name: str, *, files: int | None = None, bytes: int | None = None) -> None:
            if name == "downloading":
                with open(s.ws.remote_dir / DS / ".events.log", "ab") as f:
                    f.write(events(4))

    with pytest.raises(TetherError) as info:
        sync.pull(DS, "r", workspace=s.ws2.root, progress=ClusterAppendsWhileDownloading())
    assert "ledger .events.log grew while it was transferred" in str(info.value)
    assert info.value.exit_code == 4
    assert (s.ws2.data / DS / ".events.log").read_bytes() == events(1, 2)  # nothing promoted
    ok(tether, s.ws2, "pull", DS, "r", "-y")
    assert (s.ws2.data / DS / ".events.log").read_bytes() == events(1, 2, 3, 4)
