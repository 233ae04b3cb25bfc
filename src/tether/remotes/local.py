"""Local and NFS paths as a remote.

The base folder must already exist: a missing base usually means an unmounted network share,
and creating folders on the mount point would silently sync to the wrong disk.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import BinaryIO

from tether import forked
from tether.errors import RemotePermissionError, RemoteUnavailable, ScanError
from tether.fileio import copy_verified, discard, os_error_to_tether, syncfs, temp_sibling, write_bytes_atomic
from tether.hashing import digest_file
from tether.paths import STATE_DIR, check_relpath, is_temp_name
from tether.remotes.base import ANY_SIZE, Capabilities, ErrorKind, OnBytes, RemoteStat
from tether.remotes.ssh_helper import filesystem_type as mounted_filesystem_type
from tether.scan import StatEntry, scan_tree

RETRYABLE_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.EIO}


NETWORK_FILESYSTEMS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "9p",
    "fuse",
)


def _listing(base: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file below ``base`` but tether's temporaries: plain
    tuples, which cross the pipe from forked.in_child 5x faster than StatEntry objects."""
    entries = scan_tree(base, keep=lambda rel: not is_temp_name(rel))
    return [(e.path, e.size, e.mtime_ns) for e in entries]


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path``, from /proc/mounts (longest mount prefix):
    the SSH helper's lookup, which it runs on clusters with the standard library alone."""
    return mounted_filesystem_type(os.fspath(path))


# Copying 20,000 files of 1-16 KiB into a new folder, cold cache, 2-core VM (copy phase of a
# push): 1 process 2.3-2.6 s, 4 processes 1.8-3.0 s, 8 processes 1.5-2.0 s; a pull's downloads
# 2.1 s with 1, 1.5-1.7 s with 8. More workers than cores pays because much of a small file's
# time is waiting on the disk, not computing.
SMALL_FILE_PROCESSES = 8


class LocalRemote:
    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root
        # A network share pays a round trip per file, so small files need parallel workers
        # there; a local disk does better creating them one at a time.
        network = filesystem_type(root).startswith(NETWORK_FILESYSTEMS)
        self.capabilities = Capabilities(
            parallel_connections=8,
            small_file_jobs=None if network else 1,
            small_file_processes=0 if network else SMALL_FILE_PROCESSES,
            hash_on_write_max=ANY_SIZE,
            flush_behind=not network,
            # The look under the lock walks the tree again: 0.13 s of a 2.2 s pull of 20,000
            # files on a local disk, more on NFS; the lock record costs a millisecond.
            lock_before_listing=True,
        )

    def _abs(self, path: str) -> Path:
        return self.root / check_relpath(path) if path else self.root

    def _abs_str(self, path: str) -> str:
        """_abs as a plain string, for the per-file transfer path."""
        return os.path.join(self.root, check_relpath(path))

    def local_file(self, path: str) -> str:
        """Where a remote path lives on this machine (the transfer engine reads ahead there)."""
        return self._abs_str(path)

    def check(self) -> None:
        if not self.root.exists():
            raise RemoteUnavailable(
                f"remote folder {self.root} does not exist",
                hint=f"Create it (mkdir -p {self.root}) or mount the share, then rerun.",
            )
        if not self.root.is_dir():
            raise RemoteUnavailable(f"remote path {self.root} is a file, not a folder")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise RemotePermissionError(f"cannot read remote folder {self.root}: permission denied")

    def list_files(self, prefix: str) -> Iterator[RemoteStat]:
        base = self._abs(prefix)
        if not base.is_dir():
            return iter(())
        try:
            # In a child: the local scan runs meanwhile in this process (sync.scan_both), and
            # two walks in one process take turns on the GIL (see forked.in_child).
            listing = forked.in_child(partial(_listing, base))
        except ScanError as exc:
            exc.message = f"remote {self.url}: {exc.message}"
            raise
        except PermissionError:
            raise RemotePermissionError(f"cannot list {base}: permission denied") from None
        return (RemoteStat(path, size, mtime_ns) for path, size, mtime_ns in listing)

    def exists(self, path: str) -> bool:
        return self._abs(path).exists()

    def read_bytes(self, path: str) -> bytes:
        return self._abs(path).read_bytes()

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        write_bytes_atomic(self._abs(path), data)

    def create_exclusive(self, path: str, data: bytes, *, within: str | None = None) -> bool:
        final = self._abs(path)
        if within is not None and not self._abs(within).is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such folder", str(self._abs(within)))
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only export: the caller may go on without the lock
            raise os_error_to_tether(exc, final.parent) from exc
        # Write the whole record under a temporary name, then hard-link it into place: link()
        # fails if the name exists, so the record appears complete or not at all.
        tmp = temp_sibling(final)
        try:
            write_bytes_atomic(tmp, data)
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError as exc:
            raise os_error_to_tether(exc, final) from exc
        finally:
            discard(tmp)
        return True

    def put_file(
        self, source: Path, path: str, *, digest: str, mtime_ns: int, on_bytes: OnBytes | None = None
    ) -> None:
        copy_verified(
            source, self._abs_str(path), digest=digest, mtime_ns=mtime_ns, label=path, on_bytes=on_bytes
        )

    def put_file_hashing(
        self, source: Path, path: str, *, expect: StatEntry, mtime_ns: int, on_bytes: OnBytes | None = None
    ) -> str:
        return copy_verified(
            source,
            self._abs_str(path),
            digest=None,
            mtime_ns=mtime_ns,
            label=path,
            on_bytes=on_bytes,
            expect=expect,
        )

    def get_file(
        self, path: str, dest: Path, *, digest: str, mtime_ns: int, on_bytes: OnBytes | None = None
    ) -> None:
        # dest is a staging path (see Remote.get_file): written in place, one rename fewer per file.
        copy_verified(
            self._abs_str(path),
            dest,
            digest=digest,
            mtime_ns=mtime_ns,
            label=path,
            on_bytes=on_bytes,
            in_place=True,
        )

    def open_read(self, path: str) -> BinaryIO:
        return open(self._abs(path), "rb")

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        with open(self._abs(path), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def delete(self, path: str) -> None:
        target = self._abs(path)
        try:
            target.unlink(missing_ok=True)
        except OSError as exc:
            raise os_error_to_tether(exc, target) from exc
        # Remove folders the delete left empty, up to (not including) the dataset root, which is
        # the first folder holding tether's state folder.
        parent = target.parent
        while parent != self.root and parent.name != STATE_DIR and not (parent / STATE_DIR).exists():
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def hash_files(self, paths: Iterable[str], *, use_cache: bool = True) -> dict[str, str]:
        return {p: digest_file(self._abs(p)) for p in paths}

    def cleanup_temp(self, prefix: str) -> int:
        removed = 0
        base = self._abs(prefix)
        for folder, _dirs, files in os.walk(base):
            for name in files:
                # A would-be lock holder's record in flight is theirs, not a leftover.
                if is_temp_name(name) and not name.startswith(".lock"):
                    Path(folder, name).unlink(missing_ok=True)
                    removed += 1
        return removed

    def flush(self) -> None:
        syncfs(self.root)

    def classify_error(self, exc: BaseException) -> ErrorKind:
        if isinstance(exc, OSError) and exc.errno in RETRYABLE_ERRNOS:
            return ErrorKind.RETRYABLE
        return ErrorKind.PERMANENT

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"LocalRemote({self.url!r})"
