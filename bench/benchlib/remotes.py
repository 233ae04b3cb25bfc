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
from abc import ABC, abstractmethod
from pathlib import Path


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
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def ensure_dir(self, rel: str) -> None:
        os.makedirs(self.root / rel, exist_ok=True)


class LocalKind(RemoteKind):
    name = "local"
    description = "a folder on the same disk (local path / NFS-style remote)"

    def location(self, scratch: Path) -> Location:
        return LocalLocation(scratch / "remote")


REMOTE_KINDS: dict[str, type[RemoteKind]] = {"local": LocalKind}
