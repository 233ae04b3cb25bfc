"""The Remote protocol: the few primitives every backend (local, SSH, object store) offers.

Paths passed to a Remote are relative POSIX paths below the remote's base URL, already checked
by :mod:`tether.paths`. Planning, locking and verification are written once on top of these
primitives; a backend never imports the planner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, Generic, NamedTuple, Protocol, TypeVar, runtime_checkable

from tether import forked
from tether.paths import TEMP_MARKER, is_temp_name
from tether.scan import StatEntry

__all__ = [
    "TEMP_MARKER",
    "BatchTransfers",
    "Capabilities",
    "ErrorKind",
    "OnBytes",
    "OnDone",
    "Remote",
    "RemoteStat",
    "TransferItem",
    "is_temp_name",
]


OnBytes = Callable[[int], None]


def ignore_bytes(n: int) -> None:
    """An OnBytes for work whose progress is counted elsewhere (a forked worker's: by file)."""


class TransferItem(NamedTuple):
    """One file of a batch: ``path`` on the remote, ``local`` the source (put) or the staging
    destination (get), and the size, digest and mtime the bytes must have.

    A named tuple with a string ``local``, built 20,000 at a time before the first byte of a
    push or pull moves: 6 ms, against 21 ms as a frozen dataclass and 50-85 ms more with a Path
    (the hot paths use os.path anyway)."""

    path: str
    local: str
    size: int
    digest: str
    mtime_ns: int
    # With digest manifest.UNHASHED (puts only): the state the scan saw, which the source must
    # still be in while it is read; the sender hashes what it sends and reports it (OnDigest).
    expect: StatEntry | None = None


OnDone = Callable[[TransferItem, BaseException | None], None]
OnDigest = Callable[[TransferItem, str], None]


@dataclass(frozen=True)
class RemoteStat:
    path: str  # relative to the listed prefix
    size: int
    mtime_ns: int
    etag: str | None = None  # object stores: the ETag (a plain MD5 for single-part uploads)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do natively; wrappers and the sync layer adapt to the rest."""

    parallel_connections: int = 8
    # Downloads where they gain from more requests at once than uploads (an object store's
    # GETs cost its server less than PUTs); None: parallel_connections. ``--jobs`` sets both.
    parallel_downloads: int | None = None
    atomic_replace: bool = True  # rename over an existing file is atomic
    conditional_create: bool = True  # create-if-absent is enforced by the server
    server_side_hashing: bool = True  # digests can be computed where the data lives
    preserves_mtime: bool = True  # set-mtime sticks, so the index can vouch by (size, mtime)
    # Parallel workers for files under SMALL_FILE_BYTES; None means parallel_connections. On a
    # local disk, threads creating many small files contend on directory locks and the GIL
    # (measured: 20,000 files took 2.5x longer with 8 workers than with 1), while large files
    # still gain from overlapping hashing and I/O.
    small_file_jobs: int | None = None
    # Worker processes for small files where the copy runs in this machine's kernel (a local
    # disk): they overlap cold reads and per-file system calls without sharing a GIL or a file
    # table (see tether.forked). 0: small files stay with small_file_jobs threads.
    small_file_processes: int = 0
    # Files up to this size may be uploaded before they were ever hashed: the backend hashes the
    # bytes it sends (HashingUpload.put_file_hashing, or put_many items carrying
    # manifest.UNHASHED and their scanned state), so a first push reads each file once. 0: never.
    hash_on_write_max: int = 0
    # Logging in may ask the user on the terminal (password, 2FA): the check then runs before
    # anything else, never beside a progress display that would write over the prompt.
    login_may_prompt: bool = False

    @property
    def downloads(self) -> int:
        return self.parallel_downloads or self.parallel_connections

    # flush() is this machine's syncfs: calling it in the background while writing starts the
    # disk's writes during the copy instead of after it (tether.fileio.FlushBehind).
    flush_behind: bool = False
    # A push or pull nobody reviews takes the lock before its one look at the remote instead of
    # looking again under the lock (tether.sync._run), where that look costs more than the lock
    # record (an object store's listing; over SSH a cold walk of the tree through the link; on
    # a path, NFS included, a second walk of the tree).
    # The record is created only inside a dataset folder that already exists
    # (create_exclusive's ``within``), so a pull of a dataset the remote lacks makes none.
    lock_before_listing: bool = False


SMALL_FILE_BYTES = 1024 * 1024
ANY_SIZE = 2**63 - 1  # hash_on_write_max of a backend that hashes whatever it sends

T = TypeVar("T")


@dataclass(frozen=True)
class Lane(Generic[T]):
    """Files that go the same way: by ``workers`` threads, or processes when ``forked``."""

    items: list[T]
    workers: int
    forked: bool = False
    small: bool = False  # files under SMALL_FILE_BYTES only (they gain from read-ahead)


def lanes(items: Sequence[T], size_of: Callable[[T], int], caps: Capabilities, jobs: int) -> list[Lane[T]]:
    """How a backend moves ``items`` with ``jobs`` workers (mirror and versioned transfers
    alike): large files with ``jobs`` threads, small ones the way the backend does best
    (``small_file_processes`` forked workers from forked.MIN_FILES files on, else
    ``small_file_jobs`` threads). A backend without a small-file setting takes one lane."""
    small_jobs = caps.small_file_jobs
    if small_jobs is None or small_jobs >= jobs:
        return [Lane(list(items), jobs)]
    large = [i for i in items if size_of(i) >= SMALL_FILE_BYTES]
    small = [i for i in items if size_of(i) < SMALL_FILE_BYTES]
    processes = min(caps.small_file_processes, jobs)
    if forked.worth_it(len(small), processes):
        return [Lane(large, jobs), Lane(small, processes, forked=True, small=True)]
    return [Lane(large, jobs), Lane(small, small_jobs, small=True)]


class ErrorKind(StrEnum):
    PERMANENT = "permanent"
    RETRYABLE = "retryable"


@runtime_checkable
class Remote(Protocol):
    url: str
    capabilities: Capabilities

    def check(self) -> None:
        """Raise RemoteUnavailable/RemotePermissionError if the base location is not usable."""

    def list_files(self, prefix: str) -> Iterator[RemoteStat]:
        """Every data file below ``prefix`` (empty if the prefix does not exist), excluding
        tether's state folder and temporary names, with paths relative to ``prefix``."""

    def exists(self, path: str) -> bool: ...

    def read_bytes(self, path: str) -> bytes:
        """Whole content of a small file (index, lock); FileNotFoundError if missing."""

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Replace ``path`` with ``data`` so readers see the old or the new bytes, never a mix."""

    def create_exclusive(self, path: str, data: bytes, *, within: str | None = None) -> bool:
        """Create ``path`` only if absent; False if it already exists. ``within``: a folder
        that must exist already (FileNotFoundError, nothing created, if it does not); folders
        between it and ``path`` are made. Backends without folders only check the path."""

    def put_file(
        self, source: Path, path: str, *, digest: str, mtime_ns: int, on_bytes: OnBytes | None = None
    ) -> None:
        """Upload ``source`` to ``path`` through a temporary name, promoting it only if the bytes
        written hash to ``digest``; raise VerificationError otherwise. ``on_bytes`` is called
        with each chunk's size as it goes (progress)."""

    def get_file(
        self, path: str, dest: Path, *, digest: str, mtime_ns: int, on_bytes: OnBytes | None = None
    ) -> str | None:
        """Download ``path`` into ``dest`` (a staging path), raising VerificationError if the
        bytes read do not hash to ``digest``. A backend may write ``dest`` in place: a staging
        path is never a real name, is removed on failure, and is rehashed before any reuse.
        Object stores also accept a provisional digest (tether.manifest.PROVISIONAL), verify
        the download against the listed ETag and size, and return the SHA-256 they computed."""

    def open_read(self, path: str) -> BinaryIO: ...

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end of the file): footers and ledger
        prefixes are checked without moving whole files."""

    def delete(self, path: str) -> None:
        """Remove a file; a missing file is not an error."""

    def hash_files(self, paths: Iterable[str], *, use_cache: bool = True) -> dict[str, str]:
        """Digests computed where the data lives (for files the index cannot vouch for);
        ``use_cache=False`` (``--checksum``) rereads every byte even where a backend caches."""

    def cleanup_temp(self, prefix: str) -> int:
        """Remove temporary files a killed writer left below ``prefix`` (call under the lock)."""

    def flush(self) -> None:
        """Make everything written so far durable before a record that lists it is written."""

    def classify_error(self, exc: BaseException) -> ErrorKind: ...

    def close(self) -> None: ...


@runtime_checkable
class BatchTransfers(Protocol):
    """Optional capability: stream many files per round trip.

    Backends where each request costs a network round trip (SSH) implement these so that
    20,000 small files do not cost 20,000 round trips. Each item is verified and promoted exactly
    as ``put_file``/``get_file`` would; ``on_done`` is called once per item with None or the
    item's error. Only whole-run failures (connection lost, disk full, auth) are raised.
    """

    def put_many(
        self,
        items: Sequence[TransferItem],
        *,
        on_bytes: OnBytes,
        on_done: OnDone,
        on_digest: OnDigest | None = None,
    ) -> None: ...

    def get_many(self, items: Sequence[TransferItem], *, on_bytes: OnBytes, on_done: OnDone) -> None: ...


@dataclass(frozen=True)
class ListingDelta:
    """A listing told against the index the caller already holds (see IndexedListing)."""

    index: bytes | None  # the remote index, sent only when the caller's copy is absent or stale
    index_digest: str | None  # SHA-256 of the remote index's bytes; None: the remote has none
    changed: list[RemoteStat]  # listed files whose size or mtime the index does not vouch for
    missing: list[str]  # index paths the listing lacks


@runtime_checkable
class IndexedListing(Protocol):
    """Optional: list a prefix where the data lives, comparing with the dataset's index there.

    Over a slow link the listing is most of a no-op's traffic (about 100 bytes a file); a
    backend that runs code beside the data (SSH's helper) sends only what the index does not
    vouch for, and the index itself only when the caller's copy (``have``: its SHA-256) is stale.
    ``clean_temp`` (the look under the lock) also does ``cleanup_temp(prefix)`` there, in the
    same request: a round trip less before the first byte. ``on_index`` gets the index bytes
    as soon as they arrive, before the listing ends, so the caller parses them meanwhile.
    """

    def list_against_index(
        self,
        prefix: str,
        index: str,
        *,
        have: str | None,
        clean_temp: bool = False,
        on_index: Callable[[bytes], None] | None = None,
    ) -> ListingDelta: ...


@runtime_checkable
class ReleasesLocks(Protocol):
    """Optional: delete a lock record only while it holds ``token``, in one request.

    Releasing the lease is a read (is it still ours?) and a delete: two round trips at the end
    of every push and pull. A backend that runs code beside the data does both there, under the
    same flock that serialises creating the record. Returns whether the record was deleted.
    """

    def release_lock(self, path: str, token: str) -> bool: ...


@runtime_checkable
class GuardedWrites(Protocol):
    """Optional: write a file atomically only while a lock record holds ``token``, in one request.

    The index is a push's commit point, written only while the lease is still ours: a check (a
    read) and the write were two round trips. A backend that runs code beside the data checks
    and writes there, under the flock that serialises creating the record. Returns whether the
    file was written (False: the record is gone or someone else's; nothing was written). With
    ``release`` the record is deleted after the write, in the same request: a push's index is
    its last remote step, and releasing the lock was one more round trip after it.
    """

    def write_if_locked(
        self, path: str, data: bytes, *, lock: str, token: str, release: bool = False
    ) -> bool: ...


@runtime_checkable
class TaggedUploads(Protocol):
    """Optional: the tags (ETags) this remote's listings will show for objects it uploaded.

    Object stores stamp their own mtimes, so their index vouches by (size, ETag). Learning the
    stamps meant listing the whole prefix again after every push (2.7 s after 2 GiB on
    ``rclone serve s3``; a 200,000-object prefix is 200 LIST pages after a one-file push). A
    single PUT is answered with its ETag, which the listing repeats; for a multipart object the
    store's listing may show another form (``rclone serve s3``: the whole object's MD5), so a
    backend asks the store (HEAD) for those few. ``paths`` were all uploaded by this instance;
    None when any tag is unknown: the caller lists instead.
    """

    def upload_tags(self, paths: Sequence[str]) -> dict[str, str] | None: ...


@runtime_checkable
class WarmsUp(Protocol):
    """Optional: get ready for transfers that may follow, without waiting.

    SSH starts its stream helper (a second remote process) only for runs that may move files,
    so a diff never pays for it: push and pull say so before their check connects, and the
    helper starts beside the control one while they scan; a versioned push or fetch says so
    before listing objects. May be called before ``check``: it never raises for the remote
    being unreachable (``check`` or the first use does).
    """

    def prepare_transfers(self) -> None: ...


def prepare_transfers(remote: Remote) -> None:
    if isinstance(remote, WarmsUp):
        remote.prepare_transfers()


def background_flush(remote: Remote) -> Callable[[], None] | None:
    """The flush to run behind a batch of writes to ``remote`` (tether.fileio.FlushBehind), or
    None where its flush is not this machine's syncfs (Capabilities.flush_behind)."""
    return remote.flush if remote.capabilities.flush_behind else None


@runtime_checkable
class HashingUpload(Protocol):
    """Optional: upload a file whose digest is not known yet, learning it from the copy.

    Only for backends where the bytes pass through this process anyway (a local or mounted
    path). The source must stay in the scanned state ``expect`` from open to last byte, or
    nothing is promoted (StalePlanError); returns the SHA-256 of the bytes written.
    """

    def put_file_hashing(
        self, source: Path, path: str, *, expect: StatEntry, mtime_ns: int, on_bytes: OnBytes | None = None
    ) -> str: ...


@runtime_checkable
class LocalFiles(Protocol):
    """Optional: a remote whose files live on this machine's filesystems (a local or mounted
    path), so the transfer engine can read them ahead of the copier (fileio.Prefetcher)."""

    def local_file(self, path: str) -> str: ...
