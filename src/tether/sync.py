"""The pipeline, one readable function per command:

    resolve -> scan both sides -> plan (pure) -> confirm -> lock + re-check -> execute
            -> verify -> record -> unlock -> audit

A plan with nothing to do stops before the lock. Under the lock the remote is looked at again
and a plan that went stale is refused, not applied.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tether import audit, faults
from tether.errors import (
    DatasetNotFound,
    Interrupted,
    LockHeld,
    RefusedError,
    StalePlanError,
    TetherError,
    VerificationError,
)
from tether.fileio import write_bytes_atomic
from tether.hashing import HashCache, hash_entries
from tether.lock import Lease, break_lock, clear_dead_lock, read_lock
from tether.lock import LockRecord as LockRecord
from tether.manifest import Entry, Manifest, ManifestFormatError
from tether.paths import check_relpath
from tether.plan import (
    Action,
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
from tether.progress import NO_PROGRESS, Progress
from tether.remotes import Remote, open_remote
from tether.scan import ScanReport, scan_tree
from tether.transfer import BatchResult, pull_changes, push_changes
from tether.verify import VerifyReport, raise_if_failed, verify_transfers
from tether.workspace import Dataset, Workspace

DEFAULT_JOBS = 8
HASH_THREADS = max(2, os.cpu_count() or 2)  # hashing is CPU work: one thread per core
Confirm = Callable[[Plan], bool]


def index_path(dataset_id: str) -> str:
    return f"{dataset_id}/.tether/index"


# -- resolve ------------------------------------------------------------------------------------
@dataclass
class Context:
    """Everything one command works on, resolved once."""

    workspace: Workspace
    dataset: Dataset
    remote_name: str
    remote: Remote
    progress: Progress = NO_PROGRESS
    jobs: int = DEFAULT_JOBS
    checksum: bool = False
    skip_symlinks: bool = False
    scan_report: ScanReport = field(default_factory=ScanReport)
    index_cache: tuple[bytes, Manifest] | None = None  # the remote index as last read and parsed

    @cached_property
    def keep(self) -> Callable[[str], bool]:
        """Ownership rules, applied to both sides: a file tether does not own locally (excluded,
        git-tracked) is not tether's to download, overwrite or delete remotely either."""
        return self.workspace.ownership(self.dataset)

    def close(self) -> None:
        self.remote.close()


@contextlib.contextmanager
def open_context(
    target: str,
    remote_name: str,
    *,
    workspace: Workspace | Path | None = None,
    dataset_id: str | None = None,
    progress: Progress = NO_PROGRESS,
    jobs: int | None = None,
    checksum: bool = False,
    skip_symlinks: bool = False,
) -> Iterator[Context]:
    ws = workspace if isinstance(workspace, Workspace) else Workspace.find(workspace)
    # A caller that names the workspace (the Python API) means ids and relative paths in it,
    # not in whatever folder the process happens to run in.
    dataset = ws.resolve(target, dataset_id=dataset_id, cwd=None if workspace is None else ws.root)
    remote = open_remote(ws.remote(remote_name), workspace_root=ws.root)
    try:
        remote.check()
    except BaseException:
        remote.close()  # an SSH master or helper must not outlive a failed check
        raise
    ctx = Context(
        ws,
        dataset,
        remote_name,
        remote,
        progress,
        jobs or remote.capabilities.parallel_connections,
        checksum,
        skip_symlinks,
    )
    try:
        yield ctx
    finally:
        ctx.close()


# -- scan both sides ----------------------------------------------------------------------------
def scan_local(ctx: Context) -> Manifest:
    ds = ctx.dataset
    ctx.progress.stage("scanning local")
    stats = scan_tree(
        ds.path,
        keep=ctx.keep,
        skip_symlinks=ctx.skip_symlinks,
        report=ctx.scan_report,
    )
    for link in ctx.scan_report.skipped_symlinks:
        ctx.progress.message(f"skipped symlink {link}")
    ctx.progress.stage("hashing local", files=len(stats), bytes=sum(s.size for s in stats))
    cache = HashCache(ctx.workspace.hash_cache_path)
    try:
        entries = hash_entries(
            ds.path,
            stats,
            cache,
            cache_prefix=f"{ds.path}/",
            jobs=HASH_THREADS,
            on_hashed=lambda f, b: ctx.progress.advance(files=f, bytes=b),
            force=ctx.checksum,
        )
    finally:
        cache.close()
    return Manifest(entries)


def read_index(ctx: Context) -> Manifest | None:
    try:
        data = ctx.remote.read_bytes(index_path(ctx.dataset.id))
    except FileNotFoundError:
        return None
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


@dataclass
class RemoteState:
    """What the remote holds, as planning sees it, plus what the next index must carry."""

    manifest: Manifest  # files tether owns here (ownership rules applied): the plan's input
    exists: bool  # the remote has this dataset at all (files or an index)
    index_current: bool  # the stored index already vouches for exactly this state
    unowned: list[Entry]  # entries of files our rules leave alone, kept in the next index

    def index(self) -> Manifest:
        return Manifest.from_entries(self.manifest.entries + self.unowned)


def scan_remote(ctx: Context, *, fresh: dict[str, Entry] | None = None) -> RemoteState:
    """The remote's real state: its listing, with digests from the index where it vouches.

    The index is a cache, never the truth: a file listed with a size or mtime the index does not
    know (edited, replaced, lost) is hashed where it lives, so a remote that lost or changed
    files is never trusted blindly. ``fresh`` holds entries this run just wrote and verified;
    they vouch only for a file with exactly the size and mtime this run gave it.
    """
    ctx.progress.stage("listing remote")
    listing = list(ctx.remote.list_files(ctx.dataset.id))
    index = read_index(ctx)
    known = index.by_path() if index else {}
    fresh = fresh or {}
    # Where the backend keeps the mtime we set (local, SSH), a fresh upload vouches only for a file
    # with exactly that mtime; object stores stamp their own time, so there size must do.
    exact_mtime = ctx.remote.capabilities.preserves_mtime
    entries: list[Entry] = []
    unowned: list[Entry] = []
    unknown = []
    for st in listing:
        check_relpath(st.path, what="remote path")  # invariant 5, before any I/O with it
        old = known.get(st.path)
        vouched = old is not None and (old.size, old.mtime_ns) == (st.size, st.mtime_ns)
        if not ctx.keep(st.path):
            if vouched:
                unowned.append(old)  # type: ignore[arg-type]
            continue
        new = fresh.get(st.path)
        if new is not None and new.size == st.size and (not exact_mtime or new.mtime_ns == st.mtime_ns):
            entries.append(Entry(st.path, st.size, st.mtime_ns, new.digest))
        elif vouched and not ctx.checksum:
            entries.append(old)  # type: ignore[arg-type]
        else:
            unknown.append(st)
    if unknown:
        ctx.progress.stage("hashing remote", files=len(unknown), bytes=sum(s.size for s in unknown))
        digests = ctx.remote.hash_files(
            (f"{ctx.dataset.id}/{s.path}" for s in unknown), use_cache=not ctx.checksum
        )
        for st in unknown:
            entries.append(Entry(st.path, st.size, st.mtime_ns, digests[f"{ctx.dataset.id}/{st.path}"]))
            ctx.progress.advance(files=1, bytes=st.size)
    manifest = Manifest.from_entries(entries)
    current = index is not None and index.entries == Manifest.from_entries(entries + unowned).entries
    return RemoteState(manifest, bool(listing) or index is not None, current, unowned)


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
    new = Manifest(list(agreed_base(local, remote, old_base)))
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

    @property
    def in_sync(self) -> bool:
        return self.push.in_sync


@dataclass
class SyncResult:
    plan: Plan
    record: audit.AuditRecord
    verification: VerifyReport | None = None
    refusal: RefusedError | None = None  # a dry run shows the plan, then why a real run would stop

    @property
    def state(self) -> str:
        return self.record.state


# -- commands -----------------------------------------------------------------------------------
def diff(
    target: str,
    remote: str,
    *,
    workspace: Workspace | Path | None = None,
    dataset_id: str | None = None,
    progress: Progress = NO_PROGRESS,
    checksum: bool = False,
    skip_symlinks: bool = False,
    mode: Mode = Mode.UPDATE,
) -> DiffResult:
    """What push and pull would do, without changing anything."""
    with open_context(
        target,
        remote,
        workspace=workspace,
        dataset_id=dataset_id,
        progress=progress,
        checksum=checksum,
        skip_symlinks=skip_symlinks,
    ) as ctx:
        local_exists = ctx.dataset.path.is_dir()
        local = scan_local(ctx)
        remote_state = scan_remote(ctx)
        remote_m, remote_exists = remote_state.manifest, remote_state.exists
        if not local_exists and not remote_exists:
            raise _missing_everywhere(ctx)
        base = load_base(ctx)
        push_plan = make_plan(local, remote_m, base, PlanOptions(direction=Direction.PUSH, mode=mode))
        pull_plan = replan(push_plan, PlanOptions(direction=Direction.PULL, mode=mode))
        return DiffResult(
            ctx.dataset,
            ctx.remote_name,
            ctx.remote.url,
            push_plan,
            pull_plan,
            local_exists,
            remote_exists,
        )


def _missing_everywhere(ctx: Context) -> DatasetNotFound:
    return DatasetNotFound(
        f"dataset {ctx.dataset.id!r} exists neither locally ({ctx.dataset.path}) nor on remote "
        f"{ctx.remote_name!r} ({ctx.remote.url}/{ctx.dataset.id})"
    )


def push(
    target: str,
    remote: str,
    *,
    workspace: Workspace | Path | None = None,
    dataset_id: str | None = None,
    mode: Mode | str = Mode.UPDATE,
    prefer: Side | str | None = None,
    max_delete: MaxDelete | str | None = None,
    jobs: int | None = None,
    dry_run: bool = False,
    confirm: Confirm | None = None,
    progress: Progress = NO_PROGRESS,
    checksum: bool = False,
    skip_symlinks: bool = False,
    audit_out: Path | None = None,
) -> SyncResult:
    """Make the remote hold the local dataset's changes (see the planner for the rules)."""
    return _run(
        Direction.PUSH,
        target,
        remote,
        workspace=workspace,
        dataset_id=dataset_id,
        mode=mode,
        prefer=prefer,
        max_delete=max_delete,
        jobs=jobs,
        dry_run=dry_run,
        confirm=confirm,
        progress=progress,
        checksum=checksum,
        skip_symlinks=skip_symlinks,
        audit_out=audit_out,
    )


def pull(
    target: str,
    remote: str,
    *,
    workspace: Workspace | Path | None = None,
    dataset_id: str | None = None,
    mode: Mode | str = Mode.UPDATE,
    prefer: Side | str | None = None,
    max_delete: MaxDelete | str | None = None,
    jobs: int | None = None,
    dry_run: bool = False,
    confirm: Confirm | None = None,
    progress: Progress = NO_PROGRESS,
    checksum: bool = False,
    skip_symlinks: bool = False,
    audit_out: Path | None = None,
) -> SyncResult:
    """Bring the remote's changes into the local dataset, staged and verified before promotion."""
    return _run(
        Direction.PULL,
        target,
        remote,
        workspace=workspace,
        dataset_id=dataset_id,
        mode=mode,
        prefer=prefer,
        max_delete=max_delete,
        jobs=jobs,
        dry_run=dry_run,
        confirm=confirm,
        progress=progress,
        checksum=checksum,
        skip_symlinks=skip_symlinks,
        audit_out=audit_out,
    )


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


def _run(
    direction: Direction,
    target: str,
    remote: str,
    *,
    workspace: Workspace | Path | None,
    dataset_id: str | None,
    mode: Mode | str,
    prefer: Side | str | None,
    max_delete: MaxDelete | str | None,
    jobs: int | None,
    dry_run: bool,
    confirm: Confirm | None,
    progress: Progress,
    checksum: bool,
    skip_symlinks: bool,
    audit_out: Path | None,
) -> SyncResult:
    options = _options(direction, mode, prefer, max_delete)
    started = time.time()
    with open_context(
        target,
        remote,
        workspace=workspace,
        dataset_id=dataset_id,
        progress=progress,
        jobs=jobs,
        checksum=checksum,
        skip_symlinks=skip_symlinks,
    ) as ctx:
        record = audit.AuditRecord(
            operation=direction.value,
            dataset=ctx.dataset.id,
            remote=ctx.remote_name,
            remote_url=ctx.remote.url,
            mode=options.mode.value,
            state="no-op",
            started=started,
            finished=started,
        )
        # -- scan both sides, plan
        local_exists = ctx.dataset.path.is_dir()
        if direction == Direction.PUSH and not local_exists:
            raise DatasetNotFound(f"no local dataset {ctx.dataset.id!r} at {ctx.dataset.path}")
        local = scan_local(ctx)
        remote_state = scan_remote(ctx)
        remote_m, remote_exists = remote_state.manifest, remote_state.exists
        if direction == Direction.PULL and not remote_exists:
            if not local_exists:
                raise _missing_everywhere(ctx)
            ctx.progress.message(
                f"remote {ctx.remote_name!r} has no copy of {ctx.dataset.id!r}; nothing to pull"
            )
            return _finish(ctx, Plan(options), record, None, audit_out)
        base = load_base(ctx)
        plan = make_plan(local, remote_m, base, options)
        record.unchanged = plan.unchanged_files
        record.skipped = len(plan.with_action(Action.SKIP))
        record.skipped_symlinks = list(ctx.scan_report.skipped_symlinks)
        try:
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
            _finish_killed_run(ctx, direction, remote_state)
            return _finish(ctx, plan, record, None, audit_out)
        if dry_run:
            record.state = "dry-run"
            return _finish(ctx, plan, record, None, audit_out)
        if confirm is not None and not confirm(plan):
            raise Interrupted("Declined; nothing was changed.")

        # -- lock + re-check
        with (
            _local_lock(ctx),
            Lease(
                ctx.remote, ctx.dataset.id, operation=direction.value, host=ctx.workspace.hostname
            ) as lease,
        ):
            remote_now = scan_remote(ctx).manifest
            changed = remote_now.entries != remote_m.entries
            if changed and make_plan(local, remote_now, base, options).fingerprint() != plan.fingerprint():
                raise StalePlanError(f"the remote copy of {ctx.dataset.id!r} changed after the plan was made")
            ctx.remote.cleanup_temp(ctx.dataset.id)
            faults.checkpoint("locked")
            # -- execute, verify, record
            try:
                if direction == Direction.PUSH:
                    result, verification = _execute_push(ctx, plan, local, base, lease)
                else:
                    result, verification = _execute_pull(ctx, plan, remote_now, base)
            except TetherError as exc:
                record.state = "failed"
                record.error = exc.message
                _finish(ctx, plan, record, None, audit_out)
                raise
        # -- audit (what was actually done, measured after the transfer)
        _record_outcome(record, result, verification)
        finished = _finish(ctx, plan, record, verification, audit_out)
        result.raise_first()
        raise_if_failed(verification)
        return finished


def _record_outcome(record: audit.AuditRecord, result: BatchResult, verification: VerifyReport) -> None:
    record.state = "transferred"
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
    ctx: Context, plan: Plan, local: Manifest, base: Manifest, lease: Lease
) -> tuple[BatchResult, VerifyReport]:
    try:
        result = push_changes(
            ctx.remote,
            ctx.dataset.id,
            ctx.dataset.path,
            plan.changes,
            jobs=ctx.jobs,
            progress=ctx.progress,
        )
    finally:
        # Whatever landed is durable before the index that lists it (invariants 1 and 2).
        ctx.remote.flush()
    faults.checkpoint("before_index")
    fresh = {c.path: c.local for c in result.done if c.action == Action.UPLOAD and c.local}
    after = scan_remote(ctx, fresh=fresh)
    remote_after = after.manifest
    lease.ensure_held()
    ctx.remote.write_bytes_atomic(index_path(ctx.dataset.id), after.index().dumps(dataset=ctx.dataset.id))
    faults.checkpoint("before_base")
    save_base(ctx, local, remote_after, base)
    return result, verify_transfers(result.done, local, remote_after)


def _execute_pull(
    ctx: Context, plan: Plan, remote_m: Manifest, base: Manifest
) -> tuple[BatchResult, VerifyReport]:
    staging = _staging_dir(ctx)
    ctx.dataset.path.mkdir(parents=True, exist_ok=True)
    result = pull_changes(
        ctx.remote,
        ctx.dataset.id,
        ctx.dataset.path,
        staging,
        plan.changes,
        jobs=ctx.jobs,
        progress=ctx.progress,
    )
    _remember_digests(ctx, result)
    faults.checkpoint("before_base")
    local_after = scan_local(ctx)
    save_base(ctx, local_after, remote_m, base)
    return result, verify_transfers(result.done, local_after, remote_m)


def _remember_digests(ctx: Context, result: BatchResult) -> None:
    """Promoted files were hashed on arrival: seed the cache so the next scan never rereads them."""
    cache = HashCache(ctx.workspace.hash_cache_path)
    try:
        for change in result.done:
            if change.action != Action.DOWNLOAD or change.remote is None:
                continue
            path = ctx.dataset.path / change.path
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            cache.put(
                f"{ctx.dataset.path}/{change.path}",
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                change.remote.digest,
                ctime_ns=st.st_ctime_ns,
            )
    finally:
        cache.close()


def _finish_killed_run(ctx: Context, direction: Direction, remote_state: RemoteState) -> None:
    """Nothing to transfer, but a killed run may have left work behind (invariant 7).

    A push killed after its data landed left the index behind the data: write it now (under
    the lock, which also takes over the dead run's record). Otherwise drop a lock record of a
    dead run on this machine, and staged files no plan needs any more. A fully clean no-op
    takes no lock and writes nothing on the remote.
    """
    if direction == Direction.PUSH and remote_state.exists and not remote_state.index_current:
        with Lease(ctx.remote, ctx.dataset.id, operation="push", host=ctx.workspace.hostname) as lease:
            state = scan_remote(ctx)
            lease.ensure_held()
            ctx.remote.write_bytes_atomic(
                index_path(ctx.dataset.id), state.index().dumps(dataset=ctx.dataset.id)
            )
        ctx.progress.message("the remote index was behind its files (an interrupted run); rewrote it")
        return
    clear_dead_lock(ctx.remote, ctx.dataset.id, host=ctx.workspace.hostname)
    shutil.rmtree(_staging_dir(ctx), ignore_errors=True)


def _staging_dir(ctx: Context) -> Path:
    return ctx.workspace.staging_dir / ctx.remote_name / ctx.dataset.id


@contextlib.contextmanager
def _local_lock(ctx: Context) -> Iterator[None]:
    """Two runs on this machine never work on the same dataset and remote at once."""
    path = ctx.workspace.state_dir / "locks" / ctx.remote_name / f"{ctx.dataset.id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(
                f"another tether run on this machine is syncing {ctx.dataset.id!r} with {ctx.remote_name!r}",
                hint="Wait for it to finish.",
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    log = None if record.state == "dry-run" else ctx.workspace.audit_log
    audit.append(log, record, audit_out)
    return SyncResult(plan, record, verification)


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
