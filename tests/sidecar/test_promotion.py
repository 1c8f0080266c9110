"""A replica promoted to primary continues its log instead of starting with a snapshot."""

from __future__ import annotations

from pathlib import Path

import sqlean

import ltx
from sidecar.apply import ReplicaDatabase, apply_files
from sidecar.log import LTXLog
from sidecar.tailer import DatabaseTailer, TailerOptions


def test_a_promoted_replica_ships_its_stamped_page_1_not_a_snapshot(tmp_path: Path) -> None:
    primary_db = tmp_path / "primary" / "app.db"
    primary_db.parent.mkdir()
    app = sqlean.connect(str(primary_db), isolation_level=None)
    app.execute("PRAGMA journal_mode=WAL")
    tailer = DatabaseTailer("app.db", primary_db, LTXLog(tmp_path / "p-ltx"), TailerOptions())
    tailer.open()
    app.execute("CREATE TABLE t(x)")
    for i in range(30):
        app.execute("INSERT INTO t VALUES (?)", (i,))
        tailer.sync()
    replica_db = tmp_path / "replica" / "app.db"
    replica_db.parent.mkdir()
    replica_log = LTXLog(tmp_path / "replica" / "dbs" / "app.db" / "ltx")
    replica = ReplicaDatabase(replica_db, replica_log)
    apply_files(replica, [p for _, _, p in tailer.log])
    at = replica.pos
    replica.close()
    tailer.close()
    app.close()

    promoted = DatabaseTailer("app.db", replica_db, LTXLog(replica_log.directory), TailerOptions())
    promoted.open()
    try:
        assert promoted.state.snapshots == 0
        pos = promoted.log.pos
        assert pos is not None and pos.txid in (at.txid, at.txid + 1)
        if pos.txid == at.txid + 1:
            header = promoted.log.last_header
            assert header is not None and not header.is_snapshot
            assert header.pre_apply_checksum == at.post_apply_checksum
        conn = sqlean.connect(f"file:{replica_db}?mode=ro", uri=True)
        rows = conn.execute("SELECT pgno, data FROM sqlite_dbpage").fetchall()
        conn.close()
        assert ltx.database_checksum((p, bytes(d)) for p, d in rows) == pos.post_apply_checksum
    finally:
        promoted.close()
