"""The test fault proxy (tests/faultproxy.py), with real sockets and a real echo server."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.faultproxy import FaultProxy

WAIT = 10.0  # generous: the machine may be loaded
QUIET = 0.5  # how long "nothing arrives" is watched for


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes every byte back and remembers what it received."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.received = bytearray()
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    def got(self) -> bytes:
        with self.lock:
            return bytes(self.received)


class EchoHandler(socketserver.BaseRequestHandler):
    server: EchoServer

    def handle(self) -> None:
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self.server.lock:
                self.server.received += data
            try:
                self.request.sendall(data)
            except OSError:
                return


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(echo.port) as p:
        yield p


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=WAIT)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def nothing_arrives(sock: socket.socket) -> bool:
    """True when the socket stays silent (no data, no EOF) for QUIET seconds."""
    sock.settimeout(QUIET)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(WAIT)
    return False


def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def is_closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def new_connection_is_reset(proxy: FaultProxy) -> bool:
    """True when a new connection through the proxy ends at once (reset or EOF)."""
    try:
        with connect(proxy) as sock:
            return is_closed_by_peer(sock)
    except ConnectionResetError:  # the reset can beat connect() on loopback
        return True


def test_proxy_forwards_both_ways_when_healthy(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        payload = bytes(range(256)) * 1000
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
    assert proxy.url("redis", "/0") == f"redis://127.0.0.1:{proxy.port}/0"


def test_delay_holds_each_chunk_back_and_keeps_order(proxy: FaultProxy) -> None:
    proxy.delay(0.3)
    with connect(proxy) as sock:
        start = time.monotonic()
        sock.sendall(b"first,")
        sock.sendall(b"second")
        assert recv_exactly(sock, 12) == b"first,second"
        # Up and down are both delayed: the round trip cannot beat the delay.
        assert time.monotonic() - start >= 0.3
        proxy.heal()
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"


def test_drop_reads_and_forwards_nothing_until_healed(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"before")
        assert recv_exactly(sock, 6) == b"before"
        proxy.drop()
        sock.sendall(b"lost")
        assert nothing_arrives(sock)
        assert echo.got() == b"before"
        proxy.heal()
        sock.sendall(b"after")
        assert recv_exactly(sock, 5) == b"after"
        assert echo.got() == b"beforeafter"


def test_drop_keeps_new_connections_open_and_silent(proxy: FaultProxy) -> None:
    proxy.drop()
    with connect(proxy) as sock:
        sock.sendall(b"hello")
        assert nothing_arrives(sock)


def test_cut_resets_open_connections_and_new_ones_until_healed(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        proxy.cut()
        assert is_closed_by_peer(sock)
    assert proxy.connections == 0
    assert new_connection_is_reset(proxy)
    proxy.heal()
    with connect(proxy) as sock:
        sock.sendall(b"back")
        assert recv_exactly(sock, 4) == b"back"


def test_half_open_up_reaches_the_server_but_no_reply_comes_back(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    proxy.half_open("up")
    with connect(proxy) as sock:
        sock.sendall(b"one-way")
        wait_until(lambda: echo.got() == b"one-way")
        assert nothing_arrives(sock)


def test_half_open_down_delivers_nothing_to_the_server(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        proxy.half_open("down")
        sock.sendall(b"never")
        assert nothing_arrives(sock)
        assert echo.got() == b""


def test_connections_counts_open_connections(proxy: FaultProxy) -> None:
    with connect(proxy) as a, connect(proxy) as b:
        for sock in (a, b):
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
        assert proxy.connections == 2
    wait_until(lambda: proxy.connections == 0)
    assert proxy.accepted == 2


def test_a_dead_target_resets_the_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with FaultProxy(dead_port) as proxy:
        assert new_connection_is_reset(proxy)


def test_controls_reject_bad_arguments(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError):
        proxy.delay(-1)
    with pytest.raises(ValueError):
        proxy.half_open("sideways")  # type: ignore[arg-type]
    assert proxy.mode == "pass"
