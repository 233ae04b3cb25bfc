"""Unit tests for tether.hashing: digests and the sqlite hash cache (incl. git's racy-clean rule)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tether import forked, hashing
from tether.errors import StalePlanError
from tether.hashing import (
    RACY_WINDOW_NS,
    HashCache,
    digest_bytes,
    digest_file,
    digest_stream,
    hash_entries,
    new_hasher,
)
from tether.manifest import Entry
from tether.scan import StatEntry, scan_tree

OLD_NS = 1_600_000_000_000_000_000  # 2020: far outside any racy window
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes, mtime_ns: int | None = OLD_NS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count digest_file_stat calls per file name (proof of whether a file was reread)."""
    counts: Counter[str] = Counter()
    real = hashing.digest_file_stat

    def counting(path: Path) -> tuple[str, object]:
        counts[Path(path).name] += 1
        return real(path)

    monkeypatch.setattr(hashing, "digest_file_stat", counting)
    return counts


def run(root: Path, cache: HashCache, **kwargs: object) -> list[Entry]:
    return hash_entries(root, scan_tree(root), cache, **kwargs)  # type: ignore[arg-type]


# -- digests -------------------------------------------------------------------------------------


def test_digest_file_empty(tmp_path: Path) -> None:
    assert digest_file(write(tmp_path / "e", b"")) == EMPTY_SHA256 == sha(b"")


def test_digest_file_three_mib_crosses_chunks(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3 * 1024 * 1024 + 17)
    assert digest_file(write(tmp_path / "big", data)) == sha(data)


def test_digest_bytes_and_stream_agree() -> None:
    data = b"hello tether\n" * 1000
    assert digest_bytes(data) == sha(data)
    assert digest_stream(io.BytesIO(data)) == sha(data)


def test_unsupported_algorithm_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="md5"):
        new_hasher("md5")
    with pytest.raises(ValueError):
        digest_file(write(tmp_path / "f", b"x"), "md5")


# -- hash_entries and the cache ----------------------------------------------------------------


def test_hash_entries_digests_match_content(tmp_path: Path) -> None:
    write(tmp_path / "a", b"A")
    write(tmp_path / "sub" / "b", b"")
    entries = run(tmp_path, HashCache(None))
    assert entries == [Entry("a", 1, OLD_NS, sha(b"A")), Entry("sub/b", 0, OLD_NS, EMPTY_SHA256)]


def test_cache_hit_avoids_rereading(tmp_path: Path, reads: Counter[str]) -> None:
    for i in range(5):
        write(tmp_path / f"f{i}", f"content {i}".encode())
    cache = HashCache(tmp_path.parent / f"{tmp_path.name}-cache.sqlite")
    first = run(tmp_path, cache)
    assert sum(reads.values()) == 5
    reads.clear()
    second = run(tmp_path, cache)
    assert reads == Counter()
    assert second == first
    cache.close()


def test_only_new_files_are_read(tmp_path: Path, reads: Counter[str]) -> None:
    write(tmp_path / "old", b"o")
    cache = HashCache(None)
    run(tmp_path, cache)
    reads.clear()
    write(tmp_path / "new", b"n")
    run(tmp_path, cache)
    assert reads == Counter({"new": 1})


def test_changed_size_misses(tmp_path: Path, reads: Counter[str]) -> None:
    f = write(tmp_path / "f", b"one")
    cache = HashCache(None)
    run(tmp_path, cache)
    reads.clear()
    write(f, b"longer", mtime_ns=OLD_NS)  # same mtime, different size
    (entry,) = run(tmp_path, cache)
    assert reads == Counter({"f": 1})
    assert entry.digest == sha(b"longer")


def test_changed_mtime_misses(tmp_path: Path, reads: Counter[str]) -> None:
    f = write(tmp_path / "f", b"one")
    cache = HashCache(None)
    run(tmp_path, cache)
    reads.clear()
    write(f, b"two", mtime_ns=OLD_NS + 1)  # same size, different mtime
    (entry,) = run(tmp_path, cache)
    assert reads == Counter({"f": 1})
    assert entry.digest == sha(b"two")


def test_changed_inode_misses(tmp_path: Path, reads: Counter[str]) -> None:
    f = write(tmp_path / "f", b"one")
    cache = HashCache(None)
    run(tmp_path, cache)
    reads.clear()
    # Same size and mtime but a different file (replaced by rename): must not be trusted.
    replacement = write(tmp_path.parent / f"{tmp_path.name}-r", b"two", mtime_ns=OLD_NS)
    old_inode = f.stat().st_ino
    os.replace(replacement, f)
    assert f.stat().st_ino != old_inode
    (entry,) = run(tmp_path, cache)
    assert reads == Counter({"f": 1})
    assert entry.digest == sha(b"two")


def test_force_ignores_cache(tmp_path: Path, reads: Counter[str]) -> None:
    write(tmp_path / "f", b"x")
    cache = HashCache(None)
    run(tmp_path, cache)
    reads.clear()
    run(tmp_path, cache, force=True)
    assert reads == Counter({"f": 1})


def test_cache_persists_across_instances(tmp_path: Path, reads: Counter[str]) -> None:
    data = tmp_path / "data"
    write(data / "f", b"x")
    db = tmp_path / "state" / "deeper" / "hashcache.sqlite"  # parent folders are created
    c1 = HashCache(db)
    first = run(data, c1)
    c1.close()
    assert db.is_file()
    reads.clear()
    c2 = HashCache(db)
    assert run(data, c2) == first
    assert reads == Counter()
    c2.close()


def test_in_memory_caches_are_independent(tmp_path: Path, reads: Counter[str]) -> None:
    write(tmp_path / "f", b"x")
    run(tmp_path, HashCache(None))
    run(tmp_path, HashCache(None))
    assert reads == Counter({"f": 2})


def test_results_keep_input_order(tmp_path: Path) -> None:
    rng = random.Random(1)
    stats = []
    for i in range(40):
        write(tmp_path / f"f{i:02}", rng.randbytes(rng.randrange(0, 50_000)))
    stats = scan_tree(tmp_path)
    rng.shuffle(stats)
    out = hash_entries(tmp_path, stats, HashCache(None), jobs=8)
    assert [e.path for e in out] == [s.path for s in stats]
    for e in out:
        assert e.digest == sha((tmp_path / e.path).read_bytes())
    # Mixed hits and misses keep order too.
    write(tmp_path / "f07", b"changed", mtime_ns=OLD_NS + 7)
    stats = [s if s.path != "f07" else scan_tree(tmp_path, keep=lambda p: p == "f07")[0] for s in stats]
    out2 = hash_entries(tmp_path, stats, HashCache(None), jobs=8)
    assert [e.path for e in out2] == [s.path for s in stats]


def test_many_small_files_are_read_ahead_and_hashed_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From READ_AHEAD_MIN_FILES files on, a read-ahead thread asks the kernel for the small
    files ahead of the hashers (not the large ones); the digests are the same."""
    advised: list[str] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    monkeypatch.setattr(hashing, "READ_AHEAD_MAX", 20_000)
    rng = random.Random(2)
    for i in range(hashing.READ_AHEAD_MIN_FILES + 10):
        write(tmp_path / f"d{i % 3}" / f"f{i:03}", rng.randbytes(rng.randrange(0, 10_000)))
    write(tmp_path / "big", rng.randbytes(30_000))
    out = hash_entries(tmp_path, scan_tree(tmp_path), HashCache(None), jobs=2)
    assert all(e.digest == sha((tmp_path / e.path).read_bytes()) for e in out)
    # The read-ahead is a hint that may stop short when the hashers are done first: what it
    # asked for is small files only.
    small = {str(tmp_path / e.path) for e in out if e.path != "big"}
    assert advised and set(advised) <= small


def test_on_hashed_accounts_for_every_file(tmp_path: Path, reads: Counter[str]) -> None:
    write(tmp_path / "a", b"12345")
    write(tmp_path / "b", b"12")
    cache = HashCache(None)
    calls: list[tuple[int, int]] = []
    run(tmp_path, cache, on_hashed=lambda f, b: calls.append((f, b)))
    # Files are read in batches; the increments add up to every file and byte.
    assert (sum(f for f, _ in calls), sum(b for _, b in calls)) == (2, 7)
    calls.clear()
    write(tmp_path / "c", b"1")
    run(tmp_path, cache, on_hashed=lambda f, b: calls.append((f, b)))
    # Cache hits are reported in one lump so progress still reaches the total.
    assert calls[0] == (2, 7) and (sum(f for f, _ in calls), sum(b for _, b in calls)) == (3, 8)
    assert reads == Counter({"a": 1, "b": 1, "c": 1})


def test_cache_prefix_keys_are_per_prefix(tmp_path: Path, reads: Counter[str]) -> None:
    write(tmp_path / "f", b"x")
    cache = HashCache(None)
    run(tmp_path, cache, cache_prefix="/ws/data/ns/ds/")
    reads.clear()
    run(tmp_path, cache, cache_prefix="/ws/data/ns/other/")
    assert reads == Counter({"f": 1})
    st = (tmp_path / "f").stat()
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert cache.get_many([("/ws/data/ns/ds/f", *key)]) == {"/ws/data/ns/ds/f": sha(b"x")}
    assert cache.get_many([("f", *key)]) == {}


def test_file_changed_during_hashing_is_not_cached(tmp_path: Path, reads: Counter[str]) -> None:
    f = write(tmp_path / "f", b"x")
    st = f.stat()
    # The scan saw an older state than the one read: the digest is not cached under that key.
    stale = StatEntry("f", st.st_size, st.st_mtime_ns - 10**9, st.st_ino)
    cache = HashCache(None)
    hash_entries(tmp_path, [stale], cache)
    hash_entries(tmp_path, [stale], cache)
    assert reads == Counter({"f": 2})


# -- racy clean rule -----------------------------------------------------------------------------


def test_racy_boundary_in_get_many() -> None:
    cache = HashCache(None)
    mtime = OLD_NS
    cache.put("racy", 1, 1, mtime, "d1", hashed_at_ns=mtime + RACY_WINDOW_NS)
    cache.put("clean", 2, 1, mtime, "d2", hashed_at_ns=mtime + RACY_WINDOW_NS + 1)
    cache.put("future", 3, 1, mtime, "d3", hashed_at_ns=mtime - 1)  # mtime after hashing
    cache.flush()
    got = cache.get_many([("racy", 1, 1, mtime), ("clean", 2, 1, mtime), ("future", 3, 1, mtime)])
    assert got == {"clean": "d2"}


def test_racy_entry_is_rehashed(tmp_path: Path, reads: Counter[str]) -> None:
    f = write(tmp_path / "f", b"x")
    st = f.stat()
    cache = HashCache(None)
    # Hashed 10 ms after its mtime: a write in the same tick could have gone unnoticed.
    cache.put("f", st.st_ino, st.st_size, st.st_mtime_ns, "stale-digest", OLD_NS + RACY_WINDOW_NS // 5)
    cache.flush()
    (entry,) = run(tmp_path, cache)
    assert reads == Counter({"f": 1})
    assert entry.digest == sha(b"x")
    # The rehash happened long after the (old) mtime, so it is now trusted.
    reads.clear()
    run(tmp_path, cache)
    assert reads == Counter()


def test_entry_hashed_well_after_mtime_is_trusted(tmp_path: Path, reads: Counter[str]) -> None:
    f = write(tmp_path / "f", b"x")
    st = f.stat()
    cache = HashCache(None)
    cache.put(
        "f", st.st_ino, st.st_size, st.st_mtime_ns, "cached-digest", OLD_NS + 10**9, ctime_ns=st.st_ctime_ns
    )
    cache.flush()
    (entry,) = run(tmp_path, cache)
    assert reads == Counter()
    assert entry.digest == "cached-digest"  # the cache is trusted, not re-verified


def test_file_with_future_mtime_is_always_rehashed(tmp_path: Path, reads: Counter[str]) -> None:
    write(tmp_path / "f", b"x", mtime_ns=time.time_ns() + 3600 * 10**9)
    cache = HashCache(None)
    run(tmp_path, cache)
    run(tmp_path, cache)
    assert reads == Counter({"f": 2})


# -- HashCache mechanics -------------------------------------------------------------------------


def test_put_is_invisible_until_flush_and_replaces(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    writer = HashCache(db)
    writer.put("p", 1, 2, OLD_NS, "d1", OLD_NS + 10**9)
    assert HashCache(db).get_many([("p", 1, 2, OLD_NS)]) == {}
    writer.flush()
    assert HashCache(db).get_many([("p", 1, 2, OLD_NS)]) == {"p": "d1"}
    writer.put("p", 1, 2, OLD_NS, "d2", OLD_NS + 10**9)
    writer.close()  # close flushes
    assert HashCache(db).get_many([("p", 1, 2, OLD_NS)]) == {"p": "d2"}


def test_get_many_handles_more_keys_than_one_query() -> None:
    cache = HashCache(None)
    keys = [(f"p{i}", i, i, OLD_NS) for i in range(1234)]
    for path, inode, size, mtime in keys:
        cache.put(path, inode, size, mtime, f"d{inode}", OLD_NS + 10**9)
    cache.flush()
    got = cache.get_many(keys)
    assert len(got) == 1234
    assert got["p1233"] == "d1233"
    assert cache.get_many([]) == {}


def test_rewrite_with_restored_mtime_is_rehashed(tmp_path: Path, reads: Counter[str]) -> None:
    """`cp -p`, `touch -r` and `rsync -t` restore the mtime; the ctime still moves."""
    f = write(tmp_path / "f", b"old!", mtime_ns=OLD_NS)
    cache = HashCache(None)
    run(tmp_path, cache)
    before = f.stat()
    f.write_bytes(b"new!")
    os.utime(f, ns=(OLD_NS, OLD_NS))
    assert f.stat().st_mtime_ns == before.st_mtime_ns
    reads.clear()
    (entry,) = run(tmp_path, cache)
    assert reads == Counter({"f": 1})
    assert entry.digest == sha(b"new!")


def test_many_connections_opening_one_cache_at_once(tmp_path: Path) -> None:
    """The local scan and a foreign comparison (or two runs in one workspace) open the cache
    together: none of them fails with "database is locked"."""
    db = tmp_path / "cache.sqlite"
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def open_and_write(i: int) -> None:
        try:
            start.wait()
            cache = HashCache(db)
            cache.put(f"/f{i}", 1, 2, 3, "d" * 64)
            cache.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_and_write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    cache = HashCache(db)
    assert len(cache._db.execute("SELECT path FROM digests_v2").fetchall()) == 8
    cache.close()


# -- many small files: forked workers ------------------------------------------------------------


@pytest.fixture
def forked_from_one(monkeypatch: pytest.MonkeyPatch) -> None:
    if not forked.available():
        pytest.skip("forked workers are Linux-only")
    monkeypatch.setenv("TETHER_FORK_MIN_FILES", "1")


def test_many_small_files_are_hashed_in_worker_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forked_from_one: None
) -> None:
    data = tmp_path / "data"
    rng = random.Random(3)
    for i in range(300):
        write(data / f"d{i % 7}" / f"f{i:03}", rng.randbytes(rng.randrange(0, 5000)))
    write(data / "big", rng.randbytes(hashing.READ_AHEAD_MAX + 1))  # large files stay in threads
    pids = tmp_path / "pids"
    real = hashing.digest_file_stat

    def logging_pid(path: Path) -> tuple[str, object]:
        with open(pids, "a") as log:
            log.write(f"{os.getpid()} {Path(path).name}\n")
        return real(path)

    monkeypatch.setattr(hashing, "digest_file_stat", logging_pid)
    asked: list[tuple[int, int]] = []  # (items, processes) of each run_forked call
    real_forked = forked.run_forked

    def recording(items, work, *, processes, **kw):  # type: ignore[no-untyped-def]
        asked.append((len(items), processes))
        real_forked(items, work, processes=processes, **kw)

    monkeypatch.setattr(forked, "run_forked", recording)
    cache = HashCache(None)
    calls: list[tuple[int, int]] = []
    out = run(data, cache, on_hashed=lambda f, b: calls.append((f, b)))
    assert all(e.digest == sha((data / e.path).read_bytes()) for e in out)
    assert (sum(f for f, _ in calls), sum(b for _, b in calls)) == (301, sum(e.size for e in out))
    readers = {line.split()[1]: int(line.split()[0]) for line in pids.read_text().splitlines()}
    assert readers["big"] == os.getpid()
    small = {pid for name, pid in readers.items() if name != "big"}
    # Which of the workers take the 5 chunks is up to the scheduler (one fast worker may take
    # them all: seen under CI load); that several run at once is tests/test_forked.py's job.
    assert asked == [(300, hashing.HASH_PROCESSES)]
    assert os.getpid() not in small and len(small) >= 1
    pids.unlink()
    assert [e.digest for e in run(data, cache)] == [e.digest for e in out]  # all cached here
    assert not pids.exists()


def test_a_file_gone_while_workers_hash_is_a_stale_plan(tmp_path: Path, forked_from_one: None) -> None:
    for i in range(20):
        write(tmp_path / f"f{i:02}", b"x" * i)
    stats = scan_tree(tmp_path)
    (tmp_path / "f07").unlink()
    with pytest.raises(StalePlanError, match="f07 disappeared"):
        hash_entries(tmp_path, stats, HashCache(None))


def test_a_file_changed_while_workers_hash_it_is_not_cached(tmp_path: Path, forked_from_one: None) -> None:
    for i in range(20):
        write(tmp_path / f"f{i:02}", b"x" * i)
    stats = scan_tree(tmp_path)
    write(tmp_path / "f03", b"rewritten", mtime_ns=OLD_NS + 5)  # after the scan, before the hashing
    cache = HashCache(None)
    hash_entries(tmp_path, stats, cache)
    keys = [(s.path, s.inode, s.size, s.mtime_ns, s.ctime_ns) for s in stats]
    assert set(cache.get_many(keys)) == {s.path for s in stats} - {"f03"}
