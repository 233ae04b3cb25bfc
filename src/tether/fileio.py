"""Local file primitives that keep invariant 1 (no torn files).

Bytes go to a temporary name in the destination folder (same filesystem, so the final rename is
atomic), are hashed while they are written (large files on local disks: from the pages just
written, see _copy_in_kernel), and are renamed into place only when the digest matches.
Durability is batched: one ``syncfs`` per batch instead of an fsync per file, which would halve
small-file throughput.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import mmap
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tether import faults
from tether.errors import DiskFullError, RemotePermissionError, StalePlanError, VerificationError
from tether.hashing import CHUNK, digest_file, new_hasher
from tether.paths import TEMP_MARKER
from tether.progress import BytesTap, Progress
from tether.readahead import Prefetcher as Prefetcher  # re-exported: the copiers' read-ahead
from tether.scan import StatEntry

if TYPE_CHECKING:
    from hashlib import _Hash as Hasher

_libc = ctypes.CDLL(None, use_errno=True)


_TEMP_TOKEN = secrets.token_hex(4)
_temp_counter = itertools.count()


def _temp_suffix() -> str:
    """Unique per process and call (pid, a random token, a counter): a token_hex per file
    cost a tenth of a second per 20,000 files."""
    return f"{TEMP_MARKER}{os.getpid():x}{_TEMP_TOKEN}{next(_temp_counter):x}"


def temp_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}{_temp_suffix()}")


_known_dirs: set[str] = set()


def ensure_dir(folder: str | Path) -> None:
    """mkdir -p, remembering folders already made: 20,000 files in 200 folders cost 200
    mkdir calls, not 20,000 that fail with EEXIST. A folder removed behind our back is
    recreated on the ENOENT that follows (see copy_verified)."""
    key = os.fspath(folder)
    if key in _known_dirs:
        return
    os.makedirs(key, exist_ok=True)
    _known_dirs.add(key)


def syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (Linux syncfs; falls back to a global sync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        os.sync()
        return
    try:
        if getattr(_libc, "syncfs", None) is None or _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


# Bytes landed between two background flushes (see FlushBehind). On the 2-core test VM, a
# versioned push of 20,000 small files (166 MiB) to a local remote was faster with a flush
# every 32 MiB in 21 of 26 interleaved pairs (by 0.05-0.3 s of 1.5-2.0 s); every 16 MiB
# gained nothing (4 pairs) and every 64 MiB was within noise.
FLUSH_BEHIND_BYTES = 32 * 1024 * 1024


class FlushBehind:
    """Flush while the copy still runs, so the flush that must finish before an index or a
    snapshot is written finds little left to write.

    Nothing asks the kernel to write 166 MiB of fresh small files early (the dirty limits are
    a share of RAM, the expiry 30 s), so one ``syncfs`` at the end wrote them all while the
    copy was already over. Here a thread calls ``flush`` each time ``step`` more bytes have
    landed (never two at once), and the disk writes while the copiers work. It only moves
    writes earlier: durability still comes from the caller's own final flush, which is why a
    background flush's error is left for that one to report.
    """

    def __init__(self, flush: Callable[[], None], *, step: int | None = None) -> None:
        self._flush = flush
        self._step = step or FLUSH_BEHIND_BYTES
        self._pending = 0
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None  # started on the first step: small runs pay nothing

    def landed(self, nbytes: int) -> None:
        """``nbytes`` more were written (from any thread)."""
        with self._lock:
            self._pending += nbytes
            if self._pending < self._step or self._stopped:
                return
            self._pending = 0
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tether-flush-behind", daemon=True)
                self._thread.start()
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stopped:
                return
            with contextlib.suppress(Exception):  # the caller's final flush reports it
                self._flush()

    def close(self) -> None:
        """Stop, after a flush in progress ends (the caller's final flush follows)."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        self._wanted.set()
        if thread is not None:
            thread.join()

    def __enter__(self) -> FlushBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def flushing_behind(progress: Progress, flush: Callable[[], None] | None) -> Iterator[Progress]:
    """``progress``, tapped so that ``flush`` runs in the background as the bytes it counts
    land (FlushBehind); ``progress`` itself when ``flush`` is None (nothing to flush here)."""
    if flush is None:
        yield progress
        return
    with FlushBehind(flush) as behind:
        yield BytesTap(progress, behind.landed)


def os_error_to_tether(exc: OSError, where: Path) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on the device holding {where}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RemotePermissionError(f"permission denied writing {where}")
    return exc


def copy_verified(
    source: str | Path,
    final: str | Path,
    *,
    digest: str | None,
    mtime_ns: int | None,
    label: str,
    on_bytes: Callable[[int], None] | None = None,
    in_place: bool = False,
    expect: StatEntry | None = None,
) -> str:
    """Copy ``source`` to ``final`` through a temporary sibling, hashing on the way; return the
    digest of the bytes written.

    The final name appears only if the bytes written hash to ``digest``; on any failure the
    temporary file is removed and ``final`` is untouched. ``in_place`` writes ``final`` itself
    (and removes it on failure): only for staging paths, which are never real names and are
    rehashed before any reuse, so the extra rename per file buys nothing there.

    ``digest=None`` (a file pushed for the first time, never hashed before: see
    sync.scan_local) records the digest of the bytes as they are copied instead, so the file is
    read once. Then ``expect`` is the state the scan saw, and the source must be in exactly that
    state (inode, size, mtime, ctime) when it is opened and after its last byte is read, or
    nothing is promoted: the digest is of the file the plan was made from, never of a mix of
    two versions (the rule the hash cache keys on).
    """
    # Plain strings on this path: pathlib objects cost more than the copy for small files.
    final_s = os.fspath(final)
    folder, name = os.path.split(final_s)
    ensure_dir(folder)
    tmp = final_s if in_place else os.path.join(folder, f".{name}{_temp_suffix()}")
    hasher = new_hasher()
    try:
        # Raw descriptors: for 20,000 small files the buffered-file objects (and the fstat each
        # open() does) cost more than the copying.
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if digest is None:
                check_source_state(src, expect, label, "after it was scanned")
            dst = _create(tmp, replace=in_place)
            try:
                if not (
                    os.fstat(src).st_size >= KERNEL_COPY_MIN
                    and kernel_copy_suits(folder)
                    and _copy_in_kernel(src, dst, hasher, on_bytes)
                ):
                    _copy_through_buffer(src, dst, hasher, on_bytes)
                got = hasher.hexdigest()
                if digest is None:
                    check_source_state(src, expect, label, "while it was copied")
                elif got != digest:
                    raise VerificationError(
                        f"{label}: content hash mismatch (expected {digest[:12]}…, got {got[:12]}…)",
                        paths=[label],
                    )
                if mtime_ns is not None:
                    os.utime(dst, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)
        faults.checkpoint("before_rename")
        if not in_place:
            os.replace(tmp, final_s)
        return got
    except OSError as exc:
        _remove(tmp)
        mapped = os_error_to_tether(exc, Path(final_s))
        if mapped is exc:
            raise
        raise mapped from exc
    except BaseException:
        _remove(tmp)
        raise


def _copy_through_buffer(src: int, dst: int, hasher: Hasher, on_bytes: Callable[[int], None] | None) -> None:
    buffer = _buffer()
    while True:
        n = os.readv(src, [buffer])
        if not n:
            break
        chunk = buffer[:n]
        hasher.update(chunk)
        if on_bytes is not None:
            on_bytes(n)
        faults.checkpoint("mid_file")
        while chunk:
            chunk = chunk[os.write(dst, chunk) :]


# Files from this size on are copied by the kernel (see _copy_in_kernel); below it, the mapping
# and the extra calls cost more than the copy they save. TETHER_KERNEL_COPY_MIN moves it (tests
# use it to send their small files down this path; 0 turns it off).
KERNEL_COPY_MIN = int(os.environ.get("TETHER_KERNEL_COPY_MIN", 8 * 1024 * 1024)) or 2**63
KERNEL_COPY_STEP = 8 * 1024 * 1024
# Where a mapped page cannot vanish under us: a mapping whose page cannot be read kills the
# process with SIGBUS instead of raising, so network and FUSE filesystems (a server error, a
# file truncated by another client) keep the buffered copy.
MAPPABLE_FILESYSTEMS = frozenset(("ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs", "zfs", "bcachefs"))
# copy_file_range refusals that mean "not between these files": copy through a buffer instead.
_NO_KERNEL_COPY = frozenset(
    (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM)
)


_suits_by_device: dict[int, bool] = {}


def kernel_copy_suits(folder: str) -> bool:
    """Whether files written in ``folder`` may be copied in the kernel and hashed through a
    mapping (_copy_in_kernel): on local disk filesystems only. Remembered per filesystem
    (st_dev), so a pull's thousands of staging folders read /proc/mounts once."""
    device = os.stat(folder).st_dev
    suits = _suits_by_device.get(device)
    if suits is None:
        # Imported here: tether.remotes imports this module. The helper's lookup runs anywhere.
        from tether.remotes.ssh_helper import filesystem_type

        suits = _suits_by_device[device] = filesystem_type(folder) in MAPPABLE_FILESYSTEMS
    return suits


def _copy_in_kernel(src: int, dst: int, hasher: Hasher, on_bytes: Callable[[int], None] | None) -> bool:
    """Copy ``src`` to ``dst`` with copy_file_range and hash what landed in ``dst`` through a
    mapping of its page cache; False (nothing copied) where the kernel refuses.

    The buffered copy moves every byte twice through user space (page cache to buffer, buffer to
    page cache); here the kernel copies once (or shares extents: reflink on XFS and btrfs,
    server-side copy on NFS 4.2) and the hash reads the destination's pages in place. Measured
    on the 2-core test VM, four 512 MiB files, cold cache: 2.5-2.8 s and 2.6-3.3 CPU-seconds of
    system time, against 3.2-5.2 s and 4.5-8.3 for the buffered copy. The digest is of the bytes
    now at the destination, which is what the caller promotes; a source that changes meanwhile
    is caught as before (the digest check, or check_source_state's second look).
    """
    offset = 0
    while True:
        try:
            n = os.copy_file_range(src, dst, KERNEL_COPY_STEP)
        except OSError as exc:
            if offset == 0 and exc.errno in _NO_KERNEL_COPY:
                return False
            raise
        if not n:
            return True
        # Map from the page holding ``offset``: a mapping must start on a page boundary.
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(dst, offset + n - start, prot=mmap.PROT_READ, offset=start)
        with mapped, memoryview(mapped) as view:
            hasher.update(view[offset - start :])
        offset += n
        if on_bytes is not None:
            on_bytes(n)
        faults.checkpoint("mid_file")


_buffers = threading.local()


def _buffer() -> memoryview:
    """One reusable read buffer per thread: a fresh 1 MiB bytes object per read made the kernel
    map and fault in new pages for every chunk (a third of a large copy's system time)."""
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = memoryview(bytearray(CHUNK))
    return buffer


def discard(path: str | Path) -> None:
    """Remove a temporary file this run may have made, whatever happens: it must never mask the
    error being reported (a read-only filesystem refuses even the unlink of a missing name)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def check_source_state(fd: int, expect: StatEntry | None, label: str, when: str) -> None:
    """A file uploaded before it was ever hashed must be exactly as scanned while it is read:
    its digest is then the one of the file the plan was made from (StalePlanError if not)."""
    if expect is None:
        raise ValueError("copy_verified without a digest needs the scanned state (expect=)")
    st = os.fstat(fd)
    state = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if state != (expect.inode, expect.size, expect.mtime_ns, expect.ctime_ns):
        raise StalePlanError(f"{label} changed locally {when}", paths=[label])


# Read and write: _copy_in_kernel maps the file it wrote to hash it.
CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


def _create(tmp: str, *, replace: bool = False) -> int:
    """Create ``tmp`` exclusively (never through a link). ``replace`` first removes whatever
    holds the name (a staging path: a partial file of a killed run, even a planted link, is
    not ours to keep); tried only when the name is taken, so a fresh name costs one call."""
    try:
        return os.open(tmp, CREATE_FLAGS, 0o666)
    except FileNotFoundError:  # the folder was removed since we made it
        folder = os.path.dirname(tmp)
        _known_dirs.discard(folder)
        ensure_dir(folder)
        return os.open(tmp, CREATE_FLAGS, 0o666)
    except FileExistsError:
        if not replace:
            raise
        clear_staged(tmp)
        return os.open(tmp, CREATE_FLAGS, 0o666)


def rename_onto_empty(folder: str, empty: str) -> bool:
    """Move ``folder`` to ``empty`` if that is missing or an empty folder (atomically): a whole
    staging tree becomes the dataset folder in one rename. False when it cannot (not empty, a
    mount point, another filesystem): the caller then moves file by file."""
    try:
        os.rename(folder, empty)
    except OSError:
        return False
    return True


def clear_staged(staged: str | Path) -> None:
    """Remove what holds a staging name, a folder included: a run that staged ``a/b`` and was
    interrupted leaves the folder ``a``, and a later plan may need the file ``a`` there. Staging
    is tether's own scratch, so nothing of the user's is lost; without this, every rerun failed
    on the folder ("Is a directory") and the pull never converged."""
    try:
        os.unlink(staged)
    except FileNotFoundError:
        pass
    except (IsADirectoryError, PermissionError):  # Linux says EISDIR for a folder, macOS EPERM
        if os.path.islink(staged) or not os.path.isdir(staged):
            raise
        shutil.rmtree(staged)


def staged_file_ok(path: str, size: int, digest: str) -> bool:
    """Whether a file an earlier, interrupted run left at a staging name can be used instead of
    downloading it again: only a plain file with the right bytes. Anything else is cleared: a
    link or FIFO put there is never promoted into the dataset, a folder (an earlier plan staged
    files below this name) would stop the download, and wrong bytes are downloaded afresh."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        clear_staged(path)
        return False
    if st.st_size != size:
        return False
    if digest_file(Path(path)) == digest:
        return True
    Path(path).unlink(missing_ok=True)
    return False


def create_in_place(path: str | Path) -> int:
    """A write descriptor for a staging path written in place (see Remote.get_file): whatever
    holds the name (a partial file of a killed run, even a planted link) is replaced, never
    followed or appended to."""
    return _create(os.fspath(path), replace=True)


def write_bytes_atomic(final: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``final`` with ``data``: readers see old or new bytes, never a mix."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a full disk already refuses the folder (seen: a pull's base)
        mapped = os_error_to_tether(exc, final)
        if mapped is exc:
            raise
        raise mapped from exc
    tmp = temp_sibling(final)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        faults.checkpoint("record_rename")
        os.replace(tmp, final)
    except OSError as exc:
        discard(tmp)
        mapped = os_error_to_tether(exc, final)
        if mapped is exc:
            raise
        raise mapped from exc
    except BaseException:
        discard(tmp)
        raise
    if durable:
        fsync_dir(final.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
