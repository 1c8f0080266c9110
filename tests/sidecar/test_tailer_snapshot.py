"""Snapshots on demand, for replicas that are new or behind the retained log."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sqlean

import ltx
from sidecar.log import LTXLog
from sidecar.tailer import DatabaseTailer, TailerError, TailerOptions


def _app(db: Path) -> sqlean.Connection:
    conn = sqlean.connect(str(db), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def _live(conn: sqlean.Connection) -> bytes:
    return b"".join(
        bytes(r[0]) for r in conn.execute("SELECT data FROM sqlite_dbpage ORDER BY pgno")
    )


def test_snapshot_on_demand_is_the_database_at_the_last_txid(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    app = _app(db)
    app.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    tailer = DatabaseTailer("app.db", db, LTXLog(tmp_path / "ltx"), TailerOptions())
    try:
        tailer.open()
        for i in range(50):
            app.execute("INSERT INTO t(v) VALUES (randomblob(?))", (100 + i * 97,))
        # Not synced yet: the snapshot brings the log to the end of the WAL first.
        out = io.BytesIO()
        pos = tailer.snapshot_to(out)
        assert pos == ltx.Pos(tailer.state.txid, tailer.state.checksum)
        assert LTXLog(tmp_path / "ltx").pos == pos
        out.seek(0)
        image = io.BytesIO()
        header, _ = ltx.apply_ltx(image, out)
        assert header.is_snapshot and header.max_txid == pos.txid
        assert image.getvalue() == _live(app)
        # More writes after it follow on from the snapshot's position.
        app.execute("DELETE FROM t WHERE id % 2 = 0")
        tailer.sync()
        for _min, _max, path in LTXLog(tmp_path / "ltx"):
            if _min > pos.txid:
                with path.open("rb") as f:
                    ltx.apply_ltx(image, f)
        assert image.getvalue() == _live(app)
    finally:
        tailer.close()
        app.close()


def test_snapshot_of_a_database_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    tailer = DatabaseTailer("missing.db", db, LTXLog(tmp_path / "ltx"), TailerOptions())
    try:
        with pytest.raises(TailerError, match="does not exist yet"):
            tailer.snapshot_to(io.BytesIO())
    finally:
        tailer.close()
