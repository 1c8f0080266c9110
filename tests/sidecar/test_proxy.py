"""The HTTP proxy: routing rules, fly-replay, forwarding, read-your-writes, sync mode.

Each "node" is a ClusterState, a small real aiohttp app writing a real SQLite file, and
the proxy in front of it, on real loopback ports. Replication is simulated: rows are
copied from the primary's file to the replica's and the replica's position is set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlean
from aiohttp import web

from sidecar.cluster import ClusterState, NodeInfo, Primary
from sidecar.config import Config, ProxyConfig, SyncConfig
from sidecar.proxy import (
    CommitClock,
    Forward,
    Refuse,
    Replay,
    Route,
    classify,
    forwarded_headers,
    health_verdict,
    make_proxy_app,
    replica_write_action,
    requested_txid,
    slowest_required,
    txid_cookie,
)
from tests.flyedge import FlyEdge, serve_app

DB = "app.db"
TOKEN = "test-token"

# -- pure rules ----------------------------------------------------------------------------


def test_get_and_head_are_reads_other_methods_are_writes() -> None:
    proxy = ProxyConfig()
    assert classify("GET", "/items", proxy) is Route.READ
    assert classify("HEAD", "/items", proxy) is Route.READ
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        assert classify(method, "/items", proxy) is Route.WRITE


def test_write_paths_passthrough_and_health_are_classified_in_litefs_order() -> None:
    proxy = ProxyConfig(write_paths=("/admin/*", "/touch"), passthrough_paths=("/static/*",))
    assert classify("GET", "/admin/a/b", proxy) is Route.WRITE
    assert classify("GET", "/touch", proxy) is Route.WRITE
    assert classify("GET", "/touch/x", proxy) is Route.READ  # globs are anchored
    assert classify("POST", "/static/app.js", proxy) is Route.PASSTHROUGH
    assert classify("GET", "/litefs/health", proxy) is Route.HEALTH
    assert classify("GET", "/ltx/health", proxy) is Route.HEALTH
    assert classify("POST", "/ltx/health", proxy) is Route.WRITE


def test_txid_comes_from_the_cookie_or_the_header_and_bad_values_are_ignored() -> None:
    assert requested_txid("a=1; __txid=000000000000002a; b=2", None) == 42
    assert requested_txid(None, "000000000000002A") == 42
    assert requested_txid("__txid=0000000000000010", "0000000000000020") == 32
    assert requested_txid("__txid=42", None) is None
    assert requested_txid("__txid=zzzzzzzzzzzzzzzz; junk", "nope") is None
    assert requested_txid(None, None) is None


def test_txid_cookie_is_16_lowercase_hex_with_path_httponly_and_max_age() -> None:
    value = txid_cookie(0xABC, timedelta(minutes=5))
    assert value == "__txid=0000000000000abc; Path=/; Max-Age=300; HttpOnly"


def test_replica_write_action_replays_forwards_or_refuses() -> None:
    primary = NodeInfo("m1", "http://p:20202", "http://p:8080")
    auto = ProxyConfig()
    assert replica_write_action(primary, auto, on_fly=True, body_length=10) == Replay("m1")
    assert replica_write_action(primary, auto, on_fly=False, body_length=10) == Forward(
        "http://p:8080"
    )
    big = (1 << 20) + 1
    assert isinstance(replica_write_action(primary, auto, on_fly=True, body_length=big), Forward)
    chunked = replica_write_action(primary, auto, on_fly=True, body_length=None)
    assert isinstance(chunked, Forward)
    replayed = replica_write_action(primary, auto, on_fly=True, body_length=0, replayed=True)
    assert isinstance(replayed, Forward)
    always = ProxyConfig(fly_replay="always")
    assert replica_write_action(primary, always, on_fly=False, body_length=0) == Replay("m1")
    never = ProxyConfig(fly_replay="never")
    assert isinstance(replica_write_action(primary, never, on_fly=True, body_length=0), Forward)
    none = replica_write_action(None, auto, on_fly=True, body_length=0)
    assert isinstance(none, Refuse) and none.status == 503 and "no primary" in none.reason
    bounced = replica_write_action(primary, auto, on_fly=False, body_length=0, forwarded=True)
    assert isinstance(bounced, Refuse) and bounced.status == 503
    no_url = replica_write_action(
        NodeInfo("m1", "http://p:20202"), auto, on_fly=False, body_length=0
    )
    assert isinstance(no_url, Refuse) and "no proxy URL" in no_url.reason


def test_forwarded_headers_drop_hop_by_hop_and_extend_x_forwarded_for() -> None:
    headers = [
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("Content-Type", "text/plain"),
    ]
    out = dict(forwarded_headers(headers, "10.0.0.2", "https"))
    assert out == {
        "Content-Type": "text/plain",
        "X-Forwarded-For": "10.0.0.1, 10.0.0.2",
        "X-Forwarded-Proto": "https",
    }


def test_health_verdict() -> None:
    assert health_verdict(None) == (200, "OK\n")
    assert health_verdict("no primary known") == (503, "no primary known\n")


def test_slowest_required_lag_and_commit_clock() -> None:
    assert slowest_required([], 2) == 0.0
    assert slowest_required([3.0, 1.0, 2.0], 0) == 3.0
    assert slowest_required([3.0, 1.0, 2.0], 2) == 2.0
    assert slowest_required([3.0, 1.0], 5) == 3.0
    clock = CommitClock()
    clock.observe(5, 100.0)
    clock.observe(7, 101.0)
    clock.observe(6, 102.0)  # not newer: ignored
    assert clock.lag(7, 110.0) == 0.0
    assert clock.lag(5, 110.0) == 9.0
    assert clock.lag(4, 110.0) == 10.0
    clock.forget_through(5)
    assert clock.lag(4, 110.0) == 9.0


# -- the cluster harness ---------------------------------------------------------------------


def open_db(path: Path) -> Any:
    conn = sqlean.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, value TEXT)")
    return conn


def max_id(conn: Any) -> int:
    value: int = conn.execute("SELECT coalesce(max(id), 0) FROM items").fetchone()[0]
    return value


class Node:
    """One node: state, app (real SQLite), proxy; `txid` = the highest row id."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        self.db = open_db(tmp / f"{name}.db")
        self.state = ClusterState(NodeInfo(name, f"http://api.{name}.invalid"))
        self.app_calls = 0
        self.runners: list[web.AppRunner] = []
        self.app_url = ""
        self.proxy_url = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/items", self.list_items)
        app.router.add_post("/items", self.add_item)
        app.router.add_get("/touch", self.add_item)
        app.router.add_post("/static/{x}", self.static)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/broken", self.broken)
        return app

    async def broken(self, request: web.Request) -> web.StreamResponse:
        """Half an answer, then the app goes away (as a killed process does)."""
        response = web.StreamResponse(headers={"X-Node": self.name})
        await response.prepare(request)
        await response.write(b"half of it")
        assert request.transport is not None
        request.transport.abort()
        return response

    def _answer(self, data: object) -> web.Response:
        return web.json_response(data, headers={"X-Node": self.name})

    async def list_items(self, request: web.Request) -> web.Response:
        self.app_calls += 1
        rows = self.db.execute("SELECT value FROM items ORDER BY id").fetchall()
        return self._answer([r[0] for r in rows])

    def _commit(self, value: str) -> int:
        cur = self.db.execute("INSERT INTO items(value) VALUES (?)", (value,))
        txid: int = cur.lastrowid
        self.state.set_position(DB, txid, 0)  # the tailer's job, simulated
        return txid

    async def add_item(self, request: web.Request) -> web.Response:
        self.app_calls += 1
        value = request.query.get("value") or (await request.text())
        return self._answer({"txid": self._commit(value)})

    async def static(self, request: web.Request) -> web.Response:
        self.app_calls += 1
        return self._answer("static")

    async def upload(self, request: web.Request) -> web.Response:
        self.app_calls += 1
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(65536):
            digest.update(chunk)
            size += len(chunk)
        self._commit(f"upload:{size}")
        return self._answer({"size": size, "sha256": digest.hexdigest()})

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"{self.name}:{msg.data}")
        return ws

    async def start(self, cfg: Config) -> None:
        runner, self.app_url = await serve_app(self.app())
        self.runners.append(runner)
        cfg = dataclasses.replace(cfg, proxy=dataclasses.replace(cfg.proxy, target=self.app_url))
        runner, self.proxy_url = await serve_app(make_proxy_app(cfg, self.state, TOKEN))
        self.runners.append(runner)
        self.state.me = NodeInfo(self.name, self.state.me.api_url, self.proxy_url)

    async def stop(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()
        self.db.close()


def replicate(primary: Node, replica: Node) -> int:
    """Copy the rows the replica lacks, then set its position (what apply does)."""
    have = max_id(replica.db)
    rows = primary.db.execute("SELECT id, value FROM items WHERE id > ?", (have,)).fetchall()
    replica.db.execute("BEGIN IMMEDIATE")
    replica.db.executemany("INSERT INTO items(id, value) VALUES (?, ?)", rows)
    replica.db.execute("COMMIT")
    txid = max_id(replica.db)
    replica.state.set_position(DB, txid, 0)
    if replica.name not in primary.state.replicas:
        primary.state.replica_connected(replica.name)
    primary.state.replica_reported(replica.name, {DB: (txid, 0)})
    return txid


def make_config(**proxy: Any) -> Config:
    sync = proxy.pop("sync", SyncConfig())
    return Config(proxy=ProxyConfig(**proxy), sync=sync)


class Cluster:
    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.primary, *self.replicas = nodes

    async def elect(self) -> None:
        """The first node is primary, the others replicas of it (epoch 1)."""
        term = Primary(self.primary.state.me, 1)
        self.primary.state.set_role("primary", term)
        self.primary.state.set_position(DB, max_id(self.primary.db), 0)
        for node in self.replicas:
            node.state.set_role("replica", term)
            node.state.heard_from_primary()  # as if its stream were up
            node.state.set_position(DB, max_id(node.db), 0)


@pytest.fixture
async def make_cluster(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Node] = []

    async def build(n: int = 2, **proxy: Any) -> Cluster:
        cfg = make_config(**proxy)
        nodes = [Node(f"node{i}", tmp_path) for i in range(n)]
        made.extend(nodes)
        for node in nodes:
            await node.start(cfg)
        cluster = Cluster(nodes)
        await cluster.elect()
        return cluster

    yield build
    for node in made:
        await node.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def cookie_of(response: aiohttp.ClientResponse) -> str:
    header = response.headers.get("Set-Cookie", "")
    assert header.startswith("__txid="), header
    return header.split(";")[0]


# -- the proxy on real HTTP ----------------------------------------------------------------


async def test_write_on_primary_sets_txid_cookie_and_header(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(1)
    p = cluster.primary
    async with http.post(p.proxy_url + "/items", data="a") as r:
        assert r.status == 200
        assert (await r.json()) == {"txid": 1}
        cookies = r.headers.getall("Set-Cookie")
        assert cookies == ["__txid=0000000000000001; Path=/; Max-Age=300; HttpOnly"]
        assert r.headers["Ltx-Txid"] == "0000000000000001"
    async with http.get(p.proxy_url + "/items") as r:
        assert await r.json() == ["a"]
        assert "Set-Cookie" not in r.headers  # reads set no cookie


async def test_write_on_replica_in_fly_mode_answers_with_fly_replay(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, fly_replay="always")
    replica = cluster.replicas[0]
    async with http.post(replica.proxy_url + "/items", data="a") as r:
        assert r.status == 200
        assert r.headers["fly-replay"] == "instance=node0"
        assert await r.read() == b""
    assert replica.app_calls == 0 and cluster.primary.app_calls == 0


async def test_fly_edge_replays_writes_on_the_primary_and_reads_see_them_everywhere(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    """Writes sent to a replica land on the primary; the next read on any replica sees them."""
    cluster = await make_cluster(3, fly_replay="always")
    p = cluster.primary
    edge = FlyEdge({n.name: n.proxy_url for n in cluster.nodes})
    runner, edge_url = await serve_app(edge.app())

    async def replicator(replica: Node) -> None:
        while True:  # woken by the primary's position changes, like the real stream
            await p.state.wait_for(lambda: p.state.txid(DB) > replica.state.txid(DB), None)
            await asyncio.sleep(0.002)  # replicas lag a little, so readers really wait
            replicate(p, replica)

    tasks = [asyncio.create_task(replicator(r)) for r in cluster.replicas]
    try:
        stale = 0
        for i in range(200):
            writer, reader = cluster.replicas[i % 2], cluster.replicas[(i + 1) % 2]
            headers = {"fly-force-instance-id": writer.name}
            async with http.post(edge_url + "/items", data=f"v{i}", headers=headers) as r:
                assert r.status == 200 and r.headers["X-Node"] == "node0"
                cookie = cookie_of(r)
            headers = {"fly-force-instance-id": reader.name, "Cookie": cookie}
            async with http.get(edge_url + "/items", headers=headers) as r:
                assert r.status == 200 and r.headers["X-Node"] == reader.name
                stale += f"v{i}" not in await r.json()
        assert stale == 0
        assert edge.replays == 200
        assert [n.app_calls for n in cluster.replicas] == [100, 100]  # the reads only
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()


async def test_write_on_replica_off_fly_is_forwarded_with_a_5mb_body(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2)  # fly_replay "auto", not on Fly: forward
    replica = cluster.replicas[0]
    body = bytes(range(256)) * (5 * 4096 + 7)  # a little over 5 MB

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    for data in (body, chunks()):  # with a Content-Length, then chunked
        async with http.post(replica.proxy_url + "/upload", data=data) as r:
            assert r.status == 200, await r.text()
            assert r.headers["X-Node"] == "node0"
            assert await r.json() == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
            assert cookie_of(r).startswith("__txid=")
    assert replica.app_calls == 0 and cluster.primary.app_calls == 2


async def test_read_with_cookie_on_replica_waits_until_the_write_is_applied(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, fly_replay="never")
    p, replica = cluster.primary, cluster.replicas[0]
    async with http.post(replica.proxy_url + "/items", data="fresh") as r:
        cookie = cookie_of(r)
    assert replica.state.txid(DB) == 0
    read = asyncio.create_task(http.get(replica.proxy_url + "/items", headers={"Cookie": cookie}))
    await asyncio.sleep(0.2)
    assert not read.done()  # held back by the proxy
    replicate(p, replica)
    async with await read as r:
        assert r.status == 200 and await r.json() == ["fresh"]


async def test_read_past_the_read_timeout_gets_504_with_a_clear_body(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, read_timeout=timedelta(milliseconds=300))
    replica = cluster.replicas[0]
    for headers in ({"Cookie": "__txid=0000000000000063"}, {"Ltx-Txid": "0000000000000063"}):
        async with http.get(replica.proxy_url + "/items", headers=headers) as r:
            assert r.status == 504
            text = await r.text()
            assert "0000000000000063" in text and "timed out" in text
    assert replica.app_calls == 0
    assert replica.state.counters["proxy_read_timeouts"] == 2


async def test_txid_header_makes_a_read_wait_like_the_cookie(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, txid_header="X-Db-Txid")
    p, replica = cluster.primary, cluster.replicas[0]
    async with http.post(p.proxy_url + "/items", data="h") as r:
        txid = r.headers["X-Db-Txid"]
    read = asyncio.create_task(http.get(replica.proxy_url + "/items", headers={"X-Db-Txid": txid}))
    await asyncio.sleep(0.1)
    replicate(p, replica)
    async with await read as r:
        assert await r.json() == ["h"]


async def test_write_with_no_primary_known_gets_503(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, primary_timeout=timedelta(milliseconds=200))
    replica = cluster.replicas[0]
    replica.state.set_role("candidate", None)
    async with http.post(replica.proxy_url + "/items", data="x") as r:
        assert r.status == 503
        assert "no primary" in await r.text()
    async with http.get(replica.proxy_url + "/ltx/health") as r:
        assert r.status == 503 and (await r.text()).startswith("no primary known")
    assert replica.app_calls == 0


async def test_health_is_ok_until_lag_exceeds_max_lag(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, max_lag=timedelta(milliseconds=50))
    p, replica = cluster.primary, cluster.replicas[0]
    for node in (p, replica):
        async with http.get(node.proxy_url + "/litefs/health") as r:
            assert r.status == 200 and await r.text() == "OK\n"
    replica.state.set_primary_position(DB, 5, 0)  # the primary said it has TXID 5
    deadline = time.monotonic() + 30
    while True:
        async with http.get(replica.proxy_url + "/litefs/health") as r:
            if r.status == 503:
                assert "lag" in await r.text()
                break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    replica.state.set_position(DB, 5, 0)
    replica.state.heard_from_primary()
    async with http.get(replica.proxy_url + "/ltx/health") as r:
        assert r.status == 200


async def test_passthrough_paths_go_straight_to_the_local_app(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, passthrough_paths=("/static/*",))
    replica = cluster.replicas[0]
    async with http.post(
        replica.proxy_url + "/static/a.js", headers={"Cookie": "__txid=00000000000000ff"}
    ) as r:
        assert r.status == 200 and r.headers["X-Node"] == "node1"
        assert "Set-Cookie" not in r.headers


async def test_write_paths_send_gets_to_the_primary(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, write_paths=("/touch",))
    replica = cluster.replicas[0]
    async with http.get(replica.proxy_url + "/touch?value=t") as r:
        assert r.status == 200 and r.headers["X-Node"] == "node0"
        assert cookie_of(r) == "__txid=0000000000000001"


async def test_websocket_passes_through_to_the_local_app(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2)
    for node in cluster.nodes:
        async with http.ws_connect(node.proxy_url + "/ws") as ws:
            await ws.send_str("hello")
            msg = await ws.receive(timeout=30)
            assert msg.data == f"{node.name}:hello"


async def test_an_answer_that_breaks_off_reaches_the_client_incomplete_not_as_an_error(
    make_cluster: Any, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await make_cluster(1)
    with caplog.at_level(logging.WARNING):
        async with http.get(cluster.primary.proxy_url + "/broken") as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        await asyncio.sleep(0.1)  # the proxy's side of it, logged after the client's
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert errors == []  # was aiohttp's "Error handling request", with a traceback
    assert any("broke off" in rec.getMessage() for rec in caplog.records)


async def test_upstream_down_gives_502(make_cluster: Any, http: aiohttp.ClientSession) -> None:
    cluster = await make_cluster(1)
    p = cluster.primary
    await p.runners[0].cleanup()  # the app
    async with http.get(p.proxy_url + "/items") as r:
        assert r.status == 502 and "proxy error" in await r.text()


async def test_sync_mode_holds_the_write_until_a_replica_has_it(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    sync = SyncConfig(replicas=1, timeout=timedelta(seconds=30))
    cluster = await make_cluster(2, sync=sync)
    p, replica = cluster.primary, cluster.replicas[0]
    write = asyncio.create_task(http.post(p.proxy_url + "/items", data="s"))
    await p.state.wait_for(lambda: p.state.txid(DB) == 1, 30)
    await asyncio.sleep(0.1)
    assert not write.done()
    replicate(p, replica)
    async with await write as r:
        assert r.status == 200 and r.headers["Ltx-Sync"] == "ok"
    assert p.state.counters.get("sync_timeouts", 0) == 0


async def test_sync_mode_timeout_answers_with_a_header_and_counts_it(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    sync = SyncConfig(replicas=1, timeout=timedelta(milliseconds=300))
    cluster = await make_cluster(2, sync=sync)  # the replica never applies: "stopped"
    p = cluster.primary
    async with http.post(p.proxy_url + "/items", data="s") as r:
        assert r.status == 200 and r.headers["Ltx-Sync"] == "timeout"
        assert cookie_of(r) == "__txid=0000000000000001"
    assert p.state.counters["sync_timeouts"] == 1
    async with http.post(p.proxy_url + "/items", data="s", headers={"Ltx-Sync-Replicas": "0"}) as r:
        assert "Ltx-Sync" not in r.headers  # the request opted out


async def test_async_max_lag_holds_writes_while_the_replica_is_too_far_behind(
    make_cluster: Any, http: aiohttp.ClientSession
) -> None:
    sync = SyncConfig(max_lag=timedelta(milliseconds=100), timeout=timedelta(seconds=30))
    cluster = await make_cluster(2, sync=sync)
    p, replica = cluster.primary, cluster.replicas[0]
    replicate(p, replica)  # connected and reporting, at TXID 0
    async with http.post(p.proxy_url + "/items", data="1") as r:
        assert r.status == 200
    await asyncio.sleep(0.3)  # the replica is now > 100 ms behind TXID 1
    write = asyncio.create_task(http.post(p.proxy_url + "/items", data="2"))
    deadline = time.monotonic() + 30
    while p.state.counters.get("backpressure_waits", 0) == 0:  # the write is being held
        assert time.monotonic() < deadline and not write.done()
        await asyncio.sleep(0.01)
    assert not write.done()
    replicate(p, replica)
    async with await write as r:
        assert r.status == 200
    assert "backpressure_timeouts" not in p.state.counters
