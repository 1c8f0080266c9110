"""Asking other candidates for their positions: real node APIs on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from sidecar.api import start_site, status_document
from sidecar.cluster import ClusterState, NodeInfo
from sidecar.config import Config, load_config
from sidecar.lease import Candidate
from sidecar.peers import fresh_positions, positions_from_status
from tests.helpers import free_port


def config(tmp_path: Path, node_id: str) -> Config:
    return load_config(None, env={"LTX_SIDECAR_DATA_DIR": str(tmp_path / node_id)})


def state_of(node_id: str, url: str, positions: dict[str, tuple[int, int]]) -> ClusterState:
    state = ClusterState(NodeInfo(node_id, url))
    for name, (txid, checksum) in positions.items():
        state.set_position(name, txid, checksum)
    return state


def test_positions_come_from_the_status_document_of_that_node(tmp_path: Path) -> None:
    state = state_of("node-b", "http://b", {"app.db": (7, 0xAB), "gone.db": (3, 1)})
    state.database("gone.db").deleted = True
    doc = status_document(config(tmp_path, "node-b"), state)
    assert positions_from_status(doc, "node-b") == {"app.db": (7, 0xAB)}
    assert positions_from_status(doc, "node-c") is None  # another node on that address
    assert positions_from_status({"node_id": "node-b", "databases": "x"}, "node-b") is None
    bad = {"node_id": "node-b", "databases": [{"name": "a", "txid": "zz", "checksum": "0"}]}
    assert positions_from_status(bad, "node-b") is None
    assert positions_from_status(["not", "a", "dict"], "node-b") is None


@pytest.fixture
async def node_b(tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state = state_of("node-b", url, {"app.db": (9, 0x42)})
    cfg = config(tmp_path, "node-b")

    async def status(request: web.Request) -> web.Response:
        return web.json_response(status_document(cfg, state))

    app = web.Application()
    app.router.add_get("/status", status)
    runner = await start_site(app, "127.0.0.1", port)
    try:
        yield url
    finally:
        await runner.cleanup()


async def test_live_candidates_answer_and_silent_ones_are_left_out(node_b: str) -> None:
    silent = web.Application()  # answers 404 to /status
    runner = web.AppRunner(silent)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        candidates = {
            "node-b": Candidate(node_b, {"app.db": (1, 0)}),
            "node-c": Candidate(f"http://127.0.0.1:{free_port()}", {"app.db": (99, 0)}),  # down
            "node-d": Candidate(f"http://127.0.0.1:{port}", {}),
            "node-e": Candidate("", {}),  # published no address
            "node-f": Candidate(node_b, {}),  # node-b answers for that address, not node-f
        }
        assert await fresh_positions(candidates, timeout=1.0) == {"node-b": {"app.db": (9, 0x42)}}
    finally:
        await runner.cleanup()
    assert await fresh_positions({}, timeout=1.0) == {}
