"""Small helpers shared by tests (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass

import redis


@dataclass(frozen=True)
class RedisServer:
    """A running redis-server started for the tests (see the ``redis_server`` fixture)."""

    host: str
    port: int
    url: str  # redis://127.0.0.1:PORT/0
    process: subprocess.Popen[bytes]

    def client(self) -> redis.Redis:
        """A new synchronous client; the caller closes it."""
        return redis.Redis.from_url(self.url)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    The kernel picks the port (bind to port 0); the socket is closed before returning,
    so a racing process could take it, which is acceptable for tests on one machine.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
