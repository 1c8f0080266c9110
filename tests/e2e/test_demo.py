"""`python -m demo` end to end, in its short non-interactive mode, and its node configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from demo.nodes import Lease, Node, plan, sidecar_config
from sidecar.config import load_config
from tests.helpers import RedisServer

ROOT = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT = 300  # seconds: three daemons and three apps start on a loaded machine


def run_demo(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "demo", "--duration", "5", "--data-dir", str(data_dir), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
    )


def assert_write_reached_every_node(result: subprocess.CompletedProcess[str]) -> None:
    out = result.stdout
    assert result.returncode == 0, f"demo failed ({result.returncode}):\n{out}\n{result.stderr}"
    for name in ("node1", "node2", "node3"):
        assert any(
            line.strip().startswith(f"{name} (") and "has TXID" in line for line in out.splitlines()
        ), out
    assert "the write arrived on all 3 nodes" in out
    assert "does NOT show" not in out
    assert "nothing left running" in out


@pytest.mark.slow
def test_demo_with_the_static_lease(tmp_path: Path) -> None:
    assert_write_reached_every_node(run_demo(tmp_path / "demo"))


@pytest.mark.slow
def test_demo_with_the_redis_lease(tmp_path: Path, redis_server: RedisServer) -> None:
    result = run_demo(tmp_path / "demo", "--redis-url", redis_server.url)
    assert "(redis lease)" in result.stdout
    assert_write_reached_every_node(result)


def nodes(tmp_path: Path) -> list[Node]:
    return plan(tmp_path, list(range(20000, 20009)))


@pytest.mark.parametrize(
    "lease", [Lease(), Lease("redis://127.0.0.1:6379/0", "ltx-sidecar/demo-x")]
)
def test_every_demo_node_config_loads(tmp_path: Path, lease: Lease) -> None:
    cluster = nodes(tmp_path)
    for node in cluster:
        path = tmp_path / f"{node.name}.toml"
        path.write_text(sidecar_config(node, cluster[0], lease, sys.executable))
        cfg = load_config(path, env={})
        assert cfg.node_id == node.name
        assert cfg.api.port == node.api_port
        assert cfg.proxy.enabled and cfg.proxy.port == node.proxy_port
        assert cfg.proxy.target == node.app_url
        assert cfg.databases.paths == (node.db_path,)
        assert cfg.lease.type == lease.kind
        if lease.kind == "static":
            assert cfg.lease.primary_url == ("" if node == cluster[0] else cluster[0].api_url)
            assert cfg.candidate is (node == cluster[0])
        else:
            assert cfg.lease.redis_url == lease.redis_url and cfg.candidate


def test_demo_refuses_to_wipe_a_directory_it_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--duration", "0", "--data-dir", str(precious)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "was not made by the demo" in result.stderr
    assert (precious / "keep.txt").read_text() == "mine"
