"""The one place that knows about roles: a node is the primary or follows one.

A Node serves the node API (replication endpoints, status, health) for its whole life
and switches between two roles:

* primary: a Primary (a tailer per database) feeds the stream server, which sends
  every replica the LTX files after its position;
* replica: a ReplicaRole follows the primary's stream and applies what it sends.

Who is primary comes from the lease (static: fixed by the config). Every other module
takes its role as given; only this one decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from aiohttp import web

import ltx
from sidecar.auth import load_token
from sidecar.cluster import ClusterState, NodeInfo, Primary
from sidecar.config import Config
from sidecar.primary import DatabaseWorker
from sidecar.primary import Primary as PrimaryRole
from sidecar.replica import ReplicaRole, remove_primary_files
from sidecar.stream_server import StreamServer

log = logging.getLogger("ltx_sidecar.node")

STATIC_EPOCH = 1


def proxy_url_of(cfg: Config) -> str:
    """Where other nodes reach this node's proxy (same host as the API), or ""."""
    if not cfg.proxy.enabled:
        return ""
    host = urlsplit(cfg.advertise()).netloc.rpartition(":")[0] or "127.0.0.1"
    return f"http://{host}:{cfg.proxy.port}"


class Node:
    """One sidecar: the API, and the primary or replica role."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.token = load_token(cfg.token, cfg.token_path())
        self.me = NodeInfo(cfg.node_id, cfg.advertise(), proxy_url_of(cfg))
        self.state = ClusterState(self.me)
        self.primary: PrimaryRole | None = None
        self.replica: ReplicaRole | None = None
        self.stream_server: StreamServer = StreamServer(
            self.state,
            _NoDatabases(),
            self.token,
            heartbeat_interval=cfg.replication.heartbeat_interval.total_seconds(),
        )
        self._runner: web.AppRunner | None = None

    # -- the API ---------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app["state"] = self.state
        app["token"] = self.token
        app["db_path"] = self.db_path
        app.add_routes(self.stream_server.routes())
        app.add_routes([web.get("/status", self._status)])
        return app

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.as_dict())

    def db_path(self, name: str) -> Path | None:
        if self.primary is not None:
            worker = self.primary.by_name.get(name)
            return worker.path if worker else None
        if self.replica is not None:
            return self.replica.path_for(name)
        return None

    async def start_api(self) -> None:
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.api.host, self.cfg.api.port)
        await site.start()
        log.info("node API on http://%s:%d", self.cfg.api.host, self.cfg.api.port)

    async def stop_api(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- roles -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.start_api()
        try:
            if self.cfg.lease.type == "static" and not self.cfg.lease.primary_url:
                await self.run_primary(STATIC_EPOCH, stop)
            elif self.cfg.lease.type == "static":
                await self.run_replica(self.cfg.lease.primary_url, stop)
            else:
                raise NotImplementedError("redis lease")
        finally:
            await self.stop_api()

    async def run_primary(self, epoch: int, until: asyncio.Event) -> None:
        """Act as the primary of term `epoch` until `until` is set."""
        remove_primary_files(self.cfg)
        primary = PrimaryRole(self.cfg, on_change=self._published)
        self.primary = primary
        self.state.sync_hook = primary.sync_now
        self.state.set_role("primary", Primary(self.me, epoch))
        self.stream_server.source = primary
        self.stream_server.start_term(epoch)
        log.info("acting as primary (epoch %d)", epoch)
        try:
            await primary.run(until)
        finally:
            await self.stream_server.end_term()
            self.stream_server.source = _NoDatabases()
            self.state.sync_hook = None
            self.primary = None
            self.state.set_role("candidate", None)

    def _published(self, worker: DatabaseWorker) -> None:
        pos = worker.pos
        if pos is not None:
            self.state.set_position(worker.name, pos.txid, pos.post_apply_checksum)
        view = self.state.database(worker.name)
        tailer_state = worker.tailer.state
        view.extra.update(
            path=str(worker.path),
            page_size=tailer_state.page_size,
            pages=tailer_state.pages,
            size=tailer_state.page_size * tailer_state.pages,
            wal_size=tailer_state.wal_size,
            ltx_files_written=tailer_state.ltx_files,
            ltx_bytes_written=tailer_state.ltx_bytes,
            snapshots=tailer_state.snapshots,
            error=tailer_state.error,
        )

    async def run_replica(self, primary_url: str, until: asyncio.Event) -> None:
        """Follow the primary at `primary_url` until `until` is set."""
        replica = ReplicaRole(self.cfg, self.state, self.token)
        self.replica = replica
        self.state.set_role("replica", self.state.primary)
        try:
            await replica.run(primary_url, until)
        finally:
            with contextlib.suppress(Exception):
                await replica.close()
            self.replica = None


class _NoDatabases:
    """The stream server's source while this node is not the primary."""

    def names(self) -> list[str]:
        return []

    def log_of(self, name: str) -> None:
        return None

    async def snapshot(self, name: str, out: BinaryIO) -> ltx.Pos:
        raise RuntimeError("not the primary")

    async def changed(self) -> None:
        await asyncio.Event().wait()
