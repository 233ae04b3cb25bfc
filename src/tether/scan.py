"""Walk a local tree into stat entries, in manifest order.

Symlinks and special files (FIFOs, sockets, devices) are refused by rule: following a link can
sync data from outside the dataset or loop forever, and reading a FIFO can hang. The user either
removes them or passes ``--skip-symlinks`` to leave links out with a warning.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from stat import S_ISDIR, S_ISLNK, S_ISREG

from tether.errors import ScanError
from tether.paths import STATE_DIR, unsyncable_name_reason

NEVER_SYNCED = frozenset({STATE_DIR, ".git"})
_name = attrgetter("name")  # sort key for DirEntry: C-level, unlike a lambda


@dataclass(frozen=True)
class StatEntry:
    path: str  # relative POSIX path
    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int = 0  # changes on every write, even when a tool restores the mtime


@dataclass
class ScanReport:
    """What a scan passed over, for warnings and the audit record."""

    skipped_symlinks: list[str] = field(default_factory=list)


def scan_tree(
    root: Path,
    *,
    keep: Callable[[str], bool] | Future[Callable[[str], bool]] = lambda _p: True,
    skip_symlinks: bool = False,
    report: ScanReport | None = None,
) -> list[StatEntry]:
    """Return every regular file below ``root`` that ``keep`` accepts, sorted in manifest order.

    ``keep`` is applied after the walk, so it may still be in the making: a Future of it lets
    ownership (a ``git ls-files`` that took 0.24 s on a cold start) be found while the tree is
    walked. A link or special file that ``keep`` rejects is not tether's, so not refused.
    All refused paths are collected before raising, so the user fixes them in one go.
    """
    report = report if report is not None else ScanReport()
    found: list[StatEntry] = []
    odd: list[tuple[str, str | None]] = []  # (path, why refused; None: a symlink)
    _walk(root, "", found, odd)
    owned = keep.result() if isinstance(keep, Future) else keep
    out = [st for st in found if owned(st.path)]
    refused: list[str] = []
    for rel, why in odd:
        if not owned(rel):
            continue
        if why is None and skip_symlinks:
            report.skipped_symlinks.append(rel)
        else:
            refused.append(rel if why is None else why)
    if refused:
        sample = ", ".join(refused[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
        raise ScanError(
            f"{root} contains {len(refused)} symlink(s), special file(s) or unportable name(s) "
            f"tether will not sync: {sample}",
            paths=refused,
            hint="Replace links with the files they point to, or pass --skip-symlinks to leave "
            "symlinks out; rename files whose names are not UTF-8 or contain a backslash "
            "(FIFOs, sockets and devices are never synced).",
        )
    return out


def _walk(root: Path, prefix: str, found: list[StatEntry], odd: list[tuple[str, str | None]]) -> None:
    """Append the files below ``root/prefix`` to ``found`` (and what cannot be synced to
    ``odd``), depth first in name order.

    Appending to one list, not yielding through a generator per folder level, saves ~6% of a
    20,000-file scan: each entry no longer climbs the chain of suspended generators.
    """
    folder = root / prefix if prefix else root
    try:
        with os.scandir(folder) as it:
            items = sorted(it, key=_name)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise ScanError(f"{folder} is a file, not a dataset folder") from None
    except PermissionError:
        raise ScanError(f"cannot read folder {folder}: permission denied") from None
    for item in items:
        name = item.name
        if name in NEVER_SYNCED:
            continue  # at any depth: a vendored repository's .git/ is git's, not tether's
        rel = f"{prefix}/{name}" if prefix else name
        try:
            st = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # deleted while we walked: it is simply not there
        mode = st.st_mode
        if S_ISDIR(mode):
            _walk(root, rel, found, odd)
        elif S_ISLNK(mode):
            odd.append((rel, None))
        elif not S_ISREG(mode):
            odd.append((rel, rel))
        elif (reason := unsyncable_name_reason(rel)) is not None:
            odd.append((rel, f"{rel.encode('utf-8', 'backslashreplace').decode()} ({reason})"))
        else:
            found.append(StatEntry(rel, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
