"""The demo cluster's layout: ports, directories and each node's configuration (pure)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
DB_NAME = "app.db"
ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "app.py"


@dataclass(frozen=True)
class Node:
    """One node of the demo: a sidecar, its proxy and its app, in `directory`."""

    name: str
    directory: Path
    api_port: int
    proxy_port: int
    app_port: int

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://{HOST}:{self.proxy_port}"

    @property
    def app_url(self) -> str:
        return f"http://{HOST}:{self.app_port}"

    @property
    def db_path(self) -> Path:
        return self.directory / "db" / DB_NAME

    @property
    def config_path(self) -> Path:
        return self.directory / "sidecar.toml"

    @property
    def log_path(self) -> Path:
        return self.directory / "node.log"


@dataclass(frozen=True)
class Lease:
    """Static (the first node is primary) unless a Redis URL is given."""

    redis_url: str = ""
    key: str = "ltx-sidecar/demo"

    @property
    def kind(self) -> str:
        return "redis" if self.redis_url else "static"


def plan(base: Path, ports: Sequence[int], count: int = 3) -> list[Node]:
    """`count` nodes under `base`, three ports each taken from `ports` in order."""
    if len(ports) < 3 * count:
        raise ValueError(f"{count} nodes need {3 * count} ports, got {len(ports)}")
    return [
        Node(
            name=f"node{i + 1}",
            directory=base / f"node{i + 1}",
            api_port=ports[3 * i],
            proxy_port=ports[3 * i + 1],
            app_port=ports[3 * i + 2],
        )
        for i in range(count)
    ]


def _s(value: object) -> str:
    """A TOML basic string (JSON's escapes are valid TOML for these values)."""
    return json.dumps(str(value))


def app_command(node: Node, python: str) -> list[str]:
    """The app as the sidecar runs it (after ``--``)."""
    return [
        python, str(APP), "serve",
        "--db", str(node.db_path),
        "--host", HOST,
        "--port", str(node.app_port),
        "--node-id", node.name,
        "--status-url", f"{node.api_url}/status",
    ]  # fmt: skip


def migrate_command(node: Node, python: str) -> list[str]:
    return [python, str(APP), "migrate", "--db", str(node.db_path)]


def sidecar_config(node: Node, primary: Node, lease: Lease, python: str) -> str:
    """The node's sidecar.toml: static lease with `primary` as primary, or the Redis lease."""
    is_primary = node == primary
    if lease.kind == "redis":
        lease_lines = [
            'type = "redis"',
            f"redis-url = {_s(lease.redis_url)}",
            f"key = {_s(lease.key)}",
        ]
        candidate = True
    else:
        primary_url = "" if is_primary else primary.api_url
        lease_lines = ['type = "static"', f"primary-url = {_s(primary_url)}"]
        candidate = is_primary
    lines = [
        f"# Demo node {node.name} ({lease.kind} lease). Written by `python -m demo`.",
        f"data-dir = {_s(node.directory / 'data')}",
        f"node-id = {_s(node.name)}",
        f"advertise-url = {_s(node.api_url)}",
        f"candidate = {'true' if candidate else 'false'}",
        "",
        "[api]",
        f"host = {_s(HOST)}",
        f"port = {node.api_port}",
        "",
        "[lease]",
        *lease_lines,
        "",
        "[databases]",
        f"paths = [{_s(node.db_path)}]",
        "",
        "[proxy]",
        "enabled = true",
        f"host = {_s(HOST)}",
        f"port = {node.proxy_port}",
        f"target = {_s(node.app_url)}",
        f"db = {_s(DB_NAME)}",
        'fly-replay = "never"',
        "",
        "[exec]",
        f"migrate = {_s(shlex.join(migrate_command(node, python)))}",
    ]
    return "\n".join(lines) + "\n"


def parse_txid(value: object) -> int:
    """A TXID from /status (16 hex digits) or a __txid cookie; -1 if absent or malformed."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value, 16)
        except ValueError:
            return -1
    return -1
