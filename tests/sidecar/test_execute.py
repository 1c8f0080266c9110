"""POST /db/{name}/execute and sidecar.client: writes from jobs, on any node.

Real SQLite files and real HTTP on loopback; the primary's tailer is stood in for by a
sync hook that reads the highest row id, and replication by copying rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlean
from aiohttp import web

from sidecar.client import SidecarClient, SidecarError
from sidecar.cluster import ClusterState, NodeInfo, Primary
from sidecar.execute import handle_execute
from sidecar.proxy import handle_wait_txid
from tests.flyedge import serve_app

DB = "app.db"
TOKEN = "execute-token"
# The node API's handlers take their state under string keys (the lead's convention).
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")


def rows_of(path: Path) -> list[tuple[int, str]]:
    conn = sqlean.connect(str(path))
    try:
        return [tuple(r) for r in conn.execute("SELECT id, value FROM items ORDER BY id")]
    finally:
        conn.close()


def create_db(path: Path) -> None:
    conn = sqlean.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, value TEXT NOT NULL)")
    conn.close()


class ApiNode:
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        create_db(path)
        self.state = ClusterState(NodeInfo(name, ""))
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app["state"] = self.state
        app["token"] = TOKEN
        app["db_path"] = lambda name: self.path if name == DB else None
        app.router.add_post("/db/{name}/execute", handle_execute)
        app.router.add_get("/txid/wait", handle_wait_txid)
        self.runner, self.url = await serve_app(app)
        self.state.me = NodeInfo(self.name, self.url)

    def max_id(self) -> int:
        return max((r[0] for r in rows_of(self.path)), default=0)


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[tuple[ApiNode, ApiNode]]:
    primary, replica = ApiNode("p", tmp_path / "p.db"), ApiNode("r", tmp_path / "r.db")
    await primary.start()
    await replica.start()

    async def tail(name: str) -> int:  # the tailer: read the file, publish the position
        txid = primary.max_id()
        primary.state.set_position(name, txid, 0)
        return txid

    primary.state.sync_hook = tail
    term = Primary(primary.state.me, 1)
    primary.state.set_role("primary", term)
    primary.state.set_position(DB, 0, 0)
    replica.state.set_role("replica", term)
    replica.state.heard_from_primary()  # as if its stream were up
    replica.state.set_position(DB, 0, 0)
    yield primary, replica
    for node in (primary, replica):
        assert node.runner is not None
        await node.runner.cleanup()


def replicate(primary: ApiNode, replica: ApiNode) -> None:
    have = replica.max_id()
    rows = [r for r in rows_of(primary.path) if r[0] > have]
    conn = sqlean.connect(str(replica.path), isolation_level=None)
    conn.executemany("INSERT INTO items(id, value) VALUES (?, ?)", rows)
    conn.close()
    replica.state.set_position(DB, replica.max_id(), 0)


async def post(url: str, body: Any, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as r,
    ):
        return r.status, (await r.json() if r.content_type == "application/json" else None)


async def test_execute_on_the_primary_commits_and_returns_the_txid(
    nodes: tuple[ApiNode, ApiNode],
) -> None:
    primary, _ = nodes
    url = f"{primary.url}/db/{DB}/execute"
    status, answer = await post(
        url, {"sql": "INSERT INTO items(value) VALUES (?)", "params": ["a"]}
    )
    assert status == 200
    assert answer == {
        "txid": "0000000000000001",
        "rows_affected": 1,
        "rows": None,
        "caught_up": True,
    }
    body = {
        "statements": [
            ["INSERT INTO items(value) VALUES (:v)", {"v": "b"}],
            ["INSERT INTO items(value) VALUES ('c')"],
            ["SELECT value, x'00ff' FROM items ORDER BY id", None],
        ]
    }
    status, answer = await post(url, body)
    assert status == 200 and answer["txid"] == "0000000000000003"
    assert answer["rows_affected"] == 2
    blob = {"base64": "AP8="}
    assert answer["rows"] == [["a", blob], ["b", blob], ["c", blob]]


async def test_bad_sql_is_a_400_with_sqlites_message_and_nothing_is_committed(
    nodes: tuple[ApiNode, ApiNode],
) -> None:
    primary, _ = nodes
    body = {
        "statements": [
            ["INSERT INTO items(value) VALUES ('kept?')"],
            ["INSERT INTO nowhere VALUES (1)"],
        ]
    }
    status, answer = await post(f"{primary.url}/db/{DB}/execute", body)
    assert status == 400
    assert "no such table: nowhere" in answer["error"]
    assert "nothing was committed" in answer["error"]
    assert rows_of(primary.path) == []
    status, answer = await post(
        f"{primary.url}/db/{DB}/execute", {"sql": "INSERT INTO items(value) VALUES (NULL)"}
    )
    assert status == 400 and "NOT NULL" in answer["error"]


async def test_execute_without_the_token_is_401_and_runs_nothing(
    nodes: tuple[ApiNode, ApiNode],
) -> None:
    primary, _ = nodes
    body = {"sql": "INSERT INTO items(value) VALUES ('x')"}
    for token in (None, "wrong"):
        status, _ = await post(f"{primary.url}/db/{DB}/execute", body, token=token)
        assert status == 401
    assert rows_of(primary.path) == []


async def test_bad_requests_get_clear_errors(nodes: tuple[ApiNode, ApiNode]) -> None:
    primary, _ = nodes
    url = f"{primary.url}/db/{DB}/execute"
    assert (await post(url, {"sql": ""}))[1]["error"] == "sql: sql must be a non-empty string"
    assert "needs" in (await post(url, {"nope": 1}))[1]["error"]
    assert "params" in (await post(url, {"sql": "SELECT 1", "params": 3}))[1]["error"]
    status, answer = await post(f"{primary.url}/db/other.db/execute", {"sql": "SELECT 1"})
    assert status == 404 and "other.db" in answer["error"]


async def test_execute_on_a_replica_is_forwarded_and_waits_for_the_local_apply(
    nodes: tuple[ApiNode, ApiNode],
) -> None:
    primary, replica = nodes

    async def replicator() -> None:
        while True:
            await primary.state.wait_for(
                lambda: primary.state.txid(DB) > replica.state.txid(DB), None
            )
            replicate(primary, replica)

    task = asyncio.create_task(replicator())
    try:
        url = f"{replica.url}/db/{DB}/execute"
        status, answer = await post(url, {"sql": "INSERT INTO items(value) VALUES ('r')"})
        assert status == 200 and answer["txid"] == "0000000000000001"
        assert answer["caught_up"] is True
        assert rows_of(replica.path) == [(1, "r")]  # the job reads its own write locally

        client = SidecarClient(replica.url, token=TOKEN)
        result = await asyncio.to_thread(
            client.execute, DB, "INSERT INTO items(value) VALUES (?)", ["c"]
        )
        assert (result.txid, result.rows_affected, result.caught_up) == (2, 1, True)
        assert rows_of(replica.path)[-1] == (2, "c")
        result = await client.aexecute(DB, "SELECT count(*) FROM items")
        assert result.rows == [[2]]
        with pytest.raises(SidecarError) as bad:
            await asyncio.to_thread(client.execute, DB, "INSERT INTO nowhere VALUES (1)")
        assert bad.value.status == 400 and "no such table" in bad.value.message
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_client_without_a_valid_token_gets_a_clear_error(
    nodes: tuple[ApiNode, ApiNode], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    primary, _ = nodes
    monkeypatch.delenv("LTX_SIDECAR_TOKEN", raising=False)
    monkeypatch.setenv("LTX_SIDECAR_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(SidecarError, match="no token"):
        SidecarClient(primary.url).execute(DB, "SELECT 1")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "token").write_text("wrong\n")
    monkeypatch.setenv("LTX_SIDECAR_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(SidecarError) as exc:
        await asyncio.to_thread(SidecarClient(primary.url).execute, DB, "SELECT 1")
    assert exc.value.status == 401
    monkeypatch.setenv("LTX_SIDECAR_TOKEN", TOKEN)
    result = await asyncio.to_thread(SidecarClient(primary.url).execute, DB, "SELECT 7")
    assert result.rows == [[7]]
