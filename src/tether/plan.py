"""The three-way planner. PURE: no I/O, no clock, no randomness; property-tested.

Inputs are three sorted manifests (local, remote, base = the last state both sides agreed on)
and the options of the command. The output is a :class:`Plan`: per path a status that says what
happened since the base, and an action that says what the requested direction will do about it.

Statuses are judged by content (size + digest), never by time stamps, so clocks that disagree
between a laptop and a cluster cannot turn into data loss.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from enum import StrEnum

from tether.errors import RefusedError, UsageError
from tether.manifest import Entry, Manifest
from tether.paths import sort_key


class Status(StrEnum):
    LOCAL_ONLY = "local_only"
    REMOTE_ONLY = "remote_only"
    MODIFIED_LOCAL = "modified_local"
    MODIFIED_REMOTE = "modified_remote"
    DELETED_LOCAL = "deleted_local"
    DELETED_REMOTE = "deleted_remote"
    CONFLICT = "conflict"
    DIFFERS = "differs"
    UNCHANGED = "unchanged"


class Action(StrEnum):
    UPLOAD = "upload"
    DOWNLOAD = "download"
    DELETE_REMOTE = "delete_remote"
    DELETE_LOCAL = "delete_local"
    REFUSE = "refuse"  # a change the source has not seen; needs --prefer
    SKIP = "skip"  # differs, but this mode/direction leaves it alone
    NONE = "none"  # unchanged


class Direction(StrEnum):
    PUSH = "push"
    PULL = "pull"


class Mode(StrEnum):
    NEW = "new"
    UPDATE = "update"
    MIRROR = "mirror"


class Side(StrEnum):
    LOCAL = "local"
    REMOTE = "remote"


TRANSFERS = frozenset({Action.UPLOAD, Action.DOWNLOAD})
DELETES = frozenset({Action.DELETE_REMOTE, Action.DELETE_LOCAL})


@dataclass(frozen=True)
class MaxDelete:
    """A delete budget: an absolute count or a percentage of the destination's files."""

    count: int | None = None
    percent: float | None = 50.0

    @classmethod
    def parse(cls, text: str) -> MaxDelete:
        text = text.strip()
        try:
            if text.endswith("%"):
                value = float(text[:-1])
                if not 0 <= value <= 100:
                    raise ValueError
                return cls(count=None, percent=value)
            value_int = int(text)
            if value_int < 0:
                raise ValueError
            return cls(count=value_int, percent=None)
        except ValueError:
            raise UsageError(
                f"--max-delete {text!r} is neither a count nor a percentage",
                hint="Use e.g. `--max-delete 100` or `--max-delete 10%`.",
            ) from None

    def limit(self, destination_files: int) -> int:
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return math.floor(destination_files * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.count}" if self.count is not None else f"{self.percent:g}%"


class Growth(StrEnum):
    """How two differing copies of an append-only ledger relate (found by tether.ledger)."""

    LOCAL_AHEAD = "local_ahead"  # the remote copy is a prefix of the local one
    REMOTE_AHEAD = "remote_ahead"  # the local copy is a prefix of the remote one
    DIVERGED = "diverged"  # neither is a prefix of the other
    # One copy extends the other, but a copy was truncated or edited since the last sync: an
    # append-only file did something other than append. Refused unless --prefer names the
    # longer copy (which then loses nothing by replacing the shorter).
    REWRITTEN = "rewritten"


@dataclass(frozen=True)
class PlanOptions:
    direction: Direction = Direction.PUSH
    mode: Mode = Mode.UPDATE
    prefer: Side | None = None
    max_delete: MaxDelete = field(default_factory=MaxDelete)
    # Append-only ledgers whose copies differ: path -> how they relate. A ledger is only ever
    # extended, never replaced, whatever --prefer says.
    ledgers: Mapping[str, Growth] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    path: str
    status: Status
    action: Action
    local: Entry | None
    remote: Entry | None
    base: Entry | None
    reason: str

    @property
    def overwrites(self) -> bool:
        """A transfer that replaces an existing destination file."""
        if self.action == Action.UPLOAD:
            return self.remote is not None
        if self.action == Action.DOWNLOAD:
            return self.local is not None
        return False

    @property
    def bytes(self) -> int:
        if self.action == Action.UPLOAD and self.local:
            return self.local.size
        if self.action == Action.DOWNLOAD and self.remote:
            return self.remote.size
        if self.action == Action.DELETE_REMOTE and self.remote:
            return self.remote.size
        if self.action == Action.DELETE_LOCAL and self.local:
            return self.local.size
        return 0


def classify(local: Entry | None, remote: Entry | None, base: Entry | None) -> Status | None:
    """What happened to one path since the base; None when it exists nowhere any more."""
    if local is None and remote is None:
        return None
    if local is not None and remote is not None:
        if local.same_content(remote):
            return Status.UNCHANGED
        if base is None:
            return Status.DIFFERS
        if local.same_content(base):
            return Status.MODIFIED_REMOTE
        if remote.same_content(base):
            return Status.MODIFIED_LOCAL
        return Status.CONFLICT
    if remote is None:
        assert local is not None
        if base is None:
            return Status.LOCAL_ONLY
        return Status.DELETED_REMOTE if local.same_content(base) else Status.CONFLICT
    if base is None:
        return Status.REMOTE_ONLY
    return Status.DELETED_LOCAL if remote.same_content(base) else Status.CONFLICT


def decide(
    status: Status, options: PlanOptions, *, local_exists: bool, remote_exists: bool
) -> tuple[Action, str]:
    """The action for one path, written from the source's point of view, then mapped back.

    Push and pull are mirror images: "source" is local on push and remote on pull.
    """
    push = options.direction == Direction.PUSH
    send, delete = (Action.UPLOAD, Action.DELETE_REMOTE) if push else (Action.DOWNLOAD, Action.DELETE_LOCAL)
    src_side, dst_side = (Side.LOCAL, Side.REMOTE) if push else (Side.REMOTE, Side.LOCAL)
    src_exists, dst_exists = (local_exists, remote_exists) if push else (remote_exists, local_exists)
    mode = options.mode
    mirror = mode == Mode.MIRROR

    # Map the symmetric statuses onto source/destination roles.
    src_only = Status.LOCAL_ONLY if push else Status.REMOTE_ONLY
    dst_only = Status.REMOTE_ONLY if push else Status.LOCAL_ONLY
    src_modified = Status.MODIFIED_LOCAL if push else Status.MODIFIED_REMOTE
    dst_modified = Status.MODIFIED_REMOTE if push else Status.MODIFIED_LOCAL
    src_deleted = Status.DELETED_LOCAL if push else Status.DELETED_REMOTE
    dst_deleted = Status.DELETED_REMOTE if push else Status.DELETED_LOCAL

    if status == Status.UNCHANGED:
        return Action.NONE, "same content on both sides"
    if status == src_only:
        return send, f"new on {src_side}"
    if status == src_modified:
        if mode == Mode.NEW:
            return Action.SKIP, f"changed on {src_side}; --mode new only creates missing files"
        return send, f"changed on {src_side} since last sync"
    if status == Status.DIFFERS:
        if mode == Mode.NEW:
            return Action.SKIP, "differs; --mode new only creates missing files"
        if options.prefer == dst_side:
            return Action.SKIP, f"differs and never synced; --prefer {dst_side} keeps the {dst_side} copy"
        return send, f"differs and no earlier sync to judge by; {src_side} copy replaces {dst_side}"
    if status == dst_only:
        if mirror:
            return delete, f"only on {dst_side}; --mode mirror deletes it"
        return Action.SKIP, f"only on {dst_side}; kept (--mode mirror would delete it)"
    if status == src_deleted:
        if mirror:
            return delete, f"deleted on {src_side} since last sync; --mode mirror deletes it"
        return Action.SKIP, f"deleted on {src_side}; kept on {dst_side} (--mode mirror would delete it)"
    if status == dst_deleted:
        if mirror or options.prefer == src_side:
            return send, f"deleted on {dst_side} since last sync; restored from {src_side}"
        return (
            Action.SKIP,
            f"deleted on {dst_side} since last sync; kept deleted (--prefer {src_side} restores it)",
        )
    if status in (dst_modified, Status.CONFLICT):
        what = (
            f"changed on {dst_side} since last sync"
            if status == dst_modified
            else "changed on both sides since last sync"
        )
        if options.prefer is None:
            return Action.REFUSE, f"{what}; refusing to overwrite (use --prefer local|remote)"
        if options.prefer == dst_side:
            return Action.SKIP, f"{what}; --prefer {dst_side} keeps the {dst_side} copy"
        if src_exists:
            if mode == Mode.NEW and dst_exists:
                return Action.SKIP, f"{what}; --mode new never replaces files"
            return send, f"{what}; --prefer {src_side} replaces the {dst_side} copy"
        if mirror:
            return delete, f"{what}; deleted on {src_side}, --prefer {src_side} deletes it"
        return Action.SKIP, f"{what}; deleted on {src_side}, kept (--mode mirror would delete it)"
    raise AssertionError(f"unhandled status {status}")  # pragma: no cover


def decide_ledger(growth: Growth, options: PlanOptions, local: Entry, remote: Entry) -> tuple[Action, str]:
    """Override the generic decision for an append-only ledger whose copies differ: send only
    to a destination that is a prefix of the source; a destination that already extends the
    source keeps its copy; copies that diverged are refused whatever --prefer says."""
    push = options.direction == Direction.PUSH
    send = Action.UPLOAD if push else Action.DOWNLOAD
    src, dst = (Side.LOCAL, Side.REMOTE) if push else (Side.REMOTE, Side.LOCAL)
    if growth == Growth.DIVERGED:
        return Action.REFUSE, "append-only ledger diverged: neither copy is a prefix of the other"
    if growth == Growth.REWRITTEN:
        src_longer = (local.size > remote.size) if push else (remote.size > local.size)
        if options.prefer == src and src_longer:
            return send, f"append-only ledger cut on {dst} since last sync; --prefer {src} restores it"
        return Action.REFUSE, "append-only ledger was truncated or edited since the last sync"
    if options.mode == Mode.NEW:
        return Action.SKIP, "append-only ledger grew; --mode new only creates missing files"
    if growth == (Growth.LOCAL_AHEAD if push else Growth.REMOTE_AHEAD):
        return send, f"append-only ledger grew on {src}; the {dst} copy is a prefix of it"
    other = "pull" if push else "push"
    return Action.SKIP, f"append-only ledger: the {dst} copy already extends the {src} one ({other} it)"


def merge3(
    local: Iterable[Entry], remote: Iterable[Entry], base: Iterable[Entry]
) -> Iterator[tuple[str, Entry | None, Entry | None, Entry | None]]:
    """Merge three sorted entry streams by path in one pass (bounded memory).

    Each stream must be strictly increasing in manifest order; a repeated or out-of-order path
    (a damaged index) raises instead of turning into a phantom file that mirror would delete.
    """
    streams = (local, remote, base)
    present = [i for i, s in enumerate(streams) if not (isinstance(s, Sized) and len(s) == 0)]
    if len(present) == 1:  # a first push or pull: one side only, no minimum to find per path
        yield from _merge1(present[0], streams[present[0]])
        return
    iters = [iter(local), iter(remote), iter(base)]
    heads: list[Entry | None] = [None, None, None]
    keys: list[tuple[str, ...] | None] = [None, None, None]

    def advance(i: int) -> None:
        entry = next(iters[i], None)
        key = sort_key(entry.path) if entry is not None else None
        if key is not None and keys[i] is not None and key <= keys[i]:  # type: ignore[operator]
            raise ValueError(f"manifest not strictly sorted at {entry.path!r}")  # type: ignore[union-attr]
        heads[i], keys[i] = entry, key

    for i in range(3):
        advance(i)
    while True:
        live = [k for k in keys if k is not None]
        if not live:
            return
        key = min(live)
        row: list[Entry | None] = [None, None, None]
        for i in range(3):
            if keys[i] == key:
                row[i] = heads[i]
                advance(i)
        path = next(e for e in row if e is not None).path
        yield path, row[0], row[1], row[2]


def _merge1(
    which: int, entries: Iterable[Entry]
) -> Iterator[tuple[str, Entry | None, Entry | None, Entry | None]]:
    """merge3 when only stream ``which`` holds entries (same checks, same rows)."""
    previous: tuple[str, ...] | None = None
    for entry in entries:
        key = sort_key(entry.path)
        if previous is not None and key <= previous:
            raise ValueError(f"manifest not strictly sorted at {entry.path!r}")
        previous = key
        if which == 0:
            yield entry.path, entry, None, None
        elif which == 1:
            yield entry.path, None, entry, None
        else:
            yield entry.path, None, None, entry


@dataclass
class Plan:
    """Actionable changes (unchanged paths are only counted, to keep a plan small)."""

    options: PlanOptions
    changes: list[Change] = field(default_factory=list)
    unchanged_files: int = 0
    unchanged_bytes: int = 0
    local_files: int = 0
    remote_files: int = 0

    @property
    def direction(self) -> Direction:
        return self.options.direction

    def with_action(self, *actions: Action) -> list[Change]:
        return [c for c in self.changes if c.action in actions]

    @property
    def transfers(self) -> list[Change]:
        return [c for c in self.changes if c.action in TRANSFERS]

    @property
    def deletes(self) -> list[Change]:
        return [c for c in self.changes if c.action in DELETES]

    @property
    def refused(self) -> list[Change]:
        return self.with_action(Action.REFUSE)

    @property
    def has_work(self) -> bool:
        return any(c.action in TRANSFERS or c.action in DELETES for c in self.changes)

    @property
    def in_sync(self) -> bool:
        return not self.changes

    @property
    def overwrites(self) -> list[Change]:
        return [c for c in self.changes if c.overwrites]

    @property
    def destination_files(self) -> int:
        return self.remote_files if self.direction == Direction.PUSH else self.local_files

    @property
    def source_files(self) -> int:
        return self.local_files if self.direction == Direction.PUSH else self.remote_files

    def status_counts(self) -> dict[str, int]:
        counts = Counter(c.status.value for c in self.changes)
        if self.unchanged_files:
            counts[Status.UNCHANGED.value] = self.unchanged_files
        return dict(sorted(counts.items()))

    def action_counts(self) -> dict[str, int]:
        counts = Counter(c.action.value for c in self.changes)
        if self.unchanged_files:
            counts[Action.NONE.value] = self.unchanged_files
        return dict(sorted(counts.items()))

    def action_bytes(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for c in self.changes:
            if c.action in TRANSFERS or c.action in DELETES:
                out[c.action.value] += c.bytes
        return dict(sorted(out.items()))

    def check_safe(self) -> None:
        """Raise RefusedError if executing this plan could lose data the user has not seen."""
        refused = self.refused
        if refused:
            sample = ", ".join(c.path for c in refused[:5])
            more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
            raise RefusedError(
                f"{len(refused)} file(s) changed on the destination since the last sync "
                f"(or on both sides): {sample}{more}",
                paths=[c.path for c in refused],
                hint=(
                    "Pull first to bring their changes in, or decide for this run: --prefer remote keeps "
                    "the remote copy, --prefer local overwrites it (`tether diff` shows each file)."
                    if self.direction == Direction.PUSH
                    else "Push first if your edits should win, or decide for this run: --prefer local "
                    "keeps your copy, --prefer remote overwrites it (`tether diff` shows each file)."
                ),
            )
        deletes = self.deletes
        if deletes and self.source_files == 0 and self.options.mode == Mode.MIRROR:
            raise RefusedError(
                f"the source is empty: mirroring it would delete all {len(deletes)} file(s) "
                "at the destination",
                paths=[c.path for c in deletes],
                hint="If you really want an empty destination, delete the files there yourself.",
            )
        limit = self.options.max_delete.limit(self.destination_files)
        if len(deletes) > limit:
            raise RefusedError(
                f"the plan deletes {len(deletes)} file(s), over the limit of {limit} "
                f"(--max-delete {self.options.max_delete} of {self.destination_files} files)",
                paths=[c.path for c in deletes],
                hint="Review with `tether diff`, then raise the limit, e.g. --max-delete 100%.",
            )

    def fingerprint(self) -> list[tuple[str, str, str | None, str | None]]:
        """What must not change between the confirmed plan and the one made under the lock."""
        return [
            (
                c.path,
                c.action.value,
                c.local.digest if c.local else None,
                c.remote.digest if c.remote else None,
            )
            for c in self.changes
            if c.action != Action.SKIP
        ]


def make_plan(
    local: Iterable[Entry],
    remote: Iterable[Entry],
    base: Iterable[Entry],
    options: PlanOptions,
) -> Plan:
    """Compare the three manifests and decide an action per path."""
    plan = Plan(options=options)
    if isinstance(local, Manifest) and isinstance(remote, Manifest) and local.entries == remote.entries:
        # Both sides hold the same entries: every path is unchanged whatever the base says
        # (one C-level list comparison instead of a three-way merge of 20,000 paths).
        plan.local_files = plan.remote_files = plan.unchanged_files = len(local.entries)
        plan.unchanged_bytes = sum(e.size for e in local.entries)
        return plan
    decided: dict[tuple[Status, bool, bool], tuple[Action, str]] = {}  # decide is pure per run
    for path, lo, re_, ba in merge3(local, remote, base):
        plan.local_files += lo is not None
        plan.remote_files += re_ is not None
        status = classify(lo, re_, ba)
        if status is None:
            continue
        if status == Status.UNCHANGED:
            plan.unchanged_files += 1
            plan.unchanged_bytes += lo.size if lo else 0
            continue
        key = (status, lo is not None, re_ is not None)
        if key not in decided:
            decided[key] = decide(status, options, local_exists=key[1], remote_exists=key[2])
        action, reason = decided[key]
        growth = options.ledgers.get(path) if lo is not None and re_ is not None else None
        if growth is not None:
            action, reason = decide_ledger(growth, options, lo, re_)  # type: ignore[arg-type]
        plan.changes.append(Change(path, status, action, lo, re_, ba, reason))
    return plan


def replan(plan: Plan, options: PlanOptions) -> Plan:
    """The same comparison under other options (e.g. the pull side of a diff), without merging
    the manifests again: statuses do not depend on the direction, only actions do."""
    out = Plan(
        options=options,
        unchanged_files=plan.unchanged_files,
        unchanged_bytes=plan.unchanged_bytes,
        local_files=plan.local_files,
        remote_files=plan.remote_files,
    )
    for c in plan.changes:
        action, reason = decide(
            c.status, options, local_exists=c.local is not None, remote_exists=c.remote is not None
        )
        growth = options.ledgers.get(c.path) if c.local is not None and c.remote is not None else None
        if growth is not None:
            action, reason = decide_ledger(growth, options, c.local, c.remote)  # type: ignore[arg-type]
        out.changes.append(Change(c.path, c.status, action, c.local, c.remote, c.base, reason))
    return out


def agreed_base(
    local: Iterable[Entry], remote: Iterable[Entry], old_base: Iterable[Entry]
) -> Iterator[Entry]:
    """The new base: a path's entry where both sides now hold the same content.

    Where the sides still disagree (a skipped or refused path), the old base entry is kept so
    the next plan judges that path exactly as this one did: nothing is forgotten by a partial
    sync. A path gone from both sides leaves the base.
    """
    for _path, lo, re_, ba in merge3(local, remote, old_base):
        if lo is not None and lo.same_content(re_):
            yield lo
        elif lo is None and re_ is None:
            continue
        elif ba is not None:
            yield ba
