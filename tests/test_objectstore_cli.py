"""The command line with s3:// remotes against real S3 servers on 127.0.0.1.

The loop (push, diff, pull) with credentials from config.local.toml or the environment; a large
upload killed mid-multipart that the rerun resumes; the lock on stores with and without
conditional writes; every failure as a one-line error with its exit code; hostile and foreign
prefixes; secrets kept out of output and audit records; `tether remote import-rclone`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import obstore
import pytest
import tomlkit

from conftest import Result, WorkspaceFixture, make_workspace, run_subprocess
from s3servers import S3Server, ThrottlingProxy, get_server, unique_prefix
from tether import sync
from tether.config import RemoteConfig
from tether.errors import ExitCode, LockHeld, StalePlanError
from tether.lock import Lease
from tether.manifest import Manifest
from tether.progress import Progress
from tether.remotes import objectstore, open_remote
from tether.remotes.objectstore_multipart import journals
from tether.scan import StatEntry

DS = "ns/ds"
MiB = 1024 * 1024
MULTIPART = {"part_size": "5MiB", "multipart_threshold": "6MiB", "part_concurrency": 2}  # from 6 MiB
Tether = Callable[..., Result]


@pytest.fixture(autouse=True)
def no_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in [v for v in os.environ if v.startswith("AWS_") and v != "AWS_CA_BUNDLE"]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "_aws_credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "_aws_config"))


@pytest.fixture
def rclone() -> S3Server:
    return get_server("rclone")


@pytest.fixture
def moto() -> S3Server:
    return get_server("moto")


@pytest.fixture
def proxy(rclone: S3Server) -> Iterator[ThrottlingProxy]:
    """A proxy in front of the rclone server that counts requests and injects faults."""
    counting = ThrottlingProxy(rclone.endpoint)
    try:
        yield counting
    finally:
        counting.close()


def add_s3_remote(
    ws: WorkspaceFixture, server: S3Server, *, name: str = "s3", prefix: str | None = None, **options: object
) -> str:
    """Shared options in tether.toml, keys in .tether/config.local.toml (as a user would)."""
    prefix = prefix or unique_prefix()
    opts = server.options(**options)
    secrets = {k: opts.pop(k) for k in ("access_key_id", "secret_access_key")}
    for path, table in (
        (ws.root / "tether.toml", {"url": server.url(prefix), **opts}),
        (ws.root / ".tether/config.local.toml", secrets),
    ):
        doc = tomlkit.parse(path.read_text()) if path.exists() else tomlkit.document()
        doc.setdefault("remotes", {})[name] = table
        path.write_text(tomlkit.dumps(doc))
    return prefix


def _remote(server: S3Server, prefix: str, tmp: Path, **options: object):  # type: ignore[no-untyped-def]
    return open_remote(
        RemoteConfig("x", server.url(prefix), server.options(**options), "t"), workspace_root=tmp
    )


def _files(ws: WorkspaceFixture, n: int) -> dict[str, bytes]:
    files = {f"d{i % 3}/f{i:03d}.txt": f"file {i}\n".encode() * (i + 1) for i in range(n)}
    for rel, data in files.items():
        ws.write(rel, data)
    return files


def _a_large_and_a_small_file(ws: WorkspaceFixture, size: int) -> bytes:
    """big.bin (multipart with MULTIPART's options) beside small.txt (a single PUT)."""
    data = os.urandom(size)
    ws.write("big.bin", data)
    ws.write("small.txt", "small")
    return data


def _clean_error(r: Result, code: int, *words: str) -> None:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    assert "error:" in r.stderr and "hint:" in r.stderr, r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1
    for word in words:
        assert word in r.stderr, r.stderr


# -- the loop -----------------------------------------------------------------------------------
def test_push_diff_pull_round_trip(
    rclone: S3Server, tmp_path: Path, tether: Tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, rclone)
    files = _files(ws, 30)
    assert tether("diff", DS, "s3", cwd=ws.root).exit_code == 1
    r = tether("push", DS, "s3", "-y", cwd=ws.root)
    assert r.exit_code == 0, r.output
    stored = rclone.data_dir / rclone.bucket / prefix / DS  # type: ignore[operator]
    assert {
        str(p.relative_to(stored)): p.read_bytes()
        for p in stored.rglob("*")
        if p.is_file() and ".tether" not in p.parts
    } == files
    assert (stored / ".tether" / "index").exists()
    assert tether("diff", DS, "s3", cwd=ws.root).exit_code == 0

    # a collaborator with keys in the environment, not in a file
    other = make_workspace(tmp_path, "ws2")
    opts = rclone.options()
    del opts["access_key_id"], opts["secret_access_key"]
    doc = tomlkit.parse((other.root / "tether.toml").read_text())
    doc["remotes"]["s3"] = {"url": rclone.url(prefix), **opts}
    (other.root / "tether.toml").write_text(tomlkit.dumps(doc))
    for k, v in rclone.env().items():
        monkeypatch.setenv(k, v)
    r = tether("pull", DS, "s3", "-y", cwd=other.root)
    assert r.exit_code == 0, r.output
    assert {
        str(p.relative_to(other.data / DS)): p.read_bytes()
        for p in (other.data / DS).rglob("*")
        if p.is_file()
    } == files

    other.write("d0/f000.txt", "changed by the collaborator\n")
    assert tether("push", DS, "s3", "-y", cwd=other.root).exit_code == 0
    assert tether("diff", DS, "s3", cwd=ws.root).exit_code == 1
    assert tether("pull", DS, "s3", "-y", cwd=ws.root).exit_code == 0
    assert (ws.data / DS / "d0/f000.txt").read_text() == "changed by the collaborator\n"
    assert tether("diff", DS, "s3", cwd=ws.root).exit_code == 0


def test_no_op_diff_costs_only_listing_requests(
    rclone: S3Server, proxy: ThrottlingProxy, tmp_path: Path, tether: Tether
) -> None:
    ws = make_workspace(tmp_path)
    add_s3_remote(ws, rclone, endpoint=proxy.endpoint)
    _files(ws, 40)
    assert tether("push", DS, "s3", "-y", cwd=ws.root).exit_code == 0
    proxy.requests.clear()
    assert tether("diff", DS, "s3", cwd=ws.root).exit_code == 0
    # a LIST for the check, LISTs of the dataset (a probe of its folders, then one per
    # folder), a GET of the index: nothing per file, however many files there are
    assert all(m == "GET" for m, _p in proxy.requests), proxy.requests
    assert len(proxy.requests) <= 8, proxy.requests
    proxy.requests.clear()
    r = tether("push", DS, "s3", "-y", cwd=ws.root)
    assert r.exit_code == 0 and "up to date" in r.output.lower(), r.output
    # the same, and the lock taken before the look (-y): its record written, read, deleted
    # (and, under the lock, a LIST of abandoned multipart uploads to clear)
    assert _lock_writes(proxy) == ["PUT", "delete"], proxy.requests
    per_run = ("list-type=2", "/.tether/", "?uploads", "?delete")
    per_file = [p for _m, p in proxy.requests if not any(word in p for word in per_run)]
    assert per_file == []
    assert len(proxy.requests) <= 16, proxy.requests  # 40 files: far fewer than one each


def test_downloads_run_on_download_connections_and_jobs_sets_both(
    rclone: S3Server, tmp_path: Path, tether: Tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GETs cost the store less than PUTs: a pull runs more requests at once than a push
    (download_connections, connections); --jobs sets both for one run."""
    used: list[tuple[str, int]] = []
    for name in ("push_changes", "pull_changes"):
        real = getattr(sync, name)

        def spy(*args, _real=real, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            used.append((_name, kwargs["jobs"]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(sync, name, spy)
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, rclone, connections=5, download_connections=7)
    files = _files(ws, 6)
    other = make_workspace(tmp_path, "other")
    add_s3_remote(other, rclone, prefix=prefix, connections=5, download_connections=7)
    for args, cwd in (
        (["push", DS, "s3", "-y"], ws.root),
        (["pull", DS, "s3", "-y"], other.root),
        (["push", DS, "s3", "-y", "--jobs", "3"], other.root),
    ):
        if args[0] == "push" and cwd == other.root:
            other.write("d0/f000.txt", "changed")
        r = tether(*args, cwd=cwd)
        assert r.exit_code == 0, r.output
    third = make_workspace(tmp_path, "third")
    add_s3_remote(third, rclone, prefix=prefix, connections=5, download_connections=7)
    r = tether("pull", DS, "s3", "-y", "--jobs", "3", cwd=third.root)
    assert r.exit_code == 0, r.output
    assert used == [("push_changes", 5), ("pull_changes", 7), ("push_changes", 3), ("pull_changes", 3)]
    bad = make_workspace(tmp_path, "bad")
    add_s3_remote(bad, rclone, prefix=prefix, download_connections=0)
    r = tether("pull", DS, "s3", "-y", cwd=bad.root)
    assert r.exit_code == ExitCode.USAGE, r.output
    assert "option download_connections must be a positive number, not 0" in r.stderr
    assert "Traceback" not in r.output
    assert (third.data / DS / "d0/f000.txt").read_bytes() == b"changed"
    assert (third.data / DS / "d1/f001.txt").read_bytes() == files["d1/f001.txt"]


@pytest.mark.parametrize("kind", ["rclone", "moto"])
def test_a_push_records_the_etags_it_was_answered_and_lists_nothing_after_its_uploads(
    kind: str, tmp_path: Path, tether: Tether
) -> None:
    """The index vouches for objects by (size, ETag): single PUTs' tags as answered (one of
    them checked by a HEAD), a multipart object's by one HEAD (rclone serve s3 lists the whole
    object's MD5, not the completion's tag). The next look trusts them without a byte read,
    still sees an object replaced behind tether's back with the same size, and a pull gives
    files their pushed mtime. moto lists multipart ETags as the completion answered them."""
    server = get_server(kind)
    proxy = ThrottlingProxy(server.endpoint)
    try:
        _etags_recorded(server, proxy, tmp_path, tether)
    finally:
        proxy.close()


def _etags_recorded(server: S3Server, proxy: ThrottlingProxy, tmp_path: Path, tether: Tether) -> None:
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, server, endpoint=proxy.endpoint, **MULTIPART)
    files = _files(ws, 30)
    ws.write("big.bin", os.urandom(13 * MiB))
    pushed_mtime = 1_600_000_000_123_456_789
    os.utime(ws.data / DS / "d1/f001.txt", ns=(pushed_mtime, pushed_mtime))
    assert tether("push", DS, "s3", "-y", cwd=ws.root).exit_code == 0
    lists = [i for i, (m, p) in enumerate(proxy.requests) if m == "GET" and "list-type=2" in p]
    first_upload = min(i for i, (m, p) in enumerate(proxy.requests) if m in ("PUT", "POST") and "/d0/" in p)
    assert lists and max(lists) < first_upload, proxy.requests  # no listing after the uploads
    heads = sorted(p for m, p in proxy.requests if m == "HEAD" and "/.tether/" not in p)
    sampled = [p for p in heads if not p.endswith("/big.bin")]  # one PUT's answer checked
    assert heads == sorted([f"/{server.bucket}/{prefix}/{DS}/big.bin", *sampled]) and len(sampled) == 1, heads
    listed = {
        m["path"].removeprefix(f"{prefix}/{DS}/"): m["e_tag"].strip('"')
        for m in obstore.list(server.store(), f"{prefix}/{DS}/").collect()
        if "/.tether/" not in m["path"]
    }
    index = Manifest.loads(obstore.get(server.store(), f"{prefix}/{DS}/.tether/index").bytes().to_bytes())
    assert {e.path: e.etag for e in index.entries} == listed
    assert len(listed) == len(files) + 1

    proxy.requests.clear()
    assert tether("diff", DS, "s3", cwd=ws.root).exit_code == 0
    assert [p for _m, p in proxy.requests if f"/{DS}/" in p and "/.tether/" not in p] == []  # nothing read

    # replaced behind tether's back: same size, other bytes
    theirs = b"X" * len(files["d2/f002.txt"])
    obstore.put(server.store(), f"{prefix}/{DS}/d2/f002.txt", theirs)
    r = tether("diff", DS, "s3", "--json", cwd=ws.root)
    assert r.exit_code == 1, r.output
    assert "d2/f002.txt" in r.stdout

    other = make_workspace(tmp_path, "ws2")
    add_s3_remote(other, server, prefix=prefix, **MULTIPART)
    assert tether("pull", DS, "s3", "-y", cwd=other.root).exit_code == 0
    assert (other.data / DS / "d2/f002.txt").read_bytes() == theirs
    assert (other.data / DS / "d1/f001.txt").stat().st_mtime_ns == pushed_mtime


@pytest.mark.parametrize("store", ["more multipart objects than HEADs", "PUTs answered unlike listed"])
def test_a_push_whose_tags_are_not_all_known_lists_the_prefix_instead(
    rclone: S3Server,
    proxy: ThrottlingProxy,
    tmp_path: Path,
    tether: Tether,
    monkeypatch: pytest.MonkeyPatch,
    store: str,
) -> None:
    """More multipart objects than are worth a HEAD each, or a store whose PUT answers name
    objects otherwise than its HEADs and listings (the one PUT checked by a HEAD shows it): the
    index takes its tags from one listing after the uploads, and the next look reads no byte."""
    if store == "more multipart objects than HEADs":
        monkeypatch.setattr(objectstore, "MAX_TAG_LOOKUPS", 0)
    else:
        proxy.put_etag_prefix = "other-form-"
    ws = make_workspace(tmp_path)
    add_s3_remote(ws, rclone, endpoint=proxy.endpoint, **MULTIPART)
    _files(ws, 5)
    ws.write("big.bin", os.urandom(7 * MiB))
    assert tether("push", DS, "s3", "-y", cwd=ws.root).exit_code == 0
    completed = max(i for i, (m, p) in enumerate(proxy.requests) if m == "POST" and "uploadId=" in p)
    assert any(m == "GET" and "list-type=2" in p for m, p in proxy.requests[completed:]), proxy.requests
    proxy.requests.clear()
    assert tether("diff", DS, "s3", cwd=ws.root).exit_code == 0
    assert [p for _m, p in proxy.requests if f"/{DS}/" in p and "/.tether/" not in p] == []


# -- large files --------------------------------------------------------------------------------
def test_killed_multipart_upload_resumes_its_parts(
    rclone: S3Server, proxy: ThrottlingProxy, tmp_path: Path, tether: Tether
) -> None:
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, rclone, **MULTIPART)
    data = _a_large_and_a_small_file(ws, 48 * MiB)
    r = run_subprocess(["push", DS, "s3", "-y"], ws.root, env={"TETHER_FAULT_KILL_AT": "part_uploaded:5"})
    assert r.exit_code == -9, r.output  # SIGKILL at the checkpoint
    [journal] = journals(ws.root / ".tether", f"s3://{rclone.bucket}/{prefix}")
    assert len(journal.parts) >= 5
    assert len(list(rclone.client().list_uploads(prefix + "/"))) == 1
    parts_total = -(-len(data) // (5 * MiB))

    # the rerun goes through a proxy that counts requests
    add_s3_remote(ws, rclone, prefix=prefix, endpoint=proxy.endpoint, **MULTIPART)
    r = tether("push", DS, "s3", "-y", cwd=ws.root)
    assert r.exit_code == 0, r.output
    resent = proxy.count("PUT", "partNumber=")
    assert resent <= parts_total - len(journal.parts), (resent, len(journal.parts))
    stored = rclone.data_dir / rclone.bucket / prefix / DS / "big.bin"  # type: ignore[operator]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert list(rclone.client().list_uploads(prefix + "/")) == []  # no orphan uploads
    assert journals(ws.root / ".tether", f"s3://{rclone.bucket}/{prefix}") == []

    # and back down: a ranged parallel download into a fresh workspace
    other = make_workspace(tmp_path, "ws2")
    add_s3_remote(other, rclone, prefix=prefix, **MULTIPART)
    assert tether("pull", DS, "s3", "-y", cwd=other.root).exit_code == 0
    assert (other.data / DS / "big.bin").read_bytes() == data


# -- the lock -----------------------------------------------------------------------------------
def test_lock_with_conditional_writes_one_of_two_takers_wins(moto: S3Server, tmp_path: Path) -> None:
    prefix = unique_prefix()
    remotes = [_remote(moto, prefix, tmp_path) for _ in range(2)]
    outcome: list[str] = []
    barrier = threading.Barrier(2)

    def take(remote, host: str) -> None:  # type: ignore[no-untyped-def]
        barrier.wait()
        try:
            Lease(remote, DS, operation="push", host=host).acquire()
            outcome.append("won")
        except LockHeld:
            outcome.append("held")

    threads = [threading.Thread(target=take, args=(r, f"host{i}")) for i, r in enumerate(remotes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome) == ["held", "won"]


def test_push_waits_for_a_lock_held_elsewhere(moto: S3Server, tmp_path: Path, tether: Tether) -> None:
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, moto)
    _files(ws, 3)
    lease = Lease(_remote(moto, prefix, tmp_path), DS, operation="push", host="other-machine")
    lease.acquire()
    try:
        r = tether("push", DS, "s3", "-y", cwd=ws.root)
        assert r.exit_code == 6, r.output
        assert "other-machine" in r.stderr
    finally:
        lease.release()
    assert tether("push", DS, "s3", "-y", cwd=ws.root).exit_code == 0


def test_lock_fallback_on_a_store_without_conditional_writes(
    rclone: S3Server, tmp_path: Path, tether: Tether
) -> None:
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, rclone)
    _files(ws, 3)
    r = tether("push", DS, "s3", "-y", cwd=ws.root)
    assert r.exit_code == 0, r.output
    lease = Lease(_remote(rclone, prefix, tmp_path), DS, operation="push", host="other-machine")
    lease.acquire()
    try:
        ws.write("new.txt", "new")
        r = tether("push", DS, "s3", "-y", cwd=ws.root)
        assert r.exit_code == 6, r.output
    finally:
        lease.release()


def _lock_writes(proxy: ThrottlingProxy) -> list[str]:
    """The writes seen: PUTs (of the lock record only) and deletes (a DELETE or a bulk POST)."""
    puts = [p.split("?")[0] for m, p in proxy.requests if m == "PUT"]
    assert all(p.endswith("/.tether/lock") for p in puts), puts
    deletes = [m for m, p in proxy.requests if m == "DELETE" or (m == "POST" and p.endswith("?delete"))]
    return ["PUT"] * len(puts) + ["delete"] * len(deletes)


def _pushed_through(
    proxy: ThrottlingProxy, server: S3Server, tmp_path: Path, tether: Tether, n: int
) -> tuple[str, dict[str, bytes]]:
    """A workspace that pushed ``n`` files through ``proxy``: the remote's prefix, the files."""
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, server, endpoint=proxy.endpoint)
    files = _files(ws, n)
    assert tether("push", DS, "s3", "-y", cwd=ws.root).exit_code == 0
    return prefix, files


def test_the_stores_verdict_on_conditional_writes_is_kept_a_day_in_the_workspace(
    rclone: S3Server, proxy: ThrottlingProxy, tmp_path: Path, tether: Tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe (conditional PUTs and a DELETE) runs once; later runs of the workspace take
    its verdict from .tether/store-probes.json until it is a day old or damaged, and
    `tether remote test` asks afresh and records what it found."""

    def probes() -> int:
        count = sum("cw-probe" in path for _m, path in proxy.requests)
        proxy.requests.clear()
        monkeypatch.setattr(objectstore, "_probe_cache", {})  # as a new process starts
        return count

    ws = make_workspace(tmp_path)
    add_s3_remote(ws, rclone, endpoint=proxy.endpoint)
    _files(ws, 3)
    memo = ws.root / ".tether" / objectstore.PROBES_FILE
    probes()
    assert tether("push", DS, "s3", "-y", cwd=ws.root).exit_code == 0
    asked = probes()  # rclone refuses the first conditional PUT outright: a PUT and a DELETE
    assert asked >= 2
    [entry] = json.loads(memo.read_text()).values()
    assert entry["conditional_writes"] is False  # rclone serve s3 does not enforce If-None-Match
    ws.write("d0/f000.txt", "edited")
    r = tether("push", DS, "s3", "-y", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert probes() == 0
    assert "does not enforce conditional writes" in r.stderr  # the verdict still says so
    for spoil in ("day old", "damaged"):
        if spoil == "day old":
            entry["checked"] -= objectstore.PROBE_TTL_S + 1
            memo.write_text(json.dumps({next(iter(json.loads(memo.read_text()))): entry}))
        else:
            memo.write_text("{not json")
        ws.write("d0/f000.txt", spoil)
        assert tether("push", DS, "s3", "-y", cwd=ws.root).exit_code == 0
        assert probes() == asked, spoil
    memo.unlink()
    assert tether("remote", "test", "s3", cwd=ws.root).exit_code == 0
    assert probes() == asked
    assert [e["conditional_writes"] for e in json.loads(memo.read_text()).values()] == [False]
    memo.unlink()
    memo.mkdir()  # a record that cannot be written: every run probes, none fails for it
    for edit in ("one", "two"):
        ws.write("d0/f000.txt", edit)
        r = tether("push", DS, "s3", "-y", cwd=ws.root)
        assert r.exit_code == 0, r.output
        assert probes() == asked
    assert memo.is_dir() and list(memo.iterdir()) == []


def _another_workspace(
    proxy: ThrottlingProxy, server: S3Server, tmp_path: Path, name: str, prefix: str
) -> WorkspaceFixture:
    ws = make_workspace(tmp_path, name)
    add_s3_remote(ws, server, prefix=prefix, endpoint=proxy.endpoint)
    return ws


def _dataset_looks(proxy: ThrottlingProxy, prefix: str) -> int:
    """How many times the dataset was listed: each look starts with one delimited LIST of it."""
    looks = 0
    for method, path in proxy.requests:
        query = parse_qs(urlsplit(path).query)
        if method == "GET" and "delimiter" in query and query.get("prefix") == [f"{prefix}/{DS}/"]:
            looks += 1
    return looks


def test_a_pull_nobody_reviews_lists_the_remote_once_under_the_lock(
    rclone: S3Server, proxy: ThrottlingProxy, tmp_path: Path, tether: Tether
) -> None:
    prefix, files = _pushed_through(proxy, rclone, tmp_path, tether, 12)
    reviewed = _another_workspace(proxy, rclone, tmp_path, "reviewed", prefix)
    proxy.requests.clear()
    # a person confirmed the plan: planned before the lock, looked at again under it
    sync.pull(DS, "s3", workspace=reviewed.root, confirm=lambda plan: True)
    assert _dataset_looks(proxy, prefix) == 2
    unattended = _another_workspace(proxy, rclone, tmp_path, "unattended", prefix)
    proxy.requests.clear()
    r = tether("pull", DS, "s3", "-y", cwd=unattended.root)
    assert r.exit_code == 0, r.output
    assert _dataset_looks(proxy, prefix) == 1
    assert _lock_writes(proxy) == ["PUT", "delete"], proxy.requests
    for w in (reviewed, unattended):
        assert {rel: (w.data / DS / rel).read_bytes() for rel in files} == files


def test_an_unattended_run_with_the_lock_taken_still_ends_in_step_when_nothing_moves(
    rclone: S3Server, tmp_path: Path, tether: Tether
) -> None:
    """Taking the lock first is only a shortcut: a run that cannot take it plans as before, so a
    pull with nothing to do ends in step, and one with work exits 6 naming the holder."""
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, rclone)
    _files(ws, 3)
    assert tether("push", DS, "s3", "-y", cwd=ws.root).exit_code == 0
    lease = Lease(_remote(rclone, prefix, tmp_path), DS, operation="push", host="other-machine")
    lease.acquire()
    try:
        r = tether("pull", DS, "s3", "-y", cwd=ws.root)
        assert r.exit_code == 0, r.output
        ws.write("d0/f000.txt", "edited here")
        r = tether("push", DS, "s3", "-y", cwd=ws.root)
        assert r.exit_code == 6 and "other-machine" in r.stderr, r.output
    finally:
        lease.release()
    assert tether("push", DS, "s3", "-y", cwd=ws.root).exit_code == 0


def test_read_only_keys_pull_what_there_is_and_a_no_op_stays_exit_0(
    rclone: S3Server, proxy: ThrottlingProxy, tmp_path: Path, tether: Tether
) -> None:
    """Keys that may only read (a shared bucket's collaborators) cannot write the lock: the
    pull goes ahead without it, says so, and writes nothing on the store."""
    prefix, files = _pushed_through(proxy, rclone, tmp_path, tether, 4)
    reader = _another_workspace(proxy, rclone, tmp_path, "reader", prefix)
    proxy.read_only = True
    proxy.requests.clear()
    r = tether("pull", DS, "s3", "-y", cwd=reader.root)
    assert r.exit_code == 0, r.output
    assert "read-only" in r.stderr and "without it" in r.stderr, r.stderr
    assert {rel: (reader.data / DS / rel).read_bytes() for rel in files} == files
    assert {m for m, _p in proxy.requests} <= {"GET", "HEAD", "PUT"}  # the PUTs were refused
    r = tether("pull", DS, "s3", "-y", cwd=reader.root)
    assert r.exit_code == 0, r.output  # in step: the lock it could not write was not needed


def test_a_read_only_pull_waits_for_no_one_and_promotes_nothing_a_push_overtook(
    rclone: S3Server, proxy: ThrottlingProxy, tmp_path: Path, tether: Tether
) -> None:
    prefix, files = _pushed_through(proxy, rclone, tmp_path, tether, 4)
    reader = _another_workspace(proxy, rclone, tmp_path, "reader", prefix)
    proxy.read_only = True
    # a live push elsewhere: the read-only pull refuses to start (exit 6)
    lease = Lease(_remote(rclone, prefix, tmp_path), DS, operation="push", host="other-machine")
    lease.acquire()
    try:
        r = tether("pull", DS, "s3", "-y", cwd=reader.root)
        assert r.exit_code == 6 and "other-machine" in r.stderr, r.output
    finally:
        lease.release()
    assert not (reader.data / DS).exists()

    # a push that commits a new index while the files download: nothing is promoted
    index_key = f"{prefix}/{DS}/.tether/index"
    store = rclone.store()

    class PushMeanwhile(Progress):
        def stage(self, name: str, *, files: int | None = None, bytes: int | None = None) -> None:
            if name == "downloading":  # the push's files, then its index (the commit)
                old = memoryview(obstore.get(store, index_key).bytes()).tobytes()
                obstore.put(store, f"{prefix}/{DS}/late.txt", b"pushed meanwhile")
                obstore.put(store, index_key, old + b"\n")

    with pytest.raises(StalePlanError, match="changed while it was pulled") as stale:
        sync.pull(DS, "s3", workspace=reader.root, progress=PushMeanwhile(), reviewed=False)
    assert stale.value.exit_code == ExitCode.REFUSED and "Pull again" in (stale.value.hint or "")
    assert not (reader.data / DS / "d0").exists()  # nothing promoted
    proxy.read_only = False
    obstore.delete(store, f"{prefix}/{DS}/late.txt")
    assert tether("push", DS, "s3", "-y", cwd=tmp_path / "ws").exit_code == 0  # a good index
    proxy.read_only = True
    r = tether("pull", DS, "s3", "-y", cwd=reader.root)
    assert r.exit_code == 0, r.output
    assert {rel: (reader.data / DS / rel).read_bytes() for rel in files} == files


# -- failures -----------------------------------------------------------------------------------
def test_wrong_credentials_exit_5_without_the_secret(
    rclone: S3Server, tmp_path: Path, tether: Tether
) -> None:
    ws = make_workspace(tmp_path)
    add_s3_remote(ws, rclone, secret_access_key="wrong-secret-4242")
    _files(ws, 2)
    for command in ("diff", "push"):
        r = (
            tether(command, DS, "s3", "-y", cwd=ws.root)
            if command == "push"
            else tether(command, DS, "s3", cwd=ws.root)
        )
        _clean_error(r, 5, "rejected the credentials", "SignatureDoesNotMatch")
        assert "wrong-secret-4242" not in r.output


def test_missing_bucket_exit_5(rclone: S3Server, tmp_path: Path, tether: Tether) -> None:
    ws = make_workspace(tmp_path)
    add_s3_remote(ws, rclone)
    doc = tomlkit.parse((ws.root / "tether.toml").read_text())
    doc["remotes"]["s3"]["url"] = "s3://no-such-bucket/data"
    (ws.root / "tether.toml").write_text(tomlkit.dumps(doc))
    _files(ws, 1)
    _clean_error(tether("push", DS, "s3", "-y", cwd=ws.root), 5, "'no-such-bucket' does not exist")


def test_unreachable_endpoint_exit_5(rclone: S3Server, tmp_path: Path, tether: Tether) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws = make_workspace(tmp_path)
    add_s3_remote(ws, rclone, endpoint=f"http://127.0.0.1:{port}", max_retries=1, retry_timeout=2)
    _files(ws, 1)
    _clean_error(tether("diff", DS, "s3", cwd=ws.root), 5, "cannot reach", f"127.0.0.1:{port}")


def test_throttled_to_the_end_exit_5(
    rclone: S3Server, proxy: ThrottlingProxy, tmp_path: Path, tether: Tether
) -> None:
    ws = make_workspace(tmp_path)
    add_s3_remote(ws, rclone, endpoint=proxy.endpoint, max_retries=1, retry_timeout=3)
    _files(ws, 2)
    proxy.always = True
    _clean_error(tether("push", DS, "s3", "-y", cwd=ws.root), 5, "throttling")


def _pushed_then_cloned_behind(
    proxy: ThrottlingProxy, server: S3Server, tmp_path: Path, tether: Tether
) -> tuple[WorkspaceFixture, dict[str, bytes]]:
    """Six files pushed straight to ``server``; a second workspace that reaches the same prefix
    through ``proxy``, with obstore allowed one retry."""
    ws = make_workspace(tmp_path / "a")
    prefix = add_s3_remote(ws, server)
    files = _files(ws, 6)
    assert tether("push", DS, "s3", "-y", cwd=ws.root).exit_code == 0
    other = make_workspace(tmp_path / "b")
    add_s3_remote(other, server, prefix=prefix, endpoint=proxy.endpoint, max_retries=1, retry_timeout=3)
    return other, files


def test_download_cut_mid_body_is_one_clear_error_and_the_rerun_finishes(
    rclone: S3Server, proxy: ThrottlingProxy, tmp_path: Path, tether: Tether
) -> None:
    """A link that drops mid-download, again on every retry: exit 5 with one line and a hint (not
    obstore's pages of debug output), no torn file in the dataset; the rerun pulls everything."""
    other, files = _pushed_then_cloned_behind(proxy, rclone, tmp_path, tether)
    proxy.truncate = "f004.txt"
    r = tether("pull", DS, "s3", "-y", cwd=other.root)
    _clean_error(r, 5, "dropped while transferring", "f004.txt", "Rerun")
    assert "Debug source" not in r.output and proxy.truncated >= 2  # obstore retried it
    assert not (other.data / DS / "d1/f004.txt").exists()
    proxy.truncate = None
    assert tether("pull", DS, "s3", "-y", cwd=other.root).exit_code == 0
    assert {rel: (other.data / DS / rel).read_bytes() for rel in files} == files


def test_a_download_cut_more_often_than_the_store_client_retries_is_retried_per_file(
    rclone: S3Server, proxy: ThrottlingProxy, tmp_path: Path, tether: Tether
) -> None:
    """obstore retries a cut body max_retries times; a link that drops once more than that (flaky
    Wi-Fi, a saturated proxy) costs the file another try, not the whole 20,000-file pull."""
    other, files = _pushed_then_cloned_behind(proxy, rclone, tmp_path, tether)
    proxy.truncate, proxy.truncate_times = "f004.txt", 2  # the first GET and obstore's one retry
    r = tether("pull", DS, "s3", "-y", cwd=other.root)
    assert r.exit_code == 0, r.output
    assert proxy.truncated == 2 and proxy.count("GET", "f004.txt") == 3
    assert {rel: (other.data / DS / rel).read_bytes() for rel in files} == files


def test_a_versioned_pull_retries_an_object_whose_download_was_cut(
    rclone: S3Server, proxy: ThrottlingProxy, tmp_path: Path, tether: Tether
) -> None:
    """The versioned store moves objects with the same per-file retries as a mirror transfer
    (a bench pull of 20,000 objects through a 20 ms proxy once failed on one cut object)."""
    ws = make_workspace(tmp_path / "a")
    prefix = add_s3_remote(ws, rclone, layout="versioned")
    files = _files(ws, 6)
    assert tether("commit", DS, "-m", "v1", cwd=ws.root).exit_code == 0
    assert tether("push", DS, "s3", cwd=ws.root).exit_code == 0
    other = make_workspace(tmp_path / "b")
    (other.root / "tether.lock").write_bytes((ws.root / "tether.lock").read_bytes())
    add_s3_remote(
        other,
        rclone,
        prefix=prefix,
        layout="versioned",
        endpoint=proxy.endpoint,
        max_retries=1,
        retry_timeout=3,
    )
    cut = hashlib.sha256(files["d1/f004.txt"]).hexdigest()[2:]  # objects/ab/<the rest>
    proxy.truncate, proxy.truncate_times = cut, 2
    r = tether("pull", DS, "s3", cwd=other.root)
    assert r.exit_code == 0, r.output
    assert proxy.truncated == 2 and proxy.count("GET", cut) == 3
    assert {rel: (other.data / DS / rel).read_bytes() for rel in files} == files
    # and a link that never holds is still one clear error (exit 5), not a pull that hangs
    (other.data / DS / "d1/f004.txt").unlink()
    shutil.rmtree(other.root / ".tether/cache")
    proxy.truncate_times = None
    _clean_error(tether("pull", DS, "s3", cwd=other.root), 5, "dropped while transferring", cut[:8])


def test_a_key_escaping_the_dataset_exit_2_and_nothing_written(
    moto: S3Server, tmp_path: Path, tether: Tether
) -> None:
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, moto)
    moto.client().request("PUT", f"{prefix}/{DS}/../escaped.txt", body=b"evil")
    obstore.put(moto.store(), f"{prefix}/{DS}/fine.txt", b"fine")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for command in ("diff", "pull"):
        args = (command, DS, "s3", "-y") if command == "pull" else (command, DS, "s3")
        r = tether(*args, cwd=ws.root)
        assert r.exit_code == 2, r.output
        assert ".." in r.stderr and "Traceback" not in r.output
    after = sorted(str(p) for p in tmp_path.rglob("*") if ".tether" not in Path(p).parts)
    assert not [p for p in after if "escaped" in p]
    assert [p for p in after if p not in before] == []


def test_foreign_prefix_diffs_correctly(rclone: S3Server, tmp_path: Path, tether: Tether) -> None:
    """Objects put by another tool (no index): digests come from downloading them."""
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, rclone)
    store = rclone.store()
    for rel, data in {"same.txt": b"same", "other.txt": b"theirs", "only-there.txt": b"x"}.items():
        obstore.put(store, f"{prefix}/{DS}/{rel}", data)
    ws.write("same.txt", "same")
    ws.write("other.txt", "ours")
    r = tether("diff", DS, "s3", "--json", cwd=ws.root)
    assert r.exit_code == 1, r.output
    plan = json.loads(r.stdout)
    status = {c["path"]: c["status"] for c in plan["changes"]}
    assert status == {"other.txt": "differs", "only-there.txt": "remote_only"}  # same.txt: unchanged
    assert tether("pull", DS, "s3", "-y", cwd=ws.root).exit_code == 0
    assert (ws.data / DS / "other.txt").read_text() == "theirs"
    assert tether("diff", DS, "s3", cwd=ws.root).exit_code == 0
    # adopting it: a push writes the index, so the next diff needs no download
    ws.write("mine.txt", "mine")
    assert tether("push", DS, "s3", "-y", cwd=ws.root).exit_code == 0
    assert (rclone.data_dir / rclone.bucket / prefix / DS / ".tether" / "index").exists()  # type: ignore[operator]


# -- secrets ------------------------------------------------------------------------------------
def test_secrets_never_shown(rclone: S3Server, tmp_path: Path, tether: Tether) -> None:
    ws = make_workspace(tmp_path)
    add_s3_remote(ws, rclone)
    r = tether("remote", "show", "s3", cwd=ws.root)
    assert r.exit_code == 0
    assert rclone.secret_key not in r.output and rclone.access_key not in r.output
    assert "secret_access_key: ****" in r.stdout
    assert rclone.secret_key not in (ws.root / "tether.toml").read_text()
    _files(ws, 2)
    audit_out = tmp_path / "audit.json"
    assert tether("push", DS, "s3", "-y", "--audit-json-out", str(audit_out), cwd=ws.root).exit_code == 0
    for text in ((ws.root / ".tether" / "audit.jsonl").read_text(), audit_out.read_text()):
        assert rclone.secret_key not in text and rclone.access_key not in text


# -- import-rclone ------------------------------------------------------------------------------
RCLONE_CONF = """
[r2]
type = s3
provider = Cloudflare
access_key_id = R2KEYID
secret_access_key = R2SECRETVALUE
endpoint = https://acc123.r2.cloudflarestorage.com
acl = private

[hpc]
type = sftp
host = login.hpc.example.org
user = alice
port = 2222
key_file = ~/.ssh/id_hpc

[gdrive]
type = drive
"""


def test_import_rclone_s3_and_sftp(tmp_path: Path, tether: Tether) -> None:
    ws = make_workspace(tmp_path)
    conf = tmp_path / "rclone.conf"
    conf.write_text(RCLONE_CONF)
    r = tether("remote", "import-rclone", "r2:datasets/team", "--config", str(conf), cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "R2SECRETVALUE" not in r.output
    shared = tomlkit.parse((ws.root / "tether.toml").read_text())["remotes"]["r2"]
    assert dict(shared) == {
        "url": "s3://datasets/team",
        "endpoint": "https://acc123.r2.cloudflarestorage.com",
        "region": "auto",
    }
    local = tomlkit.parse((ws.root / ".tether" / "config.local.toml").read_text())["remotes"]["r2"]
    assert dict(local) == {"access_key_id": "R2KEYID", "secret_access_key": "R2SECRETVALUE"}
    assert "R2SECRETVALUE" not in tether("remote", "show", "r2", cwd=ws.root).output

    r = tether("remote", "import-rclone", "hpc:/scratch/alice/data", "--config", str(conf), cwd=ws.root)
    assert r.exit_code == 0, r.output
    hpc = tomlkit.parse((ws.root / "tether.toml").read_text())["remotes"]["hpc"]
    assert dict(hpc) == {
        "url": "ssh://alice@login.hpc.example.org:2222/scratch/alice/data",
        "identity_file": "~/.ssh/id_hpc",
    }


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("gdrive:x", ["'drive'", "s3, sftp"]),
        ("r2", ["which bucket"]),
        ("hpc:relative", ["absolute folder"]),
        ("nothere:b", ["no remote 'nothere'", "r2, hpc, gdrive"]),
    ],
)
def test_import_rclone_refusals_exit_2(tmp_path: Path, tether: Tether, spec: str, words: list[str]) -> None:
    ws = make_workspace(tmp_path)
    conf = tmp_path / "rclone.conf"
    conf.write_text(RCLONE_CONF)
    r = tether("remote", "import-rclone", spec, "--config", str(conf), cwd=ws.root)
    assert r.exit_code == 2, r.output
    for word in words:
        assert word in r.stderr, r.stderr


def test_imported_rclone_remote_works_end_to_end(
    rclone: S3Server, tmp_path: Path, tether: Tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = make_workspace(tmp_path)
    conf = tmp_path / "rclone.conf"
    conf.write_text(
        f"[local-s3]\ntype = s3\nprovider = Other\nendpoint = {rclone.endpoint}\n"
        f"access_key_id = {rclone.access_key}\nsecret_access_key = {rclone.secret_key}\n"
    )
    monkeypatch.setenv("RCLONE_CONFIG", str(conf))  # the default location, as rclone reads it
    prefix = unique_prefix()
    r = tether("remote", "import-rclone", f"local-s3:{rclone.bucket}/{prefix}", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "generic S3-compatible" in r.stdout
    files = _files(ws, 3)
    assert tether("push", DS, "local-s3", "-y", cwd=ws.root).exit_code == 0
    stored = rclone.data_dir / rclone.bucket / prefix / DS  # type: ignore[operator]
    assert {
        str(p.relative_to(stored)): p.read_bytes()
        for p in stored.rglob("*")
        if p.is_file() and ".tether" not in p.parts
    } == files


def test_remote_test_on_object_stores(
    rclone: S3Server, moto: S3Server, tmp_path: Path, tether: Tether
) -> None:
    ws = make_workspace(tmp_path)
    add_s3_remote(ws, moto, name="strict")
    r = tether("remote", "test", "strict", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "FAIL" not in r.stdout and "PASS" in r.stdout
    add_s3_remote(ws, rclone, name="lax")
    r = tether("remote", "test", "lax", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "WARN" in r.stdout  # rclone serve s3 does not enforce If-None-Match: the lock is weaker
    add_s3_remote(ws, rclone, name="nobucket")
    doc = tomlkit.parse((ws.root / "tether.toml").read_text())
    doc["remotes"]["nobucket"]["url"] = "s3://no-such-bucket-here/p"
    (ws.root / "tether.toml").write_text(tomlkit.dumps(doc))
    r = tether("remote", "test", "nobucket", cwd=ws.root)
    assert r.exit_code == 5, r.output
    assert "FAIL" in r.stdout


def test_first_push_hashes_multipart_files_from_the_parts_it_sends(
    rclone: S3Server, proxy: ThrottlingProxy, tmp_path: Path, tether: Tether
) -> None:
    """A large file new to both sides is read once, part by part, hashed in order as it is sent;
    one that changes while it is read is refused and its upload aborted, never completed."""
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, rclone, **MULTIPART)
    data = _a_large_and_a_small_file(ws, 13 * MiB)
    add_s3_remote(ws, rclone, prefix=prefix, endpoint=proxy.endpoint, **MULTIPART)
    r = tether("push", DS, "s3", "-y", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert proxy.count("PUT", "partNumber=") == 3
    stored = rclone.data_dir / rclone.bucket / prefix / DS  # type: ignore[operator]
    assert (stored / "big.bin").read_bytes() == data
    index = Manifest.loads((stored / ".tether" / "index").read_bytes())
    assert index.by_path()["big.bin"].digest == hashlib.sha256(data).hexdigest()

    remote = _remote(rclone, prefix, tmp_path, **MULTIPART)
    try:
        source = ws.write("late.bin", os.urandom(7 * MiB))
        st = source.stat()
        state = StatEntry("late.bin", st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        with source.open("r+b") as f:  # rewritten in place after the scan: same size
            f.write(b"changed")
        with pytest.raises(StalePlanError, match=r"late\.bin changed locally after it was scanned") as stale:
            remote.put_file_hashing(source, f"{DS}/late.bin", expect=state, mtime_ns=st.st_mtime_ns)
        assert stale.value.exit_code == ExitCode.REFUSED
        assert not (stored / "late.bin").exists()
        assert list(rclone.client().list_uploads(prefix + "/")) == []  # aborted, not left behind
        assert journals(tmp_path / ".tether", remote.describe()) == []
    finally:
        remote.close()


def test_first_push_hashes_single_put_files_from_the_bytes_it_sends(
    rclone: S3Server, tmp_path: Path, tether: Tether
) -> None:
    """New files are read once (hashed as read, sent with that checksum); the index holds their
    real digests and a file rewritten after the scan is refused, never sent half-known."""
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, rclone)
    files = _files(ws, 12)
    r = tether("push", DS, "s3", "-y", cwd=ws.root)
    assert r.exit_code == 0, r.output
    stored = rclone.data_dir / rclone.bucket / prefix / DS  # type: ignore[operator]
    index = Manifest.loads((stored / ".tether" / "index").read_bytes())
    assert {e.path: e.digest for e in index.entries} == {
        rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()
    }
    remote = _remote(rclone, prefix, tmp_path)
    try:
        source = ws.write("late.txt", "v1")
        st = source.stat()
        state = StatEntry("late.txt", st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        source.write_text("v2, longer")  # rewritten after the scan
        with pytest.raises(StalePlanError):
            remote.put_file_hashing(source, f"{DS}/late.txt", expect=state, mtime_ns=st.st_mtime_ns)
        assert not (stored / "late.txt").exists()
    finally:
        remote.close()
