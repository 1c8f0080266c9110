"""Primary side of catching a replica up: snapshots and page-hash resyncs from a pinned read.

A replica that is new, too old, diverged or ahead is brought to the primary's state
(docs/protocol.md §7). Both answers are made from a ``PinnedReader``: a read transaction
begun, under the tailer's seal, exactly at the log's last TXID, on a connection of its
own, so the pages can be read from another thread while the tailer keeps syncing.

The resync flow:

1. The replica (``ReplicaDatabase.begin_resync``) takes its write lock, reads every page
   once (a page hash and a page checksum each) and sends ``RESYNC_BEGIN`` (page size and
   count, the checksum of the pages as hashed) then ``PAGE_HASHES`` frames (``POST
   /resync``). It keeps the write lock until the answer is applied, so nothing changes.
2. The primary opens a reader (``DatabaseTailer.open_reader``) and feeds the frames to a
   ``ResyncBuilder`` as they arrive. The builder writes the answer as it goes: page 1,
   then every page whose hash differs, then (``finish``) every page beyond the replica's
   count. Pages come out ascending, as the LTX encoder needs, because hashes arrive
   ascending. It holds one frame of hashes and one page at a time.
3. The answer is one LTX file: a resync file (``min_txid = max_txid = T``, pre-apply
   checksum = the replica's sent checksum, commit = the primary's page count, post-apply
   checksum = the primary's checksum at T), or a snapshot when the replica has no pages,
   a different page size, or the primary is at TXID 1. A resync file never holds more
   pages than the database, so it is never larger than a snapshot; that is why the size
   estimate of §7.3 is simply "the replica has nothing to diff against".
4. The replica (``ReplicaDatabase.apply_resync``) checks that the pre-apply checksum is
   the one it sent, predicts the post-apply checksum from its hashed pages and the file's
   pages, applies in one transaction, and restarts its LTX log with that file.

Every page read through a reader is checked against the tailer's per-page checksum
array (copied when the reader was opened): a log that disagrees with the database fails
here (``ReaderError``) rather than reaching a replica.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ltx import Encoder, Header, PageChecksums, Pos, lock_pgno, page_checksum
from ltx.encoder import Writable
from ltx.errors import TrailerError
from sidecar.frames import PageHashes, ResyncBegin, page_hash
from sidecar.sqlconn import close_quietly

__all__ = ["PinnedReader", "ReaderError", "ResyncBuilder", "ResyncError", "write_snapshot"]


class ReaderError(Exception):
    """The pinned pages disagree with the log's checksums: nothing may be served."""


class ResyncError(ValueError):
    """A resync request that does not hold together (frames out of order, missing)."""


def _now_ms() -> int:
    return int(time.time() * 1000)


class PinnedReader:
    """The database exactly at ``txid``, read through a held read transaction.

    Made by ``DatabaseTailer.open_reader`` in the tailer's thread; then used from one
    other thread at a time. Its read mark holds back checkpoints (they backfill less,
    and the WAL cannot be reset) until ``close``.
    """

    def __init__(self, conn: Any, *, path: Path, txid: int, sums: PageChecksums) -> None:
        self._conn = conn
        self.path = path
        self.txid = txid
        self._sums = sums
        self.page_size = sums.page_size
        self.page_count = sums.pages
        self.checksum = sums.checksum()  # post-apply checksum at txid
        self._lock = lock_pgno(self.page_size)

    def _verified(self, pgno: int, data: Any) -> bytes:
        page = bytes(data)
        if len(page) != self.page_size:
            raise ReaderError(
                f"{self.path}: page {pgno} is {len(page)} bytes, the log's page size is "
                f"{self.page_size}"
            )
        if page_checksum(pgno, page) != self._sums[pgno]:
            raise ReaderError(
                f"{self.path}: page {pgno} at TXID {self.txid} does not match the log's "
                f"checksum for it: the log disagrees with the database"
            )
        return page

    def _require_open(self) -> Any:
        if self._conn is None:
            raise ReaderError(f"{self.path}: the reader is closed")
        return self._conn

    def pages(self) -> Iterator[tuple[int, bytes]]:
        """Every page, ascending, the lock page skipped; each checked against the log."""
        conn = self._require_open()
        expected = 1
        for pgno_, data in conn.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno"):
            pgno = int(pgno_)
            if pgno == self._lock:
                expected = pgno + 1
                continue
            if pgno != expected or pgno > self.page_count:
                raise ReaderError(
                    f"{self.path}: read page {pgno}, expected page {expected} of "
                    f"{self.page_count} at TXID {self.txid}"
                )
            yield pgno, self._verified(pgno, data)
            expected = pgno + 1
        if expected <= self.page_count:
            raise ReaderError(
                f"{self.path}: the database has {expected - 1} pages at TXID {self.txid}, "
                f"the log says {self.page_count}"
            )

    def page(self, pgno: int) -> bytes:
        """One page, checked against the log (not the lock page)."""
        conn = self._require_open()
        if not 1 <= pgno <= self.page_count or pgno == self._lock:
            raise ReaderError(f"{self.path}: no page {pgno} (1..{self.page_count}, not the lock)")
        row = conn.execute("SELECT data FROM sqlite_dbpage WHERE pgno = ?", (pgno,)).fetchone()
        if row is None:
            raise ReaderError(f"{self.path}: page {pgno} is missing at TXID {self.txid}")
        return self._verified(pgno, row[0])

    def close(self) -> None:
        """End the read transaction (checkpoints may proceed) and close the connection."""
        conn, self._conn = self._conn, None
        close_quietly(conn)

    def __enter__(self) -> PinnedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _finish(encoder: Encoder, reader: PinnedReader) -> Pos:
    try:
        trailer = encoder.finish(reader.checksum)
    except TrailerError as exc:  # a snapshot's checksum is recomputed from its pages
        raise ReaderError(f"{reader.path}: {exc}: the log disagrees with the database") from exc
    return Pos(reader.txid, trailer.post_apply_checksum)


def write_snapshot(reader: PinnedReader, out: Writable, *, node_id: int) -> Pos:
    """A snapshot (TXIDs 1..reader.txid) of the reader's pages; returns its position.

    The encoder recomputes the checksum from the pages; it must be the log's.
    """
    header = Header(
        page_size=reader.page_size,
        commit=reader.page_count,
        min_txid=1,
        max_txid=reader.txid,
        timestamp=_now_ms(),
        node_id=node_id,
    )
    encoder = Encoder(out, header)
    for pgno, data in reader.pages():
        encoder.write_page(pgno, data)
    return _finish(encoder, reader)


def snapshot_reason(reader: PinnedReader, begin: ResyncBegin) -> str | None:
    """Why the answer to ``begin`` must be a snapshot (docs/protocol.md §7.3), or None."""
    if begin.page_size != reader.page_size:
        return f"the replica's page size is {begin.page_size}, the primary's {reader.page_size}"
    if reader.txid <= 1:
        return f"the primary is at TXID {reader.txid}"
    if begin.page_count == 0:
        return "the replica has no pages"
    return None


class ResyncBuilder:
    """Writes the answer to one resync request to ``out`` as the page hashes arrive.

    ``add`` each PAGE_HASHES frame in order, then ``finish``. Holds one page at a time;
    the caller holds one frame of hashes.
    """

    def __init__(
        self, reader: PinnedReader, begin: ResyncBegin, out: Writable, *, node_id: int
    ) -> None:
        self.reader = reader
        self.begin = begin
        self._out = out
        self._node_id = node_id
        self.snapshot_reason = snapshot_reason(reader, begin)
        self.pages_sent = 0
        self._next = 1  # the page whose hash is due next
        self._lock = lock_pgno(reader.page_size)
        self._encoder: Encoder | None = None
        self._pages: Iterator[tuple[int, bytes]] = iter(())
        self._finished = False
        if self.snapshot_reason is None:
            header = Header(
                page_size=reader.page_size,
                commit=reader.page_count,
                min_txid=reader.txid,
                max_txid=reader.txid,
                timestamp=_now_ms(),
                pre_apply_checksum=begin.checksum,
                node_id=node_id,
            )
            self._encoder = Encoder(out, header)
            self._pages = reader.pages()
            self._write(*self._page(1))  # page 1 always: the replica stamps its own

    @property
    def is_snapshot(self) -> bool:
        return self.snapshot_reason is not None

    def _page(self, pgno: int) -> tuple[int, bytes]:
        got = next(self._pages, None)
        if got is None or got[0] != pgno:
            raise ReaderError(
                f"{self.reader.path}: expected page {pgno} from the reader, got "
                f"{'the end' if got is None else got[0]}"
            )
        return got

    def _write(self, pgno: int, data: bytes) -> None:
        assert self._encoder is not None
        self._encoder.write_page(pgno, data)
        self.pages_sent += 1

    def add(self, frame: PageHashes) -> None:
        """Compare one frame of the replica's hashes; write the pages that differ."""
        if self._finished:
            raise ResyncError("the resync answer is finished already")
        if frame.first_pgno != self._next:
            raise ResyncError(f"hashes start at page {frame.first_pgno}, want page {self._next}")
        if frame.last_pgno > self.begin.page_count:
            raise ResyncError(
                f"hashes run to page {frame.last_pgno}, past page_count {self.begin.page_count}"
            )
        self._next = frame.last_pgno + 1
        if self._encoder is None:
            return
        last = min(frame.last_pgno, self.reader.page_count)
        for pgno in range(max(frame.first_pgno, 2), last + 1):
            if pgno == self._lock:
                continue
            _, data = self._page(pgno)
            if page_hash(data) != frame.hashes[pgno - frame.first_pgno]:
                self._write(pgno, data)

    def finish(self) -> Pos:
        """Write the rest (pages beyond the replica's) and the trailer; the position."""
        if self._finished:
            raise ResyncError("the resync answer is finished already")
        if self._next != self.begin.page_count + 1:
            raise ResyncError(
                f"hashes end at page {self._next - 1}, page_count is {self.begin.page_count}"
            )
        self._finished = True
        if self._encoder is None:
            pos = write_snapshot(self.reader, self._out, node_id=self._node_id)
            self.pages_sent = self.reader.page_count
            return pos
        for pgno, data in self._pages:  # beyond the replica's count (and the end check)
            self._write(pgno, data)
        return _finish(self._encoder, self.reader)
