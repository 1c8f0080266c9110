"""The replica-side applier: LTX files from a real primary, applied through sqlite_dbpage.

The primary is a real SQLite database in the test process, written by a ``sqlean``
connection (the same library as the tailer's and the applier's, DESIGN.md choice 3) and
followed by a DatabaseTailer; its LTX files are applied to a ReplicaDatabase. The replica
is then compared with the primary page by page (page 1 masked in the 12 bytes SQLite
stamps), row by row, and with PRAGMA integrity_check. The crash tests run the applier in
a subprocess (this file, run as a script) and SIGKILL it.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlean

import ltx
import sidecar.apply
from ltx import EMPTY_DB_CHECKSUM, Encoder, Header, Pos, Trailer
from sidecar.apply import (
    PAGE1_MAGIC,
    ApplyError,
    LocalWriteError,
    NotNext,
    PositionMismatch,
    ReplicaDatabase,
    empty_page1,
    mask_stamped,
    remove_database_files,
    wal_page1,
)
from sidecar.log import LTXLog
from sidecar.replica import snapshot_database
from sidecar.spool import Spool
from sidecar.tailer import DatabaseTailer, TailerOptions

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
CHILD_TIMEOUT = 60.0
BIG = 5_000_000  # bytes: the one big LTX file of the crash tests


# -- the primary -----------------------------------------------------------------------------


def connect(path: Path, *, timeout: float = 5.0, readonly: bool = False) -> Any:
    if readonly:
        return sqlean.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    return sqlean.connect(str(path), isolation_level=None, check_same_thread=False, timeout=timeout)


class Primary:
    """A primary database in this process: a sqlean writer and a tailer writing its log."""

    def __init__(self, root: Path, *, page_size: int = 4096, auto_vacuum: str = "NONE") -> None:
        self.root = root
        self.db = root / "primary" / "app.db"
        self.db.parent.mkdir(parents=True, exist_ok=True)
        self.app = connect(self.db)
        self.app.execute(f"PRAGMA page_size={page_size}")
        self.app.execute(f"PRAGMA auto_vacuum={auto_vacuum}")
        self.app.execute("PRAGMA journal_mode=WAL")
        self.app.execute("CREATE TABLE IF NOT EXISTS counter(id INTEGER PRIMARY KEY, n INTEGER)")
        self.app.execute("INSERT OR IGNORE INTO counter VALUES(1, 0)")
        self.log = LTXLog(root / "primary" / "dbs" / "app" / "ltx", clean=True)
        self.tailer = DatabaseTailer(
            "app", self.db, self.log, TailerOptions(passive_frames=300, truncate_frames=3000)
        )
        self.tailer.open()

    def sql(self, *statements: str, params: tuple[object, ...] = ()) -> None:
        self.app.execute("BEGIN IMMEDIATE")
        for i, statement in enumerate(statements):
            self.app.execute(statement, params if i == 0 else ())
        self.app.execute("COMMIT")

    def new_files(self, txid: int) -> list[Path]:
        """Sync, and return the files that take a replica at ``txid`` to the end."""
        self.tailer.sync()
        files = self.log.files_after(txid)
        if files is None:  # the log restarted with a snapshot after the replica's TXID
            files = [p for _, _, p in self.log]
            assert ltx.parse_filename(files[0].name)[0] == 1
        return files

    def close(self) -> None:
        self.tailer.close()
        self.app.close()


def series(n: int) -> str:
    """A table of the integers 1..n (sqlean's build has no generate_series)."""
    return f"(WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) SELECT i FROM s)"


def snapshot_now(primary: Primary) -> tuple[bytes, Pos]:
    """A snapshot of the primary as it is now (the tailer synced first), and its position."""
    primary.tailer.sync()
    out = io.BytesIO()
    pos = primary.tailer.snapshot_to(out)
    return out.getvalue(), pos


def flip_bit(data: bytes, at: int) -> bytes:
    flipped = bytearray(data)
    flipped[at] ^= 0x10
    return bytes(flipped)


def ends(path: Path) -> tuple[Header, Trailer]:
    data = path.read_bytes()
    return Header.from_bytes(data[:100]), Trailer.from_bytes(data[-16:])


def file_pos(path: Path) -> Pos:
    header, trailer = ends(path)
    return Pos(header.max_txid, trailer.post_apply_checksum)


def apply_path(replica: ReplicaDatabase, path: Path) -> Pos:
    with path.open("rb") as f:
        pos = replica.apply(f, path=str(path))
    assert pos == replica.pos == file_pos(path), path.name
    return pos


def ship(primary: Primary, replica: ReplicaDatabase) -> int:
    """Sync the primary and apply its new files to the replica; return how many."""
    files = primary.new_files(replica.pos.txid)
    for path in files:
        apply_path(replica, path)
    return len(files)


# -- reading databases (only through sqlean) -------------------------------------------------


def db_pages(path: Path) -> list[bytes]:
    conn = connect(path, readonly=True)
    try:
        conn.execute("BEGIN")
        rows = conn.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno").fetchall()
        conn.execute("COMMIT")
    finally:
        conn.close()
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    return [bytes(r[1]) for r in rows]


def content(path: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = connect(path, readonly=True)
    try:
        conn.execute("BEGIN")
        schema = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY name"
        ).fetchall()
        out: dict[str, list[tuple[object, ...]]] = {"": [tuple(r) for r in schema]}
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name"
        ).fetchall():
            rows = conn.execute(f'SELECT * FROM "{name}" ORDER BY rowid').fetchall()
            out[name] = [tuple(r) for r in rows]
        conn.execute("COMMIT")
    finally:
        conn.close()
    return out


def integrity(path: Path) -> str:
    conn = connect(path, readonly=True)
    try:
        return "\n".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall())
    finally:
        conn.close()


def journal_mode(path: Path) -> str:
    conn = connect(path)
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        conn.close()


def assert_replica_equals_primary(replica: ReplicaDatabase, primary: Primary) -> None:
    """Equal pages (page 1 masked in the 12 stamped bytes), rows, and integrity."""
    want, got = db_pages(primary.db), db_pages(replica.path)
    assert len(got) == len(want), f"{len(got)} pages on the replica, {len(want)} on the primary"
    assert mask_stamped(got[0]) == mask_stamped(wal_page1(want[0]))
    for i in range(1, len(want)):
        assert got[i] == want[i], f"page {i + 1} differs"
    assert content(replica.path) == content(primary.db)
    assert integrity(replica.path) == "ok"
    assert replica.pos == primary.log.pos
    assert replica.checksum == ltx.database_checksum(
        (i + 1, p) for i, p in enumerate([want[0], *got[1:]])
    )
    assert replica.verify() is None


def problem(replica: ReplicaDatabase) -> str | None:
    return replica.problem  # (a function: mypy would keep a narrowed property across calls)


def deleted(replica: ReplicaDatabase) -> bool:
    return replica.deleted


def read_pos_file(replica: ReplicaDatabase) -> bytes | None:
    path = Path(f"{replica.path}-pos")
    return path.read_bytes() if path.exists() else None


# -- fixtures --------------------------------------------------------------------------------


@dataclass
class Node:
    db: Path
    ltx_dir: Path

    def open(self, **kwargs: Any) -> ReplicaDatabase:
        return ReplicaDatabase(self.db, LTXLog(self.ltx_dir, clean=True), **kwargs)


def node(root: Path, name: str = "replica") -> Node:
    return Node(root / name / "app.db", root / name / "dbs" / "app" / "ltx")


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[Primary]:
    p = Primary(tmp_path)
    yield p
    p.close()


@pytest.fixture
def replicas() -> Iterator[list[ReplicaDatabase]]:
    opened: list[ReplicaDatabase] = []
    yield opened
    for r in opened:
        r.close()


def open_replica(n: Node, replicas: list[ReplicaDatabase], **kwargs: Any) -> ReplicaDatabase:
    r = n.open(**kwargs)
    replicas.append(r)
    return r


# -- a random workload -----------------------------------------------------------------------


class Workload:
    """What an app does to a database: rows of every size, schema changes, VACUUM, shrink."""

    def __init__(self, primary: Primary, seed: int) -> None:
        self.p = primary
        self.rng = random.Random(seed)
        self.tables = ["t0"]
        primary.sql("CREATE TABLE IF NOT EXISTS t0(id INTEGER PRIMARY KEY, k INTEGER, v BLOB)")

    def blob(self, big: bool = False) -> bytes:
        size = (
            self.rng.randrange(20_000, 120_000)
            if big
            else self.rng.choice([0, 10, 100, 500, 1500, 3000, 5000])
        )
        return self.rng.randbytes(size)

    def table(self) -> str:
        return self.rng.choice(self.tables)

    def step(self) -> None:
        rng, app = self.rng, self.p.app
        roll = rng.random()
        app.execute("BEGIN IMMEDIATE")
        try:
            if roll < 0.30:
                t = self.table()
                app.executemany(
                    f"INSERT INTO {t}(k, v) VALUES(?, ?)",
                    [(rng.randrange(1000), self.blob()) for _ in range(rng.randrange(1, 30))],
                )
            elif roll < 0.40:
                t = self.table()
                app.executemany(
                    f"INSERT INTO {t}(k, v) VALUES(?, ?)",
                    [
                        (rng.randrange(1000), self.blob(big=True))
                        for _ in range(rng.randrange(1, 4))
                    ],
                )
            elif roll < 0.55:
                k = rng.randrange(1000)
                app.execute(
                    f"UPDATE {self.table()} SET v = ?, k = k + 1 WHERE k BETWEEN ? AND ?",
                    (self.blob(), k, k + 40),
                )
            elif roll < 0.65:
                k = rng.randrange(1000)
                app.execute(f"DELETE FROM {self.table()} WHERE k BETWEEN ? AND ?", (k, k + 150))
            elif roll < 0.71:
                name = f"t{rng.randrange(1, 1_000_000)}"
                app.execute(f"CREATE TABLE IF NOT EXISTS {name}(id INTEGER PRIMARY KEY, k, v)")
                app.execute(f"INSERT INTO {name}(k, v) VALUES(1, ?)", (self.blob(),))
                if name not in self.tables:
                    self.tables.append(name)
            elif roll < 0.75 and len(self.tables) > 1:
                name = self.tables.pop(rng.randrange(1, len(self.tables)))
                app.execute(f"DROP TABLE {name}")
            elif roll < 0.80:
                t = self.table()
                app.execute(f"CREATE INDEX IF NOT EXISTS {t}_k ON {t}(k)")
            elif roll < 0.83:
                t = self.table()
                app.execute(f"DROP INDEX IF EXISTS {t}_k")
            elif roll < 0.90:  # shrink: most rows go
                app.execute(f"DELETE FROM {self.table()} WHERE id % 4 != 0")
            else:
                for _ in range(rng.randrange(2, 5)):  # several operations, one transaction
                    t = self.table()
                    app.execute(f"INSERT INTO {t}(k, v) VALUES(?, ?)", (1, self.blob()))
                    app.execute(f"DELETE FROM {t} WHERE k = ?", (rng.randrange(1000),))
            app.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
            app.execute("COMMIT")
        except BaseException:
            app.execute("ROLLBACK")
            raise
        if rng.random() < 0.06:
            app.execute("VACUUM")  # rewrites every page; shrinks the file


# -- SQLite behaviour the applier relies on --------------------------------------------------


def test_dbpage_truncation_row_truncates_to_commit_pages_only_after_the_page_writes(
    tmp_path: Path,
) -> None:
    """INSERT INTO sqlite_dbpage VALUES(commit + 1, NULL) leaves commit pages (SQLite 3.50);
    a page write after the truncation row cancels it."""

    def run(truncate_first: bool) -> tuple[int, int]:
        src, dst = tmp_path / f"src{truncate_first}.db", tmp_path / f"dst{truncate_first}.db"
        a, b = connect(src), connect(dst)
        for c in (a, b):
            c.execute("PRAGMA journal_mode=WAL")
        a.execute("CREATE TABLE t(v)")
        a.executemany("INSERT INTO t VALUES(randomblob(3000))", [()] * 40)
        pages = a.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno").fetchall()
        b.execute("BEGIN IMMEDIATE")
        b.executemany(
            "INSERT INTO sqlite_dbpage(pgno, data) VALUES(?, ?)",
            [(int(n), wal_page1(d) if n == 1 else bytes(d)) for n, d in reversed(pages)],
        )
        b.execute("COMMIT")
        a.execute("DELETE FROM t")
        a.execute("VACUUM")
        pages = a.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno").fetchall()
        commit = len(pages)
        rows: list[tuple[int, bytes | None]] = [
            (int(n), wal_page1(d) if n == 1 else bytes(d)) for n, d in reversed(pages)
        ]
        rows = [(commit + 1, None), *rows] if truncate_first else [*rows, (commit + 1, None)]
        b.execute("BEGIN IMMEDIATE")
        b.executemany("INSERT INTO sqlite_dbpage(pgno, data) VALUES(?, ?)", rows)
        b.execute("COMMIT")
        b.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        a.close()
        b.close()
        assert integrity(dst) == "ok"
        return commit, dst.stat().st_size // 4096

    assert sqlean.sqlite_version_info >= (3, 48, 0)
    commit, pages_in_file = run(truncate_first=False)
    assert pages_in_file == commit == 2
    commit, pages_in_file = run(truncate_first=True)
    assert pages_in_file > commit  # cancelled: the file keeps its old length


def test_writing_connection_sees_stale_rows_until_its_cache_is_dropped(tmp_path: Path) -> None:
    """Why the applier never reads tables on its own connection and drops its page cache
    after every apply: the b-tree layer keeps its parse of pages sqlite_dbpage rewrote."""
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    a, b = connect(src), connect(dst)
    for c in (a, b):
        c.execute("PRAGMA journal_mode=WAL")
    a.execute("CREATE TABLE t(v)")

    def copy() -> None:
        rows = a.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno DESC").fetchall()
        b.execute("BEGIN IMMEDIATE")
        b.executemany(
            "INSERT INTO sqlite_dbpage(pgno, data) VALUES(?, ?)",
            [(int(n), wal_page1(d) if n == 1 else bytes(d)) for n, d in rows],
        )
        b.execute("COMMIT")

    a.executemany("INSERT INTO t VALUES(randomblob(100))", [()] * 10)
    copy()
    assert b.execute("SELECT count(*) FROM t").fetchone()[0] == 10
    a.execute("INSERT INTO t VALUES(1)")
    copy()
    stale = b.execute("SELECT count(*) FROM t").fetchone()[0]
    fresh = connect(dst)
    assert fresh.execute("SELECT count(*) FROM t").fetchone()[0] == 11
    b.execute("PRAGMA shrink_memory")
    assert b.execute("SELECT count(*) FROM t").fetchone()[0] == 11
    assert stale == 10  # the surprise
    for c in (a, b, fresh):
        c.close()


# -- following a primary ---------------------------------------------------------------------


@pytest.mark.parametrize("auto_vacuum", ["NONE", "FULL"])
def test_replica_follows_a_random_workload_page_for_page(
    auto_vacuum: str, tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    primary = Primary(tmp_path, auto_vacuum=auto_vacuum)  # FULL: every delete shrinks
    try:
        follow_workload(primary, tmp_path, replicas)
    finally:
        primary.close()


def follow_workload(primary: Primary, tmp_path: Path, replicas: list[ReplicaDatabase]) -> None:
    replica = open_replica(node(tmp_path), replicas)
    assert replica.pos == Pos(0, 0) and replica.problem is None
    work = Workload(primary, seed=7)
    rng = random.Random(11)
    applied = ship(primary, replica)
    shrinks = 0
    for i in range(220):
        work.step()
        before = replica.page_count
        if rng.random() < 0.6:  # sometimes several transactions in one file
            applied += ship(primary, replica)
        if i % 55 == 54:
            applied += ship(primary, replica)
            assert_replica_equals_primary(replica, primary)
        shrinks += replica.page_count < before
    applied += ship(primary, replica)
    assert applied > 100 and shrinks >= 3
    assert_replica_equals_primary(replica, primary)
    assert journal_mode(replica.path) == "wal"
    # The replica kept every file it applied, in the primary's layout: a chain to its pos.
    assert replica.log.pos == replica.pos
    assert [p.name for _, _, p in replica.log] == [p.name for _, _, p in primary.log]
    for (_, _, mine), (_, _, theirs) in zip(replica.log, primary.log, strict=True):
        assert mine.read_bytes() == theirs.read_bytes()


def test_files_too_large_to_keep_decoded_are_decoded_again_for_the_write(
    tmp_path: Path, replicas: list[ReplicaDatabase], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past _KEEP_DECODED bytes the pages are not held: the write decodes the file again
    # (a 1 GB snapshot). Here every file with more than one page takes that path.
    monkeypatch.setattr(sidecar.apply, "_KEEP_DECODED", 1)
    primary = Primary(tmp_path)
    try:
        follow_workload(primary, tmp_path, replicas)
    finally:
        primary.close()


class ChangingFile(io.BytesIO):
    """A file whose bytes are replaced once they have been read to the end: what a
    second decode would meet if the file changed between the check and the write."""

    def __init__(self, first: bytes, then: bytes) -> None:
        super().__init__(first)
        self._then: bytes | None = then

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        if not data and self._then is not None:
            position = self.tell()
            self.seek(0)
            self.write(self._then)
            self.seek(position)
            self._then = None
        return data


@pytest.mark.parametrize("empty", [True, False], ids=["empty-replica", "replica-with-pages"])
def test_a_large_snapshot_is_checked_as_it_is_written_and_a_bad_one_writes_nothing(
    empty: bool,
    primary: Primary,
    tmp_path: Path,
    replicas: list[ReplicaDatabase],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A snapshot larger than _KEEP_DECODED is decoded once, by the write; its checks run
    # before COMMIT. A bad one is rolled back: the replica is as it was.
    monkeypatch.setattr(sidecar.apply, "_KEEP_DECODED", 1)
    replica = open_replica(node(tmp_path), replicas)
    primary.sql("CREATE TABLE t(v)", f"INSERT INTO t SELECT randomblob(3000) FROM {series(60)}")
    stale = io.BytesIO()
    if not empty:
        ship(primary, replica)
        primary.tailer.snapshot_to(stale)  # at the replica's TXID: does not move its log
        primary.sql(f"INSERT INTO t SELECT randomblob(3000) FROM {series(60)}")
    good, pos = snapshot_now(primary)
    observer = connect(replica.path)
    before = observe(replica, observer)
    bad = {
        "flipped bit": (flip_bit(good, len(good) // 2), "checksum"),
        "truncated": (good[: len(good) - 40], "end of file"),
    }
    if not empty:
        bad["not past the log"] = (stale.getvalue(), "log refuses")
    for what, (data, reason) in bad.items():
        with pytest.raises(ApplyError, match=reason):
            replica.apply(io.BytesIO(data), path=what)
        assert observe(replica, observer) == before, what
        assert integrity(replica.path) == "ok"
    observer.close()
    assert replica.apply(io.BytesIO(good)) == pos
    assert_replica_equals_primary(replica, primary)


@pytest.mark.parametrize("held", [True, False], ids=["write-lock-held", "not-held"])
def test_the_first_snapshot_is_written_once_and_is_not_taken_for_a_local_write(
    held: bool,
    primary: Primary,
    tmp_path: Path,
    replicas: list[ReplicaDatabase],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Into a database with no pages, the snapshot's transaction runs in rollback-journal
    # mode (each page written once, no WAL) and its page 1 turns on WAL mode, which
    # changes data_version: that must not cost a scan of every page, as a local write
    # would; a real one just after is still caught.
    replica = open_replica(node(tmp_path), replicas)
    if held:
        replica.hold_write_lock()
    primary.sql("CREATE TABLE t(v)", f"INSERT INTO t SELECT randomblob(3000) FROM {series(20)}")
    scans = 0
    difference = ReplicaDatabase._difference

    def counted(self: ReplicaDatabase) -> str | None:
        nonlocal scans
        scans += 1
        return difference(self)

    monkeypatch.setattr(ReplicaDatabase, "_difference", counted)
    snapshot, *rest = primary.new_files(0)
    assert ltx.parse_filename(snapshot.name)[0] == 1
    apply_path(replica, snapshot)
    wal = Path(f"{replica.path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert not replica.detect_local_writes() and scans == 0
    for path in rest:
        apply_path(replica, path)
    assert journal_mode(replica.path) == "wal"
    assert_replica_equals_primary(replica, primary)
    scans = 0
    if held:
        replica.release_write_lock()
    local = connect(replica.path)
    local.execute("INSERT INTO t VALUES ('local')")
    local.close()
    assert replica.detect_local_writes() and scans == 1


def test_a_failed_apply_leaves_no_large_wal_behind(
    primary: Primary,
    tmp_path: Path,
    replicas: list[ReplicaDatabase],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A snapshot that fails late (here a flipped bit, found by its write; on a full disk,
    # ENOSPC) has put its pages in the replica's WAL before the rollback: that space is
    # given back at once, or every later attempt has less of it.
    monkeypatch.setattr(sidecar.apply, "_KEEP_DECODED", 1)
    monkeypatch.setattr(sidecar.apply, "_WAL_SIZE_LIMIT", 64 * 1024)
    replica = open_replica(node(tmp_path), replicas)
    replica.hold_write_lock()
    primary.sql("CREATE TABLE t(v)")
    ship(primary, replica)
    primary.sql(f"INSERT INTO t SELECT randomblob(3000) FROM {series(600)}")
    good, _ = snapshot_now(primary)
    wal = Path(f"{replica.path}-wal")
    with pytest.raises(ApplyError, match="invalid LTX file"):  # in its last pages: the
        replica.apply(io.BytesIO(flip_bit(good, -100)), path="flipped")  # rest in the WAL
    assert wal.stat().st_size <= 64 * 1024
    assert replica.write_lock_held
    replica.apply(io.BytesIO(good))
    assert_replica_equals_primary(replica, primary)


def test_a_large_received_file_is_moved_into_the_log_not_copied(
    primary: Primary, tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    replica = open_replica(node(tmp_path), replicas)
    primary.sql("CREATE TABLE t(v)", f"INSERT INTO t SELECT randomblob(3000) FROM {series(600)}")
    primary.new_files(0)  # the tailer is at the end: a snapshot of now is at its TXID
    snapshot = tmp_path / "snapshot.ltx"
    assert primary.log.pos is not None
    snapshot_database(primary.db, snapshot, txid=primary.log.pos.txid, node_id=1)
    incoming = tmp_path / "replica" / "incoming"
    with Spool(incoming, max_memory=1 << 20) as spool:
        spool.write(snapshot.read_bytes())
        assert spool.on_disk and os.listdir(incoming) == []  # unnamed until linked
        spool.seek(0)
        replica.apply(spool, path="snapshot")
        spool.seek(0)
        (_, _, logged) = list(replica.log)[-1]
        assert logged.stat().st_ino == os.fstat(spool.fileno()).st_ino
    assert logged.read_bytes() == snapshot.read_bytes()
    assert_replica_equals_primary(replica, primary)


def test_replica_applies_v1_files_as_it_does_v3_files(
    primary: Primary, tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    """Files in the v1 format (what LiteFS peers write) apply as v3 files do."""
    replica = open_replica(node(tmp_path), replicas)
    primary.sql("CREATE TABLE t(v)")
    primary.sql(f"INSERT INTO t SELECT randomblob(2000) FROM {series(60)}")
    for path in primary.new_files(0):
        out = io.BytesIO()
        with path.open("rb") as f:
            decoder = ltx.open_decoder(f, path=str(path))
            encoder = Encoder(out, decoder.header, version=ltx.Version.V1)
            for pgno, data in decoder.pages():
                encoder.write_page(pgno, data)
            assert decoder.trailer is not None
            encoder.finish(decoder.trailer.post_apply_checksum)
        out.seek(0)
        assert replica.apply(out) == file_pos(path)
    assert_replica_equals_primary(replica, primary)


def test_readers_on_the_replica_see_whole_transactions(
    primary: Primary, tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    primary.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    replica = open_replica(node(tmp_path), replicas)
    ship(primary, replica)
    files: list[Path] = []
    rng = random.Random(3)
    for _ in range(150):  # each transaction: one row (several pages) and the counter
        primary.sql(
            "INSERT INTO t(v) VALUES(?)",
            "UPDATE counter SET n = n + 1 WHERE id = 1",
            params=(rng.randbytes(rng.randrange(500, 9000)),),
        )
        if rng.random() < 0.1:
            primary.sql(
                "DELETE FROM t WHERE id % 7 = 0", "UPDATE counter SET n = (SELECT count(*) FROM t)"
            )
        primary.tailer.sync()  # one file per transaction
    files = primary.new_files(replica.pos.txid)
    assert len(files) > 100

    stop = threading.Event()
    seen: list[int] = []
    errors: list[str] = []

    def reader() -> None:
        conn = connect(replica.path, readonly=True)
        try:
            while not stop.is_set():
                conn.execute("BEGIN")
                count = conn.execute("SELECT count(*) FROM t").fetchone()[0]
                n = conn.execute("SELECT n FROM counter WHERE id = 1").fetchone()[0]
                size = conn.execute("SELECT sum(length(v)) FROM t").fetchone()[0]
                conn.execute("COMMIT")
                if count != n:
                    errors.append(f"count {count} != counter {n}")
                if count and not size:
                    errors.append("rows without data")
                seen.append(n)
        except Exception as exc:  # a torn page would show up as "malformed"
            errors.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for path in files:
            apply_path(replica, path)
            time.sleep(0.0005)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    assert len(set(seen)) > 10, f"readers saw only {len(set(seen))} states"
    assert_replica_equals_primary(replica, primary)


# -- files that must not apply ---------------------------------------------------------------


def reencode(path: Path, **changes: int) -> bytes:
    """The file with header fields changed (and a valid file checksum)."""
    out = io.BytesIO()
    with path.open("rb") as f:
        decoder = ltx.open_decoder(f, path=str(path))
        encoder = Encoder(out, decoder.header.with_(**changes))
        for pgno, data in decoder.pages():
            encoder.write_page(pgno, data)
        assert decoder.trailer is not None
        encoder.finish(decoder.trailer.post_apply_checksum)
    return out.getvalue()


@dataclass
class Observed:
    pos: Pos
    pos_file: bytes | None
    data_version: int
    pages: list[bytes]
    log_files: list[str]


def observe(replica: ReplicaDatabase, observer: Any) -> Observed:
    return Observed(
        replica.pos,
        read_pos_file(replica),
        int(observer.execute("PRAGMA data_version").fetchone()[0]),
        db_pages(replica.path),
        sorted(os.listdir(replica.log.directory)),
    )


def test_replica_rejects_ltx_with_wrong_pre_apply_checksum(
    primary: Primary, tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    replica = open_replica(node(tmp_path), replicas)
    primary.sql("CREATE TABLE t(v)")
    ship(primary, replica)
    primary.sql("INSERT INTO t VALUES(randomblob(5000))")
    (path,) = primary.new_files(replica.pos.txid)
    observer = connect(replica.path)
    before = observe(replica, observer)
    bad = reencode(path, pre_apply_checksum=ltx.CHECKSUM_FLAG | 0x1234)
    with pytest.raises(PositionMismatch, match="pre-apply checksum") as mismatch:
        replica.apply(io.BytesIO(bad), path="bad.ltx")
    assert not isinstance(mismatch.value, NotNext)  # a copy in doubt: resync
    assert observe(replica, observer) == before
    # A file that skips a TXID does not apply either; the copy is not in doubt (the
    # caller asks again from its position instead of resyncing).
    primary.sql("INSERT INTO t VALUES(1)")
    (later,) = primary.new_files(file_pos(path).txid)
    with pytest.raises(NotNext, match="starts at TXID"):
        apply_path(replica, later)
    assert observe(replica, observer) == before and replica.problem is None
    # The right file still applies afterwards.
    apply_path(replica, path)
    apply_path(replica, later)
    assert_replica_equals_primary(replica, primary)
    observer.close()


def test_replica_rejects_corrupt_ltx_files_and_writes_nothing(
    primary: Primary,
    tmp_path: Path,
    replicas: list[ReplicaDatabase],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    replica = open_replica(node(tmp_path), replicas)
    primary.sql("CREATE TABLE t(v)")
    ship(primary, replica)
    primary.sql(f"INSERT INTO t SELECT randomblob(3000) FROM {series(30)}")
    (path,) = primary.new_files(replica.pos.txid)
    good = path.read_bytes()
    observer = connect(replica.path)
    before = observe(replica, observer)
    corrupt = {
        "flipped bit": flip_bit(good, len(good) // 2),
        "truncated": good[: len(good) - 40],
        "not LTX": b"hello" * 50,
        "wrong post-apply checksum": good[:-16]
        + Trailer(ltx.CHECKSUM_FLAG | 0x77, 0).to_bytes()[:8]
        + good[-8:],
    }
    for what, data in corrupt.items():
        with pytest.raises(ApplyError) as info:
            replica.apply(io.BytesIO(data), path=what)
        assert not isinstance(info.value, PositionMismatch), what
        assert observe(replica, observer) == before, what
    # A file whose pages do not turn the replica into its post-apply checksum: rejected
    # by the prediction, before anything is written.
    out = io.BytesIO()
    header, trailer = ends(path)
    encoder = Encoder(out, header)
    with path.open("rb") as f:
        pages = list(ltx.open_decoder(f).pages())
    assert len(pages) > 3
    for pgno, data in pages:
        encoder.write_page(pgno, data if pgno != pages[-1][0] else bytes(len(data)))
    encoder.finish(trailer.post_apply_checksum)
    with pytest.raises(ApplyError, match="would give checksum"):
        replica.apply(io.BytesIO(out.getvalue()), path="lying.ltx")
    assert observe(replica, observer) == before
    # A large file is decoded again for its write: one that changed since its check
    # fails the file checksum then, inside the transaction: nothing is committed.
    monkeypatch.setattr(sidecar.apply, "_KEEP_DECODED", 1)
    with pytest.raises(ApplyError, match="checksum"):
        replica.apply(ChangingFile(good, flip_bit(good, len(good) // 2)), path="changing")
    assert observe(replica, observer) == before
    apply_path(replica, path)
    assert_replica_equals_primary(replica, primary)
    observer.close()


# -- snapshots, shrinking, page 1 ------------------------------------------------------------


def test_snapshot_over_a_diverged_replica_makes_it_equal(
    tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    a = Primary(tmp_path / "a")
    b = Primary(tmp_path / "b", page_size=8192)
    try:
        replica = open_replica(node(tmp_path), replicas)
        wa, wb = Workload(a, seed=1), Workload(b, seed=2)
        for _ in range(20):
            wa.step()
        ship(a, replica)
        for _ in range(40):
            wb.step()
        b.tailer.sync()
        # The replica followed A; B is another history (and page size) at a later TXID.
        assert b.log.pos is not None and b.log.pos.txid > replica.pos.txid
        snapshot = io.BytesIO()
        pos = b.tailer.snapshot_to(snapshot)
        # Changing the page size needs every other connection closed: refused, unchanged.
        reader = connect(replica.path, readonly=True)
        reader.execute("SELECT count(*) FROM counter").fetchone()
        before = replica.pos
        snapshot.seek(0)
        with pytest.raises(ApplyError, match="other connection"):
            replica.apply(snapshot)
        assert replica.pos == before and replica.problem is None
        assert replica.verify() is None
        reader.close()
        snapshot.seek(0)
        assert replica.apply(snapshot) == pos
        assert_replica_equals_primary(replica, b)
        # The replica's log is now B's history from the snapshot on; B's next files apply.
        assert [mn for mn, _, _ in replica.log] == [1]
        wb.step()
        ship(b, replica)
        assert_replica_equals_primary(replica, b)
        # Back to A's page size with a snapshot of A over B's content, same page size now.
        for _ in range(40):
            wa.step()
        a.tailer.sync()
        snapshot = io.BytesIO()
        pos = a.tailer.snapshot_to(snapshot)
        snapshot.seek(0)
        replica.apply(snapshot)
        assert_replica_equals_primary(replica, a)
    finally:
        a.close()
        b.close()


def test_shrinking_truncates_the_replica_file(
    primary: Primary, tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    replica = open_replica(node(tmp_path), replicas)
    primary.sql("CREATE TABLE t(v)")
    primary.sql(f"INSERT INTO t SELECT randomblob(3500) FROM {series(400)}")
    ship(primary, replica)
    big = replica.page_count
    assert big > 400
    primary.sql("DELETE FROM t WHERE rowid > 10")
    primary.app.execute("VACUUM")
    ship(primary, replica)
    assert replica.page_count < 20
    assert_replica_equals_primary(replica, primary)
    replica.checkpoint("TRUNCATE")
    assert replica.path.stat().st_size == replica.page_count * replica.page_size
    assert not replica.detect_local_writes()  # our own checkpoint is not a local write


def test_page1_keeps_wal_mode_and_the_logical_image(
    tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    """A snapshot of a rollback-mode database (bytes 18-19 = 1): the replica stays in WAL
    mode, and its position still comes from the file's page 1 as it is."""
    src = tmp_path / "rollback.db"
    conn = connect(src)
    conn.execute("CREATE TABLE t(v)")
    conn.executemany("INSERT INTO t VALUES(?)", [(i,) for i in range(500)])
    pages = [bytes(r[0]) for r in conn.execute("SELECT data FROM sqlite_dbpage ORDER BY pgno")]
    conn.close()
    assert pages[0][18:20] == b"\x01\x01"
    out = io.BytesIO()
    encoder = Encoder(out, Header(page_size=4096, commit=len(pages), min_txid=1, max_txid=1))
    for i, page in enumerate(pages):
        encoder.write_page(i + 1, page)
    trailer = encoder.finish(ltx.database_checksum((i + 1, p) for i, p in enumerate(pages)))
    n = node(tmp_path)
    replica = open_replica(n, replicas)
    out.seek(0)
    assert replica.apply(out) == Pos(1, trailer.post_apply_checksum)
    assert journal_mode(replica.path) == "wal"
    physical = db_pages(replica.path)[0]
    assert physical[18:20] == b"\x02\x02"
    assert physical != wal_page1(pages[0])  # stamped by SQLite on commit ...
    assert mask_stamped(physical) == mask_stamped(wal_page1(pages[0]))  # ... only there
    assert content(replica.path)["t"] == [(i,) for i in range(500)]
    # The page1 file holds the logical image, as the file gave it.
    stored = (n.ltx_dir.parent / "page1").read_bytes()
    assert stored.startswith(PAGE1_MAGIC) and stored.endswith(pages[0])
    replica.close()
    again = open_replica(n, replicas)
    assert again.problem is None and again.pos == Pos(1, trailer.post_apply_checksum)


def test_pos_file_holds_txid_and_checksum(
    primary: Primary, tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    replica = open_replica(node(tmp_path), replicas)
    assert not replica.pos_path.exists()  # no position yet: no file
    primary.sql("CREATE TABLE t(v)")
    ship(primary, replica)
    data = read_pos_file(replica)
    assert data is not None and len(data) == 34
    assert data == f"{replica.pos.txid:016x}/{replica.pos.post_apply_checksum:016x}\n".encode()
    assert Pos.parse(data.decode()) == replica.pos == primary.log.pos
    assert not [n for n in os.listdir(replica.path.parent) if ".tmp-" in n]


def test_a_copy_reopened_without_its_log_keeps_its_pos_file(
    primary: Primary, tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    """A replica that drops its history for a snapshot must not tell readers of the
    -pos file that it went back to TXID 0 (found by the chaos suite)."""
    where = node(tmp_path)
    replica = open_replica(where, replicas)
    primary.sql("CREATE TABLE t(v)")
    ship(primary, replica)
    before = read_pos_file(replica)
    replica.close()
    for path in replica.log.directory.iterdir():
        path.unlink()
    again = open_replica(where, replicas)
    assert again.pos.txid == 0
    assert read_pos_file(again) == before


def test_snapshot_that_does_not_move_the_log_forward_is_refused_before_writing(
    primary: Primary, tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    """LTXLog takes a snapshot only past its last TXID, so a snapshot at the replica's own
    TXID (a resync of a diverged replica at the same TXID) is refused, with nothing
    written: the log needs a way to restart before such a resync can use a snapshot."""
    replica = open_replica(node(tmp_path), replicas)
    primary.sql("CREATE TABLE t(v)")
    ship(primary, replica)
    snapshot = io.BytesIO()
    assert primary.tailer.snapshot_to(snapshot) == replica.pos
    observer = connect(replica.path)
    before = observe(replica, observer)
    snapshot.seek(0)
    with pytest.raises(ApplyError, match="log refuses"):
        replica.apply(snapshot)
    assert observe(replica, observer) == before
    observer.close()


def test_files_without_checksums_apply_and_the_replica_computes_its_checksum(
    tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    """Litestream writes FLAG_NO_CHECKSUM files: no pre/post checks are possible, the
    position's checksum is the one the replica computes from the pages."""
    src = tmp_path / "src.db"
    conn = connect(src)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(v)")
    first = [bytes(r[0]) for r in conn.execute("SELECT data FROM sqlite_dbpage ORDER BY pgno")]
    conn.executemany("INSERT INTO t VALUES(?)", [(i,) for i in range(300)])
    second = [bytes(r[0]) for r in conn.execute("SELECT data FROM sqlite_dbpage ORDER BY pgno")]
    conn.close()

    def encode(pages: list[tuple[int, bytes]], commit: int, txid: int) -> io.BytesIO:
        out = io.BytesIO()
        header = Header(
            page_size=4096,
            commit=commit,
            min_txid=txid,
            max_txid=txid,
            flags=ltx.FLAG_NO_CHECKSUM,
        )
        encoder = Encoder(out, header)
        for pgno, data in pages:
            encoder.write_page(pgno, data)
        encoder.finish(0)
        out.seek(0)
        return out

    n = node(tmp_path)
    replica = open_replica(n, replicas)
    replica.apply(encode(list(enumerate(first, 1)), len(first), 1))
    changed = [(i, p) for i, p in enumerate(second, 1) if i > len(first) or p != first[i - 1]]
    pos = replica.apply(encode(changed, len(second), 2))
    want = ltx.database_checksum(enumerate(second, 1))
    assert pos == Pos(2, want) and replica.checksum == want
    assert content(replica.path)["t"] == [(i,) for i in range(300)]
    replica.close()
    again = open_replica(n, replicas)
    assert again.problem is None and again.pos == pos


# -- restarts --------------------------------------------------------------------------------


def test_restart_resumes_at_the_same_position(
    primary: Primary, tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    n = node(tmp_path)
    replica = open_replica(n, replicas)
    work = Workload(primary, seed=5)
    for _ in range(40):
        work.step()
    ship(primary, replica)
    pos = replica.pos
    replica.close()
    again = open_replica(n, replicas)
    assert again.problem is None
    assert again.pos == pos == again.log.pos
    assert again.checksum == again.log.pos.post_apply_checksum
    assert read_pos_file(again) == f"{pos}\n".encode()
    work.step()
    ship(primary, again)
    assert_replica_equals_primary(again, primary)
    # Without the page1 file, page 1 comes from the newest log file that holds it.
    again.close()
    (n.ltx_dir.parent / "page1").unlink()
    third = open_replica(n, replicas)
    assert third.problem is None and third.pos == primary.log.pos
    assert (n.ltx_dir.parent / "page1").exists()  # written again from the log's page 1


def holds_page1(path: Path) -> bool:
    with path.open("rb") as f:
        return any(pgno == 1 for pgno, _ in ltx.open_decoder(f).pages())


def test_restart_reports_a_database_that_does_not_match_its_log(
    primary: Primary, tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    n = node(tmp_path)
    replica = open_replica(n, replicas)
    primary.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    primary.sql(f"INSERT INTO t(v) SELECT 'x' FROM {series(50)}")
    ship(primary, replica)
    primary.sql("UPDATE t SET v = 'y' WHERE id = 3")  # page 1 unchanged
    ship(primary, replica)
    pos = replica.pos
    replica.close()

    # Edited behind its back while the sidecar was down.
    app = connect(n.db)
    app.execute("UPDATE t SET v = 'local' WHERE id = 5")
    app.close()
    edited = open_replica(n, replicas)
    assert "checksum" in (problem(edited) or "")
    assert edited.pos == pos
    primary.sql("UPDATE t SET v = 'z' WHERE id = 4")
    (path,) = primary.new_files(pos.txid)
    with pytest.raises(PositionMismatch):
        apply_path(edited, path)
    edited.close()

    # Neither the page1 file nor a log file holds page 1 (retention took the snapshot).
    m = node(tmp_path, "second")
    second = open_replica(m, replicas)
    for _, _, p in primary.log:
        apply_path(second, p)
    second.close()
    # Retention-like: remove the oldest files up to the last one holding page 1.
    kept = [p for _, _, p in LTXLog(m.ltx_dir)]
    last_with_page1 = max(i for i, p in enumerate(kept) if holds_page1(p))
    assert last_with_page1 < len(kept) - 1
    for p in kept[: last_with_page1 + 1]:
        p.unlink()
    (m.ltx_dir.parent / "page1").unlink()
    lost = open_replica(m, replicas)
    assert "page 1" in (problem(lost) or "")
    # A snapshot puts it right.
    snapshot = io.BytesIO()
    primary.sql("UPDATE t SET v = 'w' WHERE id = 6")
    primary.tailer.sync()
    primary.tailer.snapshot_to(snapshot)
    snapshot.seek(0)
    lost.apply(snapshot)
    assert problem(lost) is None
    assert_replica_equals_primary(lost, primary)


# -- local writes ----------------------------------------------------------------------------


def test_write_lock_makes_local_writes_fail_and_a_landed_write_is_detected(
    primary: Primary, tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    replica = open_replica(node(tmp_path), replicas)
    primary.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    ship(primary, replica)
    replica.hold_write_lock()
    assert replica.write_lock_held
    app = connect(replica.path, timeout=0.05)
    with pytest.raises(sqlean.OperationalError, match="database is locked"):
        app.execute("INSERT INTO t(v) VALUES('local')")
    # Applies go on while the lock is held, and it is held again afterwards.
    primary.sql("INSERT INTO t(v) VALUES('primary')")
    ship(primary, replica)
    assert replica.write_lock_held
    with pytest.raises(sqlean.OperationalError, match="database is locked"):
        app.execute("INSERT INTO t(v) VALUES('local')")
    assert app.execute("SELECT v FROM t").fetchall() == [("primary",)]  # reads work
    assert not replica.detect_local_writes()

    # An app's checkpoint changes PRAGMA data_version too; it is not a write.
    replica.release_write_lock()
    app.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert not replica.detect_local_writes()
    assert replica.problem is None

    # Without the lock a write lands, and is detected.
    app.execute("INSERT INTO t(v) VALUES('local')")
    assert replica.detect_local_writes()
    assert "another connection" in (problem(replica) or "")
    primary.sql("INSERT INTO t(v) VALUES('primary 2')")
    (path,) = primary.new_files(replica.pos.txid)
    observer = connect(replica.path)
    before = observe(replica, observer)
    with pytest.raises(LocalWriteError):
        apply_path(replica, path)
    assert observe(replica, observer) == before
    # A write that lands just before an apply (not yet polled) is caught by the apply.
    replica2 = open_replica(node(tmp_path, "r2"), replicas)
    for p in primary.new_files(0)[:-1]:
        apply_path(replica2, p)
    app2 = connect(replica2.path)
    app2.execute("INSERT INTO t(v) VALUES('sneaky')")
    with pytest.raises(LocalWriteError):
        apply_path(replica2, path)
    # A snapshot from the primary ends the divergence.
    primary.sql("INSERT INTO t(v) VALUES('primary 3')")
    primary.tailer.sync()
    snapshot = io.BytesIO()
    primary.tailer.snapshot_to(snapshot)
    for r in (replica, replica2):
        snapshot.seek(0)
        r.apply(snapshot)
        assert r.problem is None and not r.detect_local_writes()
        assert_replica_equals_primary(r, primary)
    for c in (app, app2, observer):
        c.close()


# -- deletion --------------------------------------------------------------------------------


def test_deletion_empties_the_replica_and_a_new_database_follows(
    primary: Primary, tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    n = node(tmp_path)
    replica = open_replica(n, replicas)
    keeper = open_replica(node(tmp_path, "keeper"), replicas)  # never removes its files
    primary.sql("CREATE TABLE t(v)")
    primary.sql(f"INSERT INTO t SELECT randomblob(2000) FROM {series(100)}")
    ship(primary, replica)
    for _, _, path in primary.log:
        apply_path(keeper, path)
    reader = connect(replica.path, readonly=True)
    assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 100
    # The app deletes the primary database.
    primary.app.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{primary.db}{suffix}").unlink(missing_ok=True)
    files = primary.new_files(replica.pos.txid)
    assert ends(files[-1])[0].commit == 0
    for path in files:
        apply_path(replica, path)
        apply_path(keeper, path)
    assert replica.deleted and keeper.deleted
    assert replica.pos == Pos(ends(files[-1])[0].max_txid, EMPTY_DB_CHECKSUM)
    assert read_pos_file(replica) == f"{replica.pos}\n".encode()
    # A reader that had the database open sees an empty database, not a broken one.
    with pytest.raises(sqlean.OperationalError, match="no such table"):
        reader.execute("SELECT count(*) FROM t")
    assert reader.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0] == 0
    reader.close()
    assert integrity(replica.path) == "ok"
    assert journal_mode(replica.path) == "wal"
    assert not replica.detect_local_writes()
    # The caller removes the files; a reopened replica is at the deletion.
    replica.close()
    remove_database_files(replica.path)
    assert not replica.path.exists()
    again = open_replica(n, replicas)
    assert again.deleted and again.problem is None and again.pos == replica.pos
    # The database comes back on the primary: a snapshot.
    primary.app = connect(primary.db)
    primary.app.execute("PRAGMA journal_mode=WAL")
    primary.sql("CREATE TABLE back(v)")
    primary.sql("INSERT INTO back VALUES('again')")
    ship(primary, again)
    assert not deleted(again)
    assert content(again.path)["back"] == [("again",)]
    assert_replica_equals_primary(again, primary)
    for path in primary.new_files(keeper.pos.txid):  # over the emptied database
        apply_path(keeper, path)
    assert_replica_equals_primary(keeper, primary)


def test_empty_page1_is_a_valid_empty_database(tmp_path: Path) -> None:
    for size, reserved in ((512, 0), (4096, 0), (4096, 8), (65536, 0)):
        db = tmp_path / f"empty{size}-{reserved}.db"
        db.write_bytes(empty_page1(size, schema_cookie=7, reserved=reserved, wal=False))
        assert integrity(db) == "ok"
        conn = connect(db)
        assert conn.execute("PRAGMA page_size").fetchone()[0] == size
        conn.execute("CREATE TABLE t(v)")  # usable as a database
        conn.close()
        assert integrity(db) == "ok"


def test_empty_replica_takes_the_page_size_of_its_first_snapshot(
    tmp_path: Path, replicas: list[ReplicaDatabase]
) -> None:
    source = Primary(tmp_path / "src", page_size=1024)
    try:
        n = node(tmp_path)
        replica = open_replica(n, replicas)
        assert replica.path.exists() and replica.path.stat().st_size == 0  # no pages yet
        source.sql("CREATE TABLE t(v)")
        source.sql(f"INSERT INTO t SELECT randomblob(900) FROM {series(50)}")
        ship(source, replica)
        assert replica.page_size == 1024
        assert journal_mode(replica.path) == "wal"
        assert_replica_equals_primary(replica, source)
        fresh = open_replica(node(tmp_path, "other"), replicas)
        source.sql("INSERT INTO t VALUES(1)")
        (path,) = source.new_files(replica.pos.txid)
        with pytest.raises(PositionMismatch):  # an incremental cannot start a replica
            apply_path(fresh, path)
        assert fresh.path.stat().st_size == 0
    finally:
        source.close()


# -- crashes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A primary's files: a snapshot, small files, one big file (~12 MB of pages), one more."""
    root = tmp_path_factory.mktemp("crash")
    p = Primary(root)
    try:
        p.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        p.sql(f"INSERT INTO t(v) SELECT randomblob(3000) FROM {series(200)}")
        p.tailer.sync()
        p.sql("UPDATE t SET v = randomblob(3000) WHERE id % 3 = 0")
        p.tailer.sync()
        p.sql(f"INSERT INTO t(v) SELECT randomblob(4000) FROM {series(3000)}")
        p.tailer.sync()
        p.sql("DELETE FROM t WHERE id % 2 = 0 AND id < 100")
        p.tailer.sync()
        files = [path for _, _, path in p.log]
    finally:
        p.close()
    assert [is_big(f) for f in files].count(True) == 1 and not is_big(files[-1])
    return files


def is_big(path: Path) -> bool:
    return path.stat().st_size > BIG


def run_child(mode: str, n: Node, files: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE), mode, str(n.db), str(n.ltx_dir), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def kill_at(child: subprocess.Popen[str], marker: str, delay: float = 0.0) -> None:
    assert child.stdout is not None
    deadline = time.monotonic() + CHILD_TIMEOUT
    while True:
        line = child.stdout.readline()
        assert line, f"child ended early:\n{child.stderr.read() if child.stderr else ''}"
        if line.strip() == marker:
            break
        assert time.monotonic() < deadline
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=CHILD_TIMEOUT)
    for stream in (child.stdout, child.stderr):
        if stream is not None:
            stream.close()


@pytest.mark.parametrize(
    ("mode", "delay", "expect"),
    [
        ("pause-writing", 0.0, "old"),  # pages half written (spilled into the WAL)
        ("pause-appended", 0.0, "new"),  # in the log, not committed: applied again at open
        ("pause-committed", 0.0, "new"),  # committed; page1 and -pos files not yet written
        ("timed", 0.02, "either"),
        ("timed", 0.08, "either"),
        ("timed", 0.25, "either"),
    ],
)
def test_killed_in_the_middle_of_an_apply_restarts_at_the_old_or_new_position(
    crash_files: list[Path],
    tmp_path: Path,
    mode: str,
    delay: float,
    expect: str,
    replicas: list[ReplicaDatabase],
) -> None:
    n = node(tmp_path)
    big = next(i for i, f in enumerate(crash_files) if is_big(f))
    old, new = file_pos(crash_files[big - 1]), file_pos(crash_files[big])
    child = run_child(mode, n, crash_files)
    kill_at(child, "big", delay)
    replica = open_replica(n, replicas)
    assert replica.problem is None, replica.problem
    assert integrity(replica.path) == "ok"
    wanted = {"old": {old}, "new": {new}, "either": {old, new}}[expect]
    assert replica.pos in wanted
    assert replica.pos == replica.log.pos
    assert read_pos_file(replica) == f"{replica.pos}\n".encode()
    assert replica.verify() is None
    # It resumes: the rest of the files apply.
    for path in crash_files:
        if file_pos(path).txid > replica.pos.txid:
            apply_path(replica, path)
    assert replica.pos == file_pos(crash_files[-1])
    assert integrity(replica.path) == "ok"
    rows = content(replica.path)["t"]
    assert len(rows) == 3200 - 49 and all(int(str(r[0])) % 2 == 1 for r in rows[:50])
    assert replica.verify() is None


def child_main(argv: list[str]) -> int:
    """The applier in its own process: apply the files in order, pausing where told.

    Applies the files up to the big one. Prints ``big`` just before the big one is applied,
    or at the pause point inside it; the parent SIGKILLs it there.
    """
    import sidecar.apply as apply_mod

    mode, db, ltx_dir, *paths = argv
    pause = threading.Event()

    def hold(marker: str) -> None:
        print(marker, flush=True)
        pause.wait(CHILD_TIMEOUT)
        os._exit(3)  # the parent should have killed us

    if mode == "pause-writing":
        original_rows = apply_mod.ReplicaDatabase._rows

        def rows(self: ReplicaDatabase, p: Any, count: int) -> Iterator[Any]:
            for i, row in enumerate(original_rows(self, p, count)):
                if len(p.sums) > 1000 and i == len(p.sums) // 2:
                    hold("big")
                yield row

        apply_mod.ReplicaDatabase._rows = rows  # type: ignore[method-assign,assignment]
    elif mode == "pause-appended":
        original_append = LTXLog.append

        def append(self: LTXLog, data: Any, *, verify: bool = False, link: Any = None) -> Path:
            path = original_append(self, data, verify=verify, link=link)
            if is_big(path):
                hold("big")
            return path

        LTXLog.append = append  # type: ignore[method-assign]
    elif mode == "pause-committed":
        original_page1 = apply_mod.ReplicaDatabase._write_page1_file

        def write_page1(self: ReplicaDatabase, page1: bytes) -> None:
            if self.page_count > 3000:
                hold("big")
            original_page1(self, page1)

        apply_mod.ReplicaDatabase._write_page1_file = write_page1  # type: ignore[method-assign]
    replica = ReplicaDatabase(Path(db), LTXLog(Path(ltx_dir), clean=True))
    for path in map(Path, paths):
        if is_big(path) and mode == "timed":
            print("big", flush=True)
        with path.open("rb") as f:
            replica.apply(f, path=str(path))
        if is_big(path):
            break
    hold("applied")  # the timed kill may land here: the new position
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
