"""The pipeline, one readable function per command:

    resolve -> scan both sides -> plan (pure) -> confirm -> lock + re-check -> execute
            -> verify -> record -> unlock -> audit

A plan with nothing to do stops before the lock. Under the lock the remote is looked at again
and a plan that went stale is refused, not applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypedDict, Unpack

from tether import audit, faults, fidelity
from tether.background import in_background
from tether.errors import (
    DatasetNotFound,
    Interrupted,
    LockHeld,
    RefusedError,
    RemotePermissionError,
    StalePlanError,
    TetherError,
    UsageError,
    VerificationError,
)
from tether.fileio import write_bytes_atomic
from tether.foreign import SIZE_ONLY, Compared, compare_with_local
from tether.hashing import HashCache, hash_entries
from tether.ledger import LedgerCheck, local_reader
from tether.lock import Lease, break_lock, clear_dead_lock, live_lock, local_flock, lock_held, read_lock
from tether.lock import LockRecord as LockRecord
from tether.manifest import UNHASHED, Entry, Manifest, ManifestFormatError, provisional_digest
from tether.paths import check_relpath
from tether.plan import (
    Action,
    Change,
    Direction,
    MaxDelete,
    Mode,
    Plan,
    PlanOptions,
    Side,
    agreed_base,
    make_plan,
    replan,
)
from tether.profiles import DatasetProfile, profile_for
from tether.progress import NO_PROGRESS, Progress
from tether.readahead import read_soon
from tether.remotes import Remote, open_remote
from tether.remotes.base import IndexedListing, RemoteStat, TaggedUploads, prepare_transfers
from tether.scan import ScanReport, StatEntry, scan_tree
from tether.transfer import BatchResult, landed_states, pull_changes, push_changes
from tether.verify import (
    VERIFY_MODES,
    VerifyReport,
    raise_if_failed,
)
from tether.workspace import Dataset, Workspace

DEFAULT_JOBS = 8
HASH_THREADS = max(2, os.cpu_count() or 2)  # hashing is CPU work: one thread per core
Confirm = Callable[[Plan], bool]


def index_path(dataset_id: str) -> str:
    return f"{dataset_id}/.tether/index"


# -- resolve ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scope:
    """Which part of the dataset this run touches (verification covers exactly that part)."""

    primary_only: bool = False
    skip: tuple[str, ...] = ()  # sidecar folders left out

    def describe(self) -> dict[str, object]:
        return {"primary_only": self.primary_only, "skip": list(self.skip)}


@dataclass
class Context:
    """Everything one command works on, resolved once."""

    workspace: Workspace
    dataset: Dataset
    remote_name: str
    backend: Remote  # as opened: its check may still run (use ``remote`` for anything but facts)
    progress: Progress = NO_PROGRESS
    jobs: int = DEFAULT_JOBS  # uploads: --jobs, else the backend's parallel_connections
    checksum: bool = False
    skip_symlinks: bool = False
    scan_report: ScanReport = field(default_factory=ScanReport)
    index_cache: tuple[bytes, Manifest] | None = None  # the remote index as last read and parsed
    profile: DatasetProfile = field(default_factory=DatasetProfile)
    scope: Scope = field(default_factory=lambda: Scope())
    verify: str = "sha256"
    verify_sidecars: bool = True
    comparisons: dict[str, str] = field(default_factory=dict)  # foreign objects: path -> exact|size-only
    # A pull downloads foreign objects it needs anyway: it need not hash them first (see
    # manifest.PROVISIONAL); a push or diff does (the index and --json carry real digests).
    defer_foreign_hashing: bool = False
    # Local files a push copies without hashing them first, with their scanned state (the copy
    # hashes them and refuses a file no longer in this state): see scan_local.
    unhashed: dict[str, StatEntry] = field(default_factory=dict)
    # The remote's check (connect, log in, look at the base folder), running in a thread while
    # the local tree is walked: an SSH login and helper start took 0.45-0.55 s, as long as the
    # walk of 20,000 cold files. None once it passed.
    checking: Future[None] | None = None
    closing: Future[None] | None = None  # the remote closing in the background (close_soon)
    download_jobs: int = DEFAULT_JOBS  # --jobs, else the backend's Capabilities.downloads
    # A pull without the lock (read-only keys): checked before anything is promoted.
    before_promote: Callable[[], None] | None = None

    @property
    def remote(self) -> Remote:
        """The remote, once its check passed (its error, if it failed)."""
        self.wait_for_check()
        return self.backend

    def wait_for_check(self) -> None:
        """Block until the remote's check has passed; raise its error if it failed."""
        checking = self.checking
        if checking is not None:
            checking.result()
            self.checking = None

    @cached_property
    def keep(self) -> Callable[[str], bool]:
        """Ownership rules and this run's scope, applied to both sides: a file tether does not
        own locally (excluded, git-tracked) is not tether's to download, overwrite or delete
        remotely either; a file outside the scope (--primary-only, --skip) is left alone on
        both sides and kept in the remote index."""
        owned = self.workspace.ownership(self.dataset)
        in_scope = self.in_scope
        whole = self.dataset.only is None and not self.scope.primary_only and not self.scope.skip
        if not self.profile.exclude:
            # Called for every file on both sides: skip the scope test when the run has none.
            return owned if whole else lambda rel: owned(rel) and in_scope(rel)
        import pathspec  # here: most runs have no profile excludes (see Workspace.ownership)

        excluded = pathspec.GitIgnoreSpec.from_lines(self.profile.exclude)
        return lambda rel: owned(rel) and in_scope(rel) and not excluded.match_file(rel)

    def in_scope(self, rel: str) -> bool:
        scope = self.scope
        if self.dataset.only is not None:
            return rel == self.dataset.only
        if scope.primary_only:
            return rel == self.profile.primary
        return not scope.skip or not rel.startswith(tuple(f"{skipped}/" for skipped in scope.skip))

    def remote_reader(self, rel: str) -> Callable[[int, int], bytes]:
        path = f"{self.dataset.id}/{rel}"
        return lambda offset, length: self.remote.read_range(path, offset, length)

    def local_reader(self, rel: str) -> Callable[[int, int], bytes]:
        return local_reader(self.dataset.path / rel)

    def close_soon(self) -> None:
        """The run is done with the remote: close it in a thread while the run writes its audit
        record (an SSH close waits for its helpers and its master to exit, 40 ms through a 20 ms
        link, as long as that bookkeeping). close() waits for it and raises its error."""
        if self.closing is None and self.checking is None:
            self.closing = in_background(self.backend.close, "tether-close")

    def close(self) -> None:
        if self.closing is not None:
            self.closing.result()
            return
        if self.checking is not None:
            # Closing under a running check would race its connect: let it end first.
            futures_wait([self.checking])
        self.backend.close()


class ContextOptions(TypedDict, total=False):
    """What every command accepts besides TARGET and REMOTE (the Python API's keywords)."""

    workspace: Workspace | Path | None
    dataset_id: str | None
    progress: Progress
    jobs: int | None
    checksum: bool
    skip_symlinks: bool
    strict_id: bool  # TARGET must be an explicit namespace/name id (also TETHER_STRICT_ID=1)
    primary_only: bool
    skip: tuple[str, ...] | list[str]  # sidecar folders to leave out
    verify: str  # sha256 | size | parquet | auto
    verify_sidecars: bool


@contextlib.contextmanager
def open_context(
    target: str, remote_name: str, *, may_transfer: bool = False, **options: Unpack[ContextOptions]
) -> Iterator[Context]:
    """``may_transfer``: a push or pull, whose remote gets ready to transfer as soon as it is
    reachable (remotes.base.WarmsUp: SSH's stream helper starts during the scan); a diff never
    pays for that."""
    workspace = options.get("workspace")
    ws = workspace if isinstance(workspace, Workspace) else Workspace.find(workspace)
    strict = options.get("strict_id", False) or os.environ.get("TETHER_STRICT_ID", "") not in ("", "0")
    # A caller that names the workspace (the Python API) means ids and relative paths in it,
    # not in whatever folder the process happens to run in.
    dataset = ws.resolve(
        target,
        dataset_id=options.get("dataset_id"),
        cwd=None if workspace is None else ws.root,
        strict=strict,
    )
    profile = profile_for(ws.settings.raw, dataset.id)
    scope = _scope(dataset, profile, options.get("primary_only", False), tuple(options.get("skip", ())))
    verify = options.get("verify", "sha256")
    if verify not in VERIFY_MODES:
        raise UsageError(f"--verify {verify!r} is not one of {', '.join(VERIFY_MODES)}")
    remote = open_remote(ws.remote(remote_name), workspace_root=ws.root)
    checking = None
    if remote.capabilities.login_may_prompt:
        try:
            _get_ready(remote, may_transfer)  # now, while nothing else writes to the terminal
        except BaseException:
            remote.close()  # an SSH master or helper must not outlive a failed check
            raise
    else:
        checking = _check_in_background(remote, may_transfer)
    ctx = Context(
        ws,
        dataset,
        remote_name,
        remote,
        options.get("progress", NO_PROGRESS),
        options.get("jobs") or remote.capabilities.parallel_connections,
        options.get("checksum", False),
        options.get("skip_symlinks", False),
        profile=profile,
        scope=scope,
        verify=verify,
        verify_sidecars=options.get("verify_sidecars", True),
        checking=checking,
        download_jobs=options.get("jobs") or remote.capabilities.downloads,
    )
    try:
        yield ctx
    finally:
        ctx.close()  # an SSH master or helper must not outlive the run, nor a failed check


def _get_ready(remote: Remote, may_transfer: bool) -> None:
    """Check the remote; for a push or pull, let it get ready to transfer too (said first, so
    a backend can get ready while it connects)."""
    if may_transfer:
        prepare_transfers(remote)
    remote.check()


def _check_in_background(remote: Remote, may_transfer: bool) -> Future[None]:
    """Run _get_ready in a thread; Context.remote waits for it (and raises its error)."""
    return in_background(lambda: _get_ready(remote, may_transfer), "tether-remote-check")


def _scope(dataset: Dataset, profile: DatasetProfile, primary_only: bool, skip: tuple[str, ...]) -> Scope:
    """Check --primary-only and --skip against the dataset's profile (usage errors, exit 2)."""
    if primary_only and profile.primary is None:
        raise UsageError(
            f"--primary-only: dataset {dataset.id!r} declares no primary file",
            hint='Declare one in tether.toml, e.g. [profiles.NAME] primary = "records.parquet" and '
            '[datasets] "ns/*" = "NAME".',
        )
    if primary_only and dataset.only is not None:
        raise UsageError("--primary-only and a file TARGET cannot be combined")
    for name in skip:
        name = name.strip("/")
        if profile.sidecars and name not in profile.sidecars:
            declared = ", ".join(profile.sidecars)
            raise UsageError(f"--skip {name!r} is not a sidecar of {dataset.id!r} (sidecars: {declared})")
        check_relpath(name, what="--skip folder")
    return Scope(primary_only, tuple(sorted({n.strip("/") for n in skip})))


# -- scan both sides ----------------------------------------------------------------------------
def scan_local(ctx: Context, *, held_elsewhere: Callable[[], set[str]] | None = None) -> Manifest:
    """The local tree with digests, from the hash cache where it vouches.

    ``held_elsewhere`` (a push to a backend that hashes what it sends: see
    Capabilities.hash_on_write_max) returns the paths the remote or the base hold. A file neither
    holds is copied whatever its digest, so it is hashed while it is copied, not here: a first
    push of 20,000 files reads each once instead of twice. Such entries carry
    manifest.UNHASHED until then; their scanned state goes to ``ctx.unhashed``.
    """
    ds = ctx.dataset
    ctx.progress.stage("scanning local")
    # The cache lookup after the walk read the cold database from disk (0.06-0.08 s of a cold
    # no-op diff); asked for now, the disk reads it while the walk waits on inodes.
    db = ctx.workspace.hash_cache_path
    read_soon(db, db.with_name(f"{db.name}-wal"))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tether-ownership") as pool:
        # Ownership asks git (a cold start of git took 0.24 s): let it answer during the walk.
        owned = pool.submit(lambda: ctx.keep)
        stats = scan_tree(ds.path, keep=owned, skip_symlinks=ctx.skip_symlinks, report=ctx.scan_report)
    for link in ctx.scan_report.skipped_symlinks:
        ctx.progress.message(f"skipped symlink {link}")
    if held_elsewhere is not None:
        # Ledgers are judged by their digests before planning (fidelity.check_ledgers).
        held = held_elsewhere() | {ledger.path for ledger in ctx.profile.append_only}
        limit = ctx.remote.capabilities.hash_on_write_max
        ctx.unhashed = {st.path: st for st in stats if st.path not in held and st.size <= limit}
    skip = ctx.unhashed.keys()
    to_hash = [st for st in stats if st.path not in skip] if skip else stats
    ctx.progress.stage("hashing local", files=len(to_hash), bytes=sum(s.size for s in to_hash))
    cache = HashCache(ctx.workspace.hash_cache_path)
    try:
        hashed = hash_entries(
            ds.path,
            to_hash,
            cache,
            cache_prefix=f"{ds.path}/",
            jobs=HASH_THREADS,
            on_hashed=lambda f, b: ctx.progress.advance(files=f, bytes=b),
            force=ctx.checksum,
            # The walk and the cache lookup overlap the remote's check (a cold no-op diff of
            # 20,000 files waited 0.2 s for it before its lookup); reading files can take
            # minutes, so an unreachable or refusing remote is reported before that starts.
            before_reading=ctx.wait_for_check,
        )
    finally:
        cache.close()
    ctx.wait_for_check()
    if not skip:
        return Manifest(hashed)
    by_path = {e.path: e for e in hashed}
    return Manifest([by_path.get(st.path) or Entry(st.path, st.size, st.mtime_ns, UNHASHED) for st in stats])


def _landed_as(st: StatEntry, arrived: Entry | None) -> bool:
    return arrived is not None and (st.size, st.mtime_ns) == (arrived.size, arrived.mtime_ns)


def _parse_index(ctx: Context, data: bytes) -> Manifest | None:
    if ctx.index_cache is not None and ctx.index_cache[0] == data:
        return ctx.index_cache[1]  # same bytes as the last look (a run reads it up to three times)
    try:
        index = Manifest.loads(data, source=f"{ctx.remote.url}/{index_path(ctx.dataset.id)}")
        ctx.index_cache = (data, index)
        return index
    except ManifestFormatError as exc:
        if "format version" in exc.message:
            raise
        # A damaged index only costs time: the listing is the truth, digests get recomputed.
        ctx.progress.message(f"ignoring damaged remote index ({exc.message}); rehashing")
        return None


def _parse_meanwhile(ctx: Context, copy: bytes | None) -> threading.Thread | None:
    """Parse the workspace's copy of the index while the remote lists: the copy is what a
    no-op uses, and parsing 20,000 entries (0.08-0.12 s) waited on the listing before."""
    if not copy or (ctx.index_cache is not None and ctx.index_cache[0] == copy):
        return None
    thread = threading.Thread(target=_parse_quietly, args=(ctx, copy), name="tether-index", daemon=True)
    thread.start()
    return thread


def _parse_quietly(ctx: Context, data: bytes) -> None:
    """Parse index bytes off the calling thread, keeping only a clean parse in ctx.index_cache
    (where _parse_index finds it); a damaged one is parsed again there, so that its message
    comes once and from the calling thread."""
    source = f"{ctx.remote.url}/{index_path(ctx.dataset.id)}"
    with contextlib.suppress(ManifestFormatError):
        ctx.index_cache = (data, Manifest.loads(data, source=source))


def _read_index_meanwhile(ctx: Context) -> Callable[[], Manifest | None]:
    """Start reading and parsing the remote index while the remote lists; the returned call
    waits for it. A cold no-op diff of 20,000 files on a local remote read and parsed the index
    (0.10-0.16 s) only after the walk, while the walk itself mostly waited on the disk; on an
    object store the GET also overlaps the LIST pages.

    The index is only a cache that vouches for exact (size, mtime) pairs the listing shows, so
    reading it before the listing ends trusts nothing more than reading it after. A read error
    and the damaged-index message reach the caller in the calling thread, from ``wait``."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tether-index")

    def fetch() -> bytes | None:
        try:
            data = ctx.remote.read_bytes(index_path(ctx.dataset.id))
        except FileNotFoundError:
            return None
        _parse_quietly(ctx, data)
        return data

    fetched = pool.submit(fetch)
    pool.shutdown(wait=False)

    def wait() -> Manifest | None:
        data = fetched.result()
        return None if data is None else _parse_index(ctx, data)

    return wait


def _same_version(old: Entry, st: RemoteStat) -> bool:
    """Whether the listed file is the one an index entry of the same size describes: by the
    ETag where both carry one (object stores, whose mtimes are their own stamps), else by the
    mtime. Where the listing shows no tag, an entry recorded from an upload does not match:
    its mtime is the source file's, never the store's stamp."""
    if old.etag is not None and st.etag is not None:
        return old.etag == st.etag
    return old.mtime_ns == st.mtime_ns


def list_remote(
    ctx: Context, *, clean_temp: bool = False
) -> tuple[list[RemoteStat], Manifest | None, list[Entry]]:
    """The remote's listing, its index, and the index entries the listing confirmed.

    Where the backend can compare its listing with the index beside the data (IndexedListing:
    SSH), only what the index does not vouch for crosses the link, and the index itself only
    when this workspace's copy of it (``.tether/remote-index/``) is stale. The index entries
    whose file the remote listed with exactly their size and mtime come back as they are (the
    third list; their paths were checked when the index was parsed), the rest of the listing as
    RemoteStats: rebuilding 20,000 listed files only to match them again cost 35-40 ms per look.
    Either way the listing is a fresh look at the remote, never the index taken on trust: a
    file the index lists but the remote lacks is reported missing. ``clean_temp`` (under the
    lock) also removes what killed writers left (Remote.cleanup_temp), in the listing's request
    where the backend can.
    """
    remote = ctx.remote
    if not isinstance(remote, IndexedListing):
        index = _read_index_meanwhile(ctx)
        listing = list(remote.list_files(ctx.dataset.id))
        if clean_temp:
            remote.cleanup_temp(ctx.dataset.id)
        return listing, index(), []
    copy = ctx.workspace.remote_index_path(ctx.remote_name, ctx.dataset.id)
    try:
        have: bytes | None = copy.read_bytes()
    except OSError:
        have = None
    have_digest = hashlib.sha256(have).hexdigest() if have else None
    parsing: list[threading.Thread] = []

    def parse_meanwhile(data: bytes | None) -> None:
        thread = _parse_meanwhile(ctx, data)
        if thread is not None:
            parsing.append(thread)

    parse_meanwhile(have)
    delta = remote.list_against_index(
        ctx.dataset.id,
        index_path(ctx.dataset.id),
        have=have_digest,
        clean_temp=clean_temp,
        # A stale copy's replacement arrives before the listing ends: parsed meanwhile too (a
        # first pull of 20,000 files parsed it for 70 ms after the listing).
        on_index=parse_meanwhile,
    )
    for thread in parsing:
        thread.join()
    if delta.index_digest is None:
        return delta.changed, None, []  # no index there: everything was listed
    data = delta.index if delta.index is not None else have
    assert data is not None
    if delta.index is not None:
        _keep_index_copy(ctx, data)
    index = _parse_index(ctx, data)
    if index is None:
        # The helper vouched with an index this side refuses: take the plain listing instead.
        return list(remote.list_files(ctx.dataset.id)), None, []
    left_out = set(delta.missing).union(st.path for st in delta.changed)
    confirmed = [e for e in index.entries if e.path not in left_out] if left_out else index.entries
    return delta.changed, index, confirmed


def _keep_index_copy(ctx: Context, data: bytes) -> None:
    """Remember the remote index as last seen (only where listings are told against it)."""
    if not isinstance(ctx.remote, IndexedListing):
        return
    with contextlib.suppress(OSError):  # only a cache: the next run fetches it again
        write_bytes_atomic(
            ctx.workspace.remote_index_path(ctx.remote_name, ctx.dataset.id), data, durable=False
        )


def index_bytes(ctx: Context, state: RemoteState) -> bytes:
    return state.index().dumps(dataset=ctx.dataset.id)


def write_index(
    ctx: Context, state: RemoteState, lease: Lease, *, data: bytes | None = None, release: bool = False
) -> None:
    """The index is the commit point: written only while ``lease`` still holds the lock
    (``data``: its bytes, if already made). ``release`` lets the lock go with it, where this
    run changes nothing more on the remote."""
    data = index_bytes(ctx, state) if data is None else data
    lease.write_while_held(index_path(ctx.dataset.id), data, release=release)
    _keep_index_copy(ctx, data)


@dataclass
class RemoteState:
    """What the remote holds, as planning sees it, plus what the next index must carry."""

    manifest: Manifest  # files tether owns here (ownership rules applied): the plan's input
    exists: bool  # the remote has this dataset at all (files or an index)
    index_current: bool  # the stored index already vouches for exactly this state
    unowned: list[Entry]  # entries of files our rules leave alone, kept in the next index
    # Listed objects judged equal to their local file without a download (object stores, no
    # index to vouch, no --checksum): path -> "exact" (MD5 ETag) or "size-only" (tether.foreign).
    # Their entries carry the local SHA-256; every other entry's digest was computed remotely.
    comparisons: dict[str, str] = field(default_factory=dict)

    def index(self) -> Manifest:
        return Manifest.from_entries(self.manifest.entries + self.unowned)


def scan_remote(
    ctx: Context, *, fresh: dict[str, Entry] | None = None, clean_temp: bool = False
) -> RemoteState:
    """The remote's real state: its listing, with digests from the index where it vouches.

    The index is a cache, never the truth: a file listed with a size or mtime the index does not
    know (edited, replaced, lost) is hashed where it lives, so a remote that lost or changed
    files is never trusted blindly. ``fresh`` holds entries this run just wrote and verified;
    they vouch only for a file with exactly the size and mtime this run gave it.
    """
    ctx.progress.stage("listing remote")
    listing, index, confirmed = list_remote(ctx, clean_temp=clean_temp)
    fresh = fresh or {}
    # Where the backend keeps the mtime we set (local, SSH), a fresh upload vouches only for a file
    # with exactly that mtime; object stores stamp their own time, so there size must do (this
    # fallback runs only where a store did not tell the uploads' ETags: _state_after_push).
    exact_mtime = ctx.remote.capabilities.preserves_mtime
    entries: list[Entry] = []
    unowned: list[Entry] = []
    unknown: list[RemoteStat] = []
    as_indexed = bool(confirmed) and not fresh and not ctx.checksum
    if as_indexed:  # vouched for by the index, and seen as it says: taken as they are
        keep = ctx.keep
        for e in confirmed:
            (entries if keep(e.path) else unowned).append(e)
    else:
        listing = [RemoteStat(e.path, e.size, e.mtime_ns) for e in confirmed] + listing
    known = index.by_path() if index and listing else {}
    for st in listing:
        check_relpath(st.path, what="remote path")  # invariant 5, before any I/O with it
        old = known.get(st.path)
        vouched = old is not None and old.size == st.size and _same_version(old, st)
        if not ctx.keep(st.path):
            if vouched:
                unowned.append(old)  # type: ignore[arg-type]
            continue
        new = fresh.get(st.path)
        if new is not None and new.size == st.size and (not exact_mtime or new.mtime_ns == st.mtime_ns):
            entries.append(Entry(st.path, st.size, st.mtime_ns, new.digest, st.etag))
        elif vouched and not ctx.checksum:
            entries.append(old)  # type: ignore[arg-type]
        else:
            unknown.append(st)
    comparisons: dict[str, str] = {}
    if unknown and not ctx.checksum and not ctx.remote.capabilities.server_side_hashing:
        compared, unknown = _compare_foreign(ctx, unknown)
        for c in compared:
            entries.append(c.entry)
            comparisons[c.entry.path] = c.comparison
    if unknown and ctx.defer_foreign_hashing and not ctx.remote.capabilities.server_side_hashing:
        entries += [
            Entry(st.path, st.size, st.mtime_ns, provisional_digest(st.etag, st.size)) for st in unknown
        ]
        unknown = []
    if unknown:
        ctx.progress.stage("hashing remote", files=len(unknown), bytes=sum(s.size for s in unknown))
        digests = ctx.remote.hash_files(
            (f"{ctx.dataset.id}/{s.path}" for s in unknown), use_cache=not ctx.checksum
        )
        for st in unknown:
            digest = digests[f"{ctx.dataset.id}/{st.path}"]
            entries.append(Entry(st.path, st.size, st.mtime_ns, digest, st.etag))
            ctx.progress.advance(files=1, bytes=st.size)
    if as_indexed and not listing:
        # Index entries, kept in the index's order: the manifest needs no sort, and the index is
        # current exactly when none of its entries went missing.
        manifest = Manifest(entries)
        current = index is not None and len(entries) + len(unowned) == len(index.entries)
    else:
        manifest = Manifest.from_entries(entries)
        current = index is not None and index.entries == Manifest.from_entries(entries + unowned).entries
    return RemoteState(manifest, bool(listing) or index is not None, current, unowned, comparisons)


def _compare_foreign(ctx: Context, unknown: list[RemoteStat]) -> tuple[list[Compared], list[RemoteStat]]:
    """Objects the index cannot vouch for, on a store that cannot hash them for us: judge those
    whose local file has the same size by the ETag (MD5) or by size alone, reading only local
    bytes (see tether.foreign). The rest is hashed by download, as before."""
    ctx.progress.stage("comparing remote by ETag", files=len(unknown))
    cache = HashCache(ctx.workspace.hash_cache_path)
    try:
        compared, rest = compare_with_local(
            ctx.dataset.path, unknown, cache, cache_prefix=f"{ctx.dataset.path}/", jobs=HASH_THREADS
        )
    finally:
        cache.close()
    size_only = sum(c.comparison == SIZE_ONLY for c in compared)
    notices = getattr(ctx.remote, "notices", None)
    note = "object(s) without an MD5 ETag (multipart uploads) were compared by size only"
    if size_only and isinstance(notices, list) and not any(note in n for n in notices):
        # Said once per run, with the other notices at its end (scan_remote runs up to 3 times).
        notices.append(f"{size_only} {note}; --checksum downloads and hashes them")
    return compared, rest


def scan_both(
    ctx: Context, *, base: Manifest | None = None, take_lock: Callable[[], bool] | None = None
) -> tuple[Manifest, RemoteState]:
    """Both sides at once: the remote's listing is mostly waiting on the network (or the
    cluster's disk) while the local scan is mostly this machine's, so they overlap well.

    ``base`` (a push to a backend that hashes while it copies): files that neither the remote
    nor the base holds are left unhashed, to be hashed by their copy (see scan_local).
    ``take_lock``: called first on the remote's side (so the local walk does not wait for the
    login); where it took the remote's lock (True), the listing is made under it and clears what
    killed writers left.
    """

    def remote_side() -> RemoteState:
        locked = take_lock is not None and take_lock()
        return scan_remote(ctx, clean_temp=locked)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tether-scan-remote") as pool:
        remote = pool.submit(remote_side)

        try:
            held = None if base is None else lambda: _held_paths(remote.result().manifest, base)
            local = scan_local(ctx, held_elsewhere=held)
        except BaseException:
            remote.cancel()
            with contextlib.suppress(BaseException):
                remote.result()  # let the remote scan end before the error leaves the context
            raise
        return local, remote.result()


def _held_paths(remote: Manifest, base: Manifest) -> set[str]:
    return {e.path for e in remote.entries} | {e.path for e in base.entries}


def load_base(ctx: Context) -> Manifest:
    path = ctx.workspace.base_path(ctx.remote_name, ctx.dataset.id)
    try:
        return Manifest.loads(path.read_bytes(), source=str(path))
    except FileNotFoundError:
        return Manifest()
    except ManifestFormatError as exc:
        # Losing the base only makes the next plan more careful (differs instead of modified).
        ctx.progress.message(f"ignoring damaged base {path} ({exc.message})")
        return Manifest()


def save_base(ctx: Context, local: Manifest, remote: Manifest, old_base: Manifest) -> None:
    """Record what both sides now agree on. Paths outside this run's scope (--skip,
    --primary-only, a file TARGET) keep their old base entry: a partial sync forgets nothing."""
    keep = ctx.keep
    in_scope: list[Entry] = []
    untouched: list[Entry] = []
    for entry in old_base.entries:
        (in_scope if keep(entry.path) else untouched).append(entry)
    if local.entries == remote.entries:
        # Both sides alike (a push or pull that did all it planned): the base is that state,
        # with no three-way merge of 20,000 entries.
        agreed = list(local.entries)
    else:
        agreed = list(agreed_base(local, remote, in_scope))
    # agreed_base merges in manifest order: only entries kept out of it need a sort.
    new = Manifest.from_entries([*agreed, *untouched]) if untouched else Manifest(agreed)
    if new.entries == old_base.entries:
        return
    path = ctx.workspace.base_path(ctx.remote_name, ctx.dataset.id)
    write_bytes_atomic(path, new.dumps(dataset=ctx.dataset.id, remote=ctx.remote_name))


# -- results ------------------------------------------------------------------------------------
@dataclass
class DiffResult:
    dataset: Dataset
    remote_name: str
    remote_url: str
    push: Plan
    pull: Plan
    local_exists: bool
    remote_exists: bool
    ledgers: list[LedgerCheck] = field(default_factory=list)
    record: audit.AuditRecord | None = None
    comparisons: dict[str, str] = field(default_factory=dict)  # compared without SHA-256

    @property
    def in_sync(self) -> bool:
        return self.push.in_sync


@dataclass
class SyncResult:
    plan: Plan
    record: audit.AuditRecord
    verification: VerifyReport | None = None
    refusal: RefusedError | None = None  # a dry run shows the plan, then why a real run would stop
    comparisons: dict[str, str] = field(default_factory=dict)  # compared without SHA-256

    @property
    def state(self) -> str:
        return self.record.state


class SyncOptions(ContextOptions, total=False):
    mode: Mode | str
    prefer: Side | str | None
    max_delete: MaxDelete | str | None
    dry_run: bool
    confirm: Confirm | None
    reviewed: bool | None
    audit_out: Path | None


# -- commands -----------------------------------------------------------------------------------
def diff(
    target: str,
    remote: str,
    *,
    mode: Mode | str = Mode.UPDATE,
    audit_out: Path | None = None,
    **options: Unpack[ContextOptions],
) -> DiffResult:
    """What push and pull would do, without changing anything."""
    started = time.time()
    with open_context(target, remote, **options) as ctx:
        local_exists = ctx.dataset.path.is_dir()
        local, remote_state = scan_both(ctx)
        remote_m, remote_exists = remote_state.manifest, remote_state.exists
        if not local_exists and not remote_exists:
            raise _missing_everywhere(ctx)
        # In step (the common no-op): the base cannot change any status, so it is not read.
        base = Manifest() if local.entries == remote_m.entries else load_base(ctx)
        ledgers = fidelity.check_ledgers(ctx, local, remote_m, base)
        ctx.close_soon()  # nothing more to read there: the remote closes while the plan is made
        push_options = PlanOptions(
            direction=Direction.PUSH, mode=Mode(mode), ledgers=fidelity.growths(ledgers)
        )
        push_plan = make_plan(local, remote_m, base, push_options)
        pull_plan = replan(push_plan, dataclasses.replace(push_options, direction=Direction.PULL))
        record = _new_record(ctx, "diff", Mode(mode), started, state="diff-only")
        record.unchanged = push_plan.unchanged_files
        record.parts = audit.parts_of(ctx.profile, push_plan, [], None)
        _finish(ctx, push_plan, record, None, audit_out)
        return DiffResult(
            ctx.dataset,
            ctx.remote_name,
            ctx.remote.url,
            push_plan,
            pull_plan,
            local_exists,
            remote_exists,
            list(ledgers.values()),
            record,
            remote_state.comparisons,
        )


def _missing_everywhere(ctx: Context) -> DatasetNotFound:
    return DatasetNotFound(
        f"dataset {ctx.dataset.id!r} exists neither locally ({ctx.dataset.path}) nor on remote "
        f"{ctx.remote_name!r} ({ctx.remote.url}/{ctx.dataset.id})"
    )


def push(target: str, remote: str, **options: Unpack[SyncOptions]) -> SyncResult:
    """Make the remote hold the local dataset's changes (see the planner for the rules)."""
    return _run(Direction.PUSH, target, remote, **options)


def pull(target: str, remote: str, **options: Unpack[SyncOptions]) -> SyncResult:
    """Bring the remote's changes into the local dataset, staged and verified before promotion."""
    return _run(Direction.PULL, target, remote, **options)


def _options(
    direction: Direction, mode: Mode | str, prefer: Side | str | None, max_delete: MaxDelete | str | None
) -> PlanOptions:
    if isinstance(max_delete, str):
        max_delete = MaxDelete.parse(max_delete)
    return PlanOptions(
        direction=direction,
        mode=Mode(mode),
        prefer=Side(prefer) if prefer else None,
        max_delete=max_delete or MaxDelete(),
    )


def _new_record(
    ctx: Context, operation: str, mode: Mode, started: float, state: str = "no-op"
) -> audit.AuditRecord:
    return audit.AuditRecord(
        operation=operation,
        dataset=ctx.dataset.id,
        remote=ctx.remote_name,
        remote_url=ctx.backend.url,
        mode=mode.value,
        state=state,
        started=started,
        finished=started,
        profile=ctx.profile.name,
        scope={**ctx.scope.describe(), "file": ctx.dataset.only},
        verify=ctx.verify,
        sidecar_check=ctx.verify_sidecars,
    )


def _run(
    direction: Direction,
    target: str,
    remote: str,
    *,
    mode: Mode | str = Mode.UPDATE,
    prefer: Side | str | None = None,
    max_delete: MaxDelete | str | None = None,
    dry_run: bool = False,
    confirm: Confirm | None = None,
    reviewed: bool | None = None,
    audit_out: Path | None = None,
    **context_options: Unpack[ContextOptions],
) -> SyncResult:
    """``reviewed``: a person reads the plan before it runs (default: whenever ``confirm`` is
    given). Then the plan is made before the remote's lock is taken, since nobody's lock should
    wait on someone reading, and checked again under it. A run nobody reviews (``-y``, a script)
    on a backend whose look at the remote costs more than its lock (Capabilities.
    lock_before_listing) takes the lock first and plans from its one look at the remote under
    it: a pull of 20,000 files from an object store listed them twice, 0.45 s on a loopback
    server. If the lock is taken by someone else or cannot be written (read-only keys), or the
    remote has no folder for the dataset yet (the lock is not what should make it), the run
    plans without it as before, so a run with nothing to do still ends in step."""
    options = _options(direction, mode, prefer, max_delete)
    started = time.time()
    unreviewed = not (confirm is not None if reviewed is None else reviewed)
    with (
        open_context(target, remote, may_transfer=True, **context_options) as ctx,
        contextlib.ExitStack() as held,
    ):
        record = _new_record(ctx, direction.value, options.mode, started)
        ctx.defer_foreign_hashing = direction == Direction.PULL
        # -- scan both sides, plan
        local_exists = ctx.dataset.path.is_dir()
        if direction == Direction.PUSH and not local_exists:
            ctx.wait_for_check()  # a remote that fails its check is reported first, as ever
            raise DatasetNotFound(f"no local dataset {ctx.dataset.id!r} at {ctx.dataset.path}")
        if direction == Direction.PUSH:
            fidelity.require_local_primary(ctx)
        base = load_base(ctx)
        # A first push to a backend that hashes what it sends reads each new file once.
        copies_hashing = (
            direction == Direction.PUSH and not dry_run and ctx.backend.capabilities.hash_on_write_max > 0
        )
        lock_first = unreviewed and not dry_run and ctx.backend.capabilities.lock_before_listing
        leases: list[Lease] = []  # the remote lock, once taken

        def take_lock() -> bool:
            lease = _lease(ctx, direction)
            held.callback(lease.release)
            try:
                lease.acquire(existing_only=True)
            except (LockHeld, RemotePermissionError, FileNotFoundError):
                return False  # plan without it; a plan with work tries again and says why not
            leases.append(lease)
            return True

        if lock_first:
            held.enter_context(_local_lock(ctx))
        local, remote_state = scan_both(
            ctx, base=base if copies_hashing else None, take_lock=take_lock if lock_first else None
        )
        planned_under_lock = bool(leases)
        remote_m, remote_exists = remote_state.manifest, remote_state.exists
        ctx.comparisons = remote_state.comparisons
        if ctx.dataset.only is not None and not local.entries and not remote_m.entries:
            raise DatasetNotFound(
                f"{ctx.dataset.only} exists neither in {ctx.dataset.path} nor in the copy of "
                f"{ctx.dataset.id!r} on {ctx.remote_name!r}"
            )
        if direction == Direction.PULL:
            fidelity.require_remote_primary(ctx, remote_m)
        if direction == Direction.PULL and not remote_exists:
            if not local_exists:
                raise _missing_everywhere(ctx)
            ctx.progress.message(
                f"remote {ctx.remote_name!r} has no copy of {ctx.dataset.id!r}; nothing to pull"
            )
            return _finish(ctx, Plan(options), record, None, audit_out)
        ledgers = fidelity.check_ledgers(ctx, local, remote_m, base)
        options = dataclasses.replace(options, ledgers=fidelity.growths(ledgers))
        plan = make_plan(local, remote_m, base, options)
        record.unchanged = plan.unchanged_files
        record.skipped = len(plan.with_action(Action.SKIP))
        record.skipped_symlinks = list(ctx.scan_report.skipped_symlinks)
        try:
            fidelity.refuse_ledgers(plan, ledgers)
            plan.check_safe()
        except RefusedError as exc:
            if not dry_run:
                raise
            record.state = "dry-run"
            record.error = exc.message
            result = _finish(ctx, plan, record, None, audit_out)
            result.refusal = exc
            return result
        if not plan.has_work:
            save_base(ctx, local, remote_m, base)  # local bookkeeping only
            _finish_killed_run(ctx, direction, remote_state, leases[0] if leases else None)
            # Nothing to move, but a sidecar that differs is still not in step (exit 4).
            verification = fidelity.verify_run(ctx, [], local, remote_m)
            if not verification.ok:
                record.error = "sidecar verification failed"
            finished = _finish(ctx, plan, record, verification, audit_out)
            raise_if_failed(verification)
            return finished
        if dry_run:
            record.state = "dry-run"
            return _finish(ctx, plan, record, None, audit_out)
        fidelity.precheck_parquet(ctx, plan)
        if confirm is not None and not confirm(plan):
            raise Interrupted("Declined; nothing was changed.")

        if not planned_under_lock:  # -- lock, then check the plan still holds under it
            if not lock_first:
                held.enter_context(_local_lock(ctx))
            try:
                leases.append(held.enter_context(_lease(ctx, direction)))
            except RemotePermissionError:
                if direction != Direction.PULL:
                    raise
                why = f"cannot write the lock on {ctx.remote_name!r} (read-only access?)"
                ctx.before_promote = _pull_without_lock(ctx, why=why)
            except LockHeld as elsewhere:
                holder = elsewhere.holder or {}
                if direction != Direction.PULL or holder.get("operation") != "pull":
                    raise
                who = f"{holder.get('owner')}@{holder.get('host')} pid {holder.get('pid')}"
                why = f"another pull ({who}) holds the lock on {ctx.remote_name!r}"
                ctx.before_promote = _pull_without_lock(ctx, why=why)
        lease = leases[0] if leases else None
        try:
            if planned_under_lock:
                faults.checkpoint("locked")
                result, verification = _execute(ctx, direction, plan, local, remote_state, base, lease)
            else:
                result, verification = _execute_locked(ctx, direction, plan, local, remote_m, base, lease)
        except TetherError as exc:
            record.state = "failed"
            record.error = exc.message
            held.close()
            _finish(ctx, plan, record, None, audit_out)
            raise
        held.close()  # release the locks
        ctx.close_soon()  # the lock was the last thing on the remote
        # -- audit (what was actually done, measured after the transfer)
        _record_outcome(record, result, verification)
        finished = _finish(ctx, plan, record, verification, audit_out)
        fidelity.explain_ledger_failures(ctx, result.failed)
        result.raise_first()
        raise_if_failed(verification)
        return finished


def _execute_locked(
    ctx: Context,
    direction: Direction,
    plan: Plan,
    local: Manifest,
    remote_m: Manifest,
    base: Manifest,
    lease: Lease | None,
) -> tuple[BatchResult, VerifyReport]:
    """Under the lock: make sure the plan made before it still holds, then carry it out.

    The look under the lock comes before any transfer. (Tried: a pull listing the remote again
    while it downloads, checked before promotion. It saved no time on a 2-core machine, and a
    file changing on the remote during the download, such as a ledger a job appends to, was
    then reported either as a stale plan or as a failed digest, depending on timing.)
    """
    # The same look clears temporary files killed writers left (over SSH in the same request),
    # only while holding the lock: without it (read-only keys) they may be a live writer's.
    state_now = scan_remote(ctx, clean_temp=lease is not None)
    remote_now = state_now.manifest
    changed = remote_now.entries != remote_m.entries
    if changed and make_plan(local, remote_now, base, plan.options).fingerprint() != plan.fingerprint():
        raise StalePlanError(f"the remote copy of {ctx.dataset.id!r} changed after the plan was made")
    faults.checkpoint("locked")
    return _execute(ctx, direction, plan, local, state_now, base, lease)


def _execute(
    ctx: Context,
    direction: Direction,
    plan: Plan,
    local: Manifest,
    state: RemoteState,
    base: Manifest,
    lease: Lease | None,
) -> tuple[BatchResult, VerifyReport]:
    """Carry out ``plan``, made from ``state`` as listed while ``lease`` was held (a pull with
    read-only keys holds none: see _pull_without_lock)."""
    if direction == Direction.PUSH:
        assert lease is not None
        return _execute_push(ctx, plan, local, base, lease, state)
    return _execute_pull(ctx, plan, local, state.manifest, base, lease)


def _pull_without_lock(ctx: Context, *, why: str) -> Callable[[], None]:
    """A pull that cannot take the lock, and need not: its keys may only read (a shared
    bucket's read-only keys), or another pull holds it (a job array pulling one dataset: pulls
    change nothing on the remote, so they need not wait for each other). It checks instead: no
    live lock of a run that writes (anything but a pull) when it starts, and before it promotes
    anything, still none and the same index (a push writes the index last). A push that ran
    meanwhile then makes it stop as a stale plan (exit 3; verified staged files are kept for
    the rerun) instead of promoting a mix of two versions. Returns that last check."""

    def index_now() -> bytes | None:
        try:
            return ctx.remote.read_bytes(index_path(ctx.dataset.id))
        except FileNotFoundError:
            return None

    def writer() -> LockRecord | None:
        holder = live_lock(ctx.remote, ctx.dataset.id, ctx.workspace.hostname)
        return None if holder is None or holder.operation == "pull" else holder

    holder = writer()
    if holder is not None:
        raise lock_held(holder, ctx.dataset.id, ctx.remote, "Wait for that run to finish, then pull again.")
    seen = index_now()
    ctx.progress.message(f"{why}: pulling without it; nothing is promoted if a push runs meanwhile")

    def still_unwritten() -> None:
        holder = writer()
        if holder is not None or index_now() != seen:
            by = f" ({holder.describe()})" if holder is not None else ""
            raise StalePlanError(
                f"the remote copy of {ctx.dataset.id!r} changed while it was pulled{by}; "
                "nothing was promoted",
                hint="Pull again: the files already downloaded and verified are reused.",
            )

    return still_unwritten


def _lease(ctx: Context, direction: Direction) -> Lease:
    return Lease(ctx.remote, ctx.dataset.id, operation=direction.value, host=ctx.workspace.hostname)


def _record_outcome(record: audit.AuditRecord, result: BatchResult, verification: VerifyReport) -> None:
    record.state = "transferred"
    record.done_changes = list(result.done)
    record.reused_staged = result.reused
    for change in result.done:
        record.done[change.action.value] += 1
        record.done_bytes[change.action.value] += change.bytes
    record.failed = [{"path": f.path, "reason": f.reason} for f in result.failed]
    # Files whose bytes did not match on arrival are verification failures too.
    verification.mismatches += [f.path for f in result.failed if isinstance(f.error, VerificationError)]
    record.verification = verification.as_json()
    if result.failed or not verification.ok:
        record.state = "failed"
        record.error = str(result.failed[0].error) if result.failed else "verification failed"


def _execute_push(
    ctx: Context, plan: Plan, local: Manifest, base: Manifest, lease: Lease, before: RemoteState
) -> tuple[BatchResult, VerifyReport]:
    started_ns = time.time_ns()
    try:
        result = push_changes(
            ctx.remote,
            ctx.dataset.id,
            ctx.dataset.path,
            plan.changes,
            jobs=ctx.jobs,
            progress=ctx.progress,
            unhashed=ctx.unhashed,
        )
    except BaseException:
        ctx.remote.flush()  # what landed is durable before any later run's index lists it
        raise
    # Whatever landed is durable before the index that lists it (invariants 1 and 2): nothing
    # below touches the remote until the flush is done. The digests learnt while copying go to
    # the hash cache beside the flush, the index and the base (0.25 s of sqlite and Python per
    # 20,000 files, once the remote's flush had been made short by flushing behind the upload).
    # The cache is only this machine's memo of digests: its write has no place in that order.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="tether-flush") as pool:
        flushed = pool.submit(ctx.remote.flush)
        remembered = None
        if result.resolved:  # files hashed while they were copied: their digests are known now
            remembered = pool.submit(_remember_learnt, ctx, result.resolved, started_ns)
            local = local.with_digests(result.resolved)
            result.done = [_resolved_change(c, result.resolved) for c in result.done]
        # The new index is made while the remote flushes: only reads (an object store may be
        # asked for its uploads' ETags); nothing is written there before the flush is done.
        after = _state_after_push(ctx, before, result)
        remote_after = after.manifest
        data = index_bytes(ctx, after)
        flushed.result()
        # Verified before the index, under the lock: the parquet checks read the remote, and
        # the index's request lets the lock go (one round trip fewer at the end of a push).
        verification = fidelity.verify_run(ctx, result.done, local, remote_after)
        faults.checkpoint("before_index")
        write_index(ctx, after, lease, data=data, release=True)
        ctx.close_soon()  # the index's request was the last on the remote
        faults.checkpoint("before_base")
        save_base(ctx, local, remote_after, base)
        if remembered is not None:
            remembered.result()
    return result, verification


def _remember_learnt(ctx: Context, digests: dict[str, str], hashed_at_ns: int) -> None:
    """Digests hashed while the files were copied, into the hash cache, keyed by the state the
    scan saw (the copy checked the file still had it while it was read)."""
    cache = HashCache(ctx.workspace.hash_cache_path)
    try:
        learnt = ((p, ctx.unhashed[p], d) for p, d in digests.items())
        _remember_digests(ctx, cache, learnt, hashed_at_ns=hashed_at_ns)
    finally:
        cache.close()


def _state_after_push(ctx: Context, before: RemoteState, result: BatchResult) -> RemoteState:
    """The remote's state for the index this push writes.

    Under the lock nothing but this run changed the remote since ``before`` was listed, so the
    new state is ``before`` with this run's verified uploads and deletes applied: no second
    listing of 20,000 files. Where the backend keeps the mtimes we set (local, SSH) an upload's
    entry is the local one; object stores stamp their own mtimes, so there it carries the ETag
    the store answered the upload with (TaggedUploads), which its listings repeat. A file
    changed behind our back later shows a size, mtime or ETag the index does not vouch for and
    is rehashed by the next scan. A store that did not tell every tag is listed again.
    """
    done = [c for c in result.done if c.action in (Action.UPLOAD, Action.DELETE_REMOTE)]
    uploads = [c.local for c in done if c.action == Action.UPLOAD and c.local is not None]
    tags: dict[str, str] | None = {}
    if not ctx.remote.capabilities.preserves_mtime:
        remote = ctx.remote
        prefix = f"{ctx.dataset.id}/"
        tags = None
        if isinstance(remote, TaggedUploads):
            tagged = remote.upload_tags([prefix + e.path for e in uploads])
            tags = None if tagged is None else {p[len(prefix) :]: t for p, t in tagged.items()}
        if tags is None:
            return scan_remote(ctx, fresh={e.path: e for e in uploads})
    by_path = before.manifest.by_path()
    for change in done:
        if change.action == Action.DELETE_REMOTE:
            by_path.pop(change.path, None)
    for e in uploads:
        by_path[e.path] = Entry(e.path, e.size, e.mtime_ns, e.digest, tags[e.path]) if tags else e
    return RemoteState(
        Manifest.from_entries(by_path.values()), True, False, before.unowned, before.comparisons
    )


def _execute_pull(
    ctx: Context, plan: Plan, local: Manifest, remote_m: Manifest, base: Manifest, lease: Lease | None
) -> tuple[BatchResult, VerifyReport]:
    staging = _staging_dir(ctx)
    ctx.dataset.path.mkdir(parents=True, exist_ok=True)
    result = pull_changes(
        ctx.remote,
        ctx.dataset.id,
        ctx.dataset.path,
        staging,
        plan.changes,
        jobs=ctx.download_jobs,
        progress=ctx.progress,
        before_promote=ctx.before_promote,
    )
    # provisional digests of foreign objects, now known from their bytes
    remote_m = remote_m.with_digests(result.resolved)
    local_after, arrived = _state_after_pull(local, result)
    # Verified while the lock is held (the parquet checks read the remote). Nothing touches the
    # remote after that, so the lock goes while the base is written (the local run lock still
    # guards it): a round trip over SSH, two on an object store, off the end of every pull. The
    # connection then closes meanwhile too (over SSH the helpers' exits take a round trip).
    verification = fidelity.verify_run(ctx, result.done, local_after, remote_m)
    faults.checkpoint("before_base")

    # The hash cache learns the promoted files' digests beside the base write, as after a push:
    # it is only this machine's memo, with no place in the write order (20,000 rows and their
    # commit took 75 ms, the base 45 ms, one after the other).
    def release_and_close(lease: Lease) -> None:
        lease.release()
        ctx.close_soon()

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="tether-cache") as pool:
        released = pool.submit(release_and_close, lease) if lease is not None else None
        remembered = pool.submit(_remember_arrived, ctx, result, arrived)
        save_base(ctx, local_after, remote_m, base)
        remembered.result()
        if released is not None:
            released.result()
    return result, verification


def _remember_arrived(ctx: Context, result: BatchResult, arrived: dict[str, Entry]) -> None:
    """Promoted files were hashed on arrival: the hash cache learns their digests under the
    state they have now (their inode and ctime after the rename), so the next scan rereads
    nothing."""
    cache = HashCache(ctx.workspace.hash_cache_path)
    try:
        states = landed_states(os.fspath(ctx.dataset.path), arrived, result.promoted_at_ns)
        landed = ((st.path, st, arrived[st.path].digest) for st in states if _landed_as(st, arrived[st.path]))
        _remember_digests(ctx, cache, landed)
    finally:
        cache.close()


def _state_after_pull(local: Manifest, result: BatchResult) -> tuple[Manifest, dict[str, Entry]]:
    """The local dataset after this pull, and the entries of the files it brought, without
    walking the dataset again (a third of a second per 20,000 files): the scan the plan was
    made from, with this run's promoted downloads and deletes applied.

    Under the local lock no other tether run writes here, and promotion refused any file
    edited since the scan. A file edited by someone else after that differs from the base this
    run records, so the next plan sees it as changed locally, as it would have seen it anyway.
    """
    by_path = local.by_path()
    arrived: dict[str, Entry] = {}
    for change in result.done:
        if change.action == Action.DELETE_LOCAL:
            by_path.pop(change.path, None)
        elif change.action == Action.DOWNLOAD and change.remote is not None:
            entry = change.remote
            digest = result.resolved.get(change.path)
            if digest is not None:
                entry = Entry(entry.path, entry.size, entry.mtime_ns, digest)
            by_path[change.path] = arrived[change.path] = entry
    if not result.done:
        return local, arrived
    return Manifest.from_entries(by_path.values()), arrived


def _resolved_change(change: Change, digests: dict[str, str]) -> Change:
    digest = digests.get(change.path)
    local = change.local
    if digest is None or local is None:
        return change
    # Direct constructors: dataclasses.replace and _replace cost 0.1 s per 20,000 files.
    return Change(
        change.path,
        change.status,
        change.action,
        Entry(local.path, local.size, local.mtime_ns, digest),
        change.remote,
        change.base,
        change.reason,
    )


def _remember_digests(
    ctx: Context,
    cache: HashCache,
    known: Iterable[tuple[str, StatEntry, str]],
    *,
    hashed_at_ns: int | None = None,
) -> None:
    """Put digests this run learnt from the bytes it copied into the hash cache, keyed by the
    file state they were computed from."""
    for path, st, digest in known:
        cache.put(
            f"{ctx.dataset.path}/{path}",
            st.inode,
            st.size,
            st.mtime_ns,
            digest,
            hashed_at_ns,
            ctime_ns=st.ctime_ns,
        )


def _finish_killed_run(
    ctx: Context, direction: Direction, remote_state: RemoteState, lease: Lease | None
) -> None:
    """Nothing to transfer, but a killed run may have left work behind (invariant 7).

    A push killed after its data landed left the index behind the data: write it now (under
    the lock, which also takes over the dead run's record). Otherwise drop a lock record of a
    dead run on this machine, and staged files no plan needs any more. A fully clean no-op
    planned before the lock (``lease`` None) takes none and writes nothing on the remote; one
    planned under ``lease`` listed ``remote_state`` while it held it, and its taking the lock
    already replaced a dead run's record.
    """
    if direction == Direction.PUSH and remote_state.exists and not remote_state.index_current:
        if lease is not None:
            write_index(ctx, remote_state, lease)
        else:
            with _lease(ctx, direction) as taken:
                write_index(ctx, scan_remote(ctx), taken)
        ctx.progress.message("the remote index was behind its files (an interrupted run); rewrote it")
        return
    if lease is None:
        clear_dead_lock(ctx.remote, ctx.dataset.id, host=ctx.workspace.hostname)
    shutil.rmtree(_staging_dir(ctx), ignore_errors=True)


def _staging_dir(ctx: Context) -> Path:
    return ctx.workspace.staging_dir / ctx.remote_name / ctx.dataset.id


def _local_lock(ctx: Context) -> contextlib.AbstractContextManager[None]:
    """Two runs on this machine never work on the same dataset and remote at once."""
    return local_flock(
        ctx.workspace.state_dir / "locks" / ctx.remote_name / f"{ctx.dataset.id}.lock",
        f"another tether run on this machine is syncing {ctx.dataset.id!r} with {ctx.remote_name!r}",
    )


def _finish(
    ctx: Context,
    plan: Plan,
    record: audit.AuditRecord,
    verification: VerifyReport | None,
    audit_out: Path | None,
) -> SyncResult:
    for notice in getattr(ctx.remote, "notices", ()):  # a backend's warnings (e.g. a weaker lock)
        ctx.progress.message(notice)
    record.finished = time.time()
    if verification is not None:
        record.verification = verification.as_json()
    if record.operation != "diff":
        record.parts = audit.parts_of(ctx.profile, plan, record.done_changes, verification)
    log = None if record.state in ("dry-run", "diff-only") else ctx.workspace.audit_log
    audit.append(log, record, audit_out)
    return SyncResult(plan, record, verification, comparisons=ctx.comparisons)


# -- lock commands ------------------------------------------------------------------------------
def lock_status(target: str, remote: str, *, workspace: Workspace | Path | None = None) -> LockRecord | None:
    with open_context(target, remote, workspace=workspace) as ctx:
        return read_lock(ctx.remote, ctx.dataset.id)


def lock_break(
    target: str, remote: str, *, force: bool = False, workspace: Workspace | Path | None = None
) -> LockRecord | None:
    with open_context(target, remote, workspace=workspace) as ctx:
        return break_lock(ctx.remote, ctx.dataset.id, host=ctx.workspace.hostname, force=force)


__all__ = [
    "Context",
    "DiffResult",
    "SyncResult",
    "TetherError",
    "diff",
    "lock_break",
    "lock_status",
    "pull",
    "push",
]
