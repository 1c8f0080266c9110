"""Primary side of replication: POST /stream, POST /pos (docs/protocol.md).

Each replica's stream has its own task, which sends LTX files straight from the
primary's log. Nothing is queued per replica beyond the socket's write buffer: a write
that cannot drain makes that task wait, and it resumes from the log where it left off,
so a slow replica never holds back the primary or the other replicas, and one that falls
behind what the log keeps is brought back with a resync (or a snapshot when it has no
copy at all).

What is sent for each database, from the replica's position (TXID, checksum):
nothing when it is current; the files after its TXID when their chain starts at its
checksum; a snapshot (or the whole log, when it starts at TXID 1) when it has no
position; otherwise a RESYNC frame saying why (DIVERGED, TOO_OLD, AHEAD).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import aiohttp
from aiohttp import web

import ltx
from ltx import FLAG_NO_CHECKSUM, Header, Pos, Trailer
from sidecar import frames
from sidecar.auth import has_token, unauthorized
from sidecar.cluster import ClusterState
from sidecar.frames import DatabasePosition, FrameError, ResyncReason
from sidecar.log import LTXLog
from sidecar.resync import PinnedReader, ReaderError, ResyncBuilder, ResyncError
from sidecar.tailer import TailerError

log = logging.getLogger("ltx_sidecar.stream")

_READ_CHUNK = 256 << 10
_ENCODED_CACHE = 128  # small log files kept encoded for the streams ...
_ENCODED_MAX = 64 << 10  # ... of at most this size (8 MiB in all)


class PrimarySource(Protocol):
    """The primary's databases as the stream server needs them (sidecar.primary.Primary)."""

    def names(self) -> list[str]: ...

    def log_of(self, name: str) -> LTXLog | None: ...

    async def snapshot(self, name: str, out: BinaryIO) -> Pos: ...

    async def open_reader(self, name: str) -> PinnedReader: ...

    @property
    def node_id_number(self) -> int: ...

    async def changed(self) -> None:
        """Return when any database's log may have grown (or a database appeared)."""
        ...


@dataclass(slots=True)
class _Replica:
    """Where one replica stands for one database, as this stream has brought it."""

    txid: int
    checksum: int
    resync_sent: bool = False


def _trailer_of(path: Path) -> Trailer:
    with open(path, "rb") as f:
        f.seek(-ltx.TRAILER_SIZE, os.SEEK_END)
        return Trailer.from_bytes(f.read(ltx.TRAILER_SIZE))


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(_READ_CHUNK):
        yield chunk


def _conflict(state: ClusterState) -> web.Response:
    primary = state.primary
    where = f": the primary is {primary.node.node_id} at {primary.node.api_url}" if primary else ""
    return web.Response(status=409, text=f"this node is not the primary{where}\n")


class StreamServer:
    """The /stream and /pos handlers of the primary's API."""

    def __init__(
        self,
        state: ClusterState,
        source: PrimarySource,
        token: str,
        *,
        heartbeat_interval: float = 1.0,
    ) -> None:
        self.state = state
        self.source = source
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self.epoch = 0  # the term this server serves; set when the node becomes primary
        self.spool_dir: Path | None = None  # where resync answers are spooled
        self.stopping = asyncio.Event()
        self._streams: set[asyncio.Task[None]] = set()
        self._active: set[_Stream] = set()
        self._encoded: OrderedDict[tuple[int, str, Path, int, int], _Encoded] = OrderedDict()

    def encoded_file(self, epoch: int, name: str, path: Path) -> _Encoded | None:
        """The frames of a small log file, encoded once for every replica's stream (most
        files are a transaction of a few pages, sent to each replica as it lands); None
        for a larger file, which each stream reads as it sends."""
        st = os.stat(path)
        if st.st_size > _ENCODED_MAX:
            return None
        key = (epoch, name, path, st.st_ino, st.st_mtime_ns)
        cached = self._encoded.get(key)
        if cached is not None:
            self._encoded.move_to_end(key)
            return cached
        with open(path, "rb") as f:
            data = f.read()
        header = Header.from_bytes(data[: ltx.HEADER_SIZE])
        trailer = Trailer.from_bytes(data[-ltx.TRAILER_SIZE :])
        wire = b"".join(frames.encode(f) for f in frames.ltx_fragments(epoch, name, [data]))
        cached = _Encoded(wire, header.max_txid, trailer.post_apply_checksum, _pre_of(header))
        self._encoded[key] = cached
        if len(self._encoded) > _ENCODED_CACHE:
            self._encoded.popitem(last=False)
        return cached

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/stream", self.handle_stream),
            web.post("/pos", self.handle_pos),
            web.post("/resync", self.handle_resync),
        ]

    def start_term(self, epoch: int) -> None:
        self.epoch = epoch
        self.stopping = asyncio.Event()

    async def end_term(self) -> None:
        """End every stream (with END) and wait for them: the term is over."""
        self.stopping.set()
        tasks = list(self._streams)
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def handoff(self, target: str, positions: tuple[DatabasePosition, ...]) -> None:
        """Tell every replica that `target` takes over at `positions` (a HANDOFF frame)."""
        frame = frames.Handoff(self.epoch, target, positions)
        for stream in list(self._active):
            stream.extra.append(frame)
            stream.kick.set()

    def _serving(self) -> bool:
        return self.state.is_primary and not self.stopping.is_set() and self.epoch > 0

    # -- POST /stream -----------------------------------------------------------------------

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        if not has_token(request, self.token):
            return unauthorized()
        if not self._serving():
            return _conflict(self.state)
        body = await request.content.read(frames.MAX_REQUEST_BODY + 1)
        if len(body) > frames.MAX_REQUEST_BODY:
            return web.Response(status=413, text="request body over 4 MiB\n")
        try:
            req = frames.parse_stream_request(body)
        except FrameError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        if req.node_id == self.state.me.node_id:
            return web.Response(status=400, text="a node cannot replicate from itself\n")
        version = min(req.version, frames.PROTOCOL_VERSION)
        if version not in frames.SUPPORTED_VERSIONS:
            return web.Response(status=400, text=f"protocol version {req.version} unsupported\n")
        resp = web.StreamResponse(headers={"Content-Type": frames.CONTENT_TYPE_FRAMES})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
        except (ConnectionError, RuntimeError):  # gone before the first byte
            return resp
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        self.state.replica_connected(req.node_id)
        log.info("replica %s connected from %s", req.node_id, request.remote)
        stream = _Stream(self, resp, req.node_id, self.epoch)
        for db in req.databases:
            stream.replicas[db.name] = _Replica(db.txid, db.checksum)
        self._active.add(stream)
        try:
            await stream.run(version)
        except (ConnectionError, RuntimeError) as exc:  # RuntimeError: uvloop, closed transport
            log.info("replica %s disconnected: %s", req.node_id, exc or type(exc).__name__)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await resp.write_eof()
        finally:
            self._active.discard(stream)
            self._streams.discard(task)
            self.state.replica_disconnected(req.node_id)
        return resp

    # -- POST /pos --------------------------------------------------------------------------

    async def handle_pos(self, request: web.Request) -> web.Response:
        if not has_token(request, self.token):
            return unauthorized()
        if not self._serving():
            return _conflict(self.state)
        decoder = frames.FrameDecoder("positions")
        try:
            async for chunk in request.content.iter_any():
                for frame in decoder.feed(chunk):
                    if not isinstance(frame, frames.Positions):
                        continue
                    if frame.epoch != self.epoch:
                        return web.Response(
                            status=409, text=f"epoch {frame.epoch} is not {self.epoch}\n"
                        )
                    self.state.replica_reported(
                        frame.node_id, {p.name: (p.txid, p.checksum) for p in frame.positions}
                    )
            decoder.close()
        except FrameError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        except (ConnectionError, RuntimeError, aiohttp.ClientError):  # the replica went away
            return web.Response(status=204)
        return web.Response(status=204)

    # -- POST /resync -----------------------------------------------------------------------

    async def handle_resync(self, request: web.Request) -> web.StreamResponse:
        """Answer a replica's page hashes with one LTX file (docs/protocol.md section 7)."""
        if not has_token(request, self.token):
            return unauthorized()
        if not self._serving():
            return _conflict(self.state)
        decoder = frames.FrameDecoder("resync")
        builder: ResyncBuilder | None = None
        reader: PinnedReader | None = None
        spool = tempfile.TemporaryFile(dir=self.spool_dir)  # noqa: SIM115 - closed below
        try:
            async for chunk in request.content.iter_chunked(1 << 20):
                for frame in decoder.feed(chunk):
                    if isinstance(frame, frames.ResyncBegin):
                        if frame.epoch != self.epoch:
                            return web.Response(
                                status=409, text=f"epoch {frame.epoch} is not {self.epoch}\n"
                            )
                        if frame.name not in self.source.names():
                            return web.Response(status=404, text=f"no database {frame.name!r}\n")
                        reader = await self.source.open_reader(frame.name)
                        builder = ResyncBuilder(
                            reader, frame, spool, node_id=self.source.node_id_number
                        )
                        begin = frame
                    elif isinstance(frame, frames.PageHashes) and builder is not None:
                        await asyncio.to_thread(builder.add, frame)
            decoder.close()
            if builder is None:
                return web.Response(status=400, text="no RESYNC_BEGIN frame\n")
            pos = await asyncio.to_thread(builder.finish)
        except (FrameError, ResyncError) as exc:
            spool.close()
            return web.Response(status=400, text=f"{exc}\n")
        except (ReaderError, TailerError) as exc:
            spool.close()
            log.warning("resync for %s failed: %s", request.remote, exc)
            return web.Response(status=503, text=f"{exc}\n")
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:  # replica gone
            spool.close()
            log.info("resync for %s abandoned: %s", request.remote, exc or type(exc).__name__)
            return web.Response(status=204)
        except BaseException:
            spool.close()
            raise
        finally:
            if reader is not None:
                await asyncio.to_thread(reader.close)
        kind = "snapshot" if builder.is_snapshot else f"{builder.pages_sent} page(s)"
        log.info(
            "%s: resync of %s from TXID %d: %s up to TXID %d",
            begin.name,
            begin.node_id,
            begin.txid,
            kind,
            pos.txid,
        )
        self.state.count("resyncs_served")
        size = spool.seek(0, os.SEEK_END)
        spool.seek(0)
        resp = web.StreamResponse(
            headers={
                "Content-Type": "application/octet-stream",
                "Ltx-Epoch": str(self.epoch),
                "Content-Length": str(size),
            }
        )
        try:
            await resp.prepare(request)
            while chunk := spool.read(_READ_CHUNK):
                await resp.write(chunk)
            await resp.write_eof()
        except (ConnectionError, RuntimeError) as exc:  # the replica went away; it asks again
            log.info("resync answer for %s abandoned: %s", begin.node_id, exc or type(exc).__name__)
        finally:
            spool.close()
        return resp


class _Stream:
    """One replica's stream: the first pass, then new files and heartbeats."""

    def __init__(
        self, server: StreamServer, resp: web.StreamResponse, node_id: str, epoch: int
    ) -> None:
        self.server = server
        self.source = server.source
        self.resp = resp
        self.node_id = node_id
        self.epoch = epoch
        self.replicas: dict[str, _Replica] = {}
        self._next_heartbeat = 0.0
        self.extra: list[frames.Frame] = []  # frames to send at the next wake (HANDOFF)
        self.kick = asyncio.Event()

    async def send(self, frame: frames.Frame) -> None:
        await self.resp.write(frames.encode(frame))

    async def run(self, version: int) -> None:
        me = self.server.state.me
        await self.send(frames.Hello(self.epoch, me.node_id, me.api_url, version))
        await self.catch_up_all()
        await self.send(frames.Ready(self.epoch))
        await self.heartbeat()
        while self.server._serving() and self.epoch == self.server.epoch:
            changed = asyncio.ensure_future(self.source.changed())
            stopping = asyncio.ensure_future(self.server.stopping.wait())
            kicked = asyncio.ensure_future(self.kick.wait())
            timeout = max(0.0, self._next_heartbeat - time.monotonic())
            try:
                await asyncio.wait(
                    {changed, stopping, kicked}, timeout=timeout, return_when="FIRST_COMPLETED"
                )
            finally:
                changed.cancel()
                stopping.cancel()
                kicked.cancel()
            await self.catch_up_all()
            self.kick.clear()
            while self.extra:
                await self.send(self.extra.pop(0))
            if time.monotonic() >= self._next_heartbeat:
                await self.heartbeat()
        with contextlib.suppress(ConnectionError):
            await self.send(frames.End(self.epoch))
            await self.resp.write_eof()

    async def heartbeat(self) -> None:
        positions = []
        for name in self.source.names():
            ltx_log = self.source.log_of(name)
            pos = ltx_log.pos if ltx_log else None
            if pos is not None:
                positions.append(DatabasePosition(name, pos.txid, pos.post_apply_checksum))
        now_ms = int(time.time() * 1000)
        for group in frames.split_positions(positions) if positions else [()]:
            await self.send(frames.Heartbeat(self.epoch, now_ms, tuple(group)))
        self._next_heartbeat = time.monotonic() + self.server.heartbeat_interval

    async def catch_up_all(self) -> None:
        for name in self.source.names():
            await self.catch_up(name)

    async def catch_up(self, name: str) -> None:
        """Bring the replica's copy of `name` to the end of the log, or say why not."""
        ltx_log = self.source.log_of(name)
        if ltx_log is None:
            return
        for _attempt in range(3):  # files may vanish under retention: list again
            pos = ltx_log.pos
            if pos is None:
                return
            have = self.replicas.get(name)
            if have is not None and have.resync_sent:
                return
            try:
                if have is None:
                    await self._bootstrap(name, ltx_log, pos)
                else:
                    await self._follow(name, ltx_log, pos, have)
                return
            except FileNotFoundError:
                continue

    async def _bootstrap(self, name: str, ltx_log: LTXLog, pos: Pos) -> None:
        """A replica without a copy: the whole log if it starts at 1, else a snapshot."""
        last = ltx_log.last_header
        if last is not None and last.commit == 0:  # deleted: nothing to bring
            self.replicas[name] = _Replica(pos.txid, pos.post_apply_checksum)
            return
        files = ltx_log.files_after(0)
        if files is not None and len(files) <= 64:
            await self._send_files(name, files)
            return
        with tempfile.TemporaryFile(dir=ltx_log.directory.parent) as spool:
            snap = await self.source.snapshot(name, spool)
            spool.seek(0)
            await self._send_file(name, spool)
        log.info("%s: sent a snapshot at TXID %d to %s", name, snap.txid, self.node_id)
        self.server.state.count("snapshots_sent")
        self.replicas[name] = _Replica(snap.txid, snap.post_apply_checksum)

    async def _follow(self, name: str, ltx_log: LTXLog, pos: Pos, have: _Replica) -> None:
        if have.txid == pos.txid:
            if have.checksum != pos.post_apply_checksum:
                await self._resync(name, pos, ResyncReason.DIVERGED)
            return
        if have.txid > pos.txid:
            await self._resync(name, pos, ResyncReason.AHEAD)
            return
        files = ltx_log.files_after(have.txid)
        if files is None:
            await self._resync(name, pos, ResyncReason.TOO_OLD)
            return
        first = self.server.encoded_file(self.epoch, name, files[0])
        pre = _pre_checksum(first, files[0])
        if pre is not None and pre != have.checksum:
            await self._resync(name, pos, ResyncReason.DIVERGED)
            return
        await self._send_files(name, files, first)

    async def _send_files(
        self, name: str, files: list[Path], first: _Encoded | None = None
    ) -> None:
        """Send files in order; ``first``: the first one's frames, already looked up."""
        for i, path in enumerate(files):
            known = first if i == 0 else None
            encoded = known or self.server.encoded_file(self.epoch, name, path)
            if encoded is not None:
                await self.resp.write(encoded.data)
            else:  # a large file: fragments read as they are sent
                with open(path, "rb") as f:
                    await self._send_file(name, f)
                encoded = _Encoded(b"", *_ends_of(path), None)
            self.replicas[name] = _Replica(encoded.max_txid, encoded.post_checksum)

    async def _send_file(self, name: str, f: BinaryIO) -> None:
        for fragment in frames.ltx_fragments(self.epoch, name, _chunks(f)):
            await self.send(fragment)

    async def _resync(self, name: str, pos: Pos, reason: ResyncReason) -> None:
        have = self.replicas[name]
        log.info(
            "%s: replica %s at TXID %d must resync (%s; primary at TXID %d)",
            name,
            self.node_id,
            have.txid,
            reason.name,
            pos.txid,
        )
        await self.send(frames.Resync(self.epoch, name, reason, pos.txid, pos.post_apply_checksum))
        have.resync_sent = True


@dataclass(frozen=True, slots=True)
class _Encoded:
    """A small LTX file as the frames every stream sends, with where it leaves a replica."""

    data: bytes
    max_txid: int
    post_checksum: int
    pre_checksum: int | None  # None: the file has FLAG_NO_CHECKSUM (or was not read)


def _ends_of(path: Path) -> tuple[int, int]:
    return _header_of(path).max_txid, _trailer_of(path).post_apply_checksum


def _pre_checksum(encoded: _Encoded | None, path: Path) -> int | None:
    """A file's pre-apply checksum (None with FLAG_NO_CHECKSUM), from the encoded cache
    when the file is small: the file is read once for every stream, not once per stream."""
    return encoded.pre_checksum if encoded is not None else _pre_of(_header_of(path))


def _pre_of(header: Header) -> int | None:
    return None if header.flags & FLAG_NO_CHECKSUM else header.pre_apply_checksum


def _header_of(path: Path) -> Header:
    with open(path, "rb") as f:
        return Header.from_bytes(f.read(ltx.HEADER_SIZE), path=str(path))
