"""A TCP proxy that flips bits in what the server sends, for the corrupt-on-the-wire nemesis.

It sits in a chain with tests/faultproxy.py's FaultProxy (which drops, delays, cuts and
half-opens but never alters bytes)::

    replica --> FaultProxy --> CorruptingProxy --> primary

``corrupt(rate)`` flips one random bit in each server-to-client chunk with probability
``rate``; ``heal()`` forwards bytes unchanged again. Only the server-to-client direction is
damaged: that is the stream of LTX frames the replica must refuse. Like FaultProxy it
runs its own asyncio loop in a daemon thread, so sync tests can drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHUNK = 65536
CONTROL_TIMEOUT = 10.0


def flip_bit(data: bytes, rng: random.Random) -> bytes:
    """`data` with exactly one bit inverted (empty data is returned as is)."""
    if not data:
        return data
    damaged = bytearray(data)
    damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
    return bytes(damaged)


class CorruptingProxy:
    """See the module docstring."""

    def __init__(self, target_port: int, seed: int = 0) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = 0
        self.rate = 0.0
        self.flipped = 0  # bits flipped so far
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CorruptingProxy:
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT)
        self._loop.close()

    def corrupt(self, rate: float = 0.5) -> None:
        """Flip one bit in each server-to-client chunk with probability `rate`."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        self.rate = rate

    def heal(self) -> None:
        self.rate = 0.0

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, damage=False)),
            asyncio.create_task(self._pump(up_reader, writer, damage=True)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, damage: bool
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(CHUNK):
                if damage and self.rate > 0 and self._rng.random() < self.rate:
                    data = flip_bit(data, self._rng)
                    self.flipped += 1
                writer.write(data)
                await writer.drain()
