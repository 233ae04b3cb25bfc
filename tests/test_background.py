"""tether.background: one call beside the main work, its outcome in a Future."""

from __future__ import annotations

import threading

import pytest

from tether.background import in_background


def test_the_outcome_and_the_error_reach_whoever_waits() -> None:
    ran: list[tuple[str, bool]] = []

    def work() -> None:
        me = threading.current_thread()
        ran.append((me.name, me.daemon))

    assert in_background(work, "tether-test").result(10) is None
    assert ran == [("tether-test", True)]  # a daemon: a remote that never answers cannot block exit

    def fail() -> None:
        raise ConnectionError("the helper went away")

    with pytest.raises(ConnectionError, match="the helper went away"):
        in_background(fail, "tether-test").result(10)
