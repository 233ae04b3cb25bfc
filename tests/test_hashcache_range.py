"""HashCache.get_many with a cache prefix: one range read of the primary key must answer exactly
what per-path lookups answer (same hits, racy-clean rule, full-key match), never leak rows of a
sibling prefix, and fall back to stepping rows when sqlite lacks its JSON functions."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tether import hashing
from tether.hashing import RACY_WINDOW_NS, HashCache

OLD_NS = 1_600_000_000_000_000_000
PREFIX = "/a/b/"
# Sort neighbours of PREFIX: "." sorts just before "/", "0" just after it, "c" well after.
SIBLINGS = ["/a/bc/x", "/a/b.x", "/a/b0/x", "/a/b", "/a/a/x", "/a/c/x"]
NAMES = ["x", "d/y", "é", "d/\U0001f600", "z z", "a/b/c/d", "0", ".hidden"]

Key = tuple[str, int, int, int, int]


@pytest.fixture(params=[True, False], ids=["file", "memory"])
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> HashCache:
    return HashCache(tmp_path / "hashcache.sqlite" if request.param else None)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handful of keys takes the range path (more than IN_CHUNK keys) and hits its budget."""
    monkeypatch.setattr(hashing, "IN_CHUNK", 2)


def fill(cache: HashCache) -> list[Key]:
    """Cache rows under PREFIX and its siblings; return lookup keys of every kind of outcome."""
    keys: list[Key] = []
    for i, name in enumerate(NAMES):
        path = PREFIX + name
        cache.put(path, i, 10 + i, OLD_NS + i, f"digest-{i}", OLD_NS + 10**12, ctime_ns=OLD_NS + i)
        keys.append((path, i, 10 + i, OLD_NS + i, OLD_NS + i))  # hit
    for j, path in enumerate(SIBLINGS):
        cache.put(path, 100 + j, 1, OLD_NS, f"sibling-{j}", OLD_NS + 10**12, ctime_ns=OLD_NS)
    cache.put(PREFIX + "racy", 50, 1, OLD_NS, "racy", OLD_NS + RACY_WINDOW_NS, ctime_ns=OLD_NS)
    cache.put(PREFIX + "clean", 51, 1, OLD_NS, "clean", OLD_NS + RACY_WINDOW_NS + 1, ctime_ns=OLD_NS)
    cache.put(PREFIX + "moved", 52, 1, OLD_NS, "moved", OLD_NS + 10**12, ctime_ns=OLD_NS)
    cache.flush()
    keys += [
        (PREFIX + "racy", 50, 1, OLD_NS, OLD_NS),  # hashed within the racy window: no hit
        (PREFIX + "clean", 51, 1, OLD_NS, OLD_NS),  # one ns past it: a hit
        (PREFIX + "moved", 99, 1, OLD_NS, OLD_NS),  # other inode: no hit
        (PREFIX + "x", 0, 10, OLD_NS, OLD_NS + 1),  # other mtime: no hit
        (PREFIX + "d/y", 1, 11, OLD_NS + 1, OLD_NS),  # other ctime: no hit
        (PREFIX + "never", 1, 1, OLD_NS, OLD_NS),  # not cached
    ]
    return keys


def test_range_read_answers_like_per_path_lookups(cache: HashCache, small_chunks: None) -> None:
    keys = fill(cache)
    by_path = cache.get_many(keys)
    by_range = cache.get_many(keys, prefix=PREFIX)
    assert by_range == by_path
    assert set(by_path) == {PREFIX + n for n in NAMES} | {PREFIX + "clean"}
    assert by_path[PREFIX + "é"] == "digest-2"


def test_range_read_answers_like_per_path_lookups_for_a_few_keys_of_many_rows(
    cache: HashCache, small_chunks: None
) -> None:
    """Few keys, spread over many cached rows: the read stops at its budget and the keys past
    its last row are looked up by path (in sqlite's byte order, non-ASCII names included)."""
    keys = fill(cache)
    for i in range(200):
        cache.put(f"{PREFIX}bulk/{i:04d}", i, 1, OLD_NS, "bulk", OLD_NS + 10**12)
    cache.flush()
    spread = [*keys[::2], (f"{PREFIX}bulk/0199", 199, 1, OLD_NS, 0)]
    assert 2 * len(spread) + hashing.IN_CHUNK < 200  # the budget really runs out
    by_range = cache.get_many(spread, prefix=PREFIX)
    assert by_range == cache.get_many(spread)
    assert f"{PREFIX}bulk/0199" in by_range
    assert {PREFIX + "z z", PREFIX + "é"} <= set(by_range)  # sort after "bulk/": past the budget


def test_range_never_returns_rows_of_a_sibling_prefix(cache: HashCache, small_chunks: None) -> None:
    fill(cache)
    rows = cache._rows_in_range(hashing.TABLES["sha256"], PREFIX, [PREFIX + n for n in NAMES])
    assert all(path.startswith(PREFIX) for path in rows)
    assert set(rows) >= {PREFIX + n for n in NAMES}


def test_keys_outside_the_prefix_still_hit(cache: HashCache, small_chunks: None) -> None:
    """The prefix only picks how rows are read: a key under a sibling prefix is still answered."""
    keys = fill(cache)
    sibling = ("/a/bc/x", 100, 1, OLD_NS, OLD_NS)
    got = cache.get_many([*keys, sibling], prefix=PREFIX)
    assert got["/a/bc/x"] == "sibling-0"
    assert got == cache.get_many([*keys, sibling])


def test_md5_table_is_read_the_same_way(cache: HashCache, small_chunks: None) -> None:
    keys = fill(cache)
    for path, inode, size, mtime_ns, ctime_ns in keys[:3]:
        cache.put(path, inode, size, mtime_ns, "md5-" + path, OLD_NS + 10**12, ctime_ns=ctime_ns, kind="md5")
    cache.flush()
    got = cache.get_many(keys, kind="md5", prefix=PREFIX)
    assert got == {k[0]: "md5-" + k[0] for k in keys[:3]}
    assert got == cache.get_many(keys, kind="md5")


class NoJsonConnection:
    """A connection whose sqlite has no JSON functions (before 3.38, or built without them)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.json_attempts = 0

    def execute(self, sql: str, args: Any = ()) -> sqlite3.Cursor:
        if "json_" in sql:
            self.json_attempts += 1
            raise sqlite3.OperationalError("no such function: json_group_array")
        return self.db.execute(sql, args)


def test_without_json_functions_rows_are_stepped(cache: HashCache, small_chunks: None) -> None:
    keys = fill(cache)
    expected = cache.get_many(keys, prefix=PREFIX)
    fake = NoJsonConnection(cache._db)
    cache._db = fake  # type: ignore[assignment]
    assert cache.get_many(keys, prefix=PREFIX) == expected
    assert cache.get_many(keys) == expected
    assert fake.json_attempts == 1  # tried once, then remembered


def test_other_sqlite_errors_are_not_mistaken_for_missing_json(cache: HashCache) -> None:
    fill(cache)
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        cache._select("FROM no_such_table WHERE path >= ?", ("",))
    assert cache._json  # still reading through JSON afterwards
