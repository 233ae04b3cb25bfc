"""SSH remotes: the system OpenSSH client, one multiplexed connection per run, and a helper.

Why the system client: HPC users live in ``~/.ssh/config`` (ProxyJump through a login node,
Kerberos, Match blocks, one 2FA prompt kept open by ControlMaster), and all of it keeps working.
Each run opens one master connection (``ControlMaster``/``ControlPath`` in a private 0700 folder,
``ControlPersist`` a short while), so a cluster that asks for a 2FA code asks once per run.

Over that connection tether starts ``python3`` with a small helper script
(:mod:`tether.remotes.ssh_helper`, sent compressed inside the command: nothing is installed
remotely). The helper speaks a framed protocol on its stdin/stdout: listings, reads and small
writes are one request each, and batches of files are *streamed* (the client sends file after
file without waiting for per-file answers), so 20,000 small files cost one round trip, not
20,000. Hashing happens on the remote, in parallel. Helper processes share the connection: one
for small requests (so the lock lease can be renewed during a long transfer), one for bulk
streams, started only by runs that may transfer (see prepare_transfers), and on a link with
latency more streams for a large batch (see STREAMS); a download's second stream borrows the
idle small-request helper instead of starting one (see _lend_control).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import itertools
import json
import os
import re
import secrets
import select
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from tether import fileio
from tether.background import in_background
from tether.errors import (
    ConfigError,
    DiskFullError,
    InvalidPath,
    RemotePermissionError,
    RemoteUnavailable,
    ScanError,
    StalePlanError,
    TetherError,
    VerificationError,
)
from tether.fileio import Prefetcher, check_source_state, create_in_place, os_error_to_tether
from tether.lock import local_flock
from tether.manifest import UNHASHED
from tether.paths import TEMP_MARKER, check_relpath
from tether.readahead import SequentialReadAhead
from tether.remotes import ssh_helper
from tether.remotes.base import (
    ANY_SIZE,
    Capabilities,
    ErrorKind,
    ListingDelta,
    OnBytes,
    OnDigest,
    OnDone,
    RemoteStat,
    TransferItem,
)
from tether.remotes.local import NETWORK_FILESYSTEMS

if TYPE_CHECKING:
    from tether.config import RemoteConfig
    from tether.remotes import ParsedURL

FRAME = ssh_helper.FRAME
CHUNK = ssh_helper.CHUNK
SMALL = ssh_helper.SMALL
RESUME_MIN = 64 * 1024 * 1024  # uploads at least this large resume from a verified partial file
RUN_FILES = ssh_helper.RUN_FILES  # small files per upload frame, as per download frame
# A batch is handed out in pieces to the streams (helpers on channels of the one connection),
# each piece to whichever stream is ready. OpenSSH gives each channel a 2 MiB window, so one
# channel moves at most 2 MiB per round trip: 100 MiB/s at 20 ms, 20 MiB/s at 100 ms.
# Below a round trip of STREAMS_MIN_RTT_S a window is no limit (400 MiB/s at 5 ms) and a second
# stream only adds a process: one stream is used.
STREAMS = 2
MAX_STREAMS = 16
STREAMS_MIN_RTT_S = 0.005
PIECE_FILES = 512
PIECE_BYTES = 16 * 1024 * 1024
MAX_CHATTER = 1024 * 1024  # login-shell output tolerated before the helper's first frame
CONTROL_PERSIST_S = 60  # an idle master stays this long, for the next run (or a killed run's rerun)
BORROWED_HELLO_S = 10  # a helper started through an earlier run's master answers within this
DEFAULT_CONNECT_TIMEOUT_S = 20
BATCH_CONNECT_GRACE_S = 120  # a non-interactive connect that takes longer than this is hung
RETRYABLE_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.EIO}
RERUN_HINT = (
    "Rerun the command: files already completed are verified and kept, a large partial upload resumes."
)
OPTIONS = {
    "port",
    "user",
    "identity_file",
    "batch_mode",
    "ssh_options",
    "ssh_config",
    "python",
    "ssh_command",
    "connect_timeout",
    "control_persist",
    "streams",
}


# -- errors that also say which check failed (used by `tether remote test`) --------------------
class SshUnreachable(RemoteUnavailable):
    check = "reachability"


class HostKeyError(RemoteUnavailable):
    check = "host key"


class AuthenticationFailed(RemotePermissionError):
    check = "authentication"


class PythonMissing(RemoteUnavailable):
    check = "python3"


# -- settings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SshSettings:
    """Everything that decides how ssh is invoked, validated from a remote's config table."""

    host: str
    path: str  # remote base folder; relative or ``~`` paths are below the remote home
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    batch_mode: bool = True
    ssh_options: tuple[str, ...] = ()
    ssh_config: str | None = None
    python: str = "python3"
    ssh_command: str = "ssh"
    connect_timeout: int | None = None
    control_persist: int = CONTROL_PERSIST_S  # 0: each run has its own master, closed at its end
    streams: int = STREAMS  # channels a large batch is spread over (see PIECE_FILES)

    @classmethod
    def from_options(
        cls,
        *,
        name: str,
        host: str,
        path: str,
        user: str | None,
        port: int | None,
        options: Mapping[str, Any],
        base_dir: Path | None = None,
    ) -> SshSettings:
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise ConfigError(
                f"remote {name!r}: unknown SSH option(s) {', '.join(unknown)}",
                hint=f"SSH remotes accept: {', '.join(sorted(OPTIONS))}.",
            )

        def text(key: str) -> str | None:
            value = options.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"remote {name!r}: option {key} must be a non-empty string")
            return value

        def number(key: str) -> int | None:
            value = options.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"remote {name!r}: option {key} must be a positive integer")
            return value

        persist = options.get("control_persist", CONTROL_PERSIST_S)
        if isinstance(persist, bool) or not isinstance(persist, int) or persist < 0:
            raise ConfigError(f"remote {name!r}: option control_persist must be 0 or a number of seconds")
        batch = options.get("batch_mode", True)
        if not isinstance(batch, bool):
            raise ConfigError(f"remote {name!r}: option batch_mode must be true or false")
        streams = number("streams") or STREAMS
        if streams > MAX_STREAMS:
            raise ConfigError(f"remote {name!r}: option streams must be at most {MAX_STREAMS}")
        if port is not None and options.get("port") not in (None, port):
            raise ConfigError(f"remote {name!r}: the URL says port {port} but the option port differs")
        return cls(
            host=host,
            path=_remote_base(path),
            user=user or text("user"),
            port=port or number("port"),
            identity_file=_local_path(text("identity_file"), base_dir),
            batch_mode=batch,
            ssh_options=_ssh_options(options.get("ssh_options"), name),
            ssh_config=_local_path(text("ssh_config"), base_dir),
            python=text("python") or "python3",
            ssh_command=text("ssh_command") or "ssh",
            connect_timeout=number("connect_timeout"),
            control_persist=persist,
            streams=streams,
        )


def _remote_base(path: str) -> str:
    """``ssh://host/~/x`` and ``host:x`` mean below the home folder; the helper expands ``~``."""
    if path.startswith("/~"):
        path = path[1:]
    return path or "~"


def _local_path(value: str | None, base_dir: Path | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return str(path)


def _ssh_options(value: Any, name: str) -> tuple[str, ...]:
    """``["-o Key=Value", ...]``, ``"-o A=B -o C=D"`` or bare ``Key=Value`` items, as argv."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise ConfigError(f"remote {name!r}: ssh_options must be a string or a list of strings")
    argv: list[str] = []
    for item in items:
        words = shlex.split(item)
        if words and not words[0].startswith("-"):
            words = ["-o", *words]
        argv += words
    return tuple(argv)


# With AES instructions in the CPU, AES-GCM costs a third less CPU than OpenSSH's first default,
# ChaCha20-Poly1305 (174 MB through ssh over loopback: 0.55 against 0.85 CPU-seconds here).
AES_GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


@functools.lru_cache(maxsize=1)
def cpu_has_aes() -> bool:
    if sys.platform == "darwin":
        return True  # every Intel Mac since 2010 and every Apple silicon Mac
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    return re.search(r"^(flags|Features)\s*:.*\baes\b", text, re.M) is not None


def faster_ciphers(effective: str, default: str) -> str | None:
    """A ``Ciphers`` value with AES-GCM first, or None to leave ssh's choice alone: when the
    user, their ssh config or the site's has chosen ciphers (what ssh -G reports differs from
    its built-in default). Only the order changes: the server still picks from the same list,
    so a server without AES-GCM negotiates as before."""
    offered = effective.split(",") if effective else []
    if effective != default:
        return None
    first = [c for c in AES_GCM if c in offered]
    if not first or offered[: len(first)] == first:
        return None
    return ",".join(first + [c for c in offered if c not in first])


def _short_tmp() -> str:
    """Unix socket paths are limited to ~100 bytes: keep the ControlPath folder short."""
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


STALE_PRIVATE_S = 3600  # an empty private master folder this old belongs to no live run


def remove_stale_private_dirs(base: str, *, now: float | None = None) -> int:
    """Remove this user's empty ``tether-ssh-XXXXXXXX`` folders older than an hour; return how
    many went.

    A run killed with SIGKILL cannot remove its private master's folder. A live run's folder
    holds the master's socket, and a run's folder is only empty for the instant before ssh
    makes it, so an empty one that old is litter; ``rmdir`` removes nothing that is not empty.
    """
    now = time.time() if now is None else now
    shared = f"tether-ssh-{os.geteuid()}"
    removed = 0
    try:
        entries = list(os.scandir(base))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith("tether-ssh-") or entry.name == shared:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            young = now - st.st_mtime < STALE_PRIVATE_S
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or young:
                continue
            os.rmdir(entry.path)
            removed += 1
        except OSError:
            continue  # not empty, not ours, or gone meanwhile
    return removed


def _shared_control_dir() -> str | None:
    """This user's folder for masters that outlive a run (``/tmp/tether-ssh-<uid>``, 0700).

    Anything else found under that name (another owner, a link, wider permissions) could let
    another user reach the connection: then None, and the run keeps a private master."""
    path = os.path.join(_short_tmp(), f"tether-ssh-{os.geteuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None
    return path


# -- the master connection ----------------------------------------------------------------------
class SshConnection:
    """One ``ssh`` master per remote object; every other ssh call is multiplexed through it.

    With ``control_persist`` (default 60 s) the master lives in this user's shared socket
    folder and stays that long after the run: the next run to the same host, port and user
    (a diff, then the push) borrows it instead of logging in again, so a cluster that asks for
    a 2FA code asks once until the connection has been idle that long. A borrowed master whose
    link died meanwhile (a laptop that slept) is noticed when the helper does not answer, and
    replaced (see SshRemote.control).
    """

    def __init__(self, settings: SshSettings) -> None:
        self.s = settings
        self.dir: str | None = None
        self.socket: str | None = None
        self.master = False  # this run started the master
        self.borrowed = False  # this run uses a master an earlier run left
        self.shared = False  # the master lives in the shared folder and outlives the run
        self._binary: str | None = None
        self._effective: dict[str, str] | None = None
        self._ciphers: str | None = None
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        return self.s.host

    def binary(self) -> str:
        if self._binary is None:
            found = shutil.which(self.s.ssh_command)
            if found is None:
                raise SshUnreachable(
                    f"the OpenSSH client ({self.s.ssh_command!r}) is not installed or not on PATH",
                    hint="Install it (Debian/Ubuntu: apt-get install openssh-client) or set the remote "
                    "option ssh_command to the ssh program's path.",
                )
            self._binary = found
        return self._binary

    def _user_args(self) -> list[str]:
        """The user's own choices; ssh keeps the first value it sees, so these come first."""
        args = ["-F", self.s.ssh_config] if self.s.ssh_config else []
        args += list(self.s.ssh_options)
        if self.s.port:
            args += ["-p", str(self.s.port)]
        if self.s.user:
            args += ["-l", self.s.user]
        if self.s.identity_file:
            args += ["-i", self.s.identity_file]
        return args

    def effective(self) -> dict[str, str]:
        """``ssh -G``: the configuration ssh will really use (no network), parsed once."""
        if self._effective is None:
            proc = subprocess.run(
                [self.binary(), *self._user_args(), "-G", self.host],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=30,
            )
            if proc.returncode != 0:
                raise ConfigError(
                    f"ssh rejects the configuration for {self.host}: {_last_line(proc.stderr)}",
                    hint="Fix the remote's ssh_options / ssh_config or your ~/.ssh/config.",
                )
            values: dict[str, str] = {}
            for line in proc.stdout.splitlines():
                key, _, value = line.partition(" ")
                values.setdefault(key.lower(), value)
            self._effective = values
        return self._effective

    def _socket_name(self) -> str:
        """Who the master logs in as, where, and through what: runs that agree on all of it may
        share one master (like ssh's %C, plus the jump host or proxy command)."""
        eff = self.effective()
        fields = ("hostname", "port", "user", "proxyjump", "proxycommand", "hostkeyalias")
        key = "\0".join(eff.get(f, "") for f in fields)
        return hashlib.sha256(key.encode()).hexdigest()[:20]

    def args(self, *, control: bool = True) -> list[str]:
        """ssh and its options, without the host: multiplexing first, then the user's, then
        defaults for what neither the user nor their ssh config decided."""
        args = [self.binary()]
        if control:
            assert self.socket is not None
            args += ["-o", f"ControlPath={self.socket}"]
        args += ["-o", f"BatchMode={'yes' if self.s.batch_mode else 'no'}", *self._user_args()]
        eff = self.effective()
        if self.s.connect_timeout:
            args += ["-o", f"ConnectTimeout={self.s.connect_timeout}"]
        elif eff.get("connecttimeout", "none") == "none":
            args += ["-o", f"ConnectTimeout={DEFAULT_CONNECT_TIMEOUT_S}"]
        if eff.get("serveraliveinterval", "0") == "0":  # notice a dead link within a minute
            args += ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        ciphers = self.ciphers()
        if ciphers:
            args += ["-o", f"Ciphers={ciphers}"]
        return [*args, "-o", "ClearAllForwardings=yes", "-x", "-a"]

    def ciphers(self) -> str | None:
        """AES-GCM first where the CPU has AES instructions and nobody chose (faster_ciphers)."""
        if self._ciphers is None:
            self._ciphers = self._faster_ciphers() or ""
        return self._ciphers or None

    def _faster_ciphers(self) -> str | None:
        if not cpu_has_aes():
            return None
        try:  # ssh's built-in default; an ssh_command wrapper may refuse this: ssh then decides
            proc = subprocess.run(
                [self.binary(), "-F", "/dev/null", "-G", self.host],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        default = re.search(r"^ciphers (\S+)", proc.stdout, re.M)
        if proc.returncode != 0 or default is None:
            return None
        return faster_ciphers(self.effective().get("ciphers", ""), default.group(1))

    def where(self) -> str:
        eff = self.effective()
        return f"{eff.get('hostname', self.host)} port {eff.get('port', '22')}"

    def connect(self, *, private: bool = False) -> None:
        """Borrow a live master an earlier run left, or start one (authenticating once); raise a
        classified error if that fails. ``private`` starts this run's own master, never shared
        (``tether remote test`` checks a real login)."""
        with self._lock:
            if self.master or self.borrowed:
                return
            self.binary()
            self.effective()
            shared = None if private or self.s.control_persist == 0 else _shared_control_dir()
            if shared is None:
                remove_stale_private_dirs(_short_tmp())
                self.dir = tempfile.mkdtemp(prefix="tether-ssh-", dir=_short_tmp())
                self.socket = f"{self.dir}/%C"
                self._start_master(CONTROL_PERSIST_S)
                return
            self.shared = True
            self.socket = os.path.join(shared, self._socket_name())
            # Two runs starting at once must not both log in: the first starts the master, the
            # second waits here and borrows it.
            with self._starting():
                if self._alive():
                    self.borrowed = True
                    return
                self._restart_master()

    def _starting(self) -> contextlib.AbstractContextManager[None]:
        """Runs on this machine start or replace the shared master one at a time."""
        return local_flock(Path(f"{self.socket}.lock"), "starting the SSH master", wait=True)

    def _restart_master(self) -> None:
        """Start the shared master (under its lock), clearing a dead one's socket first: with
        the name taken, ssh would run the new master without a socket."""
        assert self.socket is not None
        if os.path.lexists(self.socket):
            self._stop_master()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket)
        self._start_master(self.s.control_persist)

    def _alive(self) -> bool:
        """A master answers on the socket (a local check: it says nothing of its link)."""
        if self.socket is None or not os.path.exists(self.socket):
            return False
        proc = subprocess.run(
            [*self.args(), "-O", "check", self.host],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=15,
        )
        return proc.returncode == 0

    def _start_master(self, persist: int) -> None:
        argv = [
            *self.args(),
            "-o",
            "ControlMaster=yes",
            "-o",
            f"ControlPersist={persist}",
            "-N",
            "-f",
            self.host,
        ]
        interactive = not self.s.batch_mode
        try:
            # -f: ssh backgrounds itself once authenticated, so this returns then. In
            # interactive mode, prompts (password, 2FA) reach the terminal via /dev/tty.
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None if interactive else subprocess.PIPE,
                text=True,
                timeout=None if interactive else BATCH_CONNECT_GRACE_S,
            )
        except subprocess.TimeoutExpired:
            raise SshUnreachable(
                f"connecting to {self.host} ({self.where()}) did not finish in {BATCH_CONNECT_GRACE_S}s",
                hint="Check the network or VPN; `ssh -v HOST true` shows where it hangs.",
            ) from None
        if proc.returncode != 0:
            raise self.classify(proc.stderr or "", proc.returncode)
        self.master = True

    def _stop_master(self) -> None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [*self.args(), "-O", "exit", self.host],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=15,
            )

    def replace_borrowed(self) -> None:
        """The borrowed master's link is dead: stop it and log in afresh in its place."""
        with self._lock, self._starting():
            self.borrowed = False
            self._restart_master()

    def spawn(self, command: str, stderr: IO[bytes]) -> subprocess.Popen[bytes]:
        """Run ``command`` on the remote through the master, with pipes for stdin and stdout."""
        argv = [
            *self.args(),
            *("-o", "ControlMaster=no", "-o", "RemoteCommand=none", "-T", "-e", "none"),
            self.host,
            command,
        ]
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            bufsize=CHUNK,
        )

    def close(self) -> None:
        """A private master ends with its run; a shared one stays for ``control_persist`` idle
        seconds (ssh's ControlPersist), for the next run to borrow."""
        with self._lock:
            if self.master and not self.shared:
                self._stop_master()
            self.master = self.borrowed = False
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    # -- turning ssh's stderr into one line and a fix ------------------------------------------
    def classify(self, stderr: str, returncode: int) -> TetherError:
        host = self.host
        line = _last_line(stderr) or f"ssh exited with status {returncode}"
        if (
            "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr
            or "has changed and you have requested" in stderr
        ):
            fingerprint = _changed_fingerprint(stderr) or "an unknown fingerprint"
            remove = re.search(r"ssh-keygen -f .* -R .*", stderr)
            fix = remove.group(0).strip() if remove else f"ssh-keygen -R {host}"
            return HostKeyError(
                f"the host key of {host} has CHANGED (the server now presents {fingerprint}); not connecting",
                hint=f"If the cluster's admins announced a new key, check the fingerprint, remove the old "
                f"entry (`{fix}`) and accept the new one with `ssh {host}` once. If not, someone may be "
                "intercepting the connection: stop and tell them.",
            )
        if "Host key verification failed" in stderr or re.search(r"No \S+ host key is known", stderr):
            offered = self.offered_host_key()
            eff = self.effective()
            scan = f"ssh-keyscan -p {eff.get('port', '22')} {eff.get('hostname', host)}"
            return HostKeyError(
                f"the host key of {host} is not known ({offered}); tether never accepts an unknown key",
                hint=f"Compare that fingerprint with the one your cluster documents, then accept it once "
                f"with `ssh {host}` (answer yes), or append `{scan}` to ~/.ssh/known_hosts.",
            )
        if "Permission denied (" in stderr or "Too many authentication failures" in stderr:
            return AuthenticationFailed(
                f"authentication to {host} failed: {line}",
                hint="Check that `ssh HOST true` works without a password prompt (load your key with "
                "ssh-add, or set identity_file); for password or 2FA logins set batch_mode = false.",
            )
        if "Could not resolve hostname" in stderr:
            return SshUnreachable(
                f"cannot resolve {host}: {line}",
                hint="Check the host name, or define it as a Host alias in ~/.ssh/config.",
            )
        if "Connection refused" in stderr:
            return SshUnreachable(
                f"{host} ({self.where()}) refused the connection",
                hint="Check the host name and port (`ssh -G HOST` shows what ssh uses) and that the "
                "SSH server runs there.",
            )
        if re.search(r"timed out|No route to host|Network is unreachable|Connection closed|reset", stderr):
            return SshUnreachable(
                f"cannot reach {host} ({self.where()}): {line}",
                hint="Check the network, VPN or jump host; `ssh -v HOST true` shows where it fails.",
            )
        return SshUnreachable(
            f"ssh to {host} failed: {line}", hint="Run `ssh -v HOST true` to see what goes wrong."
        )

    def offered_host_key(self) -> str:
        """The fingerprint the server offers, from a verbose probe (ssh's batch-mode message
        omits it); the probe fails at the same host key check, so it sends nothing else."""
        try:
            proc = subprocess.run(
                [*self.args(control=False), "-v", "-o", "ControlPath=none", self.host, "true"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return "fingerprint unavailable"
        found = re.search(r"Server host key: (\S+) (\S+)", proc.stderr)
        return f"the server offers {found.group(1)} {found.group(2)}" if found else "fingerprint unavailable"


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _changed_fingerprint(stderr: str) -> str | None:
    found = re.search(
        r"fingerprint for the (\S+) key sent by the remote host is\s+(\S+?)\.?\s*$", stderr, re.M
    )
    return f"{found.group(1)} {found.group(2)}" if found else None


# -- the helper process -------------------------------------------------------------------------
_BOOTSTRAP: str | None = None


def helper_command(python: str) -> str:
    """The remote command line: ``python`` runs a one-line bootstrap that inflates the helper.

    Only base64 characters and fixed Python text go into the command (single-quoted, valid in
    sh, bash, zsh, csh and fish), never a path. ``python`` is passed to the remote shell as
    written, so it may be a full path or a small snippet (``module load python && python3``).
    """
    global _BOOTSTRAP
    if _BOOTSTRAP is None:
        source = Path(ssh_helper.__file__).read_bytes()
        packed = base64.b64encode(zlib.compress(source, 9)).decode()
        _BOOTSTRAP = (
            "import sys,zlib,base64;v=sys.version_info;"
            '(v>=(3,8) or sys.exit("tether: the remote python is %d.%d, tether needs 3.8 or newer"%v[:2]));'
            f'exec(zlib.decompress(base64.b64decode("{packed}")))'
        )
    return f"{python} -S -c '{_BOOTSTRAP}'"


# A frame's JSON header, parsed without json.loads' checks for bytes and trailing text: 0.7 us
# instead of 2.0 us, paid once per file of a pull (headers are written by our helper alone).
_parse_header = json.JSONDecoder().raw_decode


class _Channel:
    """One helper process: framed requests over its stdin/stdout, one caller at a time."""

    def __init__(self, remote: SshRemote, label: str) -> None:
        self.remote = remote
        self.label = label
        self.lock = threading.RLock()  # held for a whole request, or a whole stream
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = remote.conn.spawn(helper_command(remote.settings.python), self.stderr)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.w = self.proc.stdin
        self.r = self.proc.stdout
        for pipe in (self.w, self.r):
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)  # fewer wake-ups per MiB
        self.ids = itertools.count(1)
        self.ready = False
        self.initialised = False
        self.facts: dict[str, Any] = {}  # the init answer (SshRemote._init)
        self.closed = False
        self.chatter = 0  # bytes the remote shell printed before the helper spoke
        self.hello: dict[str, Any] = {}

    # framing
    def send(self, header: dict[str, Any], payload: bytes = b"", *, flush: bool = True) -> None:
        raw = json.dumps(header, separators=(",", ":")).encode()
        self.w.write(FRAME.pack(len(raw), len(payload)))
        self.w.write(raw)
        if payload:
            self.w.write(payload)
        if flush:
            self.w.flush()

    def send_head(self, header: dict[str, Any], n: int) -> None:
        raw = json.dumps(header, separators=(",", ":")).encode()
        self.w.write(FRAME.pack(len(raw), n))
        self.w.write(raw)

    def read_exact(self, n: int) -> bytes:
        data = self.r.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def recv_head(self) -> tuple[dict[str, Any], int]:
        hlen, n = FRAME.unpack(self.read_exact(FRAME.size))
        return _parse_header(self.read_exact(hlen).decode())[0], n

    def recv(self) -> tuple[dict[str, Any], bytes]:
        header, n = self.recv_head()
        return header, self.read_exact(n) if n else b""

    def skip(self, n: int) -> None:
        while n:
            n -= len(self.read_exact(min(n, CHUNK)))

    # life cycle
    def start(self) -> dict[str, Any]:
        """Read the helper's hello; a helper that never says it means ssh or python failed."""
        with self.lock:
            if not self.ready:
                try:
                    self.skip_chatter()
                    self.hello, _ = self.recv()
                except (EOFError, OSError, ValueError):
                    raise self.failure("starting the helper") from None
                self.ready = True
            return self.hello

    def start_quietly(self) -> bool:
        """Wait for an extra stream's helper and its init answer. One that cannot start (a
        server allowing fewer sessions per connection, say) is closed and left out: the other
        streams take its share."""
        if self.initialised:
            return True
        try:
            self.start()
            header, _ = self.recv()  # the answer to the init pipelined at spawn
        except (TetherError, EOFError, OSError, ValueError):
            header = {}
        if not header.get("ok"):
            self.close(kill=True)
            return False
        self.initialised = True
        return True

    def answers_within(self, seconds: float) -> bool:
        """Whether the helper's first bytes (or ssh's exit) arrive within ``seconds``."""
        ready, _, _ = select.select([self.r.fileno()], [], [], seconds)
        return bool(ready)

    def skip_chatter(self) -> None:
        """Skip what the remote shell printed before the helper started (a module system's
        banner in ~/.bashrc, say): the protocol begins after the helper's magic bytes."""
        magic = ssh_helper.MAGIC
        seen = b""
        while not seen.endswith(magic):
            byte = self.r.read(1)
            if not byte or self.chatter > MAX_CHATTER:
                raise EOFError
            seen = seen[-len(magic) :] + byte
            self.chatter += 1
        self.chatter -= len(magic)

    def call(
        self, op: str, payload: bytes = b"", *, on_early: Callable[[bytes], None] | None = None, **fields: Any
    ) -> tuple[dict[str, Any], bytes]:
        """One request, one answer (list answers may come in pages, gathered here; see answer
        for ``on_early``)."""
        with self.lock:
            self.start()
            try:
                self.send({"op": op, "id": next(self.ids), **fields}, payload)
            except (OSError, ValueError):
                raise self.lost(op) from None
            return self.answer(op, on_early=on_early)

    def pipeline(self, op: str, **fields: Any) -> None:
        """Send a request before the helper has even said hello (saves a round trip at start);
        ``answer`` reads its reply later. A helper that failed to start is reported then."""
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.send({"op": op, "id": next(self.ids), **fields})

    def answer(
        self, op: str, *, on_early: Callable[[bytes], None] | None = None
    ) -> tuple[dict[str, Any], bytes]:
        """The answer's header and payload. A payload the helper had ready before the rest of
        its answer (an index read beside a walk) may come first, in an ``early`` frame: it is
        handed to ``on_early`` at once and returned as the payload."""
        with self.lock:
            self.start()
            pages: list[Any] = []
            early = b""
            try:
                while True:
                    header, data = self.recv()
                    if "page" in header:
                        pages += header["page"]
                        continue
                    if header.get("early"):
                        early = data
                        if on_early is not None:
                            on_early(data)
                        continue
                    break
            except (EOFError, OSError, ValueError):
                raise self.lost(op) from None
            if not header.get("ok"):
                raise self.remote.error_from(header["error"])
            if pages:
                header["entries"] = pages + header.get("entries", [])
            return header, data or early

    def stderr_text(self) -> str:
        try:
            self.stderr.seek(0)
            return self.stderr.read()[-8192:].decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def exit_status(self) -> int | None:
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None

    def failure(self, during: str) -> TetherError:
        """Why the helper is gone: ssh failed, python is missing or too old, or it crashed."""
        rc = self.exit_status()
        text = self.stderr_text()
        host, python = self.remote.settings.host, self.remote.settings.python
        if "tether: the remote python is" in text:
            return PythonMissing(
                f"{host}: {_last_line(text).removeprefix('tether: ')}",
                hint=f"Set the remote option python to a Python 3.8+ on {host} (e.g. "
                'python = "/usr/bin/python3", or "module load python/3.11 && python3").',
            )
        if rc == 127 or re.search(r"(command not found|not found|No such file or directory)\s*$", text, re.M):
            return PythonMissing(
                f"{python!r} was not found on {host} (tether runs its helper with the remote's Python 3.8+)",
                hint=f"Install python3 on {host}, or set the remote option python to its full path "
                '(e.g. python = "/usr/bin/python3"; on a cluster maybe "module load python && python3").',
            )
        if rc == 255 or rc is None or rc < 0:
            if during == "starting the helper":
                return self.remote.conn.classify(text, rc or 255)
            reason = _last_line(text) or "connection closed"
            return RemoteUnavailable(
                f"lost the connection to {host} during {during}: {reason}", hint=RERUN_HINT
            )
        return RemoteUnavailable(
            f"the tether helper on {host} stopped during {during} (exit {rc}): {_last_line(text)}",
            hint="Rerun with --debug; if it persists, report it with the helper's message above.",
        )

    def lost(self, during: str) -> TetherError:
        """The connection died under a request: fail this run fast from here on."""
        error = self.failure(during)
        self.remote.mark_lost(error)
        return error

    def end_input(self) -> None:
        """EOF to the helper: it finishes its request and exits (close() then waits for it)."""
        if not self.closed:
            with contextlib.suppress(OSError, ValueError):
                self.w.close()

    def close(self, *, kill: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if kill:
                self.proc.kill()
            else:
                self.w.close()  # EOF: the helper finishes its request and exits
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.r, self.stderr):
            with contextlib.suppress(OSError):
                stream.close()


# -- the remote ---------------------------------------------------------------------------------
@dataclass
class _Session:
    """What must be torn down at close (also at interpreter exit, via weakref.finalize)."""

    conn: SshConnection
    channels: list[_Channel] = field(default_factory=list)

    def close(self) -> None:
        # Every helper is told "no more requests" before any is waited for: each exit takes a
        # round trip to be confirmed, and those overlap instead of adding up (through a 20 ms
        # link, three helpers closed one by one cost 0.1 s at the end of every push).
        for channel in self.channels:
            channel.end_input()
        for channel in self.channels:
            channel.close()
        self.conn.close()


class SshRemote:
    """A remote folder on an SSH host (see the module docstring for how it works)."""

    capabilities = Capabilities(
        parallel_connections=4,  # the stream does the parallelism; this only sizes local hashing
        atomic_replace=True,
        conditional_create=True,
        server_side_hashing=True,
        preserves_mtime=True,
        # Every file is read once as it is sent: hashing those bytes on the way makes a first
        # push read each once (2 GiB of large files: 2.4 s of reading before the first byte).
        # A large one's resumable .part is then named by its scanned state (see _part_key).
        hash_on_write_max=ANY_SIZE,
        # The look under the lock walks the tree through the link: an unattended pull of 20,000
        # files through 20 ms spent 0.08 s of its 2.9 s on that second look.
        lock_before_listing=True,
    )

    def __init__(self, url: str, settings: SshSettings) -> None:
        self.url = url
        self.settings = settings
        if not settings.batch_mode:
            self.capabilities = replace(SshRemote.capabilities, login_may_prompt=True)
        self.conn = SshConnection(settings)
        self._session = _Session(self.conn)
        self._finalizer = weakref.finalize(self, self._session.close)
        self._lock = threading.Lock()
        self._control: _Channel | None = None
        self._bulk: _Channel | None = None
        self._extra: list[_Channel] = []  # further stream channels of large batches
        self._lent = False  # the control helper carries a download stream (see _lend_control)
        self._small_in_flight = 0  # small requests that chose the control helper, not yet answered
        self._spare: _Channel | None = None  # small requests go here while control is lent
        self.rtt_s: float | None = None
        self._warming: Future[None] | None = None  # waits for the bulk helper, times a ping
        self._transfers_expected = False  # connecting starts the bulk helper too (prepare_transfers)
        self._lost: TetherError | None = None
        self.facts: dict[str, Any] = {}
        self.flushed_behind = 0  # background flushes the helper ran before the last flush()

    # -- connection and channels ------------------------------------------------------------------
    def mark_lost(self, error: TetherError) -> None:
        self._lost = error

    def _spawn(self, label: str) -> _Channel:
        channel = _Channel(self, label)
        self._session.channels.append(channel)
        channel.pipeline(
            "init",
            base=self.settings.path,
            flush_step=fileio.FLUSH_BEHIND_BYTES,
            network_filesystems=NETWORK_FILESYSTEMS,
        )
        return channel

    def _init(self, channel: _Channel) -> dict[str, Any]:
        """The answer to the init request pipelined at spawn: the base folder's facts. Read once,
        under the channel's lock, whichever thread asks first (the warm-up or a transfer)."""
        with channel.lock:
            if not channel.initialised:
                channel.facts, _ = channel.answer("init")
                channel.initialised = True
            return channel.facts

    def control(self) -> _Channel:
        """The small-request channel; the first call connects and starts its helper."""
        with self._lock:
            if self._lost is not None:
                raise self._lost
            if self._control is None:
                try:
                    self.conn.connect()
                    control = self._spawn("control")
                    if self.conn.borrowed and not control.answers_within(BORROWED_HELLO_S):
                        # An earlier run's master whose link died (a laptop that slept): its
                        # sessions never start. Log in afresh instead of waiting for ssh's
                        # keepalives to give up on it.
                        control.close(kill=True)
                        self.conn.replace_borrowed()
                        control = self._spawn("control")
                    if self._transfers_expected:
                        self._spawn_bulk_locked()  # starts remotely beside the control helper
                    self.facts = self._init(control)
                except TetherError as exc:
                    self._lost = exc  # do not retry a failed connection within one run
                    raise
                self._control = control
            return self._control

    def prepare_transfers(self) -> None:
        """Start the stream helper now, without waiting for it (remotes.base.WarmsUp).

        A second remote Python started with every connection cost a no-op diff 0.14 s of its
        1.45 s on a 2-core machine (and a login node a process it never used), so only a push
        or pull asks for it. Asked before the connection exists (a push or pull does, before
        its check), this only records the wish: connecting then starts both helpers at once.
        Started after the control helper had answered, the stream helper was still starting
        when a 20 ms push of 20,000 files was ready to send (0.15 s of its 2.6 s)."""
        with self._lock:
            self._transfers_expected = True
            if self._control is None:
                return
        self._start_bulk()

    def _start_bulk(self) -> None:
        self.control()
        with self._lock:
            self._spawn_bulk_locked()

    def _spawn_bulk_locked(self) -> None:
        if self._lost is None and (self._bulk is None or self._bulk.closed):
            self._bulk = self._spawn("bulk")
            if self.rtt_s is None:
                bulk = self._bulk
                self._warming = in_background(lambda: self._warm_up(bulk), "tether-ssh-warm")

    def _warm_up(self, channel: _Channel) -> None:
        """Wait for the stream helper and time a ping on it, off the critical path: the scan,
        the plan and the lock take longer than both, so the first transfer finds the streams
        decided (the ping cost every push and pull a round trip before its first byte). Its
        error reaches the caller of bulk()."""
        self._init(channel)
        self.round_trip(channel)

    def bulk(self) -> _Channel:
        """The stream channel, started on first use if prepare_transfers did not start it
        (respawned if a stream had to be abandoned)."""
        self._start_bulk()
        with self._lock:
            warming, self._warming = self._warming, None
        if warming is not None:
            warming.result()  # raises the warm-up's error (to this caller only)
        with self._lock:
            if self._lost is not None:
                raise self._lost
            assert self._bulk is not None
            self._init(self._bulk)
            return self._bulk

    def streams(self, pieces: int, *, borrow_control: bool = False) -> list[_Channel]:
        """The bulk channel (ready) and, for a batch of several pieces over a link with latency,
        more: spawned now and not waited for, each stream reads its own helper's hello (see
        _Channel.start_quietly). ``borrow_control``: the idle control helper is one of them
        (see _lend_control); the caller gives it back with _return_control."""
        first = self.bulk()
        n = min(self.settings.streams, pieces)
        if n > 1 and self.round_trip(first) < STREAMS_MIN_RTT_S:
            n = 1
        with self._lock:
            lent = self._lend_control() if borrow_control and n > 1 else []
            self._extra = [c for c in self._extra if not c.closed]
            while len(self._extra) < n - 1 - len(lent):
                self._extra.append(self._spawn("stream"))
            return [first, *lent, *self._extra[: n - 1 - len(lent)]]

    def _lend_control(self) -> list[_Channel]:
        """The control helper as a download stream, if it is idle (under self._lock).

        Starting one more remote Python for the second stream cost a 20 ms pull of 20,000
        files 0.07 s of its 2.7 s on a 2-core machine, while the control helper sat idle: a pull
        asks nothing else of the remote during its download. A small request that comes
        meanwhile (a lease renewal in a download of over 40 s) must not wait behind the stream,
        so it goes to a spare helper started then (see _small_channel). Only downloads borrow
        it so far: a push keeps its own second helper (its 20 ms target passes with it, and the
        change was measured for pulls only)."""
        control = self._control
        if self._lent or self._small_in_flight or control is None or control.closed:
            return []
        self._lent = True
        return [control]

    def _return_control(self) -> None:
        """End a lending; a control helper that a failed stream had to kill is replaced on the
        next small request (the stream cannot be resumed in step)."""
        with self._lock:
            if not self._lent:
                return
            self._lent = False
            if self._control is not None and self._control.closed:
                self._control = None

    @contextlib.contextmanager
    def _small_channel(self) -> Iterator[_Channel]:
        """The channel for one small request: the control helper, or while a download stream
        has it, the spare helper. A request that chose control is counted, so control is not
        lent until it is answered (it would wait for the whole stream)."""
        control = self.control()
        with self._lock:
            lent = self._lent
            if not lent:
                self._small_in_flight += 1
        if lent:
            yield self._spare_channel()
            return
        try:
            yield control
        finally:
            with self._lock:
                self._small_in_flight -= 1

    def _spare_channel(self) -> _Channel:
        with self._lock:
            if self._lost is not None:
                raise self._lost
            if self._spare is None or self._spare.closed:
                self._spare = self._spawn("spare")
            spare = self._spare
        self._init(spare)
        return spare

    def round_trip(self, channel: _Channel) -> float:
        """Seconds for an empty request on a ready channel: the link's latency, measured once."""
        if self.rtt_s is None:
            started = time.perf_counter()
            channel.call("ping")
            self.rtt_s = time.perf_counter() - started
        return self.rtt_s

    def _call(self, op: str, payload: bytes = b"", **fields: Any) -> tuple[dict[str, Any], bytes]:
        with self._small_channel() as channel:
            return channel.call(op, payload, **fields)

    # -- error translation ------------------------------------------------------------------------
    def where(self, rel: str = "") -> str:
        base = self.facts.get("base", self.settings.path)
        return f"{self.settings.host}:{base}/{rel}" if rel else f"{self.settings.host}:{base}"

    def error_from(self, info: Mapping[str, Any]) -> Exception:
        kind, msg, rel = info.get("kind"), info.get("msg", ""), info.get("path", "")
        if kind == "verify":
            return VerificationError(msg, paths=[rel] if rel else [])
        if kind == "invalid":
            return InvalidPath(f"remote {self.url}: {msg}")
        if kind == "os":
            code = info.get("errno")
            where = self.where(rel)
            if code in (errno.ENOSPC, errno.EDQUOT):
                return DiskFullError(
                    f"no space left on {self.settings.host} (quota or disk full) writing {where}"
                )
            if code in (errno.EACCES, errno.EPERM, errno.EROFS):
                return RemotePermissionError(
                    f"permission denied on {where}",
                    hint="Check your permissions on the remote's base folder (`ssh HOST ls -ld PATH`).",
                )
            if code == errno.ENOENT:
                return FileNotFoundError(code, msg, where)
            return OSError(code, f"{msg} on {self.settings.host}", where)
        return TetherError(
            f"the tether helper on {self.settings.host} failed: {msg}",
            hint="Rerun with --debug and report the message.",
        )

    # -- the Remote protocol ----------------------------------------------------------------------
    def check(self) -> None:
        """Connect and look at the base folder. On failure the connection is closed here:
        callers commonly drop a remote whose check failed without closing it."""
        try:
            self._check()
        except BaseException:
            self.close()
            raise

    def _check(self) -> None:
        self.control()
        where = self.where()
        if not self.facts.get("exists"):
            mkdir = f"ssh {self.settings.host} mkdir -p {shlex.quote(self.facts.get('base', ''))}"
            raise RemoteUnavailable(
                f"remote folder {where} does not exist",
                hint=f"Create it ({mkdir}) or fix the remote's URL, then rerun.",
            )
        if self.facts.get("error"):
            raise RemotePermissionError(f"cannot reach remote folder {where}: {self.facts['error']}")
        if not self.facts.get("is_dir"):
            raise RemoteUnavailable(
                f"remote path {where} is a file, not a folder", hint="Point the remote's URL at a folder."
            )
        if not self.facts.get("readable"):
            raise RemotePermissionError(f"cannot read remote folder {where}: permission denied")

    def list_files(self, prefix: str) -> Iterator[RemoteStat]:
        if prefix:
            check_relpath(prefix)
        header, _ = self._call("list", prefix=prefix)
        self._refuse_listed(prefix, header.get("refused") or [])
        return iter([RemoteStat(p, s, m) for p, s, m in header["entries"]])

    def _refuse_listed(self, prefix: str, refused: list[list[str]]) -> None:
        if refused:
            sample = ", ".join(f"{p} ({why})" for p, why in refused[:5])
            more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
            raise ScanError(
                f"remote {self.url}: {self.where(prefix)} contains {len(refused)} symlink(s), special "
                f"file(s) or non-UTF-8 name(s) tether will not sync: {sample}{more}",
                paths=[p for p, _ in refused],
                hint="Replace links with the files they point to and rename undecodable files on the remote.",
            )

    def list_against_index(
        self,
        prefix: str,
        index: str,
        *,
        have: str | None,
        clean_temp: bool = False,
        on_index: Callable[[bytes], None] | None = None,
    ) -> ListingDelta:
        if prefix:
            check_relpath(prefix)
        with self._small_channel() as channel:
            header, data = channel.call(
                "list_delta",
                prefix=prefix,
                index=check_relpath(index),
                have=have,
                clean=clean_temp,
                early=on_index is not None,
                on_early=on_index,
            )
        self._refuse_listed(prefix, header.get("refused") or [])
        digest = header.get("index_digest")
        return ListingDelta(
            index=data if digest is not None and digest != have else None,
            index_digest=digest,
            changed=[RemoteStat(p, s, m) for p, s, m in header["entries"]],
            missing=list(header.get("missing") or []),
        )

    def exists(self, path: str) -> bool:
        header, _ = self._call("exists", path=check_relpath(path))
        return bool(header["exists"])

    def read_bytes(self, path: str) -> bytes:
        _, data = self._call("read", path=check_relpath(path))
        return data

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        self._call("write", data, path=check_relpath(path))

    def create_exclusive(self, path: str, data: bytes, *, within: str | None = None) -> bool:
        fields = {"within": check_relpath(within)} if within is not None else {}
        header, _ = self._call("create", data, path=check_relpath(path), **fields)
        if header.get("absent"):
            raise FileNotFoundError(errno.ENOENT, "no such folder", self.where(within or ""))
        return bool(header["created"])

    def write_if_locked(
        self, path: str, data: bytes, *, lock: str, token: str, release: bool = False
    ) -> bool:
        header, _ = self._call(
            "write_locked",
            data,
            path=check_relpath(path),
            lock=check_relpath(lock),
            token=token,
            release=release,
        )
        return bool(header["written"])

    def release_lock(self, path: str, token: str) -> bool:
        header, _ = self._call("release", path=check_relpath(path), token=token)
        return bool(header["released"])

    def delete(self, path: str) -> None:
        self._call("delete", path=check_relpath(path))

    def open_read(self, path: str) -> BinaryIO:
        return io.BytesIO(self.read_bytes(path))

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        _, data = self._call("read", path=check_relpath(path), offset=offset, length=length)
        return data

    def hash_files(self, paths: Iterable[str], *, use_cache: bool = True) -> dict[str, str]:
        """SHA-256 computed on the remote, in parallel there, reusing its per-dataset cache
        (keyed by inode, size, mtime and ctime) unless ``use_cache`` is False (``--checksum``)."""
        paths = [check_relpath(p) for p in paths]
        if not paths:
            return {}
        header, _ = self.bulk().call("hash", paths=paths, cache=use_cache)
        return dict(header["digests"])

    def cleanup_temp(self, prefix: str) -> int:
        header, _ = self._call("cleanup", prefix=check_relpath(prefix) if prefix else "")
        return int(header["removed"])

    def flush(self) -> None:
        """syncfs on the remote, asked of the helper that received the files when there is one:
        it knows the background flushes it started, and waits for them first."""
        with self._lock:
            bulk = self._bulk
        if bulk is not None and bulk.initialised and not bulk.closed:
            header, _ = bulk.call("flush")
        else:
            header, _ = self._call("flush")
        self.flushed_behind = int(header.get("flushed_behind") or 0)

    def classify_error(self, exc: BaseException) -> ErrorKind:
        """Retry only what a retry can fix on a live connection: transient remote errnos. A lost
        connection is a whole-run failure (RemoteUnavailable): the rerun reconnects."""
        if isinstance(exc, OSError) and not isinstance(exc, TetherError) and exc.errno in RETRYABLE_ERRNOS:
            return ErrorKind.RETRYABLE
        return ErrorKind.PERMANENT

    def close(self) -> None:
        self._finalizer()

    # -- single files go through the batch paths --------------------------------------------------
    def put_file(
        self, source: Path, path: str, *, digest: str, mtime_ns: int, on_bytes: OnBytes | None = None
    ) -> None:
        check_relpath(path)
        size = os.stat(source).st_size
        self._one(self.put_many, TransferItem(path, os.fspath(source), size, digest, mtime_ns), on_bytes)

    def get_file(
        self, path: str, dest: Path, *, digest: str, mtime_ns: int, on_bytes: OnBytes | None = None
    ) -> None:
        check_relpath(path)
        size = -1  # unknown: the helper sends what it has, the digest decides
        self._one(self.get_many, TransferItem(path, os.fspath(dest), size, digest, mtime_ns), on_bytes)

    @staticmethod
    def _one(batch: Any, item: TransferItem, on_bytes: OnBytes | None) -> None:
        errors: list[BaseException] = []
        batch(
            [item],
            on_bytes=on_bytes or (lambda _n: None),
            on_done=lambda _item, error: errors.append(error) if error else None,
        )
        if errors:
            raise errors[0]

    # -- BatchTransfers ---------------------------------------------------------------------------
    def put_many(
        self,
        items: Sequence[TransferItem],
        *,
        on_bytes: OnBytes,
        on_done: OnDone,
        on_digest: OnDigest | None = None,
    ) -> None:
        """Stream every file without waiting for per-file answers; see :class:`_PutStream`."""
        valid = _valid_items(items, on_done)
        if not valid:
            return
        pieces, channels = self._spread(valid, on_done, on_bytes)
        offsets = self._resume_points(channels[0], [i for i in valid if i.size >= RESUME_MIN])
        # Small files are read one after another: have the next ones read ahead (cold cache).
        with Prefetcher([i.local if i.size < RESUME_MIN else None for i in valid]) as ahead:
            _run_streams(
                channels,
                pieces,
                lambda channel: _PutStream(self, channel, pieces, offsets, ahead, on_digest).run,
            )

    def get_many(self, items: Sequence[TransferItem], *, on_bytes: OnBytes, on_done: OnDone) -> None:
        """Ask for the whole list once; files stream back and are verified as they land."""
        valid = _valid_items(items, on_done)
        if not valid:
            return
        try:
            pieces, channels = self._spread(valid, on_done, on_bytes, borrow_control=True)
            _run_streams(channels, pieces, lambda channel: _GetStream(self, channel, pieces).run)
        finally:
            self._return_control()

    def _spread(
        self, items: list[TransferItem], on_done: OnDone, on_bytes: OnBytes, *, borrow_control: bool = False
    ) -> tuple[_Pieces, list[_Channel]]:
        """The streams a batch goes over, and its pieces. Carried by one stream, the batch is
        one piece: a download is then one request, read ahead by the helper from end to end."""
        cut = _cut(items)
        channels = self.streams(len(cut), borrow_control=borrow_control)
        if len(channels) == 1:
            cut = [[pair for piece in cut for pair in piece]]
        return _Pieces(cut, len(items), on_done, on_bytes), channels

    def _resume_points(self, channel: _Channel, large: list[TransferItem]) -> dict[str, _ResumePoint]:
        """Partial uploads on the remote whose prefix matches our file (one round trip), with
        our SHA-256 state over that prefix (a file sent unhashed goes on hashing from it)."""
        if not large:
            return {}
        header, _ = channel.call("parts", items=[[i.path, _part_key(i), i.size] for i in large])
        found = header["parts"]
        points: dict[str, _ResumePoint] = {}
        for item in large:
            if item.path not in found:
                continue
            have, prefix_digest = found[item.path]
            if have <= 0:
                continue
            try:
                done, hasher = _hash_prefix(item.local, have)
            except OSError:
                continue
            if done == have and hasher.hexdigest() == prefix_digest:
                points[item.path] = (have, prefix_digest, hasher)
        return points

    def __repr__(self) -> str:
        return f"SshRemote({self.url!r})"


def _valid_items(items: Sequence[TransferItem], on_done: OnDone) -> list[TransferItem]:
    valid = []
    for item in items:
        try:
            check_relpath(item.path)
        except InvalidPath as exc:
            on_done(item, exc)
            continue
        valid.append(item)
    return valid


def _hash_prefix(path: str | Path, n: int) -> tuple[int, Any]:
    """(bytes read, SHA-256 state) over the first ``n`` bytes of a local file (fewer if shorter)."""
    hasher = hashlib.sha256()
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < n:
            chunk = f.read(min(CHUNK, n - done))
            if not chunk:
                break
            hasher.update(chunk)
            done += len(chunk)
    return done, hasher


def _part_key(item: TransferItem) -> str:
    """What names a large upload's resumable .part: its digest, or for a file sent before it
    was ever hashed, a digest of the state the scan saw (inode, size, mtime, ctime), which a
    rerun sees again while the file is unchanged. Either way a partial is resumed only if its
    bytes are a prefix of the file (_resume_points)."""
    if item.digest != UNHASHED:
        return item.digest
    e = item.expect
    assert e is not None
    return hashlib.sha256(f"unhashed {e.inode} {e.size} {e.mtime_ns} {e.ctime_ns}".encode()).hexdigest()


_ResumePoint = tuple[int, str, Any]  # bytes the remote partial holds, their digest, our hasher
_Piece = list[tuple[int, TransferItem]]  # consecutive files of a batch, with ids unique in it


def _cut(items: list[TransferItem]) -> list[_Piece]:
    """Pieces of PIECE_FILES files or PIECE_BYTES bytes, whichever comes first."""
    pieces: list[_Piece] = []
    piece: _Piece = []
    size = 0
    for rid, item in enumerate(items, start=1):
        piece.append((rid, item))
        size += item.size
        if len(piece) >= PIECE_FILES or size >= PIECE_BYTES:
            pieces.append(piece)
            piece, size = [], 0
    if piece:
        pieces.append(piece)
    return pieces


class _Pieces:
    """A batch cut into pieces of consecutive files, each handed to whichever stream asks next
    (a stream whose helper started late, or moves large files, simply takes fewer).

    Outcomes and byte counts from every stream's thread go through one lock to the caller's
    callbacks, which need not be thread-safe.
    """

    def __init__(self, pieces: list[_Piece], total: int, on_done: OnDone, on_bytes: OnBytes) -> None:
        self.pieces = pieces
        self.total = total
        self.completed = 0
        self.stop = threading.Event()  # a whole-run failure in one stream stops them all
        self._next = 0
        self._lock = threading.Lock()
        self._on_done, self._on_bytes = on_done, on_bytes

    def take(self) -> _Piece | None:
        with self._lock:
            if self.stop.is_set() or self._next >= len(self.pieces):
                return None
            self._next += 1
            return self.pieces[self._next - 1]

    def done(self, item: TransferItem, error: BaseException | None) -> None:
        with self._lock:
            self.completed += 1
            self._on_done(item, error)

    def on_bytes(self, n: int) -> None:
        with self._lock:
            self._on_bytes(n)


def _run_streams(
    channels: list[_Channel],
    pieces: _Pieces,
    stream: Callable[[_Channel], Callable[[], None]],
) -> None:
    """The first stream runs in this thread on the ready bulk channel; the others in threads,
    each after its own helper said hello. The first error wins; Ctrl-C kills every stream (a
    stream cut mid-file cannot be resumed in step)."""
    errors: list[BaseException] = []

    def extra(channel: _Channel) -> None:
        with channel.lock:
            if not channel.start_quietly():
                return
            try:
                stream(channel)()
            except BaseException as exc:
                errors.append(exc)
                pieces.stop.set()

    threads = [
        threading.Thread(target=extra, args=(channel,), name="tether-ssh-stream", daemon=True)
        for channel in channels[1:]
    ]
    for thread in threads:
        thread.start()
    try:
        with channels[0].lock:
            stream(channels[0])()
        for thread in threads:
            thread.join()
    except BaseException as exc:
        pieces.stop.set()
        if not isinstance(exc, Exception):
            for channel in channels[1:]:
                channel.close(kill=True)
        for thread in threads:
            thread.join()
        raise
    if errors:
        raise errors[0]


class _PutStream:
    """Send file after file, piece after piece; a reader thread turns acknowledgements into
    outcomes.

    Whole-run failures (full disk, permission denied, lost connection) stop the sending at once;
    the items already acknowledged keep their results.
    """

    BARRIER = 0

    def __init__(
        self,
        remote: SshRemote,
        channel: _Channel,
        pieces: _Pieces,
        offsets: dict[str, _ResumePoint],
        ahead: Prefetcher,
        on_digest: OnDigest | None = None,
    ) -> None:
        self.remote, self.ch, self.pieces, self.offsets = remote, channel, pieces, offsets
        self.ahead, self.on_digest = ahead, on_digest
        self.on_bytes = pieces.on_bytes
        self.pending: dict[int, TransferItem] = {}
        self.local_errors: dict[int, BaseException] = {}
        self.fatal: list[BaseException] = []
        self.stop = pieces.stop
        self.eof = False
        self.run_items: list[list[Any]] = []  # the run being gathered (see send_run)
        self.run_data: list[bytes] = []
        self.run_bytes = 0

    def done(self, item: TransferItem, error: BaseException | None) -> None:
        try:
            self.pieces.done(item, error)
        except BaseException as exc:  # a callback failure ends the stream like a fatal error
            self.fatal.append(exc)
            self.stop.set()

    def run(self) -> None:
        reader = threading.Thread(target=self.read_acks, name="tether-ssh-acks", daemon=True)
        reader.start()
        broken = False
        try:
            while (piece := self.pieces.take()) is not None:
                for rid, item in piece:
                    if self.stop.is_set():
                        break
                    self.ahead.consumed()
                    self.send_item(rid, item)
                self.send_run()
            self.ch.send({"op": "barrier", "id": self.BARRIER})
        except (BrokenPipeError, ConnectionError, ValueError):
            broken = True  # the helper is gone; the reader reports why
        except BaseException:
            self.ch.close(kill=True)  # Ctrl-C mid-file: the stream cannot be resumed in step
            reader.join()
            raise
        reader.join()
        if self.eof or broken:
            raise self.lost()
        if self.fatal:
            raise self.fatal[0]

    def lost(self) -> TetherError:
        return self.ch.lost(
            f"the upload ({self.pieces.completed} of {self.pieces.total} files were completed and kept)"
        )

    def acknowledged(self, rid: int, info: dict[str, Any] | None) -> None:
        item = self.pending.pop(rid)
        error = None if info is None else self.remote.error_from(info)
        if rid in self.local_errors and error is not None:
            error = self.local_errors.pop(rid)  # the real cause: our read failed, we sent padding
        if isinstance(error, (DiskFullError, RemotePermissionError)):
            self.fatal.append(error)
            self.stop.set()
        self.done(item, error)

    def send_item(self, rid: int, item: TransferItem) -> None:
        resumable = item.size >= RESUME_MIN
        unhashed = item.digest == UNHASHED
        if unhashed and item.expect is None:
            self.done(item, ValueError(f"{item.path}: sent unhashed without its scanned state"))
            return
        try:
            f = open(item.local, "rb", buffering=0)  # noqa: SIM115 (a with block follows)
        except OSError as exc:
            self.done(item, exc)
            return
        with f:
            if resumable or item.size > SMALL:
                if unhashed:
                    try:
                        check_source_state(f.fileno(), item.expect, item.path, "after it was scanned")
                    except (OSError, StalePlanError) as exc:
                        self.done(item, exc)
                        return
                self.send_run()  # files keep their order: the run before this one goes first
                self.pending[rid] = item
                self.send_large(rid, item, f)
                return
            try:
                if unhashed:
                    check_source_state(f.fileno(), item.expect, item.path, "after it was scanned")
                data = f.read(item.size + 1)
                if unhashed:
                    check_source_state(f.fileno(), item.expect, item.path, "while it was sent")
            except (OSError, StalePlanError) as exc:
                self.done(item, exc)
                return
        if len(data) != item.size:
            self.done(item, VerificationError(f"{item.path}: changed size while read", paths=[item.path]))
            return
        digest = item.digest
        if unhashed:  # the helper checks the bytes it receives against this digest
            digest = hashlib.sha256(data).hexdigest()
            if self.on_digest is not None:
                self.on_digest(item, digest)
        self.pending[rid] = item
        self.run_items.append([rid, item.path, item.size, digest, item.mtime_ns])
        self.run_data.append(data)
        self.run_bytes += item.size
        if len(self.run_items) >= RUN_FILES or self.run_bytes >= CHUNK:
            self.send_run()

    def send_run(self) -> None:
        """Small files leave in runs: one frame for up to RUN_FILES files or CHUNK bytes."""
        if not self.run_items:
            return
        header = {"op": "puts", "id": 0, "items": self.run_items}
        self.ch.send(header, b"".join(self.run_data), flush=False)
        self.on_bytes(self.run_bytes)
        self.run_items, self.run_data, self.run_bytes = [], [], 0

    def send_large(self, rid: int, item: TransferItem, f: BinaryIO) -> None:
        """Exactly ``size - offset`` bytes follow the header, whatever happens to the local file:
        a short or failing read is padded, and the helper's digest check then rejects it.

        A file never hashed before (a first push) is hashed from the bytes sent, the partial's
        prefix included, and its digest follows them as a 64-byte trailer the helper checks its
        own against; one that left its scanned state meanwhile gets a trailer of zeros instead."""
        unhashed = item.digest == UNHASHED
        header: dict[str, Any] = {
            "op": "put",
            "id": rid,
            "path": item.path,
            "digest": _part_key(item),  # the .part's name; the trailer carries the digest
            "mtime_ns": item.mtime_ns,
        }
        if unhashed:
            header["trailer"] = True
        offset, prefix_hasher = 0, None
        if item.size >= RESUME_MIN:
            offset, prefix, prefix_hasher = self.offsets.get(item.path, (0, "", None))
            header.update(resumable=True, offset=offset, prefix_digest=prefix)
        n = item.size - offset
        hasher = None
        if unhashed:  # the file's state is checked after its last byte (trailer)
            hasher = prefix_hasher.copy() if prefix_hasher is not None else hashlib.sha256()
        if offset:
            self.on_bytes(offset)
            f.seek(offset)
        self.ch.send_head(header, n)
        left = n
        ahead = SequentialReadAhead(f.fileno(), offset, item.size)
        while left:
            ahead.reading(item.size - left)
            try:
                chunk = f.read(min(CHUNK, left))
            except OSError as exc:
                self.local_errors[rid] = exc
                chunk = b""
            if not chunk:
                chunk = bytes(min(CHUNK, left))
                self.local_errors.setdefault(
                    rid, VerificationError(f"{item.path}: changed size while read", paths=[item.path])
                )
            elif hasher is not None:
                hasher.update(chunk)
            self.ch.w.write(chunk)
            left -= len(chunk)
            self.on_bytes(len(chunk))
        if hasher is not None:
            self.ch.w.write(self.trailer(rid, item, f, hasher))

    def trailer(self, rid: int, item: TransferItem, f: BinaryIO, hasher: Any) -> bytes:
        """The digest of what was sent, if the file kept its scanned state to its last byte."""
        try:
            check_source_state(f.fileno(), item.expect, item.path, "while it was sent")
        except (OSError, StalePlanError) as exc:
            self.local_errors.setdefault(rid, exc)
        if rid in self.local_errors:
            return b"0" * 64  # matches no digest: the helper refuses the file
        digest: str = hasher.hexdigest()
        if self.on_digest is not None:
            self.on_digest(item, digest)
        return digest.encode("ascii")

    def read_acks(self) -> None:
        """Runs until the barrier's answer. It must never stop reading early while the helper
        still writes: that would fill the pipes and deadlock both sides, so on any unexpected
        failure it kills the channel (the writer then gets a broken pipe)."""
        try:
            while True:
                header, _ = self.ch.recv()
                if header.get("id") == self.BARRIER:
                    return
                for rid, info in header["acks"]:
                    self.acknowledged(rid, info)
        except (EOFError, OSError, ValueError):
            self.eof = True
            self.stop.set()
        except BaseException as exc:
            self.fatal.append(exc)
            self.stop.set()
            self.ch.close(kill=True)


class _GetStream:
    """Receive files in the order asked; each goes through a temporary sibling, is verified
    against its digest, gets its mtime and is renamed into place (the staging path).

    Pieces are asked for one request each, two ahead: the helper starts the next piece as soon
    as it has sent the last, without waiting a round trip for the request.
    """

    def __init__(self, remote: SshRemote, channel: _Channel, pieces: _Pieces) -> None:
        self.remote, self.ch, self.pieces = remote, channel, pieces
        self.on_bytes = pieces.on_bytes
        self.made: set[str] = set()  # folders known to exist
        self.unread = 0
        # Large files resume from the bytes an interrupted run left in a partial file, if the
        # helper finds they are a prefix of the file it has (it hashes its own first bytes).
        self.partials: dict[str, tuple[int, Any]] = {}

    def ask(self, asked: deque[list[tuple[int, TransferItem]]]) -> None:
        piece = self.pieces.take()
        if piece is None:
            return
        request: list[list[Any]] = []
        for _, item in piece:
            offset, hasher = 0, None
            if item.size >= RESUME_MIN:
                offset, hasher = self.partials[item.path] = _partial_prefix(item)
            request.append([item.path, item.size, offset, hasher.hexdigest() if hasher else ""])
        self.ch.send({"op": "get", "id": next(self.ch.ids), "items": request})
        asked.append(piece)

    def run(self) -> None:
        asked: deque[list[tuple[int, TransferItem]]] = deque()
        try:
            self.ch.start()
            self.ask(asked)
            self.ask(asked)
            while asked:
                header, n = self.ch.recv_head()
                if header.get("end"):
                    asked.popleft()
                    self.ask(asked)
                    continue
                item = asked[0][header["i"]][1]
                if "error" in header:
                    self.finish(item, self.remote.error_from(header["error"]))
                    continue
                if item.path in self.partials:
                    self.finish(item, self.receive_resumable(item, n, int(header.get("offset", 0))))
                    continue
                self.finish(item, self.receive(item, n))
        except (EOFError, BrokenPipeError, ConnectionError):
            raise self.ch.lost(
                f"the download ({self.pieces.completed} of {self.pieces.total} files were completed)"
            ) from None
        except BaseException:
            self.ch.close(kill=True)  # the rest of the stream is unread: start afresh next time
            raise

    def finish(self, item: TransferItem, error: BaseException | None) -> None:
        self.pieces.done(item, error)

    def receive(self, item: TransferItem, n: int) -> BaseException | None:
        """Consume exactly ``n`` payload bytes into ``item.local``; return the item's error.

        Small files are verified in memory before anything touches the disk; large ones are
        hashed as they are written. Either way the final name appears only after the check.
        """
        final = item.local
        self.unread = n  # payload bytes still in the stream: skipped on a local error
        # Small files are verified in memory, then written in place: final is a staging path
        # (see Remote.get_file), so a temporary name and a rename per file buy nothing there.
        tmp = final if n <= SMALL else _temp_sibling(final)  # what the handlers remove on failure
        try:
            self._make_parent(final)
            hasher = hashlib.sha256()
            if n <= SMALL:
                data = self.ch.read_exact(n)
                self.unread = 0
                hasher.update(data)
                self.on_bytes(n)
                if hasher.hexdigest() != item.digest:
                    return _mismatch(item, hasher.hexdigest())
                fd = create_in_place(final)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.utime(fd, ns=(item.mtime_ns, item.mtime_ns))
                finally:
                    os.close(fd)
                return None
            with open(tmp, "xb", buffering=0) as dst:
                self._pour(dst, n, hasher)
            if hasher.hexdigest() != item.digest:
                _unlink(tmp)
                return _mismatch(item, hasher.hexdigest())
            os.utime(tmp, ns=(item.mtime_ns, item.mtime_ns))
            os.replace(tmp, final)
            return None
        except OSError as exc:
            _unlink(tmp)
            self.ch.skip(self.unread)  # keep the stream in step
            return self._local_error(exc, final)
        except BaseException:
            _unlink(tmp)
            raise

    def _make_parent(self, final: str) -> None:
        # Strings, not Path.parent: hashing and comparing Path objects was 8% of the receive
        # thread's time in a 20,000-file pull, and that thread is the stream's bottleneck.
        folder = os.path.dirname(final)
        if folder not in self.made:
            os.makedirs(folder, exist_ok=True)
            self.made.add(folder)

    @staticmethod
    def _local_error(exc: OSError, final: str) -> BaseException:
        """The item's error; a full local disk or a permission problem ends the whole run (it
        will not fix itself for the next file)."""
        error = os_error_to_tether(exc, Path(final))
        if isinstance(error, (DiskFullError, RemotePermissionError)):
            raise error from exc
        return error

    def _pour(self, dst: BinaryIO, n: int, hasher: Any) -> None:
        """Move the next ``n`` payload bytes into ``dst``, hashing them; ``self.unread`` says how
        many are still in the stream if a write fails (the caller skips them to stay in step)."""
        self.unread = n
        while self.unread:
            chunk = self.ch.read_exact(min(CHUNK, self.unread))
            self.unread -= len(chunk)
            hasher.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[dst.write(view) :]
            self.on_bytes(len(chunk))

    def receive_resumable(self, item: TransferItem, n: int, offset: int) -> BaseException | None:
        """Append the ``n`` bytes that follow ``offset`` to the item's partial file, which keeps
        what arrived if the link drops; promote it only once the whole file hashes right."""
        final, part = item.local, _partial_path(item)
        have, prefix = self.partials[item.path]
        self.unread = n
        try:
            self._make_parent(final)
            if offset and offset != have:
                part.unlink(missing_ok=True)
                self.ch.skip(self.unread)
                self.unread = 0
                return VerificationError(
                    f"{item.path}: partial download out of step; rerun", paths=[item.path]
                )
            hasher = prefix.copy() if offset and prefix is not None else hashlib.sha256()
            self.on_bytes(offset)
            with open(part, "ab" if offset else "wb", buffering=0) as dst:
                self._pour(dst, n, hasher)
            if hasher.hexdigest() != item.digest:
                part.unlink(missing_ok=True)
                return _mismatch(item, hasher.hexdigest())
            os.utime(part, ns=(item.mtime_ns, item.mtime_ns))
            os.replace(part, final)
            return None
        except OSError as exc:
            self.ch.skip(self.unread)
            return self._local_error(exc, final)


def _partial_path(item: TransferItem) -> Path:
    """Where a large download collects its bytes: named by the digest it must end with, so a
    partial of another version of the file is never resumed."""
    local = Path(item.local)
    return local.with_name(f".{local.name}{TEMP_MARKER}{item.digest[:16]}.part")


def _partial_prefix(item: TransferItem) -> tuple[int, Any]:
    """(bytes a partial download holds, a SHA-256 state over them); (0, None) if none."""
    part = _partial_path(item)
    try:
        have = part.stat().st_size
    except OSError:
        return 0, None
    if not 0 < have < item.size:  # cannot be a proper prefix: start over
        part.unlink(missing_ok=True)
        return 0, None
    return _hash_prefix(part, have)


_TEMP_TAG = secrets.token_hex(4)
_temp_counter = itertools.count()


def _temp_sibling(final: str) -> str:
    """Like fileio.temp_sibling, without an entropy syscall per file (tag + counter)."""
    folder, name = os.path.split(final)
    return os.path.join(folder, f".{name}{TEMP_MARKER}{_TEMP_TAG}{next(_temp_counter):x}")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _mismatch(item: TransferItem, got: str) -> VerificationError:
    return VerificationError(
        f"{item.path}: content hash mismatch (expected {item.digest[:12]}…, got {got[:12]}…)",
        paths=[item.path],
    )


def open_ssh_remote(config: RemoteConfig, parsed: ParsedURL, *, base_dir: Path | None = None) -> SshRemote:
    """The backend for an ``ssh://`` URL or ``host:path`` shorthand (called by open_remote)."""
    assert parsed.host is not None
    settings = SshSettings.from_options(
        name=config.name,
        host=parsed.host,
        path=parsed.path,
        user=parsed.user,
        port=parsed.port,
        options=config.options,
        base_dir=base_dir,
    )
    return SshRemote(config.url, settings)
