"""A latency-injecting TCP proxy on 127.0.0.1: a delay line, not a stop-and-wait relay.

Every chunk read from one side is written to the other side ``delay_s`` later (10 ms each way by
default: a 20 ms round trip, a laptop talking to a cluster or a cloud region), while the reader
keeps reading: many chunks are in flight at once, so throughput is kept and only latency is
added, as on a long link with plenty of bandwidth. Per-direction buffering is bounded
(``max_buffer`` bytes), so a slow receiver pushes back on the sender through TCP as a real link
would.

It runs an asyncio loop in a daemon thread of the harness (which only waits on its child while a
tool runs) and counts what crosses it: accepted connections, bytes each way and, for HTTP
traffic, request lines, so a no-op can be shown to cost a fixed number of round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections import deque
from dataclasses import dataclass

CHUNK = 256 * 1024
HTTP_REQUEST = re.compile(rb"(?:GET|PUT|POST|HEAD|DELETE) /[^ \r\n]* HTTP/1\.[01]\r\n")


@dataclass
class Counters:
    """What crossed the proxy; subtract two snapshots to get one run's share."""

    connections: int = 0
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    http_requests: int = 0  # request lines seen client -> server (HTTP targets only)

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.connections - other.connections,
            self.bytes_up - other.bytes_up,
            self.bytes_down - other.bytes_down,
            self.http_requests - other.http_requests,
        )

    def as_json(self) -> dict[str, int]:
        return {
            "connections": self.connections,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "http_requests": self.http_requests,
        }


class LatencyProxy:
    """``LatencyProxy(target_port, delay_s=0.010)``: listen on 127.0.0.1:``port``, forward to
    127.0.0.1:``target_port`` with ``delay_s`` added in each direction. ``close()`` stops it."""

    def __init__(
        self, target_port: int, delay_s: float = 0.010, *, http: bool = False, max_buffer: int = 32 << 20
    ) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.http = http
        self.max_buffer = max_buffer
        self._counters = Counters()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._server is None:
            raise RuntimeError(f"latency proxy did not start: {self._error}")
        self.port = int(self._server.sockets[0].getsockname()[1])

    # -- public ---------------------------------------------------------------------------------
    def counters(self) -> Counters:
        with self._lock:
            c = self._counters
            return Counters(c.connections, c.bytes_up, c.bytes_down, c.http_requests)

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            # Let the cancelled pipes run their finally blocks before the loop stops: a task
            # destroyed while pending printed "coroutine ignored GeneratorExit" into every log.
            if tasks:
                await asyncio.wait(tasks, timeout=5)

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0, limit=CHUNK)
            )
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port, limit=CHUNK)
        except OSError:
            client_w.close()
            return
        with self._lock:
            self._counters.connections += 1
        for w in (client_w, server_w):
            _nodelay(w)
        up = asyncio.ensure_future(self._pipe(client_r, server_w, upstream=True))
        down = asyncio.ensure_future(self._pipe(server_r, client_w, upstream=False))
        try:
            await asyncio.gather(up, down)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        finally:
            for w in (client_w, server_w):
                with contextlib.suppress(Exception):
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
        """Read as fast as the sender sends; write each chunk ``delay_s`` after it arrived."""
        line: deque[tuple[float, bytes]] = deque()
        buffered = 0
        more = asyncio.Event()  # something was queued (or the reader ended)
        room = asyncio.Event()  # the buffer dropped below max_buffer
        room.set()
        done = False
        tail = b""  # last bytes of the previous chunk, for request lines split across chunks

        async def read() -> None:
            nonlocal buffered, done, tail
            try:
                while True:
                    await room.wait()
                    data = await reader.read(CHUNK)
                    if not data:
                        break
                    line.append((time.monotonic() + self.delay_s, data))
                    buffered += len(data)
                    if buffered >= self.max_buffer:
                        room.clear()
                    more.set()
                    requests = 0
                    if upstream and self.http:
                        window = tail + data
                        requests = len(HTTP_REQUEST.findall(window)) - len(HTTP_REQUEST.findall(tail))
                        tail = window[-512:]
                    with self._lock:
                        if upstream:
                            self._counters.bytes_up += len(data)
                            self._counters.http_requests += requests
                        else:
                            self._counters.bytes_down += len(data)
            except (ConnectionError, OSError):
                pass
            finally:
                done = True
                more.set()

        reading = asyncio.ensure_future(read())
        try:
            while True:
                if not line:
                    if done:
                        break
                    more.clear()
                    await more.wait()
                    continue
                due = line[0][0]
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                # everything already due goes out in one write
                out = []
                now = time.monotonic()
                while line and line[0][0] <= now:
                    out.append(line.popleft()[1])
                size = sum(len(b) for b in out)
                writer.write(b"".join(out) if len(out) > 1 else out[0])
                await writer.drain()
                buffered -= size
                if buffered < self.max_buffer:
                    room.set()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            reading.cancel()
        finally:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading


def _nodelay(writer: asyncio.StreamWriter) -> None:
    import socket

    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
