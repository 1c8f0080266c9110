"""The node API over real HTTP on 127.0.0.1, backed by real SQLite files.

The ClusterState is filled in by the test as the node would fill it; the actions are the
local export and import of sidecar.api, on a live WAL-mode database.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlean
from aiohttp import web

from sidecar.api import (
    STATE_KEY,
    TOKEN_KEY,
    ActionError,
    Actions,
    local_export,
    local_import,
    make_api_app,
    start_site,
)
from sidecar.auth import bearer
from sidecar.cluster import ClusterState, NodeInfo, Primary
from sidecar.config import Config, load_config
from tests.sidecar.test_metrics import parse_exposition, sample

TOKEN = "test-token-0123456789"


def make_db(path: Path, rows: list[str], *, page_size: int = 4096, wal: bool = True) -> None:
    conn = sqlean.connect(str(path), isolation_level=None)
    conn.execute(f"PRAGMA page_size={page_size}")
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO t(v) VALUES (?)", [(r,) for r in rows])
    conn.close()


def rows_of(path: Path) -> list[str]:
    conn = sqlean.connect(str(path))
    try:
        return [r[0] for r in conn.execute("SELECT v FROM t ORDER BY id")]
    finally:
        conn.close()


@dataclass
class TestNode:
    """A node API on a free port over a state and databases the test controls."""

    __test__ = False

    cfg: Config
    state: ClusterState
    runner: web.AppRunner
    url: str
    dbs: dict[str, Path]
    promotions: list[int] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)

    @property
    def db(self) -> Path:
        return self.dbs["app.db"]


async def start_test_node(tmp_path: Path) -> TestNode:
    """A primary node-a (epoch 3) with app.db at TXID 5 and replica node-b at TXID 4."""
    data_dir = tmp_path / "data"
    env = {
        "LTX_SIDECAR_DATA_DIR": str(data_dir),
        "LTX_SIDECAR_NODE_ID": "node-a",
        "LTX_SIDECAR_TOKEN": TOKEN,
        "LTX_SIDECAR_LEASE_TYPE": "redis",
        "LTX_SIDECAR_LEASE_REDIS_URL": "redis://:hunter2@127.0.0.1:6399/0",
        "LTX_SIDECAR_PROXY_MAX_LAG": "10s",
    }
    cfg = load_config(None, env)
    db = tmp_path / "app.db"
    make_db(db, ["one", "two"])
    dbs = {"app.db": db}
    me = NodeInfo("node-a", "http://127.0.0.1:0")
    state = ClusterState(me)
    node: TestNode | None = None

    async def promote() -> dict[str, Any]:
        assert node is not None
        node.promotions.append(state.epoch + 1)
        state.set_role("primary", Primary(me, state.epoch + 1))
        return {"node_id": me.node_id, "epoch": state.epoch}

    async def export(name: str) -> Path:
        return await local_export(cfg, name, dbs[name])

    async def import_db(name: str, path: Path) -> dict[str, Any]:
        assert node is not None
        if not state.is_primary:
            raise ActionError(503, "no primary known to forward the import to")
        node.imports.append(name)
        return await local_import(name, dbs[name], path)

    actions = Actions(promote=promote, export=export, import_db=import_db, db_path=dbs.get)
    app = make_api_app(cfg, state, TOKEN, actions=actions)
    runner = await start_site(app, "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    state.me = NodeInfo("node-a", url)
    state.set_role("primary", Primary(state.me, 3))
    state.set_position("app.db", 5, 0x8000000000000ABC)
    state.database("app.db").extra.update(size=db.stat().st_size, wal_size=0, ltx_files_written=5)
    state.replica_connected("node-b")
    state.replica_reported("node-b", {"app.db": (4, 0x8000000000000123)})
    state.count("snapshots", 2)
    node = TestNode(cfg, state, runner, url, dbs)
    return node


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[TestNode]:
    started = await start_test_node(tmp_path)
    yield started
    await started.runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


AUTH = bearer(TOKEN)


# -- status, metrics, health ------------------------------------------------------------


async def test_status_has_the_node_its_databases_replicas_and_config(
    node: TestNode, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{node.url}/status") as resp:
        assert resp.status == 200
        text = await resp.text()
        doc = await resp.json()
    assert doc["node_id"] == "node-a" and doc["api_url"] == node.url
    assert doc["role"] == "primary" and doc["epoch"] == 3 and doc["ready"] is True
    assert doc["primary"] == {
        "node_id": "node-a",
        "api_url": node.url,
        "proxy_url": "",
        "epoch": 3,
    }
    (db,) = doc["databases"]
    assert db["name"] == "app.db"
    assert db["txid"] == "0000000000000005" and db["checksum"] == "8000000000000abc"
    assert db["lag_txids"] == 0 and db["size"] == node.db.stat().st_size
    (replica,) = doc["replicas"]
    assert replica["node_id"] == "node-b" and replica["connected"] is True
    assert replica["databases"]["app.db"] == {
        "txid": "0000000000000004",
        "checksum": "8000000000000123",
        "lag_txids": 1,
    }
    assert doc["counters"] == {"snapshots": 2}
    assert doc["config"]["lease"]["type"] == "redis"
    assert doc["config"]["proxy"]["max_lag_seconds"] == 10.0
    assert doc["uptime_seconds"] >= 0 and doc["version"]
    assert TOKEN not in text and "hunter2" not in text  # no secret in a public view


async def test_metrics_are_prometheus_text(node: TestNode, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{node.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        families = parse_exposition(await resp.text())
    assert sample(families, "ltx_sidecar_db_txid", db="app.db") == 5
    assert sample(families, "ltx_sidecar_role", role="primary") == 1
    assert sample(families, "ltx_sidecar_epoch") == 3
    assert sample(families, "ltx_sidecar_connected_replicas") == 1
    assert sample(families, "ltx_sidecar_replica_lag_txids", replica="node-b", db="app.db") == 1
    assert sample(families, "ltx_sidecar_snapshots_total") == 2


async def health(node: TestNode, http: aiohttp.ClientSession) -> tuple[int, str]:
    async with http.get(f"{node.url}/health") as resp:
        return resp.status, await resp.text()


async def test_health_says_why_a_node_should_not_get_traffic(
    node: TestNode, http: aiohttp.ClientSession
) -> None:
    state = node.state
    assert await health(node, http) == (200, "OK\n")

    state.set_role("candidate", None)
    status, text = await health(node, http)
    assert status == 503 and "no primary known" in text

    primary = Primary(NodeInfo("node-z", "http://127.0.0.1:9"), 4)
    state.set_role("replica", primary)
    status, text = await health(node, http)
    assert status == 503 and text.startswith("not ready")

    state.heard_from_primary()  # its stream is up
    assert await health(node, http) == (200, "OK\n")

    state.set_primary_position("app.db", 9, 1)
    state.database("app.db").behind_since = time.monotonic() - 60
    status, text = await health(node, http)
    assert status == 503 and "exceeds proxy.max-lag 10s" in text

    state.set_position("app.db", 9, 1)  # caught up
    assert await health(node, http) == (200, "OK\n")

    state.heard_at = time.monotonic() - 60  # but its primary has been silent for a minute
    status, text = await health(node, http)
    assert status == 503 and "exceeds proxy.max-lag 10s" in text


# -- the token ---------------------------------------------------------------------------

MUTATING = [
    ("POST", "/promote"),
    ("GET", "/db/app.db/export"),
    ("POST", "/db/app.db/import"),
    ("POST", "/db/.hidden/import"),  # the token is checked before anything else
    ("POST", "/stream"),  # routes added later are protected too
]
BAD_AUTH = [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": "Bearer"},
]


@pytest.mark.parametrize(("method", "path"), MUTATING)
async def test_every_mutating_endpoint_needs_the_token(
    node: TestNode, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    sqlite_file = node.db.parent / "other.db"
    make_db(sqlite_file, ["replacement"], wal=False)
    for headers in BAD_AUTH:
        async with http.request(
            method, node.url + path, headers=headers, data=sqlite_file.read_bytes()
        ) as resp:
            assert resp.status == 401, headers
            assert await resp.read() == b""
            assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert node.promotions == [] and node.imports == []
    assert rows_of(node.db) == ["one", "two"]


@pytest.mark.parametrize("path", ["/status", "/metrics", "/health"])
async def test_read_only_views_need_no_token(
    node: TestNode, http: aiohttp.ClientSession, path: str
) -> None:
    async with http.get(node.url + path) as resp:
        assert resp.status == 200


async def test_the_app_exposes_its_state_and_token_for_other_handlers(node: TestNode) -> None:
    app = node.runner.app
    assert app[STATE_KEY] is node.state and app["state"] is node.state
    assert app[TOKEN_KEY] == TOKEN and app["token"] == TOKEN
    assert app["db_path"]("app.db") == node.db


async def test_promote_with_the_token_runs_the_handoff(
    node: TestNode, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{node.url}/promote", headers=AUTH) as resp:
        assert resp.status == 200
        assert await resp.json() == {"node_id": "node-a", "epoch": 4}
    assert node.promotions == [4]


# -- database names ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [".hidden", "..", "a%2Fb", "a%5Cb", "x" * 300])
async def test_unsafe_database_names_are_400(
    node: TestNode, http: aiohttp.ClientSession, name: str
) -> None:
    for method, action in (("GET", "export"), ("POST", "import")):
        async with http.request(method, f"{node.url}/db/{name}/{action}", headers=AUTH) as resp:
            assert resp.status in (400, 404), (name, action)
            if resp.status == 400:
                assert "database name" in await resp.text()
    assert node.imports == []


async def test_a_dot_name_is_refused_with_the_reason(
    node: TestNode, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{node.url}/db/.hidden/import", headers=AUTH, data=b"x") as resp:
        assert resp.status == 400
        assert await resp.text() == "database name '.hidden' starts with a dot\n"


async def test_an_unknown_database_is_404(node: TestNode, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{node.url}/db/nope.db/export", headers=AUTH) as resp:
        assert resp.status == 404
        assert "nope.db" in await resp.text()


# -- export and import ---------------------------------------------------------------------


async def test_import_then_export_round_trip(
    node: TestNode, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    app_conn = sqlean.connect(str(node.db), isolation_level=None)  # the app keeps it open
    src = tmp_path / "new.db"
    make_db(src, [f"imported {i}" for i in range(2000)], wal=False)

    async with http.post(
        f"{node.url}/db/app.db/import", headers=AUTH, data=src.read_bytes()
    ) as resp:
        assert resp.status == 200, await resp.text()
        info = await resp.json()
    assert info["db"] == "app.db" and info["page_size"] == 4096
    assert node.imports == ["app.db"]
    expected = [f"imported {i}" for i in range(2000)]
    assert [r[0] for r in app_conn.execute("SELECT v FROM t ORDER BY id")] == expected
    assert app_conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    async with http.get(f"{node.url}/db/app.db/export", headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/vnd.sqlite3"
        body = await resp.read()
        assert int(resp.headers["Content-Length"]) == len(body)
    out = tmp_path / "exported.db"
    out.write_bytes(body)
    assert rows_of(out) == expected
    assert list((node.cfg.data_dir / "tmp").iterdir()) == []  # temporary copies are gone
    app_conn.close()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"PK\x03\x04 this is a zip file" * 50, "not a SQLite database"),
        (b"SQLite format 3\x00" + b"\x10\x00" + b"\x00" * 4000, "not a multiple of the page"),
    ],
)
async def test_import_of_a_file_that_is_not_sqlite_is_refused(
    node: TestNode, http: aiohttp.ClientSession, content: bytes, reason: str
) -> None:
    async with http.post(f"{node.url}/db/app.db/import", headers=AUTH, data=content) as resp:
        assert resp.status == 400
        text = await resp.text()
    assert text.startswith("not imported: ") and reason in text
    assert node.imports == []
    assert rows_of(node.db) == ["one", "two"]
    assert list((node.cfg.data_dir / "tmp").iterdir()) == []


async def test_import_with_another_page_size_is_400_and_changes_nothing(
    node: TestNode, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    src = tmp_path / "small.db"
    make_db(src, ["small pages"], page_size=1024, wal=False)
    async with http.post(
        f"{node.url}/db/app.db/import", headers=AUTH, data=src.read_bytes()
    ) as resp:
        assert resp.status == 400
        assert "page size mismatch" in await resp.text()
    assert rows_of(node.db) == ["one", "two"]


async def test_an_action_error_is_answered_with_its_status(
    node: TestNode, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    node.state.set_role("candidate", None)
    src = tmp_path / "new.db"
    make_db(src, ["x"], wal=False)
    async with http.post(
        f"{node.url}/db/app.db/import", headers=AUTH, data=src.read_bytes()
    ) as resp:
        assert resp.status == 503
        assert await resp.text() == "no primary known to forward the import to\n"
    assert rows_of(node.db) == ["one", "two"]
