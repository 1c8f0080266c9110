"""Replica side of replication: follow the primary's /stream and apply what it sends.

One long-lived ``POST /stream`` brings LTX files as fragments; each file is spooled to a
temporary file and, once whole, applied by its database's applier task through
ReplicaDatabase (one SQLite write transaction, verified before a byte is written). Each
apply is reported to the primary on one open ``POST /pos`` request. A stream that fails
(network, a damaged frame, the primary gone, a heartbeat missed for
``replication.stream-timeout``) is dropped and opened again with backoff, from the
positions actually applied, so nothing damaged or half-received is ever used.

A database that cannot continue from its position (the primary says RESYNC, an apply
finds the position does not match, a local write landed, the file was edited behind
our back) is brought back by asking for it again without a position: the primary then
sends a snapshot, which applies over anything. Readers see the old state until that
one transaction commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import sqlean

import ltx
from sidecar import frames
from sidecar.apply import (
    ApplyError,
    NotNext,
    PositionMismatch,
    ReplicaDatabase,
    remove_database_files,
)
from sidecar.auth import bearer
from sidecar.cluster import ClusterState, NodeInfo, Primary
from sidecar.config import Config, DatabaseNameError, validate_db_name
from sidecar.fileutil import atomic_write, fsync_dir
from sidecar.frames import DatabasePosition, FrameError, ResyncReason
from sidecar.log import LTXLog
from sidecar.primary import node_id_number, retain_log
from sidecar.spool import Spool
from sidecar.sqlconn import close_quietly

log = logging.getLogger("ltx_sidecar.replica")

_SPOOL_IN_MEMORY = 4 << 20  # incoming LTX bytes kept in memory before spilling to disk
_MAX_GROUP = 256  # files applied as one transaction when they are queued together
_LOCAL_WRITE_CHECK = 1.0  # seconds between checks for writes that landed anyway
_RETENTION_INTERVAL = 10.0  # seconds between prunings of the LTX logs (as on the primary)
_MAX_NOT_NEXT = 3  # files that do not follow the position, asked again before a resync
_MAX_FAILED_RESYNCS = 3  # resyncs failed in a row before the copy is dropped for a snapshot
PRIMARY_FILE = ".primary"


Incoming = Spool  # an LTX file received from the primary, read from 0


class StreamClosed(Exception):
    """The stream ended (END, EOF, or a reconnect was asked for)."""


@dataclass(frozen=True, slots=True)
class _ResyncAsked:
    """The primary sent RESYNC for this database: resync once queued files are done."""

    frame: frames.Resync


@dataclass(slots=True)
class _Db:
    """One replica database, its incoming file and its applier."""

    name: str
    path: Path
    replica: ReplicaDatabase | None = None
    incoming: Incoming | None = None
    queue: asyncio.Queue[Incoming | _ResyncAsked] = field(default_factory=asyncio.Queue)
    applier: asyncio.Task[None] | None = None
    want_resync: bool = False  # the copy cannot continue from its position
    failed_resyncs: int = 0  # in a row; past a few, the copy is dropped for a snapshot
    not_next: int = 0  # files in a row that did not start at the next TXID
    forget: bool = False  # drop the copy's history and take a snapshot instead
    applying: bool = False


class ReplicaRole:
    """Everything a replica does: open its databases, follow the primary, apply, report."""

    def __init__(
        self,
        cfg: Config,
        state: ClusterState,
        token: str,
        *,
        on_handoff: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_handoff = on_handoff  # a HANDOFF frame: the node reads the lease at once
        self.state = state
        self.token = token
        self.dbs: dict[str, _Db] = {}
        self._reconnect = asyncio.Event()
        self._reports: asyncio.Queue[str] = asyncio.Queue()
        self._epoch = 0
        self._incoming_dir = cfg.data_dir / "incoming"
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._url: str | None = None

    # -- databases --------------------------------------------------------------------------

    def path_for(self, name: str) -> Path | None:
        """Where database `name` lives on this node: a configured path, else the first dir."""
        for path in self.cfg.databases.paths:
            if path.name == name:
                return path.resolve()
        if self.cfg.databases.dirs:
            return (self.cfg.databases.dirs[0] / name).resolve()
        return None

    def _known_names(self) -> list[str]:
        names = {p.name for p in self.cfg.databases.paths}
        dbs_dir = self.cfg.data_dir / "dbs"
        if dbs_dir.is_dir():
            names.update(d.name for d in dbs_dir.iterdir() if any((d / "ltx").glob("*.ltx")))
        return sorted(names)

    def _db(self, name: str) -> _Db | None:
        db = self.dbs.get(name)
        if db is not None:
            return db
        try:
            validate_db_name(name)
        except DatabaseNameError as exc:
            log.warning("ignoring database %r from the primary: %s", name, exc)
            return None
        path = self.path_for(name)
        if path is None:
            log.warning(
                "%s: no place for it on this node: set [databases] dirs (or list its path)", name
            )
            return None
        db = self.dbs[name] = _Db(name, path)
        db.applier = asyncio.create_task(self._apply_loop(db), name=f"apply:{name}")
        return db

    def _open(self, db: _Db) -> ReplicaDatabase:
        """Open the replica database (blocking; in a worker thread)."""
        if db.replica is None:
            db.path.parent.mkdir(parents=True, exist_ok=True)
            durable = self.cfg.replication.fsync
            ltx_log = LTXLog(self.cfg.ltx_dir(db.name), clean=True, durable=durable)
            replica = ReplicaDatabase(db.path, ltx_log, durable=durable)
            if self.cfg.replication.lock_local_writes:
                with contextlib.suppress(ApplyError):
                    replica.hold_write_lock()
            db.replica = replica
            if replica.problem is not None:
                db.want_resync = True
        return db.replica

    async def open_existing(self) -> None:
        for name in self._known_names():
            db = self._db(name)
            if db is None:
                continue
            try:
                replica = await asyncio.to_thread(self._open, db)
            except ApplyError as exc:
                log.warning("%s: cannot open the replica database: %s", name, exc)
                continue
            self._publish(db, replica)

    def _publish(self, db: _Db, replica: ReplicaDatabase) -> None:
        pos = replica.pos
        self.state.set_position(db.name, pos.txid, pos.post_apply_checksum)
        view = self.state.database(db.name)
        view.extra.update(
            path=str(db.path),
            page_size=replica.page_size,
            pages=replica.page_count,
            size=replica.page_size * replica.page_count,
            wal_size=_size(Path(f"{db.path}-wal")),
            problem=replica.problem,
        )

    async def close(self) -> None:
        for db in self.dbs.values():
            if db.applier is not None:
                db.applier.cancel()
        for db in self.dbs.values():
            if db.applier is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await db.applier
            self._drop_incoming(db)
            if db.replica is not None:
                await asyncio.to_thread(db.replica.close)
                db.replica = None
        self.dbs.clear()

    # -- the stream ------------------------------------------------------------------------

    async def run(self, primary_url: str, stop: asyncio.Event) -> None:
        """Follow the primary at `primary_url` until `stop` is set."""
        await self.open_existing()
        self._write_primary_file(None)
        watcher = asyncio.create_task(self._watch_local_writes(), name="local-writes")
        delay = self.cfg.replication.reconnect_min.total_seconds()
        max_delay = self.cfg.replication.reconnect_max.total_seconds()
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.cfg.replication.stream_timeout.total_seconds(),
            sock_read=self.cfg.replication.stream_timeout.total_seconds(),
        )
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                while not stop.is_set():
                    started = time.monotonic()
                    stream = asyncio.create_task(self._stream_once(session, primary_url))
                    stopping = asyncio.create_task(stop.wait())
                    try:
                        await asyncio.wait({stream, stopping}, return_when="FIRST_COMPLETED")
                    except asyncio.CancelledError:
                        stream.cancel()
                        raise
                    finally:
                        stopping.cancel()
                    if not stream.done():
                        stream.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        error = await _outcome(stream)
                    if stop.is_set():
                        break
                    if error:
                        log.warning("stream from %s: %s", primary_url, error)
                    if time.monotonic() - started > 10:
                        delay = self.cfg.replication.reconnect_min.total_seconds()
                    await _sleep_or(stop, delay)
                    delay = min(max_delay, delay * 2)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self.state.set_ready(False)

    async def _stream_once(self, session: aiohttp.ClientSession, url: str) -> None:
        self._session, self._url = session, url
        await self._settle()
        self._reconnect = asyncio.Event()
        request = frames.StreamRequest(self.state.me.node_id, tuple(self._positions()))
        headers = {**bearer(self.token), "Content-Type": "application/json"}
        async with session.post(
            f"{url.rstrip('/')}/stream", data=frames.encode_stream_request(request), headers=headers
        ) as resp:
            if resp.status != 200:
                text = (await resp.text()).strip()
                raise StreamClosed(f"HTTP {resp.status}: {text or resp.reason}")
            decoder = frames.FrameDecoder("stream", min_epoch=self.state.epoch)
            reporter: asyncio.Task[None] | None = None
            reconnect = asyncio.create_task(self._reconnect.wait())
            try:
                async for chunk in _chunks(resp.content, reconnect):
                    for frame in decoder.feed(chunk):
                        self.state.heard_from_primary()
                        if isinstance(frame, frames.Hello):
                            self._hello(frame, url)
                            reporter = asyncio.create_task(self._report(session, url))
                        else:
                            self._on_frame(frame)
                    if decoder.ended:
                        break
                if not reconnect.done():
                    decoder.close()
            finally:
                reconnect.cancel()
                if reporter is not None:
                    reporter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reporter
                for db in self.dbs.values():
                    self._drop_incoming(db)
                self.state.set_ready(False)

    async def _settle(self) -> None:
        """Before (re)connecting: let queued applies finish so positions are exact, and
        forget the history of copies that will be replaced by a snapshot."""
        for db in list(self.dbs.values()):
            while (not db.queue.empty() or db.applying) and db.applier and not db.applier.done():
                await asyncio.sleep(0.01)
            if db.forget:
                await asyncio.to_thread(self._forget, db)
                db.forget = db.want_resync = False

    def _forget(self, db: _Db) -> None:
        """Drop the log of a copy we no longer trust; keep the database for its readers.

        With an empty log the replica has no position, so the primary sends a snapshot,
        which applies over whatever the file holds in one transaction. A crash in
        between leaves an empty log: the same request again.
        """
        if db.replica is not None:
            db.replica.close()
            db.replica = None
        ltx_dir = self.cfg.ltx_dir(db.name)
        for path in ltx_dir.glob("*"):
            if path.is_file():
                path.unlink(missing_ok=True)
        (ltx_dir.parent / "page1").unlink(missing_ok=True)
        fsync_dir(ltx_dir)

    def _positions(self) -> list[DatabasePosition]:
        """What to tell the primary. A copy in doubt is sent with checksum 0, which no
        database has (bit 63 is always set): the primary answers RESYNC for it."""
        out = []
        for db in self.dbs.values():
            replica = db.replica
            if replica is None:
                continue
            pos = replica.pos
            if pos.txid == 0:
                continue
            doubt = db.want_resync or replica.problem is not None
            out.append(DatabasePosition(db.name, pos.txid, 0 if doubt else pos.post_apply_checksum))
        return out

    def _hello(self, hello: frames.Hello, url: str) -> None:
        self._epoch = hello.epoch
        known = self.state.primary
        proxy_url = known.node.proxy_url if known and known.node.node_id == hello.node_id else ""
        primary = Primary(NodeInfo(hello.node_id, hello.advertise_url, proxy_url), hello.epoch)
        self.state.set_role("replica", primary)
        if not proxy_url and self._session is not None:
            task = asyncio.create_task(self._learn_proxy_url(self._session, primary))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self._write_primary_file(hello.node_id)
        log.info("following primary %s at %s (epoch %d)", hello.node_id, url, hello.epoch)

    async def _learn_proxy_url(self, session: aiohttp.ClientSession, primary: Primary) -> None:
        """The primary's proxy URL, for forwarding writes: HELLO has only its API URL."""
        try:
            async with session.get(f"{primary.node.api_url}/status") as resp:
                doc = await resp.json()
            proxy_url = str(doc.get("proxy_url") or "")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.debug("cannot read the primary's status: %s", exc)
            return
        if proxy_url and self.state.primary == primary:
            node = NodeInfo(primary.node.node_id, primary.node.api_url, proxy_url)
            self.state.set_role("replica", Primary(node, primary.epoch))

    def _on_frame(self, frame: frames.Frame) -> None:
        if isinstance(frame, frames.LtxFragment):
            self._fragment(frame)
        elif isinstance(frame, frames.Heartbeat):
            for p in frame.positions:
                self.state.set_primary_position(p.name, p.txid, p.checksum)
        elif isinstance(frame, frames.Ready):
            self.state.set_ready(True)
        elif isinstance(frame, frames.Resync):
            db = self._db(frame.name)
            if db is not None:
                log.warning(
                    "%s: the primary cannot continue our copy (%s; it is at TXID %d): "
                    "resyncing by page hashes",
                    frame.name,
                    frame.reason.name,
                    frame.txid,
                )
                db.queue.put_nowait(_ResyncAsked(frame))
        elif isinstance(frame, frames.Handoff):
            log.info("the primary hands over to %s", frame.target)
            if self.on_handoff is not None:
                self.on_handoff()
        elif isinstance(frame, frames.End):
            log.info("the primary ended the stream")

    def _fragment(self, frame: frames.LtxFragment) -> None:
        db = self._db(frame.name)
        if db is None:
            return
        if frame.index == 0:
            self._drop_incoming(db)
            db.incoming = self._spool()
        if db.incoming is None:
            return
        db.incoming.write(frame.data)
        if frame.last:
            f, db.incoming = db.incoming, None
            with contextlib.suppress(ltx.LTXError, OSError, ValueError):  # the apply says why
                self.state.set_primary_position(frame.name, *_peek_txid(f))
            db.queue.put_nowait(f)

    def _spool(self) -> Incoming:
        """In memory up to a size (most files are a few pages), on disk beyond it; the
        caller closes it."""
        return Spool(self._incoming_dir, _SPOOL_IN_MEMORY)

    def _drop_incoming(self, db: _Db) -> None:
        if db.incoming is not None:
            db.incoming.close()
            db.incoming = None

    # -- applying --------------------------------------------------------------------------

    async def _apply_loop(self, db: _Db) -> None:
        while True:
            item = await db.queue.get()
            if isinstance(item, _ResyncAsked):
                db.applying = True
                try:
                    await self._resync(db, item.frame)
                finally:
                    db.applying = False
                continue
            files = [item]
            while not db.queue.empty() and len(files) < _MAX_GROUP:
                nxt = db.queue.get_nowait()
                if isinstance(nxt, _ResyncAsked):  # only after a RESYNC: no files follow
                    db.queue.put_nowait(nxt)
                    break
                files.append(nxt)
            db.applying = True
            try:
                for group in _groups(files):
                    if not await self._apply_group(db, group):
                        break
            finally:
                db.applying = False
                for f in files:
                    f.close()

    async def _apply_group(self, db: _Db, group: list[Incoming]) -> bool:
        """Apply files that arrived together as one transaction (compacted first).

        Each apply costs a durable log append and a commit whatever its size, so a
        replica that fell behind (a burst, a slow disk) catches up in a few applies
        rather than one per transaction.
        """
        if len(group) == 1:
            return await self._apply_one(db, group[0])
        merged = self._spool()
        try:
            try:
                await asyncio.to_thread(_compact, group, merged)
            except (ltx.LTXError, OSError) as exc:
                log.warning(
                    "%s: cannot merge %d files, applying one by one: %s", db.name, len(group), exc
                )
                for f in group:
                    if not await self._apply_one(db, f):
                        return False
                return True
            return await self._apply_one(db, merged)
        finally:
            merged.close()

    async def _apply_one(self, db: _Db, f: Incoming) -> bool:
        """Apply one file; False when the copy must be asked for again."""
        try:
            replica, deleted = await asyncio.to_thread(self._apply_blocking, db, f)
        except NotNext as exc:
            # e.g. files the old stream still delivered after a failed apply: the copy
            # is fine, the primary sends what follows its position once asked again
            # (a resync only if it keeps sending files that do not follow).
            db.not_next += 1
            if db.not_next <= _MAX_NOT_NEXT:
                log.info("%s: %s; asking again from our position", db.name, exc.reason)
                self._clear_queue(db)
                self._reconnect.set()
                return False
            db.not_next = 0
            log.warning(
                "%s: %s, %d times in a row; resyncing", db.name, exc.reason, _MAX_NOT_NEXT + 1
            )
            db.want_resync = True
            self._clear_queue(db)
            self._reconnect.set()
            return False
        except PositionMismatch as exc:
            log.warning("%s: %s; resyncing", db.name, exc.reason)
            db.want_resync = True
            self._clear_queue(db)
            self._reconnect.set()
            return False
        except (ApplyError, OSError) as exc:
            log.warning("%s: not applied, asking again: %s", db.name, exc)
            self.state.count("apply_errors")
            self._clear_queue(db)
            failed = db.replica
            if failed is not None and failed.problem is not None:
                # e.g. the log took the file but the commit failed (disk full): opening
                # the replica again reconciles the database with its log.
                db.replica = None
                await asyncio.to_thread(failed.close)
            self._reconnect.set()
            return False
        db.not_next = 0
        if deleted:
            await self._delete(db)
            return False
        self._publish(db, replica)
        self._reports.put_nowait(db.name)
        return True

    def _apply_blocking(self, db: _Db, f: Incoming) -> tuple[ReplicaDatabase, bool]:
        replica = self._open(db)
        f.seek(0)
        replica.apply(f, path=f"{db.name} (from the primary)")
        return replica, replica.deleted

    def _clear_queue(self, db: _Db) -> None:
        while not db.queue.empty():
            item = db.queue.get_nowait()
            if not isinstance(item, _ResyncAsked):
                item.close()

    # -- resync ----------------------------------------------------------------------------

    async def _resync(self, db: _Db, asked: frames.Resync) -> None:
        """Bring the copy to the primary's state by page hashes (docs/protocol.md section 7).

        Afterwards the stream is opened again from the new position (this stream's primary
        sends nothing more for the database after RESYNC). A copy that fails to resync
        a few times in a row is dropped for a snapshot instead.
        """
        self.state.count("resyncs")
        try:
            replica = await asyncio.to_thread(self._open, db)
            if asked.reason in (ResyncReason.AHEAD, ResyncReason.DIVERGED):
                await asyncio.to_thread(self._quarantine, db, replica, asked)
            pos = await self._page_hash_resync(db, replica)
        except (ApplyError, OSError, aiohttp.ClientError, TimeoutError, StreamClosed) as exc:
            db.failed_resyncs += 1
            log.warning("%s: resync failed (%d in a row): %s", db.name, db.failed_resyncs, exc)
            if db.failed_resyncs >= _MAX_FAILED_RESYNCS:
                log.warning("%s: dropping the copy's history for a snapshot", db.name)
                db.forget = True
            db.want_resync = True
            self._reconnect.set()
            return
        db.failed_resyncs = 0
        db.want_resync = False
        log.info("%s: resynced to TXID %d", db.name, pos.txid)
        self._publish(db, replica)
        self._reports.put_nowait(db.name)
        self._reconnect.set()

    async def _page_hash_resync(self, db: _Db, replica: ReplicaDatabase) -> ltx.Pos:
        assert self._session is not None and self._url is not None
        request = await asyncio.to_thread(
            lambda: list(
                replica.begin_resync(epoch=self._epoch, node_id=self.state.me.node_id, name=db.name)
            )
        )
        try:
            headers = {**bearer(self.token), "Content-Type": frames.CONTENT_TYPE_FRAMES}
            async with self._session.post(
                f"{self._url.rstrip('/')}/resync", data=_body(request), headers=headers
            ) as resp:
                if resp.status != 200:
                    text = (await resp.text()).strip()
                    raise StreamClosed(f"POST /resync: HTTP {resp.status}: {text or resp.reason}")
                self._incoming_dir.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=self._incoming_dir) as answer:
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        answer.write(chunk)
                    answer.seek(0)
                    return await asyncio.to_thread(replica.apply_resync, answer)
        finally:
            if replica.resync_pending:
                await asyncio.to_thread(replica.abort_resync)

    def _quarantine(self, db: _Db, replica: ReplicaDatabase, asked: frames.Resync) -> None:
        """Keep the transactions this node wrote as primary that the new primary lacks.

        They are not merged: the resync replaces them. Copied to
        <data-dir>/quarantine/<db>/<time>-epoch<N>/, with a log line:

        * the LTX files this node wrote itself (their header names it) past the point
          where the histories part: the primary's TXID when this node's log holds exactly
          the primary's position there (AHEAD), else all of them (DIVERGED);
        * when the database holds more than its log (the app committed while the sidecar
          was down or stepping down), a snapshot of the database as it is, named for the
          TXID after the log's (``0000000000000001-<txid+1>.ltx``): those transactions are
          in no LTX file, and this is the last moment they exist.
        """
        me = node_id_number(self.cfg.node_id)
        files: list[tuple[int, int, Path, ltx.Header]] = []
        agree = False
        for mn, mx, path in replica.log:
            with contextlib.suppress(OSError, ltx.LTXError), open(path, "rb") as f:
                header = ltx.Header.from_bytes(f.read(ltx.HEADER_SIZE))
                if mx == asked.txid:
                    f.seek(-ltx.TRAILER_SIZE, os.SEEK_END)
                    post = ltx.Trailer.from_bytes(f.read(ltx.TRAILER_SIZE)).post_apply_checksum
                    agree = post == asked.checksum
                files.append((mn, mx, path, header))
        ours = [(mn, mx, p) for mn, mx, p, h in files if h.node_id == me]
        if asked.reason == ResyncReason.AHEAD and agree:
            ours = [(mn, mx, p) for mn, mx, p in ours if mx > asked.txid]
        unlogged = replica.problem is not None and bool(
            ours or any(h.node_id == me for *_, h in files)
        )
        if not ours and not unlogged:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        folder = self.cfg.data_dir / "quarantine" / db.name / f"{stamp}-epoch{self._epoch}"
        folder.mkdir(parents=True, exist_ok=True)
        for _, _, path in ours:
            shutil.copy2(path, folder / path.name)
        if ours:
            log.warning(
                "%s: quarantined TXIDs %d-%d that the primary (at TXID %d) never received: %s",
                db.name,
                ours[0][0],
                ours[-1][1],
                asked.txid,
                folder,
            )
        if unlogged:
            txid = replica.log.pos.txid + 1 if replica.log.pos else 1
            out = folder / ltx.format_filename(1, txid)
            count = snapshot_database(db.path, out, txid=txid, node_id=me)
            log.warning(
                "%s: the database held transactions after its log's last TXID (committed "
                "while this node's sidecar was down or stepping down); its state before the "
                "resync is quarantined as %s (%d pages)",
                db.name,
                out,
                count,
            )
        self.state.count("quarantined_files", len(ours) + int(unlogged))

    async def _delete(self, db: _Db) -> None:
        log.info("%s: deleted on the primary; removing it here", db.name)
        replica = db.replica
        db.replica = None
        if replica is not None:
            await asyncio.to_thread(replica.close)
        remove_database_files(db.path)
        shutil.rmtree(self.cfg.data_dir / "dbs" / db.name, ignore_errors=True)
        self.dbs.pop(db.name, None)
        self.state.remove_database(db.name)
        if db.applier is not None and db.applier is not asyncio.current_task():
            db.applier.cancel()

    async def _watch_local_writes(self) -> None:
        """A write that landed anyway (lock not held, or just after a commit) is undone;
        and every _RETENTION_INTERVAL, the logs are pruned as the primary prunes its own
        (without it a replica's log grew until a snapshot restarted it)."""
        last_retention = time.monotonic()
        while True:
            await asyncio.sleep(_LOCAL_WRITE_CHECK)
            if time.monotonic() - last_retention >= _RETENTION_INTERVAL:
                last_retention = time.monotonic()
                await self._retain_logs()
            for db in list(self.dbs.values()):
                replica = db.replica
                if replica is None or db.want_resync or replica.resync_pending:
                    continue
                try:
                    wrote = await asyncio.to_thread(replica.detect_local_writes)
                except ApplyError as exc:
                    log.warning("%s: cannot check for local writes: %s", db.name, exc)
                    continue
                if wrote:
                    log.warning(
                        "%s: a local write landed on this replica; undoing it with a resync "
                        "from the primary",
                        db.name,
                    )
                    self.state.count("local_writes")
                    db.want_resync = True
                    self._reconnect.set()

    async def _retain_logs(self) -> None:
        for db in list(self.dbs.values()):
            replica = db.replica
            if replica is None:
                continue
            try:
                await asyncio.to_thread(retain_log, replica.log, self.cfg.retention, db.name)
            except (OSError, ltx.LTXError) as exc:
                log.warning("%s: cannot prune the LTX log: %s", db.name, exc)

    # -- reporting -------------------------------------------------------------------------

    async def _report(self, session: aiohttp.ClientSession, url: str) -> None:
        """Keep one POST /pos open; send a POSITIONS frame after each apply."""
        while True:
            try:
                async with session.post(
                    f"{url.rstrip('/')}/pos",
                    data=self._report_body(),
                    headers={**bearer(self.token), "Content-Type": frames.CONTENT_TYPE_FRAMES},
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
                ) as resp:
                    if resp.status != 204:
                        log.debug("POST /pos: HTTP %d", resp.status)
            except (aiohttp.ClientError, OSError) as exc:
                log.debug("POST /pos failed: %s", exc)
            await asyncio.sleep(0.2)

    async def _report_body(self) -> AsyncIterator[bytes]:
        epoch, me = self._epoch, self.state.me.node_id
        everything = self._applied(list(self.dbs))
        for group in frames.split_positions(everything):
            yield frames.encode(frames.Positions(epoch, me, group))
        while True:
            names = {await self._reports.get()}
            while not self._reports.empty():
                names.add(self._reports.get_nowait())
            positions = self._applied(sorted(names))
            if positions:
                yield frames.encode(frames.Positions(epoch, me, tuple(positions)))

    def _applied(self, names: list[str]) -> list[DatabasePosition]:
        out = []
        for name in names:
            db = self.dbs.get(name)
            if db is not None and db.replica is not None and db.replica.pos.txid > 0:
                pos = db.replica.pos
                out.append(DatabasePosition(name, pos.txid, pos.post_apply_checksum))
        return out

    # -- the .primary file -----------------------------------------------------------------

    def _primary_dirs(self) -> set[Path]:
        dirs = {p.resolve().parent for p in self.cfg.databases.paths}
        dirs.update(d.resolve() for d in self.cfg.databases.dirs)
        return dirs

    def _write_primary_file(self, primary_id: str | None) -> None:
        """`.primary` beside the databases names the primary (LiteFS's convention)."""
        for directory in self._primary_dirs():
            path = directory / PRIMARY_FILE
            try:
                if primary_id is None:
                    path.unlink(missing_ok=True)
                else:
                    directory.mkdir(parents=True, exist_ok=True)
                    with atomic_write(path) as f:
                        f.write(primary_id.encode() + b"\n")
            except OSError as exc:
                log.warning("cannot write %s: %s", path, exc)


def remove_primary_files(cfg: Config) -> None:
    """The primary has no .primary file."""
    dirs = {p.resolve().parent for p in cfg.databases.paths}
    dirs.update(d.resolve() for d in cfg.databases.dirs)
    for directory in dirs:
        with contextlib.suppress(OSError):
            (directory / PRIMARY_FILE).unlink(missing_ok=True)


def snapshot_database(path: Path, out: Path, *, txid: int, node_id: int) -> int:
    """A snapshot LTX of a database as SQLite reads it now (through a read transaction on
    a connection of its own); the number of pages."""
    conn = sqlean.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        count = int(conn.execute("PRAGMA page_count").fetchone()[0])
        header = ltx.Header(
            page_size=page_size,
            commit=count,
            min_txid=1,
            max_txid=txid,
            timestamp=int(time.time() * 1000),
            node_id=node_id,
        )
        sums = ltx.PageChecksums(page_size)
        lock = ltx.lock_pgno(page_size)
        with open(out, "wb") as f:
            encoder = ltx.Encoder(f, header)
            for pgno, data in conn.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno"):
                if pgno == lock:
                    continue
                page = bytes(data)
                encoder.write_page(pgno, page)
                sums.set(pgno, ltx.page_checksum(pgno, page))
            encoder.finish(sums.checksum())
        return count
    finally:
        close_quietly(conn)


def _groups(files: list[Incoming]) -> list[list[Incoming]]:
    """Runs of files that can be merged: incremental, non-empty; snapshots and deletions
    stand alone (a snapshot must be applied as one, a deletion empties the database)."""
    groups: list[list[Incoming]] = []
    run: list[Incoming] = []
    for f in files:
        try:
            f.seek(0)
            header = ltx.Header.from_bytes(f.read(ltx.HEADER_SIZE))
            mergeable = not header.is_snapshot and header.commit > 0
        except (ltx.LTXError, OSError, ValueError):
            mergeable = False  # the apply reports it
        if mergeable:
            run.append(f)
            continue
        if run:
            groups.append(run)
            run = []
        groups.append([f])
    if run:
        groups.append(run)
    return groups


def _compact(files: list[Incoming], out: Incoming) -> None:
    for f in files:
        f.seek(0)
    decoders = [ltx.open_decoder(f, path="(from the primary)") for f in files]
    ltx.compact(decoders, out)
    out.seek(0)


def _peek_txid(f: Incoming) -> tuple[int, int]:
    """The file's max TXID and post-apply checksum, for lag accounting."""
    f.seek(0)
    header = ltx.Header.from_bytes(f.read(ltx.HEADER_SIZE))
    f.seek(-ltx.TRAILER_SIZE, os.SEEK_END)
    trailer = ltx.Trailer.from_bytes(f.read(ltx.TRAILER_SIZE))
    return header.max_txid, trailer.post_apply_checksum


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


async def _chunks(
    content: aiohttp.StreamReader, reconnect: asyncio.Task[bool]
) -> AsyncIterator[bytes]:
    """The response body's chunks until it ends or a reconnect is asked for."""
    while not reconnect.done():
        read = asyncio.ensure_future(content.readany())
        try:
            await asyncio.wait({read, reconnect}, return_when="FIRST_COMPLETED")
        finally:
            read.add_done_callback(_consume)
            if not read.done():
                read.cancel()
        if not read.done():
            return
        chunk = read.result()
        if not chunk:
            return
        yield chunk


def _consume(task: asyncio.Future[bytes]) -> None:
    """Retrieve a finished read's exception (the stream is being dropped anyway)."""
    if not task.cancelled():
        task.exception()


async def _body(frames_: list[bytes]) -> AsyncIterator[bytes]:
    for data in frames_:
        yield data


async def _outcome(task: asyncio.Task[None]) -> str | None:
    try:
        await task
    except StreamClosed as exc:
        return str(exc)
    except FrameError as exc:
        return f"damaged stream, reconnecting: {exc}"
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


async def _sleep_or(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
