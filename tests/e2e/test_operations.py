"""Operating a live three-node cluster: /status, /metrics, ltxctl, export, import, the token.

Nodes are ``ltx-sidecar`` processes on 127.0.0.1 with the static lease. Every value an
operator sees is cross-checked against the databases themselves: TXIDs and checksums
against the LTX checksum of the primary's pages, exported and imported content by SQL.
``ltxctl`` runs as its own process, as an operator runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlean

from tests.e2e.appnodes import http
from tests.e2e.cluster import (
    TOKEN,
    TestNode,
    database_checksum,
    integrity,
    open_writer,
    same_pages,
    wait_until,
)
from tests.sidecar.test_metrics import parse_exposition, sample

pytestmark = pytest.mark.timeout(180)

DB = "app.db"
LTXCTL = Path(sys.executable).parent / "ltxctl"

# Every endpoint that changes state or reads a database's content.
MUTATING = [
    ("POST", "/promote"),
    ("POST", f"/db/{DB}/import"),
    ("GET", f"/db/{DB}/export"),
    ("POST", f"/db/{DB}/execute"),
    ("POST", "/stream"),
    ("POST", "/pos"),
    ("POST", "/resync"),
    ("POST", "/handoff"),
]


# -- the cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[TestNode]]:
    """A primary with some writes and two replicas that have them."""
    root = tmp_path_factory.mktemp("ops")
    primary = TestNode("primary", root / "primary")
    primary.write_config()
    conn = open_writer(primary.db(DB))
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, body TEXT)")
    for i in range(50):
        conn.execute("INSERT INTO t(body) VALUES (?)", (f"row {i} " + "x" * (i * 40),))
    conn.close()
    nodes = [primary]
    try:
        primary.start()
        for i in (1, 2):
            nodes.append(TestNode(f"replica{i}", root / f"replica{i}", primary_url=primary.url))
            nodes[-1].start()
        converge(nodes)
        yield nodes
    finally:
        for node in reversed(nodes):
            node.stop()


def converge(nodes: list[TestNode]) -> tuple[int, int]:
    """Wait until the primary shipped everything and every replica has it; its position."""
    primary, *replicas = nodes

    def shipped() -> bool:
        pos = primary.position(DB)
        return pos is not None and pos[0] > 0 and pos[1] == database_checksum(primary.db(DB))

    wait_until(shipped, 30, "the primary has shipped everything", *nodes)
    want = primary.position(DB)
    wait_until(
        lambda: all(r.position(DB) == want for r in replicas), 60, "replicas caught up", *nodes
    )
    wait_until(
        lambda: all(reported(primary, r.name) == want for r in replicas),
        30,
        "the primary hears every replica's position",
        *nodes,
    )
    assert want is not None
    return want


def reported(primary: TestNode, replica: str) -> tuple[int, int] | None:
    """The position of `replica` as the primary's /status lists it."""
    status = primary.status()
    for entry in status["replicas"] if status else []:
        pos = entry["databases"].get(DB)
        if entry["node_id"] == replica and pos is not None:
            return int(pos["txid"], 16), int(pos["checksum"], 16)
    return None


def content(path: Path) -> list[tuple[str, str, list[tuple[Any, ...]]]]:
    """Every table's name, SQL and rows (by rowid): a database's content for comparison."""
    conn = sqlean.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")
        tables = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall()
        out = [
            (name, sql, conn.execute(f'SELECT * FROM "{name}" ORDER BY rowid').fetchall())
            for name, sql in tables
        ]
        conn.execute("COMMIT")
    finally:
        conn.close()
    return out


def ltxctl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LTX_SIDECAR_")}
    return subprocess.run([str(LTXCTL), *args], capture_output=True, text=True, timeout=60, env=env)


def database_entry(status: dict[str, Any]) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [d for d in status["databases"] if d["name"] == DB]
    assert len(entries) == 1, status["databases"]
    return entries[0]


# -- status and metrics --------------------------------------------------------------------


def test_status_on_every_node_matches_the_databases(cluster: list[TestNode]) -> None:
    txid, checksum = converge(cluster)
    primary, *replicas = cluster
    assert checksum == database_checksum(primary.db(DB))
    for node in cluster:
        status = node.status()
        assert status is not None
        assert status["node_id"] == node.name
        assert status["role"] == ("primary" if node is primary else "replica")
        assert status["ready"] is True
        assert status["primary"]["node_id"] == primary.name
        assert status["primary"]["api_url"] == primary.url
        entry = database_entry(status)
        assert (int(entry["txid"], 16), int(entry["checksum"], 16)) == (txid, checksum)
        assert entry["lag_txids"] == 0
        if node is not primary:
            # A replica's page 1 differs from the primary's only in the bytes SQLite
            # stamps on commit: with those masked, its pages are the primary's.
            assert same_pages(primary.db(DB), node.db(DB))
            assert integrity(node.db(DB)) == "ok"
            assert status["replicas"] == []
    listed = primary.status()["replicas"]  # type: ignore[index]
    assert [r["node_id"] for r in listed] == [r.name for r in replicas]
    for entry in listed:
        assert entry["connected"] is True
        assert entry["last_report"] is not None
        pos = entry["databases"][DB]
        assert (int(pos["txid"], 16), int(pos["checksum"], 16)) == (txid, checksum)
        assert pos["lag_txids"] == 0


def test_metrics_parse_and_their_txid_is_the_status_txid(cluster: list[TestNode]) -> None:
    converge(cluster)
    primary = cluster[0]
    for node in cluster:
        answer = http("GET", f"{node.url}/metrics")
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        families = parse_exposition(answer.text)
        status = node.status()
        assert status is not None
        assert sample(families, "ltx_sidecar_db_txid", db=DB) == int(
            database_entry(status)["txid"], 16
        )
        role = "primary" if node is primary else "replica"
        assert sample(families, "ltx_sidecar_role", role=role) == 1
        assert sample(families, "ltx_sidecar_primary_known") == 1
        assert sample(families, "ltx_sidecar_db_lag_txids", db=DB) == 0
    families = parse_exposition(http("GET", f"{primary.url}/metrics").text)
    assert sample(families, "ltx_sidecar_connected_replicas") == 2
    for replica in cluster[1:]:
        assert sample(families, "ltx_sidecar_replica_connected", replica=replica.name) == 1


# -- ltxctl status ---------------------------------------------------------------------------


def test_ltxctl_status_against_live_nodes_as_json_and_as_a_table(
    cluster: list[TestNode],
) -> None:
    txid, checksum = converge(cluster)
    primary, *replicas = cluster
    for node in cluster:
        done = ltxctl("status", "--url", node.url, "--json")
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
        doc = json.loads(done.stdout)
        assert doc["node_id"] == node.name
        assert doc["primary"]["node_id"] == primary.name
        entry = database_entry(doc)
        assert (int(entry["txid"], 16), int(entry["checksum"], 16)) == (txid, checksum)
    done = ltxctl("status", "--url", primary.url)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    table = done.stdout
    assert f"primary at {primary.url}" in table
    assert f"{txid:016x}" in table and f"{checksum:016x}" in table
    for replica in replicas:
        assert replica.name in table
    done = ltxctl("status", "--url", replicas[0].url)
    assert done.returncode == 0, done.stderr
    assert "replica (epoch" in done.stdout and "current" in done.stdout


def test_ltxctl_status_of_a_stopped_node_shows_its_data_directory(
    cluster: list[TestNode],
) -> None:
    txid, checksum = converge(cluster)
    replica = cluster[2]
    replica.stop()
    try:
        done = ltxctl("status", "--config", str(replica.config_path))
        assert done.returncode == 1
        assert "does not answer" in done.stderr and str(replica.data_dir) in done.stderr
        assert f"From {replica.data_dir}" in done.stdout
        assert f"{txid:016x}" in done.stdout and f"{checksum:016x}" in done.stdout
        done = ltxctl("status", "--config", str(replica.config_path), "--json")
        assert done.returncode == 1
        local = json.loads(done.stdout)
        assert local["running"] is False and local["primary"] == cluster[0].name
        (entry,) = [d for d in local["databases"] if d["name"] == DB]
        assert (entry["txid"], entry["checksum"]) == (f"{txid:016x}", f"{checksum:016x}")
    finally:
        replica.start()
    converge(cluster)


# -- the token -------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}"])
def test_every_mutating_endpoint_needs_the_token(
    cluster: list[TestNode], authorization: str | None
) -> None:
    before = converge(cluster)
    headers = {} if authorization is None else {"Authorization": authorization}
    for node in (cluster[0], cluster[1]):
        for method, path in MUTATING:
            body = b"SQLite format 3\x00" if method == "POST" else None
            answer = http(method, node.url + path, body, headers)
            assert (answer.status, answer.body) == (401, b""), f"{node.name} {method} {path}"
            assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert converge(cluster) == before


# -- export and import -------------------------------------------------------------------


def test_export_from_a_replica_is_a_consistent_copy_of_the_primary(
    cluster: list[TestNode], tmp_path: Path
) -> None:
    converge(cluster)
    out = tmp_path / "export.db"
    done = ltxctl("export", "--url", cluster[1].url, "--token", TOKEN, "--db", DB, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"exported {DB} to {out}" in done.stdout
    assert integrity(out) == "ok"
    assert content(out) == content(cluster[0].db(DB))
    assert content(out)[0][2], "the export has the rows"


def test_an_import_that_is_not_sqlite_is_refused_and_changes_nothing(
    cluster: list[TestNode], tmp_path: Path
) -> None:
    before = converge(cluster)
    rows = content(cluster[0].db(DB))
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database\n" * 1000)
    answer = http(
        "POST",
        f"{cluster[1].url}/db/{DB}/import",
        junk.read_bytes(),
        {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/vnd.sqlite3"},
    )
    assert answer.status == 400, answer.text
    assert answer.text.startswith("not imported:") and answer.text.count("\n") == 1
    done = ltxctl("import", "--url", cluster[1].url, "--token", TOKEN, "--db", DB, str(junk))
    assert done.returncode == 1 and "refused" in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert converge(cluster) == before
    for node in cluster:
        assert content(node.db(DB)) == rows


def new_database(path: Path) -> list[tuple[str, str, list[tuple[Any, ...]]]]:
    """A different database (same page size as the cluster's): its content."""
    conn = sqlean.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("CREATE TABLE imported(k TEXT PRIMARY KEY, v INT)")
    conn.executemany("INSERT INTO imported VALUES (?, ?)", [(f"k{i}", i * i) for i in range(300)])
    conn.close()
    return content(path)


def test_an_import_through_a_replica_replaces_the_database_everywhere(
    cluster: list[TestNode], tmp_path: Path
) -> None:
    before = converge(cluster)
    src = tmp_path / "new.db"
    want = new_database(src)
    done = ltxctl("import", "--url", cluster[2].url, "--token", TOKEN, "--db", DB, str(src))
    assert done.returncode == 0, done.stderr
    assert f"imported {src} into {DB}" in done.stdout
    after = converge(cluster)
    assert after[0] > before[0]
    for node in cluster:
        assert content(node.db(DB)) == want, node.name
        assert node.position(DB) == after
        assert integrity(node.db(DB)) == "ok"
