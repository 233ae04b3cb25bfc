"""A first push reads each new file once (hashed while copied); a pull's scan reuses the digests
of what it just verified; the per-file copy path keeps its no-torn-files rules."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import tether
from conftest import Result, WorkspaceFixture, backdate, cached_digests, rewrite_at_checkpoint
from tether import faults, fileio, forked
from tether.errors import StalePlanError
from tether.fileio import Prefetcher, copy_verified
from tether.manifest import UNHASHED, Entry, Manifest
from tether.readahead import read_soon
from tether.scan import StatEntry
from tether.sync import index_path, open_context, scan_remote


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state(path: Path) -> StatEntry:
    st = path.stat()
    return StatEntry(path.name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def _index(ws: WorkspaceFixture, dataset: str = "ns/ds") -> dict[str, str]:
    data = (ws.remote_dir / index_path(dataset)).read_bytes()
    return {e.path: e.digest for e in Manifest.loads(data).entries}


# -- copy_verified without a digest ---------------------------------------------------------------
def test_copy_without_digest_returns_the_digest_of_the_bytes_written(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 3_000_000)  # several chunks
    got = copy_verified(
        src, tmp_path / "out/dst.bin", digest=None, mtime_ns=123, label="dst", expect=_state(src)
    )
    assert got == _sha(src.read_bytes())
    assert (tmp_path / "out/dst.bin").read_bytes() == src.read_bytes()
    assert (tmp_path / "out/dst.bin").stat().st_mtime_ns == 123


def test_copy_without_digest_refuses_a_source_changed_since_the_scan(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"old")
    scanned = _state(src)
    src.write_bytes(b"new!")
    with pytest.raises(StalePlanError, match="after it was scanned"):
        copy_verified(src, tmp_path / "dst.bin", digest=None, mtime_ns=None, label="dst", expect=scanned)
    assert sorted(os.listdir(tmp_path)) == ["src.bin"]  # no final name, no temporary left


@pytest.mark.parametrize("kernel_copy_min", [fileio.KERNEL_COPY_MIN, 1], ids=["buffered", "kernel-copy"])
def test_copy_without_digest_refuses_a_source_written_during_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy_min: int
) -> None:
    """Also through the kernel copy (fileio._copy_in_kernel), where this folder allows it."""
    monkeypatch.setattr(fileio, "KERNEL_COPY_MIN", kernel_copy_min)
    src = tmp_path / "src.bin"
    src.write_bytes(b"a" * 2_500_000)
    scanned = _state(src)

    appended: list[int] = []

    def writer(_n: int) -> None:
        if not appended:  # a job appends once while we read
            appended.append(_n)
            with open(src, "ab") as f:
                f.write(b"more")

    with pytest.raises(StalePlanError, match="while it was copied"):
        copy_verified(
            src,
            tmp_path / "dst.bin",
            digest=None,
            mtime_ns=None,
            label="dst",
            expect=scanned,
            on_bytes=writer,
        )
    assert sorted(os.listdir(tmp_path)) == ["src.bin"]


def test_copy_without_digest_needs_the_scanned_state(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    with pytest.raises(ValueError):
        copy_verified(src, tmp_path / "dst.bin", digest=None, mtime_ns=None, label="dst")
    assert not (tmp_path / "dst.bin").exists()


def test_in_place_copy_replaces_a_partial_file_and_a_planted_link(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    stage = tmp_path / "staging"
    stage.mkdir()
    (stage / "partial.bin").write_bytes(b"pay")
    (stage / "link.bin").symlink_to(victim)
    for name in ("partial.bin", "link.bin"):
        copy_verified(src, stage / name, digest=_sha(b"payload"), mtime_ns=None, label=name, in_place=True)
        assert not (stage / name).is_symlink()
        assert (stage / name).read_bytes() == b"payload"
    assert victim.read_bytes() == b"keep me"


def test_unhashed_entries_are_never_stored() -> None:
    with pytest.raises(ValueError):
        Manifest([Entry("a", 1, 1, UNHASHED)]).dumps()


# -- prefetcher ------------------------------------------------------------------------------------
def test_prefetcher_tolerates_missing_files_and_an_early_stop(tmp_path: Path) -> None:
    paths: list[str | Path | None] = []
    for i in range(50):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * i)
        paths += [p, None, tmp_path / f"missing{i}"]
    with Prefetcher(paths, ahead=4) as ahead:
        for _ in range(10):  # the copier stops early (a whole-run failure)
            ahead.consumed()
    assert not ahead._thread.is_alive()


def test_read_soon_advises_existing_files_and_ignores_missing_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    advised: list[str] = []
    fadvise = os.posix_fadvise

    def recording(fd: int, offset: int, length: int, advice: int) -> None:
        assert (offset, length, advice) == (0, 0, os.POSIX_FADV_WILLNEED)
        advised.append(os.readlink(f"/proc/self/fd/{fd}"))
        fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", recording)
    db = tmp_path / "hashcache.sqlite"
    db.write_bytes(b"x" * 4096)
    read_soon(db, tmp_path / "hashcache.sqlite-wal")  # no WAL after a clean close
    assert advised == [str(db)]


# -- through the CLI --------------------------------------------------------------------------------
def test_first_push_records_real_digests_in_index_base_and_cache(
    ws: WorkspaceFixture, tether: Callable[..., Result]
) -> None:
    files = {f"d{i % 3}/f{i}.bin": os.urandom(100 + i) for i in range(40)}
    for rel, data in files.items():
        ws.write(rel, data)
    backdate(ws.data)
    r = tether("push", "ns/ds", "store", "-y", cwd=ws.root)
    assert r.exit_code == 0, r.output
    expected = {rel: _sha(data) for rel, data in files.items()}
    assert _index(ws) == expected
    base = ws.workspace().base_path("store", "ns/ds")
    assert {e.path: e.digest for e in Manifest.loads(base.read_bytes()).entries} == expected
    # The copy taught the cache: the next diff reads nothing.
    assert cached_digests(ws) == expected
    assert tether("diff", "ns/ds", "store", cwd=ws.root).exit_code == 0


def test_file_written_during_its_first_push_is_not_promoted_and_the_rerun_converges(
    ws: WorkspaceFixture, tether: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = ws.write("a.bin", b"A" * 1000)
    ws.write("b.bin", b"B" * 1000)
    real = faults.checkpoint
    appended: list[bool] = []

    def append_once(name: str) -> None:
        if name == "mid_file" and not appended:
            appended.append(True)
            with open(target, "ab") as f:
                f.write(b"late")
        real(name)

    monkeypatch.setattr(faults, "checkpoint", append_once)
    r = tether("push", "ns/ds", "store", "-y", cwd=ws.root)
    assert r.exit_code == 3, r.output
    assert "changed locally while it was copied" in r.output
    assert not ws.remote_file("a.bin").exists()  # never promoted, nothing torn
    assert ws.remote_file("b.bin").read_bytes() == b"B" * 1000
    assert not [p for p in ws.remote_dir.rglob("*") if ".tether-tmp-" in p.name]
    monkeypatch.setattr(faults, "checkpoint", real)
    r = tether("push", "ns/ds", "store", "-y", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert ws.remote_file("a.bin").read_bytes() == b"A" * 1000 + b"late"
    assert _index(ws) == {"a.bin": _sha(b"A" * 1000 + b"late"), "b.bin": _sha(b"B" * 1000)}


def test_pull_reuses_the_digests_it_verified(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether: Callable[..., Result]
) -> None:
    files = {f"s/f{i}.txt": f"content {i}".encode() for i in range(30)}
    for rel, data in files.items():
        ws.write(rel, data)
    backdate(ws.data)
    assert tether("push", "ns/ds", "store", "-y", cwd=ws.root).exit_code == 0
    r = tether("pull", "ns/ds", "store", "-y", cwd=ws2.root)
    assert r.exit_code == 0, r.output
    assert cached_digests(ws2) == {rel: _sha(data) for rel, data in files.items()}
    assert tether("diff", "ns/ds", "store", cwd=ws2.root).exit_code == 0


def test_a_pulled_file_edited_before_the_cache_learns_it_is_not_vouched_for(
    ws: WorkspaceFixture,
    ws2: WorkspaceFixture,
    tether: Callable[..., Result],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hash cache learns the pulled files' states after the promotion, beside the base
    write: a file rewritten in between (same size and mtime, as `cp -p` leaves it) is left out,
    so the next scan hashes it instead of trusting the digest it arrived with."""
    files = {f"s/f{i}.txt": f"content {i}".encode() for i in range(10)}
    for rel, data in files.items():
        ws.write(rel, data)
    backdate(ws.data)
    assert tether("push", "ns/ds", "store", "-y", cwd=ws.root).exit_code == 0
    edited = ws2.data / "ns/ds/s/f3.txt"
    stop = rewrite_at_checkpoint(monkeypatch, "before_base", edited)  # after the promotion
    r = tether("pull", "ns/ds", "store", "-y", cwd=ws2.root)
    assert r.exit_code == 0, r.output
    stop()
    assert edited.read_bytes() != files["s/f3.txt"]
    assert cached_digests(ws2) == {rel: _sha(data) for rel, data in files.items() if rel != "s/f3.txt"}
    r = tether("diff", "ns/ds", "store", "--json", cwd=ws2.root)
    assert r.exit_code == 1 and "s/f3.txt" in r.output, r.output


@pytest.mark.parametrize("fork_min", ["256", "1"], ids=["in-process", "forked"])
def test_pull_records_the_base_a_fresh_scan_would_give(
    ws: WorkspaceFixture,
    ws2: WorkspaceFixture,
    tether: Callable[..., Result],
    monkeypatch: pytest.MonkeyPatch,
    fork_min: str,
) -> None:
    """A pull derives the local state after it from its own scan plus what it promoted and
    deleted, instead of walking the dataset again: the base and the cache it leaves must be the
    ones a fresh walk would give (new, replaced and deleted files, a local-only file kept)."""
    monkeypatch.setenv("TETHER_FORK_MIN_FILES", fork_min)
    for i in range(12):
        ws.write(f"s/f{i}.txt", f"v1 {i}")
    ws.write("gone.txt", "to be deleted")
    backdate(ws.data)
    assert tether("push", "ns/ds", "store", "-y", cwd=ws.root).exit_code == 0
    assert tether("pull", "ns/ds", "store", "-y", cwd=ws2.root).exit_code == 0
    ws.write("s/f3.txt", "v2 3, longer")
    ws.write("new/n.txt", "brand new")
    (ws.data / "ns/ds/gone.txt").unlink()
    backdate(ws.data)
    assert tether("push", "ns/ds", "store", "--mode", "mirror", "-y", cwd=ws.root).exit_code == 0
    ws2.write("mine.txt", "local only: a mirror pull removes it")
    backdate(ws2.data)

    r = tether("pull", "ns/ds", "store", "--mode", "mirror", "--max-delete", "100%", "-y", cwd=ws2.root)
    assert r.exit_code == 0, r.output
    local = {p.relative_to(ws2.data / "ns/ds").as_posix(): p for p in (ws2.data / "ns/ds").rglob("*")}
    files = {rel: _sha(p.read_bytes()) for rel, p in local.items() if p.is_file() and ".tether" not in rel}
    assert "gone.txt" not in files and "mine.txt" not in files  # mirror: what the remote lacks goes
    assert files["s/f3.txt"] == _sha(b"v2 3, longer")
    base_path = ws2.workspace().base_path("store", "ns/ds")
    base = {e.path: e for e in Manifest.loads(base_path.read_bytes()).entries}
    assert {p: e.digest for p, e in base.items()} == files
    for rel, entry in base.items():
        st = (ws2.data / "ns/ds" / rel).stat()
        assert (entry.size, entry.mtime_ns) == (st.st_size, st.st_mtime_ns), rel
    assert cached_digests(ws2) == files
    assert tether("diff", "ns/ds", "store", cwd=ws2.root).exit_code == 0


def test_dry_run_push_hashes_everything(ws: WorkspaceFixture) -> None:
    """A dry run copies nothing, so it reports real digests (nothing is left unhashed)."""
    ws.write("a.txt", "A")
    result = tether.push("ns/ds", "store", workspace=ws.root, dry_run=True)
    assert all(c.local is not None and c.local.digest == _sha(b"A") for c in result.plan.changes)


def test_index_after_push_matches_a_fresh_listing(
    ws: WorkspaceFixture, tether: Callable[..., Result]
) -> None:
    """The index a push writes (its pre-push listing plus what it did) vouches for exactly what
    a new listing finds: uploads, replacements and mirror deletes, files left alone kept."""
    for i in range(6):
        ws.write(f"f{i}.txt", f"v1 {i}")
    assert tether("push", "ns/ds", "store", "-y", cwd=ws.root).exit_code == 0
    ws.write("f0.txt", "v2 changed")  # replaced
    (ws.data / "ns/ds/f1.txt").unlink()  # deleted by mirror
    ws.write("new/g.txt", "added")  # uploaded
    r = tether("push", "ns/ds", "store", "-y", "--mode", "mirror", cwd=ws.root)
    assert r.exit_code == 0, r.output
    with open_context("ns/ds", "store", workspace=ws.root) as ctx:
        state = scan_remote(ctx)
    assert state.index_current
    assert {e.path for e in state.manifest.entries} == {
        "f0.txt",
        "f2.txt",
        "f3.txt",
        "f4.txt",
        "f5.txt",
        "new/g.txt",
    }
    assert _index(ws)["f0.txt"] == _sha(b"v2 changed")


def test_rewrite_with_restored_mtime_during_a_first_push_is_refused(
    ws: WorkspaceFixture, tether: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the scan and the copy a tool rewrites a new file and restores its mtime: the
    copy sees another ctime, so the unhashed file is not promoted (exit 3); the rerun sends it."""
    target = ws.write("a.bin", b"A" * 500)
    ws.write("b.bin", b"B" * 500)
    stop = rewrite_at_checkpoint(monkeypatch, "locked", target)
    r = tether("push", "ns/ds", "store", "-y", cwd=ws.root)
    assert r.exit_code == 3, r.output
    assert "a.bin changed locally after it was scanned" in r.output
    assert not ws.remote_file("a.bin").exists()
    stop()
    assert tether("push", "ns/ds", "store", "-y", cwd=ws.root).exit_code == 0
    assert ws.remote_file("a.bin").read_bytes() == target.read_bytes()


def spy_on_workers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, set[int]]]:
    """Record each forked.run_forked call: (items, processes, pids of the workers that did them)."""
    calls: list[tuple[int, int, set[int]]] = []
    real = forked.run_forked

    def counting(items, work, *, processes, on_outcome, stop_on=()):  # type: ignore[no-untyped-def]
        pids: set[int] = set()

        def noting(item):  # type: ignore[no-untyped-def]
            return work(item), os.getpid()

        def outcome(item, value, error):  # type: ignore[no-untyped-def]
            if value is not None:
                pids.add(value[1])
            on_outcome(item, None if value is None else value[0], error)

        real(items, noting, processes=processes, on_outcome=outcome, stop_on=stop_on)
        calls.append((len(items), processes, pids))

    monkeypatch.setattr(forked, "run_forked", counting)
    return calls


@pytest.mark.parametrize(("files", "forks"), [(forked.MIN_FILES - 1, False), (forked.MIN_FILES, True)])
def test_cli_push_and_pull_of_many_small_files_use_worker_processes(
    ws: WorkspaceFixture,
    ws2: WorkspaceFixture,
    tether: Callable[..., Result],
    monkeypatch: pytest.MonkeyPatch,
    files: int,
    forks: bool,
) -> None:
    """With the default threshold, a local disk shares a push's and a pull's small files among
    forked workers from forked.MIN_FILES files on, and copies fewer in this process."""
    monkeypatch.delenv("TETHER_FORK_MIN_FILES", raising=False)
    calls = spy_on_workers(monkeypatch)
    data = {f"d{i % 9}/f{i:04d}.txt": f"file {i}\n".encode() for i in range(files)}
    for rel, content in data.items():
        ws.write(rel, content)
    assert tether("push", "ns/ds", "store", "-y", cwd=ws.root).exit_code == 0
    assert tether("pull", "ns/ds", "store", "-y", cwd=ws2.root).exit_code == 0
    assert {
        p.relative_to(ws2.data / "ns/ds").as_posix(): p.read_bytes()
        for p in (ws2.data / "ns/ds").rglob("*")
        if p.is_file()
    } == data
    if not forks:
        assert calls == []
        return
    assert [(n, processes) for n, processes, _ in calls] == [(files, 8), (files, 8)]
    assert all(os.getpid() not in pids and len(pids) >= 1 for _, _, pids in calls)


def test_cli_diff_hashes_many_new_files_in_worker_processes(
    ws: WorkspaceFixture,
    ws2: WorkspaceFixture,
    tether: Callable[..., Result],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A workspace that never hashed its copy (files put there by hand) compares it through the
    CLI: from forked.MIN_FILES new small files on, worker processes hash them, the diff is
    right both ways, and the hash cache keeps every digest for the next run."""
    monkeypatch.delenv("TETHER_FORK_MIN_FILES", raising=False)
    data = {f"d{i % 7}/f{i:04d}.txt": f"file {i}\n".encode() for i in range(forked.MIN_FILES)}
    for rel, content in data.items():
        ws.write(rel, content)
        ws2.write(rel, content)
    assert tether("push", "ns/ds", "store", "-y", cwd=ws.root).exit_code == 0
    backdate(ws2.data / "ns/ds")  # outside the racy window, so the cache may vouch next time
    calls = spy_on_workers(monkeypatch)
    r = tether("diff", "ns/ds", "store", cwd=ws2.root)
    assert r.exit_code == 0, r.output
    assert [(n, processes) for n, processes, _ in calls] == [(forked.MIN_FILES, 8)]
    assert os.getpid() not in calls[0][2] and len(calls[0][2]) >= 1
    assert cached_digests(ws2) == {rel: _sha(content) for rel, content in data.items()}
    ws2.write("d3/f0003.txt", b"edited here\n")
    r = tether("diff", "ns/ds", "store", "--json", cwd=ws2.root)
    assert r.exit_code == 1
    changed = [
        (c["path"], c["status"]) for c in json.loads(r.stdout)["changes"] if c["status"] != "unchanged"
    ]
    assert changed == [("d3/f0003.txt", "differs")]  # no base in this workspace: differs
