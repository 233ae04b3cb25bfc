"""Progress as a callback object, a no-op by default (the fsspec shape).

Library code reports stages and increments; only the CLI decides whether that becomes rich
progress bars, JSON lines or silence.
"""

from __future__ import annotations


class Progress:
    """Base callback: every method is a no-op, so library callers pay nothing for progress."""

    def stage(self, name: str, *, files: int | None = None, bytes: int | None = None) -> None:
        """A new phase begins (scanning, hashing, transferring...) with optional totals."""

    def advance(self, *, files: int = 0, bytes: int = 0) -> None:
        """Work done in the current stage since the last call."""

    def message(self, text: str) -> None:
        """A one-line notice (warnings such as skipped symlinks)."""

    def close(self) -> None:
        """The operation is over; release any display."""


NO_PROGRESS = Progress()
