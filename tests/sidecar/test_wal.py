"""sidecar.wal against real WAL files written by SQLite (sqlean) and synthetic ones.

The real-file tests keep the writing connection open so the ``-wal`` file persists, and read
it with a plain ``open()``: SQLite puts no locks on ``-wal``, so that is safe. ``-shm`` is read
through a descriptor kept open until after the connection is closed (closing a descriptor
on it would drop the process's POSIX locks, see DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import os
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlean as sqlite3
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.wal import (
    WAL_FORMAT_VERSION,
    WAL_FRAME_HEADER_SIZE,
    WAL_HEADER_SIZE,
    WAL_MAGIC_BE,
    WAL_MAGIC_LE,
    ScanResult,
    ScanState,
    StopReason,
    WALError,
    WALHeader,
    WALScanner,
    WALTransaction,
    frame_offset,
    parse_frame_header,
    parse_wal_header,
    parse_wal_index_header,
    scan,
    wal_checksum,
)

MASK32 = 0xFFFF_FFFF


def reference_checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's walChecksumBytes, word by word, as written in wal.c."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & MASK32
        s1 = (s1 + words[i + 1] + s0) & MASK32
    return s0, s1


# -- synthetic WALs ------------------------------------------------------------------------


def build_wal(
    frames: list[tuple[int, int, bytes]],
    *,
    page_size: int = 512,
    big_endian: bool = False,
    salts: tuple[int, int] = (0x1234_5678, 0x9ABC_DEF0),
    checkpoint_seq: int = 0,
) -> bytes:
    """A WAL file holding ``frames`` of (pgno, commit size or 0, page image), checksummed."""
    magic = WAL_MAGIC_BE if big_endian else WAL_MAGIC_LE
    head = struct.pack(">6I", magic, WAL_FORMAT_VERSION, page_size, checkpoint_seq, *salts)
    s = reference_checksum(head, 0, 0, big_endian)
    out = [head, struct.pack(">2I", *s)]
    for pgno, commit_size, page in frames:
        assert len(page) == page_size
        start = struct.pack(">2I", pgno, commit_size)
        s = reference_checksum(start + page, s[0], s[1], big_endian)
        out += [start, struct.pack(">4I", *salts, *s), page]
    return b"".join(out)


def page_of(fill: int, page_size: int = 512) -> bytes:
    return bytes([fill & 0xFF]) * page_size


def full_scan(wal: bytes) -> ScanResult:
    return scan(wal, 0, ScanState.from_header(parse_wal_header(wal)))


def as_bytes(txn: WALTransaction) -> dict[int, bytes]:
    """A transaction's pages as bytes (scan hands out views of the bytes it was given)."""
    return {pgno: bytes(data) for pgno, data in txn.pages.items()}


def latest_pages(
    transactions: tuple[WALTransaction, ...] | list[WALTransaction],
) -> dict[int, bytes]:
    """Page images after applying every transaction in order (and truncating)."""
    pages: dict[int, bytes] = {}
    for txn in transactions:
        pages.update(as_bytes(txn))
        for pgno in [p for p in pages if p > txn.commit_size]:
            del pages[pgno]
    return pages


# -- real WALs -----------------------------------------------------------------------------


@dataclass
class LiveDB:
    """A WAL-mode database with the writer connection held open (so ``-wal`` persists)."""

    path: Path
    conn: sqlite3.Connection
    base_pages: dict[int, bytes]  # database pages when the WAL was last empty
    commits: int = 0
    shm_fd: int | None = None

    @property
    def wal_path(self) -> Path:
        return Path(f"{self.path}-wal")

    def wal_bytes(self) -> bytes:
        return self.wal_path.read_bytes()

    def shm_header(self) -> bytes:
        if self.shm_fd is None:
            self.shm_fd = os.open(f"{self.path}-shm", os.O_RDONLY)
        return os.pread(self.shm_fd, 136, 0)

    def commit(self, *statements: str) -> None:
        """Run ``statements`` as one transaction."""
        self.conn.execute("BEGIN")
        for sql in statements:
            self.conn.execute(sql)
        self.conn.execute("COMMIT")
        self.commits += 1

    def db_pages(self) -> dict[int, bytes]:
        rows = self.conn.execute("SELECT pgno, data FROM sqlite_dbpage").fetchall()
        return {pgno: bytes(data) for pgno, data in rows}

    def page_count(self) -> int:
        count: int = self.conn.execute("PRAGMA page_count").fetchone()[0]
        return count


@contextmanager
def live_database(path: Path, *, page_size: int = 4096, uri_params: str = "") -> Iterator[LiveDB]:
    """Yield a LiveDB; close the connection, then (only then) any -shm descriptor."""
    conn = sqlite3.connect(f"file:{path}{uri_params}", uri=True, isolation_level=None)
    conn.execute(f"PRAGMA page_size={page_size}")
    assert conn.execute("PRAGMA journal_mode=wal").fetchone()[0] == "wal"
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.execute("CREATE TABLE kv(k TEXT PRIMARY KEY, v TEXT)")
    # Empty the WAL: every page now lives in the main file; this is the "before" image.
    assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    assert os.path.getsize(f"{path}-wal") == 0
    live = LiveDB(path=path, conn=conn, base_pages={})
    try:
        live.base_pages = live.db_pages()
        yield live
    finally:
        conn.close()
        if live.shm_fd is not None:  # only after SQLite let go of its locks
            os.close(live.shm_fd)


@pytest.fixture
def live_db(tmp_path: Path) -> Iterator[LiveDB]:
    with live_database(tmp_path / "app.db") as live:
        yield live


def write_history(live: LiveDB) -> None:
    """A mix of transactions, including a rolled-back one and a page updated twice."""
    live.commit("INSERT INTO t(v) VALUES (randomblob(100))")
    live.commit(  # many pages in one transaction
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 60) "
        "INSERT INTO t(v) SELECT randomblob(1500) FROM n"
    )
    live.commit(  # the same page changed twice in one transaction
        "UPDATE t SET v = randomblob(100) WHERE id = 1",
        "UPDATE t SET v = x'0102030405' WHERE id = 1",
    )
    live.conn.execute("BEGIN")
    live.conn.execute("INSERT INTO t(v) SELECT randomblob(2000) FROM t")
    live.conn.execute("ROLLBACK")
    live.commit("INSERT INTO kv VALUES ('a', 'b')", "INSERT INTO kv VALUES ('c', 'd')")
    live.commit("DELETE FROM t WHERE id % 3 = 0")
    live.commit("INSERT INTO kv VALUES ('e', 'f')")


def frame_starts(wal: bytes) -> list[int]:
    header = parse_wal_header(wal)
    return list(range(WAL_HEADER_SIZE, len(wal) - header.frame_size + 1, header.frame_size))


# -- checksum --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    words=st.integers(min_value=0, max_value=3000).map(lambda n: n * 2),
    seed=st.binary(min_size=64, max_size=64),
    s0=st.integers(min_value=0, max_value=MASK32),
    s1=st.integers(min_value=0, max_value=MASK32),
    big_endian=st.booleans(),
)
def test_wal_checksum_matches_reference_loop(
    words: int, seed: bytes, s0: int, s1: int, big_endian: bool
) -> None:
    data = (seed * (words * 4 // 64 + 1))[: words * 4]
    data = bytes(b ^ (i * 131 & 0xFF) for i, b in enumerate(data))  # not periodic
    assert wal_checksum(data, s0, s1, big_endian) == reference_checksum(data, s0, s1, big_endian)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2048).map(lambda b: b[: len(b) - len(b) % 8]), be=st.booleans())
def test_wal_checksum_matches_reference_on_arbitrary_bytes(data: bytes, be: bool) -> None:
    assert wal_checksum(data, 0, 0, be) == reference_checksum(data, 0, 0, be)


@pytest.mark.parametrize("size", [512, 1024, 4096, 8192, 65536])
@pytest.mark.parametrize("fill", [0x00, 0xFF])
def test_wal_checksum_is_exact_for_every_page_size_and_extreme_words(size: int, fill: int) -> None:
    data = bytes([fill]) * size
    for be in (False, True):
        assert wal_checksum(data, MASK32, MASK32, be) == reference_checksum(
            data, MASK32, MASK32, be
        )


def test_wal_checksum_accepts_memoryview_and_bytearray() -> None:
    data = os.urandom(4096 + 8)
    expected = reference_checksum(data[8:], 7, 9, False)
    assert wal_checksum(memoryview(data)[8:], 7, 9, False) == expected
    assert wal_checksum(bytearray(data[8:]), 7, 9, False) == expected


def test_wal_checksum_rejects_length_not_multiple_of_8() -> None:
    with pytest.raises(WALError, match="multiple of 8"):
        wal_checksum(b"\0" * 12, 0, 0, False)


# -- header and frame header -------------------------------------------------------------------


def test_real_wal_header_parses(live_db: LiveDB) -> None:
    write_history(live_db)
    wal = live_db.wal_bytes()
    header = parse_wal_header(wal)
    assert header.magic == (WAL_MAGIC_BE if sys.byteorder == "big" else WAL_MAGIC_LE)
    assert header.format_version == WAL_FORMAT_VERSION
    assert header.page_size == 4096
    assert header.checkpoint_seq >= 1  # TRUNCATE checkpoint reset the log once
    assert header.to_bytes() == wal[:32]
    first = parse_frame_header(wal, WAL_HEADER_SIZE)
    assert first.salts == header.salts


def test_real_wal_frame_checksums_chain_from_the_header(live_db: LiveDB) -> None:
    write_history(live_db)
    wal = live_db.wal_bytes()
    header = parse_wal_header(wal)
    s = header.checksum
    starts = frame_starts(wal)
    assert len(starts) > 40
    assert WAL_HEADER_SIZE + len(starts) * header.frame_size == len(wal)  # no stale tail here
    for off in starts:
        fh = parse_frame_header(wal, off)
        s = wal_checksum(wal[off : off + 8], *s, header.big_endian)
        s = wal_checksum(wal[off + 24 : off + header.frame_size], *s, header.big_endian)
        assert fh.checksum == s, f"frame at {off}"


def _header_with(**changes: int) -> bytes:
    fields = {
        "magic": WAL_MAGIC_LE,
        "format_version": WAL_FORMAT_VERSION,
        "page_size": 4096,
        "checkpoint_seq": 3,
        "salt1": 11,
        "salt2": 22,
    }
    fields.update(changes)
    head = struct.pack(">6I", *fields.values())
    return head + struct.pack(">2I", *reference_checksum(head, 0, 0, bool(fields["magic"] & 1)))


def test_wal_header_accepts_big_endian_magic_and_64k_pages() -> None:
    header = parse_wal_header(_header_with(magic=WAL_MAGIC_BE, page_size=65536))
    assert header.big_endian
    assert header.page_size == 65536
    assert header.frame_size == 65536 + 24


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_header_with(magic=0x377F0684), "bad magic"),
        (_header_with(format_version=3021000), "unsupported format version 3021000"),
        (_header_with(page_size=1000), "bad page size 1000"),
        (_header_with(page_size=256), "bad page size 256"),
        (_header_with(page_size=131072), "bad page size 131072"),
        (_header_with()[:31], "need 32 bytes"),
        (_header_with()[:28] + b"\0\0\0\0", "checksum mismatch"),
        (_header_with()[:20] + b"\0\0\0\x17" + _header_with()[24:], "checksum mismatch"),
    ],
)
def test_wal_header_rejects_invalid(data: bytes, message: str) -> None:
    with pytest.raises(WALError, match=message):
        parse_wal_header(data)


def test_wal_error_is_a_value_error() -> None:
    assert issubclass(WALError, ValueError)


def test_frame_header_fields() -> None:
    raw = struct.pack(">6I", 7, 42, 1, 2, 3, 4)
    fh = parse_frame_header(b"xx" + raw, 2)
    assert (fh.pgno, fh.commit_size, fh.salts, fh.checksum) == (7, 42, (1, 2), (3, 4))
    assert fh.is_commit
    assert not parse_frame_header(struct.pack(">6I", 7, 0, 1, 2, 3, 4)).is_commit
    with pytest.raises(WALError, match="need 24 bytes"):
        parse_frame_header(raw[:23])


def test_frame_offset() -> None:
    assert frame_offset(1, 4096) == 32
    assert frame_offset(2, 4096) == 32 + 4120
    assert frame_offset(10, 65536) == 32 + 9 * 65560
    with pytest.raises(ValueError):
        frame_offset(0, 4096)


# -- scanning real WALs -------------------------------------------------------------------------


def test_scanner_returns_exactly_the_committed_transactions(live_db: LiveDB) -> None:
    write_history(live_db)
    wal = live_db.wal_bytes()
    result = full_scan(wal)
    assert len(result.transactions) == live_db.commits == 6
    assert result.transactions[-1].commit_size == live_db.page_count()
    assert result.transactions[1].frame_count > 20  # the multi-page one
    # contiguous, each ending in a commit frame, salts of the header
    header = parse_wal_header(wal)
    offset = WAL_HEADER_SIZE
    for txn in result.transactions:
        assert txn.first_offset == offset
        assert txn.end_offset == offset + txn.frame_count * header.frame_size
        commit = parse_frame_header(wal, txn.end_offset - header.frame_size)
        assert commit.is_commit and commit.commit_size == txn.commit_size
        assert commit.checksum == txn.checksum
        assert (txn.salt1, txn.salt2) == header.salts
        offset = txn.end_offset
    assert result.state.offset == result.transactions[-1].end_offset
    assert result.state.checksum == result.transactions[-1].checksum


def test_applying_scanned_pages_over_the_pre_wal_database_reproduces_it(live_db: LiveDB) -> None:
    write_history(live_db)
    result = full_scan(live_db.wal_bytes())
    rebuilt = dict(live_db.base_pages)
    for txn in result.transactions:
        rebuilt.update(as_bytes(txn))
        rebuilt = {p: d for p, d in rebuilt.items() if p <= txn.commit_size}
    assert rebuilt == live_db.db_pages()


def test_page_written_twice_in_one_transaction_keeps_the_last_image(live_db: LiveDB) -> None:
    live_db.commit("INSERT INTO t(v) VALUES (x'00')")
    live_db.commit(
        "UPDATE t SET v = x'aaaaaaaa' WHERE id = 1",
        "UPDATE t SET v = x'0102030405' WHERE id = 1",
    )
    result = full_scan(live_db.wal_bytes())
    txn = result.transactions[-1]
    (leaf,) = [p for p, image in txn.pages.items() if b"\x01\x02\x03\x04\x05" in bytes(image)]
    assert txn.pages[leaf] == live_db.db_pages()[leaf]


def test_rolled_back_transaction_leaves_pending_frames_that_are_not_returned(
    live_db: LiveDB,
) -> None:
    live_db.commit("INSERT INTO t(v) VALUES (randomblob(100))")
    live_db.conn.execute("PRAGMA cache_size=5")  # force the big transaction to spill to the WAL
    live_db.conn.execute("BEGIN")
    live_db.conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300) "
        "INSERT INTO t(v) SELECT randomblob(1000) FROM n"
    )
    live_db.conn.execute("ROLLBACK")
    result = full_scan(live_db.wal_bytes())
    assert len(result.transactions) == 1
    assert result.pending_frames > 0  # the spill: valid frames, never committed
    assert result.valid_end_offset > result.state.offset
    assert result.state.frame_count == parse_wal_index_header(live_db.shm_header()).mx_frame


def test_torn_last_frame_stops_at_the_previous_commit(live_db: LiveDB) -> None:
    write_history(live_db)
    wal = live_db.wal_bytes()
    complete = full_scan(wal).transactions
    last = complete[-1]
    for cut in (last.end_offset - 1, last.end_offset - 4096, last.end_offset - 4100):
        result = full_scan(wal[:cut])
        assert result.transactions == complete[:-1]
        assert result.stop_reason is StopReason.END_OF_DATA
        assert result.state.offset == complete[-2].end_offset


def test_flipped_byte_stops_before_the_damaged_frame(live_db: LiveDB) -> None:
    write_history(live_db)
    wal = bytearray(live_db.wal_bytes())
    complete = full_scan(bytes(wal)).transactions
    big = complete[1]
    damaged = big.first_offset + 5 * (4096 + 24)  # the 6th frame of the multi-page txn
    wal[damaged + 24 + 1000] ^= 0x01
    result = full_scan(bytes(wal))
    assert result.transactions == complete[:1]
    assert result.stop_reason is StopReason.CHECKSUM_MISMATCH
    assert result.pending_frames == 5
    assert result.valid_end_offset == damaged


def test_frames_with_old_salts_after_a_wal_reset_are_not_returned(live_db: LiveDB) -> None:
    write_history(live_db)
    old_wal = live_db.wal_bytes()
    old_header = parse_wal_header(old_wal)
    assert live_db.conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 0
    live_db.commit("INSERT INTO kv VALUES ('after', 'reset')")
    wal = live_db.wal_bytes()
    assert len(wal) == len(old_wal)  # the file is not truncated: old frames remain after
    header = parse_wal_header(wal)
    assert header.checkpoint_seq == old_header.checkpoint_seq + 1
    assert header.salt1 == (old_header.salt1 + 1) & MASK32
    assert header.salt2 != old_header.salt2
    result = full_scan(wal)
    assert len(result.transactions) == 1
    assert result.stop_reason is StopReason.SALT_MISMATCH
    assert result.pending_frames == 0
    old_frame = parse_frame_header(wal, result.valid_end_offset)
    assert old_frame.salts == old_header.salts  # a full, valid-looking frame of the old log
    assert latest_pages(result.transactions).items() <= live_db.db_pages().items()


def test_uncommitted_frames_of_a_multi_frame_transaction_are_pending(live_db: LiveDB) -> None:
    write_history(live_db)
    wal = live_db.wal_bytes()
    complete = full_scan(wal).transactions
    big = complete[1]
    frame = 4096 + 24
    for frames_in in (1, 10, big.frame_count - 1):
        cut = big.first_offset + frames_in * frame  # just after a non-commit frame
        assert not parse_frame_header(wal, cut - frame).is_commit
        result = full_scan(wal[:cut])
        assert result.transactions == complete[:1]
        assert result.pending_frames == frames_in
        assert result.state.offset == big.first_offset


def test_resuming_from_saved_states_gives_the_same_result_as_a_full_scan(
    live_db: LiveDB,
) -> None:
    write_history(live_db)
    wal = live_db.wal_bytes()
    full = full_scan(wal)
    # The file "grows" in uneven steps; each step re-feeds from the committed offset.
    cuts = [*range(100, len(wal), 3001), len(wal)]
    scanner = WALScanner(wal[:32])
    got: list[WALTransaction] = []
    for cut in cuts:
        got += scanner.feed(wal[scanner.committed_offset : cut]).transactions
        # a scanner rebuilt from the saved state behaves the same
        scanner = WALScanner.from_state(scanner.state)
    assert tuple(got) == full.transactions
    assert scanner.state == full.state
    # feeding the whole file again with its real start offset finds nothing new
    again = scanner.feed(wal, 0)
    assert again.transactions == ()
    assert again.state == full.state


def test_wal_index_header_agrees_with_the_scan(live_db: LiveDB) -> None:
    write_history(live_db)
    index = parse_wal_index_header(live_db.shm_header())
    result = full_scan(live_db.wal_bytes())
    header = parse_wal_header(live_db.wal_bytes())
    assert index.is_init
    assert index.version == WAL_FORMAT_VERSION
    assert index.mx_frame == result.state.frame_count
    assert index.salts == header.salts
    assert index.page_size == 4096
    assert index.n_page == live_db.page_count() == result.transactions[-1].commit_size
    assert (index.frame_checksum1, index.frame_checksum2) == result.state.checksum
    assert index.n_backfill == 0
    busy, log, done = live_db.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert (busy, log, done) == (0, index.mx_frame, index.mx_frame)
    assert parse_wal_index_header(live_db.shm_header()).n_backfill == index.mx_frame


def test_wal_index_header_rejects_torn_uninitialised_or_corrupt(live_db: LiveDB) -> None:
    live_db.commit("INSERT INTO t(v) VALUES (1)")
    good = bytearray(live_db.shm_header())
    parse_wal_index_header(bytes(good))
    torn = bytearray(good)
    torn[16] ^= 1  # mxFrame of the first copy only
    with pytest.raises(WALError, match="copies differ"):
        parse_wal_index_header(bytes(torn))
    both = bytearray(good)
    both[16] ^= 1
    both[48 + 16] ^= 1
    with pytest.raises(WALError, match="checksum mismatch"):
        parse_wal_index_header(bytes(both))
    uninit = bytearray(good)
    uninit[12] = uninit[48 + 12] = 0
    with pytest.raises(WALError, match="not initialised"):
        parse_wal_index_header(bytes(uninit))
    with pytest.raises(WALError, match="need 136 bytes"):
        parse_wal_index_header(bytes(good[:100]))


def test_repeated_commit_frames_from_sector_padding_are_skipped(tmp_path: Path) -> None:
    # psow=0 + synchronous=FULL makes SQLite pad every commit to a 4 KiB sector boundary by
    # writing the commit frame again; with 512-byte pages that is several repeats per commit.
    with live_database(tmp_path / "pad.db", page_size=512, uri_params="?psow=0") as live:
        live.conn.execute("PRAGMA synchronous=FULL")
        for i in range(4):
            live.commit(f"INSERT INTO kv VALUES ('{i}', '{i}')")
        wal = live.wal_bytes()
        result = full_scan(wal)
        assert len(result.transactions) == live.commits == 4
        assert result.repeated_commit_frames >= 4
        assert all(t.frame_count == len(t.pages) for t in result.transactions)
        # SQLite counts the repeats as committed frames
        assert parse_wal_index_header(live.shm_header()).mx_frame == result.state.frame_count
        rebuilt = dict(live.base_pages)
        for txn in result.transactions:
            rebuilt.update(as_bytes(txn))
        assert rebuilt == live.db_pages()
        # chunking does not change the outcome, even when each repeat is fed on its own
        scanner = WALScanner(wal)
        got: list[WALTransaction] = []
        for cut in range(32 + 536, len(wal) + 1, 536):
            got += scanner.feed(wal[scanner.committed_offset : cut]).transactions
        assert tuple(got) == result.transactions
        assert scanner.state == result.state
        # a state saved without the last commit frame sees the next repeat as a no-op txn
        after_first = scan(wal[: result.transactions[0].end_offset], 0, full_scan(wal[:32]).state)
        bare = dataclasses.replace(after_first.state, last_commit=None)
        extra = scan(wal, 0, bare).transactions[0]
        assert extra.frame_count == 1
        assert dict(extra.pages).items() <= dict(result.transactions[0].pages).items()


# -- scanning synthetic WALs -----------------------------------------------------------------


def test_scan_of_big_endian_wal() -> None:
    frames = [(1, 0, page_of(1)), (2, 2, page_of(2)), (2, 2, page_of(3))]
    wal = build_wal(frames, big_endian=True)
    assert parse_wal_header(wal).big_endian
    result = full_scan(wal)
    assert [dict(t.pages) for t in result.transactions] == [
        {1: page_of(1), 2: page_of(2)},
        {2: page_of(3)},
    ]


def test_later_frame_of_the_same_page_wins_within_a_transaction() -> None:
    wal = build_wal([(3, 0, page_of(1)), (4, 0, page_of(2)), (3, 4, page_of(9))])
    (txn,) = full_scan(wal).transactions
    assert dict(txn.pages) == {3: page_of(9), 4: page_of(2)}
    assert list(txn.pages) == [3, 4]
    assert txn.frame_count == 3


def test_pending_frames_rewritten_before_commit_are_read_afresh() -> None:
    committed = [(1, 1, page_of(1))]
    before = build_wal([*committed, (2, 0, page_of(2)), (3, 0, page_of(3))])
    scanner = WALScanner(before)
    first = scanner.feed(before[scanner.committed_offset :])
    assert len(first.transactions) == 1 and first.pending_frames == 2
    # SQLite rewrote the uncommitted frames in place, then committed
    after = build_wal([*committed, (2, 0, page_of(20)), (3, 3, page_of(30))])
    second = scanner.feed(after[scanner.committed_offset :])
    (txn,) = second.transactions
    assert dict(txn.pages) == {2: page_of(20), 3: page_of(30)}


def test_zero_page_number_ends_the_log() -> None:
    wal = build_wal([(1, 1, page_of(1)), (0, 1, page_of(2)), (2, 2, page_of(3))])
    result = full_scan(wal)
    assert len(result.transactions) == 1
    assert result.stop_reason is StopReason.ZERO_PAGE_NUMBER


def test_truncated_database_drops_pages_past_commit_size() -> None:
    wal = build_wal([(5, 5, page_of(5)), (1, 3, page_of(1))])
    result = full_scan(wal)
    assert [t.commit_size for t in result.transactions] == [5, 3]
    assert latest_pages(result.transactions) == {1: page_of(1)}


def test_scan_rejects_a_resume_offset_outside_the_data() -> None:
    wal = build_wal([(1, 1, page_of(1))])
    state = ScanState.from_header(parse_wal_header(wal))
    with pytest.raises(ValueError, match="outside the data"):
        scan(wal[100:], 100, state)
    with pytest.raises(ValueError, match="outside the data"):
        scan(wal[:10], 0, dataclasses.replace(state, offset=40))
    assert scan(b"", 32, state).transactions == ()


def test_scanner_accepts_a_parsed_header() -> None:
    wal = build_wal([(1, 1, page_of(1))])
    header: WALHeader = parse_wal_header(wal)
    assert WALScanner(header).state == WALScanner(wal).state == ScanState.from_header(header)


transaction_st = st.lists(
    st.tuples(st.integers(min_value=1, max_value=6), st.integers(min_value=0, max_value=255)),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(
    txns=st.lists(transaction_st, min_size=0, max_size=6),
    pending=st.lists(st.integers(min_value=1, max_value=6), max_size=3),
    damage=st.one_of(
        st.none(),
        st.tuples(st.just("cut"), st.integers(min_value=0)),
        st.tuples(st.just("flip"), st.integers(min_value=0)),
    ),
    big_endian=st.booleans(),
)
def test_scan_returns_the_committed_prefix_of_any_damaged_wal(
    txns: list[list[tuple[int, int]]],
    pending: list[int],
    damage: tuple[str, int] | None,
    big_endian: bool,
) -> None:
    frames: list[tuple[int, int, bytes]] = []
    ends: list[int] = []  # frame count at each commit
    expected: list[dict[int, bytes]] = []
    for writes in txns:
        pages = {pgno: page_of(fill) for pgno, fill in writes}
        for i, (pgno, fill) in enumerate(writes):
            commit = 6 if i == len(writes) - 1 else 0
            frames.append((pgno, commit, page_of(fill)))
        ends.append(len(frames))
        expected.append(pages)
    frames += [(pgno, 0, page_of(pgno)) for pgno in pending]
    wal = bytearray(build_wal(frames, big_endian=big_endian))
    frame_size = 512 + WAL_FRAME_HEADER_SIZE
    if damage is not None and len(wal) > WAL_HEADER_SIZE:
        kind, where = damage
        where = WAL_HEADER_SIZE + where % (len(wal) - WAL_HEADER_SIZE)
        if kind == "cut":
            wal = wal[:where]
        else:
            wal[where] ^= 0x40  # any byte of a frame: header, salts, checksum or page
        intact_frames = (where - WAL_HEADER_SIZE) // frame_size
    else:
        intact_frames = len(frames)
    committed = [i for i, end in enumerate(ends) if end <= intact_frames]
    # A generated one-frame txn that repeats the previous commit frame is folded (no-op).
    result = full_scan(bytes(wal))
    got = [dict(t.pages) for t in result.transactions]
    want = [expected[i] for i in committed]
    assert len(got) + result.repeated_commit_frames == len(want)
    assert latest_pages(result.transactions) == _apply(want)
    assert (
        result.state.offset
        == WAL_HEADER_SIZE + (ends[committed[-1]] if committed else 0) * frame_size
    )


def _apply(txns: list[dict[int, bytes]]) -> dict[int, bytes]:
    pages: dict[int, bytes] = {}
    for t in txns:
        pages.update(t)
    return pages


def test_trusting_published_frames_gives_the_same_result_as_verifying(live_db: LiveDB) -> None:
    """verify=False (bytes bounded by mxFrame) finds the same transactions and state, and a
    verifying scan can continue the chain from its state."""
    write_history(live_db)
    wal = live_db.wal_bytes()
    full = full_scan(wal)
    header = parse_wal_header(wal[:32])
    trusted = scan(wal, 0, ScanState.from_header(header), verify=False)
    assert trusted.transactions == full.transactions
    assert trusted.state == full.state
    middle = full.transactions[len(full.transactions) // 2].end_offset
    head = scan(wal[:middle], 0, ScanState.from_header(header), verify=False)
    rest = scan(wal, 0, head.state)  # verifying from the trusted state
    assert head.transactions + rest.transactions == full.transactions
