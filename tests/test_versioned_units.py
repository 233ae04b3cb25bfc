"""Focused tests of the versioned layout's parts: the snapshot record (strict, content-derived
ids), tether.lock, the cache, pure checkout and gc planning (gc property-tested with hypothesis),
and how a push finds missing objects (listing only what the inventory cannot vouch for)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.errors import ExitCode, TransferFailed, VerificationError
from tether.manifest import Entry
from tether.remotes import LocalRemote, RemoteStat
from tether.versioned import lockfile
from tether.versioned.cache import STALE_TEMP_S, Cache
from tether.versioned.checkout import plan_checkout
from tether.versioned.gc import GcPlan, Scope, plan_gc
from tether.versioned.layout import (
    GC_STATE,
    Snapshot,
    SnapshotFormatError,
    digest_from_listing,
    object_path,
)
from tether.versioned.store import Inventory, find_missing, push_snapshot

SETTINGS = settings(max_examples=300, deadline=None, database=None)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snap(files: dict[str, bytes], parent: str | None = None, dataset: str = "ns/ds") -> Snapshot:
    entries = [Entry(p, len(d), 0, sha(d)) for p, d in files.items()]
    return Snapshot.create(dataset, entries, parent=parent, author="a", host="h", time=1.0, message="m")


# -- the snapshot record --------------------------------------------------------------------------
def test_snapshot_round_trip_and_content_derived_id() -> None:
    s = snap({"b.txt": b"b", "a/x": b"x"})
    assert Snapshot.loads(s.dumps(), source="t") == s
    again = Snapshot.create(
        "ns/ds", list(reversed(s.entries)), parent=None, author="other", host="h2", time=9.0, message=""
    )
    assert again.id == s.id  # who and when do not change what the data is
    assert snap({"b.txt": b"b", "a/x": b"x"}, parent=s.id).id != s.id
    assert snap({"b.txt": b"B", "a/x": b"x"}).digest != s.digest
    assert [e.path for e in s.entries] == ["a/x", "b.txt"]


def _edit(s: Snapshot, **changes: object) -> bytes:
    raw = json.loads(s.dumps())
    raw.update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"version": 2}, "version 2"),
        ({"format": "dvc"}, "not a tether snapshot"),
        ({"entries": [{"path": "../etc/passwd", "size": 1, "digest": "0" * 64}]}, "'..'"),
        ({"entries": [{"path": "a", "size": -1, "digest": "0" * 64}]}, "bad entry"),
        ({"entries": [{"path": "a", "size": 1, "digest": "xyz"}]}, "bad entry"),
        ({"entries": [{"path": "a", "size": 1, "digest": "0" * 64}]}, "does not match its content"),
        ({"dataset": "../x"}, "dataset id"),
        ({"parent": "nope"}, "bad parent"),
        ({"time": "yesterday"}, "bad time"),
    ],
)
def test_snapshot_parse_is_strict(change: dict[str, object], words: str) -> None:
    s = snap({"a": b"a"})
    with pytest.raises(SnapshotFormatError) as info:
        Snapshot.loads(_edit(s, **change), source="rec")
    assert words in info.value.message


def test_snapshot_expected_id_and_duplicates() -> None:
    s = snap({"a": b"a"})
    with pytest.raises(SnapshotFormatError):
        Snapshot.loads(s.dumps(), source="rec", expect_id="f" * 64)
    dup = [{"path": "a", "size": 1, "digest": sha(b"a")}] * 2
    with pytest.raises(SnapshotFormatError):
        Snapshot.loads(_edit(s, entries=dup), source="rec")
    with pytest.raises(SnapshotFormatError):
        Snapshot.loads(b"\xff not json", source="rec")


def test_object_names() -> None:
    d = sha(b"x")
    assert object_path(d) == f"objects/{d[:2]}/{d[2:]}"
    assert digest_from_listing(f"{d[:2]}/{d[2:]}") == d
    assert digest_from_listing(d[2:], d[:2]) == d
    for junk in ("README", f"{d[:2]}/{d[2:]}.tmp", f"zz/{d[2:]}", f"{d[:2]}/x/{d[2:]}"):
        assert digest_from_listing(junk) is None
    with pytest.raises(SnapshotFormatError):
        object_path("../../etc")


# -- tether.lock ----------------------------------------------------------------------------------
def test_lockfile_round_trip_is_sorted_and_strict(tmp_path: Path) -> None:
    a, b = snap({"x": b"1"}), snap({"y": b"2"}, dataset="alpha")
    entries = {"ns/ds": lockfile.LockEntry.of(a), "alpha": lockfile.LockEntry.of(b)}
    lockfile.write(tmp_path, entries)
    text = (tmp_path / "tether.lock").read_text()
    assert text.index('"alpha"') < text.index('"ns/ds"')
    assert lockfile.read(tmp_path) == entries
    assert lockfile.read(tmp_path / "nowhere") == {}
    for bad in (
        "version = 2\n",
        'version = 1\n[datasets."ns/ds"]\nsnapshot = "abc"\ndigest = "abc"\nfiles = 1\nbytes = 1\n',
        f'version = 1\n[datasets."../x"]\nsnapshot = "{a.id}"\ndigest = "{a.id}"\nfiles = 1\nbytes = 1\n',
        "not toml [",
    ):
        with pytest.raises(lockfile.LockFileError):
            lockfile.parse(bad.encode(), source="t")


# -- cache ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("many", [False, True], ids=["stat-each", "list-folders"])
def test_cache_which_have_finds_exactly_the_cached_objects(tmp_path: Path, many: bool) -> None:
    """Both lookups (a stat per digest, a listing per fan-out folder) give the same answer; a
    folder or a temporary file under an object's name is not the object."""
    from tether.versioned.cache import BULK_LOOKUP

    cache = Cache(tmp_path / "cache")
    count = BULK_LOOKUP + 10 if many else 5
    blobs = [f"object {i}".encode() for i in range(count)]
    digests = [sha(b) for b in blobs]
    assert cache.which_have(digests) == set()  # no objects folder yet
    for i, blob in enumerate(blobs):
        if i % 3 == 0:
            src = tmp_path / "src"
            src.write_bytes(blob)
            cache.insert_copy(src, digests[i])
    (cache.root / object_path(digests[1])).mkdir(parents=True)
    (cache.root / object_path(digests[2])).parent.mkdir(parents=True, exist_ok=True)
    (cache.root / object_path(digests[2])).with_name(digests[2][2:] + ".tmp").write_bytes(b"x")
    expected = {d for i, d in enumerate(digests) if i % 3 == 0}
    assert cache.which_have(digests) == expected
    assert cache.which_have(set(digests[3:])) == {d for d in expected if d in digests[3:]}


def test_cache_verifies_on_insert_and_keeps_objects_read_only(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    src = tmp_path / "f"
    src.write_bytes(b"payload")
    with pytest.raises(VerificationError):
        cache.insert_copy(src, sha(b"other"))
    assert not cache.has(sha(b"other")) and not any((cache.root / "objects").rglob("*"))
    path = cache.insert_copy(src, sha(b"payload"))
    assert path.read_bytes() == b"payload"
    assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0
    assert list((cache.root / "tmp").iterdir()) == []
    # moving a file in: refused (and left in place) when its bytes are not the digest
    moved = tmp_path / "g"
    moved.write_bytes(b"moved")
    assert not cache.insert_move(moved, sha(b"nope")) and moved.exists()
    assert cache.insert_move(moved, sha(b"moved")) and not moved.exists() and cache.has(sha(b"moved"))
    s = snap({"a": b"payload"})
    cache.put_snapshot(s)
    assert cache.get_snapshot("ns/ds", s.id) == s
    cache.snapshot_file("ns/ds", s.id).write_bytes(b"damaged")
    assert cache.get_snapshot("ns/ds", s.id) is None  # never trusted: refetched instead


# -- checkout planning (pure) ---------------------------------------------------------------------
def test_checkout_plan_classifies_local_changes() -> None:
    target = snap({"same": b"s", "changed": b"new", "created": b"c"})
    local = [
        Entry("same", 1, 0, sha(b"s")),
        Entry("changed", 3, 0, sha(b"old")),
        Entry("gone", 4, 0, sha(b"gone")),
        Entry("scratch", 7, 0, sha(b"scratch")),
    ]
    committed = {sha(b"old")}
    cached = {sha(b"gone")}
    plan = plan_checkout(local, target, lambda e: e.digest in committed, cached.__contains__)
    assert plan.unchanged == 1
    assert [t.path for t in plan.create] == ["created"]
    assert [(lo.path, t.path) for lo, t in plan.replace] == [("changed", "changed")]
    assert sorted(e.path for e in plan.delete) == ["gone", "scratch"]
    assert [e.path for e in plan.preserve] == ["changed"]  # committed, not cached: moved into the cache
    assert plan.unsafe == ["scratch"]  # neither: an uncommitted change
    kept = plan_checkout(local, target, lambda e: False, lambda d: False, keep=lambda p: p != "created")
    assert kept.create == []


# -- gc planning (pure, property-tested) ----------------------------------------------------------
DIGESTS = [sha(bytes([i])) for i in range(12)]


@st.composite
def gc_world(draw: st.DrawFn) -> tuple[dict, set, dict, dict, int | None]:
    n = draw(st.integers(0, 6))
    keys = [("ns/ds", sha(f"snap{i}".encode())) for i in range(n)]
    refs = {k: draw(st.sets(st.sampled_from(DIGESTS), max_size=6)) for k in keys}
    snap_mtimes = {k: draw(st.integers(0, 100)) for k in keys}
    kept = set(draw(st.lists(st.sampled_from(keys), unique=True))) if keys else set()
    present = draw(st.sets(st.sampled_from(DIGESTS)))
    objects = {d: (1, draw(st.integers(0, 100))) for d in present}
    cutoff = draw(st.one_of(st.none(), st.integers(0, 100)))
    return snap_mtimes, kept, refs, objects, cutoff


@SETTINGS
@given(gc_world())
def test_gc_never_deletes_what_a_kept_revision_references(world: tuple) -> None:
    snapshots, kept, refs, objects, cutoff = world
    plan = plan_gc(snapshots, kept, {k: refs[k] for k in kept}, objects, cutoff_ns=cutoff)
    referenced = set().union(*(refs[k] for k in kept)) if kept else set()
    assert not referenced & set(plan.delete_objects)
    assert not kept & set(plan.delete_snapshots)
    for d in plan.delete_objects:  # only old, unreferenced objects go
        assert cutoff is None or objects[d][1] < cutoff
    for k in plan.delete_snapshots:
        assert cutoff is None or snapshots[k] < cutoff
    # and everything old and unreferenced does go (gc is not a no-op)
    for d, (_size, mtime) in objects.items():
        if d not in referenced and (cutoff is None or mtime < cutoff):
            assert d in plan.delete_objects
    # a second plan made under the lock never widens what the user saw
    later = plan_gc(snapshots, set(), {}, objects, cutoff_ns=None)
    final = later.intersect(plan)
    assert set(final.delete_objects) <= set(plan.delete_objects)
    assert set(final.delete_snapshots) <= set(plan.delete_snapshots)


def test_gc_refuses_to_mark_without_reading_a_kept_snapshot() -> None:
    key = ("ns/ds", sha(b"s"))
    with pytest.raises(KeyError):
        plan_gc({key: 0}, {key}, {}, {DIGESTS[0]: (1, 0)}, cutoff_ns=None)
    assert isinstance(plan_gc({}, set(), {}, {}, cutoff_ns=None), GcPlan)


def test_gc_scope_parsing() -> None:
    assert Scope.parse("ALL-COMMITS").kind == "all-commits"
    assert Scope.parse("branches").kind == "branches"
    assert Scope.parse("30-days") == Scope("days", 30.0)
    assert Scope.parse("7d") == Scope("days", 7.0)
    with pytest.raises(Exception, match="not a scope"):
        Scope.parse("everything")


# -- finding missing objects: listing only what is needed ------------------------------------------
class CountingRemote:
    """A remote that pays per listing, like SSH or S3 (a local folder underneath), recording every
    listing and existence check (what a push costs in requests)."""

    def __init__(self, root: Path) -> None:
        self.inner = LocalRemote(str(root), root)
        self.url = self.inner.url
        self.listed: list[str] = []
        self.checked: list[str] = []

    def list_files(self, prefix: str) -> Iterator[RemoteStat]:
        self.listed.append(prefix)
        return self.inner.list_files(prefix)

    def exists(self, path: str) -> bool:
        self.checked.append(path)
        return self.inner.exists(path)


class CountingLocal(LocalRemote):
    def __init__(self, root: Path) -> None:
        super().__init__(str(root), root)
        self.listed: list[str] = []

    def list_files(self, prefix: str) -> Iterator[RemoteStat]:
        self.listed.append(prefix)
        return super().list_files(prefix)


def _put_objects(root: Path, blobs: list[bytes]) -> None:
    for b in blobs:
        path = root / object_path(sha(b))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b)


def test_find_missing_lists_only_the_folders_the_inventory_cannot_vouch_for(tmp_path: Path) -> None:
    remote_root = tmp_path / "remote"
    remote_root.mkdir()
    blobs = [f"object {i}".encode() for i in range(3000)]
    _put_objects(remote_root, blobs)
    remote = CountingRemote(remote_root)
    inv = Inventory.load(tmp_path / "state", remote.url)
    needed = {sha(b) for b in blobs}
    # nothing known: one listing of the whole prefix
    assert find_missing(remote, needed, inv).missing == set()
    assert remote.listed == ["objects"] and inv.objects == needed
    # a 0.1% change: only the new objects' fan-out folders are listed
    remote.listed.clear()
    new = {sha(f"new {i}".encode()) for i in range(3)}
    lookup = find_missing(remote, needed | new, inv)
    assert lookup.missing == new
    assert sorted(remote.listed) == sorted(f"objects/{d[:2]}" for d in new)
    # nothing new: no listing at all
    remote.listed.clear()
    assert find_missing(remote, needed, inv).missing == set() and remote.listed == []
    # an object lost in a folder that gets listed is noticed and dropped from the inventory
    lost = next(d for d in needed if d[:2] == next(iter(new))[:2])
    (remote_root / object_path(lost)).unlink()
    assert lost in find_missing(remote, needed | new, inv).missing
    assert lost not in inv.objects
    # a suspect (corrupt) object is re-sent even though listings show it
    inv.suspect.add(sha(blobs[0]))
    assert sha(blobs[0]) in find_missing(remote, needed, inv).missing
    # --checksum: the inventory is ignored
    remote.listed.clear()
    find_missing(remote, {sha(blobs[1])}, inv, trust_inventory=False)
    assert remote.listed == ["objects"]
    assert remote.checked == []  # never one request per object


def test_find_missing_on_a_local_path_stats_only_the_candidates(tmp_path: Path) -> None:
    remote_root = tmp_path / "remote"
    remote_root.mkdir()
    blobs = [f"object {i}".encode() for i in range(2500)]  # more than LOCAL_STAT_LIMIT
    _put_objects(remote_root, blobs)
    remote = CountingLocal(remote_root)
    inv = Inventory.load(tmp_path / "state", remote.url)
    needed = {sha(b) for b in blobs}
    assert find_missing(remote, needed, inv).missing == set()
    assert remote.listed == ["objects"]  # nothing known yet: one listing
    remote.listed.clear()
    new = {sha(f"new {i}".encode()) for i in range(20)}
    assert find_missing(remote, needed | new, inv).missing == new
    assert remote.listed == []  # 20 candidates: 20 stats, no listing


def test_inventory_survives_a_round_trip_and_ignores_damage(tmp_path: Path) -> None:
    inv = Inventory.load(tmp_path, "file:///r")
    inv.objects = {DIGESTS[0], DIGESTS[1]}
    inv.suspect = {DIGESTS[2]}
    inv.save()
    back = Inventory.load(tmp_path, "file:///r")
    assert back.objects == inv.objects and back.suspect == inv.suspect
    assert Inventory.load(tmp_path, "file:///other").objects == set()
    inv.path.write_bytes(b"garbage")
    assert Inventory.load(tmp_path, "file:///r").objects == set()


def test_an_unchanged_inventory_is_not_rewritten(tmp_path: Path) -> None:
    inv = Inventory.load(tmp_path, "file:///r")
    inv.objects = {DIGESTS[0]}
    inv.save()
    written = inv.path.stat().st_ino
    again = Inventory.load(tmp_path, "file:///r")
    again.save()  # as read: nothing to write
    inv.save()  # as last written: nothing to write
    assert inv.path.stat().st_ino == written
    again.objects.add(DIGESTS[1])
    again.save()
    assert inv.path.stat().st_ino != written
    assert Inventory.load(tmp_path, "file:///r").objects == {DIGESTS[0], DIGESTS[1]}


class GcDuringPush(LocalRemote):
    """Runs a gc (deletes an object, records a gc run) just as the push writes its snapshot."""

    def __init__(self, root: Path, victim: str) -> None:
        super().__init__(str(root), root)
        self.victim = victim

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        super().write_bytes_atomic(path, data)
        if path.startswith("snapshots/") and self.victim:
            (self.root / object_path(self.victim)).unlink()
            super().write_bytes_atomic(GC_STATE, b'{"token": "gc"}')
            self.victim = ""


def _push_setup(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, dict[str, Path]]:
    """An empty remote folder, and ``files`` in a source folder, keyed by digest for push_snapshot."""
    remote_root = tmp_path / "remote"
    remote_root.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    return remote_root, {sha(d): src / n for n, d in files.items()}


def test_push_repairs_objects_a_concurrent_gc_removed(tmp_path: Path) -> None:
    files = {"a": b"kept from before", "b": b"new"}
    remote_root, by_digest = _push_setup(tmp_path, files)
    _put_objects(remote_root, [files["a"]])  # present: the push relies on it without uploading
    s = snap(files)
    remote = GcDuringPush(remote_root, sha(files["a"]))
    inv = Inventory.load(tmp_path / "state", remote.url)
    report = push_snapshot(remote, s, inv, by_digest.get, host="h", jobs=2)
    assert report.uploaded == 1 and report.repaired_after_gc == 1
    for data in files.values():
        assert (remote_root / object_path(sha(data))).read_bytes() == data


class FailingDisk(LocalRemote):
    """A remote whose disk fails (EIO) writing one object."""

    def __init__(self, root: Path, bad: str) -> None:
        super().__init__(str(root), root)
        self.bad = bad

    def put_file(self, source: Path, path: str, **kwargs: Any) -> None:
        if path == object_path(self.bad):
            raise OSError(errno.EIO, "Input/output error", path)
        super().put_file(source, path, **kwargs)


def test_an_object_failing_with_an_io_error_is_exit_7_and_no_snapshot_is_written(tmp_path: Path) -> None:
    files = {"a": b"fine", "b": b"lands on a bad sector"}
    remote_root, by_digest = _push_setup(tmp_path, files)
    s = snap(files)
    remote = FailingDisk(remote_root, sha(files["b"]))
    inv = Inventory.load(tmp_path / "state", remote.url)
    with pytest.raises(TransferFailed) as info:
        push_snapshot(remote, s, inv, by_digest.get, host="h", jobs=2)
    assert info.value.exit_code == ExitCode.TRANSFER_FAILED
    bad = object_path(sha(files["b"]))
    assert info.value.message.startswith(f"1 object(s) failed while uploading, first: {bad}: ")
    assert "Input/output error" in info.value.message and "\n" not in info.value.message
    assert (remote_root / object_path(sha(files["a"]))).read_bytes() == files["a"]  # kept
    assert not (remote_root / "snapshots").exists()  # never names a missing object


def test_content_digest_matches_the_documented_formula() -> None:
    """docs/format.md: SHA-256 over json.dumps([path, size, digest], ensure_ascii=False) + "\\n"."""
    from tether.versioned.layout import content_digest, snapshot_id

    entries = [Entry('a/ü "q"\u2028\\x', 3, 0, "0" * 64), Entry("b", 10**12, 0, "f" * 64)]
    text = "".join(json.dumps([e.path, e.size, e.digest], ensure_ascii=False) + "\n" for e in entries)
    assert content_digest(entries) == sha(text.encode())
    canon = json.dumps({"content": "c" * 64, "dataset": "ns/ds", "parent": None}, sort_keys=True)
    assert snapshot_id("ns/ds", None, "c" * 64) == sha(canon.encode())


def test_cache_removes_temporary_files_untouched_for_a_day_and_keeps_the_rest(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    old, fresh = cache.temp_path(), cache.temp_path()
    old.write_bytes(b"left by a killed fetch")
    fresh.write_bytes(b"a download in progress")
    now = time.time()
    os.utime(old, (now - STALE_TEMP_S - 60, now - STALE_TEMP_S - 60))
    os.utime(fresh, (now - STALE_TEMP_S + 60, now - STALE_TEMP_S + 60))
    assert cache.remove_stale_temps(now=now) == 1
    assert not old.exists() and fresh.exists()
    assert Cache(tmp_path / "no-cache-yet").remove_stale_temps() == 0
