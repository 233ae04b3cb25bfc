"""Scrub a versioned remote: is every object each snapshot references there, and whole?

A snapshot record existing proves nothing about its data (DVC trusts it, and so loses data
silently): scrub lists the objects, compares sizes, and with ``--remote-data`` hashes their
bytes where they live. Findings go into the push inventory, so the next push re-uploads every
missing or corrupt object instead of trusting a cached "present".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tether.errors import TetherError
from tether.progress import NO_PROGRESS, Progress
from tether.remotes.base import Remote
from tether.versioned.layout import Snapshot, object_path
from tether.versioned.store import Inventory, list_objects, list_remote_snapshots, read_remote_snapshot


@dataclass
class ScrubReport:
    snapshots: int = 0
    objects: int = 0  # distinct objects referenced
    hashed: int = 0
    missing: dict[str, list[str]] = field(default_factory=dict)  # digest -> "snapshot:path" refs
    corrupt: dict[str, list[str]] = field(default_factory=dict)
    damaged_snapshots: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.damaged_snapshots)


def scrub(
    remote: Remote,
    dataset_id: str,
    inv: Inventory,
    *,
    remote_data: bool,
    progress: Progress = NO_PROGRESS,
) -> ScrubReport:
    report = ScrubReport()
    refs: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    progress.stage("reading snapshots")
    for sid in list_remote_snapshots(remote, dataset_id):
        try:
            snap: Snapshot | None = read_remote_snapshot(remote, dataset_id, sid)
        except TetherError as exc:
            report.damaged_snapshots.append(f"{sid}: {exc.message}")
            continue
        if snap is None:
            continue  # removed while we looked (gc)
        report.snapshots += 1
        for e in snap.entries:
            refs.setdefault(e.digest, []).append(f"{sid[:12]}:{e.path}")
            sizes[e.digest] = e.size
    report.objects = len(refs)
    progress.stage("listing objects")
    present = list_objects(remote)
    for digest, where in refs.items():
        if digest not in present:
            report.missing[digest] = where
        elif present[digest] != sizes[digest]:
            report.corrupt[digest] = where
    good: set[str] = set()
    if remote_data:
        todo = [d for d in refs if d in present and d not in report.corrupt]
        progress.stage("hashing remote objects", files=len(todo), bytes=sum(sizes[d] for d in todo))
        by_path = {object_path(d): d for d in todo}
        for start in range(0, len(todo), 2000):
            chunk = [object_path(d) for d in todo[start : start + 2000]]
            for path, got in remote.hash_files(chunk, use_cache=False).items():
                digest = by_path[path]
                report.hashed += 1
                progress.advance(files=1, bytes=sizes[digest])
                if got != digest:
                    report.corrupt[digest] = refs[digest]
                else:
                    good.add(digest)
    # The listing is the truth for every folder; corrupt objects are re-sent by the next push.
    inv.objects = set(present) - set(report.corrupt)
    inv.suspect = (inv.suspect - good) | set(report.corrupt)
    inv.save()
    return report
