"""Consistent reads on the primary: DatabaseTailer.open_reader and PinnedReader.

A reader is opened under the tailer's seal at the log's last TXID and read from another
thread while an app (a separate process) keeps writing and the tailer keeps syncing and
checkpointing. Its pages must be exactly the state the log gives at its TXID, and the
tailer's log must still reproduce the database afterwards: the reader's read mark only
makes checkpoints backfill less and blocks the WAL reset.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest
import sqlean

import ltx
from ltx import PageChecksums, page_checksum
from sidecar.log import LTXLog
from sidecar.resync import PinnedReader, ReaderError, write_snapshot
from sidecar.tailer import DatabaseTailer, TailerError, TailerOptions
from tests.sidecar.tailer_support import (
    assert_tailer_matches_live,
    create_db,
    finish,
    make_tailer,
    pages_checksum,
    replay_at,
    start_writer,
)

THREAD_TIMEOUT = 60.0


def read_in_thread(reader: PinnedReader) -> tuple[threading.Thread, list[tuple[int, bytes]]]:
    """Read every page (and each again with page()) in another thread; started."""
    pages: list[tuple[int, bytes]] = []

    def run() -> None:
        for pgno, data in reader.pages():
            assert reader.page(pgno) == data
            pages.append((pgno, data))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, pages


def join(thread: threading.Thread) -> None:
    thread.join(THREAD_TIMEOUT)
    assert not thread.is_alive(), "the reader thread did not finish"


def wal_size(db: Path) -> int:
    wal = Path(f"{db}-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_reader_sees_its_txid_while_the_app_writes_and_the_tailer_checkpoints(
    tmp_path: Path,
) -> None:
    db = tmp_path / "app.db"
    create_db(db)
    options = TailerOptions(passive_frames=40, truncate_frames=100_000)
    tailer = make_tailer(db, tmp_path / "ltx", options)
    try:
        tailer.open()
        finish([start_writer(db, seed=1, ops=150, plain=True, autocheckpoint=False)])
        tailer.sync()
        reader = tailer.open_reader()
        txid, checksum = reader.txid, reader.checksum
        assert ltx.Pos(txid, checksum) == tailer.log.pos
        assert reader.page_count == tailer.state.pages
        first, first_pages = read_in_thread(reader)
        writer = start_writer(db, seed=2, ops=600, plain=True, autocheckpoint=False)
        while writer.poll() is None:
            tailer.sync()
            tailer.checkpoint("PASSIVE")  # may be put off while the writer is busy
        finish([writer])
        join(first)
        tailer.sync()
        assert tailer.log.pos is not None and tailer.log.pos.txid > txid
        # PASSIVE backfills only up to the reader's mark.
        passive = tailer.checkpoint("PASSIVE")
        assert passive is not None and passive[0] == 0 and passive[2] < passive[1], passive
        # The reader holds its read mark: TRUNCATE cannot reset the WAL, and the tailer
        # must not take the frames it left for frames checkpointed unseen.
        truncate = tailer.checkpoint("TRUNCATE")
        assert truncate is not None and truncate[0] == 1, truncate
        assert wal_size(db) > 0
        second, second_pages = read_in_thread(reader)
        join(second)
        reader.close()
        assert tailer.state.rescans == 0
        state = replay_at(tailer.log, tmp_path / "replay.db", [txid])[txid]
        assert first_pages == second_pages == list(enumerate(state, 1))
        assert pages_checksum(state) == checksum
        # Closed: the WAL can be reset again, and the log still reproduces the database.
        truncate = tailer.checkpoint("TRUNCATE")
        assert truncate is not None and truncate[0] == 0, truncate
        assert wal_size(db) == 0
        finish([start_writer(db, seed=3, ops=100, plain=True, autocheckpoint=False)])
        tailer.sync()
        assert_tailer_matches_live(tailer, tmp_path)
        assert tailer.state.rescans == 0
    finally:
        tailer.close()


def test_snapshot_from_a_reader_is_the_database_at_its_txid(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    create_db(db)
    tailer = make_tailer(db, tmp_path / "ltx")
    try:
        tailer.open()
        finish([start_writer(db, seed=4, ops=80, plain=True)])
        with tailer.open_reader() as reader:  # brings the log to the end of the WAL first
            assert tailer.log.pos == ltx.Pos(reader.txid, reader.checksum)
            out = io.BytesIO()
            pos = write_snapshot(reader, out, node_id=5)
            pages = list(reader.pages())
        assert pos == tailer.log.pos
        out.seek(0)
        image = io.BytesIO()
        header, trailer = ltx.apply_ltx(image, out)
        assert header.is_snapshot and header.max_txid == pos.txid and header.node_id == 5
        assert trailer.post_apply_checksum == pos.post_apply_checksum
        assert image.getvalue() == b"".join(data for _, data in pages)
    finally:
        tailer.close()


def test_reader_page_bounds_and_close(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    create_db(db)
    tailer = make_tailer(db, tmp_path / "ltx")
    try:
        reader = tailer.open_reader()  # opens the tailer first
        with reader:
            assert reader.page_size == 4096 and reader.page_count >= 2
            assert reader.page(1)[:16] == ltx.SQLITE_MAGIC
            for pgno in (0, reader.page_count + 1):
                with pytest.raises(ReaderError, match=f"no page {pgno}"):
                    reader.page(pgno)
        with pytest.raises(ReaderError, match="closed"):
            reader.page(1)
        reader.close()  # idempotent
    finally:
        tailer.close()


def test_reader_refuses_pages_the_log_disagrees_with(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    create_db(db)
    conn = sqlean.connect(str(db), isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN")
    rows = [(int(p), bytes(d)) for p, d in conn.execute("SELECT pgno, data FROM sqlite_dbpage")]
    sums = PageChecksums.of_pages(4096, rows)
    sums.set(2, page_checksum(2, bytes(4096)))  # the "log" says page 2 is zeros
    reader = PinnedReader(conn, path=db, txid=9, sums=sums)
    with reader:
        assert reader.page(1) == rows[0][1]
        with pytest.raises(ReaderError, match="page 2 at TXID 9 does not match"):
            reader.page(2)
        with pytest.raises(ReaderError, match="the log disagrees with the database"):
            write_snapshot(reader, io.BytesIO(), node_id=1)


def test_open_reader_of_a_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    tailer = DatabaseTailer(
        "gone.db", tmp_path / "gone.db", LTXLog(tmp_path / "ltx"), TailerOptions()
    )
    try:
        with pytest.raises(TailerError, match="does not exist yet"):
            tailer.open_reader()
    finally:
        tailer.close()
