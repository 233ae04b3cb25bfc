"""The local content-addressed cache: every fetched object once, shareable between workspaces.

Layout mirrors the remote: ``<cache>/objects/ab/cdef…`` and ``<cache>/snapshots/<dataset>/<id>.json``.
Objects are read-only (mode 0444) so a hard-linked workspace file cannot be edited in place, and
they appear under their final name only after their bytes hashed to it (temp name + rename), so
two workspaces (or two runs) filling one cache at once never see a torn or wrong object.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from collections.abc import Collection
from pathlib import Path

from tether.errors import ConfigError, VerificationError
from tether.fileio import copy_verified, ensure_dir, syncfs, write_bytes_atomic
from tether.hashing import digest_file
from tether.versioned.layout import (
    OBJECTS,
    Snapshot,
    SnapshotFormatError,
    digest_from_listing,
    fanout,
    is_digest,
    object_path,
    snapshot_folder,
    snapshot_path,
)

DEFAULT_DIR = ".tether/cache"
BULK_LOOKUP = 256  # digests from which which_have lists folders rather than stat each object
READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
STALE_TEMP_S = 24 * 3600  # a temporary file untouched this long belongs to no live run


def cache_dir(root: Path, raw_settings: dict[str, object]) -> Path:
    """``[cache] dir`` from the layered config (relative to the workspace), else ``.tether/cache``."""
    section = raw_settings.get("cache", {})
    if not isinstance(section, dict):
        raise ConfigError("[cache] must be a table", hint='e.g. [cache]\ndir = "~/.cache/tether"')
    value = section.get("dir", DEFAULT_DIR)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"[cache] dir must be a path, not {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def object_file(self, digest: str) -> Path:
        return self.root / object_path(digest)

    def has(self, digest: str) -> bool:
        # A plain string: pathlib costs more than the stat when a pull asks for 20,000 objects.
        return os.path.isfile(f"{self.root}/{object_path(digest)}")

    def which_have(self, digests: Collection[str]) -> set[str]:
        """The digests among ``digests`` whose objects the cache holds.

        Many digests: one listing per fan-out folder that exists instead of a stat per digest
        (20,000 stats of absent objects cost 0.12 s of a 1.6 s push; an empty cache costs one
        failed scandir). A few digests: a stat each.
        """
        if len(digests) < BULK_LOOKUP:
            return {d for d in digests if self.has(d)}
        wanted = set(digests)
        found: set[str] = set()
        for folder in {fanout(d) for d in wanted}:
            try:
                with os.scandir(self.root / OBJECTS / folder) as it:
                    for entry in it:
                        digest = digest_from_listing(entry.name, folder)
                        if digest in wanted and entry.is_file(follow_symlinks=False):
                            found.add(digest)
            except (FileNotFoundError, NotADirectoryError):
                continue  # no object of this fan-out folder cached yet
        return found

    def temp_path(self) -> Path:
        """A name in the cache's own folder (same filesystem as the objects: rename is atomic)."""
        folder = self.root / "tmp"
        ensure_dir(folder)
        return folder / f"{secrets.token_hex(8)}.tether-tmp-part"

    def remove_stale_temps(self, *, now: float | None = None) -> int:
        """Remove temporary files no run has written to for STALE_TEMP_S; return how many went.

        A fetch killed outright (SIGKILL, a power cut, the OOM killer) leaves its downloads in
        ``tmp/``, and nothing else would ever remove them. A live download touches its file as
        bytes arrive, and workspaces sharing the cache only ever write their own temporary
        names, so a file that old is litter whoever made it.
        """
        now = time.time() if now is None else now
        removed = 0
        try:
            entries = list(os.scandir(self.root / "tmp"))
        except OSError:
            return 0
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= STALE_TEMP_S:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue  # gone meanwhile, or not ours to remove
        return removed

    def adopt(self, verified: Path, digest: str) -> Path:
        """Promote a file whose bytes were already checked against ``digest`` and flushed: once
        named, an object is trusted by its name (a torn one left by a crash would be linked into
        workspaces and vouched for by the hash cache)."""
        final = self.object_file(digest)
        ensure_dir(final.parent)
        os.chmod(verified, READ_ONLY)
        os.replace(verified, final)
        return final

    def insert_copy(self, source: Path, digest: str) -> Path:
        """Copy ``source`` in, hashing on the way; VerificationError if it is not ``digest``.

        The cache trusts an object by its name, so the copy is flushed before it takes it (one
        ``syncfs`` per file: only checkout's rare copy across filesystems comes here).
        """
        if self.has(digest):
            return self.object_file(digest)
        tmp = self.temp_path()
        copy_verified(source, tmp, digest=digest, mtime_ns=None, label=str(source))
        syncfs(self.root)
        return self.adopt(tmp, digest)

    def insert_move(self, source: Path, digest: str) -> bool:
        """Move a workspace file in (it is about to be replaced anyway): free on one filesystem.

        Returns False (source untouched) when the move is impossible or the bytes are not
        ``digest``; the caller then copies or refuses.
        """
        if self.has(digest):
            return True
        tmp = self.temp_path()
        try:
            os.rename(source, tmp)
        except OSError:
            return False
        if digest_file(tmp) != digest:
            os.rename(tmp, source)
            return False
        self.adopt(tmp, digest)
        return True

    def check_object(self, digest: str) -> bool:
        """Rehash one cached object; a damaged one is removed so the next fetch replaces it."""
        path = self.object_file(digest)
        try:
            ok = digest_file(path) == digest
        except FileNotFoundError:
            return False
        if not ok:
            with contextlib.suppress(OSError):
                path.unlink()
        return ok

    # -- snapshots ----------------------------------------------------------------------------
    def snapshot_file(self, dataset_id: str, sid: str) -> Path:
        return self.root / snapshot_path(dataset_id, sid)

    def put_snapshot(self, snap: Snapshot) -> None:
        path = self.snapshot_file(snap.dataset, snap.id)
        if not path.exists():
            write_bytes_atomic(path, snap.dumps(), durable=False)

    def get_snapshot(self, dataset_id: str, sid: str) -> Snapshot | None:
        path = self.snapshot_file(dataset_id, sid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            snap = Snapshot.loads(data, source=str(path), expect_id=sid)
        except SnapshotFormatError:
            path.unlink(missing_ok=True)  # a damaged cached copy: refetch rather than trust
            return None
        if snap.dataset != dataset_id:
            raise VerificationError(f"{path} describes dataset {snap.dataset!r}, not {dataset_id!r}")
        return snap

    def dataset_digests(self, dataset_id: str) -> set[str]:
        """Every digest any cached snapshot of the dataset records (read only when needed)."""
        folder = self.root / snapshot_folder(dataset_id)
        found: set[str] = set()
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            sid = path.name[: -len(".json")]
            snap = self.get_snapshot(dataset_id, sid) if is_digest(sid) else None
            if snap is not None:
                found |= snap.digests()
        return found
