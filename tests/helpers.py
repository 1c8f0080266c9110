"""Small helpers shared by tests (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import json
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
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


# -- LTX fixtures (shared/ltx-fixtures beside the clone) --------------------------------

# /work/main/tests/helpers.py -> /work/shared/ltx-fixtures (CI has shared/ beside the clone).
LTX_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "ltx-fixtures"


def ltx_manifest() -> dict[str, Any]:
    """manifest.json of the LTX fixtures, or an empty manifest when they are missing."""
    path = LTX_FIXTURES / "manifest.json"
    if not path.is_file():
        return {"ltx_files": [], "database_images": {}}
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


needs_ltx_fixtures = pytest.mark.skipif(
    not (LTX_FIXTURES / "manifest.json").is_file(),
    reason=f"LTX fixtures not found at {LTX_FIXTURES}",
)
