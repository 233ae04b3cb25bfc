"""Deterministic crash points for fault tests (invariant 7: re-running converges).

Setting ``TETHER_FAULT_KILL_AT=NAME:N`` makes the process SIGKILL itself the N-th time it passes
checkpoint NAME, so a test can kill a run at an exact step instead of racing it with sleeps.
Unset (always, outside tests), a checkpoint costs one comparison.
"""

from __future__ import annotations

import os
import signal
import threading

_ENV = "TETHER_FAULT_KILL_AT"
_counts: dict[str, int] = {}
_lock = threading.Lock()


# Read once: checkpoints sit on the per-file path (tens of thousands of calls a run), and the
# variable is only ever set in the environment a test starts tether with.
_SPEC = os.environ.get(_ENV)
# The run's own process: a checkpoint hit in a forked copying worker (tether.forked) kills the
# run, not just that worker, whose siblings then die with their parent.
_MAIN_PID = os.getpid()


def checkpoint(name: str) -> None:
    spec = _SPEC
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == int(nth or 1)
    if hit:
        if os.getpid() != _MAIN_PID:
            os.kill(_MAIN_PID, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
