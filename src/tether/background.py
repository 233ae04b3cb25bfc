"""One call run beside the main work, its outcome kept in a Future for whoever needs it next.

The thread is a daemon: what runs there waits on a remote (a login, a helper's first answer, a
helper's exit), and a remote that never answers must not keep the process from exiting. A
ThreadPoolExecutor's workers are joined at exit, so the pool is not used for this.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future


def in_background(work: Callable[[], None], name: str) -> Future[None]:
    """Start ``work`` in a daemon thread named ``name``; ``result()`` waits and raises its error."""
    done: Future[None] = Future()

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return done
