"""A TCP proxy on 127.0.0.1 that misbehaves on command, for tests of network faults.

Put it between a client and a server (Redis, a node's API) and change its behaviour
while they talk::

    with FaultProxy(redis_port) as proxy:
        client = redis.Redis(port=proxy.port)
        proxy.drop()      # a black hole: bytes are read and never forwarded
        proxy.heal()      # forward again

Modes: ``heal()``/``pass_through()`` forwards everything, ``delay(seconds)`` forwards
every chunk that long after it arrived (order kept), ``drop()`` reads and discards both
ways (connections stay open, EOFs are swallowed too), ``cut()`` resets every connection
and resets new ones as soon as they are accepted (clients see a reset, not a refusal:
the port stays ours), ``half_open(forward)`` forwards one direction only: ``"up"`` is
client to server, ``"down"`` server to client. Bytes dropped stay dropped after a heal.

The proxy runs its own asyncio loop in a daemon thread, so plain (sync) tests and async
tests on another loop use it alike; every control call returns once the loop applied it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Direction = Literal["up", "down"]

CHUNK = 65536
CONTROL_TIMEOUT = 10.0


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP reset (SO_LINGER 0), not a polite FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    """One client connection and its connection to the target."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        for task in self.tasks:
            task.cancel()
        _reset(self.client[1])
        _reset(self.upstream[1])


class FaultProxy:
    """See the module docstring."""

    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", *, listen_port: int = 0
    ) -> None:
        self.host = "127.0.0.1"
        self.target = (target_host, target_port)
        self._listen_port = listen_port
        self.port = 0
        self.accepted = 0  # connections accepted so far
        self._mode = "pass"
        self._delay = 0.0
        self._forward: Direction = "up"
        self._connections: set[_Connection] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    # -- addresses

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def url(self, scheme: str = "http", path: str = "") -> str:
        """``scheme://127.0.0.1:PORT`` + path, e.g. ``proxy.url("redis", "/0")``."""
        return f"{scheme}://{self.host}:{self.port}{path}"

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def connections(self) -> int:
        """Connections open through the proxy right now."""
        return self._run(self._count())

    # -- lifecycle

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = self._run(
            asyncio.start_server(self._accept, self.host, self._listen_port, reuse_address=True)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- controls

    def heal(self) -> None:
        """Forward everything again, at once."""
        self._set("pass")

    pass_through = heal

    def delay(self, seconds: float) -> None:
        """Forward each chunk `seconds` after it arrived, in order."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._set("delay", delay=seconds)

    def drop(self) -> None:
        """Black hole: accept and read, forward nothing (no data, no EOF)."""
        self._set("drop")

    def half_open(self, forward: Direction = "up") -> None:
        """Forward only client->server ("up") or server->client ("down")."""
        if forward not in ("up", "down"):
            raise ValueError('forward must be "up" or "down"')
        self._set("half_open", forward=forward)

    def cut(self) -> None:
        """Reset every connection now and every new one as it is accepted."""
        self._set("cut")

    # -- the loop side

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT)

    def _set(self, mode: str, *, delay: float = 0.0, forward: Direction = "up") -> None:
        self._run(self._apply(mode, delay, forward))

    async def _apply(self, mode: str, delay: float, forward: Direction) -> None:
        self._mode, self._delay, self._forward = mode, delay, forward
        if mode == "cut":
            for conn in list(self._connections):
                conn.reset()
            self._connections.clear()

    async def _count(self) -> int:
        return len(self._connections)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.reset()
        self._connections.clear()

    def _forwards(self, direction: Direction) -> bool:
        if self._mode in ("drop", "cut"):
            return False
        return self._mode != "half_open" or self._forward == direction

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._mode == "cut":
            _reset(writer)
            return
        try:
            upstream = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        conn = _Connection((reader, writer), upstream)
        self._connections.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pump(conn, "up", reader, upstream[1])),
            asyncio.create_task(self._pump(conn, "down", upstream[0], writer)),
        ]
        done, _ = await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = any(not t.cancelled() and t.exception() is not None for t in done)
        if conn in self._connections:
            self._connections.discard(conn)
            if failed:  # one side broke: so does the other, as on a real connection
                conn.reset()
            else:
                for w in (writer, upstream[1]):
                    w.close()

    async def _pump(
        self,
        conn: _Connection,
        direction: Direction,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Copy one direction; each chunk is judged by the mode at the time it arrived."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, writer))
        try:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""
                if sender.done():  # the other end is gone: raise its error
                    sender.result()
                    return
                forward = self._forwards(direction)
                if not data:
                    if forward:
                        queue.put_nowait(None)
                        await sender
                    else:
                        sender.cancel()
                        # A black hole swallows the EOF too: keep the other side open
                        # until it closes (or the proxy cuts).
                        await asyncio.Event().wait()
                    return
                if forward:
                    queue.put_nowait((time.monotonic() + self._delay, data))
        finally:
            sender.cancel()

    async def _send(
        self, queue: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        while True:
            item = await queue.get()
            if item is None:
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
