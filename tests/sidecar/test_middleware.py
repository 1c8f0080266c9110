"""The ASGI and WSGI middleware with a real Starlette app and a real Flask app.

Each node has a ClusterState behind a real node API (``/status`` and ``/txid/wait`` on
loopback) and the app, wrapped in the middleware, served by uvicorn (Starlette, in the
test's loop) or werkzeug (Flask, in a thread), writing a real SQLite file. The primary's
tailer is stood in for by a sync hook that reads the highest row id, and replication by
copying rows.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import flask
import pytest
import sqlean
import uvicorn
from aiohttp import web
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from werkzeug.serving import make_server

from sidecar.cluster import ClusterState, NodeInfo, Primary
from sidecar.config import ProxyConfig
from sidecar.middleware import LtxASGIMiddleware, LtxWSGIMiddleware, NodeStatus, read_wait
from sidecar.proxy import handle_wait_txid
from tests.flyedge import serve_app
from tests.helpers import free_port

DB = "app.db"
TOKEN = "middleware-token"
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")
PROXY = ProxyConfig(read_timeout=timedelta(seconds=20), primary_timeout=timedelta(0))


# -- pure --------------------------------------------------------------------------------------


def test_status_json_is_read_and_reads_wait_only_when_behind() -> None:
    status = NodeStatus.from_json(
        {
            "role": "replica",
            "primary": {"node_id": "p", "api_url": "a", "proxy_url": "http://p", "epoch": 3},
            "databases": [{"name": DB, "txid": "0000000000000005", "checksum": "0" * 16}],
        }
    )
    assert status.role == "replica" and status.primary == NodeInfo("p", "a", "http://p")
    assert status.txids == {DB: 5}
    assert read_wait(None, status, PROXY) is None
    assert read_wait(5, status, PROXY) is None
    assert read_wait(6, status, PROXY) == DB
    assert NodeStatus.from_json({"role": "candidate", "primary": None}).primary is None


# -- harness -----------------------------------------------------------------------------------


def connect(path: Path) -> Any:
    return sqlean.connect(str(path), isolation_level=None, check_same_thread=False)


def max_id(path: Path) -> int:
    conn = connect(path)
    try:
        value: int = conn.execute("SELECT coalesce(max(id), 0) FROM items").fetchone()[0]
        return value
    finally:
        conn.close()


def values(path: Path) -> list[str]:
    conn = connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT value FROM items ORDER BY id")]
    finally:
        conn.close()


def insert(path: Path, value: str) -> None:
    conn = connect(path)
    try:
        conn.execute("INSERT INTO items(value) VALUES (?)", (value,))
    finally:
        conn.close()


def starlette_app(name: str, path: Path) -> Starlette:
    async def list_items(request: Request) -> JSONResponse:
        return JSONResponse(values(path), headers={"X-Node": name})

    async def add_item(request: Request) -> JSONResponse:
        insert(path, (await request.body()).decode())
        return JSONResponse("ok", headers={"X-Node": name})

    return Starlette(
        routes=[
            Route("/items", list_items, methods=["GET"]),
            Route("/items", add_item, methods=["POST"]),
        ]
    )


def flask_app(name: str, path: Path) -> flask.Flask:
    app = flask.Flask(name)

    @app.get("/items")
    def list_items() -> flask.Response:
        response = flask.jsonify(values(path))
        response.headers["X-Node"] = name
        return response

    @app.post("/items")
    def add_item() -> flask.Response:
        insert(path, flask.request.get_data().decode())
        response = flask.jsonify("ok")
        response.headers["X-Node"] = name
        return response

    return app


Stop = Callable[[], Awaitable[None]]


async def serve_starlette(
    name: str, path: Path, api_url: str, on_fly: bool, proxy: ProxyConfig
) -> tuple[str, Stop]:
    app = LtxASGIMiddleware(
        starlette_app(name, path),
        api_url=api_url,
        proxy=proxy,
        token=TOKEN,
        cache_seconds=0.05,
        on_fly=on_fly,
    )
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)

    async def stop() -> None:
        server.should_exit = True
        await task

    return f"http://127.0.0.1:{port}", stop


async def serve_flask(
    name: str, path: Path, api_url: str, on_fly: bool, proxy: ProxyConfig
) -> tuple[str, Stop]:
    app = flask_app(name, path)
    wrapped = LtxWSGIMiddleware(
        app.wsgi_app, api_url=api_url, proxy=proxy, token=TOKEN, cache_seconds=0.05, on_fly=on_fly
    )
    port = free_port()
    server = make_server("127.0.0.1", port, wrapped, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    async def stop() -> None:
        await asyncio.to_thread(server.shutdown)
        thread.join(timeout=30)

    return f"http://127.0.0.1:{port}", stop


SERVERS = {"starlette": serve_starlette, "flask": serve_flask}


class Node:
    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path
        conn = connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, value TEXT)")
        conn.close()
        self.state = ClusterState(NodeInfo(name, ""))
        self.api_url = self.url = ""
        self.stops: list[Stop] = []

    async def start(self, framework: str, on_fly: bool, proxy: ProxyConfig) -> None:
        api = web.Application()
        api["state"] = self.state

        async def status(request: web.Request) -> web.Response:
            return web.json_response(self.state.as_dict())

        api.router.add_get("/status", status)
        api.router.add_get("/txid/wait", handle_wait_txid)
        runner, self.api_url = await serve_app(api)
        self.stops.append(runner.cleanup)
        self.url, stop = await SERVERS[framework](self.name, self.path, self.api_url, on_fly, proxy)
        self.stops.append(stop)
        self.state.me = NodeInfo(self.name, self.api_url, self.url)

    async def stop(self) -> None:
        for stop in reversed(self.stops):
            await stop()


def replicate(primary: Node, replica: Node) -> None:
    have = max_id(replica.path)
    conn, source = connect(replica.path), connect(primary.path)
    try:
        rows = source.execute("SELECT id, value FROM items WHERE id > ?", (have,)).fetchall()
        conn.executemany("INSERT INTO items(id, value) VALUES (?, ?)", rows)
    finally:
        conn.close()
        source.close()
    replica.state.set_position(DB, max_id(replica.path), 0)


Build = Callable[..., Awaitable[tuple[Node, Node]]]


@pytest.fixture(params=sorted(SERVERS))
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Build]:
    framework: str = request.param
    made: list[Node] = []

    async def build(on_fly: bool = False, proxy: ProxyConfig = PROXY) -> tuple[Node, Node]:
        primary, replica = Node("p", tmp_path / "p.db"), Node("r", tmp_path / "r.db")
        made.extend([primary, replica])
        for node in (primary, replica):
            await node.start(framework, on_fly, proxy)

        async def tail(name: str) -> int:  # the tailer stand-in
            txid = max_id(primary.path)
            primary.state.set_position(name, txid, 0)
            return txid

        primary.state.sync_hook = tail
        term = Primary(primary.state.me, 1)
        primary.state.set_role("primary", term)
        replica.state.set_role("replica", term)
        replica.state.heard_from_primary()  # as if its stream were up
        for node in (primary, replica):
            node.state.set_position(DB, 0, 0)
        return primary, replica

    yield build
    for node in made:
        await node.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def txid_cookie_of(response: aiohttp.ClientResponse) -> str:
    header = response.headers.get("Set-Cookie", "")
    assert header.startswith("__txid=") and "HttpOnly" in header, header
    return header.split(";")[0]


# -- tests -------------------------------------------------------------------------------------


async def test_write_on_the_primary_sets_the_txid_cookie(
    cluster: Build, http: aiohttp.ClientSession
) -> None:
    primary, _ = await cluster()
    async with http.post(primary.url + "/items", data="a") as r:
        assert r.status == 200 and r.headers["X-Node"] == "p"
        assert txid_cookie_of(r) == "__txid=0000000000000001"
        assert r.headers["Ltx-Txid"] == "0000000000000001"
    assert values(primary.path) == ["a"]


async def test_write_on_a_replica_is_forwarded_and_the_next_read_waits_for_it(
    cluster: Build, http: aiohttp.ClientSession
) -> None:
    primary, replica = await cluster()
    async with http.post(replica.url + "/items", data="fwd") as r:
        assert r.status == 200 and r.headers["X-Node"] == "p", await r.text()
        cookie = txid_cookie_of(r)
    assert values(primary.path) == ["fwd"] and values(replica.path) == []
    read = asyncio.create_task(http.get(replica.url + "/items", headers={"Cookie": cookie}))
    await asyncio.sleep(0.3)
    assert not read.done()
    replicate(primary, replica)
    async with await read as r:
        assert r.status == 200 and r.headers["X-Node"] == "r"
        assert await r.json() == ["fwd"]


async def test_write_on_a_replica_on_fly_answers_with_fly_replay(
    cluster: Build, http: aiohttp.ClientSession
) -> None:
    _, replica = await cluster(on_fly=True)
    async with http.post(replica.url + "/items", data="x") as r:
        assert r.status == 200 and r.headers["fly-replay"] == "instance=p"
        assert await r.read() == b""
    assert values(replica.path) == []


async def test_read_waits_for_the_txid_header_and_no_primary_gets_503(
    cluster: Build, http: aiohttp.ClientSession
) -> None:
    _, replica = await cluster()
    replica.state.set_position(DB, 0, 0)
    headers = {"Ltx-Txid": "0000000000000009"}
    wait = asyncio.create_task(http.get(replica.url + "/items", headers=headers))
    await asyncio.sleep(0.3)
    replica.state.set_position(DB, 9, 0)  # reached: the read goes on
    async with await wait as r:
        assert r.status == 200
    replica.state.set_role("candidate", None)
    await asyncio.sleep(0.1)  # past the status cache
    async with http.post(replica.url + "/items", data="x") as r:
        assert r.status == 503 and "no primary" in await r.text()


async def test_unreachable_sidecar_api_gives_503_for_writes(
    cluster: Build, http: aiohttp.ClientSession
) -> None:
    primary, _ = await cluster()
    await primary.stops.pop(0)()  # stop the node API
    async with http.post(primary.url + "/items", data="x") as r:
        assert r.status == 503 and "sidecar API unavailable" in await r.text()
    async with http.get(primary.url + "/items") as r:
        assert r.status == 200  # a read without a TXID does not need the sidecar


async def test_read_past_the_read_timeout_gets_504(
    cluster: Build, http: aiohttp.ClientSession
) -> None:
    proxy = ProxyConfig(read_timeout=timedelta(milliseconds=300))
    _, replica = await cluster(proxy=proxy)
    async with http.get(replica.url + "/items", headers={"Cookie": "__txid=0000000000000009"}) as r:
        assert r.status == 504 and "timed out" in await r.text()
