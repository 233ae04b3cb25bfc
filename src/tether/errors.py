"""One error hierarchy for the whole tool.

Every failure a user can meet is a subclass of :class:`TetherError` carrying an exit code and a
hint, so the CLI has a single place that turns errors into one-line messages. Subclasses also
inherit the matching built-in exception where one exists, so Python callers can catch
``FileNotFoundError`` or ``PermissionError`` without knowing tether's types.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes are a public contract: scripts branch on them (documented in README)."""

    OK = 0
    DIFFERENCES = 1
    USAGE = 2
    REFUSED = 3
    VERIFY_FAILED = 4
    UNREACHABLE = 5
    LOCKED = 6
    TRANSFER_FAILED = 7
    INTERRUPTED = 130
    INTERNAL = 70  # a bug: an error tether has no message for (sysexits' EX_SOFTWARE)


def first_line(exc: BaseException) -> str:
    """An error's message cut to its first line (obstore's messages append a 30-line debug
    dump); the type's name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class TetherError(Exception):
    """Base of every error tether raises on purpose."""

    exit_code: ExitCode = ExitCode.USAGE
    default_hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class UsageError(TetherError):
    """Bad arguments or a request that cannot mean anything."""


class ConfigError(TetherError):
    """Malformed or inconsistent configuration."""

    default_hint = "Check tether.toml and .tether/config.local.toml."


class WorkspaceNotFound(TetherError, FileNotFoundError):
    default_hint = "Run `tether init` in your project folder to create a workspace."


class UnknownRemote(ConfigError, KeyError):
    default_hint = "List remotes with `tether remote list`; add one with `tether remote add NAME URL`."

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message


class DatasetNotFound(TetherError, FileNotFoundError):
    default_hint = "List local datasets with `tether ls`; check the id and the remote name."


class InvalidPath(TetherError, ValueError):
    """A path or dataset id that could escape its folder or cannot be stored portably."""


class ScanError(TetherError):
    """The local tree holds something tether refuses to sync (symlinks, FIFOs, devices)."""

    def __init__(self, message: str, *, paths: Sequence[str] = (), hint: str | None = None):
        super().__init__(message, hint=hint)
        self.paths = list(paths)


class RefusedError(TetherError):
    """The plan would lose data or act on something the user has not seen."""

    exit_code = ExitCode.REFUSED

    def __init__(self, message: str, *, paths: Sequence[str] = (), hint: str | None = None):
        super().__init__(message, hint=hint)
        self.paths = list(paths)


class StalePlanError(RefusedError):
    default_hint = "Something changed since the plan was made; run the command again to re-plan."


class VerificationError(TetherError):
    exit_code = ExitCode.VERIFY_FAILED
    default_hint = (
        "Nothing was promoted under its final name. Rerun the command; if it fails again, "
        "check the storage for corruption."
    )

    def __init__(self, message: str, *, paths: Sequence[str] = (), hint: str | None = None):
        super().__init__(message, hint=hint)
        self.paths = list(paths)


class RemoteUnavailable(TetherError, ConnectionError):
    exit_code = ExitCode.UNREACHABLE
    default_hint = "Check that the remote's location exists and is mounted or reachable."


class ConnectionDropped(RemoteUnavailable):
    """A link that broke while one file's bytes were in flight: the remote is still there, so
    the file is worth another try on its own (a whole-run failure only once retries ran out).
    A laptop on flaky Wi-Fi sees these; one of them must not end a 20,000-file pull."""


class RemotePermissionError(TetherError, PermissionError):
    exit_code = ExitCode.UNREACHABLE
    default_hint = "Check your permissions on the remote's base path."


class LockHeld(TetherError):
    exit_code = ExitCode.LOCKED

    def __init__(self, message: str, *, holder: dict[str, object] | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.holder = holder or {}


class DiskFullError(TetherError, OSError):
    exit_code = ExitCode.REFUSED
    default_hint = "Free some space on the destination and rerun; completed files are kept."


class TransferFailed(TetherError):
    """Files that could not be read or written for a reason no other class names (an I/O error,
    a backend error tether does not map): not the user's usage, not a safety refusal, so a
    script can tell "rerun later" from "fix the command" (exit 2) and "look first" (exit 3)."""

    exit_code = ExitCode.TRANSFER_FAILED
    default_hint = (
        "Rerun the same command: files already transferred and verified are kept "
        "(--debug shows the full error)."
    )

    @classmethod
    def first_of(cls, failed: str, path: str, cause: BaseException) -> TransferFailed:
        """ "N file(s) failed, first: PATH: first line of its error" (mirror and versioned runs
        alike); raise it ``from cause`` so --debug still shows the whole error."""
        return cls(f"{failed}, first: {path}: {first_line(cause)}")


class Interrupted(TetherError):
    """The user said no (or stopped the run): not an error, so the CLI prints it plainly."""

    exit_code = ExitCode.INTERRUPTED
    default_hint = "Rerun when you are ready; -y skips the question."
