"""Garbage collection: mark everything the kept revisions reference, sweep the rest.

The scope is always explicit (``--keep-revs all-commits|branches|N-days``). Planning is pure
(:func:`plan_gc`) and property-tested: an object referenced by a kept snapshot is never in the
sweep. The sweep runs under the remote's exclusive lock after a second, fresh plan, deletes only
what both plans agree on (so never more than was printed), removes snapshot records before
objects (a crash leaves no snapshot pointing at a deleted object), and spares objects and
snapshots newer than the oldest running push (minus ``CLOCK_SKEW_S``): those may belong to a
snapshot not written yet.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tether import faults
from tether.errors import UsageError
from tether.lock import LockRecord
from tether.paths import check_dataset_id
from tether.remotes.base import Remote
from tether.versioned import gitrev, lockfile
from tether.versioned.layout import (
    GC_STATE,
    OBJECTS,
    SNAPSHOTS,
    digest_from_listing,
    object_path,
    snapshot_id_from_listing,
    snapshot_path,
)
from tether.versioned.store import list_objects, read_markers

CLOCK_SKEW_S = 300.0
DAY_S = 86400.0
SnapKey = tuple[str, str]  # (dataset id, snapshot id)


@dataclass(frozen=True)
class Scope:
    kind: str  # all-commits | branches | days
    days: float = 0.0

    @classmethod
    def parse(cls, value: str) -> Scope:
        v = value.strip().lower()
        if v in ("all-commits", "branches"):
            return cls(v)
        m = re.fullmatch(r"(\d+)(?:-?days?|d)", v)
        if m:
            return cls("days", float(m.group(1)))
        raise UsageError(
            f"--keep-revs {value!r} is not a scope",
            hint="Use all-commits (every commit of every ref), branches (branch tips, HEAD and the "
            "working tree), or N-days (snapshots made in the last N days, plus branch tips).",
        )

    def describe(self) -> str:
        return (
            f"snapshots made in the last {self.days:g} days plus branch tips"
            if self.kind == "days"
            else self.kind
        )


def kept_from_git(root: Path, scope: Scope) -> set[SnapKey]:
    """(dataset, snapshot) pairs tether.lock names in the scope's commits, plus the working tree's."""
    commits: list[str] = []
    if gitrev.in_repo(root):
        commits = gitrev.all_commits(root) if scope.kind == "all-commits" else gitrev.branch_tips(root)
        head = gitrev.head(root)
        if head:
            commits.append(head)
    kept = {(ds, e.snapshot) for ds, e in lockfile.read(root).items()}
    for entries in lockfile.read_at(root, commits).values():
        kept |= {(ds, e.snapshot) for ds, e in entries.items()}
    return kept


@dataclass
class GcPlan:
    delete_snapshots: list[SnapKey] = field(default_factory=list)
    delete_objects: list[str] = field(default_factory=list)
    kept_snapshots: int = 0
    kept_objects: int = 0
    spared_by_grace: int = 0
    reclaimed_bytes: int = 0

    def intersect(self, first: GcPlan) -> GcPlan:
        """Only what both plans would delete: never more than the plan the user saw."""
        snaps = set(first.delete_snapshots)
        objs = set(first.delete_objects)
        return GcPlan(
            [k for k in self.delete_snapshots if k in snaps],
            [d for d in self.delete_objects if d in objs],
            self.kept_snapshots,
            self.kept_objects,
            self.spared_by_grace,
            self.reclaimed_bytes,
        )


def plan_gc(
    snapshots: Mapping[SnapKey, int],
    kept: set[SnapKey],
    references: Mapping[SnapKey, Iterable[str]],
    objects: Mapping[str, tuple[int, int]],
    *,
    cutoff_ns: int | None,
) -> GcPlan:
    """PURE. ``snapshots``: key -> record mtime (ns); ``references``: digests of each *kept*
    snapshot present; ``objects``: digest -> (size, mtime ns); ``cutoff_ns``: anything at or newer
    than this is spared (None: no push is running)."""
    plan = GcPlan()
    marked: set[str] = set()
    for key in snapshots:
        if key in kept:
            marked.update(references[key])  # KeyError if a kept snapshot was not read: never guess
    young = (lambda mtime: mtime >= cutoff_ns) if cutoff_ns is not None else (lambda _m: False)
    for key, mtime in sorted(snapshots.items()):
        if key in kept:
            plan.kept_snapshots += 1
        elif young(mtime):
            plan.spared_by_grace += 1
        else:
            plan.delete_snapshots.append(key)
    for digest, (size, mtime) in sorted(objects.items()):
        if digest in marked:
            plan.kept_objects += 1
        elif young(mtime):
            plan.spared_by_grace += 1
        else:
            plan.delete_objects.append(digest)
            plan.reclaimed_bytes += size
    return plan


def list_snapshot_records(remote: Remote) -> dict[SnapKey, int]:
    """Every snapshot record on the remote: (dataset, id) -> mtime ns. Foreign names are ignored."""
    found: dict[SnapKey, int] = {}
    for st in remote.list_files(SNAPSHOTS):
        folder, sep, name = st.path.rpartition("/")
        sid = snapshot_id_from_listing(name)
        if not sep or sid is None:
            continue
        try:
            check_dataset_id(folder)
        except Exception:
            continue
        found[(folder, sid)] = st.mtime_ns
    return found


def list_object_stats(remote: Remote) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    for st in remote.list_files(OBJECTS):
        digest = digest_from_listing(st.path)
        if digest is not None:
            found[digest] = (st.size, st.mtime_ns)
    return found


def live_pushes(remote: Remote, host: str) -> tuple[list[LockRecord], list[str]]:
    """(live push markers, paths of stale or unreadable ones)."""
    live, stale = [], []
    now = time.time()
    for path, record in read_markers(remote).items():
        if record is None or record.stale(now, host):
            stale.append(path)
        else:
            live.append(record)
    return live, stale


def cutoff_for(live: list[LockRecord]) -> int | None:
    if not live:
        return None
    return int((min(r.acquired for r in live) - CLOCK_SKEW_S) * 1e9)


def write_gc_state(remote: Remote) -> None:
    """Tell pushes that finish after this moment to re-check their objects (see store.py)."""
    record = {
        "format": "tether-gc-state",
        "version": 1,
        "started": time.time(),
        "token": secrets.token_hex(16),
    }
    remote.write_bytes_atomic(GC_STATE, json.dumps(record).encode())


def sweep(remote: Remote, plan: GcPlan) -> None:
    """Snapshot records first, then objects: a crash in between leaves only unreferenced objects."""
    for ds, sid in plan.delete_snapshots:
        remote.delete(snapshot_path(ds, sid))
    remote.flush()
    faults.checkpoint("vgc_snapshots_deleted")
    for digest in plan.delete_objects:
        remote.delete(object_path(digest))
        faults.checkpoint("vgc_object_deleted")


__all__ = ["GcPlan", "Scope", "kept_from_git", "list_objects", "plan_gc", "sweep"]
