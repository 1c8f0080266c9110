"""Replica side: apply LTX files to a live SQLite database through ``sqlite_dbpage``.

One ReplicaDatabase owns one replica database, its LTX log and its ``<db>-pos`` file
(Litestream's db.go is the model: one object, one database, the whole lifecycle). Apps on
the replica read the database with their own SQLite library while files are applied; each
file is one SQLite write transaction, so a reader sees the state before it or after it,
never a mix (DESIGN.md choice 3). The rules, enforced below:

* Verify first, write second. A file is decoded in full (file checksum, page order,
  bounds, index) before anything is written; then it must apply at the replica's
  position: ``min_txid == txid + 1`` and its pre-apply checksum equal to the replica's
  checksum (unless the file has FLAG_NO_CHECKSUM). A snapshot (``min_txid == 1``) applies
  over anything. The post-apply checksum is predicted from the per-page checksum array
  and the file's pages, and must equal the trailer's, still before a byte is written.
  A position mismatch raises PositionMismatch (the caller resyncs); any other failure
  ApplyError. Nothing is written in either case. One exception, for speed: a snapshot
  larger than 8 MB (a bootstrap) is decoded once, by the write, and these checks run
  after its last page and before COMMIT; a bad one is rolled back, so readers never see
  it either.
* One write transaction per file: ``BEGIN IMMEDIATE``, then ONE statement,
  ``INSERT INTO sqlite_dbpage(pgno, data) VALUES(?, ?)`` stepped once per page in
  ascending page order (the file's) except page 1, which comes last, and, when the
  database shrinks, a last row ``(commit + 1, NULL)``: SQLite 3.50 truncates the
  database to ``commit`` pages at COMMIT. The truncation row must come after the page
  writes: a page write after it cancels it (measured). Bytes 18-19 of page 1 (the
  WAL-mode flags) are written as 2, so the replica stays in WAL mode whatever the file
  says. The trap (measured): the
  connection's b-tree layer keeps its parse of every page it has read, and
  sqlite_dbpage replaces the bytes under it without telling it. Once page 1 is written
  its schema cookie changed, so the next row (the truncation) makes SQLite reload the
  schema; with a stale parse of page 1 that fails ("database disk image is malformed",
  e.g. a deletion, page 1 going from rows to none). So before ``BEGIN IMMEDIATE`` the
  schema is loaded and the page cache dropped (``PRAGMA shrink_memory``), and inside the
  transaction nothing parses a page before the writes (only sqlite_dbpage reads and
  pragmas); a commit by another connection in between restarts it. For the same reason
  the applying connection never reads a table: after its own sqlite_dbpage writes it
  would see old rows (other connections are not affected: they reload the pages the
  WAL says changed).
* Positions are logical (DESIGN.md choice 3): SQLite stamps bytes 24-27, 92-95 and 96-99
  of page 1 on every commit that writes it, so the replica's page 1 differs from the
  primary's in those 12 bytes (and in 18-19 if the file's page 1 was not in WAL mode).
  The checksum array holds the checksums of the pages *as the LTX files gave them*, and
  the logical page 1 (the last one applied) is kept in a small file beside the log,
  ``<ltx dir>/../page1`` (magic, TXID, checksum, page image), replaced atomically after
  every apply that writes page 1. Positions are never computed by re-reading page 1.
* Crash safety. The LTX file is appended to the log (durably) inside the write
  transaction, after the page writes and before COMMIT; the page1 file and the
  ``<db>-pos`` file are written after it. At open the database is checked against the
  log's last position: the pages as they are, with page 1 taken from the page1 file (or,
  if that does not fit, from the newest log file holding page 1), must give the log's
  checksum, and the physical page 1 must equal that image except in the 12 stamped bytes.
  A process killed after the append and before COMMIT leaves the database exactly at the
  last file's pre-apply position: the file is applied again from the log (a snapshot is
  always applied again). Anything else is reported (``problem``), never accepted: the
  caller resyncs; only a snapshot is applied until then.
* Local writes. Between applies the caller may hold the write lock
  (``hold_write_lock``: a ``BEGIN IMMEDIATE`` left open on the applying connection;
  apply writes inside it and takes it again right after COMMIT), so app writes fail with
  "database is locked". A write that lands anyway (lock not held, or in the moment after
  a COMMIT) is detected: ``PRAGMA data_version`` on the applying connection changes only
  when another connection commits, and is checked by ``detect_local_writes`` and at the
  start of every apply. Another connection's TRUNCATE or RESTART checkpoint changes it
  too (measured with SQLite 3.50.4), so a changed value is confirmed by comparing every
  page with the checksum array; only a real difference counts. A detected write sets
  ``problem``: incremental files are refused (LocalWriteError) until a snapshot.
* Empty and deleted. An empty replica (an empty log, or a database file with no pages)
  is left without pages until its first snapshot, because the page size can only be
  chosen before the first page exists. That snapshot's transaction runs in
  rollback-journal mode (each page written once, not to the WAL and then the
  database); its page 1, with the WAL flags, puts the database in WAL mode. (A replica
  database that already has pages of another size is converted with
  ``journal_mode=DELETE``, ``page_size``, ``VACUUM``, which needs every other connection
  to it closed; otherwise ApplyError, and the caller retries.) A deletion file (commit
  0) cannot leave a database with no pages while it is open: it is applied as one
  transaction writing an empty page 1 (no tables, a new schema cookie, so open readers
  see an empty database) and truncating to it; the position becomes
  ``(max_txid, EMPTY_DB_CHECKSUM)`` and ``deleted`` is set. The caller then closes and
  removes the files (``remove_database_files``), as LiteFS does.
* Resync (docs/protocol.md §7, the flow in sidecar/resync.py). ``begin_resync`` takes
  the write lock (kept until the answer is applied or ``abort_resync``), reads every
  page once, keeping a page hash and a page checksum of each (8 bytes a page apiece:
  RESYNC_BEGIN, sent first, carries the checksum of them all) and returns the encoded
  request body. ``apply_resync`` takes the answer: a snapshot applies as usual; a resync
  file must have the checksum the replica sent as its pre-apply checksum (TXIDs are not
  checked: it follows from the replica's pages, not from its history), must hold page 1,
  and its post-apply checksum is predicted from the hashed pages' checksums and the
  file's pages, before a byte is written. The pages hashed are the physical ones (page 1
  with the replica's stamps); the file's page 1 replaces it, so the logical state after
  the apply is exact. A resync clears ``problem`` and a detected local write, and the
  log restarts with the answer alone (``LTXLog.restart_with``): its TXID may even be
  below the old log's (a replica that was ahead). If the write lock was lost or the
  database changed since the hashing, nothing is written (PositionMismatch).
* Files and descriptors. The database and its ``-shm`` are touched only through the
  one sqlean connection (DESIGN.md choice 3: closing any other descriptor on them would
  drop SQLite's POSIX locks). ``<db>-pos`` holds exactly 34 bytes,
  ``"%016x/%016x\\n"`` (TXID/post-apply checksum), replaced atomically (temporary file
  and a swap of names, see fileutil.replace_unsynced) after every apply and rewritten
  at open; it is a view of the log, so it is not fsynced.

Blocking I/O: the daemon runs a replica's methods in a worker thread; calls are
serialized by a lock.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import logging
import os
import shutil
import struct
import threading
from array import array
from collections.abc import ItemsView, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import sqlean

import ltx
from ltx import (
    EMPTY_DB_CHECKSUM,
    SQLITE_MAGIC,
    Header,
    PageChecksums,
    Pos,
    Trailer,
    lock_pgno,
    page_checksum,
)
from sidecar.fileutil import atomic_write, replace_unsynced
from sidecar.frames import (
    HASHES_PER_FRAME,
    LOCK_PAGE_HASH,
    ResyncBegin,
    encode,
    page_hash,
    resync_request_frames,
)
from sidecar.log import LogError, LTXLog
from sidecar.spool import Spool
from sidecar.sqlconn import close_quietly

log = logging.getLogger("ltx_sidecar.apply")

# Bytes of page 1 SQLite rewrites on every commit that writes page 1 (change counter,
# version-valid-for, library version): a replica's own values, not the primary's.
STAMPED_RANGES = ((24, 28), (92, 96), (96, 100))
PAGE1_MAGIC = b"LTXPAGE1"
_PAGE1_HEAD = struct.Struct(">8sQQ")  # magic, TXID, position checksum; then the page
_INSERT_PAGE = "INSERT INTO sqlite_dbpage(pgno, data) VALUES(?, ?)"
_WAL_SIZE_LIMIT = 16 << 20  # bytes of WAL file kept when the WAL restarts
_KEEP_DECODED = 8 << 20  # decoded pages kept up to this many bytes; decoded again beyond
_COPY_CHUNK = 1 << 20

Source = BinaryIO | Spool  # an LTX file to apply: a Spool can be moved into the log


class ApplyError(Exception):
    """An LTX file that cannot be applied, or an apply that failed; nothing was written.

    ``reason`` says why in words; ``path`` names the file when known.
    """

    def __init__(self, reason: str, *, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


class PositionMismatch(ApplyError):
    """The file does not follow from the replica's position (or that position is in
    doubt): the caller resyncs the database."""


class NotNext(PositionMismatch):
    """The file does not start at the replica's next TXID: the replica is behind or the
    file is old, not in doubt. The caller asks again from its position."""


class LocalWriteError(PositionMismatch):
    """Another connection wrote to the replica: it has diverged from its log."""


# -- page 1 ------------------------------------------------------------------------------


def mask_stamped(page1: bytes | bytearray | memoryview) -> bytes:
    """Page 1 with the 12 bytes SQLite stamps on commit set to zero."""
    out = bytearray(page1)
    for start, end in STAMPED_RANGES:
        out[start:end] = bytes(end - start)
    return bytes(out)


def wal_page1(page1: bytes | bytearray | memoryview) -> bytes:
    """Page 1 as the replica writes it: bytes 18 and 19 (journal mode) set to 2, WAL."""
    out = bytearray(page1)
    out[18] = out[19] = 2
    return bytes(out)


def physical_matches(physical: bytes, logical: bytes) -> bool:
    """True when the database's page 1 is what writing ``logical`` leaves: equal except
    in the 12 stamped bytes (and the journal-mode bytes, which the replica forces)."""
    return len(physical) == len(logical) and mask_stamped(physical) == mask_stamped(
        wal_page1(logical)
    )


def empty_page1(
    page_size: int, *, schema_cookie: int, text_encoding: int = 1, reserved: int = 0, wal: bool
) -> bytes:
    """Page 1 of a database with no tables (one page), as SQLite itself would write it."""
    page = bytearray(page_size)
    page[0:16] = SQLITE_MAGIC
    struct.pack_into(">H", page, 16, 1 if page_size == 65536 else page_size)
    page[18] = page[19] = 2 if wal else 1
    page[20], page[21], page[22], page[23] = reserved, 64, 32, 32
    struct.pack_into(
        ">IIIIIIIIIIIII",
        page,
        24,
        1,  # change counter
        1,  # database size in pages
        0,  # first freelist trunk page
        0,  # freelist pages
        schema_cookie & 0xFFFFFFFF,
        4,  # schema format
        0,  # default page cache size
        0,  # largest root b-tree (auto-vacuum off)
        text_encoding or 1,
        0,  # user version
        0,  # incremental vacuum
        0,  # application id
        0,  # reserved (first of five words)
    )
    version = sqlean.sqlite_version_info
    struct.pack_into(">II", page, 92, 1, version[0] * 1_000_000 + version[1] * 1000 + version[2])
    page[100] = 0x0D  # leaf table b-tree page: sqlite_schema, no cells
    # No freeblock, no cells, the cell content area starts at the usable end (0 = 65536).
    struct.pack_into(">HHHB", page, 101, 0, 0, (page_size - reserved) & 0xFFFF, 0)
    return bytes(page)


def format_pos(pos: Pos) -> bytes:
    """The ``<db>-pos`` file's content: ``TXID/checksum`` and a newline, 34 bytes."""
    return f"{pos.txid:016x}/{pos.post_apply_checksum:016x}\n".encode("ascii")


def pos_path_for(db_path: Path) -> Path:
    return Path(f"{db_path}-pos")


def read_page1_file(path: Path) -> tuple[int, int, bytes] | None:
    """(TXID, position checksum, logical page 1) from a replica's page1 file, or None."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("%s: cannot read: %s", path, exc)
        return None
    if len(data) < _PAGE1_HEAD.size + 512 or data[:8] != PAGE1_MAGIC:
        log.warning("%s: not a page1 file; ignoring it", path)
        return None
    _, txid, checksum = _PAGE1_HEAD.unpack_from(data)
    return int(txid), int(checksum), data[_PAGE1_HEAD.size :]


def remove_database_files(db_path: Path) -> list[Path]:
    """Remove a (closed) replica database with its -wal, -shm and -pos files.

    What the caller does after a deletion file was applied and the replica closed.
    """
    removed: list[Path] = []
    for p in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm"), pos_path_for(db_path)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def _first_page1(path: Path) -> bytes | None:
    """Page 1 of an LTX file if it holds one (pages come in order: it is the first)."""
    try:
        with open(path, "rb") as f:
            for pgno, data in ltx.open_decoder(f, path=str(path)).pages():
                return data if pgno == 1 else None
    except (OSError, ltx.LTXError) as exc:
        log.warning("%s: cannot read page 1 from the log file: %s", path, exc)
    return None


# -- internal values ----------------------------------------------------------------------


@dataclass(slots=True)
class _Physical:
    """The database as SQLite has it: geometry, page checksums (page 1 left out)."""

    page_size: int
    count: int
    sums: PageChecksums  # page 1 held as 0
    page1: bytes | None
    data_version: int


class _FileSums(Mapping[int, int]):
    """pgno -> page checksum for one file's pages, added in ascending order: two arrays
    and a byte per page of the database for membership, about 13 bytes a page where a
    dict and a list took about 140 (a 1 GB snapshot: 36 MB)."""

    def __init__(self) -> None:
        self.pgnos = array("I")
        self._values = array("Q")
        self._present = bytearray()

    def add(self, pgno: int, value: int) -> None:
        self.pgnos.append(pgno)
        self._values.append(value)
        if pgno >= len(self._present):
            self._present.extend(bytes(pgno + 1 - len(self._present)))
        self._present[pgno] = 1

    def __getitem__(self, pgno: int) -> int:
        i = bisect.bisect_left(self.pgnos, pgno)
        if i == len(self.pgnos) or self.pgnos[i] != pgno:
            raise KeyError(pgno)
        return self._values[i]

    def __contains__(self, pgno: object) -> bool:
        return isinstance(pgno, int) and 0 <= pgno < len(self._present) and self._present[pgno] == 1

    def __iter__(self) -> Iterator[int]:
        return iter(self.pgnos)

    def __len__(self) -> int:
        return len(self.pgnos)

    def items(self) -> ItemsView[int, int]:
        return _FileSumsItems(self)


class _FileSumsItems(ItemsView[int, int]):
    _mapping: _FileSums

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._mapping.pgnos, self._mapping._values, strict=True)


@dataclass(slots=True)
class _Prepared:
    """An LTX file ready to be written: decoded and verified, or (``unread``, a large
    snapshot) only opened: the write decodes it and checks it before COMMIT."""

    header: Header
    name: str
    source: Source  # the file, from ``start``; read again for the write when large
    start: int
    trailer: Trailer | None = None  # None until the whole file is decoded
    sums: _FileSums = field(default_factory=_FileSums)  # its pages and their checksums
    pages: list[bytes] | None = None  # the decoded pages, kept when they fit _KEEP_DECODED
    page1: bytes | None = None
    gap: list[int] = field(default_factory=list)  # pages the file grows into but omits
    post: int = 0  # predicted logical checksum after the apply
    unread: ltx.Decoder | None = None  # the decoder the write takes the pages from

    @property
    def end(self) -> Trailer:
        assert self.trailer is not None, "the file is not decoded yet"
        return self.trailer

    def take(self, decoder: ltx.Decoder) -> Iterator[tuple[int, bytes]]:
        """Decode the file, noting each page's number and checksum (and page 1)."""
        try:
            for pgno, data in decoder.pages():
                self.sums.add(pgno, page_checksum(pgno, data))
                if pgno == 1:
                    self.page1 = data
                yield pgno, data
        except ltx.LTXError as exc:
            raise ApplyError(f"invalid LTX file: {exc}", path=self.name) from exc
        self.trailer = decoder.trailer

    def decoded(self) -> Iterator[tuple[int, bytes]]:
        """The file's pages in order: decoded for the first time (``unread``), kept, or
        decoded again (a large file: its pages are not held or spooled, a second decode
        costs less than writing them out and reading them back). A file that changed
        since it was checked fails the decoder's file checksum, inside the apply's
        transaction: nothing is committed."""
        if self.unread is not None:
            decoder, self.unread = self.unread, None
            yield from self.take(decoder)
            return
        if self.pages is not None:
            yield from zip(self.sums.pgnos, self.pages, strict=True)
            return
        self.source.seek(self.start)
        decoded = ltx.open_decoder(self.source, path=self.name).pages()
        for (pgno, data), want in zip(decoded, self.sums.pgnos, strict=True):
            if pgno != want:
                raise ApplyError(f"the file changed while applying (page {pgno})", path=self.name)
            yield pgno, data


@dataclass(slots=True)
class _Hashed:
    """The replica's pages as hashed for a pending resync, under its write lock."""

    begin: ResyncBegin
    sums: PageChecksums  # checksums of the pages as hashed (physical page 1)
    data_version: int  # when hashed: must be unchanged when the answer is written
    was_held: bool  # the write lock was held before the resync (and stays held after)


class ReplicaDatabase:
    """One replica database: applies LTX files and keeps its log, position and -pos file."""

    def __init__(
        self,
        path: Path,
        ltx_log: LTXLog,
        *,
        busy_timeout: float = 5.0,
        page1_path: Path | None = None,
        durable: bool = True,
    ) -> None:
        self.path = Path(path)
        self.log = ltx_log
        self.pos_path = pos_path_for(self.path)
        self.page1_path = page1_path or ltx_log.directory.parent / "page1"
        self.busy_timeout = busy_timeout
        # durable=False: commits are not fsynced (synchronous=NORMAL); pair it with a log
        # opened with durable=False. A process crash loses nothing either way; after a
        # power loss the database and log may disagree, which open reports (resync).
        self.durable = durable
        self._mutex = threading.RLock()
        self._conn: Any = None
        self._held = False  # the write lock is held between applies
        self._held_primed = 0  # data_version when the held transaction's schema was loaded
        self._held_pages = -1  # the page count just before it began (-1: unknown)
        # The logical state: what the applied LTX files say the database holds.
        self._txid = 0
        self._pos_checksum = 0  # the position's checksum (0 before any file)
        self._page_size = 0
        self._sums = PageChecksums(4096)  # per-page checksums of the logical state
        self._page1: bytes | None = None
        self._deleted = False
        self._problem: str | None = None
        self._local_write = False  # the problem is a write by another connection
        self._data_version = 0
        self._resync: _Hashed | None = None  # a resync request sent, its answer awaited
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._connect()
            self._reconcile()
            self._data_version = self._read_data_version()
        except sqlean.Error as exc:
            self.close()
            raise ApplyError(f"cannot open the replica database: {exc}", path=str(path)) from exc
        except BaseException:
            self.close()
            raise
        problem = self.problem  # (a property: the methods above set it)
        if problem is None:
            self._write_pos_file()
        else:
            log.warning("%s: the database does not match its log: %s", self.path, problem)

    # -- public state ----------------------------------------------------------------------

    @property
    def pos(self) -> Pos:
        """(TXID, post-apply checksum) of the last file applied; Pos(0, 0) before any."""
        return Pos(self._txid, self._pos_checksum)

    @property
    def checksum(self) -> int:
        """The logical database checksum, from the checksum array."""
        return self._sums.checksum()

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def page_count(self) -> int:
        """Pages in the logical database (the last file's commit)."""
        return self._sums.pages

    @property
    def deleted(self) -> bool:
        """The last file applied was a deletion: the caller removes the files."""
        return self._deleted

    @property
    def problem(self) -> str | None:
        """Why the database is not known to be at ``pos`` (then resync), or None."""
        return self._problem

    @property
    def write_lock_held(self) -> bool:
        return self._held

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "pos": str(self.pos),
            "txid": f"{self._txid:016x}",
            "checksum": f"{self._pos_checksum:016x}",
            "page_size": self._page_size,
            "pages": self._sums.pages,
            "deleted": self._deleted,
            "problem": self._problem,
            "write_lock_held": self._held,
        }

    # -- lifecycle -------------------------------------------------------------------------

    def _connect(self) -> None:
        conn = sqlean.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=0
        )
        self._conn = conn
        conn.execute(f"PRAGMA busy_timeout={max(0, int(self.busy_timeout * 1000))}")
        # COMMIT durable before the pos file says so, unless durability is the primary's job.
        conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
        # The WAL file keeps the size of the largest transaction (a snapshot: the whole
        # database) unless SQLite may truncate it when the WAL restarts.
        conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        if self._page_count() > 0:
            self._ensure_wal()
            return
        # No pages yet: set the page size the log knows before WAL mode creates page 1.
        last = self.log.last_header
        if last is not None and last.commit > 0:
            conn.execute(f"PRAGMA page_size={last.page_size}")
            self._ensure_wal()

    def _ensure_wal(self) -> None:
        conn = self._conn
        mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        if mode != "wal":
            mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
            if mode != "wal":
                raise ApplyError(f"cannot switch the database to WAL mode (got {mode!r})")
            log.info("%s: switched the replica database to WAL mode", self.path)

    def close(self) -> None:
        """Release the write lock and close the connection (idempotent)."""
        with self._mutex:
            conn, self._conn = self._conn, None
            self._held = False
            self._resync = None
            close_quietly(conn)

    def __enter__(self) -> ReplicaDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> Any:
        if self._conn is None:
            raise ApplyError("the replica database is closed", path=str(self.path))
        return self._conn

    # -- reading the database --------------------------------------------------------------

    def _page_count(self) -> int:
        return int(self._conn.execute("PRAGMA page_count").fetchone()[0])

    def _read_data_version(self) -> int:
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def _purge_cache(self) -> None:
        """Drop the connection's page cache (see the module docstring: stale b-tree pages)."""
        with contextlib.suppress(sqlean.Error):
            self._conn.execute("PRAGMA shrink_memory")

    @contextlib.contextmanager
    def _read_txn(self) -> Iterator[None]:
        """A read transaction, unless one (the held write lock) is open already."""
        conn = self._conn
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN")
        try:
            yield
        finally:
            with contextlib.suppress(sqlean.Error):
                conn.execute("COMMIT")

    def _read_physical(self) -> _Physical:
        """Every page of the database through sqlite_dbpage, in one read transaction."""
        conn = self._conn
        self._purge_cache()
        with self._read_txn():
            page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            version = self._read_data_version()
            sums = PageChecksums(page_size)
            page1: bytes | None = None
            if self._page_count() > 0:
                cursor = conn.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno")
                for pgno_, data in cursor:
                    pgno = int(pgno_)
                    if pgno == 1:
                        page1 = bytes(data)
                        sums.set(1, 0)  # page 1 is compared apart (SQLite stamps it)
                    else:
                        sums.set(pgno, page_checksum(pgno, data))
        return _Physical(page_size, sums.pages, sums, page1, version)

    # -- the logical state -----------------------------------------------------------------

    def _set_empty(self, pos: Pos, *, deleted: bool) -> None:
        self._txid = pos.txid
        self._pos_checksum = pos.post_apply_checksum
        self._sums = PageChecksums(self._page_size or 4096)
        self._page1 = None
        self._deleted = deleted

    def _adopt(self, phys: _Physical, page1: bytes, pos: Pos) -> None:
        """Take the database's pages, with ``page1`` as the logical page 1, as the state."""
        sums = phys.sums.copy()
        sums.set(1, page_checksum(1, page1))
        self._sums = sums
        self._page_size = phys.page_size
        self._page1 = page1
        self._txid = pos.txid
        self._pos_checksum = pos.post_apply_checksum or self.checksum
        self._deleted = False

    def _read_page1_file(self) -> tuple[int, bytes] | None:
        """(TXID, image) from the page1 file, or None when missing or unreadable."""
        found = read_page1_file(self.page1_path)
        return None if found is None else (found[0], found[2])

    def _write_page1_file(self, page1: bytes) -> None:
        with atomic_write(self.page1_path, durable=self.durable) as f:
            f.write(_PAGE1_HEAD.pack(PAGE1_MAGIC, self._txid, self._pos_checksum))
            f.write(page1)

    def _keep_page1_file(self) -> None:
        """Write the page1 file again when page 1 had to come from the log."""
        stored = self._read_page1_file()
        if self._page1 is not None and (stored is None or stored[1] != self._page1):
            log.info("%s: page 1 recovered from the log; writing the page1 file", self.path)
            try:
                self._write_page1_file(self._page1)
            except OSError as exc:
                log.error("%s: cannot write the page1 file: %s", self.page1_path, exc)

    def _write_pos_file(self) -> None:
        """Replace ``<db>-pos`` atomically (temporary file and rename, no fsync).

        The temporary name is fixed (the replica is the only writer, and a stale one
        from a crash is simply overwritten): a random name costs more than the write.
        No position (an empty log, e.g. a copy dropped for a snapshot) leaves the file
        as it was: a reader following it must never see its position go backwards.
        """
        if self._txid == 0:
            return
        try:
            tmp = f"{self.path.parent}/.{self.path.name}-pos.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(format_pos(self.pos))
                replace_unsynced(tmp, self.pos_path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.error("%s: cannot write the position file: %s", self.pos_path, exc)

    def _page1_candidates(self, files: list[Path]) -> Iterator[bytes]:
        """Images that may be the logical page 1 at the end of ``files``, likeliest first:
        the page1 file, then the newest of ``files`` that holds page 1."""
        stored = self._read_page1_file()
        if stored is not None:
            yield stored[1]
        for path in reversed(files):
            image = _first_page1(path)
            if image is not None:
                if stored is None or image != stored[1]:
                    yield image
                return

    def _match(
        self,
        phys: _Physical,
        pos: Pos,
        *,
        page_size: int,
        commit: int | None,
        files: list[Path],
        verify: bool,
    ) -> str | None:
        """Adopt the database as being at ``pos`` if it provably is; else say why not."""
        at = f"TXID {pos.txid} ({pos})"
        if phys.count == 0 or phys.page1 is None:
            return f"the database has no pages, the log is at {at}"
        if phys.page_size != page_size:
            return f"the database's page size is {phys.page_size}, the log's {page_size}"
        if commit is not None and phys.count != commit:
            return f"the database has {phys.count} pages, the log says {commit} at {at}"
        fits = False
        got: list[int] = []
        for image in self._page1_candidates(files):
            if not physical_matches(phys.page1, image):
                continue
            fits = True
            candidate = phys.sums.copy()
            candidate.set(1, page_checksum(1, image))
            checksum = candidate.checksum()
            if not verify or checksum == pos.post_apply_checksum:
                self._adopt(phys, image, pos)
                return None
            got.append(checksum)
        if not fits:
            return (
                f"page 1 differs from every page 1 the log and the page1 file hold, beyond "
                f"the 12 bytes SQLite stamps (log at {at})"
            )
        return (
            f"the database's checksum is {got[0]:016x}, the log says "
            f"{pos.post_apply_checksum:016x} at {at}"
        )

    def _reconcile(self) -> None:
        """Set the logical state from the log and check the database against it."""
        self._problem = None
        pos, last = self.log.pos, self.log.last_header
        if pos is None or last is None:
            self._set_empty(Pos(0, 0), deleted=False)
            return
        if last.commit == 0:
            self._set_empty(pos, deleted=True)
            phys = self._read_physical()
            self._page_size = phys.page_size
            if not _physically_empty(phys):
                log.warning(
                    "%s: the log ends with a deletion at TXID %d but the database has pages "
                    "(an interrupted apply); emptying it again",
                    self.path,
                    pos.txid,
                )
                try:
                    self._write_empty(wal=True)
                except ApplyError as exc:
                    self._problem = f"the log ends with a deletion; emptying failed: {exc}"
            return
        files = [p for _, _, p in self.log]
        phys = self._read_physical()
        self._data_version = phys.data_version  # what the pages below were read at
        reason = self._match(
            phys,
            pos,
            page_size=last.page_size,
            commit=last.commit,
            files=files,
            verify=not last.no_checksum,
        )
        if reason is None:
            if last.no_checksum:
                log.info("%s: the log's last file has no checksums; not verified", self.path)
            self._keep_page1_file()
            return
        # Killed after appending the last file to the log and before COMMIT: the database
        # is where that file starts. Apply it again from the log.
        again = last.is_snapshot
        if not again and not last.no_checksum:
            pre = Pos(last.min_txid - 1, last.pre_apply_checksum)
            again = (
                self._match(
                    phys, pre, page_size=last.page_size, commit=None, files=files[:-1], verify=True
                )
                is None
            )
        if again:
            log.warning(
                "%s: %s; %s: applying it again",
                self.path,
                reason,
                f"the log ends with the snapshot {files[-1].name}, which applies over anything"
                if last.is_snapshot
                else f"the database is where the log's last file {files[-1].name} starts (an "
                "interrupted apply)",
            )
            try:
                with open(files[-1], "rb") as f:
                    prepared = self._prepare(f, str(files[-1]))
                    self._check(prepared, append=False)
                    self._write(prepared, None)
                return
            except (OSError, ApplyError) as exc:
                reason = f"{reason}; applying the log's last file again failed: {exc}"
        self._set_empty(pos, deleted=False)
        self._page_size = last.page_size
        self._problem = reason

    # -- applying --------------------------------------------------------------------------

    def apply(self, ltx_file: Source, *, path: str | None = None) -> Pos:
        """Apply one LTX file (seekable, read from its current offset); return the position.

        Raises PositionMismatch when the file does not follow from the replica's position
        (LocalWriteError when the replica was written locally), ApplyError for anything
        else; nothing is written then. On success the file is in the log and the
        ``<db>-pos`` file holds the new position.
        """
        with self._mutex:
            self._require_open()
            self._require_no_resync(path)
            prepared = self._prepare(ltx_file, path, defer=True)
            if prepared.unread is None:
                self._check(prepared, append=True)
            else:  # its header now, the rest once the write has decoded it, before COMMIT
                self._check_log(prepared)
            self._write(prepared, ltx_file)
            return self.pos

    def _prepare(self, f: Source, path: str | None, *, defer: bool = False) -> _Prepared:
        """Decode and verify the whole file, keeping its pages when they are few. With
        ``defer``, a large snapshot is only opened: the write decodes it once and checks
        it before COMMIT (``_rows``), instead of a decode to check and another to write."""
        start = f.tell()
        try:
            decoder = ltx.open_decoder(f, path=path)
        except ltx.LTXError as exc:
            raise ApplyError(f"invalid LTX file: {exc}", path=path) from exc
        header = decoder.header
        name = path or ltx.format_filename(header.min_txid, header.max_txid)
        p = _Prepared(header, name, f, start)
        if defer and header.is_snapshot and header.commit * header.page_size > _KEEP_DECODED:
            p.unread = decoder
            return p
        keep = _KEEP_DECODED // header.page_size
        pages: list[bytes] | None = []
        for _, data in p.take(decoder):
            if pages is not None:
                pages.append(data)
                if len(pages) > keep:
                    pages = None
        p.pages = pages
        return p

    def _check(self, p: _Prepared, *, append: bool) -> None:
        """Every check that can fail before a byte is written; sets the prediction."""
        h = p.header
        if not h.is_snapshot:
            if self._problem is not None:
                cls = LocalWriteError if self._local_write else PositionMismatch
                raise cls(
                    f"the replica is not known to be at TXID {self._txid}: {self._problem}",
                    path=p.name,
                )
            if h.min_txid != self._txid + 1:
                raise NotNext(
                    f"the file starts at TXID {h.min_txid}, the replica is at TXID "
                    f"{self._txid} (want {self._txid + 1})",
                    path=p.name,
                )
            current = self.checksum
            if not h.no_checksum and h.pre_apply_checksum != current:
                raise PositionMismatch(
                    f"pre-apply checksum {h.pre_apply_checksum:016x} is not the replica's "
                    f"checksum {current:016x} at TXID {self._txid}",
                    path=p.name,
                )
            if h.commit > 0 and self._sums.pages > 0 and h.page_size != self._page_size:
                raise ApplyError(
                    f"page size {h.page_size} differs from the replica's {self._page_size}",
                    path=p.name,
                )
            if h.commit > 0 and self._page1 is None and p.page1 is None:
                raise ApplyError(
                    "the file has no page 1 and the replica has none either", path=p.name
                )
        p.post = self._predict(p)
        if not h.no_checksum and p.post != p.end.post_apply_checksum:
            raise ApplyError(
                f"applying the file would give checksum {p.post:016x}, its trailer says "
                f"{p.end.post_apply_checksum:016x}",
                path=p.name,
            )
        if append:
            self._check_log(p)

    def _check_log(self, p: _Prepared) -> None:
        try:
            self.log.check(p.header)
        except LogError as exc:
            raise ApplyError(
                f"the replica's LTX log refuses the file: {exc.message}", path=p.name
            ) from exc

    def _predict(self, p: _Prepared) -> int:
        """The logical checksum after the file, from the checksums and the file's pages."""
        h = p.header
        base = self._sums
        if h.is_snapshot or base.pages == 0 or base.page_size != h.page_size:
            base = PageChecksums(h.page_size)  # a snapshot replaces everything
        p.gap = base.growth_gap(p.sums, h.commit)
        return base.after(p.sums, h.commit)

    def _prime(self) -> int:
        """Outside any transaction: load the schema, then drop every cached page.

        Returns the data_version read first. A write transaction begun right after, in
        which that value is still current, holds no page parsed by the b-tree layer, so the
        schema reload SQLite makes after page 1 is rewritten (at the truncation row) parses
        the new pages, not stale ones ("database disk image is malformed" otherwise,
        measured with a deletion: page 1 going from rows to none).
        """
        conn = self._conn
        version = self._read_data_version()
        conn.execute("SELECT 1 FROM sqlite_schema LIMIT 0").fetchall()
        conn.execute("PRAGMA shrink_memory")
        return version

    def _begin_write(self, *, check_local: bool, name: str) -> int:
        """Start the apply's write transaction (or continue the held one); return the
        data_version seen in it, which stays the baseline after our own COMMIT.

        With ``check_local``, a commit by another connection since the last apply is a
        local write (LocalWriteError) unless every page still matches. Otherwise a commit
        by another connection after the schema was loaded restarts the transaction.
        """
        conn = self._conn
        for _ in range(5):
            if conn.in_transaction:
                primed = self._held_primed
            else:
                primed = self._prime()
                conn.execute("BEGIN IMMEDIATE")
            version = self._read_data_version()
            if check_local:
                if version != self._data_version:
                    self._check_no_local_writes(name)
                return version
            if version == primed:
                return version
            conn.execute("ROLLBACK")
        raise ApplyError("other connections keep writing the replica; try again", path=name)

    def _rows(self, p: _Prepared, physical_count: int) -> Iterator[tuple[int, bytes | None]]:
        """The sqlite_dbpage rows of one apply: pages ascending, the zero pages of a
        growth gap among them, page 1 last, then the truncation row when the database
        shrinks."""
        zeros = bytes(p.header.page_size)
        if p.unread is not None:  # checked once decoded; only then is the gap known
            yield from ((pgno, data) for pgno, data in p.decoded() if pgno != 1)
            self._check(p, append=True)
            yield from ((pgno, zeros) for pgno in p.gap)
        else:
            gap = ((pgno, zeros) for pgno in p.gap)
            for pgno, data in heapq.merge(p.decoded(), gap, key=_first):
                if pgno != 1:
                    yield pgno, data
        if p.page1 is not None:
            yield 1, wal_page1(p.page1)
        if p.header.commit < physical_count:
            yield p.header.commit + 1, None

    def _write(
        self,
        p: _Prepared,
        source: Source | None,
        *,
        restart: bool = False,
        hashed: _Hashed | None = None,
    ) -> None:
        """Write a checked file in one transaction; append it to the log (unless it came
        from there, ``source`` None; with ``restart`` the log restarts with it) before
        COMMIT; then move the state. ``hashed``: a resync file, applied to those pages."""
        h = p.header
        conn = self._conn
        held = self._held
        if h.commit == 0:
            self._write_empty(wal=True, prepared=p, source=source)
        else:
            self._fit_page_size(h.page_size)
            new = self._sums.pages == 0 and self._no_file_yet()
            appended = False
            try:
                # A snapshot replaces every page: a local write before it does not matter.
                if hashed is None:
                    version = self._begin_write(check_local=not h.is_snapshot, name=p.name)
                else:
                    version = self._continue_resync(hashed, p.name)
                physical = self._page_count()
                conn.executemany(_INSERT_PAGE, self._rows(p, physical))
                if source is not None:
                    self._append(source, p, restart=restart)
                    appended = True
                conn.execute("COMMIT")
            except BaseException as exc:
                self._abort(held)
                if appended:
                    self._log_ahead(p.name, exc)
                _reraise(exc, p.name)
            self._purge_cache()
            # Our own commit does not change our data_version; nobody else could write
            # while we held the write lock, so the value read inside stays the baseline.
            self._data_version = self._first_commit_baseline(version) if new else version
            if hashed is not None:
                self._sums = hashed.sums  # the file applies to the pages as hashed
            self._advance(p)
        if p.page1 is not None:
            try:
                self._write_page1_file(p.page1)
            except OSError as exc:
                log.error("%s: cannot write the page1 file: %s", self.page1_path, exc)
        self._write_pos_file()
        if held:
            self._retake_lock()

    def _no_file_yet(self) -> bool:
        """The database file is empty: SQLite has not written its first page (a stat,
        not a descriptor: see "Files and descriptors")."""
        try:
            return self.path.stat().st_size == 0
        except FileNotFoundError:
            return True

    def _first_commit_baseline(self, version: int) -> int:
        """The data_version baseline after the first commit into a database that had no
        pages. That commit (rollback-journal mode, see _fit_page_size) puts the database
        in WAL mode, which changes data_version for this connection too (measured): kept,
        the baseline would make the next check scan every page. The new value is taken
        when no other connection can have committed before it was read: the WAL then
        holds no frame (our commit wrote none; a checkpoint of another's would need the
        WAL restarted too, in those microseconds)."""
        with contextlib.suppress(sqlean.Error):
            after = self._read_data_version()
            frames = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
            if frames == 0:
                return after
        return version

    def _log_ahead(self, name: str, exc: BaseException) -> None:
        self._problem = (
            f"the log holds {name} but the database commit failed ({exc}); reopen the "
            f"replica to apply it again"
        )
        self._local_write = False
        log.error("%s: %s", self.path, self._problem)

    def _append(self, source: Source, p: _Prepared, *, restart: bool = False) -> None:
        def write(out: BinaryIO) -> None:
            source.seek(p.start)
            shutil.copyfileobj(source, out, _COPY_CHUNK)

        if restart:
            self.log.restart_with(write)
        elif source.seek(0, os.SEEK_END) - p.start <= _COPY_CHUNK:  # most files: one read
            source.seek(p.start)
            self.log.append(source.read())
        elif p.start == 0 and isinstance(source, Spool):  # moved in, not copied
            self.log.append(write, link=source.link_to)
        else:
            self.log.append(write)

    def _abort(self, held: bool) -> None:
        conn = self._conn
        with contextlib.suppress(sqlean.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        self._purge_cache()
        self._held = False
        self._shrink_wal()
        if held:
            self._retake_lock()

    def _shrink_wal(self) -> None:
        """After a failed apply: a WAL grown past the limit by the rolled-back pages is
        truncated now. Those pages are junk, and the space is what the next attempt
        needs (a snapshot that failed on a full disk left a WAL as large as the database,
        so every later attempt failed sooner)."""
        wal = Path(f"{self.path}-wal")
        try:
            size = wal.stat().st_size
        except FileNotFoundError:
            return
        if size <= _WAL_SIZE_LIMIT:
            return
        try:
            busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlean.Error as exc:
            log.warning("%s: cannot truncate the WAL after a failed apply: %s", self.path, exc)
            return
        log.info(
            "%s: truncated the WAL (%.1f MB) after a failed apply%s",
            self.path,
            size / 1e6,
            " (readers kept part of it)" if busy else "",
        )

    def _advance(self, p: _Prepared) -> None:
        """Move the logical state through a file that was just committed."""
        h = p.header
        if h.is_snapshot or self._sums.pages == 0 or self._sums.page_size != h.page_size:
            self._sums = PageChecksums(h.page_size)
        self._sums.update(p.sums, h.commit)  # growth gap pages become zero pages
        self._page_size = h.page_size
        if p.page1 is not None:
            self._page1 = p.page1
        self._txid = h.max_txid
        self._pos_checksum = p.end.post_apply_checksum if not h.no_checksum else p.post
        self._deleted = False
        self._problem = None
        self._local_write = False
        if self.checksum != p.post:  # the prediction and the state must move alike
            self._problem = (
                f"internal error: the checksum array gives {self.checksum:016x} after "
                f"{p.name}, the prediction was {p.post:016x}"
            )
            log.error("%s: %s", self.path, self._problem)

    def _write_empty(
        self, *, wal: bool, prepared: _Prepared | None = None, source: Source | None = None
    ) -> None:
        """One transaction leaving a database with no tables (a deletion file, or the
        first step of a page size change); with ``prepared`` the state becomes deleted
        (and the file is logged when ``source`` is given)."""
        conn = self._conn
        held = self._held
        appended = False
        name = prepared.name if prepared is not None else str(self.path)
        try:
            version = self._begin_write(check_local=False, name=name)
            physical = self._page_count()
            rows: list[tuple[int, bytes | None]] = []
            if physical > 0:
                old = bytes(
                    conn.execute("SELECT data FROM sqlite_dbpage WHERE pgno = 1").fetchone()[0]
                )
                cookie, encoding = struct.unpack_from(">I12xI", old, 40)
                image = empty_page1(
                    len(old),
                    schema_cookie=cookie + 1,
                    text_encoding=encoding,
                    reserved=old[20],
                    wal=wal,
                )
                rows.append((1, image))
                if physical > 1:
                    rows.append((2, None))
            if rows:
                conn.executemany(_INSERT_PAGE, rows)
            if prepared is not None and source is not None:
                self._append(source, prepared)
                appended = True
            conn.execute("COMMIT")
        except BaseException as exc:
            self._abort(held)
            if appended:
                self._log_ahead(name, exc)
            _reraise(exc, name)
        self._purge_cache()
        self._data_version = version
        if prepared is not None:
            h = prepared.header
            self._set_empty(Pos(h.max_txid, EMPTY_DB_CHECKSUM), deleted=True)
            self._problem = None
            self._local_write = False
            with contextlib.suppress(OSError):
                self.page1_path.unlink()

    def _fit_page_size(self, page_size: int) -> None:
        """Give the database ``page_size`` before writing pages of that size.

        Only reached when the database may be replaced wholesale (a snapshot, or an empty
        replica): other page sizes are refused earlier.
        """
        conn = self._conn
        current = int(conn.execute("PRAGMA page_size").fetchone()[0])
        count = self._page_count()
        if count > 0 and current == page_size:
            return
        held = self._held
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        self._held = False
        try:
            if count == 0:
                # Not WAL mode yet: the first transaction runs in rollback-journal mode,
                # writing each page once (not to the WAL and then the database), and
                # its page 1, with the WAL flags, puts the database in WAL mode.
                conn.execute(f"PRAGMA page_size={page_size}")
                return
            log.warning(
                "%s: changing the replica's page size from %d to %d for a snapshot",
                self.path,
                current,
                page_size,
            )
            try:
                mode = str(conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]).lower()
            except sqlean.Error as exc:
                raise ApplyError(
                    f"the page size must change from {current} to {page_size}, which needs "
                    f"every other connection to the replica closed: {exc}",
                    path=str(self.path),
                ) from exc
            if mode != "delete":
                raise ApplyError(
                    f"the page size must change from {current} to {page_size}, but leaving "
                    f"WAL mode gave {mode!r}: other connections hold the replica open",
                    path=str(self.path),
                )
            if self._sums.pages > 0:
                self._problem = "the database was emptied to change its page size"
            self._write_empty(wal=False)
            conn.execute(f"PRAGMA page_size={page_size}")
            conn.execute("VACUUM")
            self._ensure_wal()
            got = int(conn.execute("PRAGMA page_size").fetchone()[0])
            if got != page_size:
                raise ApplyError(f"changing the page size to {page_size} gave {got}")
        except sqlean.Error as exc:
            _reraise(exc, str(self.path))
        finally:
            if count > 0:
                with contextlib.suppress(ApplyError, sqlean.Error):
                    self._ensure_wal()
            self._purge_cache()
            if held:
                self._retake_lock()

    # -- local writes ----------------------------------------------------------------------

    def _difference(self) -> str | None:
        """How the database differs from the logical state (a full scan), or None."""
        phys = self._read_physical()
        if self._sums.pages == 0:
            return None if _physically_empty(phys) else "the database should have no tables"
        if phys.page_size != self._page_size:
            return f"page size {phys.page_size}, want {self._page_size}"
        if phys.count != self._sums.pages:
            return f"the database has {phys.count} pages, want {self._sums.pages}"
        assert self._page1 is not None
        if phys.page1 is None or not physical_matches(phys.page1, self._page1):
            return "page 1 differs"
        for pgno in range(2, phys.count + 1):
            if phys.sums[pgno] != self._sums[pgno]:
                return f"page {pgno} differs"
        return None

    def _local_write_reason(self) -> str | None:
        """None if nobody else wrote since our last look; else what differs.

        Run inside a transaction, so the data_version read and the pages scanned are of
        the same snapshot.
        """
        version = self._read_data_version()
        if version == self._data_version:
            return None
        difference = self._difference()
        if difference is None:  # e.g. an app's TRUNCATE checkpoint: nothing changed
            self._data_version = version
            return None
        return f"the database was written by another connection: {difference}"

    def _check_no_local_writes(self, name: str) -> None:
        """Inside the apply's write transaction: refuse to build on a local write."""
        reason = self._local_write_reason()
        if reason is not None:
            self._set_local_write(reason)
            raise LocalWriteError(reason, path=name)

    def _set_local_write(self, reason: str) -> None:
        self._problem = reason
        self._local_write = True
        log.warning("%s: %s; the replica needs a resync", self.path, reason)

    def detect_local_writes(self) -> bool:
        """True when another connection has changed the database since the last apply.

        Cheap when nothing happened (one PRAGMA data_version); a changed data_version is
        confirmed by comparing every page with the checksum array. A detected write sets
        ``problem``, so incremental files are refused until a snapshot or resync.
        """
        with self._mutex:
            self._require_open()
            if self._local_write:
                return True
            try:
                with self._read_txn():
                    reason = self._local_write_reason()
            except sqlean.Error as exc:
                reason = f"the database was written by another connection: unreadable ({exc})"
            if reason is None:
                return False
            self._set_local_write(reason)
            return True

    def verify(self) -> str | None:
        """Compare the whole database with the logical state; the difference, or None."""
        with self._mutex:
            self._require_open()
            if self._problem is not None:
                return self._problem
            return self._difference()

    # -- the write lock --------------------------------------------------------------------

    def hold_write_lock(self) -> None:
        """Hold SQLite's write lock between applies, so app writes fail ("database is
        locked") rather than diverge the replica. Raises ApplyError if it is busy."""
        with self._mutex:
            self._require_open()
            if self._resync is not None:
                self._resync.was_held = True  # and stays held after the resync
            if self._held:
                return
            try:
                self._begin_held()
            except sqlean.Error as exc:
                raise ApplyError(f"cannot take the write lock: {exc}", path=str(self.path)) from exc

    def release_write_lock(self) -> None:
        """Let app writes through again (ends a pending resync: its pages may change)."""
        with self._mutex:
            self._resync = None
            self._held = False
            conn = self._conn
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")

    def _begin_held(self) -> None:
        if not self._conn.in_transaction:
            before = self._read_data_version()
            pages = self._page_count()  # read before BEGIN: see _hash_pages
            self._held_primed = self._prime()
            self._held_pages = pages if self._held_primed == before else -1
            self._conn.execute("BEGIN IMMEDIATE")
        self._held = True

    def _retake_lock(self) -> None:
        try:
            self._begin_held()
        except sqlean.Error as exc:
            self._held = False
            log.warning("%s: could not take the write lock again: %s", self.path, exc)

    def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """Checkpoint the replica's WAL on the applying connection (its own checkpoints do
        not look like local writes); the write lock is released meanwhile."""
        if mode.upper() not in {"PASSIVE", "FULL", "RESTART", "TRUNCATE"}:
            raise ValueError(f"unknown checkpoint mode {mode!r}")
        with self._mutex:
            conn = self._require_open()
            self._require_no_resync(str(self.path))
            held = self._held
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            try:
                row = conn.execute(f"PRAGMA wal_checkpoint({mode.upper()})").fetchone()
            finally:
                if held:
                    self._retake_lock()
            return int(row[0]), int(row[1]), int(row[2])

    # -- page-hash resync ------------------------------------------------------------------

    @property
    def resync_pending(self) -> bool:
        """A resync request was made and its answer is awaited (the write lock is held)."""
        return self._resync is not None

    def begin_resync(
        self,
        *,
        epoch: int,
        node_id: str,
        name: str | None = None,
        per_frame: int = HASHES_PER_FRAME,
    ) -> Iterator[bytes]:
        """Start a page-hash resync; return the encoded POST /resync body, frame by frame.

        Takes the write lock and reads every page once (see the module docstring); the
        lock stays held until ``apply_resync`` or ``abort_resync``. The iterator only
        encodes frames from what was read, so any thread may drain it. ``name`` is the
        database's name in the cluster (default: the file name). Raises ApplyError when
        the lock cannot be taken or the pages cannot be read; nothing is held then.
        """
        with self._mutex:
            self._require_open()
            self._require_no_resync(str(self.path))
            was_held = self._held
            try:
                self._begin_held()
                page_size, sums, hashes, version = self._hash_pages()
            except BaseException as exc:
                if not was_held:
                    self.release_write_lock()
                if isinstance(exc, sqlean.Error):
                    raise ApplyError(
                        f"cannot read the database for a resync: {exc}", path=str(self.path)
                    ) from exc
                raise
            begin = ResyncBegin(
                epoch,
                node_id,
                name or self.path.name,
                page_size,
                sums.pages,
                self._txid,
                sums.checksum(),
            )
            self._resync = _Hashed(begin, sums, version, was_held)
            log.info(
                "%s: resync requested: %d page(s) of %d bytes hashed, checksum %016x",
                self.path,
                sums.pages,
                page_size,
                begin.checksum,
            )
        return (encode(f) for f in resync_request_frames(begin, hashes, per_frame=per_frame))

    def _hash_pages(self) -> tuple[int, PageChecksums, array[int], int]:
        """Inside the write lock: (page size, page checksums, page hashes, data_version)."""
        conn = self._conn
        self._purge_cache()
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        version = self._read_data_version()
        count = self._page_count()
        if count == 1 and self._held_pages == 0 and version == self._held_primed:
            # An empty file: a write transaction sees the page 1 SQLite would create.
            count = 0
        lock = lock_pgno(page_size)
        sums = PageChecksums(page_size)
        hashes: array[int] = array("Q")
        if count > 0:
            for pgno_, data in conn.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno"):
                pgno = int(pgno_)
                if pgno != len(hashes) + 1:
                    raise ApplyError(f"sqlite_dbpage gave page {pgno} after page {len(hashes)}")
                if pgno == lock:
                    hashes.append(LOCK_PAGE_HASH)
                    sums.set(pgno, 0)
                else:
                    hashes.append(page_hash(data))
                    sums.set(pgno, page_checksum(pgno, data))
        if len(hashes) != count:
            raise ApplyError(f"read {len(hashes)} page(s), the database has {count}")
        return page_size, sums, hashes, version

    def apply_resync(self, ltx_file: Source, *, path: str | None = None) -> Pos:
        """Apply the answer to the pending resync (seekable, read from its offset).

        Verified in full before anything is written (see the module docstring); on
        success the log holds only this file, ``problem`` is cleared and the position
        is the primary's. Either way the resync ends and the write lock goes back to
        how it was before ``begin_resync``. Raises PositionMismatch when the file was
        made for other pages than those hashed, ApplyError for anything else.
        """
        with self._mutex:
            self._require_open()
            hashed, self._resync = self._resync, None
            if hashed is None:
                raise ApplyError("no resync in progress: call begin_resync first", path=path)
            try:
                prepared = self._prepare(ltx_file, path)
            except BaseException:
                self._end_resync(hashed)
                raise
            try:
                self._check_resync(prepared, hashed)
            except BaseException:
                self._end_resync(hashed)
                raise
            self._held = hashed.was_held  # _write re-takes the lock only if it was held
            snapshot = prepared.header.is_snapshot
            self._write(prepared, ltx_file, restart=True, hashed=None if snapshot else hashed)
            log.warning(
                "%s: resynced to TXID %d with %s of %d page(s)",
                self.path,
                self._txid,
                "a snapshot" if snapshot else "a resync file",
                len(prepared.sums),
            )
            return self.pos

    def abort_resync(self) -> None:
        """Give up a pending resync (the request failed): the write lock goes back to how
        it was before ``begin_resync``."""
        with self._mutex:
            hashed, self._resync = self._resync, None
            if hashed is not None and self._conn is not None:
                self._end_resync(hashed)

    def _end_resync(self, hashed: _Hashed) -> None:
        if not hashed.was_held:
            self.release_write_lock()

    def _require_no_resync(self, name: str | None) -> None:
        if self._resync is not None:
            raise ApplyError(
                "a resync is in progress: apply its answer (apply_resync) or abort it first",
                path=name,
            )

    def _check_resync(self, p: _Prepared, hashed: _Hashed) -> None:
        """Every check of a resync answer that can fail before a byte is written."""
        h = p.header
        begin = hashed.begin
        if h.commit == 0:
            raise ApplyError("a resync answer must hold pages, not a deletion", path=p.name)
        if h.no_checksum:
            raise ApplyError("a resync answer must carry checksums", path=p.name)
        if h.is_snapshot:
            p.post = self._predict(p)
        else:
            if h.min_txid != h.max_txid:
                raise ApplyError(
                    f"a resync file holds one TXID, not {h.min_txid}-{h.max_txid}", path=p.name
                )
            if h.page_size != begin.page_size or begin.page_count == 0:
                raise ApplyError(
                    f"a resync file of page size {h.page_size} for a replica of "
                    f"{begin.page_count} page(s) of {begin.page_size} bytes: it needs a snapshot",
                    path=p.name,
                )
            if h.pre_apply_checksum != begin.checksum:
                raise PositionMismatch(
                    f"pre-apply checksum {h.pre_apply_checksum:016x} is not the checksum "
                    f"{begin.checksum:016x} the replica sent with its page hashes",
                    path=p.name,
                )
            if p.page1 is None:
                raise ApplyError("a resync file must hold page 1", path=p.name)
            p.gap = hashed.sums.growth_gap(p.sums, h.commit)
            p.post = hashed.sums.after(p.sums, h.commit)
        if p.post != p.end.post_apply_checksum:
            raise ApplyError(
                f"applying the resync answer would give checksum {p.post:016x}, its trailer "
                f"says {p.end.post_apply_checksum:016x}",
                path=p.name,
            )

    def _continue_resync(self, hashed: _Hashed, name: str) -> int:
        """In the write transaction of a resync file: the pages are still those hashed."""
        if not self._conn.in_transaction:
            raise PositionMismatch(
                "the write lock was released since the pages were hashed; resync again",
                path=name,
            )
        if self._read_data_version() != hashed.data_version:
            raise PositionMismatch(
                "the database changed since its pages were hashed; resync again", path=name
            )
        return hashed.data_version


def _physically_empty(phys: _Physical) -> bool:
    """No pages, or one page whose schema table has no rows."""
    if phys.count == 0:
        return True
    return phys.count == 1 and phys.page1 is not None and phys.page1[103:105] == b"\x00\x00"


def _first(row: tuple[int, bytes]) -> int:
    return row[0]


def _reraise(exc: BaseException, name: str) -> NoReturn:
    """Raise ``exc`` as an ApplyError when it is a SQLite, I/O or LTX failure."""
    if isinstance(exc, ApplyError):
        raise exc
    if isinstance(exc, sqlean.Error | OSError | ltx.LTXError):
        raise ApplyError(f"apply failed, rolled back: {exc}", path=name) from exc
    raise exc


def apply_files(replica: ReplicaDatabase, paths: Iterable[Path]) -> Pos:
    """Apply LTX files in order (e.g. a primary's log); return the last position."""
    pos = replica.pos
    for path in paths:
        with open(path, "rb") as f:
            pos = replica.apply(f, path=str(path))
    return pos


__all__ = [
    "PAGE1_MAGIC",
    "STAMPED_RANGES",
    "ApplyError",
    "LocalWriteError",
    "NotNext",
    "PositionMismatch",
    "ReplicaDatabase",
    "apply_files",
    "empty_page1",
    "format_pos",
    "mask_stamped",
    "physical_matches",
    "pos_path_for",
    "read_page1_file",
    "remove_database_files",
    "wal_page1",
]
