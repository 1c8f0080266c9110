"""Shared fixtures: a real, throwaway redis-server for the whole test session."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import RedisServer, free_port

REDIS_START_TIMEOUT = 5.0


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Start ``redis-server`` on a free loopback port; yield it; stop it at teardown."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH; run `make redis` (or `make test`) first")

    workdir: Path = tmp_path_factory.mktemp("redis")
    host = "127.0.0.1"
    port = free_port(host)
    log = (workdir / "redis.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            "--port", str(port),
            "--bind", host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
        ],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"redis://{host}:{port}/0"
    try:
        client = redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while True:
            if process.poll() is not None:
                output = (workdir / "redis.log").read_text(errors="replace")
                pytest.fail(f"redis-server exited with {process.returncode}:\n{output}")
            try:
                if client.ping():
                    break
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server on port {port} did not answer PING within 5 s")
            time.sleep(0.05)
        client.close()
        yield RedisServer(host=host, port=port, url=url, process=process)
    finally:
        _stop(process)
        log.close()
