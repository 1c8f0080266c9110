"""Page-hash resync end to end, in one process: a real primary and a real replica.

The primary is a SQLite database written by a ``sqlean`` connection and followed by a
DatabaseTailer; the replica is a ReplicaDatabase. The replica's request body goes
through ``FrameDecoder("resync")`` (fed in odd-sized pieces, as off a socket) into a
ResyncBuilder reading from ``tailer.open_reader()``; its answer is applied with
``apply_resync``. Afterwards the replica must hold the primary's exact bytes (page 1
masked in the 12 bytes SQLite stamps), the primary's position, pass integrity_check,
and follow the primary's next LTX files.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlean

import ltx
from ltx import Header
from sidecar.apply import (
    ApplyError,
    LocalWriteError,
    PositionMismatch,
    ReplicaDatabase,
    mask_stamped,
    wal_page1,
)
from sidecar.frames import FrameDecoder, PageHashes, ResyncBegin
from sidecar.log import LTXLog
from sidecar.resync import ResyncBuilder, ResyncError, write_snapshot
from sidecar.tailer import DatabaseTailer, TailerOptions

EPOCH = 3
NODE = "replica-1"


def connect(path: Path, *, readonly: bool = False) -> Any:
    if readonly:
        return sqlean.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    return sqlean.connect(str(path), isolation_level=None, timeout=5.0)


class Primary:
    """A database written in this process and followed by a tailer."""

    def __init__(self, root: Path, *, page_size: int = 4096) -> None:
        self.db = root / "primary" / "app.db"
        self.db.parent.mkdir(parents=True, exist_ok=True)
        self.app = connect(self.db)
        self.app.execute(f"PRAGMA page_size={page_size}")
        self.app.execute("PRAGMA journal_mode=WAL")
        self.app.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)")
        self.log = LTXLog(root / "primary" / "ltx", clean=True)
        self.tailer = DatabaseTailer(
            "app.db", self.db, self.log, TailerOptions(passive_frames=200, node_id=7)
        )
        self.tailer.open()

    def sql(self, statement: str, params: tuple[object, ...] = ()) -> None:
        self.app.execute(statement, params)

    def fill(self, rows: int, size: int = 900) -> None:
        for _ in range(rows):
            self.sql("INSERT INTO t(v) VALUES (randomblob(?))", (size,))
        self.tailer.sync()

    @property
    def pos(self) -> ltx.Pos:
        assert self.log.pos is not None
        return self.log.pos

    def close(self) -> None:
        self.tailer.close()
        self.app.close()


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[Primary]:
    p = Primary(tmp_path)
    yield p
    p.close()


@pytest.fixture
def opened() -> Iterator[list[ReplicaDatabase]]:
    replicas: list[ReplicaDatabase] = []
    yield replicas
    for r in replicas:
        r.close()


def open_replica(root: Path, opened: list[ReplicaDatabase]) -> ReplicaDatabase:
    replica = ReplicaDatabase(root / "replica" / "app.db", LTXLog(root / "replica" / "ltx"))
    opened.append(replica)
    return replica


def ship(primary: Primary, replica: ReplicaDatabase) -> None:
    """Apply the primary's files after the replica's TXID (a snapshot for an empty one)."""
    primary.tailer.sync()
    files = primary.log.files_after(replica.pos.txid) if replica.pos.txid else None
    if files is None:
        out = io.BytesIO()
        primary.tailer.snapshot_to(out)
        out.seek(0)
        replica.apply(out)
        return
    for path in files:
        with path.open("rb") as f:
            replica.apply(f, path=str(path))


def follow(primary: Primary, replica: ReplicaDatabase) -> None:
    """Ship a snapshot, then an incremental file: the log does not end with a snapshot
    (which reopening would simply apply again over an edited file)."""
    ship(primary, replica)
    primary.fill(1)
    ship(primary, replica)


def db_pages(path: Path) -> list[bytes]:
    conn = connect(path, readonly=True)
    try:
        conn.execute("BEGIN")
        rows = conn.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno").fetchall()
        conn.execute("COMMIT")
    finally:
        conn.close()
    return [bytes(r[1]) for r in rows]


def integrity(path: Path) -> str:
    conn = connect(path, readonly=True)
    try:
        return "\n".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall())
    finally:
        conn.close()


def assert_same(replica: ReplicaDatabase, primary: Primary) -> None:
    """The replica holds the primary's bytes (page 1 masked), position and checksum."""
    want, got = db_pages(primary.db), db_pages(replica.path)
    assert len(got) == len(want), f"{len(got)} pages on the replica, {len(want)} on the primary"
    assert mask_stamped(got[0]) == mask_stamped(wal_page1(want[0]))
    for i in range(1, len(want)):
        assert got[i] == want[i], f"page {i + 1} differs"
    assert integrity(replica.path) == "ok"
    assert replica.pos == primary.pos
    assert replica.checksum == ltx.database_checksum((i + 1, p) for i, p in enumerate(want))
    assert replica.problem is None
    assert replica.verify() is None


def request(
    replica: ReplicaDatabase, per_frame: int = 65536
) -> tuple[ResyncBegin, list[PageHashes]]:
    """The replica's request body, decoded as a server would: in odd-sized pieces."""
    body = b"".join(replica.begin_resync(epoch=EPOCH, node_id=NODE, per_frame=per_frame))
    decoder = FrameDecoder("resync")
    frames = []
    for start in range(0, len(body), 777):
        frames.extend(decoder.feed(body[start : start + 777]))
    decoder.close()
    begin, hashes = frames[0], frames[1:]
    assert isinstance(begin, ResyncBegin)
    assert all(isinstance(f, PageHashes) for f in hashes)
    return begin, [f for f in hashes if isinstance(f, PageHashes)]


def answer(primary: Primary, begin: ResyncBegin, hashes: list[PageHashes]) -> bytes:
    out = io.BytesIO()
    with primary.tailer.open_reader() as reader:
        builder = ResyncBuilder(reader, begin, out, node_id=7)
        for frame in hashes:
            builder.add(frame)
        pos = builder.finish()
    assert pos == primary.pos
    return out.getvalue()


def resync(primary: Primary, replica: ReplicaDatabase, per_frame: int = 65536) -> Header:
    """One whole resync; returns the answer's header after checking the outcome."""
    begin, hashes = request(replica, per_frame)
    data = answer(primary, begin, hashes)
    assert replica.apply_resync(io.BytesIO(data), path="resync.ltx") == primary.pos
    assert_same(replica, primary)
    assert not replica.resync_pending and not replica.write_lock_held
    # The replica's log restarted with the answer alone.
    header = Header.from_bytes(data[:100])
    assert [(mn, mx) for mn, mx, _ in replica.log] == [(header.min_txid, header.max_txid)]
    return header


def pending(replica: ReplicaDatabase) -> tuple[bool, bool]:
    """(resync pending, write lock held); a function: mypy keeps narrowed properties."""
    return replica.resync_pending, replica.write_lock_held


def answer_pages(data: bytes) -> list[int]:
    return [pgno for pgno, _ in ltx.open_decoder(io.BytesIO(data)).pages()]


def state(replica: ReplicaDatabase) -> tuple[list[bytes], list[str], bytes, ltx.Pos]:
    """What must not change when an answer is refused."""
    return (
        db_pages(replica.path),
        sorted(p.name for p in replica.log.directory.iterdir()),
        Path(f"{replica.path}-pos").read_bytes(),
        replica.pos,
    )


def edit_behind_its_back(db: Path) -> None:
    conn = connect(db)
    try:
        conn.execute("UPDATE t SET v = zeroblob(900) WHERE id = 17")
    finally:
        conn.close()


# -- diverged replicas ------------------------------------------------------------------------


def test_edited_replica_resyncs_with_only_the_differing_pages(
    primary: Primary, tmp_path: Path, opened: list[ReplicaDatabase]
) -> None:
    primary.fill(300)
    replica = open_replica(tmp_path, opened)
    follow(primary, replica)
    replica.close()
    edit_behind_its_back(replica.path)
    replica = open_replica(tmp_path, opened)
    assert replica.problem is not None  # the file no longer matches its log
    primary.fill(3)  # and the primary moved on meanwhile
    assert len(db_pages(primary.db)) > 60
    header = resync(primary, replica, per_frame=7)  # many PAGE_HASHES frames
    assert not header.is_snapshot
    assert header.min_txid == header.max_txid == primary.pos.txid
    assert header.commit == len(db_pages(primary.db))
    # Page 1, the edited leaf and what the three new rows touched: a handful.
    data = answer(primary, *request(replica))
    assert answer_pages(data) == [1]  # already equal: page 1 only
    replica.abort_resync()
    # The replica follows the primary's next files, and reopens cleanly.
    primary.fill(5)
    ship(primary, replica)
    assert_same(replica, primary)
    replica.close()
    replica = open_replica(tmp_path, opened)
    assert_same(replica, primary)


def test_resync_sends_few_pages_for_a_small_divergence(
    primary: Primary, tmp_path: Path, opened: list[ReplicaDatabase]
) -> None:
    primary.fill(300)
    replica = open_replica(tmp_path, opened)
    follow(primary, replica)
    replica.close()
    edit_behind_its_back(replica.path)
    replica = open_replica(tmp_path, opened)
    data = answer(primary, *request(replica))
    pages = answer_pages(data)
    assert pages[0] == 1 and 2 <= len(pages) <= 3, pages
    assert replica.apply_resync(io.BytesIO(data)) == primary.pos
    assert_same(replica, primary)


def test_local_writes_are_undone_by_a_resync(
    primary: Primary, tmp_path: Path, opened: list[ReplicaDatabase]
) -> None:
    primary.fill(100)
    replica = open_replica(tmp_path, opened)
    ship(primary, replica)
    app = connect(replica.path)
    try:
        app.execute("INSERT INTO t(v) VALUES (randomblob(5000))")
        app.execute("CREATE TABLE local(x)")
        assert replica.detect_local_writes()
        primary.fill(2)
        with pytest.raises(LocalWriteError):
            ship(primary, replica)
        begin, hashes = request(replica)
        # The write lock is held from the hashing to the apply: app writes fail.
        with pytest.raises(sqlean.OperationalError, match="locked"):
            app.execute("INSERT INTO t(v) VALUES (1)")
        data = answer(primary, begin, hashes)
        replica.apply_resync(io.BytesIO(data))
        assert_same(replica, primary)
        assert not replica.detect_local_writes()
        app.execute("SELECT count(*) FROM t").fetchone()
        assert (
            app.execute("SELECT count(*) FROM sqlite_schema WHERE name = 'local'").fetchone()[0]
            == 0
        )
    finally:
        app.close()
    primary.fill(2)
    ship(primary, replica)
    assert_same(replica, primary)


def test_replica_too_old_for_the_log_resyncs(
    primary: Primary, tmp_path: Path, opened: list[ReplicaDatabase]
) -> None:
    primary.fill(50)
    replica = open_replica(tmp_path, opened)
    ship(primary, replica)
    old = replica.pos.txid
    for i in range(200):
        primary.sql("UPDATE t SET v = randomblob(900) WHERE id = ?", (i % 50 + 1,))
        if i % 10 == 0:
            primary.tailer.sync()
    primary.fill(20)
    primary.log.retain(int(time.time() * 1000) + 60_000, 0, 1)
    assert primary.log.files_after(old) is None  # the log no longer reaches back
    header = resync(primary, replica)
    assert not header.is_snapshot
    primary.fill(1)
    ship(primary, replica)
    assert_same(replica, primary)


def test_replica_ahead_of_the_primary_restarts_its_log_below_its_old_txid(
    tmp_path: Path, opened: list[ReplicaDatabase]
) -> None:
    a, b = Primary(tmp_path / "a"), Primary(tmp_path / "b")
    try:
        a.fill(1)
        replica = open_replica(tmp_path, opened)
        ship(a, replica)
        for _ in range(40):  # one file per transaction on the replica
            a.fill(1)
            ship(a, replica)
        for _ in range(5):
            b.fill(1)
        assert 2 <= b.pos.txid < replica.pos.txid
        # The replica's old log holds a file with the very name of B's answer.
        assert (b.pos.txid, b.pos.txid) in [(mn, mx) for mn, mx, _ in replica.log]
        header = resync(b, replica)  # B is the new primary, behind the old one
        assert not header.is_snapshot and header.max_txid == b.pos.txid
        assert replica.log.pos == b.pos
        b.fill(3)
        ship(b, replica)
        assert_same(replica, b)
        replica.close()
        assert [mx for _, mx, _ in LTXLog(replica.log.directory)][-1] == b.pos.txid
        replica = open_replica(tmp_path, opened)
        assert_same(replica, b)
    finally:
        a.close()
        b.close()


# -- snapshots instead -----------------------------------------------------------------------


def test_page_size_mismatch_gets_a_snapshot(
    primary: Primary, tmp_path: Path, opened: list[ReplicaDatabase]
) -> None:
    primary.fill(40)
    db = tmp_path / "replica" / "app.db"
    db.parent.mkdir(parents=True)
    conn = connect(db)
    conn.execute("PRAGMA page_size=1024")
    conn.execute("CREATE TABLE other(x)")
    conn.execute("INSERT INTO other VALUES (randomblob(3000))")
    conn.close()
    replica = open_replica(tmp_path, opened)
    begin, _ = request(replica)
    assert begin.page_size == 1024 and begin.page_count > 1
    replica.abort_resync()
    header = resync(primary, replica)
    assert header.is_snapshot and header.page_size == 4096


def test_empty_replica_gets_a_snapshot(
    primary: Primary, tmp_path: Path, opened: list[ReplicaDatabase]
) -> None:
    primary.fill(40)
    replica = open_replica(tmp_path, opened)
    begin, hashes = request(replica)
    assert begin.page_count == 0 and hashes == []
    replica.abort_resync()
    header = resync(primary, replica)
    assert header.is_snapshot and header.max_txid == primary.pos.txid


def test_snapshot_from_a_reader_applies_to_an_empty_replica(
    primary: Primary, tmp_path: Path, opened: list[ReplicaDatabase]
) -> None:
    primary.fill(60)
    replica = open_replica(tmp_path, opened)
    out = io.BytesIO()
    with primary.tailer.open_reader() as reader:
        pos = write_snapshot(reader, out, node_id=7)
        assert pos == ltx.Pos(reader.txid, reader.checksum) == primary.pos
    out.seek(0)
    assert replica.apply(out) == pos
    assert_same(replica, primary)


# -- refused answers --------------------------------------------------------------------------


def diverged(primary: Primary, tmp_path: Path, opened: list[ReplicaDatabase]) -> ReplicaDatabase:
    primary.fill(80)
    replica = open_replica(tmp_path, opened)
    follow(primary, replica)
    replica.close()
    edit_behind_its_back(replica.path)
    primary.fill(2)
    return open_replica(tmp_path, opened)


def test_answer_for_another_checksum_is_refused_and_nothing_written(
    primary: Primary, tmp_path: Path, opened: list[ReplicaDatabase]
) -> None:
    replica = diverged(primary, tmp_path, opened)
    before = state(replica)
    begin, hashes = request(replica)
    other = dataclasses.replace(begin, checksum=begin.checksum ^ 0x10)
    data = answer(primary, other, hashes)
    with pytest.raises(PositionMismatch, match="the replica sent"):
        replica.apply_resync(io.BytesIO(data))
    assert state(replica) == before
    assert not replica.resync_pending and not replica.write_lock_held
    with pytest.raises(ApplyError, match="no resync in progress"):
        replica.apply_resync(io.BytesIO(data))
    resync(primary, replica)


def test_corrupted_answer_is_refused_and_nothing_written(
    primary: Primary, tmp_path: Path, opened: list[ReplicaDatabase]
) -> None:
    replica = diverged(primary, tmp_path, opened)
    before = state(replica)
    data = answer(primary, *request(replica))
    replica.abort_resync()
    for bit in (8 * 30, 8 * 110 + 3, 8 * (len(data) // 2) + 5, 8 * (len(data) - 20) + 1):
        request(replica)  # the same pages: the same answer applies
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ApplyError):
            replica.apply_resync(io.BytesIO(bytes(flipped)))
        assert state(replica) == before
        assert not replica.resync_pending
    request(replica)
    replica.apply_resync(io.BytesIO(data))
    assert_same(replica, primary)


def test_replica_refuses_other_work_while_a_resync_is_pending(
    primary: Primary, tmp_path: Path, opened: list[ReplicaDatabase]
) -> None:
    primary.fill(10)
    replica = open_replica(tmp_path, opened)
    ship(primary, replica)
    request(replica)
    assert pending(replica) == (True, True)
    with pytest.raises(ApplyError, match="resync is in progress"):
        replica.begin_resync(epoch=EPOCH, node_id=NODE)
    with pytest.raises(ApplyError, match="resync is in progress"):
        replica.checkpoint()
    replica.abort_resync()
    assert pending(replica) == (False, False)
    app = connect(replica.path)
    try:
        app.execute("CREATE TABLE local(x)")  # the lock is gone
    finally:
        app.close()
    # A lock held before the resync stays held after it.
    replica.hold_write_lock()
    resync_header = resync_keeping_lock(primary, replica)
    assert not resync_header.is_snapshot


def resync_keeping_lock(primary: Primary, replica: ReplicaDatabase) -> Header:
    begin, hashes = request(replica)
    data = answer(primary, begin, hashes)
    replica.apply_resync(io.BytesIO(data))
    assert replica.write_lock_held and not replica.resync_pending
    replica.release_write_lock()
    assert_same(replica, primary)
    return Header.from_bytes(data[:100])


def test_builder_rejects_hashes_out_of_order_or_missing(primary: Primary) -> None:
    primary.fill(30)
    with primary.tailer.open_reader() as reader:
        begin = ResyncBegin(EPOCH, NODE, "app.db", 4096, 20, 5, reader.checksum)
        builder = ResyncBuilder(reader, begin, io.BytesIO(), node_id=7)
        builder.add(PageHashes(EPOCH, 1, (1, 2, 3)))
        with pytest.raises(ResyncError, match="want page 4"):
            builder.add(PageHashes(EPOCH, 5, (1,)))
        with pytest.raises(ResyncError, match="past page_count"):
            builder.add(PageHashes(EPOCH, 4, tuple(range(20))))
        with pytest.raises(ResyncError, match="page_count is 20"):
            builder.finish()
