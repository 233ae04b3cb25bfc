"""Reading ahead of a consumer: one that opens many small files one after another, or one
that reads a large file from start to end (SequentialReadAhead).

A copier or hasher that opens 20,000 small files in turn waits on the disk for each one when the
page cache is cold (about 0.1 ms a file): reading is serialised with the work. A thread walking a
bounded distance ahead and calling ``posix_fadvise(WILLNEED)`` queues the reads and returns, so
the disk sees many requests at once and the consumer finds its bytes in memory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path


class Prefetcher:
    """Asks the kernel to read the next small files before a copier gets to them.

    A copier that opens 20,000 small files one after another waits on the disk for each one
    when the page cache is cold (about 0.1 ms a file): reading is serialised with writing. rsync
    hides that with a separate sender process; here a thread walks a bounded distance ahead of
    the copier and calls ``posix_fadvise(WILLNEED)``, which queues the read and returns, so the
    disk sees many requests at once and the copier finds its bytes in memory. Errors are
    ignored: a prefetch is only a hint, the copy itself reports what is wrong.
    """

    def __init__(self, paths: Sequence[str | Path | None], *, ahead: int = 256) -> None:
        self._paths = paths
        self._ahead = ahead
        self._consumed = 0
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="tether-prefetch", daemon=True)

    def __enter__(self) -> Prefetcher:
        if self._paths and hasattr(os, "posix_fadvise"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def consumed(self) -> None:
        """The copier took the next file: the window moves one file on."""
        with self._cond:
            self._consumed += 1
            if self._consumed % 32 == 0:
                self._cond.notify()

    def _run(self) -> None:
        for i, path in enumerate(self._paths):
            with self._cond:
                while not self._stop and i >= self._consumed + self._ahead:
                    self._cond.wait()
                if self._stop:
                    return
            if path is not None:
                _will_need(path, os.O_NOFOLLOW)


class SequentialReadAhead:
    """Keeps the kernel reading a window ahead of one thread that reads a large file in order.

    Sending a large file over SSH, one thread reads a chunk, hashes it and writes it to ssh: with
    a cold cache each read waited on the disk, since the kernel's own read-ahead (128 KiB by
    default) is used up by a 1 MiB read. Four 512 MiB files over loopback took 7.77-7.86 s
    that way and 5.39-5.49 s with ``WILLNEED`` asked for the next 64 MiB in steps of 16 MiB
    (3 alternating pairs). The window is bounded, so a file of any size costs at most
    ``WINDOW`` bytes of page cache ahead of the reader. A hint only: errors are ignored.

    Not used for multipart uploads to object stores: against ``rclone serve s3`` on the same
    disk it made 4 x 512 MiB slower (10.20-11.94 s against 9.87-11.04 s), the server's writes
    being the limit there and the reads ahead competing with them.
    """

    WINDOW = 64 * 1024 * 1024
    STEP = 16 * 1024 * 1024

    def __init__(self, fd: int, start: int, size: int) -> None:
        self._fd = fd
        self._queued = start  # bytes before this offset have been asked for
        self._size = size
        self._enabled = hasattr(os, "posix_fadvise")

    def reading(self, pos: int) -> None:
        """The reader is about to read at ``pos``: have the window after it on its way."""
        target = min(self._size, pos + self.WINDOW)
        while self._enabled and self._queued < target:
            try:
                os.posix_fadvise(self._fd, self._queued, self.STEP, os.POSIX_FADV_WILLNEED)
            except OSError:
                self._enabled = False
            self._queued += self.STEP


def read_soon(*paths: Path) -> None:
    """Queue a read of whole files the run will need after a long walk (the hash cache):
    ``posix_fadvise(WILLNEED)`` returns at once and the disk reads them while the walk waits on
    inodes, instead of after it. Missing files and platforms without fadvise are ignored."""
    if hasattr(os, "posix_fadvise"):
        for path in paths:
            _will_need(path)


def _will_need(path: str | Path, flags: int = 0) -> None:
    """Queue a read of the whole file; a hint only, so every error is ignored."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | flags)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
