"""The primary role's runtime: a worker per database, woken by file events.

Each database gets one DatabaseWorker that runs its DatabaseTailer in a worker thread,
one call at a time. File events wake it when the -wal or database file changes: on Linux
inotify, read only while a worker waits (sidecar.dirwatch: reading every event slowed a
busy writer by a third); elsewhere watchfiles (its debounce configured down from 1.6 s).
A slow poll catches anything the events miss. New databases in watched directories get a
worker when they appear; a worker whose database is not ready (missing, locked in
rollback mode, read-only) logs why once and keeps retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import watchfiles
import xxhash

import ltx
from sidecar import dirwatch
from sidecar.config import Config, DatabaseNameError, RetentionConfig, looks_like_sqlite
from sidecar.fileutil import atomic_write
from sidecar.log import LTXLog
from sidecar.resync import PinnedReader, write_snapshot
from sidecar.tailer import DatabaseTailer, TailerError, TailerOptions

T = TypeVar("T")

log = logging.getLogger("ltx_sidecar.primary")

_SIBLING_SUFFIXES = ("-wal", "-shm", "-journal")
_STATE_INTERVAL = 1.0  # seconds between state.json writes
_RETENTION_INTERVAL = 10.0
_BUSY_LOOP = 1.0  # seconds a worker thread may keep syncing before it yields
_DISCOVER_INTERVAL = 1.0  # seconds between looks at watched directories (with inotify)


def retain_log(ltx_log: LTXLog, retention: RetentionConfig, name: str) -> int:
    """Apply the retention settings to one LTX log (a primary's or a replica's); return
    how many files went."""
    removed = ltx_log.retain(
        int(time.time() * 1000),
        int(retention.max_age.total_seconds() * 1000),
        retention.keep_count,
    )
    if removed:
        log.info("%s: retention removed %d old LTX file(s)", name, len(removed))
    return len(removed)


def node_id_number(node_id: str) -> int:
    """The u64 NodeID for LTX headers: 16 hex digits as given, otherwise a hash of the id."""
    if len(node_id) == 16:
        with contextlib.suppress(ValueError):
            return int(node_id, 16)
    return int(xxhash.xxh64_intdigest(node_id.encode()))


def database_of(path: Path) -> Path:
    """The database a file event is about (-wal, -shm and -journal belong to theirs)."""
    name = path.name
    for suffix in _SIBLING_SUFFIXES:
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path


class DatabaseWorker:
    """Drives one tailer: sync when woken or when the poll interval passes."""

    def __init__(
        self,
        name: str,
        path: Path,
        cfg: Config,
        on_change: Callable[[DatabaseWorker], None] | None = None,
    ) -> None:
        self.name = name
        self.on_change = on_change  # called in the loop's thread after the log grew
        self.path = path
        self.cfg = cfg
        options = TailerOptions(
            passive_frames=cfg.checkpoint.passive_frames,
            truncate_frames=cfg.checkpoint.truncate_frames,
            checkpoint_interval=cfg.checkpoint.interval.total_seconds(),
            seal_timeout=cfg.checkpoint.seal_timeout.total_seconds(),
            node_id=node_id_number(cfg.node_id),
        )
        # Synced in batches by the tailer (before checkpoints, at least once a second):
        # an fsync per transaction would cost more than the rest of shipping it.
        self.log = LTXLog(cfg.ltx_dir(name), clean=True, durable=False)
        self.tailer = DatabaseTailer(name, path, self.log, options)
        self.wake = asyncio.Event()
        self._last_error: str | None = None
        self._last_state_write = 0.0
        self._last_retention = time.monotonic()
        self._state_path = cfg.data_dir / "dbs" / name / "state.json"
        # The tailer is single-threaded: the sync loop and outside calls (a snapshot for a
        # new replica, a sync for a write's TXID) take this lock; an outside caller raises
        # _wanted so the busy loop lets go at once.
        self._lock = threading.Lock()
        self._wanted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notified_txid = -1
        # Entered while the worker waits: file events are read only then (dirwatch).
        self.listening: Callable[[], contextlib.AbstractContextManager[None]] = (
            contextlib.nullcontext
        )

    @property
    def pos(self) -> ltx.Pos | None:
        return self.log.pos

    async def exclusive(self, fn: Callable[[DatabaseTailer], T]) -> T:
        """Run fn(tailer) in a worker thread between syncs."""

        def call() -> T:
            self._wanted += 1
            try:
                with self._lock:
                    return fn(self.tailer)
            finally:
                self._wanted -= 1

        return await asyncio.to_thread(call)

    async def sync_now(self) -> int:
        """Read the WAL to its end now; the TXID that covers every commit before the call."""

        def sync(tailer: DatabaseTailer) -> int:
            while tailer.sync():
                self._published()
            return tailer.state.txid

        return await self.exclusive(sync)

    def _published(self) -> None:
        """Tell the loop the log may have grown (from the worker thread)."""
        pos = self.log.pos
        txid = pos.txid if pos else 0
        if txid != self._notified_txid and self._loop is not None and self.on_change:
            self._notified_txid = txid
            self._loop.call_soon_threadsafe(self.on_change, self)

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        poll = self.cfg.databases.poll_interval.total_seconds()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                self.wake.clear()
                await asyncio.to_thread(self._step)
                if self.wake.is_set():
                    continue
                woken = asyncio.ensure_future(self.wake.wait())
                # A stop (a handoff, a shutdown) must not wait for the poll interval.
                try:
                    with self.listening():
                        await asyncio.wait(
                            {woken, stopping}, timeout=poll, return_when="FIRST_COMPLETED"
                        )
                finally:  # also when cancelled: a pending waiter left behind is an error
                    woken.cancel()
        finally:
            stopping.cancel()
        await asyncio.to_thread(self._shutdown)

    def _step(self) -> None:
        try:
            # While transactions keep coming, keep syncing in this thread: a hand-off to
            # the event loop per sync costs more than a sync under a busy writer.
            deadline = time.monotonic() + _BUSY_LOOP
            with self._lock:
                while self.tailer.sync():
                    self._published()
                    if self._wanted or time.monotonic() >= deadline:
                        break
                self._published()
        except TailerError as exc:
            self._report(str(exc))
        except Exception as exc:  # keep the daemon alive; the next step retries
            log.exception("%s: sync failed", self.name)
            self._report(f"sync failed: {exc}")
            with self._lock:
                self.tailer.close()
        else:
            if self._last_error is not None:
                log.info("%s: following the database again", self.name)
            self._last_error = None
            self.tailer.state.error = None
        now = time.monotonic()
        if now - self._last_retention >= _RETENTION_INTERVAL:
            self._last_retention = now
            self._retain()
        if now - self._last_state_write >= _STATE_INTERVAL:
            self._last_state_write = now
            self.write_state()

    def _report(self, message: str) -> None:
        self.tailer.state.error = message
        if message != self._last_error:
            log.warning("%s: %s", self.name, message)
            self._last_error = message

    def _retain(self) -> None:
        retain_log(self.log, self.cfg.retention, self.name)

    def write_state(self) -> None:
        """<data-dir>/dbs/<name>/state.json: what ltxctl shows when the daemon is down."""
        state: dict[str, Any] = self.tailer.state.as_dict()
        state["role"] = "primary"
        state["updated"] = time.time()
        try:
            with atomic_write(self._state_path) as f:
                f.write(json.dumps(state, indent=2).encode() + b"\n")
        except OSError as exc:
            log.warning("%s: cannot write %s: %s", self.name, self._state_path, exc)

    def _shutdown(self) -> None:
        """A last sync so nothing committed is left unshipped, then close."""
        with self._lock:
            with contextlib.suppress(TailerError):
                if self.tailer.is_open:
                    self.tailer.sync()
            self.write_state()
            self.tailer.close()


class Primary:
    """All the databases this node replicates, in the primary role."""

    def __init__(
        self, cfg: Config, on_change: Callable[[DatabaseWorker], None] | None = None
    ) -> None:
        self.cfg = cfg
        self.on_change = on_change
        self.workers: dict[Path, DatabaseWorker] = {}
        self.by_name: dict[str, DatabaseWorker] = {}
        self._changed = asyncio.Event()  # one per generation: set, then replaced
        self._tasks: list[asyncio.Task[None]] = []
        self._routes: dict[Path, DatabaseWorker] = {}  # event path -> worker, found once
        self._db_dirs = {d.resolve() for d in cfg.databases.dirs}  # every database in them
        self._listening: Callable[[], contextlib.AbstractContextManager[None]] = (
            contextlib.nullcontext
        )

    def _watched_dirs(self) -> set[Path]:
        dirs = {p.resolve().parent for p in self.cfg.databases.paths}
        dirs.update(d.resolve() for d in self.cfg.databases.dirs)
        return dirs

    def _add(self, path: Path, stop: asyncio.Event) -> DatabaseWorker | None:
        path = path.resolve()
        if path in self.workers:
            return self.workers[path]
        try:
            name = self.cfg.database_name(path)
        except DatabaseNameError as exc:
            log.warning("%s: not replicated: %s", path, exc)
            return None
        if any(w.name == name for w in self.workers.values()):
            log.warning("%s: not replicated: another database is already named %r", path, name)
            return None
        worker = DatabaseWorker(name, path, self.cfg, self._worker_changed)
        worker.listening = self._listening
        self.workers[path] = worker
        self.by_name[name] = worker
        self._tasks.append(asyncio.create_task(worker.run(stop), name=f"db:{name}"))
        self._worker_changed(worker)
        log.info("%s: replicating %s", name, path)
        return worker

    def _worker_changed(self, worker: DatabaseWorker) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        if self.on_change is not None:
            self.on_change(worker)

    # -- what the stream server reads (sidecar.stream_server.PrimarySource) ----------------

    @property
    def node_id_number(self) -> int:
        return node_id_number(self.cfg.node_id)

    def names(self) -> list[str]:
        return list(self.by_name)

    def log_of(self, name: str) -> LTXLog | None:
        worker = self.by_name.get(name)
        return worker.log if worker else None

    async def open_reader(self, name: str) -> PinnedReader:
        """The database exactly at its log's last TXID, readable from any one thread."""
        worker = self.by_name.get(name)
        if worker is None:
            raise TailerError(f"{name}: no such database on this primary")
        return await worker.exclusive(lambda tailer: tailer.open_reader())

    async def snapshot(self, name: str, out: BinaryIO) -> ltx.Pos:
        """A snapshot for a new replica, written while the tailer keeps following."""
        reader = await self.open_reader(name)
        node_id = node_id_number(self.cfg.node_id)
        try:
            return await asyncio.to_thread(write_snapshot, reader, out, node_id=node_id)
        finally:
            await asyncio.to_thread(reader.close)

    async def changed(self) -> None:
        await self._changed.wait()

    async def sync_now(self, name: str) -> int:
        worker = self.by_name.get(name)
        return await worker.sync_now() if worker else 0

    def _discover(self, stop: asyncio.Event) -> None:
        for path in self.cfg.databases.paths:
            self._add(path, stop)
        for directory in self.cfg.databases.dirs:
            if not directory.is_dir():
                continue
            for path in sorted(directory.iterdir()):
                if database_of(path) != path:
                    continue  # a -wal, -shm or -journal file: its database is listed too
                if path.resolve() not in self.workers and looks_like_sqlite(path):
                    self._add(path, stop)

    async def run(self, stop: asyncio.Event) -> None:
        for directory in self._watched_dirs():
            directory.mkdir(parents=True, exist_ok=True)
        try:
            if not dirwatch.available() or not await self._run_inotify(stop):
                await self._run_watchfiles(stop)
        finally:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run_inotify(self, stop: asyncio.Event) -> bool:
        """Workers read their events while they wait; new databases are looked for on
        arrival events (no writes: those would wake this loop) and every second.
        False when inotify cannot be set up (e.g. its per-user instance limit)."""

        def deliver(paths: list[Path] | None) -> None:
            self._route(paths, stop)

        dirs = self._db_dirs
        try:
            changes = dirwatch.DirWatch(self._watched_dirs(), dirwatch.CHANGES, deliver)
        except OSError as exc:
            log.warning("cannot use inotify (%s): watching with watchfiles instead", exc)
            return False
        try:
            arrivals = dirwatch.DirWatch(dirs, dirwatch.ARRIVALS, deliver)
        except OSError as exc:
            changes.close()
            log.warning("cannot use inotify (%s): watching with watchfiles instead", exc)
            return False
        self._listening = changes.listening
        try:
            self._discover(stop)
            with arrivals.listening():
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), _DISCOVER_INTERVAL)
                    if dirs:
                        self._discover(stop)
        finally:
            changes.close()
            arrivals.close()
        return True

    async def _run_watchfiles(self, stop: asyncio.Event) -> None:
        self._discover(stop)
        debounce_ms = max(1, int(self.cfg.databases.watch_debounce.total_seconds() * 1000))
        async for changes in watchfiles.awatch(
            *self._watched_dirs(),
            watch_filter=None,
            debounce=debounce_ms,
            step=1,
            stop_event=stop,
            recursive=False,
        ):
            self._route([Path(raw) for _change, raw in changes], stop)

    def _route(self, paths: list[Path] | None, stop: asyncio.Event) -> None:
        """Wake the workers of the databases these files belong to (None: every worker);
        a new database in a watched directory gets one."""
        if paths is None:
            for each in self.workers.values():
                each.wake.set()
            return
        for path in paths:
            worker = self._routes.get(path)
            if worker is None:
                db = database_of(path).resolve()
                worker = self.workers.get(db)
                if worker is None and db.parent in self._db_dirs and looks_like_sqlite(db):
                    worker = self._add(db, stop)
                if worker is not None:
                    self._routes[path] = worker
            if worker is not None:
                worker.wake.set()

    def states(self) -> list[dict[str, Any]]:
        return [w.tailer.state.as_dict() for w in self.workers.values()]
