"""The helper tether runs on an SSH remote with the remote's own ``python3``.

It is sent over the connection each run (nothing is installed remotely), so it uses only the
standard library and must run on Python 3.8 (old cluster login nodes): no ``match``, no
``str.removeprefix``, no ``hashlib.file_digest``; annotations are strings thanks to the
``__future__`` import, so they may use newer syntax.

Protocol: frames on stdin/stdout. A frame is ``struct(">IQ")`` (header length, payload length),
a UTF-8 JSON header, then the payload bytes (file data). Every path travels inside a header,
never on a command line, so no name can inject anything. Requests are answered in order, except
the streamed ``put`` items whose acknowledgements come back as they finish: the client sends
file after file without waiting, which is what makes 20,000 small files one round trip.

Every write goes to a temporary name in the destination folder (the same filesystem), is
hashed as it is written, and is renamed into place only when its SHA-256 matches (no torn
files). Large uploads go to a ``.part`` name derived from their digest so that an interrupted
upload resumes from its verified prefix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import queue
import stat
import struct
import sys
import threading
import time
from collections import deque

PROTOCOL = 1
MAGIC = b"\x00tether-helper\x00"  # precedes the first frame: shell start-up chatter may come first
ACKS = ("acks",)  # queue marker: the writer sends every pending ack as one frame
DRAIN = ("drain",)  # queue marker: everything before it has been written and flushed
FRAME = struct.Struct(">IQ")
CHUNK = 1024 * 1024
SMALL = 1024 * 1024  # whole-payload writes handed to worker threads
IN_FLIGHT_BYTES = 32 * 1024 * 1024  # bounded memory for queued small writes
STATE_DIR = ".tether"
TEMP_MARKER = ".tether-tmp-"
PART_SUFFIX = ".part"
PART_MAX_AGE_S = 24 * 3600  # resumable partial uploads older than this are cleaned up
HASH_CACHE = "hashcache.json"
RACY_WINDOW_NS = 50_000_000
LIST_PAGE = 10_000
WORKERS = max(2, min(8, (os.cpu_count() or 2) * 2))  # I/O-bound on NFS/Lustre: latency, not CPU
RUN_FILES = 64  # small files read and framed as one unit by op_get
READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
LANE_RUN = 64  # consecutive small files of one folder written by one thread (Helper.lane_for)


class Refused(Exception):
    """A request the helper will not carry out (unsafe path, symlink on the way)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


# -- framing ------------------------------------------------------------------------------------
# Frame headers parsed without json.loads' checks (bytes detection, trailing text): 0.7 us
# instead of 2.0 us, paid once per file of a push.
parse_header = json.JSONDecoder().raw_decode


class Conn:
    """Frames in from stdin; frames out through one writer thread that flushes when idle.

    A single writer keeps frames from worker threads whole, and flushing only when its queue is
    empty batches many small acknowledgements into few packets under load.
    """

    def __init__(self) -> None:
        self.inp = os.fdopen(os.dup(0), "rb", buffering=CHUNK)
        self.out = os.fdopen(os.dup(1), "wb", buffering=CHUNK)
        bigger_pipe(self.inp.fileno())
        bigger_pipe(self.out.fileno())
        # Anything printed by accident must not corrupt the protocol: fd 1 now goes to stderr.
        os.dup2(2, 1)
        self.out.write(MAGIC)
        self.q: queue.Queue = queue.Queue(maxsize=64)
        self.broken = False
        self.acks: list = []  # [id, error or None] of finished uploads, sent in batches
        self.ack_queued = False
        self.ack_lock = threading.Lock()
        self.drained = threading.Event()
        self.writer = threading.Thread(target=self._write_loop, name="helper-writer", daemon=True)
        self.writer.start()

    def _write_loop(self) -> None:
        while True:
            item = self.q.get()
            if self.broken:
                continue  # the client went away: drop answers, let workers finish their files
            if item is DRAIN:
                with contextlib.suppress(OSError):
                    self.out.flush()
                self.drained.set()
                continue
            if item is ACKS:
                item = self._ack_frame()
            try:
                for part in item:
                    self.out.write(part)
                if self.q.empty():
                    self.out.flush()
            except OSError:
                self.broken = True

    def _put(self, item: tuple | None) -> None:
        """Queue output, but never block for good: once the client is gone, drop it (a writer
        stuck on a dead channel must not keep workers from finishing their files)."""
        while not self.broken:
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def ack(self, rid: int, error: dict | None = None) -> None:
        self.ack_many([[rid, error]])

    def ack_many(self, acks: list) -> None:
        """Acknowledge streamed uploads (``[id, error or None]``). Acks that pile up while the
        writer is busy leave as one frame: 20,000 small files must not cost 20,000 packets."""
        with self.ack_lock:
            self.acks.extend(acks)
            if self.ack_queued:
                return
            self.ack_queued = True
        self._put(ACKS)

    def _ack_frame(self) -> tuple:
        with self.ack_lock:
            acks, self.acks, self.ack_queued = self.acks, [], False
        raw = json.dumps({"acks": acks}, separators=(",", ":")).encode()
        return (FRAME.pack(len(raw), 0), raw)

    def send(self, header: dict, payload: bytes = b"") -> None:
        raw = json.dumps(header, separators=(",", ":")).encode()
        self._put((FRAME.pack(len(raw), len(payload)), raw, payload))

    def send_head(self, header: dict, n: int) -> None:
        """A header whose ``n`` payload bytes follow through ``send_raw`` (large files)."""
        raw = json.dumps(header, separators=(",", ":")).encode()
        self._put((FRAME.pack(len(raw), n), raw))

    def send_raw(self, data: bytes) -> None:
        self._put((data,))

    def drain(self, timeout: float) -> None:
        """After a clean end of input: answers already queued still reach the client."""
        self._put(DRAIN)
        if not self.broken:
            self.drained.wait(timeout)

    def close(self) -> None:
        """The client vanished mid-request: it waits for nothing more."""
        self.broken = True

    def read_exact(self, n: int) -> bytes:
        data = self.inp.read(n)
        if data is None or len(data) != n:
            raise EOFError
        return data

    def recv(self) -> tuple[dict, int] | None:
        """Next header and the length of the payload that follows (the caller reads it)."""
        head = self.inp.read(FRAME.size)
        if not head:
            return None
        if len(head) != FRAME.size:
            raise EOFError
        hlen, n = FRAME.unpack(head)
        return parse_header(self.read_exact(hlen).decode())[0], n

    def skip(self, n: int) -> None:
        while n:
            n -= len(self.read_exact(min(n, CHUNK)))


# -- paths --------------------------------------------------------------------------------------
def hash_prefix(f, n: int) -> tuple:
    """(bytes read, SHA-256 state) over the first ``n`` bytes of an open file (fewer if it is
    shorter): resumable uploads continue the state, resumable downloads compare its digest."""
    h = hashlib.sha256()
    f.seek(0)
    done = 0
    while done < n:
        chunk = f.read(min(CHUNK, n - done))
        if not chunk:
            break
        h.update(chunk)
        done += len(chunk)
    return done, h


def error_info(exc: BaseException, rel: str = "") -> dict:
    if isinstance(exc, Refused):
        return {"kind": exc.kind, "msg": str(exc), "path": rel}
    if isinstance(exc, OSError):
        return {"kind": "os", "errno": exc.errno, "msg": exc.strerror or str(exc), "path": rel}
    return {"kind": "internal", "msg": f"{type(exc).__name__}: {exc}", "path": rel}


def check_rel(rel: object) -> str:
    """The same rules as tether.paths.check_relpath (invariant 5), enforced on this side too."""
    if not isinstance(rel, str) or not rel:
        raise Refused("empty path refused")
    if "\x00" in rel or "\\" in rel or rel.startswith("/"):
        raise Refused(f"unsafe path {rel!r} refused")
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise Refused(f"path {rel!r} has an empty, '.' or '..' part; refused")
    return rel


_TEMP_TAG = os.urandom(4).hex()
_temp_counter = itertools.count()


def temp_name(final: str) -> str:
    """Unique per process (random tag) and per call (counter): no entropy syscall per file."""
    head, name = os.path.split(final)
    return os.path.join(head, f".{name}{TEMP_MARKER}{_TEMP_TAG}{next(_temp_counter):x}")


def trailer_size(h: dict) -> int:
    """Bytes after a streamed upload's data: the hex digest of a file hashed as it was sent."""
    return 64 if h.get("trailer") else 0


def part_name(final: str, digest: str) -> str:
    head, name = os.path.split(final)
    return os.path.join(head, f".{name}{TEMP_MARKER}{digest[:16]}{PART_SUFFIX}")


class Base:
    """The remote base folder and the folders below it already known to be real directories."""

    def __init__(self, path: str) -> None:
        path = os.path.expanduser(path or "~")
        self.path = os.path.abspath(path)
        self.safe_dirs: set[str] = set()
        self.lock = threading.Lock()

    def abs(self, rel: str) -> str:
        return os.path.join(self.path, check_rel(rel)) if rel else self.path

    def rel_of(self, path: object) -> str:
        """``path`` relative to the base if it lies below it (an OSError's filename), else ''."""
        if isinstance(path, str) and path.startswith(self.path + "/"):
            return path[len(self.path) + 1 :]
        return ""

    def is_folder(self, rel: str) -> bool:
        """Whether ``rel`` is a real folder (a link to one is not), its parents checked as
        parent_ok checks them; nothing is made."""
        try:
            return stat.S_ISDIR(os.lstat(self.parent_ok(rel, False)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def parent_ok(self, rel: str, create: bool) -> str:
        """Absolute path of ``rel`` after checking no folder on the way is a symlink.

        A symlinked folder inside a dataset would let a write land outside it.
        """
        final = self.abs(rel)
        parts = rel.split("/")[:-1]
        cur = self.path
        for i, part in enumerate(parts):
            cur = os.path.join(cur, part)
            key = "/".join(parts[: i + 1])
            if key in self.safe_dirs:
                continue
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                if not create:
                    return final
                with contextlib.suppress(FileExistsError):
                    os.mkdir(cur)
                st = os.lstat(cur)
            if stat.S_ISLNK(st.st_mode):
                raise Refused(f"{rel} goes through a symlinked folder ({key}); refused")
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, "not a directory", key)
            with self.lock:
                self.safe_dirs.add(key)
        return final


# -- the helper ---------------------------------------------------------------------------------
class Helper:
    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.base = Base("~")
        self.flush_behind: FlushBehind | None = None  # set by op_init for the base's filesystem
        self._pool = None
        self._lanes: list = []
        self.folder_counts: dict[str, int] = {}
        self.parts: dict[str, tuple[int, object]] = {}  # .part path -> (prefix size, hasher)
        self.cond = threading.Condition()
        self.in_flight = 0  # bytes of queued small writes (bounds memory)
        self.pending = 0  # queued small writes, empty files included (the barrier waits for them)
        self.index_memo: tuple | None = None  # (file identity, raw, stats) of the last index read

    # Thread pools are made on first use: concurrent.futures (and the logging module it
    # imports) were a quarter of the helper's import time, paid by every no-op's control
    # helper, on clusters where the standard library sits on a slow shared filesystem.
    @property
    def pool(self):  # type: ignore[no-untyped-def]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=WORKERS)
        return self._pool

    @property
    def lanes(self) -> list:
        if not self._lanes:
            from concurrent.futures import ThreadPoolExecutor

            self._lanes = [ThreadPoolExecutor(max_workers=1) for _ in range(WORKERS)]  # see lane_for
        return self._lanes

    def shutdown(self) -> None:
        """Wait for the pools that were started (a no-op's helper started none)."""
        for pool in ([self._pool] if self._pool is not None else []) + self._lanes:
            pool.shutdown(wait=True)

    # requests answered in order
    def op_init(self, h: dict, data: bytes) -> dict:
        self.base = Base(h.get("base") or "~")
        # The client sets the step (tether.fileio.FLUSH_BEHIND_BYTES; 0: never) and names the
        # network filesystems (tether.remotes.local's list); this side knows the filesystem.
        self.flush_behind = FlushBehind.for_folder(
            self.base.path, int(h.get("flush_step") or 0), tuple(h.get("network_filesystems") or ())
        )
        return dict(self.facts(), base=self.base.path)

    def facts(self) -> dict:
        p = self.base.path
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return {"exists": False, "is_dir": False, "readable": False}
        except OSError as exc:  # e.g. a parent folder we may not enter
            return {"exists": True, "is_dir": False, "readable": False, "error": exc.strerror}
        return {
            "exists": True,
            "is_dir": stat.S_ISDIR(st.st_mode),
            "readable": os.access(p, os.R_OK | os.X_OK),
        }

    def op_probe(self, h: dict, data: bytes) -> dict:
        """What `tether remote test` reports: free space, clock, and a real write test."""
        out = dict(self.facts(), base=self.base.path, time=time.time(), python=list(sys.version_info[:3]))
        try:
            st = os.statvfs(self.base.path)
            out["free"] = st.f_bavail * st.f_frsize
        except OSError as exc:
            out["free_error"] = str(exc)
        if h.get("write") and out["is_dir"]:
            probe = os.path.join(self.base.path, f".tether-probe{TEMP_MARKER}{os.urandom(6).hex()}")
            try:
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.close(fd)
                os.unlink(probe)
                out["writable"] = True
            except OSError as exc:
                out["writable"] = False
                out["write_error"] = f"{exc.strerror} (errno {exc.errno})"
        return out

    def op_list(self, h: dict, data: bytes) -> dict:
        prefix = h.get("prefix") or ""
        root = self.base.abs(prefix)
        entries: list = []
        refused: list = []
        if os.path.isdir(root):
            self.walk(root, "", entries, refused, h["id"])
        return {"entries": entries, "refused": refused}

    def op_list_delta(self, h: dict, data: bytes) -> tuple[dict, bytes]:
        """op_list told against the dataset's index: only files whose size or mtime the index
        does not vouch for, the index paths no longer listed, and the index bytes only if the
        client's copy differs (by SHA-256). A no-op of 20,000 files sends a few hundred bytes
        instead of a 2 MB listing and a 1 MB index; the client rebuilds the listing from its
        copy of the index (tether.sync.scan_remote)."""
        prefix = h.get("prefix") or ""
        root = self.base.abs(prefix)
        index = self.base.parent_ok(h["index"], False)
        # The index is read and parsed on a thread while the tree is walked: a cold walk of
        # 20,000 files mostly waits on the disk, and parsing their index took 0.06 s of it.
        read: dict = {}

        def read_and_offer() -> None:
            """Read the index; if the client asked, send it now (early), before the walk ends,
            when its copy is stale: it parses the index while this side walks."""
            self.read_index(index, read)
            raw = read.get("raw")
            if raw and h.get("early") and hashlib.sha256(raw).hexdigest() != h.get("have"):
                self.conn.send({"id": h["id"], "early": True}, raw)
                read["sent"] = True

        reader = threading.Thread(target=read_and_offer, name="helper-index")
        reader.start()
        listed: list = []
        refused: list = []
        temps: list | None = [] if h.get("clean") else None
        if os.path.isdir(root):
            self.walk(root, "", listed, refused, h["id"], page=False, temps=temps)
        reader.join()
        if "error" in read:
            raise read["error"]
        raw = read.get("raw", b"")
        vouched = read.get("stats", {})
        # Only what the index does not vouch for is sent; what stays in vouched is missing.
        entries = [e for e in listed if vouched.pop(e[0], None) != [e[1], e[2]]]
        digest = hashlib.sha256(raw).hexdigest() if raw else None
        answer = {"entries": entries, "refused": refused, "missing": list(vouched), "index_digest": digest}
        if temps is not None:  # the look under the lock: clear what killed writers left
            answer["cleaned"] = clear_temps(temps)
        stale = digest is not None and digest != h.get("have") and not read.get("sent")
        return answer, (raw if stale else b"")

    def read_index(self, path: str, out: dict) -> None:
        """read_index_into, remembering the parse for the same file (inode, size, mtime, ctime):
        a push or pull lists twice, before and under the lock, and the second parse of a
        20,000-entry index cost the look under the lock 0.06 s. A new index is written beside
        and renamed into place, so it never matches what was remembered."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        except BaseException as exc:
            out["error"] = exc
            return
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if self.index_memo is not None and self.index_memo[0] == key:
            # A copy: op_list_delta pops what it vouched for from the stats it is given.
            out["raw"], out["stats"] = self.index_memo[1], dict(self.index_memo[2])
            return
        read_index_into(path, out)
        if out.get("stats"):
            self.index_memo = (key, out["raw"], dict(out["stats"]))

    def walk(
        self,
        root: str,
        prefix: str,
        entries: list,
        refused: list,
        rid: int,
        *,
        page: bool = True,
        temps: list | None = None,
    ) -> None:
        """Mirror of tether.scan: sorted, state folders and temp names skipped, links refused.
        ``page``: send ``entries`` in pages as they fill (a full listing); without it they all
        stay in ``entries`` for the caller to filter first. ``temps`` (the look under the lock)
        collects the temporary files passed over, state folders' included, for clear_temps:
        one walk where a listing and a clean-up took two."""
        try:
            with os.scandir(os.path.join(root, prefix) if prefix else root) as it:
                items = sorted(it, key=lambda d: d.name)
        except FileNotFoundError:
            return
        for item in items:
            name = item.name
            rel = prefix + "/" + name if prefix else name
            if name == STATE_DIR or (not prefix and name == ".git"):
                if temps is not None and name == STATE_DIR:
                    temps += temp_files_below(os.path.join(root, rel))
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                refused.append([os.fsencode(rel).decode("utf-8", "backslashreplace"), "not UTF-8"])
                continue
            try:
                st = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we walked
            if stat.S_ISDIR(st.st_mode):
                self.walk(root, rel, entries, refused, rid, page=page, temps=temps)
                continue
            if TEMP_MARKER in name:
                if temps is not None:
                    temps.append(os.path.join(root, rel))
                continue
            if not stat.S_ISREG(st.st_mode):
                refused.append([rel, "symlink" if stat.S_ISLNK(st.st_mode) else "special file"])
                continue
            entries.append([rel, st.st_size, st.st_mtime_ns])
            if page and len(entries) >= LIST_PAGE:
                self.conn.send({"id": rid, "page": entries})
                del entries[:]

    def op_exists(self, h: dict, data: bytes) -> dict:
        return {"exists": os.path.exists(self.base.parent_ok(h["path"], False))}

    def op_read(self, h: dict, data: bytes) -> tuple[dict, bytes]:
        with open(self.base.parent_ok(h["path"], False), "rb") as f:
            if "offset" in h:
                f.seek(int(h["offset"]))
                return {}, f.read(int(h["length"]))
            return {}, f.read()

    def op_write(self, h: dict, data: bytes) -> dict:
        final = self.base.parent_ok(h["path"], True)
        tmp = temp_name(final)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            remove(tmp)
            raise
        fsync_dir(os.path.dirname(final))
        return {}

    def op_create(self, h: dict, data: bytes) -> dict:
        """Create only if absent, with the full content visible at once.

        The record is written to a temporary file and hard-linked to its final name (link fails
        if the name exists, atomically, also on NFS), so no reader ever sees an empty lock. An
        flock on a sibling serialises creators further where the filesystem honours it.
        With ``within``, only inside that existing folder (a lock taken before the look at a
        dataset that may not be there): otherwise nothing is made and ``absent`` says why.
        """
        within = h.get("within")
        if within is not None and not self.base.is_folder(within):
            return {"created": False, "absent": True}
        final = self.base.parent_ok(h["path"], True)
        with flocked(final + ".flock"):
            if os.path.lexists(final):
                return {"created": False}
            tmp = temp_name(final)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    return {"created": False}
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                        raise
                    return {"created": create_excl(final, data)}  # no hard links here
            finally:
                remove(tmp)
        fsync_dir(os.path.dirname(final))
        return {"created": True}

    def op_write_locked(self, h: dict, data: bytes) -> dict:
        """op_write, only while the lock record at ``lock`` holds ``token`` (the index, a push's
        commit point: a check and a write in one request), under the flock of op_create; with
        ``release``, the record is deleted after the write (a push's last remote step)."""
        lock = self.base.parent_ok(h["lock"], False)
        with flocked(lock + ".flock"):
            if lock_token(lock) != h["token"]:
                return {"written": False}
            self.op_write(h, data)
            if h.get("release"):
                os.unlink(lock)
        return {"written": True}

    def op_release(self, h: dict, data: bytes) -> dict:
        """Delete the lock record at ``path`` if it still holds ``token`` (a read and a delete in
        one request), under the flock that serialises creating it (op_create)."""
        final = self.base.parent_ok(h["path"], False)
        with flocked(final + ".flock"):
            if lock_token(final) != h["token"]:
                return {"released": False}
            os.unlink(final)
        return {"released": True}

    def op_delete(self, h: dict, data: bytes) -> dict:
        rel = h["path"]
        target = self.base.parent_ok(rel, False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        parent = os.path.dirname(target)  # prune folders the delete left empty (like local.py)
        while parent != self.base.path and os.path.basename(parent) != STATE_DIR:
            try:
                os.rmdir(parent)
            except OSError:
                break
            with self.base.lock:
                self.base.safe_dirs.discard(os.path.relpath(parent, self.base.path))
            parent = os.path.dirname(parent)
        return {}

    def op_cleanup(self, h: dict, data: bytes) -> dict:
        return clear_temps(temp_files_below(self.base.abs(h.get("prefix") or "")))

    def op_flush(self, h: dict, data: bytes) -> dict:
        """The flush the client's index waits for; a background flush asked for runs first."""
        behind = self.flush_behind.finish() if self.flush_behind is not None else 0
        syncfs(self.base.path)
        return {"flushed_behind": behind}

    def op_hash(self, h: dict, data: bytes) -> dict:
        paths = h["paths"]
        caches = HashCaches(self.base) if h.get("cache", True) else None
        finals = [self.base.parent_ok(p, False) for p in paths]

        def work(i: int) -> str:
            rel, final = paths[i], finals[i]
            st = os.stat(final)
            cached = caches.get(rel, st) if caches else None
            if cached:
                return cached
            started = time.time_ns()
            digest = hash_file(final)
            if caches:
                after = os.stat(final)
                if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                    caches.put(rel, st, digest, started)
            return digest

        digests = dict(zip(paths, self.pool.map(work, range(len(paths)))))  # noqa: B905 (3.8: no strict=)
        if caches:
            caches.save()
        return {"digests": digests}

    def op_parts(self, h: dict, data: bytes) -> dict:
        """For each large upload, how much of its ``.part`` exists and the digest of that prefix.

        The client compares the prefix digest with its own file before resuming from it; the
        hasher is kept so the upload continues hashing where the prefix ended.
        """
        out = {}
        self.parts.clear()
        for rel, digest, size in h["items"]:
            final = self.base.parent_ok(rel, False)
            part = part_name(final, digest)
            try:
                have = min(os.lstat(part).st_size, size)
            except FileNotFoundError:
                continue
            with open(part, "rb") as f:
                have, hasher = hash_prefix(f, have)
            self.parts[part] = (have, hasher)
            out[rel] = [have, hasher.hexdigest()]
        return {"parts": out}

    # the streamed upload: acknowledgements come back as items finish
    def op_put(self, h: dict, n: int) -> None:
        """One file streamed to its temporary (or resumable) name: files too big for a run."""
        rid = h["id"]
        rel = h["path"]
        try:
            final = self.base.parent_ok(rel, True)
        except BaseException as exc:
            self.conn.skip(n + trailer_size(h))
            self.conn.ack(rid, error_info(exc, rel))
            return
        self.put_large(rid, rel, final, h, n)

    def op_puts(self, h: dict, n: int) -> None:
        """A run of small files: one header listing ``[id, path, size, digest, mtime_ns]`` per
        file, their bytes back to back, written by one lane thread.

        A frame, a JSON header, a future and a lock round per file cost the helper about as
        much CPU as writing the file; a cold 20,000-file push spent 0.6 s of its GIL here.
        """
        items = h["items"]
        if not items or sum(item[2] for item in items) != n:
            raise Refused("a run's sizes do not add up to its payload", "protocol")
        data = self.conn.read_exact(n)
        with self.cond:
            while self.in_flight and self.in_flight + n > IN_FLIGHT_BYTES:
                self.cond.wait()
            self.in_flight += n
            self.pending += 1
        # The run's folder, as sent: put_run checks every path before it writes.
        self.lane_for(items[0][1], len(items)).submit(self.put_run, items, data)

    def lane_for(self, path: str, files: int = 1):  # type: ignore[no-untyped-def]
        """The writer thread for ``files`` small files in ``path``'s folder: one thread per run
        of LANE_RUN files of a folder.

        Creating and renaming hold the folder's lock in the kernel, and threads waiting for it
        spin: with every worker writing the same folder, a tenth of a 20,000-file push's CPU went
        to rwsem_spin_on_owner, far more where inode allocation is slow. Runs of one folder's
        files keep each folder mostly with one thread; a big flat folder still spreads over all
        of them, so its writes and closes (a round trip each on NFS) stay parallel.
        """
        folder = os.path.dirname(path)
        seen = self.folder_counts.get(folder, 0)
        self.folder_counts[folder] = seen + files
        return self.lanes[hash((folder, seen // LANE_RUN)) % len(self.lanes)]

    def put_run(self, items: list, data: bytes) -> None:
        acks: list = []
        view = memoryview(data)
        at = 0
        try:
            for rid, rel, size, digest, mtime_ns in items:
                body = view[at : at + size]
                at += size
                try:
                    self.put_small(self.base.parent_ok(rel, True), rel, body, digest, mtime_ns)
                    acks.append([rid, None])
                except BaseException as exc:
                    acks.append([rid, error_info(exc, rel)])
            self.conn.ack_many(acks)
            if self.flush_behind is not None:
                self.flush_behind.landed(len(data))
        finally:
            with self.cond:
                self.in_flight -= len(data)
                self.pending -= 1
                self.cond.notify_all()

    @staticmethod
    def put_small(final: str, rel: str, body: memoryview, digest: str, mtime_ns: int) -> None:
        got = hashlib.sha256(body).hexdigest()
        if got != digest:
            raise Refused(mismatch(rel, digest, got), "verify")
        tmp = temp_name(final)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                write_all(fd, body)
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            remove(tmp)
            raise

    def put_large(self, rid: int, rel: str, final: str, h: dict, n: int) -> None:
        """Stream a big file to its temporary (or resumable ``.part``) name, then verify."""
        offset = int(h.get("offset") or 0)
        resumable = bool(h.get("resumable"))
        if resumable:
            tmp = part_name(final, h["digest"])
            self.drop_other_parts(final, tmp)
        else:
            tmp = temp_name(final)
        try:
            hasher, f = self.open_target(tmp, offset, h, resumable)
        except BaseException as exc:
            self.conn.skip(n + trailer_size(h))
            self.conn.ack(rid, error_info(exc, rel))
            return
        sink = Sink(f, hasher)
        try:
            left = n
            while left:
                chunk = self.conn.read_exact(min(CHUNK, left))
                left -= len(chunk)
                sink.put(chunk)
                if self.flush_behind is not None:
                    self.flush_behind.landed(len(chunk))
            # A file hashed as it was sent: its digest follows its bytes (the header's names
            # its .part).
            expected = h["digest"]
            if trailer_size(h):
                expected = self.conn.read_exact(trailer_size(h)).decode("ascii", "replace")
        except EOFError:
            sink.close()
            if not resumable:
                remove(tmp)
            raise  # connection gone: a resumable .part keeps its verified-on-resume bytes
        failed = sink.close()
        try:
            if failed is not None:
                raise failed
            digest = hasher.hexdigest()
            if digest != expected:
                raise Refused(mismatch(rel, expected, digest), "verify")
            os.utime(tmp, ns=(h["mtime_ns"], h["mtime_ns"]))
            os.replace(tmp, final)
        except BaseException as exc:
            remove(tmp)
            self.conn.ack(rid, error_info(exc, rel))
            return
        self.conn.ack(rid)

    def open_target(self, tmp: str, offset: int, h: dict, resumable: bool):  # type: ignore[no-untyped-def]
        if not resumable:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            return hashlib.sha256(), os.fdopen(fd, "wb", buffering=0)
        hasher = hashlib.sha256()
        if offset:
            have, known = self.parts.get(tmp, (-1, None))
            if have != offset or known is None or known.hexdigest() != h.get("prefix_digest"):  # type: ignore[attr-defined]
                raise Refused(f"{h['path']}: the partial upload changed; it restarts next run", "verify")
            hasher = known.copy()  # type: ignore[attr-defined]
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o666)
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        return hasher, os.fdopen(fd, "wb", buffering=0)

    def drop_other_parts(self, final: str, keep: str) -> None:
        """A partial upload of an older version of the same file will never be resumed."""
        head, name = os.path.split(final)
        prefix = f".{name}{TEMP_MARKER}"
        try:
            names = os.listdir(head)
        except OSError:
            return
        for other in names:
            path = os.path.join(head, other)
            if other.startswith(prefix) and other.endswith(PART_SUFFIX) and path != keep:
                remove(path)

    def op_ping(self, h: dict, data: bytes) -> dict:
        """Nothing: the client times the round trip (see SshRemote.round_trip)."""
        return {}

    def op_barrier(self, h: dict, data: bytes) -> dict:
        """Answered once every earlier streamed upload has been acknowledged."""
        with self.cond:
            while self.pending:
                self.cond.wait()
        return {}

    # the streamed download: the client sent the whole list once
    def op_get(self, h: dict, n: int) -> None:
        """Send every listed file, in order, as one frame each.

        Small files are read by the pool in runs (up to RUN_FILES files or CHUNK bytes), and a
        run's frames go to the writer as one buffer: a future, a queue hand-off and three writes
        per file cost this helper 4.0 CPU-seconds for a cold 20,000-file pull (2.8 s alone on a
        pipe); by runs of 64, 2.0-2.5 CPU-seconds and 1.3-1.7 s. The pool still reads several
        runs at once, so a cold disk sees many requests."""
        rid = h["id"]
        items = h["items"]
        window: deque = deque()  # (future of a run's frames, None) or (None, a large item)
        todo = iter(range(len(items)))

        def refill() -> None:
            run: list = []
            run_bytes = 0
            while len(run) < RUN_FILES and run_bytes < CHUNK:
                i = next(todo, None)
                if i is None:
                    break
                rel, size = items[i][0], items[i][1]
                # [rel, size, offset, prefix digest]: resume a partial download from offset
                resume = (items[i][2], items[i][3]) if len(items[i]) > 3 else (0, "")
                if 0 <= size <= SMALL and not resume[0]:
                    run.append((i, rel))
                    run_bytes += size
                    continue
                if run:
                    window.append((self.pool.submit(self.read_run, rid, run), None))
                window.append((None, (i, rel, resume)))
                return
            if run:
                window.append((self.pool.submit(self.read_run, rid, run), None))

        for _ in range(WORKERS * 2):  # read ahead: runs arrive while others are sent
            refill()
        while window:
            run, large = window.popleft()
            refill()
            if large is not None:
                self.send_large(rid, *large)
            else:
                self.conn.send_raw(b"".join(run.result()))
        self.conn.send({"id": rid, "ok": True, "end": True})

    def read_run(self, rid: int, run: list) -> list:
        """The frames of a run of small files, an error frame for each one that fails. The last
        name is not followed (the listing refused links; one made since is an error here)."""
        frames: list = []
        for i, rel in run:
            body = b""
            try:
                fd = os.open(self.base.parent_ok(rel, False), READ_FLAGS)
                try:
                    st = os.fstat(fd)
                    body = read_to_end(fd, st.st_size)
                finally:
                    os.close(fd)
                # json.dumps of three integers, written out (a fifth of its cost per file)
                raw = b'{"id":%d,"i":%d,"mtime_ns":%d}' % (rid, i, st.st_mtime_ns)
            except BaseException as exc:
                failed = {"id": rid, "i": i, "error": error_info(exc, rel)}
                raw = json.dumps(failed, separators=(",", ":")).encode()
                body = b""
            frames += (FRAME.pack(len(raw), len(body)), raw, body)
        return frames

    def send_large(self, rid: int, i: int, rel: str, resume: tuple = (0, "")) -> None:
        offset, prefix_digest = resume
        try:
            f = open(self.base.parent_ok(rel, False), "rb", buffering=0)  # noqa: SIM115 (closed below)
            st = os.fstat(f.fileno())
            if offset and (offset >= st.st_size or hash_prefix(f, offset)[1].hexdigest() != prefix_digest):
                offset = 0  # the client's partial is not a prefix of this file: send it all
            f.seek(offset)
        except BaseException as exc:
            self.conn.send({"id": rid, "i": i, "error": error_info(exc, rel)})
            return
        with f:
            header = {"id": rid, "i": i, "mtime_ns": st.st_mtime_ns, "offset": offset}
            self.conn.send_head(header, st.st_size - offset)
            left = st.st_size - offset
            while left:
                try:
                    chunk = f.read(min(CHUNK, left))
                except OSError:
                    chunk = b""
                if not chunk:  # shrank or failed while read: pad, the client's digest check fails
                    chunk = bytes(min(CHUNK, left))
                self.conn.send_raw(chunk)
                left -= len(chunk)

    # dispatch
    def serve(self) -> None:
        self.conn.send({"hello": True, "protocol": PROTOCOL, "python": list(sys.version_info[:3])})
        streamed = {"put": self.op_put, "puts": self.op_puts, "get": self.op_get}
        while True:
            got = self.conn.recv()
            if got is None:
                return
            h, n = got
            op = h.get("op")
            if op in streamed:
                streamed[op](h, n)
                continue
            data = self.conn.read_exact(n) if n else b""
            handler = getattr(self, f"op_{op}", None)
            try:
                if handler is None:
                    raise Refused(f"unknown operation {op!r}", "protocol")
                result = handler(h, data)
                payload = b""
                if isinstance(result, tuple):
                    result, payload = result
                self.conn.send(dict(result, id=h["id"], ok=True), payload)
            except Exception as exc:
                # A request names its file as "path"; others (the index of list_delta, a folder
                # of a walk) are named by the OSError that failed on them.
                rel = h.get("path") or self.base.rel_of(getattr(exc, "filename", None))
                self.conn.send({"id": h["id"], "ok": False, "error": error_info(exc, rel)})


# -- small utilities ----------------------------------------------------------------------------
class Sink:
    """Write and hash a large upload in a second thread while the main thread reads the next
    chunks: file writes and hashlib release the GIL, so receiving and storing overlap."""

    def __init__(self, f, hasher) -> None:  # type: ignore[no-untyped-def]
        self.f = f
        self.hasher = hasher
        self.error: BaseException | None = None
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.thread = threading.Thread(target=self.run, name="helper-sink", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            chunk = self.q.get()
            if chunk is None:
                return
            if self.error is None:  # after a failure keep consuming: the stream stays in step
                try:
                    write_all(self.f.fileno(), chunk)
                    self.hasher.update(chunk)
                except OSError as exc:
                    self.error = exc

    def put(self, chunk: bytes) -> None:
        self.q.put(chunk)

    def close(self) -> BaseException | None:
        self.q.put(None)
        self.thread.join()
        self.f.close()
        return self.error


def read_to_end(fd: int, size: int) -> bytes:
    """A file's bytes, in one read when it still has the ``size`` it had (one more read sees
    the end; a file that grew meanwhile is read to its new end)."""
    parts = []
    size = max(size, 1)
    while True:
        chunk = os.read(fd, size)
        if not chunk:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        parts.append(chunk)
        size = CHUNK


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def bigger_pipe(fd: int) -> None:
    """1 MiB pipe buffers (Linux F_SETPIPE_SZ) mean fewer wake-ups per megabyte streamed."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), CHUNK)
    except (ImportError, OSError):
        pass


def mismatch(rel: str, expected: str, got: str) -> str:
    return f"{rel}: content hash mismatch (expected {expected[:12]}..., got {got[:12]}...)"


def temp_files_below(folder: str) -> list:
    """Every temporary file (a TEMP_MARKER name) in ``folder`` and below it."""
    return [os.path.join(d, n) for d, _dirs, files in os.walk(folder) for n in files if TEMP_MARKER in n]


def clear_temps(paths: list) -> dict:
    """Remove temporary files a killed writer left; keep recent resumable ``.part`` files."""
    removed = kept = 0
    now = time.time()
    for path in paths:
        if path.endswith(PART_SUFFIX):
            try:
                if now - os.lstat(path).st_mtime < PART_MAX_AGE_S:
                    kept += 1
                    continue
            except FileNotFoundError:
                continue
        remove(path)
        removed += 1
    return {"removed": removed, "kept_parts": kept}


def lock_token(path: str) -> str | None:
    """The token of the lock record at ``path``; None if it is gone or torn (nobody's)."""
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    return record.get("token") if isinstance(record, dict) else None


def read_index_into(path: str, out: dict) -> None:
    """Read the index at ``path`` into ``out`` (``raw`` bytes, ``stats`` by read_index_stats),
    or its read error under ``error`` (a missing index is no error: nothing is vouched for)."""
    try:
        with open(path, "rb") as f:
            out["raw"] = f.read()
    except FileNotFoundError:
        return
    except BaseException as exc:
        out["error"] = exc
        return
    out["stats"] = read_index_stats(out["raw"]) if out["raw"] else {}


def read_index_stats(raw: bytes) -> dict:
    """path -> [size, mtime_ns] of a tether index (docs/format.md), or {} if it cannot be read:
    then every file is listed as unvouched and the client judges the damage itself."""
    try:
        import gzip  # here: the transfer helper never reads an index

        lines = gzip.decompress(raw).decode("utf-8").split("\n")
        header = json.loads(lines[0])
        if header.get("format") != "tether-manifest" or header.get("version") != 1:
            return {}
        records = json.loads("[" + ",".join(line for line in lines[1:] if line) + "]")
        return {r["path"]: [r["size"], r["mtime_ns"]] for r in records}
    except (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return {}


def hash_file(path: str) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                return hasher.hexdigest()
            hasher.update(chunk)


def remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class FlushBehind:
    """Start the disk's writes while an upload still arrives (tether.fileio.FlushBehind on the
    client): a thread flushes the base's filesystem each time ``step`` more bytes have landed,
    never two at once, so the flush the client asks for before it writes the index finds
    little left (0.29 s after a 20,000-file push here, 0.01-0.03 s with it). That last flush
    alone gives durability; a background flush's error is left to it."""

    def __init__(self, path: str, step: int) -> None:
        self.path = path
        self.step = step
        self.pending = 0
        self.asked = 0  # flushes asked for so far
        self.done = 0  # requests served (a flush covers every request made before it began)
        self.runs = 0  # flushes that ran
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None  # started on the first step

    @classmethod
    def for_folder(cls, path: str, step: int, network: tuple) -> FlushBehind | None:
        """One for a local disk; None for a step of 0 or a network or unknown filesystem."""
        kind = filesystem_type(path) if step > 0 else "unknown"
        if kind == "unknown" or kind.startswith(network):
            return None
        return cls(path, step)

    def landed(self, n: int) -> None:
        with self.cond:
            self.pending += n
            if self.pending < self.step:
                return
            self.pending = 0
            self.asked += 1
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="helper-flush", daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def run(self) -> None:
        while True:
            with self.cond:
                while self.done == self.asked:
                    self.cond.wait()
                serving = self.asked
            with contextlib.suppress(Exception):
                syncfs(self.path)
            with self.cond:
                self.done = serving
                self.runs += 1
                self.cond.notify_all()

    def finish(self) -> int:
        """Wait for the flushes asked for so far; how many ran in the background."""
        with self.cond:
            while self.done != self.asked:
                self.cond.wait()
            return self.runs


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding ``path`` (longest mount point in /proc/mounts)."""
    try:
        with open("/proc/mounts") as f:
            mounts = f.read().splitlines()
    except OSError:
        return "unknown"
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_excl(final: str, data: bytes) -> bool:
    try:
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


class flocked:
    """Hold an exclusive flock on ``path`` (best effort: some filesystems refuse flock)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> flocked:
        try:
            import fcntl

            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing releases the flock


def syncfs(path: str) -> None:
    """Flush the filesystem holding ``path``: Linux syncfs if ctypes finds it, else sync()."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if getattr(libc, "syncfs", None) is not None and libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (ImportError, OSError, AttributeError):
        pass
    os.sync()


class HashCaches:
    """Digests of remote files keyed by (inode, size, mtime_ns, ctime_ns), per dataset.

    Stored as ``<dataset>/.tether/hashcache.json`` (the dataset is the nearest folder above a file
    that has a ``.tether/`` folder, i.e. one tether wrote an index to). JSON and an atomic rename
    rather than sqlite, whose locking is unreliable on the NFS/Lustre filesystems of clusters.
    ctime is part of the key: it changes on every write and cannot be set back by a tool.
    """

    def __init__(self, base: Base) -> None:
        self.base = base
        self.roots: dict[str, str | None] = {}
        self.tables: dict[str, dict] = {}
        self.dirty: set[str] = set()
        self.lock = threading.Lock()

    def root_of(self, rel: str) -> str | None:
        folder = os.path.dirname(rel)
        chain = []
        found = None
        while True:
            if folder in self.roots:
                found = self.roots[folder]
                break
            chain.append(folder)
            if os.path.isdir(os.path.join(self.base.path, folder, STATE_DIR)):
                found = folder
                break
            if not folder:
                break
            folder = os.path.dirname(folder)
        for f in chain:
            self.roots[f] = found
        return found

    def table(self, root: str) -> dict:
        table = self.tables.get(root)
        if table is None:
            table = {}
            try:
                with open(os.path.join(self.base.path, root, STATE_DIR, HASH_CACHE), "rb") as f:
                    raw = json.load(f)
                if raw.get("version") == 1 and isinstance(raw.get("entries"), dict):
                    table = raw["entries"]
            except (OSError, ValueError, AttributeError):
                pass
            self.tables[root] = table
        return table

    def key(self, rel: str) -> tuple[str | None, str]:
        root = self.root_of(rel)
        return root, (rel[len(root) + 1 :] if root else rel)

    def get(self, rel: str, st: os.stat_result) -> str | None:
        with self.lock:
            root, key = self.key(rel)
            if root is None:
                return None
            row = self.table(root).get(key)
        if not row or row[:4] != [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]:
            return None
        if st.st_mtime_ns >= row[5] - RACY_WINDOW_NS:
            return None
        return row[4]

    def put(self, rel: str, st: os.stat_result, digest: str, hashed_at: int) -> None:
        with self.lock:
            root, key = self.key(rel)
            if root is None:
                return
            self.table(root)[key] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest, hashed_at]
            self.dirty.add(root)

    def save(self) -> None:
        for root in self.dirty:
            path = os.path.join(self.base.path, root, STATE_DIR, HASH_CACHE)
            tmp = temp_name(path)
            try:
                with open(tmp, "w") as f:
                    json.dump({"version": 1, "entries": self.tables[root]}, f, separators=(",", ":"))
                os.replace(tmp, path)
            except OSError:
                remove(tmp)  # a cache that cannot be written only costs time next run


def main() -> None:
    conn = Conn()
    helper = Helper(conn)
    try:
        helper.serve()  # returns at a clean end of input: the client has sent all it will
    except EOFError:
        conn.close()  # the client left mid-request: drop answers (the next run cleans up)
    helper.shutdown()  # files already received complete (verified) or are removed
    conn.drain(timeout=30)
    os._exit(0)  # without joining a writer that may be stuck on a dead channel


if __name__ == "__main__":
    main()
