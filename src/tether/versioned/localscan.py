"""The workspace's current state of a dataset, as manifest entries.

Same rules as a mirror push (ownership, refused special files, the sqlite hash cache), with one
addition: a symlink that ``checkout --link symlink`` made into the cache is the cached object
(its name is its verified digest), not a refused link.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tether.errors import ScanError
from tether.hashing import HashCache, hash_entries
from tether.manifest import Entry
from tether.paths import sort_key
from tether.progress import NO_PROGRESS, Progress
from tether.scan import ScanReport, scan_tree
from tether.versioned.cache import Cache
from tether.versioned.layout import digest_from_listing
from tether.workspace import Dataset, Workspace

HASH_THREADS = max(2, os.cpu_count() or 2)


def cache_link_digest(link: Path, cache: Cache) -> tuple[str, int] | None:
    """(digest, size) when ``link`` is a symlink to an object in ``cache``."""
    try:
        target = Path(os.readlink(link))
    except OSError:
        return None
    if not target.is_absolute():
        target = link.parent / target
    objects = (cache.root / "objects").resolve()
    try:
        rel = target.resolve().relative_to(objects).as_posix()
    except (ValueError, OSError):
        return None
    digest = digest_from_listing(rel)
    if digest is None or not target.is_file():
        return None
    return digest, target.stat().st_size


def scan_dataset(
    ws: Workspace,
    dataset: Dataset,
    cache: Cache,
    *,
    skip_symlinks: bool = False,
    checksum: bool = False,
    progress: Progress = NO_PROGRESS,
) -> list[Entry]:
    report = ScanReport()
    progress.stage("scanning local")
    stats = scan_tree(dataset.path, keep=ws.ownership(dataset), skip_symlinks=True, report=report)
    linked: list[Entry] = []
    refused: list[str] = []
    for rel in report.skipped_symlinks:
        found = cache_link_digest(dataset.path / rel, cache)
        if found is not None:
            linked.append(Entry(rel, found[1], 0, found[0]))
        elif skip_symlinks:
            progress.message(f"skipped symlink {rel}")
        else:
            refused.append(rel)
    if refused:
        raise ScanError(
            f"{dataset.path} contains {len(refused)} symlink(s) that do not point into the tether cache",
            paths=refused,
            hint="Replace links with the files they point to, or pass --skip-symlinks to leave them out.",
        )
    progress.stage("hashing local", files=len(stats), bytes=sum(s.size for s in stats))
    hc = HashCache(ws.hash_cache_path)
    try:
        entries = hash_entries(
            dataset.path,
            stats,
            hc,
            cache_prefix=f"{dataset.path}/",
            jobs=HASH_THREADS,
            on_hashed=lambda f, b: progress.advance(files=f, bytes=b),
            force=checksum,
        )
    finally:
        hc.close()
    return sorted(entries + linked, key=lambda e: sort_key(e.path))


def remember_digests(ws: Workspace, dataset: Dataset, done: list[Entry]) -> None:
    """Files checkout just wrote were verified: seed the hash cache so the next scan skips them."""
    hc = HashCache(ws.hash_cache_path)
    prefix = f"{dataset.path}/"
    try:
        for e in done:
            path = prefix + e.path  # plain strings: pathlib cost more than the lstat here
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISLNK(st.st_mode):
                hc.put(
                    path,
                    st.st_ino,
                    st.st_size,
                    st.st_mtime_ns,
                    e.digest,
                    ctime_ns=st.st_ctime_ns,
                )
    finally:
        hc.close()
