"""Raw reads of a database never drop the POSIX locks SQLite holds on it (DESIGN.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlean

from sidecar.config import has_sqlite_magic
from sidecar.fileutil import held_fd
from sidecar.log import LTXLog
from sidecar.tailer import DatabaseTailer, TailerOptions

TRY_WRITE = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
try:
    conn.execute("BEGIN IMMEDIATE")
except sqlite3.OperationalError as exc:
    print("locked" if "locked" in str(exc) else f"error {exc}")
else:
    print("got the lock")
"""


def other_process_can_write(db: Path) -> str:
    out = subprocess.run([sys.executable, "-c", TRY_WRITE, str(db)], capture_output=True, text=True)
    return out.stdout.strip()


def test_closing_a_tailer_keeps_another_connections_write_lock(tmp_path: Path) -> None:
    """A planned handoff holds the write lock while the tailer closes: it must hold."""
    db = tmp_path / "app.db"
    app = sqlean.connect(str(db), isolation_level=None)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("CREATE TABLE t(x)")
    tailer = DatabaseTailer("app.db", db, LTXLog(tmp_path / "ltx", clean=True), TailerOptions())
    tailer.open()
    tailer.sync()
    pause = sqlean.connect(str(db), isolation_level=None)
    pause.execute("BEGIN IMMEDIATE")
    assert other_process_can_write(db) == "locked"
    tailer.close()
    assert has_sqlite_magic(db)  # discovery reads the header too
    assert other_process_can_write(db) == "locked", "closing a descriptor dropped the lock"
    pause.execute("ROLLBACK")
    assert other_process_can_write(db) == "got the lock"
    app.close()
    pause.close()


def test_held_descriptors_are_one_per_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    assert held_fd(path) == held_fd(path)
    path.unlink()
    path.write_bytes(b"y")
    assert held_fd(path) != -1
