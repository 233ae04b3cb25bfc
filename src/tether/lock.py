"""The lease lock: one writer at a time per remote dataset (invariant 6).

The record at ``<dataset>/.tether/lock`` names its owner, host, pid and an expiry. The holder
renews it while it works. A record is *stale* once it has expired, or when it was left by a
process on this same host that no longer runs (so a killed run never needs manual clean-up,
invariant 7). A live lock held by someone else is broken only by ``tether lock break --force``.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from tether.errors import LockHeld, TetherError
from tether.remotes.base import GuardedWrites, ReleasesLocks, Remote

LOCK_FORMAT = "tether-lock"
LOCK_VERSION = 1
DEFAULT_TTL_S = 120.0
TAKEOVER_TTL_S = 30.0  # a takeover is a read and a delete: seconds, not minutes


def lock_path(dataset_id: str) -> str:
    return f"{dataset_id}/.tether/lock"


@dataclass(frozen=True)
class LockRecord:
    owner: str
    host: str
    pid: int
    acquired: float
    expires: float
    token: str
    operation: str
    format: str = LOCK_FORMAT
    version: int = LOCK_VERSION

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def loads(cls, data: bytes) -> LockRecord | None:
        """None for an unreadable record (e.g. torn by a crash mid-create): treated as stale."""
        try:
            raw = json.loads(data)
        except ValueError:
            return None
        if not isinstance(raw, dict) or raw.get("format") != LOCK_FORMAT:
            return None
        types = {
            "owner": str,
            "host": str,
            "pid": int,
            "acquired": (int, float),
            "expires": (int, float),
            "token": str,
            "operation": str,
            "version": int,
        }
        for key, kind in types.items():
            if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
                return None
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})

    def expired(self, now: float) -> bool:
        return now >= self.expires

    def stale(self, now: float, this_host: str) -> bool:
        if self.expired(now):
            return True
        return self.host == this_host and not _pid_alive(self.pid)

    def describe(self) -> str:
        left = self.expires - time.time()
        when = f"expires in {left:.0f}s" if left > 0 else f"expired {-left:.0f}s ago"
        return f"{self.owner}@{self.host} pid {self.pid} ({self.operation}, {when})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_record(remote: Remote, path: str) -> LockRecord | None:
    try:
        return LockRecord.loads(remote.read_bytes(path))
    except FileNotFoundError:
        return None


def read_lock(remote: Remote, dataset_id: str) -> LockRecord | None:
    return _read_record(remote, lock_path(dataset_id))


def live_lock(remote: Remote, dataset_id: str, host: str) -> LockRecord | None:
    """The lock record, if a run that is still alive holds it (None: free, or stale)."""
    current = read_lock(remote, dataset_id)
    return None if current is None or current.stale(time.time(), host) else current


def lock_held(holder: LockRecord, dataset_id: str, remote: Remote, hint: str) -> LockHeld:
    message = f"{dataset_id} on {remote.url} is locked by {holder.describe()}"
    return LockHeld(message, holder=asdict(holder), hint=hint)


class Lease:
    """Context manager: acquire, renew in the background, release."""

    def __init__(
        self,
        remote: Remote,
        dataset_id: str,
        *,
        operation: str,
        host: str,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        self.remote = remote
        self.dataset_id = dataset_id
        self.operation = operation
        self.host = host
        self.ttl_s = ttl_s
        self.record: LockRecord | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.renew_error: BaseException | None = None

    def _new_record(self, token: str, acquired: float) -> LockRecord:
        now = time.time()
        return LockRecord(
            owner=getpass.getuser(),
            host=self.host,
            pid=os.getpid(),
            acquired=acquired,
            expires=now + self.ttl_s,
            token=token,
            operation=self.operation,
        )

    def acquire(self, *, existing_only: bool = False) -> LockRecord:
        """``existing_only``: where the dataset's folder exists already, else FileNotFoundError
        with nothing made (a run locking before it has looked at the remote)."""
        path = lock_path(self.dataset_id)
        token = secrets.token_hex(16)
        within = self.dataset_id if existing_only else None
        for _attempt in range(3):
            record = self._new_record(token, time.time())
            if self.remote.create_exclusive(path, record.dumps(), within=within):
                # Where the backend enforces the create (a hard link, If-None-Match) the record
                # is ours once it returns; elsewhere it is read back (a round trip saved on SSH).
                enforced = self.remote.capabilities.conditional_create
                if enforced or read_lock(self.remote, self.dataset_id) == record:
                    self.record = record
                    self._start_renewing()
                    return record
                raise LockHeld(f"lost the race for the lock on {self.dataset_id}")
            current = read_lock(self.remote, self.dataset_id)
            if current is None or current.stale(time.time(), self.host):
                self._take_over(current)
                continue
            raise lock_held(
                current,
                self.dataset_id,
                self.remote,
                "Wait for that run to finish. If it died on another machine, the lock "
                "expires by itself; `tether lock break TARGET REMOTE --force` breaks it now.",
            )
        raise LockHeld(f"could not take the lock on {self.dataset_id}: it keeps changing")

    def _take_over(self, stale: LockRecord | None) -> None:
        """Remove a stale record so the next create-exclusive can succeed.

        Deleting by path alone would let two takers each delete the record the other just
        created. So takers first serialise on a short-lived guard record (create-exclusive too):
        only the guard holder re-reads and deletes the stale lock. A guard left by a killed taker
        is stale by the same rules (expired, or a dead pid on this host).
        """
        guard = f"{self.dataset_id}/.tether/lock.takeover"
        mine = self._new_record(secrets.token_hex(16), time.time())
        mine = LockRecord(**{**asdict(mine), "expires": time.time() + TAKEOVER_TTL_S})
        if not self.remote.create_exclusive(guard, mine.dumps()):
            other = _read_record(self.remote, guard)
            if other is None or other.stale(time.time(), self.host):
                self.remote.delete(guard)  # a killed taker's guard; the next attempt retries
                return
            raise LockHeld(
                f"another run is taking over the stale lock on {self.dataset_id}",
                holder=asdict(other),
                hint="Rerun in a moment.",
            )
        try:
            if read_lock(self.remote, self.dataset_id) == stale:
                self.remote.delete(lock_path(self.dataset_id))
        finally:
            self.remote.delete(guard)

    def _start_renewing(self) -> None:
        def renew() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                assert self.record is not None
                fresh = self._new_record(self.record.token, self.record.acquired)
                try:
                    current = read_lock(self.remote, self.dataset_id)
                    if current is None or current.token != self.record.token:
                        self.renew_error = LockHeld("the lock was broken by someone else")
                        return
                    self.remote.write_bytes_atomic(lock_path(self.dataset_id), fresh.dumps())
                    self.record = fresh
                except (OSError, TetherError) as exc:  # keep working; expiry covers a dead link
                    self.renew_error = exc

        self._renewer = threading.Thread(target=renew, name="tether-lease", daemon=True)
        self._renewer.start()

    def ensure_held(self) -> None:
        """Check, just before a commit point (writing the index), that the lock is still ours.

        Two runs that both judged an old lock stale could otherwise each believe they hold it.
        """
        current = read_lock(self.remote, self.dataset_id)
        if self.record is None or current is None or current.token != self.record.token:
            holder = current.describe() if current else "nobody"
            raise LockHeld(
                f"lost the lock on {self.dataset_id} while working (now held by {holder}); "
                "the index was not updated",
                hint="Rerun the command: files already written are verified and kept.",
            )

    def write_while_held(self, path: str, data: bytes, *, release: bool = False) -> None:
        """Write ``data`` at ``path`` (the index: a commit point) only while the lock is ours:
        in one request where the backend checks beside the data, else ensure_held, then write.
        ``release`` then lets the lock go (in that same request where the backend can): for a
        write after which this run changes nothing more on the remote."""
        if release:
            self._stop_renewing()  # a renewal after the release would create the record again
        if isinstance(self.remote, GuardedWrites) and self.record is not None:
            lock, token = lock_path(self.dataset_id), self.record.token
            if not self.remote.write_if_locked(path, data, lock=lock, token=token, release=release):
                self.ensure_held()  # raises, naming who holds it now
                raise LockHeld(f"lost the lock on {self.dataset_id} while working; the index was not updated")
            if release:
                self.record = None
            return
        self.ensure_held()
        self.remote.write_bytes_atomic(path, data)
        if release:
            self.release()

    def _stop_renewing(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)

    def release(self) -> None:
        self._stop_renewing()
        if self.record is None:
            return
        if isinstance(self.remote, ReleasesLocks):
            self.remote.release_lock(lock_path(self.dataset_id), self.record.token)
        else:
            current = read_lock(self.remote, self.dataset_id)
            if current is not None and current.token == self.record.token:
                self.remote.delete(lock_path(self.dataset_id))
        self.record = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def break_lock(remote: Remote, dataset_id: str, *, host: str, force: bool) -> LockRecord | None:
    """Remove the lock record if stale (or always with ``force``); return what was removed."""
    current = read_lock(remote, dataset_id)
    exists = remote.exists(lock_path(dataset_id))
    if current is None and not exists:
        return None
    if current is not None and not force and not current.stale(time.time(), host):
        raise LockHeld(
            f"the lock on {dataset_id} is live: {current.describe()}",
            holder=asdict(current),
            hint="Only break a live lock if you know its holder is dead: add --force.",
        )
    remote.delete(lock_path(dataset_id))
    return current


def clear_dead_lock(remote: Remote, dataset_id: str, *, host: str) -> LockRecord | None:
    """Remove a lock left by a killed run on this machine (its pid is gone).

    A rerun that finds nothing left to do would otherwise leave that record behind, and other
    machines would wait for it to expire. Locks of other hosts are left to expire.
    """
    current = read_lock(remote, dataset_id)
    if current is None or current.host != host or _pid_alive(current.pid):
        return None
    if read_lock(remote, dataset_id) == current:
        remote.delete(lock_path(dataset_id))
    return current


@contextmanager
def local_flock(path: Path, busy: str, *, wait: bool = False) -> Iterator[None]:
    """An exclusive flock on ``path`` for the block, or LockHeld(``busy``) at once: two runs on
    this machine never change the same dataset together (the remote lease covers other hosts).
    ``wait`` waits for the holder instead (a short critical section, such as starting the
    shared SSH master)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(busy, hint="Wait for it to finish.") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
