"""Nodes as separate OS processes on 127.0.0.1, for the end-to-end tests.

A TestNode is one ``ltx-sidecar`` process with its own config, data directory,
database directory and API port; a cluster is a primary and replicas built from them.
Helpers wait on conditions (status over HTTP, files) rather than sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlean

import ltx
from ltx import page_checksum
from sidecar.apply import mask_stamped
from tests.helpers import free_port

TOKEN = "test-token-0123456789"


@dataclass
class TestNode:
    """One sidecar process; start() and stop() as often as a test needs."""

    __test__ = False  # not a pytest test class

    name: str
    root: Path
    api_port: int = field(default_factory=free_port)
    primary_url: str = ""  # static lease: empty on the primary
    extra: str = ""  # more TOML, appended
    redis_url: str = ""  # set: the Redis lease instead of the static one
    lease_key: str = "ltx-sidecar/test"
    ttl: str = "1s"
    renew_interval: str = ""  # empty: TTL/3
    candidate: bool = True
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def db(self, name: str = "app.db") -> Path:
        return self.db_dir / name

    @property
    def config_path(self) -> Path:
        return self.root / "sidecar.toml"

    @property
    def log_path(self) -> Path:
        return self.root / "sidecar.log"

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_dir.mkdir(parents=True, exist_ok=True)
        if self.redis_url:
            lease = (
                f'type = "redis"\nredis-url = "{self.redis_url}"\n'
                f'key = "{self.lease_key}"\nttl = "{self.ttl}"\n'
            )
            if self.renew_interval:
                lease += f'renew-interval = "{self.renew_interval}"\n'
        else:
            lease = 'type = "static"\n'
            lease += f'primary-url = "{self.primary_url}"\n' if self.primary_url else ""
        self.config_path.write_text(
            f'node-id = "{self.name}"\n'
            f'data-dir = "{self.data_dir}"\n'
            f'token = "{TOKEN}"\n'
            f"candidate = {'true' if self.candidate else 'false'}\n"
            f'[api]\nhost = "127.0.0.1"\nport = {self.api_port}\n'
            f"[lease]\n{lease}"
            f'[databases]\ndirs = ["{self.db_dir}"]\n'
            f'[replication]\nreconnect-min = "50ms"\nreconnect-max = "1s"\n'
            f"{self.extra}\n"
        )

    def start(self) -> None:
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LTX_SIDECAR_")}
        env.update(self.env)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        wait_until(lambda: self.status() is not None, 20, f"{self.name} API up", self)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        code = self.process.returncode
        self.process = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def role(self) -> str | None:
        status = self.status()
        return None if status is None else str(status["role"])

    def execute(self, sql: str, params: list[Any] | None = None, db: str = "app.db") -> int:
        """Run SQL through this node's execute endpoint (forwarded to the primary); TXID."""
        body = json.dumps({"sql": sql, "params": params or []}).encode()
        req = urllib.request.Request(
            f"{self.url}/db/{db}/execute",
            data=body,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(json.load(resp)["txid"], 16)

    def post_json(self, path: str, doc: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(doc).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer: dict[str, Any] = json.load(resp)
            return answer

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.url}/status", timeout=2) as resp:
                doc: dict[str, Any] = json.load(resp)
                return doc
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def txid(self, db: str = "app.db") -> int:
        status = self.status()
        if status is None:
            return -1
        for entry in status["databases"]:
            if entry["name"] == db:
                return int(entry["txid"], 16)
        return -1

    def position(self, db: str = "app.db") -> tuple[int, int] | None:
        status = self.status()
        if status is None:
            return None
        for entry in status["databases"]:
            if entry["name"] == db:
                return int(entry["txid"], 16), int(entry["checksum"], 16)
        return None

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def wait_until(check: Callable[[], object], timeout: float, what: str, *nodes: TestNode) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    tails = "\n".join(f"--- {n.name} log ---\n{n.logs()[-4000:]}" for n in nodes)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tails}")


def open_writer(path: Path) -> Any:
    conn = sqlean.connect(str(path), timeout=10, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def page_images(path: Path) -> tuple[int, list[bytes]]:
    """Page size and every page of a database, page 1 with the stamped bytes masked."""
    conn = sqlean.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        rows = conn.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno").fetchall()
        conn.execute("COMMIT")
    finally:
        conn.close()
    pages = [bytes(data) for _, data in rows]
    if pages:
        page1 = bytearray(mask_stamped(pages[0]))
        page1[18] = page1[19] = 2  # journal mode: the replica always keeps WAL
        pages[0] = bytes(page1)
    return page_size, pages


def database_checksum(path: Path) -> int:
    """The LTX checksum of the database as SQLite reads it now (WAL included)."""
    conn = sqlean.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        rows = conn.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno").fetchall()
    finally:
        conn.close()
    return ltx.database_checksum((pgno, bytes(data)) for pgno, data in rows)


def integrity(path: Path) -> str:
    conn = sqlean.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def same_pages(a: Path, b: Path) -> bool:
    size_a, pages_a = page_images(a)
    size_b, pages_b = page_images(b)
    return size_a == size_b and pages_a == pages_b


# -- clusters ---------------------------------------------------------------------------


def redis_nodes(
    root: Path, redis_url: str, key: str, count: int = 3, **kwargs: Any
) -> list[TestNode]:
    """`count` candidates named node1.. with the Redis lease (TTL 1 s unless given)."""
    return [
        TestNode(f"node{i}", root / f"node{i}", redis_url=redis_url, lease_key=key, **kwargs)
        for i in range(1, count + 1)
    ]


def primaries(nodes: Sequence[TestNode]) -> list[TestNode]:
    return [n for n in nodes if n.process is not None and n.role() == "primary"]


def the_primary(nodes: Sequence[TestNode], timeout: float = 30) -> TestNode:
    """The one node that says it is primary, once exactly one does."""
    found: list[TestNode] = []

    def one() -> bool:
        found[:] = primaries(nodes)
        return len(found) == 1

    wait_until(one, timeout, "exactly one primary", *nodes)
    return found[0]


def start_cluster(nodes: Sequence[TestNode], schema: str) -> TestNode:
    """The first node creates the database (`schema`) and becomes primary; the others
    follow; returns once every node is at the primary's position."""
    first = nodes[0]
    first.write_config()
    conn = open_writer(first.db())
    conn.execute(schema)
    conn.close()
    first.start()
    wait_until(lambda: first.role() == "primary" and first.txid() > 0, 60, "first primary", first)
    for node in nodes[1:]:
        node.start()
    return converge(nodes, pages=False)


def converge(
    nodes: Sequence[TestNode], db: str = "app.db", *, timeout: float = 60, pages: bool = True
) -> TestNode:
    """Every live node at the primary's position once it has shipped all it holds; with
    `pages`, equal page bytes and integrity_check ok everywhere. Returns the primary."""
    live = [n for n in nodes if n.process is not None]
    primary = the_primary(live)

    def shipped() -> bool:
        pos = primary.position(db)
        return pos is not None and pos[0] > 0 and pos[1] == database_checksum(primary.db(db))

    wait_until(shipped, timeout, "the primary has shipped everything", *live)

    def same() -> bool:
        want = primary.position(db)
        return want is not None and all(n.position(db) == want for n in live)

    wait_until(same, timeout, "every node at the primary's position", *live)
    if pages:
        for n in live:
            if n is not primary:
                assert same_pages(primary.db(db), n.db(db)), f"{n.name} pages differ"
            assert integrity(n.db(db)) == "ok", f"{n.name}: integrity_check failed"
    return primary


__all__ = [
    "TOKEN",
    "TestNode",
    "converge",
    "database_checksum",
    "integrity",
    "open_writer",
    "page_checksum",
    "page_images",
    "primaries",
    "redis_nodes",
    "same_pages",
    "start_cluster",
    "the_primary",
    "wait_until",
]
