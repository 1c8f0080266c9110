"""Export, validation and import of whole databases, with real SQLite files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlean

from sidecar.dbcopy import CopyError, check_header, export_copy, import_into, validate_sqlite_file


def make_db(path: Path, rows: list[str], *, page_size: int = 4096, wal: bool = True) -> None:
    """A database with a table t(v) holding `rows`, left open by nobody."""
    conn = sqlean.connect(str(path), isolation_level=None)
    conn.execute(f"PRAGMA page_size={page_size}")
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    conn.execute("CREATE INDEX t_v ON t(v)")
    conn.executemany("INSERT INTO t(v) VALUES (?)", [(r,) for r in rows])
    conn.close()


def rows_of(path: Path) -> list[str]:
    conn = sqlean.connect(str(path))
    try:
        return [r[0] for r in conn.execute("SELECT v FROM t ORDER BY id")]
    finally:
        conn.close()


def open_app(path: Path) -> sqlean.Connection:
    """A connection as an app holds it: open for the test's duration, WAL not checkpointed."""
    conn = sqlean.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    return conn


# -- export ----------------------------------------------------------------------------


def test_export_copies_the_committed_state_including_the_wal(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    make_db(db, ["a", "b"])
    app = open_app(db)
    app.execute("INSERT INTO t(v) VALUES ('in the wal')")
    assert os.path.getsize(f"{db}-wal") > 0
    out = tmp_path / "copy.db"

    info = export_copy(db, out)

    assert rows_of(out) == ["a", "b", "in the wal"]
    assert info == {"page_size": 4096, "pages": info["pages"], "size": out.stat().st_size}
    assert out.read_bytes()[18:20] == b"\x01\x01"  # a self-contained rollback-journal file
    assert not Path(f"{out}-wal").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".copy")) == []
    validate_sqlite_file(out)
    app.close()


def test_export_of_a_missing_database_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CopyError, match="no such database"):
        export_copy(tmp_path / "nothing.db", tmp_path / "out.db")
    assert not (tmp_path / "out.db").exists()


# -- validation -------------------------------------------------------------------------


def test_a_sound_database_passes(tmp_path: Path) -> None:
    db = tmp_path / "ok.db"
    make_db(db, ["x"] * 100, wal=False)
    validate_sqlite_file(db)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.db"]  # nothing created beside it


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"hello, world" * 100, "not a SQLite database"),
        (b"SQLite format 3\x00" + b"\x00" * 40, "shorter than the 100-byte"),
        (b"SQLite format 3\x00\x03\x00" + b"\x00" * 4078, "invalid page size 768"),
    ],
)
def test_not_a_database_is_refused_with_the_reason(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "upload"
    path.write_bytes(content)
    with pytest.raises(CopyError, match=reason):
        validate_sqlite_file(path)


def test_a_truncated_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "cut.db"
    make_db(db, ["x"] * 100, wal=False)
    os.truncate(db, db.stat().st_size - 100)
    with pytest.raises(CopyError, match="not a multiple of the page size 4096"):
        validate_sqlite_file(db)


def test_a_corrupt_database_fails_the_integrity_check(tmp_path: Path) -> None:
    db = tmp_path / "bad.db"
    make_db(db, [f"row {i}" * 20 for i in range(500)], wal=False)
    data = bytearray(db.read_bytes())
    page = 4096
    for pgno in range(3, len(data) // page, 2):  # damage every other page after page 2
        data[pgno * page + 8 : pgno * page + 200] = os.urandom(192)
    db.write_bytes(bytes(data))
    with pytest.raises(CopyError, match=r"integrity check failed|SQLite cannot read it"):
        validate_sqlite_file(db)


def test_a_database_with_a_wal_beside_it_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "live.db"
    make_db(db, ["a"])
    app = open_app(db)
    app.execute("INSERT INTO t(v) VALUES ('b')")
    with pytest.raises(CopyError, match=r"live\.db-wal beside it holds transactions"):
        validate_sqlite_file(db)
    app.close()


# -- import -----------------------------------------------------------------------------


def test_import_replaces_a_live_wal_database_in_one_transaction(tmp_path: Path) -> None:
    live = tmp_path / "app.db"
    make_db(live, ["old 1", "old 2"])
    reader = open_app(live)
    reader.execute("BEGIN")
    assert [r[0] for r in reader.execute("SELECT v FROM t")] == ["old 1", "old 2"]
    src = tmp_path / "new.db"
    make_db(src, [f"new {i}" for i in range(1000)], wal=False)

    info = import_into(live, src)

    # The open read transaction still sees the old state; the next one sees all of the new.
    assert [r[0] for r in reader.execute("SELECT v FROM t")] == ["old 1", "old 2"]
    reader.execute("COMMIT")
    assert len(list(reader.execute("SELECT v FROM t"))) == 1000
    assert rows_of(live) == [f"new {i}" for i in range(1000)]
    assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert info["page_size"] == 4096 and info["pages"] == info["size"] // 4096
    assert rows_of(src)[:1] == ["new 0"]  # the source is only read
    reader.close()


def test_import_with_another_page_size_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    live = tmp_path / "app.db"
    make_db(live, ["keep me"])
    app = open_app(live)
    src = tmp_path / "small-pages.db"
    make_db(src, ["other"], page_size=1024, wal=False)
    with pytest.raises(CopyError, match=r"page size mismatch.*4096.*1024.*page_size=4096"):
        import_into(live, src)
    assert rows_of(live) == ["keep me"]
    app.close()


def test_import_creates_a_missing_database_in_wal_mode(tmp_path: Path) -> None:
    live = tmp_path / "fresh.db"
    src = tmp_path / "src.db"
    make_db(src, ["a", "b"], page_size=8192, wal=False)
    info = import_into(live, src)
    assert rows_of(live) == ["a", "b"]
    assert info["page_size"] == 8192
    assert check_header(live) == 8192
    assert live.read_bytes()[18:20] == b"\x02\x02"


def test_import_gives_up_when_a_writer_keeps_the_lock(tmp_path: Path) -> None:
    live = tmp_path / "app.db"
    make_db(live, ["before"])
    writer = open_app(live)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t(v) VALUES ('uncommitted')")
    src = tmp_path / "src.db"
    make_db(src, ["after"], wal=False)
    with pytest.raises(CopyError, match="stayed locked"):
        import_into(live, src, timeout=0.2)
    writer.execute("COMMIT")
    assert rows_of(live) == ["before", "uncommitted"]
    writer.close()
