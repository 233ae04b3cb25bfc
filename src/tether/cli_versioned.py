"""CLI commands for versioned (content-addressed) remotes.

``cli.py`` hands over here in three places: ``push``/``pull`` when the remote's layout is
``versioned``, ``diff TARGET REV1 REV2`` (two git revisions), and ``diff TARGET REMOTE`` against
a versioned remote. ``register`` adds the commands that only versioned remotes have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from tether.errors import UsageError
from tether.workspace import Workspace

if TYPE_CHECKING:
    from tether.cli import State


def is_versioned(remote_name: str) -> bool:
    """True when REMOTE is configured with ``layout = "versioned"``."""
    return Workspace.find().remote(remote_name).layout == "versioned"


def _not_yet() -> UsageError:
    return UsageError(
        "versioned remotes are not available in this version of tether",
        hint='Use a mirror remote (remove `layout = "versioned"` from its configuration).',
    )


def sync_command(direction: str, state: State, target: str, remote_name: str, **options: Any) -> None:
    raise _not_yet()


def diff_remote(state: State, target: str, remote_name: str, **options: Any) -> None:
    raise _not_yet()


def diff_revisions(state: State, target: str, rev1: str, rev2: str, **options: Any) -> None:
    raise _not_yet()


def register(group: click.Group) -> None:
    """Add the versioned-only commands (commit, fetch, checkout, log, gc, verify) to ``group``."""
