"""The ltx-sidecar daemon as a separate process, with separate writer processes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlean

import ltx
from sidecar.log import LTXLog
from tests.helpers import free_port

WRITER = r"""
import random, sqlite3, sys, time
path, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
conn = sqlite3.connect(path, timeout=30, isolation_level=None)
conn.execute("PRAGMA busy_timeout=30000")
conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, w INT, v BLOB)")
for i in range(count):
    time.sleep(0.002)
    op = rng.random()
    if op < 0.6:
        conn.execute("INSERT INTO t(w, v) VALUES (?, ?)", (seed, rng.randbytes(rng.choice([10, 300, 5000]))))
    elif op < 0.8:
        conn.execute("UPDATE t SET v = ? WHERE id % 7 = ?", (rng.randbytes(50), rng.randrange(7)))
    elif op < 0.95:
        conn.execute("DELETE FROM t WHERE id % 11 = ?", (rng.randrange(11),))
    else:
        conn.execute("BEGIN IMMEDIATE")
        for _ in range(20):
            conn.execute("INSERT INTO t(w, v) VALUES (?, ?)", (seed, rng.randbytes(2000)))
        conn.execute("COMMIT")
"""


class Daemon:
    def __init__(self, tmp: Path, db_dir: Path) -> None:
        self.data = tmp / "data"
        self.config = tmp / "sidecar.toml"
        self.config.write_text(
            f'data-dir = "{self.data}"\n'
            f"[api]\nport = {free_port()}\n"
            f"[databases]\n"
            f'dirs = ["{db_dir}"]\n'
            f'poll-interval = "50ms"\n'
            f"[checkpoint]\n"
            f"passive-frames = 100\n"
            f"truncate-frames = 2000\n"
        )
        self.log_path = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self._log_offset = len(self.logs()) if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "--config", str(self.config)],
            stdout=log,
            stderr=log,
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait_ready(self) -> None:
        """Until this start has found its databases (its signal handlers are set by then)."""
        _wait_for(
            lambda: "replicating" in self.logs()[self._log_offset :], 30, "the daemon to start"
        )

    def stop(self) -> int:
        assert self.proc is not None
        self.wait_ready()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def logs(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    db_dir = tmp_path / "dbs"
    db_dir.mkdir()
    d = Daemon(tmp_path, db_dir)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(10)


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _live_image(db: Path) -> bytes:
    """The database's logical pages, read through SQLite in this process."""
    conn = sqlean.connect(str(db))
    try:
        rows = conn.execute("SELECT data FROM sqlite_dbpage ORDER BY pgno").fetchall()
        return b"".join(bytes(r[0]) for r in rows)
    finally:
        conn.close()


def _replay(log_dir: Path, out: Path) -> ltx.Pos:
    log = LTXLog(log_dir)
    out.write_bytes(b"")
    previous = 0
    with out.open("r+b") as image:
        for min_txid, max_txid, path in log:
            assert min_txid == 1 or min_txid == previous + 1, f"gap before {path.name}"
            with path.open("rb") as f:
                ltx.apply_ltx(image, f, path=str(path))
            previous = max_txid
    assert log.pos is not None
    return log.pos


def _log_caught_up(log_dir: Path, db: Path) -> bool:
    log = LTXLog(log_dir)
    if log.pos is None:
        return False
    with (log_dir.parent / "state.json").open() as f:
        state = json.load(f)
    return bool(state["error"] is None and state["txid"] == f"{log.pos.txid:016x}")


def test_sigkilled_daemon_restarts_with_a_consistent_log_under_load(
    daemon: Daemon, tmp_path: Path
) -> None:
    db = tmp_path / "dbs" / "app.db"
    conn = sqlean.connect(str(db), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, w INT, v BLOB)")
    conn.close()
    log_dir = daemon.data / "dbs" / "app.db" / "ltx"
    daemon.start()
    _wait_for(lambda: LTXLog(log_dir).pos is not None, 20, "the first snapshot")

    rng = random.Random(7)
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(seed), "1500"])
        for seed in range(3)
    ]
    kills = 0
    while any(w.poll() is None for w in writers):
        time.sleep(rng.uniform(0.2, 1.0))
        daemon.kill()
        kills += 1
        daemon.start()
    for w in writers:
        assert w.wait(60) == 0
    assert kills >= 1

    # Let the restarted daemon catch up, then compare its log with the database.
    final = _live_image(db)
    expected = ltx.database_checksum(
        (i + 1, final[i * 4096 : (i + 1) * 4096]) for i in range(len(final) // 4096)
    )

    def reached() -> bool:
        pos = LTXLog(log_dir).pos
        return pos is not None and pos.post_apply_checksum == expected

    _wait_for(reached, 30, "the log to reach the database")
    assert daemon.stop() == 0

    image = tmp_path / "replay.db"
    pos = _replay(log_dir, image)
    assert image.read_bytes() == final
    assert pos.post_apply_checksum == expected
    check = sqlean.connect(str(image))
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()
    assert "Traceback" not in daemon.logs()


def test_daemon_picks_up_a_database_created_later_and_stops_cleanly(
    daemon: Daemon, tmp_path: Path
) -> None:
    daemon.start()
    db = tmp_path / "dbs" / "later.db"
    time.sleep(0.3)
    subprocess.run(
        ["sqlite3", str(db), "CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);"], check=True
    )
    log_dir = daemon.data / "dbs" / "later.db" / "ltx"
    _wait_for(lambda: log_dir.is_dir() and LTXLog(log_dir).pos is not None, 20, "a snapshot")
    for i in range(20):
        subprocess.run(["sqlite3", str(db), f"INSERT INTO t VALUES ({i})"], check=True)
    _wait_for(
        lambda: _log_caught_up(log_dir, db) and _replay(log_dir, tmp_path / "r.db").txid >= 21,
        20,
        "20 transactions",
    )
    assert daemon.stop() == 0
    logs = daemon.logs()
    assert "switched the database from delete to WAL journal mode" in logs
    assert "ltx-sidecar stopped" in logs
    image = tmp_path / "r.db"
    _replay(log_dir, image)
    assert image.read_bytes() == _live_image(db)


def test_daemon_refuses_to_start_without_databases(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar"],
        capture_output=True,
        text=True,
        env={**os.environ, "LTX_SIDECAR_DATA_DIR": str(tmp_path)},
        timeout=30,
    )
    assert result.returncode == 2
    assert "no databases configured" in result.stderr


def test_daemon_rejects_an_unknown_config_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[checkpoint]\npasive-frames = 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "pasive-frames" in result.stderr
