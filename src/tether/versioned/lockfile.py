"""``tether.lock``: which snapshot each dataset is at. Small, sorted, human-readable TOML that
is committed with the code, so every git commit names the exact data it ran with.

```toml
# tether.lock: written by `tether commit`; commit it with git.
version = 1

[datasets."ns/ds"]
snapshot = "<64 hex>"
digest = "<64 hex>"   # content digest: equal data, equal digest
files = 20000
bytes = 104857600
```
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tether.errors import ConfigError
from tether.fileio import write_bytes_atomic
from tether.paths import check_dataset_id
from tether.versioned import gitrev
from tether.versioned.layout import Snapshot, is_digest

LOCK_FILE = "tether.lock"
LOCKFILE_VERSION = 1


class LockFileError(ConfigError):
    default_hint = "Fix or restore tether.lock from git (`git checkout -- tether.lock`)."


@dataclass(frozen=True)
class LockEntry:
    snapshot: str
    digest: str
    files: int
    bytes: int

    @classmethod
    def of(cls, snap: Snapshot) -> LockEntry:
        return cls(snap.id, snap.digest, snap.files, snap.bytes)


def parse(data: bytes, *, source: str) -> dict[str, LockEntry]:
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LockFileError(f"{source} is not valid TOML ({exc})") from None
    if raw.get("version") != LOCKFILE_VERSION:
        raise LockFileError(
            f"{source} has version {raw.get('version')!r}; this tether reads version {LOCKFILE_VERSION}",
            hint="Upgrade tether.",
        )
    datasets = raw.get("datasets", {})
    if not isinstance(datasets, dict):
        raise LockFileError(f"{source}: [datasets] must be a table")
    entries: dict[str, LockEntry] = {}
    for ds_id, item in datasets.items():
        try:
            check_dataset_id(ds_id)
        except Exception:
            raise LockFileError(f"{source}: dataset id {ds_id!r} is not valid") from None
        if not isinstance(item, dict):
            raise LockFileError(f"{source}: entry for {ds_id!r} must be a table")
        snap, digest, files, size = (item.get(k) for k in ("snapshot", "digest", "files", "bytes"))
        if not is_digest(snap) or not is_digest(digest):
            raise LockFileError(f"{source}: {ds_id!r} needs 64-hex `snapshot` and `digest` values")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (files, size)):
            raise LockFileError(f"{source}: {ds_id!r} needs non-negative integer `files` and `bytes`")
        entries[ds_id] = LockEntry(snap, digest, files, size)  # type: ignore[arg-type]
    return entries


def dumps(entries: dict[str, LockEntry]) -> bytes:
    lines = [
        "# tether.lock: the data snapshot each dataset is at. Written by `tether commit`;",
        "# commit it with git so every commit names the exact data it ran with.",
        f"version = {LOCKFILE_VERSION}",
    ]
    for ds_id in sorted(entries):
        e = entries[ds_id]
        lines += [
            "",
            f"[datasets.{json.dumps(ds_id)}]",
            f'snapshot = "{e.snapshot}"',
            f'digest = "{e.digest}"',
            f"files = {e.files}",
            f"bytes = {e.bytes}",
        ]
    return ("\n".join(lines) + "\n").encode()


def read(root: Path) -> dict[str, LockEntry]:
    """The working tree's tether.lock ({} when there is none yet)."""
    path = root / LOCK_FILE
    try:
        return parse(path.read_bytes(), source=str(path))
    except FileNotFoundError:
        return {}


def write(root: Path, entries: dict[str, LockEntry]) -> None:
    write_bytes_atomic(root / LOCK_FILE, dumps(entries))


def read_at(root: Path, commits: list[str]) -> dict[str, dict[str, LockEntry]]:
    """tether.lock at each commit ({} where the commit has none)."""
    texts = gitrev.read_files_at(root, commits, LOCK_FILE)
    return {c: parse(t, source=f"{LOCK_FILE} at {c[:12]}") if t is not None else {} for c, t in texts.items()}
