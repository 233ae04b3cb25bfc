"""Push and fetch through any Remote: objects first, the snapshot record last.

Which objects a push must send is set algebra over digests: the snapshot's digests minus what
the remote holds. What the remote holds comes from a cached **inventory** (``.tether/versioned/
inventory/``) plus listings: every digest the inventory does not vouch for is looked up by
listing its fan-out folder (or the whole ``objects/`` prefix when that is cheaper), and each
listing also refreshes the inventory for its folder, so a lost object in a listed folder is
noticed. The inventory vouches only for objects this workspace uploaded and verified or saw in a
listing; ``tether verify`` removes missing and corrupt objects from it (corrupt ones are marked
*suspect* and always re-uploaded), and ``push --checksum`` ignores it and lists everything.

Concurrency with gc: a push writes a marker ``pushes/<token>.json`` (renewed while it runs),
then refuses to go on if gc holds the remote's exclusive lock. gc spares objects newer than the
oldest live push, and a push that sees that a gc ran while it worked lists again and re-uploads
anything gc removed before it finishes (docs/format.md, "Versioned layout").
"""

from __future__ import annotations

import contextlib
import getpass
import gzip
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tether import faults, forked
from tether.errors import (
    LockHeld,
    RefusedError,
    StalePlanError,
    TetherError,
    TransferFailed,
    VerificationError,
)
from tether.fileio import flushing_behind, syncfs, write_bytes_atomic
from tether.lock import DEFAULT_TTL_S, LockRecord, read_lock
from tether.paths import check_relpath
from tether.progress import NO_PROGRESS, Progress
from tether.remotes.base import (
    BatchTransfers,
    Remote,
    TransferItem,
    background_flush,
    ignore_bytes,
    lanes,
    prepare_transfers,
)
from tether.remotes.local import LocalRemote
from tether.transfer import with_retries
from tether.versioned.cache import Cache
from tether.versioned.layout import (
    GC_LOCK_ID,
    GC_STATE,
    OBJECTS,
    PUSHES,
    Snapshot,
    digest_from_listing,
    fanout,
    is_digest,
    object_path,
    snapshot_folder,
    snapshot_id_from_listing,
    snapshot_path,
)

INVENTORY_FORMAT = "tether-inventory"
INVENTORY_VERSION = 1
LIST_PAGE = 1000  # objects per listing request on S3-like stores: the whole prefix costs n/1000
LOCAL_STAT_LIMIT = 2000  # candidates checked one by one on a local path rather than by listing


# -- inventory ----------------------------------------------------------------------------------
@dataclass
class Inventory:
    """What this workspace knows the remote holds. A cache: deleting it costs one full listing."""

    path: Path
    url: str
    objects: set[str] = field(default_factory=set)
    suspect: set[str] = field(default_factory=set)  # present but found corrupt by verify
    # The state as last read or written: a push saves after its uploads and again at its end,
    # and rewriting an unchanged 20,000-digest file cost 0.06 s each time.
    _stored: tuple[frozenset[str], frozenset[str]] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, state_dir: Path, url: str) -> Inventory:
        key = hashlib.sha256(url.encode()).hexdigest()[:20]
        path = state_dir / "versioned" / "inventory" / f"{key}.json.gz"
        inv = cls(path, url)
        try:
            raw = json.loads(gzip.decompress(path.read_bytes()))
        except (FileNotFoundError, OSError, EOFError, ValueError):
            return inv  # missing or damaged: start from nothing (costs a listing)
        if (
            not isinstance(raw, dict)
            or raw.get("format") != INVENTORY_FORMAT
            or raw.get("version") != INVENTORY_VERSION
            or raw.get("remote") != url
        ):
            return inv
        inv.objects = {d for d in raw.get("objects", []) if is_digest(d)}
        inv.suspect = {d for d in raw.get("suspect", []) if is_digest(d)}
        inv._stored = (frozenset(inv.objects), frozenset(inv.suspect))
        return inv

    def save(self) -> None:
        state = (frozenset(self.objects), frozenset(self.suspect))
        if state == self._stored:
            return
        record = {
            "format": INVENTORY_FORMAT,
            "version": INVENTORY_VERSION,
            "remote": self.url,
            "objects": sorted(self.objects),
            "suspect": sorted(self.suspect),
        }
        # Level 1: hex digests shrink to about half at any level (20,000: 1.46 MB to 0.77 MB at
        # level 1 or 3), and level 1 took 13 ms where level 3 took 23 ms.
        data = gzip.compress(json.dumps(record).encode(), compresslevel=1, mtime=0)
        write_bytes_atomic(self.path, data, durable=False)
        self._stored = state

    def replace_folders(self, folders: Iterable[str], present: set[str]) -> None:
        """A fresh listing of ``folders`` is the truth for them."""
        folders = set(folders)
        self.objects = {d for d in self.objects if fanout(d) not in folders} | present

    def forget(self, digests: Iterable[str]) -> None:
        self.objects.difference_update(digests)


def list_objects(remote: Remote, folders: set[str] | None = None) -> dict[str, int]:
    """digest -> size of every object in ``folders`` (fan-out names), or under ``objects/``."""
    found: dict[str, int] = {}
    if folders is None:
        for st in remote.list_files(OBJECTS):
            digest = digest_from_listing(st.path)
            if digest is not None:
                found[digest] = st.size
        return found
    for folder in sorted(folders):
        for st in remote.list_files(f"{OBJECTS}/{folder}"):
            digest = digest_from_listing(st.path, folder)
            if digest is not None:
                found[digest] = st.size
    return found


@dataclass
class Lookup:
    missing: set[str]
    listed_folders: int  # fan-out folders listed one by one (0 with a whole-prefix listing)
    full_listing: bool


def find_missing(remote: Remote, needed: set[str], inv: Inventory, *, trust_inventory: bool = True) -> Lookup:
    """Which of ``needed`` the remote lacks, listing only the folders the inventory cannot vouch for."""
    suspect = needed & inv.suspect
    candidates = needed - inv.objects if trust_inventory else set(needed)
    folders = {fanout(d) for d in candidates}
    full = not trust_inventory or len(folders) > max(8, len(inv.objects) // LIST_PAGE)
    if not candidates:
        return Lookup(set(suspect), 0, False)
    if trust_inventory and isinstance(remote, LocalRemote) and len(candidates) <= LOCAL_STAT_LIMIT:
        # On a local or NFS path a stat per candidate is cheaper than listing (and statting) every
        # object of its folder: a 1% change checks its 1% and nothing else.
        present = {d for d in candidates if remote.exists(object_path(d))}
        inv.objects |= present
        return Lookup((candidates - present) | suspect, 0, False)
    if full:
        present = set(list_objects(remote))
        inv.objects = present
        listed = 0
        seen = needed
    else:
        present = set(list_objects(remote, folders))
        inv.replace_folders(folders, present)
        listed = len(folders)
        seen = {d for d in needed if fanout(d) in folders}
    # Every needed object in a listed folder is judged by the listing, including ones the
    # inventory vouched for: a lost object the listing reveals is sent again.
    return Lookup((seen - present) | suspect, listed, full)


# -- push markers and the gc state ---------------------------------------------------------------
def read_gc_state(remote: Remote) -> bytes | None:
    try:
        return remote.read_bytes(GC_STATE)
    except FileNotFoundError:
        return None


def marker_path(token: str) -> str:
    return f"{PUSHES}/{token}.json"


def read_markers(remote: Remote) -> dict[str, LockRecord | None]:
    """Every push marker (None for an unreadable one, e.g. torn by a crash mid-create)."""
    markers: dict[str, LockRecord | None] = {}
    for st in remote.list_files(PUSHES):
        if "/" in st.path or not st.path.endswith(".json"):
            continue
        path = f"{PUSHES}/{check_relpath(st.path, what='push marker')}"
        try:
            markers[path] = LockRecord.loads(remote.read_bytes(path))
        except FileNotFoundError:
            continue  # finished while we looked
    return markers


class PushMarker:
    """Context manager: announce a running push to gc, renewed like a lease, removed at the end."""

    def __init__(self, remote: Remote, *, host: str, dataset: str, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.remote = remote
        self.host = host
        self.dataset = dataset
        self.ttl_s = ttl_s
        self.token = secrets.token_hex(16)
        self.path = marker_path(self.token)
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return LockRecord(
            owner=getpass.getuser(),
            host=self.host,
            pid=os.getpid(),
            acquired=self.started,
            expires=time.time() + self.ttl_s,
            token=self.token,
            operation=f"push {self.dataset}",
        ).dumps()

    def __enter__(self) -> PushMarker:
        self.remote.create_exclusive(self.path, self._record())
        gc = read_lock(self.remote, GC_LOCK_ID)
        if gc is not None and not gc.stale(time.time(), self.host):
            self.remote.delete(self.path)
            raise LockHeld(
                f"{self.remote.url} is being garbage-collected by {gc.describe()}",
                hint="Wait for `tether gc` to finish, then push again.",
            )

        def renew() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                # On failure the marker expires by itself; gc then sees no running push.
                with contextlib.suppress(OSError, TetherError):
                    self.remote.write_bytes_atomic(self.path, self._record())

        self._thread = threading.Thread(target=renew, name="tether-push-marker", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError, TetherError):  # an orphan marker expires; gc removes it
            self.remote.delete(self.path)
            # Markers of killed pushes on this machine (dead pid) would make gc wait for their
            # expiry: drop them now (invariant 7: no manual clean-up after a crash).
            for path, record in read_markers(self.remote).items():
                if record is not None and record.host == self.host and record.stale(time.time(), self.host):
                    self.remote.delete(path)


# -- snapshots on the remote ---------------------------------------------------------------------
def read_remote_snapshot(remote: Remote, dataset_id: str, sid: str) -> Snapshot | None:
    path = snapshot_path(dataset_id, sid)
    try:
        data = remote.read_bytes(path)
    except FileNotFoundError:
        return None
    snap = Snapshot.loads(data, source=f"{remote.url}/{path}", expect_id=sid)
    if snap.dataset != dataset_id:
        raise VerificationError(f"{remote.url}/{path} describes dataset {snap.dataset!r}")
    return snap


def list_remote_snapshots(remote: Remote, dataset_id: str) -> list[str]:
    return sorted(
        sid
        for st in remote.list_files(snapshot_folder(dataset_id))
        if (sid := snapshot_id_from_listing(st.path)) is not None
    )


def load_snapshot(cache: Cache, remote: Remote | None, dataset_id: str, sid: str) -> Snapshot | None:
    """From the cache, else from the remote (then kept in the cache)."""
    snap = cache.get_snapshot(dataset_id, sid)
    if snap is None and remote is not None:
        snap = read_remote_snapshot(remote, dataset_id, sid)
        if snap is not None:
            cache.put_snapshot(snap)
    return snap


def latest_remote_snapshot(remote: Remote, cache: Cache, dataset_id: str) -> Snapshot | None:
    snaps = [
        load_snapshot(cache, remote, dataset_id, sid) for sid in list_remote_snapshots(remote, dataset_id)
    ]
    found = [s for s in snaps if s is not None]
    return max(found, key=lambda s: (s.time, s.id)) if found else None


# -- transfers ----------------------------------------------------------------------------------
Sent = Callable[[TransferItem, BaseException | None], None]


def _transfer(
    remote: Remote, items: list[TransferItem], *, up: bool, jobs: int, progress: Progress, done: Sent
) -> None:
    """Batch through a streaming backend (SSH); otherwise workers (forked processes for many
    small files on a local disk, where threads only contend), each item reported to ``done``
    with its error or None."""
    on_bytes = lambda n: progress.advance(bytes=n)  # noqa: E731

    def report(item: TransferItem, error: BaseException | None) -> None:
        done(item, error)
        if error is None:
            progress.advance(files=1)

    if isinstance(remote, BatchTransfers):
        (remote.put_many if up else remote.get_many)(items, on_bytes=on_bytes, on_done=report)
        return

    def move_once(item: TransferItem, on_bytes: Callable[[int], None]) -> None:
        if up:
            remote.put_file(
                Path(item.local), item.path, digest=item.digest, mtime_ns=item.mtime_ns, on_bytes=on_bytes
            )
        else:
            remote.get_file(
                item.path, Path(item.local), digest=item.digest, mtime_ns=item.mtime_ns, on_bytes=on_bytes
            )

    def move(item: TransferItem, on_bytes: Callable[[int], None]) -> None:
        # The same per-object retries as a mirror transfer: one dropped link among 20,000
        # objects is not a failed run.
        with_retries(remote, lambda: move_once(item, on_bytes))

    def one(item: TransferItem) -> None:
        try:
            move(item, on_bytes)
        except Exception as exc:  # recorded per item; whole-run failures surface from the first
            report(item, exc)
            return
        report(item, None)

    def forked_outcome(item: TransferItem, _value: None, error: BaseException | None) -> None:
        if error is None:
            on_bytes(item.size)
        report(item, error)

    for lane in lanes(items, lambda i: i.size, remote.capabilities, jobs):
        if lane.forked:  # many small objects on a local disk (see tether.forked)
            forked.run_forked(
                lane.items, lambda i: move(i, ignore_bytes), processes=lane.workers, on_outcome=forked_outcome
            )
        elif lane.workers <= 1:
            for item in lane.items:
                one(item)
        else:
            with ThreadPoolExecutor(max_workers=lane.workers) as pool:
                list(pool.map(one, lane.items))


def _raise_failures(failures: list[tuple[str, BaseException]], what: str) -> None:
    if not failures:
        return
    first = failures[0][1]
    if isinstance(first, TetherError) and len(failures) == 1:
        raise first
    for _, error in failures:
        if isinstance(error, VerificationError):
            raise VerificationError(
                f"{len(failures)} object(s) failed while {what}, first: {error.message}",
                paths=[p for p, _ in failures],
            )
    raise TransferFailed.first_of(
        f"{len(failures)} object(s) failed while {what}", failures[0][0], first
    ) from first


@dataclass
class PushReport:
    snapshot: Snapshot
    needed: int = 0
    uploaded: int = 0
    uploaded_bytes: int = 0
    listed_folders: int = 0
    full_listing: bool = False
    snapshot_written: bool = False
    repaired_after_gc: int = 0


def plan_push(
    remote: Remote, snap: Snapshot, inv: Inventory, *, trust_inventory: bool
) -> tuple[list[str], Lookup]:
    lookup = find_missing(remote, snap.digests(), inv, trust_inventory=trust_inventory)
    return sorted(lookup.missing), lookup


def upload_objects(
    remote: Remote,
    digests: list[str],
    sizes: dict[str, int],
    source_for: Callable[[str], Path | None],
    inv: Inventory,
    *,
    jobs: int,
    progress: Progress,
) -> int:
    """Upload each object through a temporary name, verified by the backend before its rename.

    The object's mtime is the upload time (object stores stamp their own): gc's grace period
    compares it with the start of running pushes.
    """
    items = []
    unsourced = []
    now = time.time_ns()
    for d in digests:
        src = source_for(d)
        if src is None:
            unsourced.append(d)
        else:
            items.append(TransferItem(object_path(d), os.fspath(src), sizes[d], d, now))
    if unsourced:
        raise RefusedError(
            f"{len(unsourced)} committed file(s) are neither in the cache nor unchanged in the workspace",
            paths=unsourced,
            hint="The data changed after `tether commit` and before this push: commit again "
            "(`tether commit TARGET`), then push.",
        )
    failures: list[tuple[str, BaseException]] = []
    lock = threading.Lock()

    def done(item: TransferItem, error: BaseException | None) -> None:
        with lock:
            if error is None:
                inv.objects.add(item.digest)
                inv.suspect.discard(item.digest)
                faults.checkpoint("vpush_uploaded")
            else:
                failures.append((item.path, error))

    progress.stage("uploading objects", files=len(items), bytes=sum(i.size for i in items))
    try:
        with flushing_behind(progress, background_flush(remote)) as tapped:
            _transfer(remote, items, up=True, jobs=jobs, progress=tapped, done=done)
    finally:
        remote.flush()  # durable before the snapshot that lists them (invariant 2)
        inv.save()
    stale = [
        path
        for path, error in failures
        if isinstance(error, VerificationError | StalePlanError)
        or (isinstance(error, FileNotFoundError) and not isinstance(error, TetherError))
    ]
    if stale and len(stale) == len(failures):
        sources = {i.path: i.local for i in items}
        raise RefusedError(
            f"{len(stale)} committed file(s) changed or disappeared after `tether commit`",
            paths=[str(sources[p]) for p in stale],
            hint="Commit the current state again (`tether commit TARGET`), then push.",
        )
    _raise_failures(failures, "uploading")
    return len(items)


def push_snapshot(
    remote: Remote,
    snap: Snapshot,
    inv: Inventory,
    source_for: Callable[[str], Path | None],
    *,
    host: str,
    jobs: int,
    trust_inventory: bool = True,
    progress: Progress = NO_PROGRESS,
) -> PushReport:
    """Missing objects first (verified), then the snapshot record, under a push marker."""
    report = PushReport(snap, needed=len(snap.digests()))
    sizes = {e.digest: e.size for e in snap.entries}
    prepare_transfers(remote)  # starts (SSH) while the remote's objects are listed
    # Read before the marker exists: a gc that starts after this read either sees the marker
    # (and spares our uploads) or rewrites the state, which we notice at the end.
    gc_before = read_gc_state(remote)
    with PushMarker(remote, host=host, dataset=snap.dataset):
        progress.stage("listing remote objects")
        missing, lookup = plan_push(remote, snap, inv, trust_inventory=trust_inventory)
        report.listed_folders, report.full_listing = lookup.listed_folders, lookup.full_listing
        report.uploaded = upload_objects(
            remote, missing, sizes, source_for, inv, jobs=jobs, progress=progress
        )
        report.uploaded_bytes = sum(sizes[d] for d in missing)
        faults.checkpoint("vpush_before_snapshot")
        report.snapshot_written = write_snapshot(remote, snap)
        if read_gc_state(remote) != gc_before:
            # A gc ran while we worked: it may have swept an object we found present before our
            # snapshot existed. List again and put back whatever it removed.
            again = find_missing(remote, snap.digests(), inv, trust_inventory=False).missing
            report.repaired_after_gc = upload_objects(
                remote, sorted(again), sizes, source_for, inv, jobs=jobs, progress=progress
            )
        inv.save()
    return report


def write_snapshot(remote: Remote, snap: Snapshot) -> bool:
    """Write the record unless an identical one is there (ids are content-derived)."""
    path = snapshot_path(snap.dataset, snap.id)
    try:
        existing = read_remote_snapshot(remote, snap.dataset, snap.id)
    except TetherError:
        existing = None  # damaged: replace it
    if existing is not None:
        return False
    remote.write_bytes_atomic(path, snap.dumps())
    return True


# -- fetch --------------------------------------------------------------------------------------
@dataclass
class FetchReport:
    needed: int = 0
    cached: int = 0
    downloaded: int = 0
    downloaded_bytes: int = 0


def fetch_objects(
    remote: Remote,
    cache: Cache,
    sizes: dict[str, int],
    *,
    jobs: int,
    progress: Progress = NO_PROGRESS,
) -> FetchReport:
    """Download every object of ``sizes`` the cache lacks; each is hashed before it is visible."""
    report = FetchReport(needed=len(sizes))
    cache.remove_stale_temps()  # what killed fetches left behind
    todo = sorted(sizes.keys() - cache.which_have(sizes.keys()))
    if todo:
        prepare_transfers(remote)
    report.cached = len(sizes) - len(todo)
    now = time.time_ns()
    items = [TransferItem(object_path(d), os.fspath(cache.temp_path()), sizes[d], d, now) for d in todo]
    failures: list[tuple[str, BaseException]] = []
    verified: list[TransferItem] = []
    lock = threading.Lock()

    def done(item: TransferItem, error: BaseException | None) -> None:
        if error is None:
            with lock:
                verified.append(item)
            faults.checkpoint("vfetch_object")
        else:
            Path(item.local).unlink(missing_ok=True)
            error = _missing_as_verification(remote, item, error)
            with lock:
                failures.append((item.path, error))

    def flush_and_adopt() -> None:
        """The cache trusts an object by its name: verified bytes take it only once flushed
        (one syncfs per batch, not per object). Runs behind the downloads too, so a killed
        fetch keeps what was flushed for its rerun."""
        with lock:
            ready = verified[:]
            del verified[:]
        adopted = 0
        try:
            syncfs(cache.root)
            for item in ready:
                cache.adopt(Path(item.local), item.digest)
                adopted += 1
        except BaseException:
            with lock:
                verified[:0] = ready[adopted:]  # left for the final call, which reports the error
            raise

    progress.stage("downloading objects", files=len(items), bytes=sum(i.size for i in items))
    try:
        with flushing_behind(progress, flush_and_adopt) as tapped:
            _transfer(remote, items, up=False, jobs=jobs, progress=tapped, done=done)
    except BaseException:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            flush_and_adopt()  # what was verified is kept for the rerun
        raise
    flush_and_adopt()
    _raise_failures(failures, "downloading")
    report.downloaded = len(items)
    report.downloaded_bytes = sum(i.size for i in items)
    return report


def download_objects(
    remote: Remote,
    dests: dict[str, Path],
    sizes: dict[str, int],
    *,
    jobs: int,
    progress: Progress = NO_PROGRESS,
    flush_behind: Callable[[], None] | None = None,
) -> None:
    """Download objects straight to ``dests`` (digest -> path), each verified before its rename.

    ``flush_behind`` (the flush of the folder holding ``dests``) runs in the background as
    bytes land; the caller's own flush afterwards is the one that makes them durable."""
    now = time.time_ns()
    items = [TransferItem(object_path(d), os.fspath(p), sizes[d], d, now) for d, p in sorted(dests.items())]
    failures: list[tuple[str, BaseException]] = []
    lock = threading.Lock()

    def done(item: TransferItem, error: BaseException | None) -> None:
        if error is None:
            faults.checkpoint("vfetch_object")
            return
        with lock:
            failures.append((item.path, _missing_as_verification(remote, item, error)))

    progress.stage("downloading objects", files=len(items), bytes=sum(i.size for i in items))
    with flushing_behind(progress, flush_behind) as tapped:
        _transfer(remote, items, up=False, jobs=jobs, progress=tapped, done=done)
    _raise_failures(failures, "downloading")


def _missing_as_verification(remote: Remote, item: TransferItem, error: BaseException) -> BaseException:
    if isinstance(error, FileNotFoundError) and not isinstance(error, TetherError):
        return VerificationError(
            f"object {item.digest[:12]}… is missing on {remote.url}",
            hint="Run `tether verify TARGET REMOTE`; a push from a workspace that has the data "
            "re-uploads it.",
        )
    return error
