"""Object stores as remotes: S3 (AWS, Cloudflare R2, MinIO, any S3-compatible), GCS and Azure.

Everything goes through obstore (Rust, one connection pool, the GIL released during I/O), except
the control of S3 multipart uploads that obstore does not expose (see
:mod:`tether.remotes.objectstore_multipart`), which makes large uploads resumable.

How the Remote protocol maps onto an object store:

- **Keys** are ``<prefix>/<path>``. There are no folders and no temporary names: a PUT and a
  completed multipart upload appear atomically, so bytes are verified *before* they are sent
  (hash-while-reading), and a multipart upload whose bytes do not hash to the recorded digest
  is aborted instead of completed. A wrong digest never reaches the final key.
- **Listing** is paginated and streamed, and every key is checked by
  :func:`tether.paths.check_relpath` before anything uses it (a key like ``ds/../x`` in a bucket
  someone else writes to is refused, exit 2).
- **Integrity**: where the store accepts it, each single PUT carries ``x-amz-checksum-sha256``
  and each multipart part its own, so the server checks the bytes it stored; stores that reject
  the header (some R2/MinIO versions) are retried without it, once, and remembered. Downloads are
  hashed while they stream and promoted only on a match.
- **Locks**: ``create_exclusive`` is a PUT with ``If-None-Match: *`` where the store enforces it
  (probed once per run); elsewhere it falls back to HEAD + PUT + read-back, which is weaker and
  says so.
- **mtime**: object stores stamp their own time, so ``preserves_mtime`` is False and the index
  vouches by (size, ETag) instead. A push records the ETag each upload was answered with
  (``upload_tags``), so it need not list the prefix again to learn the stamps; the index keeps
  the source file's mtime, which a pull gives the file it writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import obstore
from obstore import exceptions as obx

from tether import fileio
from tether.errors import (
    ConnectionDropped,
    InvalidPath,
    RemotePermissionError,
    RemoteUnavailable,
    TetherError,
    VerificationError,
    first_line,
)
from tether.fileio import check_source_state, create_in_place, ensure_dir
from tether.foreign import plain_md5
from tether.hashing import CHUNK
from tether.manifest import parse_provisional
from tether.paths import STATE_DIR, check_relpath, is_temp_name
from tether.remotes import objectstore_multipart as mp
from tether.remotes.base import ANY_SIZE, Capabilities, ErrorKind, OnBytes, RemoteStat
from tether.remotes.objectstore_config import (  # re-exported: the backend's public surface
    MiB,
    StoreSettings,
    build_settings,
    make_store,
    resolve_credentials,
)
from tether.scan import StatEntry

if TYPE_CHECKING:
    from tether.config import RemoteConfig
    from tether.remotes import ParsedURL

log = logging.getLogger("tether.objectstore")

SMALL_READ = 8 * MiB  # objects up to this size are fetched in one response body
LIST_STREAMS = 8  # folders listed at once (see ObjectStoreRemote._list)
MAX_TAG_LOOKUPS = 1000  # HEADs after a push before one listing is the cheaper way (upload_tags)
CREDENTIAL_CODES = {
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
}
_CODE = re.compile(r"<Code>\s*([A-Za-z]+)\s*</Code>")
_probe_cache: dict[tuple[str, str], bool] = {}
_probe_lock = threading.Lock()
# The store's verdict on If-None-Match, kept in the workspace between runs: the probe is two or
# three requests (conditional PUTs, then a DELETE) before every push or pull would take its
# lock, 40-60 ms through a 20 ms link. Asked again after a day, and by every `tether remote test`.
PROBES_FILE = "store-probes.json"
PROBE_TTL_S = 24 * 3600


# -- small helpers ------------------------------------------------------------------------------
def _code(exc: BaseException) -> str | None:
    if isinstance(exc, mp.S3Error):
        return exc.code
    m = _CODE.search(str(exc))
    return m.group(1) if m else None


def _status(exc: BaseException) -> int | None:
    if isinstance(exc, mp.S3Error):
        return exc.status
    m = re.search(r"status code: (\d{3})", str(exc)) or re.search(r"status: (\d{3})", str(exc))
    return int(m.group(1)) if m else None


def _is_connection_failure(exc: BaseException) -> bool:
    if isinstance(exc, mp.S3ConnectionError | ConnectionError | TimeoutError):
        return True
    text = str(exc)
    return any(
        s in text
        for s in (
            "error sending request",
            "Connect",
            "connection refused",
            "dns error",
            "timed out",
            "TimedOut",
            *_DROPPED_MID_BODY,
        )
    )


# How reqwest/hyper (inside obstore) report a connection that closed while a body was in flight.
_DROPPED_MID_BODY = ("request or response body error", "IncompleteBody", "connection reset", "broken pipe")


def _dropped_mid_body(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in _DROPPED_MID_BODY)


def _mtime_ns(when: datetime) -> int:
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


class ByteBudget:
    """Bounds the file bytes held in memory by all concurrent transfers together.

    Uploads read a file (or a part) into memory to hash it before sending it; 96 connections
    times 32 MiB files would otherwise hold 3 GiB. A reservation larger than the whole
    budget is clamped to it, so one huge request waits for the others instead of deadlocking.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, n: int) -> Iterator[None]:
        n = min(max(n, 0), self.total)
        with self._cond:
            while self.free < n:
                self._cond.wait()
            self.free -= n
        try:
            yield
        finally:
            with self._cond:
                self.free += n
                self._cond.notify_all()


class OrderedHasher:
    """Hash a file whose parts are written out of order (parallel ranged GETs), in file order.

    Workers ``wait_turn(i)`` before fetching part ``i`` (at most ``window`` parts ahead of the
    hash cursor), write it, then report ``written(i)``. Each part is read back from the file
    once every part before it is written: the bytes hashed are the bytes on disk, and no part
    stays in memory after its write. (Parts held in memory until their turn took a pull of four
    512 MiB files to 986 MiB RSS while its memory budget said 512 MiB.)
    """

    def __init__(self, fd: int, size: int, span: int, window: int) -> None:
        self.fd, self.size, self.span = fd, size, span
        self.window = max(1, window)
        self.cursor = 0
        self.done: set[int] = set()
        self.hasher = hashlib.sha256()
        self.failed = False
        self._cond = threading.Condition()

    def wait_turn(self, index: int) -> bool:
        with self._cond:
            while not self.failed and index >= self.cursor + self.window:
                self._cond.wait()
            return not self.failed

    def written(self, index: int) -> None:
        with self._cond:
            self.done.add(index)
            while self.cursor in self.done:
                self.done.discard(self.cursor)
                self._hash_part(self.cursor)
                self.cursor += 1
            self._cond.notify_all()

    def _hash_part(self, index: int) -> None:
        offset, end = index * self.span, min(self.size, (index + 1) * self.span)
        buffer = bytearray(min(CHUNK, end - offset))
        view = memoryview(buffer)
        while offset < end:
            n = os.preadv(self.fd, [view[: min(len(buffer), end - offset)]], offset)
            if n <= 0:
                raise VerificationError(f"the file shrank while it was written (at byte {offset})")
            self.hasher.update(view[:n])
            offset += n

    def fail(self) -> None:
        with self._cond:
            self.failed = True
            self._cond.notify_all()


class _Reader(io.RawIOBase):
    """A sequential file object over one streamed GET (no range requests: some S3-compatible
    servers answer a range past the end with the whole object, which obstore's reader rejects)."""

    def __init__(self, chunks: Iterator[bytes], remote: ObjectStoreRemote, key: str) -> None:
        self._chunks = chunks
        self._remote = remote
        self._key = key
        self._left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            try:
                chunk = next(self._chunks, None)
            except Exception as exc:
                raise self._remote.to_tether(exc, self._key) from exc
            if chunk is None:
                return 0
            self._left = memoryview(chunk)
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


def _resumable_uploads(settings: StoreSettings) -> bool:
    """Large uploads go through tether's own S3 client (journaled, resumable): S3 with static
    keys. Elsewhere obstore's multipart upload, which cannot be resumed."""
    return settings.scheme == "s3" and settings.credentials.static is not None


# -- the remote ---------------------------------------------------------------------------------
class ObjectStoreRemote:
    """A bucket and prefix as a tether remote (see the module docstring for the mapping)."""

    def __init__(self, url: str, settings: StoreSettings) -> None:
        self.url = url
        self.settings = settings
        self.capabilities = Capabilities(
            parallel_connections=settings.connections,
            parallel_downloads=settings.download_connections,
            atomic_replace=True,
            conditional_create=bool(settings.conditional_writes),
            server_side_hashing=False,
            lock_before_listing=True,
            preserves_mtime=False,
            # Files are read once as they are sent: single PUTs whole, resumable multipart uploads
            # (S3 with static keys) in order, part by part; hash those bytes on the way. obstore's
            # own multipart upload (no journal) gets files hashed before.
            hash_on_write_max=ANY_SIZE if _resumable_uploads(settings) else settings.multipart_threshold - 1,
        )
        self.notices: list[str] = []
        self._store = make_store(settings)
        self._checksum = settings.checksum and settings.scheme == "s3"
        self._put_store = make_store(settings, checksum=True) if self._checksum else self._store
        self._budget = ByteBudget(settings.memory_budget)
        self._client: mp.S3Client | None = None
        if _resumable_uploads(settings):
            assert settings.credentials.static is not None
            self._client = mp.S3Client(
                settings.s3_endpoint,
                settings.bucket,
                settings.region,
                settings.credentials.static,
                virtual_hosted=settings.virtual_hosted_style,
                timeout_s=settings.timeout,
                max_retries=settings.max_retries,
                retry_timeout_s=settings.retry_timeout,
            )
        self._part_checksum = self._checksum
        self._conditional = settings.conditional_writes
        self._ranges_native = True  # obstore ranged GETs, until a server answers them with a 200
        self._lock = threading.Lock()
        # key -> the ETag a single PUT of this instance was answered with (see upload_tags)
        self._put_tags: dict[str, str] = {}

    # -- keys -------------------------------------------------------------------------------
    def key(self, path: str) -> str:
        """The object key of a remote path; the path is checked first (invariant 5)."""
        if path:
            check_relpath(path)
        return "/".join(p for p in (self.settings.prefix, path) if p)

    def _rel(self, key: str, base: str) -> str:
        return key[len(base) + 1 :] if base else key

    def describe(self) -> str:
        return f"{self.settings.scheme}://{self.settings.bucket}/{self.settings.prefix}".rstrip("/")

    # -- errors -----------------------------------------------------------------------------
    def to_tether(self, exc: BaseException, key: str = "") -> BaseException:
        """One-line tether errors for what users can fix; other errors pass through unchanged."""
        if isinstance(exc, TetherError):
            return exc
        s = self.settings
        code = _code(exc)
        status = _status(exc)
        where = s.where
        if isinstance(exc, obx.InvalidPathError):
            bad = re.search(r'Error parsing Path "([^"]*)"', str(exc))
            shown = bad.group(1) if bad else first_line(exc)
            return InvalidPath(
                f"remote {self.describe()} lists a key tether refuses: {shown!r}",
                hint="Someone wrote an object whose name escapes its folder ('..', '//', absolute). "
                "Remove or rename it in the bucket; tether will not touch it.",
            )
        if "169.254.169.254" in str(exc) or "169.254.170.2" in str(exc):
            return RemotePermissionError(
                f"no credentials for {where}: none in the remote's options, the environment or "
                "~/.aws, and no instance role answered",
                hint="Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile (profile option or "
                "AWS_PROFILE), or access_key_id/secret_access_key in .tether/config.local.toml.",
            )
        if code == "NoSuchBucket":
            return RemoteUnavailable(
                f"bucket {s.bucket!r} does not exist at {where}",
                hint="Create the bucket, or fix the bucket name in the remote URL (and endpoint/region).",
            )
        if code == "RequestTimeTooSkewed":
            return RemotePermissionError(
                f"{where} rejected the request because this machine's clock is off by more than 15 "
                "minutes (RequestTimeTooSkewed)",
                hint="Fix the system clock (e.g. `timedatectl set-ntp true`), then rerun.",
            )
        if code in CREDENTIAL_CODES:
            hint = f"Check the keys (from {s.credentials.source})"
            if code == "AuthorizationHeaderMalformed":
                hint = "Check the region option (R2 uses region 'auto')"
            return RemotePermissionError(
                f"{where} rejected the credentials from {s.credentials.source} ({code})",
                hint=hint + "; for a profile, set the profile option or AWS_PROFILE.",
            )
        if code == "AccessDenied" or isinstance(exc, obx.PermissionDeniedError | obx.UnauthenticatedError):
            target = f"{self.describe()}/{self._rel(key, s.prefix)}" if key else self.describe()
            return RemotePermissionError(
                f"access denied to {target} ({code or 'permission denied'}; credentials from "
                f"{s.credentials.source})",
                hint="The keys need list, get, put and delete on this bucket and prefix "
                "(and AbortMultipartUpload/ListMultipartUploadParts for large files).",
            )
        if code == "SlowDown" or status == 503:
            return RemoteUnavailable(
                f"{where} kept throttling requests (503 {code or 'Service Unavailable'}) after "
                f"{s.max_retries} retries with backoff",
                hint="Rerun later (completed files are kept), or lower the concurrency with --jobs.",
            )
        if _dropped_mid_body(exc):
            what = f" while transferring {self._rel(key, s.prefix)}" if key else ""
            return ConnectionDropped(
                f"the connection to {where} dropped{what}, again on every retry",
                hint="Rerun the same command: files already transferred and verified are kept. If "
                "it keeps happening, lower the concurrency with --jobs or check the network.",
            )
        if _is_connection_failure(exc):
            reason = (
                "connection refused"
                if "refused" in str(exc).lower() or "Connect" in str(exc)
                else "no answer"
            )
            if isinstance(exc, mp.S3ConnectionError):
                reason = str(exc).rsplit(": ", 1)[-1]
            return RemoteUnavailable(
                f"cannot reach {where} ({reason})",
                hint="Check the endpoint URL and the network; for a local MinIO, is the server running?",
            )
        if isinstance(exc, FileNotFoundError):
            return exc
        if status is not None and status >= 500:
            return RemoteUnavailable(f"{where} failed: {status} {code or ''}".strip(), hint="Rerun later.")
        return exc

    def _call(self, fn: Callable[[], Any], key: str = "") -> Any:
        try:
            return fn()
        except FileNotFoundError as exc:
            if _code(exc) == "NoSuchBucket":
                raise self.to_tether(exc, key) from None
            raise FileNotFoundError(
                f"{self.describe()}: {self._rel(key, self.settings.prefix)} not found"
            ) from None
        except Exception as exc:
            mapped = self.to_tether(exc, key)
            if mapped is exc:
                raise
            raise mapped from exc

    def classify_error(self, exc: BaseException) -> ErrorKind:
        if isinstance(exc, ConnectionDropped):  # one file's body cut after obstore's retries
            return ErrorKind.RETRYABLE
        if isinstance(exc, mp.S3Error) and exc.retryable:
            return ErrorKind.RETRYABLE
        if isinstance(exc, obx.GenericError) and (_is_connection_failure(exc) or (_status(exc) or 0) >= 500):
            return ErrorKind.RETRYABLE
        if isinstance(exc, mp.S3ConnectionError | TimeoutError):
            return ErrorKind.RETRYABLE
        return ErrorKind.PERMANENT

    # -- protocol: reading ------------------------------------------------------------------
    def check(self) -> None:
        """One LIST request: credentials, bucket and prefix access, endpoint reachability."""
        base = self.settings.prefix
        stream = obstore.list(self._store, base or None, chunk_size=1)
        self._call(lambda: next(iter(stream), None), base)

    def list_files(self, prefix: str) -> Iterator[RemoteStat]:
        base = self.key(prefix)
        return self._list(base)

    def _list(self, base: str) -> Iterator[RemoteStat]:
        """Every object below ``base``, a LIST page (1,000 objects) at a time.

        A page is a round trip plus the server's work, and one stream reads them one after
        another: 20,000 objects took 0.30-0.36 s from a loopback `rclone serve s3` and 0.78 s
        through 20 ms. Where the top level holds a few folders (a dataset's sidecar folders, the
        versioned layout's fan-out), each folder gets its own stream, LIST_STREAMS at a time:
        0.16 s and 0.22-0.31 s. Only LIST_STREAMS folders' listings are held at once.
        """
        level = self._top_level(base)
        if level is None:
            yield from self._list_stream(base, base)
            return
        folders, has_objects = level
        with ThreadPoolExecutor(max_workers=LIST_STREAMS, thread_name_prefix="tether-list") as pool:
            tasks: list[Callable[[], list[RemoteStat]]] = [
                lambda f=f: list(self._list_stream(f, base)) for f in folders
            ]
            if has_objects:
                tasks.insert(0, lambda: self._list_level(base))
            pending: deque[Future[list[RemoteStat]]] = deque()
            try:
                for task in tasks:
                    pending.append(pool.submit(task))
                    if len(pending) == LIST_STREAMS:
                        yield from pending.popleft().result()
                while pending:
                    yield from pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def _top_level(self, base: str) -> tuple[list[str], bool] | None:
        """The folders directly below ``base`` (keys, no trailing '/') and whether objects sit
        beside them, if one page of a delimited listing holds the whole level and it has two or
        more folders; None where one stream is the way (a flat folder, a store other than S3
        with static keys, a server refusing the request, a name the listing must refuse)."""
        if self._client is None:
            return None
        prefix = f"{base}/" if base else ""
        try:
            page = self._client.list_folders(prefix)
        except mp.S3Error as exc:
            if exc.status in (400, 405, 501):
                return None
            raise self.to_tether(exc, base) from exc
        except mp.S3ConnectionError as exc:
            raise self.to_tether(exc, base) from exc
        if not page.complete or len(page.folders) < 2:
            return None
        for folder in page.folders:
            name = folder[len(prefix) : -1]
            if not folder.startswith(prefix) or not folder.endswith("/") or name in ("", ".", ".."):
                return None  # the one stream lists it, and refuses a bad name, naming it
        return [folder[:-1] for folder in page.folders], page.has_objects

    def _list_level(self, base: str) -> list[RemoteStat]:
        """The objects directly below ``base`` (not in its folders): at most a page."""
        level = self._call(lambda: obstore.list_with_delimiter(self._store, base or None), base)
        return [st for meta in level["objects"] if (st := self._stat(meta, base)) is not None]

    def _list_stream(self, where: str, base: str) -> Iterator[RemoteStat]:
        stream = obstore.list(self._store, where or None, chunk_size=1000)
        while True:
            chunk = self._call(lambda: next(stream, None), where)
            if chunk is None:
                return
            for meta in chunk:
                stat = self._stat(meta, base)
                if stat is not None:
                    yield stat

    def _stat(self, meta: dict[str, Any], base: str) -> RemoteStat | None:
        key: str = meta["path"]
        rel = self._rel(key, base)
        if not rel or (rel.endswith("/") and meta["size"] == 0):
            return None  # a folder marker made by a console or another tool
        parts = rel.split("/")
        if STATE_DIR in parts or ".git" in parts:
            if any(p in ("", ".", "..") for p in parts):
                check_relpath(rel, what=f"key in {self.describe()}")
            return None  # tether's state (index, lock) and git's, at any depth: never data
        check_relpath(rel, what=f"key in {self.describe()}")
        if is_temp_name(rel):
            return None
        etag = meta.get("e_tag")
        return RemoteStat(
            rel, int(meta["size"]), _mtime_ns(meta["last_modified"]), etag.strip('"') if etag else None
        )

    def exists(self, path: str) -> bool:
        key = self.key(path)
        try:
            self._call(lambda: obstore.head(self._store, key), key)
        except FileNotFoundError:
            return False
        return True

    def read_bytes(self, path: str) -> bytes:
        key = self.key(path)
        return bytes(self._call(lambda: obstore.get(self._store, key).bytes(), key))

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        """Callers ask within the size the listing gave (a range past the end is an error here)."""
        key = self.key(path)
        if length <= 0:
            return b""
        try:
            return bytes(
                self._call(lambda: obstore.get_range(self._store, key, start=offset, length=length), key)
            )
        except obx.GenericError as exc:
            if "non-partial response" not in str(exc):
                raise
            # Some servers (rclone serve s3) answer a Range request with the whole object.
            return self.read_bytes(path)[offset : offset + length]

    def open_read(self, path: str) -> BinaryIO:
        key = self.key(path)
        result = self._call(lambda: obstore.get(self._store, key), key)
        chunks = iter(result.stream(min_chunk_size=CHUNK))
        return io.BufferedReader(_Reader(chunks, self, key), buffer_size=CHUNK)  # type: ignore[return-value]

    def hash_files(self, paths: Iterable[str], *, use_cache: bool = True) -> dict[str, str]:
        """Download and hash (object stores cannot hash for us): correct, but costs the bytes."""
        paths = list(paths)
        for p in paths:
            check_relpath(p)

        def one(path: str) -> tuple[str, str]:
            key = self.key(path)
            result = self._call(lambda: obstore.get(self._store, key), key)
            h = hashlib.sha256()
            if result.meta["size"] <= SMALL_READ:
                h.update(self._call(result.bytes, key))
            else:
                for chunk in self._call(lambda: result.stream(min_chunk_size=CHUNK), key):
                    h.update(chunk)
            return path, h.hexdigest()

        with ThreadPoolExecutor(max_workers=max(1, min(self.settings.connections, len(paths) or 1))) as pool:
            return dict(pool.map(one, paths))

    # -- protocol: writing ------------------------------------------------------------------
    def _put(self, key: str, data: bytes | memoryview, *, mode: str | None = None) -> None:
        """One PUT, with the SHA-256 checksum where the store takes it (dropped once if refused)."""
        attributes = {"Storage-Class": self.settings.storage_class} if self.settings.storage_class else None
        store = self._put_store if self._checksum else self._store
        try:
            done = obstore.put(store, key, data, mode=mode, use_multipart=False, attributes=attributes)  # type: ignore[arg-type]
        except obx.AlreadyExistsError:
            raise
        except Exception as exc:
            if not (self._checksum and _checksum_rejected(exc)):
                mapped = self.to_tether(exc, key)
                if mapped is exc:
                    raise
                raise mapped from exc
            self._drop_checksums(exc)
            done = self._call(
                lambda: obstore.put(
                    self._store,
                    key,
                    data,
                    mode=mode,
                    use_multipart=False,
                    attributes=attributes,  # type: ignore[arg-type]
                ),
                key,
            )
        tag = done.get("e_tag")
        if tag:
            self._put_tags[key] = tag.strip('"')
        else:
            self._put_tags.pop(key, None)

    def upload_tags(self, paths: Sequence[str]) -> dict[str, str] | None:
        """TaggedUploads: single PUTs' tags as they were answered; multipart objects' by HEAD,
        concurrently (few: large files), since a store may list another form than the
        completion's (``rclone serve s3`` lists the whole object's MD5). One single PUT's tag is
        checked by a HEAD beside them: a store whose answers and listings name objects
        differently (another S3-compatible, GCS or Azure through obstore) would otherwise have
        every pushed object downloaded to be hashed on the next look. None if any tag is
        unknown or that check fails, or too many would need a HEAD: a listing (1,000 objects a
        request) is then cheaper."""
        tags: dict[str, str] = {}
        ask: list[str] = []
        for path in paths:
            tag = self._put_tags.get(self.key(path))
            if tag is None:
                ask.append(path)
            else:
                tags[path] = tag
        if len(ask) > MAX_TAG_LOOKUPS:
            return None
        sample = next(iter(tags), None)
        if sample is not None:
            ask.append(sample)  # asked again: the store must name it as its PUT was answered

        def head(path: str) -> str | None:
            key = self.key(path)
            try:
                tag = self._call(lambda: obstore.head(self._store, key), key).get("e_tag")
            except FileNotFoundError:
                return None
            return tag.strip('"') if tag else None

        if ask:
            with ThreadPoolExecutor(max_workers=min(self.settings.connections, len(ask))) as pool:
                for path, tag in zip(ask, pool.map(head, ask), strict=True):
                    if tag is None or (path == sample and tag != tags[path]):
                        return None
                    tags[path] = tag
        return tags

    def _drop_checksums(self, exc: BaseException) -> None:
        with self._lock:
            if self._checksum:
                self._checksum = False
                self._part_checksum = False
                self._notice(
                    f"{self.settings.where} refused the x-amz-checksum-sha256 header "
                    f"({_code(exc) or 'rejected'}); uploading without it: bytes are still verified "
                    "before upload and on download"
                )

    def _notice(self, text: str) -> None:
        if text not in self.notices:
            self.notices.append(text)
            log.warning("warning: %s", text)

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        self._put(self.key(path), data)

    def create_exclusive(self, path: str, data: bytes, *, within: str | None = None) -> bool:
        key = self.key(path)  # ``within``: no folders here, so nothing to check or to make
        if self._conditional_supported(path):
            try:
                self._put(key, data, mode="create")
            except (obx.AlreadyExistsError, obx.PreconditionError):
                return False  # exists, or a racing create won (409 ConditionalRequestConflict)
            return True
        # Fallback (store ignores If-None-Match): check, write, read back. Two writers racing
        # within one round trip can both see their own record; the lease's ensure_held() before
        # the index is written catches that, so at worst both upload data, never both commit.
        if self.exists(path):
            return False
        self._put(key, data)
        try:
            return self.read_bytes(path) == data
        except FileNotFoundError:
            return False

    def _conditional_supported(self, path: str) -> bool:
        if self._conditional is not None:
            return self._conditional
        cache_key = (self.settings.where, self.settings.bucket)
        with _probe_lock:
            known = _probe_cache.get(cache_key)
            if known is None:
                known = self._remembered_conditional()
            if known is None:
                folder = path.rsplit("/", 1)[0] if "/" in path else ""
                known = self.probe_conditional_writes(folder)
                self.remember_conditional(known)
            _probe_cache[cache_key] = known
        self._conditional = known
        self.capabilities = replace(self.capabilities, conditional_create=known)
        if not known:
            self._notice(
                f"{self.settings.where} does not enforce conditional writes (If-None-Match); the lock "
                "uses a put + read-back check instead, which is weaker (see docs/object-stores.md)"
            )
        return known

    def _probes(self) -> tuple[Path | None, dict[str, Any]]:
        state = self.settings.state_dir
        if state is None:
            return None, {}
        path = state / PROBES_FILE
        try:
            raw = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return path, {}  # none yet, or damaged: probe again and rewrite it
        return path, raw if isinstance(raw, dict) else {}

    def _probe_key(self) -> str:
        return f"{self.settings.where} {self.settings.bucket}"

    def _remembered_conditional(self) -> bool | None:
        """The verdict an earlier run recorded, if it is less than PROBE_TTL_S old."""
        _path, probes = self._probes()
        entry = probes.get(self._probe_key())
        if not isinstance(entry, dict):
            return None
        enforced, checked = entry.get("conditional_writes"), entry.get("checked")
        if not isinstance(enforced, bool) or not isinstance(checked, (int, float)):
            return None
        return enforced if 0 <= time.time() - checked < PROBE_TTL_S else None

    def remember_conditional(self, enforced: bool) -> None:
        path, probes = self._probes()
        if path is None:
            return
        probes[self._probe_key()] = {"conditional_writes": enforced, "checked": time.time()}
        data = json.dumps(probes, indent=1, sort_keys=True).encode()
        with contextlib.suppress(OSError, TetherError):  # a workspace we cannot write: asked again
            fileio.write_bytes_atomic(path, data, durable=False)

    def probe_conditional_writes(self, folder: str) -> bool:
        """Create a probe object twice with If-None-Match: the store enforces it iff the second fails."""
        probe = "/".join(p for p in (folder, f"cw-probe{secrets.token_hex(6)}") if p)
        key = self.key(probe)
        try:
            try:
                obstore.put(self._store, key, b"1", mode="create")
            except obx.NotSupportedError:
                return False
            except Exception as exc:
                raise self.to_tether(exc, key) from exc
            try:
                obstore.put(self._store, key, b"2", mode="create")
            except (obx.AlreadyExistsError, obx.PreconditionError):
                return True
            except obx.NotSupportedError:
                return False
            return False
        finally:
            with contextlib.suppress(Exception):
                obstore.delete(self._store, key)

    def delete(self, path: str) -> None:
        key = self.key(path)
        with contextlib.suppress(FileNotFoundError):  # already gone is what delete means
            self._call(lambda: obstore.delete(self._store, key), key)

    def flush(self) -> None:
        """Nothing to do: an object store acknowledges a PUT only once it is durable."""

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # -- transfers ----------------------------------------------------------------------------
    def put_file(
        self, source: Path, path: str, *, digest: str, mtime_ns: int, on_bytes: OnBytes | None = None
    ) -> None:
        key = self.key(path)
        size = os.stat(source).st_size
        if size < self.settings.multipart_threshold:
            self._put_small(source, key, size, digest, path, on_bytes)
            return
        self._put_tags.pop(key, None)  # a multipart upload's tag is asked for (upload_tags)
        if self._client is not None:
            self._put_resumable(source, key, size, digest, path, on_bytes)
        else:
            self._put_streamed(source, key, digest, path, on_bytes)

    def _put_small(
        self, source: Path, key: str, size: int, digest: str, label: str, on_bytes: OnBytes | None
    ) -> None:
        """Read, hash, then PUT: bytes that do not match the plan's digest are never sent."""
        with self._budget.reserve(size):
            with open(source, "rb", buffering=0) as f:
                data = f.read()
            got = hashlib.sha256(data).hexdigest()
            if got != digest:
                raise _mismatch(label, digest, got)
            self._put(key, data)
        if on_bytes is not None:
            on_bytes(len(data))

    def put_file_hashing(
        self, source: Path, path: str, *, expect: StatEntry, mtime_ns: int, on_bytes: OnBytes | None = None
    ) -> str:
        """A file never hashed before: hash the bytes read (the source exactly as scanned) and
        return that SHA-256. A single PUT sends it as the object's checksum; a resumable
        multipart upload sends each part's own (see mp.upload_file)."""
        if expect.size >= self.settings.multipart_threshold:
            self._put_tags.pop(self.key(path), None)
            if self._client is None:
                raise ValueError(f"{path}: only single-request uploads may be sent unhashed here")
            return self._put_resumable(
                source, self.key(path), expect.size, None, path, on_bytes, expect=expect
            )
        with self._budget.reserve(expect.size):
            with open(source, "rb", buffering=0) as f:
                check_source_state(f.fileno(), expect, path, "after it was scanned")
                data = f.read()
                check_source_state(f.fileno(), expect, path, "while it was read")
            digest = hashlib.sha256(data).hexdigest()
            self._put(self.key(path), data)
        if on_bytes is not None:
            on_bytes(len(data))
        return digest

    def _put_resumable(
        self,
        source: Path,
        key: str,
        size: int,
        digest: str | None,
        label: str,
        on_bytes: OnBytes | None,
        *,
        expect: StatEntry | None = None,
    ) -> str:
        """Returns the digest of the bytes sent (``digest``, when it was known)."""
        assert self._client is not None
        st = os.stat(source)
        settings = mp.MultipartSettings(
            part_size=self.settings.part_size,
            concurrency=self.settings.part_concurrency,
            checksum=self._part_checksum,
            storage_class=self.settings.storage_class,
        )
        for _attempt in range(2):
            try:
                return mp.upload_file(
                    self._client,
                    remote=self.describe(),
                    key=key,
                    source=source,
                    size=size,
                    mtime_ns=st.st_mtime_ns,
                    digest=digest,
                    settings=settings,
                    state_dir=self.settings.state_dir,
                    on_bytes=on_bytes,
                    memory=self._budget.reserve,
                    label=label,
                    expect=expect,
                )
            except mp.ChecksumRejected as exc:
                self._drop_checksums(exc)
                settings = replace(settings, checksum=False)
            except (mp.S3Error, mp.S3ConnectionError) as exc:
                mapped = self.to_tether(exc, key)
                if mapped is exc:
                    raise
                raise mapped from exc
        raise AssertionError(f"{label}: checksum headers refused although none were sent")

    def _put_streamed(
        self, source: Path, key: str, digest: str, label: str, on_bytes: OnBytes | None
    ) -> None:
        """obstore's own multipart upload (GCS, Azure, S3 without static keys): not resumable,
        but still verified: the chunk iterator hashes what it reads and raises at its end when
        the digest differs, before obstore can complete the upload, which makes obstore abort it."""
        part = self.settings.part_size

        def chunks() -> Iterator[bytes]:
            h = hashlib.sha256()
            with open(source, "rb", buffering=0) as f:
                while True:
                    data = f.read(part)
                    if not data:
                        break
                    h.update(data)
                    if on_bytes is not None:
                        on_bytes(len(data))
                    yield data
            got = h.hexdigest()
            if got != digest:
                raise _mismatch(label, digest, got)

        store = self._put_store if self._checksum else self._store
        with self._budget.reserve(part * self.settings.part_concurrency):
            self._call(
                lambda: obstore.put(
                    store, key, chunks(), chunk_size=part, max_concurrency=self.settings.part_concurrency
                ),
                key,
            )

    def get_file(
        self, path: str, dest: Path, *, digest: str, mtime_ns: int, on_bytes: OnBytes | None = None
    ) -> str:
        # dest is a staging path (see Remote.get_file): written in place. A temporary name and
        # a rename per file were two more directory operations, and 48 downloads at once made
        # them queue on the folder's lock (a fifth of a 20,000-file pull's CPU spun there).
        key = self.key(path)
        ensure_dir(dest.parent)  # one mkdir per folder, not one per file taking its parent's lock
        listed = parse_provisional(digest)
        try:
            result = self._call(lambda: obstore.get(self._store, key), key)
            size = int(result.meta["size"])
            etag = result.meta.get("e_tag")
            if listed is not None and (listed[0], listed[1]) != ((etag or "").strip('"'), size):
                raise VerificationError(
                    f"{path}: the object changed on the store after it was listed (ETag or size differ)",
                    paths=[path],
                )
            md5 = hashlib.md5(usedforsecurity=False) if listed and plain_md5(listed[0]) else None
            if size > self.settings.multipart_threshold:
                md5 = None  # ranges arrive out of order; the pinned ETag (If-Match) holds them together
                del result  # drop the single stream; fetch ranges in parallel instead
                got = self._get_ranges(key, dest, size, etag, on_bytes)
            else:
                got = self._get_stream(result, key, dest, size, on_bytes, md5)
            if listed is None and got != digest:
                raise _mismatch(path, digest, got)
            if md5 is not None and md5.hexdigest() != plain_md5(listed[0] if listed else None):
                raise VerificationError(
                    f"{path}: the bytes received do not match the object's MD5 ETag", paths=[path]
                )
            os.utime(dest, ns=(mtime_ns, mtime_ns))
            return got
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    def _get_stream(
        self, result: Any, key: str, dest: Path, size: int, on_bytes: OnBytes | None, md5: Any = None
    ) -> str:
        h = hashlib.sha256()
        # A small body is received before the file is created: the folder sees one short burst
        # of work per file instead of a file held open across a network round trip.
        data = self._call(result.bytes, key) if size <= SMALL_READ else None
        with open(create_in_place(dest), "wb", buffering=0) as f:
            if data is not None:
                h.update(data)
                if md5 is not None:
                    md5.update(data)
                f.write(data)
                if on_bytes is not None:
                    on_bytes(len(data))
            else:
                for chunk in self._call(lambda: result.stream(min_chunk_size=CHUNK), key):
                    h.update(chunk)
                    if md5 is not None:
                        md5.update(chunk)
                    f.write(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
        return h.hexdigest()

    def _get_ranges(self, key: str, dest: Path, size: int, etag: str | None, on_bytes: OnBytes | None) -> str:
        """Parallel ranged GETs written in place, hashed in order as they complete."""
        span = self.settings.part_size
        count = -(-size // span)
        next_index = iter(range(count))
        lock = threading.Lock()
        errors: list[BaseException] = []
        fd = create_in_place(dest)
        try:
            read_fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        hasher = OrderedHasher(read_fd, size, span, self.settings.part_concurrency * 2)
        options: dict[str, Any] = {"if_match": etag} if etag else {}

        def worker() -> None:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None or not hasher.wait_turn(i):
                    return
                start, end = i * span, min(size, (i + 1) * span)
                try:
                    with self._budget.reserve(end - start):
                        data = self._range(key, start, end, options)
                        if len(data) != end - start:
                            raise VerificationError(
                                f"{key}: short range read ({len(data)} of {end - start} bytes)"
                            )
                        view = memoryview(data)
                        at = start
                        while view:  # pwrite may write less than asked (a signal, a full quota)
                            n = os.pwrite(fd, view, at)
                            view, at = view[n:], at + n
                        del data, view
                    hasher.written(i)  # outside the reservation: the part is on disk, not in memory
                except BaseException as exc:
                    errors.append(exc)
                    hasher.fail()
                    return
                if on_bytes is not None:
                    on_bytes(end - start)

        try:
            threads = [
                threading.Thread(target=worker, name=f"tether-range-{n}", daemon=True)
                for n in range(min(count, self.settings.part_concurrency))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            os.close(fd)
            os.close(read_fd)
        if errors:
            err = errors[0]
            if isinstance(err, obx.PreconditionError):
                raise VerificationError(f"{key} changed on the remote while it was downloaded") from err
            raise err
        return hasher.hasher.hexdigest()

    def _range(self, key: str, start: int, end: int, options: dict[str, Any]) -> bytes | memoryview:
        if self._ranges_native:
            try:
                res = obstore.get(self._store, key, options={**options, "range": (start, end)})
                return memoryview(res.bytes())
            except obx.GenericError as exc:
                if "non-partial" not in str(exc) or self._client is None:
                    raise self.to_tether(exc, key) from exc
                self._ranges_native = False  # the server answers ranges with a 200: use our client
        assert self._client is not None
        try:
            return self._client.get_range(key, start, end, options.get("if_match"))
        except (mp.S3Error, mp.S3ConnectionError) as exc:
            if isinstance(exc, mp.S3Error) and exc.status == 412:
                raise obx.PreconditionError(str(exc)) from exc
            raise self.to_tether(exc, key) from exc

    # -- clean-up -----------------------------------------------------------------------------
    def cleanup_temp(self, prefix: str) -> int:
        """Abort multipart uploads under ``prefix`` that no journal of this workspace resumes.

        Called under the dataset lock: any other upload there belongs to a writer that no longer
        holds the lock (it died), so it can never complete. Journals whose upload is gone are
        dropped too.
        """
        if self._client is None:
            return 0
        base = self.key(prefix)
        base = f"{base}/" if base else ""
        mine = {j.upload_id: j for j in mp.journals(self.settings.state_dir, self.describe())}
        aborted = 0
        live: set[str] = set()
        try:
            for key, upload_id, _initiated in self._client.list_uploads(base):
                if upload_id in mine:
                    live.add(upload_id)
                    continue
                self._client.abort_multipart(key, upload_id)
                aborted += 1
        except (mp.S3Error, mp.S3ConnectionError) as exc:
            if isinstance(exc, mp.S3Error) and exc.status in (400, 404, 501):
                return aborted  # the store cannot list uploads: nothing to clean that we know of
            raise self.to_tether(exc, base) from exc
        for upload_id, journal in mine.items():
            if upload_id not in live and journal.key.startswith(base):
                journal.delete()
        return aborted

    def __repr__(self) -> str:
        return f"ObjectStoreRemote({self.url!r})"


def _mismatch(label: str, expected: str, got: str) -> VerificationError:
    return VerificationError(
        f"{label}: content hash mismatch (expected {expected[:12]}…, got {got[:12]}…)", paths=[label]
    )


def _checksum_rejected(exc: BaseException) -> bool:
    text = str(exc)
    status = _status(exc)
    return status in (400, 501) and (
        "checksum" in text.lower() or _code(exc) in ("NotImplemented", "InvalidRequest")
    )


def open_objectstore_remote(
    config: RemoteConfig, parsed: ParsedURL, *, workspace_root: Path | None = None
) -> ObjectStoreRemote:
    """Build the remote; the journal of resumable uploads lives in the workspace's .tether/."""
    state_dir = workspace_root / STATE_DIR if workspace_root is not None else None
    return ObjectStoreRemote(config.url, build_settings(config, parsed, state_dir=state_dir))


# -- `tether remote test` -----------------------------------------------------------------------
def diagnose(remote: ObjectStoreRemote) -> list[tuple[str, bool, str, str]]:
    """Checks for `tether remote test`: (name, ok, detail, fix), in order; stops at the first
    failure that makes the rest meaningless."""
    results: list[tuple[str, bool, str, str]] = []
    s = remote.settings
    creds = s.credentials.source
    probe = f".tether-test-{secrets.token_hex(6)}"
    key = remote.key(probe)

    def fail(name: str, exc: BaseException) -> None:
        err = remote.to_tether(exc, key)
        message = err.message if isinstance(err, TetherError) else first_line(err)
        hint = err.hint if isinstance(err, TetherError) else ""
        results.append((name, False, message, hint))

    try:
        remote.check()
    except Exception as exc:
        err = remote.to_tether(exc)
        name = "credentials"
        if isinstance(err, RemoteUnavailable) and "bucket" in str(err):
            results.append(("credentials", True, f"from {creds}", ""))
            name = "bucket access"
        elif isinstance(err, RemoteUnavailable):
            name = "endpoint"
        fail(name, exc)
        return results
    results.append(("credentials", True, f"accepted ({creds})", ""))
    results.append(("bucket access", True, f"listed {remote.describe()}", ""))
    before = time.time()
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("put", lambda: remote.write_bytes_atomic(probe, b"tether remote test")),
        ("list", remote.check),  # one LIST request, however many objects the prefix holds
        ("get", lambda: remote.read_bytes(probe)),
    ]
    for name, fn in steps:
        try:
            fn()
        except Exception as exc:
            fail(name, exc)
            with contextlib.suppress(Exception):
                remote.delete(probe)
            return results
        results.append((name, True, f"{name} on {remote.describe()}/ works", ""))
    after = time.time()
    try:
        meta = obstore.head(remote._store, key)
        stamped = meta["last_modified"].timestamp()
        skew = stamped - (before + after) / 2
        slack = (after - before) / 2 + 1.0  # the server stamps with one-second precision
        if abs(skew) > 30 + slack:
            results.append(
                (
                    "clock skew",
                    False,
                    f"the store's clock differs from this machine's by {skew:+.0f}s",
                    "Sync the clock (timedatectl set-ntp true); above 15 minutes S3 refuses requests.",
                )
            )
        else:
            results.append(("clock skew", True, f"{skew:+.1f}s", ""))
    except Exception as exc:
        fail("clock skew", exc)
    try:
        remote.delete(probe)
        results.append(("delete", True, "delete works", ""))
    except Exception as exc:
        fail("delete", exc)
        return results
    try:
        enforced = remote.probe_conditional_writes("")
        remote.remember_conditional(enforced)
        if enforced:
            results.append(("conditional writes", True, "If-None-Match is enforced: locks are exclusive", ""))
        else:
            results.append(
                (
                    "conditional writes",
                    True,
                    "not enforced by this store: the lock falls back to put + read-back (weaker)",
                    "Prefer a store that enforces If-None-Match (AWS S3, R2, MinIO) when several "
                    "machines push the same dataset.",
                )
            )
    except Exception as exc:
        fail("conditional writes", exc)
    return results


__all__ = [
    "ByteBudget",
    "ObjectStoreRemote",
    "StoreSettings",
    "build_settings",
    "diagnose",
    "open_objectstore_remote",
    "resolve_credentials",
]
