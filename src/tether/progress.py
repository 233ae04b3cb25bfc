"""Progress as a callback object, a no-op by default (the fsspec shape).

Library code reports stages and increments; only the CLI decides whether that becomes rich
progress bars, JSON lines or silence.
"""

from __future__ import annotations

from collections.abc import Callable


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


class BytesTap(Progress):
    """Forwards everything to ``inner`` and also hands each byte count to ``on_bytes``: work
    that follows the bytes landed (tether.fileio.FlushBehind) hears them from the one place
    every copier already reports to."""

    def __init__(self, inner: Progress, on_bytes: Callable[[int], None]) -> None:
        self.inner = inner
        self.on_bytes = on_bytes

    def stage(self, name: str, *, files: int | None = None, bytes: int | None = None) -> None:
        self.inner.stage(name, files=files, bytes=bytes)

    def advance(self, *, files: int = 0, bytes: int = 0) -> None:
        self.inner.advance(files=files, bytes=bytes)
        if bytes:
            self.on_bytes(bytes)

    def message(self, text: str) -> None:
        self.inner.message(text)

    def close(self) -> None:
        self.inner.close()
