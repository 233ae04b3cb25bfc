"""tether.forked: per-file work in forked worker processes, results back in the parent."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tether import forked
from tether.errors import DiskFullError, TetherError

pytestmark = pytest.mark.skipif(not forked.available(), reason="forked workers are Linux-only")


def collect(items, work, **kwargs) -> dict[object, tuple[object, BaseException | None]]:
    seen: dict[object, tuple[object, BaseException | None]] = {}

    def on_outcome(item, value, error) -> None:
        assert item not in seen, f"{item} reported twice"
        seen[item] = (value, error)

    forked.run_forked(items, work, on_outcome=on_outcome, **kwargs)
    return seen


def test_every_item_is_done_once_in_worker_processes() -> None:
    items = list(range(1000))
    second_worker = multiprocessing.get_context("fork").Event()

    def work(i: int) -> tuple[int, int]:
        if i == 0:  # the first chunk waits until another worker has taken the second
            assert second_worker.wait(timeout=60)
        if i == forked.CHUNK:
            second_worker.set()
        return i * i, os.getpid()

    seen = collect(items, work, processes=4)
    assert sorted(seen) == items
    assert all(value[0] == i * i and error is None for i, (value, error) in seen.items())  # type: ignore[index]
    pids = {value[1] for value, _ in seen.values()}  # type: ignore[index]
    assert os.getpid() not in pids
    assert len(pids) > 1


def test_consecutive_items_stay_together() -> None:
    """Chunks of consecutive items go to one worker (files of one folder stay together)."""
    seen = collect(list(range(forked.CHUNK * 6 + 5)), lambda i: os.getpid(), processes=3)
    assert len(seen) == forked.CHUNK * 6 + 5
    for start in range(0, forked.CHUNK * 6, forked.CHUNK):
        assert len({seen[i][0] for i in range(start, start + forked.CHUNK)}) == 1


def test_an_item_error_is_reported_and_the_rest_go_on() -> None:
    def work(i: int) -> int:
        if i == 7:
            raise ValueError("bad item 7")
        return i

    seen = collect(list(range(300)), work, processes=2)
    assert len(seen) == 300
    value, error = seen[7]
    assert value is None and isinstance(error, ValueError) and "bad item 7" in str(error)
    assert all(seen[i] == (i, None) for i in range(300) if i != 7)


def test_structured_errors_keep_their_type_and_fields() -> None:
    def work(i: int) -> int:
        raise TetherError(f"item {i}", hint="do this")

    seen = collect([1], work, processes=2)
    error = seen[1][1]
    assert isinstance(error, TetherError) and error.message == "item 1" and error.hint == "do this"


class Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"needs two arguments {a} {b}")
        self.lock = __import__("threading").Lock()  # not picklable


def test_an_unpicklable_error_arrives_as_its_text() -> None:
    def work(i: int) -> int:
        raise Unpicklable(1, 2)

    error = collect([0], work, processes=2)[0][1]
    assert isinstance(error, TetherError) and "needs two arguments 1 2" in str(error)


def test_a_stop_error_stops_handing_out_chunks() -> None:
    """A whole-run failure (disk full) is reported; chunks not started are not reported at all."""
    items = list(range(forked.CHUNK * 50))

    def work(i: int) -> int:
        if i == 3:
            raise DiskFullError("no space left")
        return i

    seen = collect(items, work, processes=2, stop_on=(DiskFullError,))
    assert isinstance(seen[3][1], DiskFullError)
    assert 3 + 1 <= len(seen) < len(items)
    # The failing chunk itself stops at the failure.
    assert all(i not in seen for i in range(4, forked.CHUNK))


def test_a_worker_that_dies_has_its_items_reported_as_failed() -> None:
    def work(i: int) -> int:
        if i == 70:
            os.kill(os.getpid(), signal.SIGKILL)
        return i

    seen = collect(list(range(200)), work, processes=2)
    assert len(seen) == 200
    assert isinstance(seen[70][1], forked.WorkerDied)
    assert "exit -9" in str(seen[70][1])
    assert seen[0] == (0, None)


def test_no_items_forks_nothing() -> None:
    forked.run_forked([], lambda i: i, processes=4, on_outcome=lambda *a: pytest.fail("called"))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    """A SIGKILLed run leaves no copier behind to race its rerun."""
    read_end, write_end = os.pipe()
    script = textwrap.dedent(
        f"""
        import os, select
        from tether import forked

        def work(i):
            os.write({write_end}, f"{{os.getpid()}}\\n".encode())
            select.select([], [], [])  # blocks until killed
            return i

        forked.run_forked(list(range(forked.CHUNK * 2)), work, processes=2, on_outcome=print)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], pass_fds=(write_end,))
    os.close(write_end)
    try:
        with os.fdopen(read_end) as pipe:
            pids = [int(pipe.readline()), int(pipe.readline())]  # both workers are working
        assert all(_alive(pid) for pid in pids)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)  # polling for the kernel's SIGKILL to land, with a deadline
        assert not any(_alive(pid) for pid in pids), "workers outlived their killed parent"
    finally:
        parent.kill()


# -- in_child: one computation in a forked child -------------------------------------------


def test_in_child_returns_the_childs_result() -> None:
    here = os.getpid()
    assert forked.in_child(lambda: (os.getpid() != here, [("a b", 1, 2)])) == (True, [("a b", 1, 2)])


def test_in_child_raises_the_childs_error_here() -> None:
    def work() -> None:
        raise DiskFullError("no space left on /scratch", hint="free some")

    with pytest.raises(DiskFullError) as caught:
        forked.in_child(work)
    assert caught.value.message == "no space left on /scratch"
    assert caught.value.hint == "free some"


def test_in_child_unpicklable_error_keeps_its_text() -> None:
    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:  # pickling re-calls __init__ with one arg
            super().__init__(f"odd {a} {b}")

    def work() -> None:
        raise Odd(1, 2)

    with pytest.raises(TetherError, match="odd 1 2"):
        forked.in_child(work)


def test_in_child_killed_child_means_the_work_runs_here() -> None:
    here = os.getpid()

    def work() -> int:
        if os.getpid() != here:
            os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, say
        return os.getpid()

    assert forked.in_child(work) == here
