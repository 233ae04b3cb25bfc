"""Per-file work spread over forked worker processes.

Copying 20,000 small files on a local disk is bound by the kernel's per-file work (open,
create, utime, rename) and by waiting for cold reads, not by bytes. Threads of one process
take turns on the GIL around each of those short calls and contend on the process's file
table: measured on a 2-core VM, 4 threads copied 20,000 files in 4.4-4.6 s with half again the
system time of 1 thread (5.1 s), while 4 processes took 1.9-2.7 s (rsync: 2.8-3.7 s).

Workers are forked, so they inherit the work function, its closures and the item list without
pickling any of it. They take chunks of consecutive items (files of one folder stay with one
worker, so two workers rarely create files in the same folder) from a shared counter, which
also balances the load, and send one message per chunk back: results, not progress per byte.

A worker dies with the run: it asks the kernel for SIGKILL when its parent dies (a killed run
leaves no copier behind to race its rerun), ignores Ctrl-C (the parent decides: it stops
handing out chunks and lets each worker finish its current file), and exits with os._exit
after its last message, never running the parent's clean-up code.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from tether.errors import ExitCode, TetherError, TransferFailed

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

T = TypeVar("T")
R = TypeVar("R")

CHUNK = 64  # items per message and per hand-out: ~20 ms of small-file copying
MIN_FILES = 256
_PR_SET_PDEATHSIG = 1


def available() -> bool:
    """Forking workers is Linux-only here: it needs fork and PR_SET_PDEATHSIG."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def worth_it(files: int, processes: int) -> bool:
    """Below MIN_FILES files, forking workers costs more than it saves (about 5 ms a worker
    against 0.1-0.2 ms a small file). TETHER_FORK_MIN_FILES moves the threshold (tests: 1)."""
    try:
        least = int(os.environ.get("TETHER_FORK_MIN_FILES", MIN_FILES))
    except ValueError:
        least = MIN_FILES
    return processes > 1 and files >= least and available()


class WorkerDied(TetherError):
    """A worker process ended without reporting some of its items (killed by someone, or by
    the kernel when memory ran out): the run was interrupted, exit 130."""

    exit_code = ExitCode.INTERRUPTED
    default_hint = "Rerun the same command: verified files are kept and the rest is copied again."


def run_forked(
    items: Sequence[T],
    work: Callable[[T], R],
    *,
    processes: int,
    on_outcome: Callable[[T, R | None, BaseException | None], None],
    stop_on: tuple[type[BaseException], ...] = (),
) -> None:
    """Call ``work(item)`` for every item in ``processes`` forked workers; ``on_outcome`` runs
    in this process, once per item, with the result or the error.

    An error of a ``stop_on`` type stops the hand-out of further chunks (items not started are
    not reported); an item whose worker died without reporting it is reported as WorkerDied.
    """
    if not items:
        return
    import multiprocessing  # here, not at import: 10 ms that most commands never need
    from multiprocessing.connection import Connection, wait

    ctx = multiprocessing.get_context("fork")
    next_chunk = ctx.Value("q", 0)  # the shared counter, with its lock
    stop = ctx.RawValue("b", 0)
    chunks = (len(items) + CHUNK - 1) // CHUNK
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    reported = bytearray(len(items))
    parent = os.getpid()

    def take() -> int | None:
        if stop.value:
            return None
        with next_chunk.get_lock():
            chunk = next_chunk.value
            if chunk >= chunks:
                return None
            next_chunk.value = chunk + 1
        return chunk

    def serve(conn: Connection) -> None:
        _become_worker(parent)
        while (chunk := take()) is not None:
            batch: list[tuple[int, R | None, BaseException | None]] = []  # (index, result, error)
            for index in range(chunk * CHUNK, min((chunk + 1) * CHUNK, len(items))):
                try:
                    batch.append((index, work(items[index]), None))
                except BaseException as exc:
                    batch.append((index, None, _portable(exc)))
                    if isinstance(exc, stop_on):
                        stop.value = 1
                        break
            conn.send(batch)
        conn.close()

    with warnings.catch_warnings():
        # Python 3.12+ warns about fork in a process with threads (a progress bar's refresher,
        # the pool that scanned): workers touch none of their locks, only os calls and hashlib.
        warnings.simplefilter("ignore", DeprecationWarning)
        for _ in range(max(1, min(processes, chunks))):
            receiver, sender = ctx.Pipe(duplex=False)
            process = ctx.Process(target=serve, args=(sender,), daemon=True)
            process.start()
            sender.close()
            workers.append((process, receiver))

    try:
        open_conns = [conn for _, conn in workers]
        while open_conns:
            for conn in wait(open_conns):
                assert isinstance(conn, Connection)
                try:
                    batch = conn.recv()
                except EOFError:
                    open_conns.remove(conn)
                    continue
                for index, value, error in batch:
                    reported[index] = 1
                    if isinstance(error, stop_on):
                        stop.value = 1
                    on_outcome(items[index], value, error)
    except BaseException:
        stop.value = 1  # Ctrl-C here: workers finish their current file and leave
        raise
    finally:
        for process, conn in workers:
            process.join()
            conn.close()
    if stop.value:
        return
    died = [(p.pid, p.exitcode) for p, _ in workers if p.exitcode]
    for index, seen in enumerate(reported):
        if not seen:
            detail = ", ".join(f"pid {pid} exit {code}" for pid, code in died) or "no report"
            on_outcome(items[index], None, WorkerDied(f"a copying process ended early ({detail})"))


def in_child(work: Callable[[], R]) -> R:
    """Return ``work()`` computed in one forked child process (its error is raised here).

    For a walk that should overlap with this process's own: a thread walking a tree takes
    turns on the GIL with the rest of the run around every stat() it makes, so two trees walked
    in two threads took longer than one after the other (warm: 0.30 s against 0.19 s for 2 x
    20,000 files). A child walks at full speed meanwhile, at ~4 ms for the fork. The result
    crosses a pipe pickled, so it should be plain tuples, not objects (20,000 tuples: 10 ms).
    Where fork is unavailable, or the child dies without an answer, the work runs here.
    """
    if not available():
        return work()
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: see run_forked
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's exit skips coverage's own bookkeeping
        try:
            os.close(read_fd)
            _become_worker(parent)
            try:
                answer: tuple[bool, object] = (True, work())
            except BaseException as exc:
                answer = (False, _portable(exc))
            with os.fdopen(write_fd, "wb") as out:
                out.write(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as answer_pipe:
            data = answer_pipe.read()
    except BaseException:
        os.kill(pid, signal.SIGKILL)  # Ctrl-C: nobody waits for the answer any more
        raise
    finally:
        os.waitpid(pid, 0)
    try:
        ok, value = pickle.loads(data)
    except Exception:  # no answer or a torn one: the child was killed (OOM, say)
        return work()
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


def _become_worker(parent: int) -> None:
    """In a forked child: die with the parent, and leave Ctrl-C to it (it decides what stops)."""
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _die_with(parent: int) -> None:
    """Ask for SIGKILL when the parent dies; if it already has, go now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _portable(exc: BaseException) -> BaseException:
    """The error as the parent can receive it: itself if it survives pickling, else a
    TransferFailed with its text (keeping what a user reads)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return TransferFailed(f"{exc}")
    return exc
