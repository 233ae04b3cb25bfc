"""Content digests and the sqlite cache that makes a no-op diff cheap.

The cache is keyed by (path, inode, size, mtime_ns, ctime_ns): an unchanged file is never re-read;
ctime catches a rewrite whose mtime was restored (``cp -p``, ``touch -r``, ``rsync -t``). A file
whose mtime lies within ``RACY_WINDOW_NS`` of the moment it was hashed may have been written
again within the same clock tick, so such an entry is not trusted and is hashed once more later
(git's "racy clean" rule).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from tether import forked
from tether.errors import StalePlanError
from tether.manifest import DEFAULT_ALGORITHM, Entry
from tether.readahead import Prefetcher
from tether.scan import StatEntry

CHUNK = 1024 * 1024
RACY_WINDOW_NS = 50_000_000  # 50 ms: well above the mtime granularity of common filesystems
# One table per digest kind, same key and rules. MD5 is only ever compared with an object store's
# plain ETag (foreign prefixes, tether.foreign); it never names content in a manifest.
TABLES = {"sha256": "digests_v2", "md5": "md5_v1"}
COLUMNS = "path, inode, size, mtime_ns, ctime_ns, digest, hashed_at_ns"
IN_CHUNK = 500  # paths per `WHERE path IN (...)`: well under sqlite's bound-parameter limit
Row = Sequence[Any]  # COLUMNS, in order: path, inode, size, mtime_ns, ctime_ns, digest, hashed_at_ns


def new_hasher(algorithm: str = DEFAULT_ALGORITHM) -> hashlib._Hash:
    if algorithm != "sha256":
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return hashlib.sha256()


def digest_stream(stream: BinaryIO, algorithm: str = DEFAULT_ALGORITHM) -> str:
    return hashlib.file_digest(stream, lambda: new_hasher(algorithm)).hexdigest()


def digest_file(path: Path, algorithm: str = DEFAULT_ALGORITHM) -> str:
    with open(path, "rb", buffering=0) as f:
        return digest_stream(f, algorithm)


def digest_file_stat(path: Path) -> tuple[str, os.stat_result]:
    """The digest and the file's state right after reading it (to notice a write during the read)."""
    with open(path, "rb", buffering=0) as f:
        return digest_stream(f), os.fstat(f.fileno())


def digest_bytes(data: bytes, algorithm: str = DEFAULT_ALGORITHM) -> str:
    h = new_hasher(algorithm)
    h.update(data)
    return h.hexdigest()


class HashCache:
    """sqlite-backed digest cache; safe to use from several hashing threads."""

    def __init__(self, db_path: Path | None) -> None:
        self._lock = threading.Lock()
        self._json = True  # sqlite has its JSON functions (see _select)
        self._pending: dict[str, list[tuple[str, int, int, int, int, str, int]]] = {t: [] for t in TABLES}
        if db_path is None:
            self._db = sqlite3.connect(":memory:", check_same_thread=False)
        else:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(db_path, check_same_thread=False, timeout=30)
        self._setup(file_backed=db_path is not None)

    def _setup(self, *, file_backed: bool) -> None:
        """WAL mode and the tables, only where missing: switching the journal mode or changing
        the schema needs an exclusive lock that sqlite reports as "database is locked" at once
        (no busy wait) while another connection is open, as when the local scan and a foreign
        comparison, or two tether runs in one workspace, open the cache together."""
        for attempt in range(50):
            try:
                if file_backed:
                    if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        self._db.execute("PRAGMA journal_mode=WAL")
                    self._db.execute("PRAGMA synchronous=NORMAL")
                have = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                for table in TABLES.values():
                    if table not in have:
                        self._db.execute(
                            f"CREATE TABLE IF NOT EXISTS {table} (path TEXT PRIMARY KEY, inode INTEGER, "
                            "size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, digest TEXT, "
                            "hashed_at_ns INTEGER)"
                        )
                self._db.commit()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.1)  # back off while the other connection finishes its set-up

    def get_many(
        self, keys: Sequence[tuple[int | str, ...]], *, kind: str = "sha256", prefix: str = ""
    ) -> dict[str, str]:
        """Digests for the (path, inode, size, mtime_ns[, ctime_ns]) keys that hit and are not racy.

        ``prefix`` (a dataset's cache prefix, ending in "/") only changes how rows are read, never
        the answer: many keys under it are read as one ordered range of the primary key instead
        of a lookup per path (see ``_rows_in_range``); keys outside it are looked up one by one.
        """
        table = TABLES[kind]
        paths = [str(k[0]) for k in keys]
        with self._lock:
            if prefix.endswith("/") and len(paths) > IN_CHUNK:
                inside = [p for p in paths if p.startswith(prefix)]
                rows = self._rows_in_range(table, prefix, inside)
                if len(inside) < len(paths):
                    rows.update(self._rows_for(table, [p for p in paths if not p.startswith(prefix)]))
            else:
                rows = self._rows_for(table, paths)
        return _hits(keys, rows)

    def _rows_for(self, table: str, paths: Sequence[str]) -> dict[str, Row]:
        """Rows by primary-key lookups, IN_CHUNK paths per query."""
        rows: dict[str, Row] = {}
        for start in range(0, len(paths), IN_CHUNK):
            chunk = paths[start : start + IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            for row in self._select(f"FROM {table} WHERE path IN ({marks})", chunk):
                rows[row[0]] = row
        return rows

    def _rows_in_range(self, table: str, prefix: str, paths: Sequence[str]) -> dict[str, Row]:
        """Rows whose path starts with ``prefix`` (which ends in "/"): one pass over the primary
        key's index instead of a descent per path (20,000 keys, rows stepped one by one: 43 ms
        instead of 60 ms).

        The range is [prefix, prefix with "/" bumped to "0"): sqlite compares TEXT as UTF-8 bytes
        and "0" follows "/", so "/a/b/x" is inside and "/a/bc/x" or "/a/b.x" are not. When the
        cache holds far more under the prefix than was asked (a one-folder target of a large
        dataset), reading stops after about two rows per path and the paths past the last row
        read are looked up one by one instead, so the cost stays bounded by the request.
        """
        budget = 2 * len(paths) + IN_CHUNK
        got = self._select(
            f"FROM {table} WHERE path >= ? AND path < ? ORDER BY path LIMIT ?",
            (prefix, prefix[:-1] + "0", budget),
        )
        rows = {row[0]: row for row in got}
        if len(got) == budget:  # stopped early: str order is UTF-8 byte order, sqlite's order
            last = got[-1][0]
            rows.update(self._rows_for(table, [p for p in paths if p > last]))
        return rows

    def _select(self, query: str, args: Sequence[object]) -> list[Row]:
        """The COLUMNS of ``SELECT ... {query}``, as one JSON text built inside sqlite.

        Python's sqlite3 releases the GIL around every row step, and while another thread is
        busy in Python (``scan_both`` parses the remote index during the local lookup) each
        release can wait up to the 5 ms switch interval to get it back: 20,000 rows stepped
        took 0.07-0.3 s in a no-op diff (0.04 s alone), and 6-16 s beside a pure-Python loop.
        One aggregate row is one release: 0.05 s alone, 0.06-0.11 s beside that loop. Without
        sqlite's JSON functions (before 3.38, or built without them) rows are stepped.
        """
        if self._json:
            try:
                (text,) = self._db.execute(
                    f"SELECT json_group_array(json_array({COLUMNS})) FROM (SELECT * {query})", args
                ).fetchone()
                return json.loads(text)  # type: ignore[no-any-return]
            except sqlite3.OperationalError as exc:
                if "no such function" not in str(exc):
                    raise
                self._json = False
        return self._db.execute(f"SELECT {COLUMNS} {query}", args).fetchall()

    def put(
        self,
        path: str,
        inode: int,
        size: int,
        mtime_ns: int,
        digest: str,
        hashed_at_ns: int | None = None,
        *,
        ctime_ns: int = 0,
        kind: str = "sha256",
    ) -> None:
        stamp = hashed_at_ns or time.time_ns()
        with self._lock:
            self._pending[kind].append((path, inode, size, mtime_ns, ctime_ns, digest, stamp))

    def flush(self) -> None:
        with self._lock:
            if any(self._pending.values()):
                for kind, rows in self._pending.items():
                    if rows:
                        self._db.executemany(
                            f"INSERT OR REPLACE INTO {TABLES[kind]} VALUES (?,?,?,?,?,?,?)", rows
                        )
                        rows.clear()
                self._db.commit()

    def close(self) -> None:
        self.flush()
        self._db.close()


def _hits(keys: Sequence[tuple[int | str, ...]], rows: dict[str, Row]) -> dict[str, str]:
    """The keys whose row matches in every field and was not hashed racily close to its mtime."""
    found: dict[str, str] = {}
    get = rows.get
    for key in keys:
        row = get(key[0])  # type: ignore[arg-type]
        if row is None:
            continue
        mtime_ns = key[3]
        if (row[1], row[2], row[3], row[4]) != (key[1], key[2], mtime_ns, key[4] if len(key) > 4 else 0):
            continue
        if mtime_ns >= row[6] - RACY_WINDOW_NS:  # type: ignore[operator]
            continue  # racy: written too close to when it was hashed
        found[row[0]] = row[5]
    return found


ProgressFn = Callable[[int, int], None]  # (files done, bytes done) increments
Hashed = tuple[str, tuple[int, int, int], int]  # digest, (size, mtime, ctime) after, started

READ_AHEAD_MIN_FILES = 64
READ_AHEAD_MAX = 1024 * 1024  # files larger than this are read in big chunks: no read-ahead
# Worker processes for many small files (see tether.forked): cold, 20,000 files of 1-16 KiB
# were hashed in 1.2-1.45 s by threads with read-ahead (their reads and the GIL take turns).
HASH_PROCESSES = 8
BATCH_FILES = 64  # small files per hashing task: a task (future, GIL hand-off) per file costs
BATCH_BYTES = 8 * 1024 * 1024  # more than hashing a 4 KiB file; large files go one per task


def _batches(todo: list[int], entries: Sequence[StatEntry]) -> Iterator[list[int]]:
    batch: list[int] = []
    size = 0
    for i in todo:
        batch.append(i)
        size += entries[i].size
        if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def hash_entries(
    root: Path,
    entries: Iterable[StatEntry],
    cache: HashCache,
    *,
    cache_prefix: str = "",
    jobs: int = 4,
    on_hashed: ProgressFn | None = None,
    force: bool = False,
    before_reading: Callable[[], None] | None = None,
) -> list[Entry]:
    """Turn stat entries into manifest entries, reading only files the cache cannot vouch for.

    ``cache_prefix`` makes cache keys unique per workspace (dataset path under the workspace).
    ``force`` ignores the cache (``--checksum``). Order is preserved. ``before_reading`` runs
    once after the cache lookup, only if some file must be read (and may raise to stop there).
    """
    entries = list(entries)
    keys = [(cache_prefix + e.path, e.inode, e.size, e.mtime_ns, e.ctime_ns) for e in entries]
    known = {} if force else cache.get_many(keys, prefix=cache_prefix)
    digests: list[str | None] = [known.get(k[0]) for k in keys]
    todo = [i for i, d in enumerate(digests) if d is None]
    if todo and before_reading is not None:
        before_reading()
    if on_hashed and len(todo) < len(entries):
        cached = [e for e, d in zip(entries, digests, strict=True) if d is not None]
        on_hashed(len(cached), sum(e.size for e in cached))

    def hash_one(i: int) -> Hashed:
        """(digest, the file's (size, mtime, ctime) after reading, when reading started)."""
        e = entries[i]
        started = time.time_ns()
        try:
            digest, st = digest_file_stat(root / e.path)
        except FileNotFoundError:
            raise StalePlanError(f"{e.path} disappeared while it was being scanned") from None
        return digest, (st.st_size, st.st_mtime_ns, st.st_ctime_ns), started

    def remember(i: int, digest: str, after: tuple[int, int, int], started: int) -> None:
        e = entries[i]
        # A file changed while we read it: hash it again from its new state on the next run.
        if after == (e.size, e.mtime_ns, e.ctime_ns):
            key = cache_prefix + e.path
            cache.put(key, e.inode, e.size, e.mtime_ns, digest, started, ctime_ns=e.ctime_ns)

    def work(batch: list[int]) -> list[tuple[int, str]]:
        out = []
        for i in batch:
            ahead.consumed()
            digest, after, started = hash_one(i)
            remember(i, digest, after, started)
            out.append((i, digest))
        return out

    small = [i for i in todo if entries[i].size <= READ_AHEAD_MAX]
    if forked.worth_it(len(small), HASH_PROCESSES):
        # Many small files: forked workers read and hash them, this process keeps the cache.
        errors: list[BaseException] = []

        def on_outcome(i: int, value: Hashed | None, error: BaseException | None) -> None:
            if error is not None:
                errors.append(error)
                return
            assert value is not None
            digests[i] = value[0]
            remember(i, *value)
            if on_hashed:
                on_hashed(1, entries[i].size)

        try:
            forked.run_forked(
                small, hash_one, processes=HASH_PROCESSES, on_outcome=on_outcome, stop_on=(StalePlanError,)
            )
        finally:
            cache.flush()
        if errors:
            raise errors[0]
        todo = [i for i in todo if entries[i].size > READ_AHEAD_MAX]

    # Cold small files: a read-ahead thread keeps the disk busy while the hashers wait on it
    # (20,000 files of 1-16 KiB, cold cache: 1.7-2.0 s with 2 hashing threads, 1.2-1.3 s with
    # the read-ahead; more threads instead were slower).
    ahead = Prefetcher(
        [str(root / entries[i].path) if entries[i].size <= READ_AHEAD_MAX else None for i in todo]
        if len(todo) >= READ_AHEAD_MIN_FILES
        else []
    )

    if todo:
        try:
            with ahead, ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                for done in pool.map(work, _batches(todo, entries)):
                    for i, digest in done:
                        digests[i] = digest
                    if on_hashed:
                        on_hashed(len(done), sum(entries[i].size for i, _ in done))
        finally:
            cache.flush()  # keep what was hashed even if one file vanished
    return [Entry(e.path, e.size, e.mtime_ns, d) for e, d in zip(entries, digests, strict=True)]  # type: ignore[arg-type]
