"""Primary side: turn every transaction committed to a live SQLite database into LTX.

One DatabaseTailer owns one database (Litestream's db.go is the model). It never sits in
the app's write path; it reads the -wal file directly and keeps SQLite from moving frames
behind its back. The rules, enforced below (see ../shared/docs/wal-tailing.md):

* The pin. A read transaction on our own connection is held between syncs. While it is
  held no checkpoint can reset the WAL: on read slot 0 it blocks all backfill, on slot
  i > 0 it caps backfill at its mark and blocks the reset. So committed frames we have not
  read yet stay where they are. The only reset a pin allows comes before anything new is
  committed after a pin taken on read slot 0 (the WAL was fully backfilled): the next
  writer's, or an app's RESTART/TRUNCATE checkpoint. It loses nothing the pin did not
  see, so a pin taken under the seal once the log holds everything the pin sees lets the
  tailer follow one reset, whatever the new salts. (SQLite adds 1 to salt-1 only when the
  connection writing the new WAL header has reset a WAL itself: the checkpoint counter is
  per connection, and a zero one draws random salts, e.g. after another's TRUNCATE.)
* Only whole, published transactions are read: frames up to the wal-index's mxFrame
  (read from -shm through a descriptor kept open while the connections are), whose salts
  and checksum chain verify. The checksum chain alone is not enough: a writer writes (and
  syncs) its frames, commit frame included, before it publishes them in the wal-index;
  readers do not see them until then, and if it fails or dies in between, the next writer
  overwrites them.
* Checkpoints are ours. A PASSIVE checkpoint runs once `passive_frames` frames are durable
  in LTX files (the log is synced in batches: before every checkpoint, and at least once
  a second; until the checkpoint, the WAL holds every frame an unsynced file came from). It is "sealed": we take the write lock (BEGIN IMMEDIATE on a second
  connection, waiting at most `seal_timeout` for it), read the last frames, release the
  pin, checkpoint, re-take the pin and release the write lock. The bulk of the work (the
  frames since the last checkpoint, their backfill) is done before, unsealed, behind a
  fresh pin, so the seal covers only what was committed meanwhile. No commit can happen in between, so no
  committed frame is checkpointed unseen, and app writers wait no longer than the seal.
  When everything was backfilled, the next writer rewinds the log; that reset is expected
  and followed. If SQLite reports more frames in the WAL than were read under the seal
  (one the tailer could not verify, e.g. a corrupt frame), they were checkpointed unseen:
  the database is rescanned (below). Past `truncate_frames` frames in one WAL generation a
  TRUNCATE checkpoint runs once a sync finds no new commit; it needs the write lock
  itself, so it runs just after the seal is released, and if a commit slipped into that
  gap (PRAGMA data_version on the pin changed) and the TRUNCATE completed, the database
  is rescanned (a busy one left the WAL as it was: the slipped commit is read at once).
  TRUNCATE reports (0, 0, 0) when it succeeds, so its frame counts cannot tell. While
  writers keep committing, the cap makes PASSIVE checkpoints compulsory instead (never
  put off), which rewind the WAL just as well. After a checkpoint, the next one waits for
  `passive_frames` new frames (or the interval).
* Positions. Each LTX file's pre/post-apply checksums come from a per-page checksum array
  kept incrementally, never by re-reading the database per transaction.
* What the log cannot explain (a WAL reset we did not expect, a WAL rewritten or
  truncated by another process, a checkpoint by the app while we were down, the database
  replaced) is never guessed: the database is rescanned through the pinned snapshot.
  While running, the rescan compares every page with the checksum array and writes an
  incremental LTX holding exactly the pages that differ; at start (no array yet) it writes
  a snapshot at the next TXID. Either way a log line says why.
* Restart. On start the log's last file must match the database: same WAL generation
  with its frames still in place, and the checksum of the database rebuilt at that point
  equal to the file's post-apply checksum; frames committed after it are shipped. Anything
  else gives a snapshot, never a silently wrong log.
* Deletion. A database file that disappears or is replaced by another file gives a
  deletion LTX (commit 0); a database that appears again starts with a snapshot.

Blocking I/O: the daemon runs a tailer's methods in a worker thread, one call at a time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import sqlean

import ltx
from ltx import EMPTY_DB_CHECKSUM, Encoder, Header, PageChecksums, lock_pgno, page_checksum
from ltx.encoder import Writable
from sidecar import wal
from sidecar.apply import read_page1_file
from sidecar.config import has_sqlite_magic
from sidecar.fileutil import held_fd, release_held
from sidecar.log import LTXLog
from sidecar.resync import PinnedReader, write_snapshot
from sidecar.sqlconn import close_quietly

log = logging.getLogger("ltx_sidecar.tailer")

WAL_HEADER_SIZE = 32
_READ_CHUNK = 64 << 20  # WAL bytes read per scan; a longer transaction reads more
_UNSEALED_ROUNDS = 5  # unsealed catch-up rounds before a checkpoint takes the write lock
_SEALED_FRAMES = 64  # ... until at most this many frames are left for the sealed step
_SEALED_FRAMES_MAX = 512  # more than this unshipped once sealed: release at once, defer
_SYNC_INTERVAL = 1.0  # seconds an LTX file may wait for its fsync (see sidecar/log.py)
_MAX_DEFER = 2.0  # seconds a checkpoint may be put off; then it seals anyway (bounded WAL)
_PASSIVE_RETRIES = 5  # an unsealed PASSIVE answered busy (another checkpoint) is retried
_ENCODE_IN_MEMORY = 4 << 20  # bytes of pages up to which an LTX file is built in memory
_SEAL_RETRY = 0.0001  # seconds between tries for the write lock (see _Seal)


class TailerError(Exception):
    """A database the tailer cannot follow right now; the message says why."""


@dataclass(frozen=True, slots=True)
class TailerOptions:
    passive_frames: int = 1000
    truncate_frames: int = 100_000
    checkpoint_interval: float = 60.0
    seal_timeout: float = 0.1
    node_id: int = 0


@dataclass(slots=True)
class TailerState:
    """What a user can see about one database on the primary."""

    name: str
    path: str
    txid: int = 0
    checksum: int = 0
    page_size: int = 0
    pages: int = 0
    wal_size: int = 0
    wal_frames: int = 0
    last_checkpoint: float | None = None
    last_checkpoint_mode: str | None = None
    last_ltx: str | None = None
    snapshots: int = 0
    rescans: int = 0
    ltx_files: int = 0
    ltx_bytes: int = 0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "txid": f"{self.txid:016x}",
            "checksum": f"{self.checksum:016x}",
            "pos": str(ltx.Pos(self.txid, self.checksum)),
            "page_size": self.page_size,
            "pages": self.pages,
            "size": self.page_size * self.pages,
            "wal_size": self.wal_size,
            "wal_frames": self.wal_frames,
            "last_checkpoint": self.last_checkpoint,
            "last_checkpoint_mode": self.last_checkpoint_mode,
            "last_ltx": self.last_ltx,
            "snapshots": self.snapshots,
            "rescans": self.rescans,
            "ltx_files_written": self.ltx_files,
            "ltx_bytes_written": self.ltx_bytes,
            "error": self.error,
        }


class DatabaseTailer:
    """Follows one database's WAL and appends its transactions to an LTX log."""

    def __init__(self, name: str, path: Path, ltx_log: LTXLog, options: TailerOptions) -> None:
        self.name = name
        self.path = path
        self.wal_path = Path(f"{path}-wal")
        self.log = ltx_log
        self.options = options
        self.state = TailerState(name=name, path=str(path))
        self._pin: sqlean.Connection | None = None
        self._spare: sqlean.Connection | None = None  # the next pin (see _repin)
        self._ctl: sqlean.Connection | None = None
        self._raw: int | None = None  # the database, read-only: a held_fd, never closed
        self._shm: int | None = None  # -shm, read-only: a held_fd, never closed
        self._wal: int | None = None  # -wal, read-only, kept between syncs
        self._ino: tuple[int, int] | None = None
        self._page_size = 0
        self._sums = PageChecksums(4096)  # the logical state the log has reached
        self._txid = 0
        self._scan: wal.ScanState | None = None
        self._wal_generation: tuple[int, int] | None = None  # salts of the log we follow
        self._expect_reset = False  # the pin allows one WAL reset, which loses nothing
        self._wal_frames = 0  # frames in the WAL generation we follow
        self._checkpointed_frames = 0  # ... of which were there at our last checkpoint
        self._last_checkpoint = time.monotonic()
        self._deferred_since: float | None = None  # when busy writers began to put one off
        self._deleted = False

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._pin is not None

    def open(self) -> None:
        """Connect, make sure of WAL mode, pin, and reconcile the log with the database.

        Raises TailerError (with the reason) when the database cannot be followed yet; the
        caller retries later.
        """
        if self._pin is not None:
            return
        if not self.path.exists():
            raise TailerError(f"{self.path}: database does not exist yet")
        if not has_sqlite_magic(self.path) and self.path.stat().st_size > 0:
            raise TailerError(f"{self.path}: not a SQLite database (bad header)")
        read_only = self._read_only_reason()
        if read_only is not None:
            raise TailerError(f"{self.path}: {read_only}")
        try:
            self._connect()
            self._ensure_wal_mode()
            self._reconcile()
        except sqlean.Error as exc:
            self.close()
            text = str(exc)
            if "locked" in text or "busy" in text:
                text += " (another process holds a lock on it; retrying)"
            raise TailerError(f"{self.path}: cannot follow the database yet: {text}") from exc
        except _SealBusy as exc:
            self.close()
            raise TailerError(
                f"{self.path}: the write lock stayed busy, so the log cannot be reconciled "
                f"with the database yet: {exc} (retrying)"
            ) from exc
        except BaseException:
            self.close()
            raise
        self.state.error = None
        self._sync_state()

    def _read_only_reason(self) -> str | None:
        """Why the sidecar could not write what it must (checkpoints write the database;
        SQLite creates -wal and -shm beside it), or None."""
        if not os.access(self.path, os.W_OK):
            return (
                "the database file is read-only: the sidecar must write it (WAL mode, checkpoints)"
            )
        siblings = (self.wal_path, Path(f"{self.path}-shm"))
        if not os.access(self.path.parent, os.W_OK) and not all(
            os.access(p, os.W_OK) for p in siblings
        ):
            return "its directory is read-only: SQLite cannot create the -wal and -shm files there"
        return None

    def _connect(self) -> None:
        try:
            self._raw = held_fd(self.path)
            st = os.fstat(self._raw)
            self._ino = (st.st_dev, st.st_ino)
            timeout_ms = _busy_timeout_ms(self.options.seal_timeout)
            self._pin = _connect(self.path, timeout_ms)
            self._spare = _connect(self.path, timeout_ms)
            self._ctl = _connect(self.path, timeout_ms)
        except (OSError, sqlean.Error) as exc:
            raise TailerError(f"{self.path}: cannot open: {exc}") from exc

    def _ensure_wal_mode(self) -> None:
        assert self._ctl is not None
        mode = str(self._ctl.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        if mode == "wal":
            return
        if not os.access(self.path, os.W_OK) or not os.access(self.path.parent, os.W_OK):
            raise TailerError(
                f"{self.path}: in {mode!r} journal mode and cannot switch it to WAL: the file "
                f"or its directory is read-only"
            )
        try:
            new = str(self._ctl.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
        except sqlean.Error as exc:
            raise TailerError(
                f"{self.path}: in {mode!r} journal mode and switching to WAL failed: {exc} "
                f"(another process holds it open; retrying)"
            ) from exc
        if new != "wal":
            raise TailerError(f"{self.path}: switching from {mode!r} to WAL mode gave {new!r}")
        log.info("%s: switched the database from %s to WAL journal mode", self.name, mode)

    def close(self) -> None:
        """Release the pin and connections; the raw descriptor goes last."""
        try:
            self.log.sync()
        except OSError as exc:
            log.warning("%s: cannot sync the LTX log: %s", self.name, exc)
        for conn in (self._pin, self._spare, self._ctl):
            close_quietly(conn)
        self._pin = self._spare = self._ctl = None
        self._raw = None  # held descriptors stay open (POSIX locks: see held_fd)
        self._shm = None
        self._close_wal_fd()

    # -- pin and seal --------------------------------------------------------------------

    def _repin(self) -> None:
        """Start a read transaction at the latest commit, then end the old one.

        Two connections take turns, so some pin is held at every moment, and every
        repin comes after shipping up to the old pin's mark (under the seal, or after a
        sync). Backfill never passes the oldest pin's mark, and a reset needs the WAL
        fully backfilled with no pin above read slot 0; so a reset SQLite allows can
        only drop frames already in the log, and the tailer may follow it.
        """
        old, new = self._pin, self._spare
        assert old is not None and new is not None
        if new.in_transaction:
            new.execute("COMMIT")
        new.execute("BEGIN")
        new.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        if old.in_transaction:
            old.execute("COMMIT")
        self._pin, self._spare = new, old
        self._expect_reset = True

    def _seal(self) -> _Seal:
        assert self._ctl is not None
        return _Seal(self._ctl, self.options.seal_timeout, self.name)

    # -- reconciliation at start ---------------------------------------------------------

    def _reconcile(self) -> None:
        with self._seal():
            self._repin()
            self._open_shm()
            header, wal_bytes = self._read_sealed_wal()
        # Whatever happens below, the log ends at the pinned state: one reset is fine.
        self._expect_reset = True
        page_size = self._pinned_page_size()
        self._page_size = page_size
        self._load_checksums()
        last = self.log.last_header
        pos = self.log.pos
        if last is None or pos is None:
            self._txid = 0
            self._follow_wal(header, wal_bytes)
            self._write_snapshot("the log is empty")
            return
        self._txid = pos.txid
        if last.commit == 0:
            self._follow_wal(header, wal_bytes)
            self._write_snapshot("the log ends with a deletion and the database is back")
            return
        reason = self._resume_from_log(last, pos, header, wal_bytes)
        if reason is not None:
            self._follow_wal(header, wal_bytes)
            if not self._adopt_replica_copy(pos):
                self._write_snapshot(reason)

    def _adopt_replica_copy(self, pos: ltx.Pos) -> bool:
        """A replica promoted to primary: continue its log with one page, not a snapshot.

        A replica's database is its log's state except for the 12 bytes of page 1 its
        own SQLite stamps on every commit (DESIGN.md choice 3), and it keeps the logical
        page 1 in the page1 file beside the log. When the pinned database with that page
        1 has exactly the log's checksum (which also proves the page1 file is current),
        the one difference is page 1: it is shipped as the next TXID. Anything else still
        gets a snapshot.
        """
        found = read_page1_file(self.log.directory.parent / "page1")
        if found is None or self._sums.pages == 0:
            return False
        _, _, logical = found  # written at the last apply that changed page 1
        if len(logical) != self._page_size:
            return False
        now = self._checksum()
        if now ^ self._sums[1] ^ page_checksum(1, logical) != pos.post_apply_checksum:
            return False
        if self._sums[1] == page_checksum(1, logical):
            log.info(
                "%s: continuing the log of this former replica at TXID %d", self.name, pos.txid
            )
            return True
        physical = next(data for pgno, data in self._pinned_pages() if pgno == 1)
        header = Header(
            page_size=self._page_size,
            commit=self._sums.pages,
            min_txid=pos.txid + 1,
            max_txid=pos.txid + 1,
            timestamp=int(time.time() * 1000),
            pre_apply_checksum=pos.post_apply_checksum,
            node_id=self.options.node_id,
            **self._wal_fields(),
        )
        self._append(header, [(1, physical)], now)
        log.info(
            "%s: continuing the log of this former replica: page 1 as stamped here is TXID %d",
            self.name,
            pos.txid + 1,
        )
        return True

    def _resume_from_log(
        self, last: Header, pos: ltx.Pos, header: wal.WALHeader | None, wal_bytes: bytes
    ) -> str | None:
        """Continue after the log's last file if the database provably follows from it.

        Returns None when resumed (frames committed after the file are shipped), or the
        reason the database does not follow.
        """
        if last.page_size != self._page_size:
            return f"page size changed from {last.page_size} to {self._page_size}"
        end = last.wal_offset + last.wal_size
        same_generation = (
            header is not None
            and last.wal_offset > 0
            and (header.salt1, header.salt2) == (last.wal_salt1, last.wal_salt2)
        )
        if not same_generation:
            # The WAL was reset (or never used) since the last file. A reset needs every
            # frame backfilled first, so the database file held the state at the last
            # file when the new log began: undo what the new log changed, using the
            # file's pages, and the checksum must come out as the log's.
            result = (
                self._scan_wal(wal_bytes, 0, wal.ScanState.from_header(header))
                if header is not None
                else None
            )
            after = list(result.transactions) if result is not None else []
            at_end = self._checksum_before(after, [], last.commit) if after else self._checksum()
            if at_end != pos.post_apply_checksum:
                return "the WAL was reset or rewritten while the sidecar was not running"
            self._resume(pos, header, result, after, " (new WAL generation)")
            return None
        assert header is not None
        result = self._scan_wal(wal_bytes, 0, wal.ScanState.from_header(header))
        if result.state.offset < end:
            return "the WAL no longer holds the frames of the last LTX file"
        upto = [t for t in result.transactions if t.end_offset <= end]
        if not upto or upto[-1].end_offset != end:
            return "the last LTX file does not end on a commit in the WAL"
        after = [t for t in result.transactions if t.end_offset > end]
        # Rebuild the checksum at the end of the last file: undo, page by page, what the
        # frames committed after it changed, using the images current at that point.
        at_end = self._checksum_before(after, upto, last.commit)
        if at_end != pos.post_apply_checksum:
            return (
                f"the database at the last LTX file has checksum {at_end:016x}, "
                f"the log says {pos.post_apply_checksum:016x}"
            )
        self._resume(pos, header, result, after, "")
        return None

    def _checksum_before(
        self, after: list[wal.WALTransaction], upto: list[wal.WALTransaction], commit: int
    ) -> int:
        """The database checksum before the `after` transactions, from the current array."""
        changed: set[int] = set()
        for txn in after:
            changed.update(txn.pages)
        images: dict[int, wal.BytesLike] = {}
        for txn in upto:
            for pgno, data in txn.pages.items():
                if pgno in changed:
                    images[pgno] = data
        lock = lock_pgno(self._page_size)
        reverted: dict[int, int] = {}
        for pgno in sorted(changed | set(range(self._sums.pages + 1, commit + 1))):
            if pgno <= commit and pgno != lock:
                image = images.get(pgno)
                if image is None:
                    image = self._raw_page(pgno)
                reverted[pgno] = page_checksum(pgno, image)
        return self._sums.after(reverted, commit)

    def _follow_wal(self, header: wal.WALHeader | None, wal_bytes: bytes) -> None:
        """Take the WAL as it is now as already reflected in the pinned state."""
        result = (
            self._scan_wal(wal_bytes, 0, wal.ScanState.from_header(header))
            if header is not None
            else None
        )
        self._follow_scan(header, result)

    def _follow_scan(self, header: wal.WALHeader | None, result: wal.ScanResult | None) -> None:
        """Continue reading the WAL after what `result` (a scan of it from the start) read."""
        self._checkpointed_frames = 0
        if header is None or result is None:
            self._scan = None
            self._wal_generation = None
            self._wal_frames = 0
            return
        self._scan = result.state
        self._wal_generation = (header.salt1, header.salt2)
        self._wal_frames = result.state.frame_count

    def _resume(
        self,
        pos: ltx.Pos,
        header: wal.WALHeader | None,
        result: wal.ScanResult | None,
        after: list[wal.WALTransaction],
        how: str,
    ) -> None:
        """Continue the log at pos and ship what was committed after it, as one file.

        The checksum array already holds the current state (reload=False).
        """
        self._follow_scan(header, result)
        log.info(
            "%s: resumed at TXID %d%s with %d transaction(s) committed since",
            self.name,
            pos.txid,
            how,
            len(after),
        )
        if after:
            self._ship_group(after, pre=pos.post_apply_checksum, reload=False)

    # -- reading the database through the pin --------------------------------------------

    def _pinned_page_size(self) -> int:
        assert self._pin is not None
        return int(self._pin.execute("PRAGMA page_size").fetchone()[0])

    def _pinned_pages(self) -> Iterator[tuple[int, bytes]]:
        """Every page of the pinned snapshot, ascending (the lock page is skipped)."""
        assert self._pin is not None
        lock = lock_pgno(self._page_size)
        cursor = self._pin.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno")
        for pgno, data in cursor:
            if pgno != lock:
                yield int(pgno), bytes(data)

    def _load_checksums(self) -> None:
        """Compute the per-page checksums of the pinned snapshot (at start, and on rescans
        after a page size change)."""
        self._sums = PageChecksums.of_pages(self._page_size, self._pinned_pages())
        self._sync_state()

    def _checksum(self) -> int:
        return self._sums.checksum()

    def _raw_page(self, pgno: int) -> bytes:
        assert self._raw is not None
        data = os.pread(self._raw, self._page_size, (pgno - 1) * self._page_size)
        return data.ljust(self._page_size, b"\x00")

    # -- the WAL file ----------------------------------------------------------------------

    def _wal_fd(self) -> int | None:
        """A descriptor on the -wal file, kept between syncs (an open per read cost more
        than the read); opened again if the file was removed. SQLite puts no locks on
        the -wal file, so this descriptor cannot disturb its locks (DESIGN.md)."""
        fd = self._wal
        if fd is not None:
            if os.fstat(fd).st_nlink > 0:
                return fd
            os.close(fd)
            self._wal = None
        try:
            self._wal = os.open(self.wal_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return self._wal

    def _close_wal_fd(self) -> None:
        if self._wal is not None:
            os.close(self._wal)
            self._wal = None

    def _read_wal_header(self) -> wal.WALHeader | None:
        fd = self._wal_fd()
        if fd is None:
            return None
        data = os.pread(fd, WAL_HEADER_SIZE, 0)
        if len(data) < WAL_HEADER_SIZE:
            return None
        try:
            return wal.parse_wal_header(data)
        except wal.WALError as exc:
            log.warning("%s: ignoring an invalid WAL header: %s", self.name, exc)
            return None

    def _read_wal_from(self, offset: int, limit: int = -1) -> bytes:
        fd = self._wal_fd()
        if fd is None:
            return b""
        if limit < 0:
            limit = max(0, os.fstat(fd).st_size - offset)
        chunks = []
        while limit > 0:
            chunk = os.pread(fd, min(limit, _READ_CHUNK), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            limit -= len(chunk)
        return b"".join(chunks)

    def _scan_wal(
        self, data: bytes, offset: int, state: wal.ScanState, *, bounded: bool | None = None
    ) -> wal.ScanResult:
        """Scan WAL bytes; bytes bounded by the wal-index mxFrame are not re-checksummed.

        SQLite publishes mxFrame only after the frames are written and synced, and its
        own readers trust them without checksums; recomputing SQLite's checksum in
        Python was most of the tailer's CPU. Without -shm every checksum is verified.
        """
        if bounded is None:
            bounded = self._shm is not None
        return wal.scan(data, offset, state, verify=not bounded)

    def _read_sealed_wal(self) -> tuple[wal.WALHeader | None, bytes]:
        """Under the seal, just after a repin: the WAL header and its bytes up to mxFrame."""
        header = self._read_wal_header()
        if header is None:
            return None, b""
        return header, self._read_wal_from(0, self._committed_end(header))

    def _open_shm(self) -> None:
        """Read -shm through its held descriptor once SQLite has it open."""
        if self._shm is None:
            try:
                self._shm = held_fd(f"{self.path}-shm")
            except OSError as exc:
                log.warning(
                    "%s: cannot read the -shm file (%s); reading frames by their checksums only",
                    self.name,
                    exc,
                )

    def _committed_end(self, header: wal.WALHeader) -> int:
        """WAL offset just past the last frame SQLite has published (wal-index mxFrame).

        -1 when there is no -shm to ask (every valid commit frame is taken). When the
        wal-index describes another generation than the file's header (a reset being
        published, or a header rewritten for a transaction that rolled back), nothing of
        this generation is published yet.
        """
        if self._shm is None:
            return -1
        for _ in range(1000):
            data = os.pread(self._shm, wal.WAL_INDEX_HEADER_SIZE, 0)
            try:
                index = wal.parse_wal_index_header(data)
                break
            except wal.WALError:
                time.sleep(0)  # a writer is updating it; its two copies differ meanwhile
        else:
            return WAL_HEADER_SIZE  # never read consistently: nothing for now
        if index.salts != header.salts:
            return WAL_HEADER_SIZE
        return WAL_HEADER_SIZE + index.mx_frame * header.frame_size

    def _wal_size(self) -> int:
        try:
            return self.wal_path.stat().st_size
        except FileNotFoundError:
            return 0

    # -- syncing ---------------------------------------------------------------------------

    def sync(self) -> int:
        """Ship every transaction committed since the last call; return how many.

        Also runs the checkpoint policy. Opens the database first if needed (raising
        TailerError while it cannot be followed).
        """
        if self._deleted or self._pin is None:
            if not self.path.exists():
                return 0
            self._deleted = False
            self.open()
        if self._database_replaced():
            self._sync_state()
            return 0
        shipped = self._sync_wal()
        self._maybe_checkpoint(idle=shipped == 0)
        since = self.log.unsynced_since
        if since is not None and time.monotonic() - since >= _SYNC_INTERVAL:
            self.log.sync()
        self._sync_state()
        return shipped

    def _database_replaced(self) -> bool:
        """Handle a deleted or replaced database file: a deletion LTX, then start over."""
        try:
            st = self.path.stat()
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if current == self._ino:
            return False
        what = "deleted" if current is None else "replaced by another file"
        self._write_deletion(f"the database file was {what}")
        old = self._ino
        self.close()
        if old is not None:
            release_held(old)  # our connections to the old file are closed now
        self._deleted = True
        self._scan = None
        self._wal_generation = None
        return True

    def _sync_wal(self) -> int:
        header = self._read_wal_header()
        if header is None:
            if self._scan is not None and self._scan.offset > WAL_HEADER_SIZE:
                if self._expect_reset:
                    return 0  # truncated by our own checkpoint; the next commit rewrites it
                return self._rescan("the WAL file disappeared or was truncated")
            return 0
        salts = (header.salt1, header.salt2)
        if self._wal_generation is None or salts != self._wal_generation:
            # The pin allows one reset (see the module docstring); a generation in which
            # nothing was committed yet (its header rewritten by a transaction that rolled
            # back) may be replaced any time. Anything else cannot be explained.
            expected = self._expect_reset or (
                self._scan is not None and self._scan.offset == WAL_HEADER_SIZE
            )
            if self._wal_generation is not None and not expected:
                return self._rescan("the WAL was reset by another process")
            self._scan = wal.ScanState.from_header(header)
            self._wal_generation = salts
            self._expect_reset = False
            self._wal_frames = 0
            self._checkpointed_frames = 0
        assert self._scan is not None
        end = self._committed_end(header)  # -1: no limit
        shipped = 0
        while end < 0 or self._scan.offset < end:
            want = -1 if end < 0 else end - self._scan.offset
            data = self._read_wal_from(self._scan.offset, _chunk(want))
            result = self._scan_wal(data, self._scan.offset, self._scan, bounded=end >= 0)
            if not result.transactions and len(data) == _READ_CHUNK:
                # A full chunk with no commit: a transaction longer than the chunk.
                data = self._read_wal_from(self._scan.offset, want)
                result = self._scan_wal(data, self._scan.offset, self._scan, bounded=end >= 0)
            if result.transactions:
                self._ship_group(list(result.transactions), pre=self._checksum(), reload=True)
                shipped += len(result.transactions)
            self._scan = result.state
            self._wal_frames = result.state.frame_count
            if not result.transactions or len(data) < _READ_CHUNK:
                break
        return shipped

    def _ship_group(self, txns: list[wal.WALTransaction], *, pre: int, reload: bool) -> None:
        """Write one LTX file for consecutive committed transactions.

        With reload, the checksum array is advanced through the transactions; without,
        it already holds the state after them (start-up resume).
        """
        pages: dict[int, wal.BytesLike] = {}
        previous_commit = txns[0].commit_size
        for txn in txns:
            pages.update(txn.pages)
            if txn.commit_size < previous_commit:  # shrank: drop pages past the new end
                for pgno in [p for p in pages if p > txn.commit_size]:
                    del pages[pgno]
            previous_commit = txn.commit_size
        commit = txns[-1].commit_size
        if reload:
            self._advance(pages, commit)
        lock = lock_pgno(self._page_size)
        pages.pop(lock, None)
        first, last_txn = txns[0], txns[-1]
        header = Header(
            page_size=self._page_size,
            commit=commit,
            min_txid=self._txid + 1,
            max_txid=self._txid + len(txns),
            timestamp=int(time.time() * 1000),
            pre_apply_checksum=pre,
            wal_offset=first.first_offset,
            wal_size=last_txn.end_offset - first.first_offset,
            wal_salt1=first.salt1,
            wal_salt2=first.salt2,
            node_id=self.options.node_id,
        )
        self._append(header, sorted(pages.items()), self._checksum())

    def _advance(self, pages: dict[int, wal.BytesLike], commit: int) -> None:
        """Move the checksums to the state after writing `pages` and sizing to commit."""
        missing = self._sums.growth_gap(pages, commit)
        if missing:
            log.warning(
                "%s: pages %d..%d grew the database without WAL frames; reading them "
                "from the database file",
                self.name,
                missing[0],
                missing[-1],
            )
            for pgno in missing:
                pages[pgno] = self._raw_page(pgno)
        self._sums.update({pgno: page_checksum(pgno, data) for pgno, data in pages.items()}, commit)

    def _append(
        self, header: Header, pages: Iterable[tuple[int, wal.BytesLike]], post: int
    ) -> None:
        """Encode pages into the log: a few pages in memory, written with a few system
        calls; more (a snapshot) streamed, never held in memory."""

        def write(f: BinaryIO) -> None:
            encoder = Encoder(f, header)
            for pgno, data in pages:
                encoder.write_page(pgno, data)
            encoder.finish(post)

        if isinstance(pages, list) and len(pages) * header.page_size <= _ENCODE_IN_MEMORY:
            buffer = io.BytesIO()
            write(buffer)
            path = self.log.append(buffer.getbuffer())
            size = buffer.tell()
        else:
            path = self.log.append(write)
            size = path.stat().st_size
        self._txid = header.max_txid
        self.state.ltx_files += 1
        self.state.ltx_bytes += size
        self.state.last_ltx = path.name

    # -- snapshots, rescans, deletions ------------------------------------------------------

    def _wal_fields(self) -> dict[str, int]:
        """WAL fields for a file made from the pinned state: the WAL prefix it includes.

        A snapshot or rescan holds the state after every frame up to the current scan
        offset; recording that range (and the salts) lets a restart check the frames
        after it exactly as after an ordinary transaction file.
        """
        scan = self._scan
        if scan is None or scan.offset <= WAL_HEADER_SIZE:
            return {}
        return {
            "wal_offset": WAL_HEADER_SIZE,
            "wal_size": scan.offset - WAL_HEADER_SIZE,
            "wal_salt1": scan.salt1,
            "wal_salt2": scan.salt2,
        }

    def _write_snapshot(self, reason: str) -> None:
        """A snapshot of the pinned state at the next TXID (pins must be current)."""
        if self._sums.pages == 0:
            log.info("%s: the database has no pages yet; nothing to snapshot", self.name)
            return
        txid = self._txid + 1
        log.warning("%s: writing a snapshot at TXID %d: %s", self.name, txid, reason)
        header = Header(
            page_size=self._page_size,
            commit=self._sums.pages,
            min_txid=1,
            max_txid=txid,
            timestamp=int(time.time() * 1000),
            node_id=self.options.node_id,
            **self._wal_fields(),
        )
        self._append(header, self._pinned_pages(), self._checksum())
        self.state.snapshots += 1

    def _rescan(self, reason: str) -> int:
        """Re-read the whole database under a fresh pin and ship what differs."""
        with self._seal():
            self._repin()
            header, wal_bytes = self._read_sealed_wal()
        self.state.rescans += 1
        self._expect_reset = True  # the log is brought to the pinned state below
        if self._pinned_page_size() != self._page_size:
            self._page_size = self._pinned_page_size()
            self._load_checksums()
            self._follow_wal(header, wal_bytes)
            self._write_snapshot(f"{reason}; the page size changed")
            return 1
        pre = self._checksum()
        changed: list[tuple[int, bytes]] = []
        count = 0
        for pgno, data in self._pinned_pages():
            if self._sums[pgno] != page_checksum(pgno, data):
                changed.append((pgno, data))
            count = pgno
        self._follow_wal(header, wal_bytes)
        # Checkpoint again only once new frames come (or the interval passes): a WAL this
        # rescan covers but cannot read (a corrupt frame) must not be rescanned every sync.
        self._checkpointed_frames = self._wal_frames
        if not changed and count == self._sums.pages:
            log.info("%s: %s; rescanned: the database is unchanged", self.name, reason)
            return 0
        self._advance(dict(changed), count)
        txid = self._txid + 1
        log.warning(
            "%s: %s; rescanned the database: %d page(s) differ, size %d pages; written as TXID %d",
            self.name,
            reason,
            len(changed),
            count,
            txid,
        )
        header_ = Header(
            page_size=self._page_size,
            commit=count,
            min_txid=txid,
            max_txid=txid,
            timestamp=int(time.time() * 1000),
            pre_apply_checksum=pre,
            node_id=self.options.node_id,
            **self._wal_fields(),
        )
        self._append(header_, changed, self._checksum())
        return 1

    def snapshot_to(self, out: Writable) -> ltx.Pos:
        """Write a snapshot of the database at the log's last TXID to `out`.

        For a replica that is new or behind what retention kept: the snapshot is made on
        demand rather than kept, from a reader opened at the last TXID (``open_reader``);
        every page is checked against the log's checksums, so a log that disagreed with
        the database would fail here rather than reach a replica.
        """
        with self.open_reader() as reader:
            return write_snapshot(reader, out, node_id=self.options.node_id)

    def open_reader(self) -> PinnedReader:
        """A consistent read of the database at the log's last TXID, for another thread.

        Under the seal the log is brought to the end of the WAL and a read transaction
        begun on a new connection, so it sees exactly the state at the last TXID; the
        checksum array is copied with it. The tailer keeps syncing meanwhile: the
        reader's read mark only makes checkpoints backfill less (and blocks the WAL
        reset), which the checkpoint logic already allows for (a reader of the app's
        does the same). Close it soon. Raises TailerError when there is nothing to read.
        """
        if self._pin is None:
            self.open()
        if self._database_replaced():
            raise TailerError(f"{self.path}: the database file was deleted or replaced")
        conn = _connect(self.path, _busy_timeout_ms(self.options.seal_timeout))
        try:
            try:
                with self._seal():
                    self._sync_wal()
                    conn.execute("BEGIN")
                    conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
            except _SealBusy as exc:
                raise TailerError(
                    f"{self.path}: the write lock stayed busy, so no consistent read could "
                    f"begin: {exc} (retrying)"
                ) from exc
            self._sync_state()
            if self._txid == 0 or self._sums.pages == 0:
                raise TailerError(f"{self.path}: nothing to read yet (no pages)")
            return PinnedReader(conn, path=self.path, txid=self._txid, sums=self._sums.copy())
        except BaseException:
            with contextlib.suppress(sqlean.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                conn.close()
            raise

    def _write_deletion(self, reason: str) -> None:
        if self._txid == 0:
            return
        txid = self._txid + 1
        log.warning("%s: writing a deletion at TXID %d: %s", self.name, txid, reason)
        header = Header(
            page_size=self._page_size or 4096,
            commit=0,
            min_txid=txid,
            max_txid=txid,
            timestamp=int(time.time() * 1000),
            pre_apply_checksum=self._checksum(),
            node_id=self.options.node_id,
        )
        self._sums = PageChecksums(self._page_size or 4096)
        self._append(header, [], EMPTY_DB_CHECKSUM)

    # -- checkpoints -------------------------------------------------------------------------

    def _maybe_checkpoint(self, *, idle: bool) -> None:
        """The checkpoint policy, after a sync; ``idle``: that sync found no new commit.

        Past the cap, TRUNCATE waits for a quiet moment: it needs the write lock itself, so
        it runs just after the seal, and a commit slipping into that gap costs a rescan.
        Under a steady writer the cap instead makes the PASSIVE checkpoints compulsory
        (no deferral): each backfills the whole WAL under the seal, so the next commit
        rewinds it and the WAL stops growing (measured: a writer at its maximum rate had
        deferred PASSIVE past the cap, and TRUNCATE then slipped and rescanned a 1 GB WAL
        under the seal for 6.8 s, longer than the app's busy timeout).
        """
        new = self._wal_frames - self._checkpointed_frames  # since our last checkpoint
        over_cap = self._wal_frames >= self.options.truncate_frames
        if over_cap and idle and (new > 0 or self.state.last_checkpoint_mode != "TRUNCATE"):
            self.checkpoint("TRUNCATE")  # also after a PASSIVE that left the WAL full size
        elif new <= 0:
            return
        elif (
            over_cap
            or new >= self.options.passive_frames
            or time.monotonic() - self._last_checkpoint >= self.options.checkpoint_interval
        ):
            self.checkpoint("PASSIVE", force=over_cap)

    def checkpoint(
        self, mode: str = "PASSIVE", *, force: bool = False
    ) -> tuple[int, int, int] | None:
        """Run a sealed checkpoint; returns SQLite's (busy, log frames, checkpointed).

        Returns None when the seal could not be taken in time (app writers busy), or when
        busy writers put a PASSIVE one off (at most _MAX_DEFER seconds, never with
        ``force``); the policy tries again on a later sync.
        """
        assert self._pin is not None
        now = time.monotonic()
        forced = force or (
            self._deferred_since is not None and now - self._deferred_since >= _MAX_DEFER
        )
        ready = self._backfill_shipped()
        if not ready and mode == "PASSIVE" and not forced:
            self._defer("writers commit faster than the tailer catches up")
            return None
        try:
            seal = self._seal()
            seal.__enter__()
        except _SealBusy:
            log.debug("%s: checkpoint skipped: the write lock is busy", self.name)
            return None
        sealed_at = time.monotonic()
        if mode == "PASSIVE" and not forced and self._unshipped_frames() > _SEALED_FRAMES_MAX:
            seal.__exit__(None, None, None)  # held for a moment only
            self._defer("too many frames arrived before the write lock was taken")
            return None
        self._deferred_since = None
        version = 0
        frames_before = self._scan.frame_count if self._scan is not None else 0
        synced_at = checkpointed_at = sealed_at
        try:
            self._sync_wal()  # the last frames, with writers held off
            synced_at = time.monotonic()
            sealed_end = self._scan.offset if self._scan is not None else WAL_HEADER_SIZE
            sealed_frames = self._scan.frame_count if self._scan is not None else 0
            self._pin.execute("COMMIT")
            if mode == "PASSIVE":
                result = self._run_checkpoint("PASSIVE")
                checkpointed_at = time.monotonic()
                self._repin()
            else:
                version = self._data_version()  # the sealed state, which the log holds
        finally:
            seal.__exit__(None, None, None)
            now = time.monotonic()
            log.debug(
                "%s: write lock held %.1f ms for a %s checkpoint (read %d frame(s) in %.1f "
                "ms, checkpoint %.1f ms)",
                self.name,
                (now - sealed_at) * 1000,
                mode,
                max(0, sealed_frames - frames_before) if self._scan is not None else 0,
                (synced_at - sealed_at) * 1000,
                (checkpointed_at - synced_at) * 1000 if mode == "PASSIVE" else 0.0,
            )
        slipped = False
        if mode != "PASSIVE":
            try:
                result = self._run_checkpoint(mode)
                # Another connection committed after the seal: before the checkpoint took
                # the write lock (checkpointed, maybe truncated away, unseen), or after it.
                slipped = self._data_version() != version
            finally:
                self._repin()
        wal_frames = result[1]
        self._last_checkpoint = time.monotonic()
        self.state.last_checkpoint = time.time()
        self.state.last_checkpoint_mode = mode
        self._checkpointed_frames = sealed_frames
        self._expect_reset = True  # the log holds the pinned state, unless rescanned below
        if slipped and result[0] != 0 and self._wal_unchanged():
            # Busy, and no writer rewound the WAL since: what slipped in follows the
            # sealed end, and the fresh pin keeps it there. Read it now, no rescan.
            self._sync_wal()
        elif wal_frames > sealed_frames:
            # SQLite has committed frames the tailer could not read (e.g. a corrupt one),
            # and may have just checkpointed them.
            self._rescan(
                f"the {mode} checkpoint found {wal_frames} frame(s) in the WAL, "
                f"{sealed_frames} of them read (offset {sealed_end})"
            )
        elif slipped:
            self._rescan(f"a commit slipped in before the {mode} checkpoint")
        log.debug("%s: %s checkpoint: %s", self.name, mode, result)
        self._sync_state()
        return result

    def _wal_unchanged(self) -> bool:
        """The WAL is still the generation the tailer follows."""
        header = self._read_wal_header()
        return header is not None and header.salts == self._wal_generation

    def _backfill_shipped(self) -> bool:
        """The bulk of a checkpoint, without the seal, so app writers are not held up.

        A fresh pin's read mark covers every frame published so far; shipping up to
        mxFrame then covers the mark, and a PASSIVE checkpoint backfills only up to the
        mark: every frame it copies is already in the log. The new pin sits on a read
        slot above 0 (the frames since the last checkpoint are not backfilled yet), so no
        reset can happen. The sealed step that follows handles only the frames committed
        in between, and still rescans if SQLite holds frames the tailer could not read.
        Returns False when the backfill could not run (another checkpoint kept it busy)
        or writers commit too fast to leave the sealed step little to do: the checkpoint
        then waits for a later sync (for at most _MAX_DEFER seconds).
        """
        assert self._ctl is not None and not self._ctl.in_transaction
        self._repin()
        self._sync_wal()
        if not self._passive_unsealed():
            return False
        # A busy writer kept committing meanwhile: catch up (no backfill, no fsync of the
        # database) until little is left for the sealed step.
        for _ in range(_UNSEALED_ROUNDS):
            if self._unshipped_frames() <= _SEALED_FRAMES:
                return True
            self._repin()
            self._sync_wal()
        return self._unshipped_frames() <= _SEALED_FRAMES

    def _passive_unsealed(self) -> bool:
        """PASSIVE up to the pin's mark on the control connection; True once it ran.

        PASSIVE never waits: it answers busy while another connection checkpoints,
        as an app's autocheckpoint does after its commits. Retry briefly.
        """
        assert self._ctl is not None
        for attempt in range(_PASSIVE_RETRIES):
            busy = int(self._ctl.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0])
            if busy == 0:
                return True
            time.sleep(0.001 * (attempt + 1))
        return False

    def _unshipped_frames(self) -> int:
        """Frames SQLite has published beyond what the tailer has read (0 if unknown)."""
        header = self._read_wal_header()
        if header is None or self._scan is None or header.salts != self._wal_generation:
            return 0
        end = self._committed_end(header)
        return max(0, (end - self._scan.offset) // header.frame_size) if end >= 0 else 0

    def _defer(self, why: str) -> None:
        """Put the checkpoint off to a later sync (for at most _MAX_DEFER seconds)."""
        if self._deferred_since is None:
            self._deferred_since = time.monotonic()
        log.debug("%s: checkpoint deferred: %s", self.name, why)

    def _data_version(self) -> int:
        assert self._pin is not None
        return int(self._pin.execute("PRAGMA data_version").fetchone()[0])

    def _run_checkpoint(self, mode: str) -> tuple[int, int, int]:
        assert self._pin is not None
        self.log.sync()  # the files made from these frames are durable before they go
        row = self._pin.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    # -- state ------------------------------------------------------------------------------

    def _sync_state(self) -> None:
        s = self.state
        s.txid = self._txid
        s.checksum = self._checksum()
        s.page_size = self._page_size
        s.pages = self._sums.pages
        s.wal_size = self._wal_size()
        s.wal_frames = self._scan.frame_count if self._scan is not None else 0


def _chunk(want: int) -> int:
    """How many WAL bytes to read at once: at most _READ_CHUNK (-1 wants them all)."""
    return _READ_CHUNK if want < 0 or want > _READ_CHUNK else want


class _SealBusy(Exception):
    pass


class _Seal:
    """BEGIN IMMEDIATE on the control connection: app commits wait until we are done.

    The lock is tried every _SEAL_RETRY seconds, not through SQLite's busy handler, whose
    sleeps grow to 1, 2, 5, 10 ms: a writer committing in a loop frees the lock for a few
    microseconds between commits, so each try has a fair chance, but each of those sleeps
    let hundreds of frames in, too many for the sealed step (measured: most checkpoints
    under a writer at its maximum rate were put off for that, and the WAL grew).
    """

    def __init__(self, conn: sqlean.Connection, timeout: float, name: str) -> None:
        self._conn = conn
        self._timeout = timeout
        self._name = name
        self._nested = False

    def __enter__(self) -> _Seal:
        if self._conn.in_transaction:  # sealed already (a rescan within a checkpoint)
            self._nested = True
            return self
        deadline = time.monotonic() + max(self._timeout, 0.001) * 20
        conn = self._conn
        conn.execute("PRAGMA busy_timeout=0")
        try:
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return self
                except sqlean.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise
                    if time.monotonic() >= deadline:
                        raise _SealBusy(str(exc)) from exc
                time.sleep(_SEAL_RETRY)
        finally:
            conn.execute(f"PRAGMA busy_timeout={_busy_timeout_ms(self._timeout)}")

    def __exit__(self, *exc: object) -> None:
        if not self._nested and self._conn.in_transaction:
            self._conn.execute("ROLLBACK")


def _busy_timeout_ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _connect(path: Path, busy_timeout_ms: int) -> sqlean.Connection:
    conn = sqlean.connect(str(path), isolation_level=None, check_same_thread=False, timeout=0)
    conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    return conn
