"""Set trees aside during a run and delete them at its end.

Deleting a 20,000-file tree right before a timed run measured the filesystem, not the tool: on
ext4 without a journal (this project's CI and bench machine) inodes freed in the last five
minutes are skipped by the allocator, and every file created meanwhile pays for the scan
(``recently_deleted`` was 28-30% of all CPU in a push). A user's push rarely follows a mass
delete. So between runs, trees of small files are renamed into ``WORK/trash`` (free: no inode is
freed) and deleted once, when the whole bench is done. Large files are deleted at once: four
inodes cost nothing, and keeping 2 GiB per run would fill the disk.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

_trash: Path | None = None
_deferring = False
_names = itertools.count()


def use_trash(folder: Path) -> None:
    """Set trees aside in ``folder`` from now on (where ``defer`` is on); see empty_trash."""
    global _trash
    folder.mkdir(parents=True, exist_ok=True)
    _trash = folder


def defer(on: bool) -> None:
    """Whether ``discard`` sets trees aside (cases of many small files) or deletes them."""
    global _deferring
    _deferring = on


def discard(path: Path) -> None:
    """Remove ``path`` from where it is: set aside when deferring, else deleted now."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and _deferring and _trash is not None and _room(_trash):
        try:
            os.rename(path, _trash / f"{os.getpid()}-{next(_names)}")
            return
        except OSError:
            pass  # another filesystem (EXDEV), or the trash is gone: delete instead
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


MIN_FREE_BYTES = 4 << 30  # below this, trees are deleted at once: a full disk fails every tool


def _room(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free >= MIN_FREE_BYTES
    except OSError:
        return False


def empty_trash() -> int:
    """Delete everything set aside; return how many trees that was."""
    return 0 if _trash is None else empty_trash_at(_trash)


def empty_trash_at(folder: Path) -> int:
    """Delete ``folder`` (a trash a killed run may have left); return how many trees it held."""
    if not folder.is_dir():
        return 0
    trees = sum(1 for _ in folder.iterdir())
    shutil.rmtree(folder, ignore_errors=True)
    return trees
