"""CLI commands for versioned (content-addressed) remotes.

``cli.py`` hands over here in three places: ``push``/``pull`` when the remote's layout is
``versioned``, ``diff TARGET REV1 REV2`` (two git revisions), and ``diff TARGET REMOTE`` against
a versioned remote. ``register`` adds the commands that only versioned remotes have: commit,
fetch, checkout, log, gc, verify. The work lives in :mod:`tether.versioned`; this module parses
arguments, renders results and raises the errors that decide the exit code.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tether.config import RemoteConfig
from tether.errors import DatasetNotFound, RefusedError, UsageError, VerificationError
from tether.fileio import syncfs
from tether.lock import local_flock
from tether.manifest import Entry
from tether.progress import Progress
from tether.remotes import Remote, open_remote
from tether.versioned import gitrev, lockfile
from tether.versioned.cache import Cache, cache_dir
from tether.versioned.checkout import CheckoutPlan, apply_checkout, parse_links, plan_checkout
from tether.versioned.gc import (
    DAY_S,
    GcPlan,
    Scope,
    cutoff_for,
    kept_from_git,
    list_object_stats,
    list_snapshot_records,
    live_pushes,
    plan_gc,
    sweep,
    write_gc_state,
)
from tether.versioned.layout import GC_LOCK_ID, Snapshot, SnapshotFormatError, changes
from tether.versioned.localscan import remember_digests, scan_dataset
from tether.versioned.lockfile import LockEntry
from tether.versioned.scrub import scrub
from tether.versioned.store import (
    Inventory,
    download_objects,
    fetch_objects,
    latest_remote_snapshot,
    list_remote_snapshots,
    load_snapshot,
    plan_push,
    push_snapshot,
    read_remote_snapshot,
)
from tether.workspace import Dataset, Workspace

if TYPE_CHECKING:
    from tether.cli import State

MAX_LISTED = 40


def is_versioned(remote_name: str) -> bool:
    """True when REMOTE is configured with ``layout = "versioned"``."""
    return Workspace.find().remote(remote_name).layout == "versioned"


# -- shared plumbing ------------------------------------------------------------------------------
@dataclass
class _Env:
    ws: Workspace
    dataset: Dataset
    cache: Cache


def _env(target: str, dataset_id: str | None = None) -> _Env:
    ws = Workspace.find()
    dataset = ws.resolve(target, dataset_id=dataset_id)
    return _Env(ws, dataset, Cache(cache_dir(ws.root, ws.settings.raw)))


def _versioned_config(ws: Workspace, remote_name: str) -> RemoteConfig:
    cfg = ws.remote(remote_name)
    if cfg.layout != "versioned":
        raise UsageError(
            f"remote {remote_name!r} is a mirror remote; this command needs a versioned one",
            hint="Add one with `tether remote add NAME URL --layout versioned`.",
        )
    return cfg


@contextlib.contextmanager
def _open(ws: Workspace, remote_name: str) -> Iterator[Remote]:
    cfg = _versioned_config(ws, remote_name)
    remote = open_remote(cfg, workspace_root=ws.root)  # open_remote keeps `layout` from the backend
    try:
        remote.check()
        yield remote
    finally:
        remote.close()


def _local_lock(env: _Env) -> contextlib.AbstractContextManager[None]:
    """Two runs on this machine never change the same dataset folder at once."""
    return local_flock(
        env.ws.state_dir / "locks" / "versioned" / f"{env.dataset.id}.lock",
        f"another tether run on this machine is working on {env.dataset.id!r}",
    )


def _say(text: str) -> None:
    from tether import cli

    cli.out.print(text, markup=False, highlight=False)


def _progress(state: State, as_json: bool) -> Progress:
    from tether import cli

    return cli._progress(state, as_json)


def _emit(data: dict[str, Any]) -> None:
    from tether import cli

    cli._emit_json(data)


def _hb(n: int) -> str:
    from tether.report import human_bytes

    return human_bytes(n)


def _short(sid: str | None) -> str:
    return sid[:12] if sid else "-"


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S%z")


def _author(ws: Workspace) -> str:
    return gitrev.user_name(ws.root) or os.environ.get("USER") or getpass.getuser()


def _lock_entry(env: _Env, rev: str | None) -> tuple[LockEntry | None, str]:
    """The lock entry for the dataset in the working tree (rev None) or at a git revision."""
    if rev is None:
        return lockfile.read(env.ws.root).get(env.dataset.id), "tether.lock"
    commit = gitrev.rev_parse(env.ws.root, rev)
    entries = lockfile.read_at(env.ws.root, [commit])[commit]
    return entries.get(env.dataset.id), f"tether.lock at {rev} ({commit[:12]})"


def _no_entry(env: _Env, where: str) -> UsageError:
    return UsageError(
        f"{where} names no snapshot of {env.dataset.id!r}",
        hint="Record one with `tether commit TARGET` (and commit tether.lock with git).",
    )


def _scan(
    env: _Env, *, skip_symlinks: bool = False, checksum: bool = False, progress: Progress
) -> list[Entry]:
    return scan_dataset(
        env.ws, env.dataset, env.cache, skip_symlinks=skip_symlinks, checksum=checksum, progress=progress
    )


def _local_snapshot(env: _Env, entries: list[Entry], parent: str | None, message: str = "") -> Snapshot:
    return Snapshot.create(
        env.dataset.id,
        entries,
        parent=parent,
        author=_author(env.ws),
        host=env.ws.hostname,
        time=time.time(),
        message=message,
    )


def _snapshot_json(snap: Snapshot) -> dict[str, Any]:
    return {
        "id": snap.id,
        "dataset": snap.dataset,
        "parent": snap.parent,
        "author": snap.author,
        "host": snap.host,
        "time": snap.time,
        "message": snap.message,
        "files": snap.files,
        "bytes": snap.bytes,
        "content_digest": snap.digest,
    }


def _refuse_mirror_options(direction: str, options: dict[str, Any]) -> None:
    mirror_only = {
        "--mode": options.get("mode") not in (None, "update"),
        "--max-delete": options.get("max_delete") not in (None, "50%"),
        "--prefer": options.get("prefer") is not None,
        "--audit-json-out": options.get("audit_json_out") is not None,
    }
    used = [name for name, set_ in mirror_only.items() if set_]
    if used:
        raise UsageError(
            f"{', '.join(used)} only applies to mirror remotes; {direction} to a versioned remote "
            "moves whole snapshots",
            hint="Drop the option. A versioned push never overwrites or deletes; a pull refuses to "
            "overwrite uncommitted changes (use `tether checkout --force` to discard them).",
        )


def _list_paths(title: str, paths: list[str], show_all: bool) -> None:
    if not paths:
        return
    _say(f"{title} ({len(paths)}):")
    shown = paths if show_all else paths[:MAX_LISTED]
    for p in shown:
        _say(f"  {p}")
    if len(paths) > len(shown):
        _say(f"  … and {len(paths) - len(shown)} more (--all lists every one)")


# -- commit ---------------------------------------------------------------------------------------
def _commit(
    env: _Env, message: str, *, skip_symlinks: bool, checksum: bool, progress: Progress
) -> tuple[Snapshot | None, LockEntry, bool]:
    """(snapshot, lock entry, created). Idempotent: the same state twice records nothing new."""
    if not env.dataset.path.is_dir():
        raise DatasetNotFound(f"no local dataset {env.dataset.id!r} at {env.dataset.path}")
    entries = _scan(env, skip_symlinks=skip_symlinks, checksum=checksum, progress=progress)
    progress.close()
    lock = lockfile.read(env.ws.root)
    current = lock.get(env.dataset.id)
    snap = _local_snapshot(env, entries, current.snapshot if current else None, message)
    if current is not None and current.digest == snap.digest:  # the content digest: mtimes aside
        return env.cache.get_snapshot(env.dataset.id, current.snapshot), current, False
    env.cache.put_snapshot(snap)
    lock[env.dataset.id] = LockEntry.of(snap)
    lockfile.write(env.ws.root, lock)
    return snap, lock[env.dataset.id], True


def commit_command(
    state: State,
    target: str,
    message: str,
    dataset_id: str | None,
    skip_symlinks: bool,
    checksum: bool,
    as_json: bool,
) -> None:
    env = _env(target, dataset_id)
    progress = _progress(state, as_json)
    try:
        with _local_lock(env):
            snap, entry, created = _commit(
                env, message, skip_symlinks=skip_symlinks, checksum=checksum, progress=progress
            )
    finally:
        progress.close()
    if as_json:
        _emit(
            {
                "dataset": env.dataset.id,
                "created": created,
                "snapshot": entry.snapshot,
                "files": entry.files,
                "bytes": entry.bytes,
                "parent": snap.parent if snap else None,
            }
        )
        return
    if not created:
        _say(
            f"Nothing to commit: {env.dataset.id} is at snapshot {_short(entry.snapshot)} "
            f"({entry.files} files)."
        )
        return
    assert snap is not None
    delta = changes(env.cache.get_snapshot(env.dataset.id, snap.parent) if snap.parent else None, snap)
    _say(
        f"Committed {env.dataset.id} as snapshot {_short(snap.id)}: {snap.files} files, {_hb(snap.bytes)} "
        f"(+{len(delta['added'])} ~{len(delta['modified'])} -{len(delta['deleted'])} vs "
        f"{_short(snap.parent) if snap.parent else 'nothing'})."
    )
    _say("Recorded in tether.lock: commit it with git, and `tether push` the data.")


# -- push / pull ----------------------------------------------------------------------------------
def sync_command(direction: str, state: State, target: str, remote_name: str, **options: Any) -> None:
    _refuse_mirror_options(direction, options)
    env = _env(target, options.get("dataset_id"))
    if direction == "push":
        _push(state, env, remote_name, options)
    else:
        _pull(state, env, remote_name, options)


def _push(state: State, env: _Env, remote_name: str, options: dict[str, Any]) -> None:
    as_json = bool(options.get("as_json"))
    entry, where = _lock_entry(env, None)
    if entry is None:
        raise _no_entry(env, where)
    progress = _progress(state, as_json)
    try:
        with _open(env.ws, remote_name) as remote, _local_lock(env):
            snap = load_snapshot(env.cache, remote, env.dataset.id, entry.snapshot)
            if snap is None:
                raise RefusedError(
                    f"snapshot {_short(entry.snapshot)} of {env.dataset.id!r} is neither in the local cache "
                    f"nor on {remote_name!r}",
                    hint="It was committed elsewhere and not pushed: push it from there, or commit "
                    "this workspace's data with `tether commit TARGET`.",
                )
            # No scan of the dataset: an object the cache lacks is read from the path the snapshot
            # gives it, and the backend's digest check refuses bytes that changed since the commit.
            # Paths are joined only for the objects sent: 20,000 Path objects cost 50 ms.
            by_digest = {e.digest: e.path for e in snap.entries}
            cached = env.cache.which_have(by_digest.keys())

            def source_for(digest: str) -> Path | None:
                if digest in cached:
                    return env.cache.object_file(digest)
                rel = by_digest.get(digest)
                return None if rel is None else env.dataset.path / rel

            inv = Inventory.load(env.ws.state_dir, remote.url)
            trust = not options.get("checksum")
            if options.get("dry_run"):
                missing, _lookup = plan_push(remote, snap, inv, trust_inventory=trust)
                inv.save()
                sizes = {e.digest: e.size for e in snap.entries}
                progress.close()
                _push_summary(
                    env,
                    remote_name,
                    snap,
                    len(missing),
                    sum(sizes[d] for d in missing),
                    None,
                    as_json,
                )
                return
            report = push_snapshot(
                remote,
                snap,
                inv,
                source_for,
                host=env.ws.hostname,
                jobs=options.get("jobs") or remote.capabilities.parallel_connections,
                trust_inventory=trust,
                progress=progress,
            )
    finally:
        progress.close()
    _push_summary(env, remote_name, snap, report.uploaded, report.uploaded_bytes, report, as_json)


def _push_summary(
    env: _Env,
    remote_name: str,
    snap: Snapshot,
    n: int,
    size: int,
    report: Any,
    as_json: bool,
) -> None:
    if as_json:
        data: dict[str, Any] = {
            "dataset": env.dataset.id,
            "remote": remote_name,
            "direction": "push",
            "state": "dry-run"
            if report is None
            else ("transferred" if n or report.snapshot_written else "no-op"),
            "snapshot": _snapshot_json(snap),
            "objects": {"needed": len(snap.digests()), "upload": n, "upload_bytes": size},
        }
        if report is not None:
            data["snapshot_written"] = report.snapshot_written
            data["listing"] = {"folders": report.listed_folders, "full": report.full_listing}
        _emit(data)
        return
    if report is None:
        _say(
            f"push plan: snapshot {_short(snap.id)} of {env.dataset.id} to {remote_name}: "
            f"{n} of {len(snap.digests())} objects to upload ({_hb(size)})"
        )
    elif n == 0 and not report.snapshot_written:
        _say(f"Already up to date: snapshot {_short(snap.id)} of {env.dataset.id} is on {remote_name}.")
    else:
        how = "whole listing" if report.full_listing else f"{report.listed_folders} folder listing(s)"
        _say(
            f"Pushed snapshot {_short(snap.id)} of {env.dataset.id} to {remote_name}: uploaded {n} of "
            f"{len(snap.digests())} objects ({_hb(size)}); {how}."
        )
        if report.repaired_after_gc:
            _say(f"A gc ran meanwhile: re-uploaded {report.repaired_after_gc} object(s) it had removed.")


def _pull(state: State, env: _Env, remote_name: str, options: dict[str, Any]) -> None:
    as_json = bool(options.get("as_json"))
    entry, _where = _lock_entry(env, None)
    progress = _progress(state, as_json)
    try:
        with _open(env.ws, remote_name) as remote, _local_lock(env):
            if entry is not None:
                snap = load_snapshot(env.cache, remote, env.dataset.id, entry.snapshot)
                if snap is None:
                    raise DatasetNotFound(
                        f"snapshot {_short(entry.snapshot)} (named by tether.lock) of {env.dataset.id!r} "
                        f"is not on {remote_name!r}",
                        hint="Push it from the workspace that committed it.",
                    )
                which = f"snapshot {_short(snap.id)} named by tether.lock"
            else:
                latest = latest_remote_snapshot(remote, env.cache, env.dataset.id)
                if latest is None:
                    raise DatasetNotFound(f"{remote_name!r} has no snapshot of {env.dataset.id!r}")
                snap = latest
                which = f"the remote's latest snapshot {_short(snap.id)} (tether.lock has no entry for it)"
            plan = _plan_checkout(env, snap, options, progress)
            if options.get("dry_run"):
                progress.close()
                _checkout_summary(env, snap, plan, None, which, as_json, options, dry_run=True)
                return
            if plan.unsafe:
                raise RefusedError(
                    f"pull would overwrite or delete {len(plan.unsafe)} uncommitted local change(s)",
                    paths=plan.unsafe,
                    hint="Commit them (`tether commit TARGET`) or discard them with "
                    "`tether checkout TARGET --force` after `tether fetch`.",
                )
            jobs = options.get("jobs") or remote.capabilities.downloads

            staging = env.ws.staging_dir / "versioned" / env.dataset.id

            def download(dests: dict[str, Path], sizes: dict[str, int]) -> None:
                download_objects(
                    remote, dests, sizes, jobs=jobs, progress=progress, flush_behind=lambda: syncfs(staging)
                )

            result = apply_checkout(
                env.dataset.path,
                plan,
                env.cache,
                links=parse_links(None),
                force=False,
                progress=progress,
                download=download,
                staging=staging,
            )
            remember_digests(env.ws, env.dataset, result.written)
            if entry is None:
                lock = lockfile.read(env.ws.root)
                lock[env.dataset.id] = LockEntry.of(snap)
                lockfile.write(env.ws.root, lock)
    finally:
        progress.close()
    _checkout_summary(env, snap, plan, result.links, which, as_json, options)
    if entry is None and not as_json:
        _say("Recorded it in tether.lock.")


def _plan_checkout(env: _Env, snap: Snapshot, options: dict[str, Any], progress: Progress) -> CheckoutPlan:
    local = _scan(
        env,
        skip_symlinks=bool(options.get("skip_symlinks")),
        checksum=bool(options.get("checksum")),
        progress=progress,
    )
    current = lockfile.read(env.ws.root).get(env.dataset.id)
    named: Snapshot | None = None
    if current is not None:
        # Usually the snapshot being checked out: parsing it again cost 0.1 s per 20,000 files.
        same = current.snapshot == snap.id
        named = snap if same else env.cache.get_snapshot(env.dataset.id, current.snapshot)
    by_path = named.by_path() if named else {}
    others: set[str] | None = None

    def committed(e: Entry) -> bool:
        """Recorded by the snapshot tether.lock names, or by any snapshot of the dataset in the
        cache (e.g. committed on another git branch): such bytes are kept, never lost."""
        nonlocal others
        if e.path in by_path and by_path[e.path].digest == e.digest:
            return True
        if others is None:
            others = env.cache.dataset_digests(env.dataset.id)
        return e.digest in others

    return plan_checkout(local, snap, committed, env.cache.has, keep=env.ws.ownership(env.dataset))


def _checkout_summary(
    env: _Env,
    snap: Snapshot,
    plan: CheckoutPlan,
    links: dict[str, int] | None,
    which: str,
    as_json: bool,
    options: dict[str, Any],
    *,
    dry_run: bool = False,
) -> None:
    counts = plan.counts()
    if as_json:
        _emit(
            {
                "dataset": env.dataset.id,
                "direction": "pull",
                "state": "dry-run" if dry_run else ("transferred" if plan.has_work else "no-op"),
                "snapshot": _snapshot_json(snap),
                "source": which,
                "files": counts,
                "unchanged": plan.unchanged,
                "unsafe": plan.unsafe,
                "links": links or {},
            }
        )
        return
    if not plan.has_work:
        _say(f"Already up to date: {env.dataset.id} matches {which}.")
        return
    verb = "would" if dry_run else "did"
    _say(
        f"{env.dataset.id} <- {which}: {verb} create {counts['create']}, replace {counts['replace']}, "
        f"delete {counts['delete']}; {plan.unchanged} unchanged"
        + (f" (links: {', '.join(f'{k} {v}' for k, v in sorted(links.items()))})" if links else "")
    )
    if dry_run:
        _list_paths(
            "uncommitted changes it would refuse to touch", plan.unsafe, bool(options.get("show_all"))
        )


# -- fetch ----------------------------------------------------------------------------------------
def _snapshot_ids(
    env: _Env, rev: str | None, branches: bool, tags: bool, commits: bool
) -> tuple[set[str], int]:
    """Snapshot ids of the dataset at the requested revisions, and how many revisions had none."""
    root = env.ws.root
    revs: list[str] = []
    if branches:
        revs += gitrev.branch_tips(root)
    if tags:
        revs += gitrev.tag_commits(root)
    if commits:
        revs += gitrev.all_commits(root)
    if rev is not None:
        revs.append(gitrev.rev_parse(root, rev))
    if not revs:
        entry, where = _lock_entry(env, None)
        if entry is None:
            raise _no_entry(env, where)
        return {entry.snapshot}, 0
    found: set[str] = set()
    without = 0
    for entries in lockfile.read_at(root, revs).values():
        e = entries.get(env.dataset.id)
        if e is None:
            without += 1
        else:
            found.add(e.snapshot)
    if not found:
        raise _no_entry(env, "tether.lock at the requested revision(s)")
    return found, without


def fetch_command(
    state: State,
    target: str,
    remote_name: str,
    rev: str | None,
    all_branches: bool,
    all_tags: bool,
    all_commits: bool,
    jobs: int | None,
    dataset_id: str | None,
    as_json: bool,
) -> None:
    env = _env(target, dataset_id)
    _versioned_config(env.ws, remote_name)
    sids, without = _snapshot_ids(env, rev, all_branches, all_tags, all_commits)
    progress = _progress(state, as_json)
    absent: list[str] = []
    try:
        with _open(env.ws, remote_name) as remote:
            sizes: dict[str, int] = {}
            for sid in sorted(sids):
                snap = load_snapshot(env.cache, remote, env.dataset.id, sid)
                if snap is None:
                    absent.append(sid)
                    continue
                sizes.update({e.digest: e.size for e in snap.entries})
            single = len(sids) == 1
            if absent and single:
                raise DatasetNotFound(
                    f"snapshot {_short(absent[0])} of {env.dataset.id!r} is not on {remote_name!r}",
                    hint="Push it from the workspace that committed it.",
                )
            report = fetch_objects(
                remote,
                env.cache,
                sizes,
                jobs=jobs or remote.capabilities.downloads,
                progress=progress,
            )
    finally:
        progress.close()
    if as_json:
        _emit(
            {
                "dataset": env.dataset.id,
                "remote": remote_name,
                "snapshots": sorted(sids),
                "absent_on_remote": absent,
                "revisions_without_entry": without,
                "objects": {
                    "needed": report.needed,
                    "cached": report.cached,
                    "downloaded": report.downloaded,
                    "downloaded_bytes": report.downloaded_bytes,
                },
            }
        )
        return
    _say(
        f"Fetched {len(sids) - len(absent)} snapshot(s) of {env.dataset.id} from {remote_name}: downloaded "
        f"{report.downloaded} object(s) ({_hb(report.downloaded_bytes)}), {report.cached} already cached."
    )
    for sid in absent:
        _say(f"warning: snapshot {_short(sid)} is not on {remote_name} (never pushed, or garbage-collected)")


# -- checkout -------------------------------------------------------------------------------------
def checkout_command(
    state: State,
    target: str,
    rev: str | None,
    link: str | None,
    force: bool,
    dry_run: bool,
    dataset_id: str | None,
    skip_symlinks: bool,
    as_json: bool,
    show_all: bool,
) -> None:
    links = parse_links(link)
    env = _env(target, dataset_id)
    entry, where = _lock_entry(env, rev)
    if entry is None:
        raise _no_entry(env, where)
    snap = env.cache.get_snapshot(env.dataset.id, entry.snapshot)
    if snap is None:
        raise RefusedError(
            f"snapshot {_short(entry.snapshot)} ({where}) is not in the cache",
            hint="Fetch it first: `tether fetch TARGET REMOTE"
            + (f" --rev {rev}`" if rev else "`")
            + " (or `tether pull`).",
        )
    options = {"skip_symlinks": skip_symlinks, "show_all": show_all}
    progress = _progress(state, as_json)
    result = None
    try:
        with _local_lock(env):
            plan = _plan_checkout(env, snap, options, progress)
            if not dry_run:
                result = apply_checkout(
                    env.dataset.path, plan, env.cache, links=links, force=force, progress=progress
                )
                remember_digests(env.ws, env.dataset, result.written)
    finally:
        progress.close()
    which = f"snapshot {_short(snap.id)} from {where}"
    _checkout_summary(
        env, snap, plan, result.links if result else None, which, as_json, options, dry_run=dry_run
    )
    if plan.unsafe and force and not dry_run and not as_json:
        _say(f"--force: discarded {len(plan.unsafe)} uncommitted change(s).")


# -- log ------------------------------------------------------------------------------------------
def log_command(
    state: State,
    target: str,
    remote_name: str | None,
    max_count: int | None,
    dataset_id: str | None,
    as_json: bool,
) -> None:
    env = _env(target, dataset_id)
    current = lockfile.read(env.ws.root).get(env.dataset.id)
    snaps: dict[str, Snapshot] = {}
    if remote_name is not None:
        with _open(env.ws, remote_name) as remote:
            for sid in list_remote_snapshots(remote, env.dataset.id):
                snap = load_snapshot(env.cache, remote, env.dataset.id, sid)
                if snap is not None:
                    snaps[sid] = snap
        ordered = sorted(snaps.values(), key=lambda s: (s.time, s.id), reverse=True)
    else:
        sid = current.snapshot if current else None
        ordered = []
        while sid is not None and sid not in snaps:
            snap = env.cache.get_snapshot(env.dataset.id, sid)
            if snap is None:
                break
            snaps[sid] = snap
            ordered.append(snap)
            sid = snap.parent
    if max_count is not None:
        ordered = ordered[:max_count]
    rows = []
    for snap in ordered:
        parent = snaps.get(snap.parent) if snap.parent else None
        if parent is None and snap.parent:
            parent = env.cache.get_snapshot(env.dataset.id, snap.parent)
        delta = changes(parent, snap) if parent is not None or snap.parent is None else None
        rows.append((snap, delta))
    if as_json:
        _emit(
            {
                "dataset": env.dataset.id,
                "remote": remote_name,
                "current": current.snapshot if current else None,
                "snapshots": [
                    {
                        **_snapshot_json(s),
                        "changes": {k: len(v) for k, v in d.items()} if d is not None else None,
                    }
                    for s, d in rows
                ],
            }
        )
        return
    if not rows:
        where = f"on {remote_name}" if remote_name else "in tether.lock and the cache"
        _say(f"No snapshots of {env.dataset.id} {where}.")
        return
    for snap, delta in rows:
        mark = "  <- tether.lock" if current and current.snapshot == snap.id else ""
        change = (
            f"+{len(delta['added'])} ~{len(delta['modified'])} -{len(delta['deleted'])}"
            if delta
            else "(parent unknown)"
        )
        _say(
            f"{_short(snap.id)}  {_when(snap.time)}  {snap.author}  {snap.files} files  {_hb(snap.bytes)}  "
            f"{change}  {snap.message}{mark}"
        )


# -- diff -----------------------------------------------------------------------------------------
def _render_delta(delta: dict[str, list[str]], old: Snapshot | None, new: Snapshot, show_all: bool) -> None:
    before = old.by_path() if old else {}
    after = new.by_path()
    lines = [f"  added     {_hb(after[p].size):>10}  {p}" for p in delta["added"]]
    lines += [f"  modified  {_hb(after[p].size):>10}  {p}" for p in delta["modified"]]
    lines += [f"  deleted   {_hb(before[p].size):>10}  {p}" for p in delta["deleted"]]
    shown = lines if show_all else lines[:MAX_LISTED]
    for line in shown:
        _say(line)
    if len(lines) > len(shown):
        _say(f"  … and {len(lines) - len(shown)} more (--all lists every file, --json for scripts)")


def _find_snapshot(env: _Env, sid: str) -> Snapshot | None:
    """From the cache, else from any configured versioned remote (only the small record is read)."""
    snap = env.cache.get_snapshot(env.dataset.id, sid)
    if snap is not None:
        return snap
    for name, cfg in sorted(env.ws.settings.remotes.items()):
        if cfg.layout != "versioned":
            continue
        try:
            with _open(env.ws, name) as remote:
                snap = read_remote_snapshot(remote, env.dataset.id, sid)
        except (OSError, UsageError, SnapshotFormatError):
            continue
        if snap is not None:
            env.cache.put_snapshot(snap)
            return snap
    return None


def _delta_json(delta: dict[str, list[str]]) -> dict[str, Any]:
    return {"summary": {k: len(v) for k, v in delta.items()}, "changes": delta}


def diff_revisions(state: State, target: str, rev1: str, rev2: str, **options: Any) -> None:
    env = _env(target, options.get("dataset_id"))
    snaps: list[Snapshot] = []
    for rev in (rev1, rev2):
        entry, where = _lock_entry(env, rev)
        if entry is None:
            raise _no_entry(env, where)
        snap = _find_snapshot(env, entry.snapshot)
        if snap is None:
            raise DatasetNotFound(
                f"snapshot {_short(entry.snapshot)} ({where}) is neither in the cache nor on any "
                "versioned remote",
                hint="Push it from the workspace that committed it, or "
                "`tether fetch TARGET REMOTE --rev REV`.",
            )
        snaps.append(snap)
    old, new = snaps
    delta = changes(old, new)
    same = not any(delta.values())
    if options.get("as_json"):
        _emit(
            {
                "dataset": env.dataset.id,
                "from": _snapshot_json(old),
                "to": _snapshot_json(new),
                **_delta_json(delta),
            }
        )
    elif same:
        _say(
            f"No differences: {rev1} and {rev2} hold the same data for {env.dataset.id} ({new.files} files)."
        )
    else:
        _say(
            f"{env.dataset.id}: {rev1} ({_short(old.id)}) -> {rev2} ({_short(new.id)}): "
            f"+{len(delta['added'])} ~{len(delta['modified'])} -{len(delta['deleted'])}"
        )
        _render_delta(delta, old, new, bool(options.get("show_all")))
    raise SystemExit(0 if same else 1)


def diff_remote(state: State, target: str, remote_name: str, **options: Any) -> None:
    """Local data vs the remote's latest snapshot of the dataset, and what push would upload."""
    env = _env(target, options.get("dataset_id"))
    as_json = bool(options.get("as_json"))
    progress = _progress(state, as_json)
    try:
        local_entries: list[Entry] = []
        if env.dataset.path.is_dir():
            local_entries = _scan(
                env,
                skip_symlinks=bool(options.get("skip_symlinks")),
                checksum=bool(options.get("checksum")),
                progress=progress,
            )
        entry = lockfile.read(env.ws.root).get(env.dataset.id)
        local = _local_snapshot(env, local_entries, None)
        with _open(env.ws, remote_name) as remote:
            latest = latest_remote_snapshot(remote, env.cache, env.dataset.id)
            upload: tuple[int, int] | None = None
            committed = load_snapshot(env.cache, remote, env.dataset.id, entry.snapshot) if entry else None
            if committed is not None:
                inv = Inventory.load(env.ws.state_dir, remote.url)
                missing, _ = plan_push(remote, committed, inv, trust_inventory=not options.get("checksum"))
                inv.save()
                sizes = {e.digest: e.size for e in committed.entries}
                pushed = read_remote_snapshot(remote, env.dataset.id, committed.id) is not None
                upload = (len(missing), sum(sizes[d] for d in missing)) if missing or not pushed else (0, 0)
    finally:
        progress.close()
    if not local_entries and latest is None and not env.dataset.path.is_dir():
        raise DatasetNotFound(f"dataset {env.dataset.id!r} exists neither locally nor on {remote_name!r}")
    delta = changes(latest, local)
    same = latest is not None and latest.digest == local.digest
    uncommitted = entry is None or entry.digest != local.digest
    if as_json:
        _emit(
            {
                "dataset": env.dataset.id,
                "remote": remote_name,
                "remote_latest": _snapshot_json(latest) if latest else None,
                "committed": entry.snapshot if entry else None,
                "uncommitted_changes": uncommitted,
                "push_would_upload": {"objects": upload[0], "bytes": upload[1]} if upload else None,
                **_delta_json(delta),
            }
        )
    elif same:
        _say(
            f"In sync: {env.dataset.id} ({local.files} files) matches {remote_name}'s latest snapshot "
            f"{_short(latest.id if latest else None)}."
        )
    else:
        base = f"latest snapshot {_short(latest.id)}" if latest else "no snapshot"
        _say(
            f"{env.dataset.id} vs {remote_name} ({base}): local has +{len(delta['added'])} "
            f"~{len(delta['modified'])} -{len(delta['deleted'])}"
        )
        _render_delta(delta, latest, local, bool(options.get("show_all")))
    if not as_json:
        if uncommitted:
            _say("The workspace has changes since `tether commit` (push sends committed snapshots only).")
        if upload is not None:
            _say(
                f"push would upload {upload[0]} object(s) ({_hb(upload[1])}) for snapshot "
                f"{_short(entry.snapshot if entry else None)}."
            )
    raise SystemExit(0 if same else 1)


# -- gc -------------------------------------------------------------------------------------------
def _gc_plan(
    ws: Workspace, cache: Cache, remote: Remote, scope: Scope, kept_git: set[tuple[str, str]]
) -> tuple[GcPlan, list[str], int]:
    records = list_snapshot_records(remote)
    live, stale = live_pushes(remote, ws.hostname)
    kept = {k for k in records if k in kept_git}
    references: dict[tuple[str, str], set[str]] = {}
    now = time.time()
    for key in sorted(records):
        if key not in kept and scope.kind != "days":
            continue
        try:
            snap = load_snapshot(cache, remote, *key)
        except (SnapshotFormatError, VerificationError) as exc:
            if key in kept or scope.kind == "days":
                raise VerificationError(
                    f"cannot read snapshot {key[0]}@{_short(key[1])} on {remote.url}: {exc.message}",
                    hint="gc marks from every kept snapshot and refuses to guess; run `tether verify` "
                    "and repair or remove that record first.",
                ) from None
            continue
        if snap is None:
            records.pop(key)  # removed while we looked
            kept.discard(key)
            continue
        if scope.kind == "days" and snap.time >= now - scope.days * DAY_S:
            kept.add(key)
        if key in kept:
            references[key] = snap.digests()
    plan = plan_gc(records, kept, references, list_object_stats(remote), cutoff_ns=cutoff_for(live))
    return plan, stale, len(live)


def gc_command(
    state: State, remote_name: str, keep_revs: str, dry_run: bool, yes: bool, as_json: bool, show_all: bool
) -> None:
    scope = Scope.parse(keep_revs)
    ws = Workspace.find()
    cache = Cache(cache_dir(ws.root, ws.settings.raw))
    kept_git = kept_from_git(ws.root, scope)
    deleted = False
    with _open(ws, remote_name) as remote:
        first, _stale, live = _gc_plan(ws, cache, remote, scope, kept_git)
        _gc_render(first, scope, remote_name, live, as_json, show_all, dry_run)
        todo = bool(first.delete_snapshots or first.delete_objects)
        if dry_run or not todo:
            return
        if not yes:
            if not sys.stdin.isatty():
                raise RefusedError(
                    f"gc would delete {len(first.delete_snapshots)} snapshot(s) and "
                    f"{len(first.delete_objects)} "
                    "object(s) and there is no terminal to confirm it",
                    hint="Review with --dry-run, then rerun with -y.",
                )
            if not click.confirm("Delete them?", default=False, err=True):
                from tether.errors import Interrupted

                raise Interrupted("Declined; nothing was deleted.")
        from tether.lock import Lease

        with Lease(remote, GC_LOCK_ID, operation="gc", host=ws.hostname) as lease:
            write_gc_state(remote)
            second, stale, _live = _gc_plan(ws, cache, remote, scope, kept_git)
            final = second.intersect(first)
            lease.ensure_held()
            sweep(remote, final)
            for path in stale:
                remote.delete(path)
            if not _live:
                remote.cleanup_temp("objects")
            deleted = True
        inv = Inventory.load(ws.state_dir, remote.url)
        inv.forget(final.delete_objects)
        inv.save()
    if deleted and not as_json:
        _say(
            f"Deleted {len(final.delete_snapshots)} snapshot(s) and {len(final.delete_objects)} object(s) "
            f"({_hb(final.reclaimed_bytes)}) from {remote_name}."
        )


def _gc_render(
    plan: GcPlan, scope: Scope, remote_name: str, live: int, as_json: bool, show_all: bool, dry_run: bool
) -> None:
    if as_json:
        _emit(
            {
                "remote": remote_name,
                "scope": scope.describe(),
                "dry_run": dry_run,
                "delete_snapshots": [f"{ds}/{sid}" for ds, sid in plan.delete_snapshots],
                "delete_objects": plan.delete_objects,
                "kept_snapshots": plan.kept_snapshots,
                "kept_objects": plan.kept_objects,
                "spared_by_grace": plan.spared_by_grace,
                "reclaimed_bytes": plan.reclaimed_bytes,
                "running_pushes": live,
            }
        )
        return
    _say(
        f"gc {remote_name} (keep: {scope.describe()}): keeps {plan.kept_snapshots} snapshot(s) and "
        f"{plan.kept_objects} object(s); would delete {len(plan.delete_snapshots)} snapshot(s) and "
        f"{len(plan.delete_objects)} object(s) ({_hb(plan.reclaimed_bytes)})"
    )
    if plan.spared_by_grace:
        _say(
            f"{plan.spared_by_grace} newer than the oldest of {live} running push(es) spared (grace period)."
        )
    _list_paths("snapshots to delete", [f"{ds}@{sid}" for ds, sid in plan.delete_snapshots], show_all)
    _list_paths("objects to delete", plan.delete_objects, show_all)


# -- verify ---------------------------------------------------------------------------------------
def verify_command(
    state: State,
    target: str,
    remote_name: str,
    remote_data: bool,
    dataset_id: str | None,
    as_json: bool,
    show_all: bool,
) -> None:
    env = _env(target, dataset_id)
    progress = _progress(state, as_json)
    try:
        with _open(env.ws, remote_name) as remote:
            inv = Inventory.load(env.ws.state_dir, remote.url)
            report = scrub(remote, env.dataset.id, inv, remote_data=remote_data, progress=progress)
    finally:
        progress.close()
    if as_json:
        _emit(
            {
                "dataset": env.dataset.id,
                "remote": remote_name,
                "ok": report.ok,
                "snapshots": report.snapshots,
                "objects": report.objects,
                "hashed": report.hashed,
                "missing": report.missing,
                "corrupt": report.corrupt,
                "damaged_snapshots": report.damaged_snapshots,
            }
        )
    else:
        how = f"hashed {report.hashed}" if remote_data else "sizes checked (--remote-data also hashes them)"
        _say(
            f"{env.dataset.id} on {remote_name}: {report.snapshots} snapshot(s), "
            f"{report.objects} object(s); {how}."
        )
        _list_paths(
            "missing objects",
            [f"{d}  ({', '.join(w[:3])})" for d, w in sorted(report.missing.items())],
            show_all,
        )
        _list_paths(
            "corrupt objects",
            [f"{d}  ({', '.join(w[:3])})" for d, w in sorted(report.corrupt.items())],
            show_all,
        )
        _list_paths("damaged snapshot records", report.damaged_snapshots, show_all)
    if not report.ok:
        bad = len(report.missing) + len(report.corrupt)
        raise VerificationError(
            f"{bad} object(s) missing or corrupt, {len(report.damaged_snapshots)} damaged snapshot "
            f"record(s) on {remote_name}",
            hint="`tether push TARGET REMOTE` from a workspace holding the data re-uploads them.",
        )
    if not as_json:
        _say(
            "OK: every object the snapshots reference is present"
            + (" and hashes to its name." if remote_data else ".")
        )


# -- registration ---------------------------------------------------------------------------------
def register(group: click.Group) -> None:
    """Add the versioned-only commands (commit, fetch, checkout, log, gc, verify) to ``group``."""
    id_opt = click.option(
        "--id", "dataset_id", help="Dataset id when TARGET is a folder outside the data root."
    )
    json_opt = click.option("--json", "as_json", is_flag=True, help="Print one JSON object (no bars).")
    all_opt = click.option("--all", "show_all", is_flag=True, help="List every path.")
    rev_opt = click.option(
        "--rev", help="Git revision whose tether.lock names the snapshot (default: the working tree)."
    )
    symlinks_opt = click.option("--skip-symlinks", is_flag=True, help="Leave symlinks out with a warning.")

    @group.command("commit")
    @click.argument("target")
    @click.option("-m", "--message", default="", help="What changed and why.")
    @id_opt
    @symlinks_opt
    @click.option("--checksum", is_flag=True, help="Rehash every file (ignore the hash cache).")
    @json_opt
    @click.pass_obj
    def commit(state: State, **kw: Any) -> None:
        """Record TARGET's current state as a snapshot in tether.lock (for versioned remotes)."""
        commit_command(state, **kw)

    @group.command("fetch")
    @click.argument("target")
    @click.argument("remote_name", metavar="REMOTE")
    @rev_opt
    @click.option("--all-branches", is_flag=True, help="Every branch tip's snapshot.")
    @click.option("--all-tags", is_flag=True, help="Every tag's snapshot.")
    @click.option("--all-commits", is_flag=True, help="Every commit's snapshot.")
    @click.option("--jobs", type=click.IntRange(1, 256), help="Parallel transfers.")
    @id_opt
    @json_opt
    @click.pass_obj
    def fetch(state: State, **kw: Any) -> None:
        """Download a snapshot's objects into the cache without touching the workspace."""
        fetch_command(state, **kw)

    @group.command("checkout")
    @click.argument("target")
    @rev_opt
    @click.option(
        "--link", help="Link types to try in order: reflink,hardlink,symlink,copy (default reflink,copy)."
    )
    @click.option("--force", is_flag=True, help="Overwrite or delete uncommitted local changes.")
    @click.option("--dry-run", is_flag=True, help="Show what would change and stop.")
    @id_opt
    @symlinks_opt
    @json_opt
    @all_opt
    @click.pass_obj
    def checkout(state: State, **kw: Any) -> None:
        """Make TARGET match a snapshot from the cache (exit 3 before losing uncommitted changes)."""
        checkout_command(state, **kw)

    @group.command("log")
    @click.argument("target")
    @click.argument("remote_name", metavar="[REMOTE]", required=False)
    @click.option("-n", "--max-count", type=click.IntRange(1), help="Show at most N snapshots.")
    @id_opt
    @json_opt
    @click.pass_obj
    def log(state: State, **kw: Any) -> None:
        """List TARGET's snapshots: from tether.lock back through parents, or all on REMOTE."""
        log_command(state, **kw)

    @group.command("gc")
    @click.argument("remote_name", metavar="REMOTE")
    @click.option(
        "--keep-revs",
        required=True,
        metavar="ALL-COMMITS|BRANCHES|N-DAYS",
        help="What to keep: every commit's snapshots, branch tips', or the last N days' (plus branch tips).",
    )
    @click.option("--dry-run", is_flag=True, help="Print what would be deleted and stop.")
    @click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
    @json_opt
    @all_opt
    @click.pass_obj
    def gc(state: State, **kw: Any) -> None:
        """Delete snapshots and objects no kept git revision references."""
        gc_command(state, **kw)

    @group.command("verify")
    @click.argument("target")
    @click.argument("remote_name", metavar="REMOTE")
    @click.option("--remote-data", is_flag=True, help="Also hash every object's bytes where it lives.")
    @id_opt
    @json_opt
    @all_opt
    @click.pass_obj
    def verify(state: State, **kw: Any) -> None:
        """Scrub REMOTE: every object TARGET's snapshots reference exists (exit 4 if not)."""
        verify_command(state, **kw)
