"""Replication end to end: a primary and replicas as separate processes on 127.0.0.1."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlean

from tests.e2e.cluster import (
    TOKEN,
    TestNode,
    converge,
    integrity,
    open_writer,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)

WRITER = Path(__file__).parents[1] / "sidecar" / "writer.py"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[TestNode]]:
    """A primary and two replicas; stopped at teardown."""
    primary = TestNode("primary", tmp_path / "primary")
    primary.write_config()
    conn = open_writer(primary.db())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, writer INT, n INT, body TEXT)")
    conn.close()
    primary.start()
    replicas = [
        TestNode(f"replica{i}", tmp_path / f"replica{i}", primary_url=primary.url) for i in (1, 2)
    ]
    for r in replicas:
        r.start()
    nodes = [primary, *replicas]
    try:
        yield nodes
    finally:
        for node in reversed(nodes):
            node.stop()


def converged(primary: TestNode, *replicas: TestNode, db: str = "app.db") -> None:
    """Every replica reaches the primary's position; equal pages; integrity ok."""
    converge([primary, *replicas], db)


def writer_command(db: Path, writer_id: int, transactions: int, seed: int) -> list[str]:
    """The random application workload of the tailer tests, as its own process."""
    return [
        sys.executable, str(WRITER), "random", str(db),
        "--seed", str(seed), "--ops", str(transactions), "--id", str(writer_id),
    ]  # fmt: skip


def run_writers(db: Path, processes: int, transactions: int, seed: int) -> None:
    procs = [
        subprocess.Popen(writer_command(db, i, transactions, seed + i)) for i in range(processes)
    ]
    for p in procs:
        assert p.wait(120) == 0


def test_two_replicas_converge_under_a_multiprocess_write_workload(
    cluster: list[TestNode],
) -> None:
    primary, *replicas = cluster
    run_writers(primary.db(), processes=3, transactions=300, seed=1)
    converged(primary, *replicas)
    conn = sqlean.connect(str(replicas[0].db()))
    assert conn.execute("SELECT count(*) FROM shared").fetchone()[0] > 0
    conn.close()
    status = replicas[0].status()
    assert status is not None
    assert status["role"] == "replica" and status["primary"]["node_id"] == "primary"
    assert (replicas[0].db_dir / ".primary").read_text().strip() == "primary"
    assert (replicas[0].db_dir / "app.db-pos").read_text() == (
        f"{primary.txid():016x}/{primary.position()[1]:016x}\n"  # type: ignore[index]
    )


def test_a_replica_prunes_its_log_as_the_primary_does(tmp_path: Path) -> None:
    retention = '[retention]\nmax-age = "0s"\nkeep-count = 5\n'
    primary = TestNode("primary", tmp_path / "primary", extra=retention)
    primary.write_config()
    conn = open_writer(primary.db())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, writer INT, n INT, body TEXT)")
    conn.close()
    replica = TestNode("replica", tmp_path / "replica", primary_url=primary.url, extra=retention)
    try:
        primary.start()
        replica.start()
        conn = open_writer(primary.db())
        for i in range(40):  # one LTX file each: a commit, then the replica has it
            conn.execute("INSERT INTO t(writer, n, body) VALUES (1, ?, 'x')", (i,))
            wait_until(lambda: replica.txid() == primary.txid(), 20, "the replica", replica)
        conn.close()
        ltx_dir = replica.data_dir / "dbs" / "app.db" / "ltx"
        assert len(list(ltx_dir.glob("*.ltx"))) > 20
        wait_until(lambda: len(list(ltx_dir.glob("*.ltx"))) <= 5, 30, "retention", replica)
        assert "retention removed" in replica.logs()
        converged(primary, replica)
    finally:
        replica.stop()
        primary.stop()


def test_replica_offline_for_thousands_of_transactions_catches_up(
    cluster: list[TestNode],
) -> None:
    primary, r1, r2 = cluster
    r2.stop()
    conn = open_writer(primary.db())
    for i in range(3000):
        conn.execute("INSERT INTO t(writer, n, body) VALUES (0, ?, 'x')", (i,))
    conn.close()
    r2.start()
    converged(primary, r1, r2)


def test_replica_behind_the_retained_log_is_brought_back(tmp_path: Path) -> None:
    primary = TestNode(
        "primary", tmp_path / "p", extra='[retention]\nmax-age = "0s"\nkeep-count = 5\n'
    )
    primary.write_config()
    conn = open_writer(primary.db())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, writer INT, n INT, body TEXT)")
    primary.start()
    replica = TestNode("replica", tmp_path / "r", primary_url=primary.url)
    try:
        replica.start()
        converged(primary, replica)
        replica.stop()
        for i in range(500):
            conn.execute("INSERT INTO t(writer, n, body) VALUES (0, ?, 'y')", (i,))
        # Retention runs every 10 s; wait until the files the replica needs are gone.
        ltx_dir = primary.data_dir / "dbs" / "app.db" / "ltx"
        wait_until(lambda: len(list(ltx_dir.glob("*.ltx"))) <= 10, 30, "retention", primary)
        replica.start()
        converged(primary, replica)
    finally:
        conn.close()
        replica.stop()
        primary.stop()


def test_replica_edited_behind_its_back_converges(cluster: list[TestNode]) -> None:
    primary, r1, r2 = cluster
    run_writers(primary.db(), processes=1, transactions=50, seed=2)
    converged(primary, r1, r2)
    r1.stop()
    conn = sqlean.connect(str(r1.db()), isolation_level=None)
    conn.execute("UPDATE t SET body = 'edited' WHERE id % 3 = 0")
    conn.close()
    r1.start()
    converged(primary, r1, r2)
    assert "edited" not in {
        row[0] for row in sqlean.connect(str(r1.db())).execute("SELECT body FROM t")
    }


def test_local_writes_fail_while_the_replica_holds_the_lock(cluster: list[TestNode]) -> None:
    primary, r1, _ = cluster
    run_writers(primary.db(), processes=1, transactions=10, seed=3)
    converged(primary, r1)
    conn = sqlean.connect(str(r1.db()), timeout=0.2, isolation_level=None)
    with pytest.raises(sqlean.OperationalError, match="locked"):
        conn.execute("INSERT INTO t(writer, n, body) VALUES (9, 9, 'local')")
    conn.close()


def test_a_local_write_that_lands_is_detected_and_undone(tmp_path: Path) -> None:
    primary = TestNode("primary", tmp_path / "p")
    primary.write_config()
    conn = open_writer(primary.db())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, writer INT, n INT, body TEXT)")
    conn.close()
    primary.start()
    replica = TestNode("replica", tmp_path / "r", primary_url=primary.url)
    replica.env["LTX_SIDECAR_REPLICATION_LOCK_LOCAL_WRITES"] = "false"
    try:
        replica.start()
        run_writers(primary.db(), processes=1, transactions=20, seed=4)
        converged(primary, replica)
        local = sqlean.connect(str(replica.db()), timeout=5, isolation_level=None)
        local.execute("INSERT INTO t(writer, n, body) VALUES (9, 9, 'local')")
        local.close()
        wait_until(
            lambda: "local write landed" in replica.logs(), 20, "detection", primary, replica
        )
        run_writers(primary.db(), processes=1, transactions=5, seed=5)
        converged(primary, replica)
    finally:
        replica.stop()
        primary.stop()


def test_new_and_deleted_databases_follow_the_primary(cluster: list[TestNode]) -> None:
    primary, r1, r2 = cluster
    other = primary.db("other.db")
    conn = open_writer(other)
    conn.execute("CREATE TABLE x(a)")
    conn.execute("INSERT INTO x VALUES (1)")
    conn.close()
    converged(primary, r1, r2, db="other.db")
    for path in (other, Path(f"{other}-wal"), Path(f"{other}-shm")):
        path.unlink(missing_ok=True)
    wait_until(
        lambda: not r1.db("other.db").exists() and not r2.db("other.db").exists(),
        30,
        "the deletion reaches the replicas",
        primary,
        r1,
        r2,
    )


def test_killed_replica_restarts_intact_and_resumes(cluster: list[TestNode]) -> None:
    primary, r1, r2 = cluster
    writer = subprocess.Popen(writer_command(primary.db(), 0, 1500, 7))
    rng = random.Random(7)
    try:
        for _ in range(5):
            time.sleep(rng.uniform(0.1, 0.5))
            r1.stop(signal.SIGKILL)
            assert integrity(r1.db()) == "ok"
            r1.start()
    finally:
        assert writer.wait(120) == 0
    converged(primary, r1, r2)


def _post(url: str, token: str | None, body: bytes = b"{}") -> int:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        assert exc.code != 401 or exc.read() == b""
        return int(exc.code)


def test_wrong_or_missing_token_gets_401(cluster: list[TestNode]) -> None:
    primary = cluster[0]
    body = json.dumps({"version": 1, "node_id": "x", "databases": []}).encode()
    for path in ("/stream", "/pos"):
        assert _post(primary.url + path, None, body) == 401
        assert _post(primary.url + path, "wrong", body) == 401
    bad_name = json.dumps(
        {
            "version": 1,
            "node_id": "x",
            "databases": [{"name": "../etc", "txid": "0" * 16, "checksum": "0" * 16}],
        }
    ).encode()
    assert _post(primary.url + "/stream", TOKEN, bad_name) == 400
