"""A real OpenSSH server on 127.0.0.1 for the SSH backend tests, plus a cuttable TCP relay.

The server runs ``/usr/sbin/sshd -D -e`` with its own host key, a generated client key in its
authorized_keys and ``LogLevel VERBOSE`` (so tests can count authentications in its log). The
client side never reads ``~/.ssh``: every test connects through a private ssh config file
(``-F``) with a private known_hosts and ``StrictHostKeyChecking yes``.

One server is shared by the whole test session (``get_server()`` starts it on first use; the
``sshd`` fixture stops it at the end). Without sshd the SSH tests skip with the install hint,
except under ``CI=true`` where they fail: CI must run them.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from serverutil import free_port, wait_until

SSHD = Path("/usr/sbin/sshd")
HOST = "tether-test"  # the alias every test config defines
HOST_KEY_ALIAS = "tether-test-sshd"  # known_hosts name, the same whatever port (relay) is used
READY_TIMEOUT_S = 15.0


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _describe(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().split()
        return f"ppid {stat[3]} state {stat[2]} wchan {Path(f'/proc/{pid}/wchan').read_text()}"
    except OSError:
        return "gone"


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = _children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(_children(child))
    return out


@dataclass
class SshServer:
    """A running sshd and everything a client needs to reach it."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes]
    host_key: Path
    client_key: Path
    log: Path
    user: str
    config: Path = field(init=False)

    def __post_init__(self) -> None:
        self.known_hosts = self.root / "known_hosts"
        pub = (self.host_key.with_suffix(".pub")).read_text().split()
        self.known_hosts.write_text(f"{HOST_KEY_ALIAS} {pub[0]} {pub[1]}\n")
        self.config = self.client_config(self.root / "ssh_config")

    # -- client side --------------------------------------------------------------------------
    def client_config(
        self,
        path: Path,
        *,
        host: str = HOST,
        port: int | None = None,
        identity: Path | None = None,
        known_hosts: Path | None = None,
        extra: str = "",
    ) -> Path:
        """Write a private ssh config with one ``Host`` alias reaching this server."""
        path.write_text(
            f"Host {host}\n"
            f"    HostName 127.0.0.1\n"
            f"    Port {port or self.port}\n"
            f"    User {self.user}\n"
            f"    IdentityFile {identity or self.client_key}\n"
            f"    IdentitiesOnly yes\n"
            f"    IdentityAgent none\n"
            f"    HostKeyAlias {HOST_KEY_ALIAS}\n"
            f"    UserKnownHostsFile {known_hosts or self.known_hosts}\n"
            f"    GlobalKnownHostsFile /dev/null\n"
            f"    StrictHostKeyChecking yes\n"
            f"    UpdateHostKeys no\n"
            f"    PasswordAuthentication no\n"
            f"    KbdInteractiveAuthentication no\n" + extra
        )
        return path

    def options(self, config: Path | None = None, **more: object) -> dict[str, object]:
        """Remote options for a tether remote reaching this server through ``config``.

        Masters are per run (control_persist = 0) unless a test asks otherwise: tests that
        count logins, cut links or kill sessions must not inherit an earlier test's master."""
        return {"ssh_config": str(config or self.config), "control_persist": 0, **more}

    # -- server side --------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def auth_count(self) -> int:
        """How many clients authenticated so far (one per ssh connection, not per channel)."""
        return self.log_text().count("Accepted publickey")

    def helper_starts(self) -> int:
        """How many remote commands (tether helpers) sessions started so far, over all masters."""
        return self.log_text().count("Starting session: command")

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes and everything they run (helpers)."""
        return _descendants(self.proc.pid)

    def helper_pids(self) -> list[int]:
        """Processes under sshd that run tether's helper (recognised by its bootstrap)."""
        found = []
        for pid in _descendants(self.proc.pid):
            try:
                if b"zlib.decompress" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                continue
        return found

    def wait_sessions_closed(self, timeout_s: float = 15.0) -> None:
        """Wait until no helper runs any more, so a cut run's helper has really exited (a master
        left by a killed run may linger for ControlPersist; it runs no helper)."""
        try:
            wait_until(lambda: not self.helper_pids(), timeout_s, "the remote helpers to exit")
        except TimeoutError as exc:
            left = {pid: _describe(pid) for pid in self.helper_pids()}
            raise TimeoutError(f"{exc}; still running: {left}") from None

    def kill_sessions(self) -> int:
        """Drop every connection from the server side (a network cut as the client sees it)."""
        pids = _children(self.proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill_sessions()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _sshd_config(root: Path, port: int, host_key: Path, authorized: Path) -> Path:
    path = root / "sshd_config"
    path.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {host_key}\n"
        f"AuthorizedKeysFile {authorized}\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "StrictModes no\n"
        "UsePAM no\n"
        f"PidFile {root / 'sshd.pid'}\n"
        "LogLevel VERBOSE\n"
        "MaxSessions 64\n"
        "MaxStartups 64\n"
        "Subsystem sftp internal-sftp\n"
    )
    return path


def start_server() -> SshServer:
    """Start sshd on a free loopback port and wait (bounded) until it listens."""
    root = Path(tempfile.mkdtemp(prefix="tether-sshd-"))
    root.chmod(0o755)
    host_key = root / "host_ed25519"
    client_key = root / "client_ed25519"
    _keygen(host_key, "tether-test-host")
    _keygen(client_key, "tether-test-client")
    authorized = root / "authorized_keys"
    shutil.copy(client_key.with_suffix(".pub"), authorized)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    log = root / "sshd.log"
    last_error = ""
    for _attempt in range(3):  # the free port can be taken between probing and binding
        port = free_port()
        config = _sshd_config(root, port, host_key, authorized)
        with open(log, "wb") as log_handle:
            proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
            )
        listening = f"Server listening on 127.0.0.1 port {port}"
        try:
            wait_until(
                lambda p=proc, text=listening: (
                    p.poll() is not None or text in log.read_text(errors="replace")
                ),
                READY_TIMEOUT_S,
                "sshd to listen",
            )
        except TimeoutError:
            proc.kill()
            proc.wait()
            raise
        if proc.poll() is None:
            return SshServer(root, port, proc, host_key, client_key, log, getpass.getuser())
        last_error = log.read_text(errors="replace")
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"sshd did not start: {last_error.strip()[-2000:]}")


_server: SshServer | None = None
_server_lock = threading.Lock()


def get_server() -> SshServer:
    """The session's server, started on first use; skips (or fails under CI) without sshd."""
    global _server
    with _server_lock:
        if _server is None or _server.proc.poll() is not None:
            if not SSHD.exists():
                message = f"sshd not installed ({SSHD} missing): apt-get install openssh-server"
                if os.environ.get("CI") == "true":
                    pytest.fail(message + " (CI=true: the SSH tests must run)")
                pytest.skip(message)
            _server = start_server()
            atexit.register(_server.stop)
        return _server


def stop_server() -> None:
    global _server
    with _server_lock:
        if _server is not None:
            _server.stop()
            _server = None


@pytest.fixture(scope="session", name="sshd")
def sshd_fixture() -> Iterator[SshServer]:
    """Session-wide sshd, as fixture ``sshd``: import ``sshd_fixture`` into a test module."""
    yield get_server()
    stop_server()


def ssh_remote(tmp: Path, *, name: str = "remote-root", **options: object):  # type: ignore[no-untyped-def]
    """An SshRemote on a fresh folder below ``tmp`` (the conformance suite's factory)."""
    from tether.config import RemoteConfig
    from tether.remotes import open_remote

    server = get_server()
    root = tmp / name
    root.mkdir()
    url = f"ssh://{HOST}{root}"
    return open_remote(RemoteConfig("ssh-test", url, server.options(**options), "test"))


# -- a TCP relay between client and server ------------------------------------------------------
class Relay:
    """A loopback TCP relay in front of sshd that can count, stall or cut the traffic.

    ``cut_after(n)`` drops every connection once ``n`` bytes went from client to server (a
    network cut in the middle of a transfer, deterministic unlike racing a timer);
    ``stall_after(n)`` stops forwarding instead, so a test can kill a process at leisure.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.bytes_up = 0
        self.bytes_down = 0
        self.down_limit: int | None = None  # cut once this many bytes went server -> client
        self.down_stall = False  # stall there instead, until drop()
        self.connections = 0
        self.limit: int | None = None
        self.stall = False
        self._frozen: set[socket.socket] = set()  # connections that pass nothing any more
        self.cut = threading.Event()
        self.stalled = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def cut_after(self, n: int) -> None:
        self.limit, self.stall = n, False

    def cut_after_down(self, n: int) -> None:
        """Drop every connection once ``n`` bytes went from server to client (a download cut)."""
        self.down_limit, self.down_stall = n, False

    def stall_after_down(self, n: int) -> None:
        """Stop passing server -> client bytes once ``n`` went (then ``drop()``)."""
        self.down_limit, self.down_stall = n, True

    def stall_after(self, n: int) -> None:
        self.limit, self.stall = n, True

    def freeze(self) -> None:
        """Let the connections made so far pass nothing more, without closing them (a link that
        died while both ends still think it is up); new connections pass as before."""
        with self._lock:
            self._frozen.update(self._socks)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self.connections += 1
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if src in self._frozen:
                    self.cut.wait()
                    return
                if upstream:
                    with self._lock:
                        self.bytes_up += len(data)
                        over = self.limit is not None and self.bytes_up >= self.limit
                    if over:
                        if self.stall:
                            self.stalled.set()
                            self.cut.wait()
                        self.drop()
                        return
                else:
                    with self._lock:
                        self.bytes_down += len(data)
                        over = self.down_limit is not None and self.bytes_down >= self.down_limit
                    if over:
                        if self.down_stall:
                            self.cut.wait()
                        self.drop()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def drop(self) -> None:
        """Close every relayed connection at once (both directions)."""
        self.cut.set()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.drop()


def add_remote(workspace_root: Path, name: str, url: str, options: dict[str, object]) -> None:
    """Add ``[remotes.NAME]`` to the workspace's .tether/config.local.toml: ssh_config and the
    other command-running options are refused in the committed tether.toml."""
    import tomlkit

    path = workspace_root / ".tether" / "config.local.toml"
    doc = tomlkit.parse(path.read_text()) if path.exists() else tomlkit.document()
    doc.setdefault("remotes", {})[name] = {"url": url, **options}
    path.write_text(tomlkit.dumps(doc))
