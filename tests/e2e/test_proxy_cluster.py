"""The proxy on a real cluster: fly-replay, forwarding, read-your-writes, sync mode, health.

Every node is an ``ltx-sidecar`` process on 127.0.0.1 with its proxy in front of an app:
the example app (supervised by the sidecar, as deployed) or, where a test needs to see
what arrived (a 5 MB body), a small echo app served by the test itself. Replication is
the real thing: a read with the ``__txid`` cookie on a replica waits for the primary's
LTX files to be applied there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.e2e.appnodes import (
    DB_NAME,
    Answer,
    AppNode,
    cookie_txid,
    http,
    start_app_cluster,
    stop_nodes,
)
from tests.e2e.cluster import wait_until
from tests.flyedge import FlyEdge, serve_app
from tests.helpers import free_port
from tests.sidecar.test_metrics import parse_exposition

pytestmark = pytest.mark.timeout(180)

PAIRS = 200
JSON = {"Content-Type": "application/json", "Accept": "application/json"}
HEALTH = "/ltx/health"  # the proxy's health route (LiteFS's /litefs/health too)


def cookie_header(txid: str) -> dict[str, str]:
    return {"Cookie": f"__txid={txid}"}


def counter(node: AppNode, name: str) -> float:
    """A counter from the node's /metrics; 0 while it has not been counted yet."""
    families = parse_exposition(http("GET", f"{node.url}/metrics").text)
    family = families.get(name)
    return sum(family.samples.values()) if family else 0.0


# -- on Fly: the edge replays writes on the primary -------------------------------------


@pytest.fixture(scope="module")
def fly_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AppNode]]:
    """A primary and two replicas running the example app; replicas answer fly-replay."""
    nodes = start_app_cluster(
        tmp_path_factory.mktemp("fly"), 2, replica_proxy={"fly-replay": '"always"'}
    )
    try:
        yield nodes
    finally:
        stop_nodes(nodes)


def test_a_write_on_a_replica_is_answered_with_fly_replay_naming_the_primary(
    fly_cluster: list[AppNode],
) -> None:
    primary, replica, _ = fly_cluster
    before = primary.txid(DB_NAME)
    answer = http("POST", replica.proxy_url + "/messages", b'{"text": "x"}', JSON)
    assert answer.status == 200, answer.text
    assert answer.headers["fly-replay"] == "instance=primary"
    assert answer.body == b""
    assert cookie_txid(answer) is None
    assert primary.txid(DB_NAME) == before  # nothing was written anywhere


async def test_through_the_fly_edge_every_read_after_a_write_sees_it(
    fly_cluster: list[AppNode],
) -> None:
    primary, r1, r2 = fly_cluster
    edge = FlyEdge({n.name: n.proxy_url for n in fly_cluster})
    runner, edge_url = await serve_app(edge.app())
    stale: list[str] = []
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
            for i in range(PAIRS):
                writer, reader = (r1, r2) if i % 2 == 0 else (r2, r1)
                text = f"pair {i}"
                async with client.post(
                    f"{edge_url}/messages",
                    data=json.dumps({"text": text}),
                    headers={**JSON, "fly-force-instance-id": writer.name},
                ) as resp:
                    assert resp.status == 201, await resp.text()
                    written = await resp.json()
                    txid = resp.cookies["__txid"].value
                assert written["node"] == primary.name
                async with client.get(
                    f"{edge_url}/?format=json",
                    headers={**cookie_header(txid), "fly-force-instance-id": reader.name},
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    view = await resp.json()
                assert view["node"] == reader.name
                if written["id"] not in {m["id"] for m in view["messages"]}:
                    stale.append(f"pair {i}: row {written['id']} missing on {reader.name}")
    finally:
        await runner.cleanup()
    assert stale == []
    assert edge.replays == PAIRS  # every write was replayed, no read was


# -- off Fly: replicas forward writes to the primary's proxy ----------------------------


@pytest.fixture(scope="module")
def echo_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AppNode]]:
    """A primary and a replica forwarding writes (no fly-replay), short read timeout.

    No app is supervised: the tests serve an echo app on each node's app port.
    """
    proxy = {"fly-replay": '"never"', "read-timeout": '"300ms"'}
    nodes = start_app_cluster(
        tmp_path_factory.mktemp("echo"),
        1,
        primary_proxy=proxy,
        replica_proxy=proxy,
        run_app=False,
    )
    try:
        yield nodes
    finally:
        stop_nodes(nodes)


def echo_app(node: str) -> web.Application:
    """Answers any request with who got it and the size and SHA-256 of its body."""

    async def echo(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response(
            {"node": node, "method": request.method, "size": size, "sha256": digest.hexdigest()}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@pytest.fixture
async def echo_apps(echo_cluster: list[AppNode]) -> AsyncIterator[list[AppNode]]:
    runners = []
    try:
        for node in echo_cluster:
            runner = web.AppRunner(echo_app(node.name), access_log=None)
            runners.append(runner)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", node.app_port).start()
        yield echo_cluster
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_off_fly_a_write_on_a_replica_is_forwarded_to_the_primary(
    echo_apps: list[AppNode],
) -> None:
    primary, replica = echo_apps
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        async with client.post(f"{replica.proxy_url}/things", data=b"hello") as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
            assert "fly-replay" not in resp.headers
            txid = resp.cookies["__txid"].value
        assert answer == {
            "node": primary.name,
            "method": "POST",
            "size": 5,
            "sha256": hashlib.sha256(b"hello").hexdigest(),
        }
        assert int(txid, 16) == primary.txid(DB_NAME)
        async with client.get(f"{replica.proxy_url}/things", headers=cookie_header(txid)) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["node"] == replica.name  # reads stay local


async def test_off_fly_a_5mb_body_is_forwarded_intact(echo_apps: list[AppNode]) -> None:
    primary, replica = echo_apps
    body = os.urandom(5 << 20)
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client,
        client.put(f"{replica.proxy_url}/upload", data=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    assert answer == {
        "node": primary.name,
        "method": "PUT",
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }


async def test_a_read_asking_for_a_txid_the_replica_does_not_reach_gets_504(
    echo_apps: list[AppNode],
) -> None:
    primary, replica = echo_apps
    ahead = f"{primary.txid(DB_NAME) + 1_000_000:016x}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        for headers in (cookie_header(ahead), {"Ltx-Txid": ahead}):
            started = time.monotonic()
            async with client.get(f"{replica.proxy_url}/page", headers=headers) as resp:
                body = await resp.text()
                assert resp.status == 504, body
            assert time.monotonic() - started >= 0.25  # it waited for read-timeout (300ms)
            assert "timed out" in body and ahead in body and DB_NAME in body


def test_a_write_with_no_reachable_primary_gets_503(tmp_path: Path) -> None:
    """A replica whose static primary-url points at a port nobody listens on."""
    node = AppNode(
        "lonely",
        tmp_path / "lonely",
        primary_url=f"http://127.0.0.1:{free_port()}",
        proxy={"fly-replay": '"never"', "primary-timeout": '"200ms"'},
        run_app=False,
    )
    try:
        node.start()
        answer = http("POST", node.proxy_url + "/messages", b"{}", JSON)
        assert answer.status == 503, answer.text
        assert "primary" in answer.text and answer.text.endswith("\n")
        health = http("GET", node.url + "/health")
        assert health.status == 503, health.text
    finally:
        node.stop()


# -- synchronous mode -----------------------------------------------------------------


def post_message(node: AppNode, text: str) -> tuple[Answer, float]:
    started = time.monotonic()
    answer = http("POST", node.proxy_url + "/messages", json.dumps({"text": text}).encode(), JSON)
    return answer, time.monotonic() - started


def test_sync_mode_acks_with_replicas_running_and_times_out_without_them(
    tmp_path: Path,
) -> None:
    nodes = start_app_cluster(tmp_path, 2, primary_extra='[sync]\nreplicas = 1\ntimeout = "3s"\n')
    primary, *replicas = nodes
    try:
        answer, _ = post_message(primary, "held until a replica has it")
        assert answer.status == 201, answer.text
        assert answer.headers["Ltx-Sync"] == "ok"
        txid = cookie_txid(answer)
        assert txid is not None
        status = primary.status()
        assert status is not None
        acked = [
            r
            for r in status["replicas"]
            if int(r["databases"].get(DB_NAME, {}).get("txid", "0"), 16) >= int(txid, 16)
        ]
        assert acked, status["replicas"]
        timeouts = counter(primary, "ltx_sidecar_sync_timeouts_total")

        for replica in replicas:
            replica.stop()
        answer, elapsed = post_message(primary, "nobody will ack this one")
        assert answer.status == 201, answer.text  # committed on the primary all the same
        assert answer.headers["Ltx-Sync"] == "timeout"
        assert elapsed >= 2.9  # held for sync.timeout
        assert counter(primary, "ltx_sidecar_sync_timeouts_total") == timeouts + 1
    finally:
        stop_nodes(nodes)


# -- health -------------------------------------------------------------------------------


@pytest.fixture
def short_lag_pair(tmp_path: Path) -> Iterator[list[AppNode]]:
    """A primary and a replica whose health fails past 1 s of lag; no apps."""
    nodes = start_app_cluster(
        tmp_path, 1, replica_proxy={"max-lag": '"1s"'}, primary_extra="", run_app=False
    )
    try:
        yield nodes
    finally:
        stop_nodes(nodes)


def health_status(url: str) -> int:
    with contextlib.suppress(OSError):
        return http("GET", url, timeout=5).status
    return -1


def test_api_health_of_a_replica_fails_once_its_primary_is_gone(
    short_lag_pair: list[AppNode],
) -> None:
    primary, replica = short_lag_pair
    assert health_status(replica.url + "/health") == 200
    assert health_status(replica.proxy_url + HEALTH) == 200
    primary.stop()
    wait_until(lambda: health_status(replica.url + "/health") == 503, 30, "API health 503", replica)


def test_proxy_health_of_a_replica_fails_once_its_primary_is_gone_past_max_lag(
    short_lag_pair: list[AppNode],
) -> None:
    primary, replica = short_lag_pair
    assert health_status(replica.proxy_url + HEALTH) == 200
    primary.stop()
    wait_until(
        lambda: health_status(replica.proxy_url + HEALTH) == 503,
        6,  # max-lag is 1 s
        "proxy health 503",
        replica,
    )
