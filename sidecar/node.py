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
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

import ltx
from sidecar.api import ActionError, Actions, local_export, local_import, make_api_app, start_site
from sidecar.auth import bearer, load_token
from sidecar.cluster import ClusterState, NodeInfo, Primary
from sidecar.config import Config
from sidecar.execute import handle_execute
from sidecar.frames import DatabasePosition
from sidecar.lease import Lease, LeaseError, Term, candidate_should_wait, open_lease
from sidecar.pause import WritePause
from sidecar.peers import fresh_positions
from sidecar.primary import DatabaseWorker
from sidecar.primary import Primary as PrimaryRole
from sidecar.proxy import handle_wait_txid, start_proxy
from sidecar.replica import ReplicaRole, remove_primary_files
from sidecar.resync import PinnedReader
from sidecar.stream_server import StreamServer
from sidecar.tailer import TailerError

log = logging.getLogger("ltx_sidecar.node")

STATIC_EPOCH = 1
HANDOFF_TIMEOUT = 5.0  # seconds the target has to catch up while writes are paused


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
        self.stream_server.spool_dir = cfg.data_dir
        self._term: Term | None = None
        self._step_down = asyncio.Event()
        self._handoff_seen = asyncio.Event()  # a HANDOFF frame arrived: read the lease now
        self._handoff_lock = asyncio.Lock()
        self._pause: WritePause | None = None
        self._runner: web.AppRunner | None = None
        self.lease: Lease | None = None
        self._last_lease_problem: str | None = None
        self._deferring_since: float | None = None  # monotonic, while _should_wait says so

    # -- the API ---------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        actions = Actions(
            promote=self.promote,
            export=self._export,
            import_db=self._import,
            db_path=self.db_path,
        )
        app = make_api_app(self.cfg, self.state, self.token, actions=actions)
        app.add_routes(self.stream_server.routes())
        app.add_routes(
            [
                web.get("/txid/wait", handle_wait_txid),
                web.post("/db/{name}/execute", handle_execute),
                web.post("/handoff", self._handle_handoff),
            ]
        )
        return app

    def db_path(self, name: str) -> Path | None:
        if self.primary is not None:
            worker = self.primary.by_name.get(name)
            return worker.path if worker else None
        if self.replica is not None:
            return self.replica.path_for(name)
        return None

    async def _export(self, name: str) -> Path:
        path = self.db_path(name)
        if path is None or not path.exists():
            raise ActionError(404, f"no database {name!r} on this node")
        return await local_export(self.cfg, name, path)

    async def _import(self, name: str, src: Path) -> dict[str, Any]:
        """Replace a database everywhere: on the primary, where the tailer ships it."""
        if self.primary is not None:
            path = self.db_path(name)
            if path is None:
                raise ActionError(404, f"no database {name!r} on the primary")
            return await local_import(name, path, src)
        primary = self.state.primary
        if primary is None:
            raise ActionError(503, "no primary is known; try again once one is")
        async with aiohttp.ClientSession() as session:
            with open(src, "rb") as body:
                async with session.post(
                    f"{primary.node.api_url}/db/{name}/import",
                    data=body,
                    headers=bearer(self.token),
                ) as resp:
                    if resp.status != 200:
                        raise ActionError(resp.status, (await resp.text()).strip())
                    answer: dict[str, Any] = await resp.json()
                    return answer

    async def start_api(self) -> None:
        self._runner = await start_site(self.make_app(), self.cfg.api.host, self.cfg.api.port)
        log.info("node API on http://%s:%d", self.cfg.api.host, self.cfg.api.port)

    async def stop_api(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- planned handoff ---------------------------------------------------------------------

    async def promote(self) -> dict[str, Any]:
        """Ask the primary to hand the lease to this node once it has caught up."""
        if self.state.is_primary:
            return {"primary": self.me.node_id, "epoch": self.state.epoch, "changed": False}
        if self.cfg.lease.type != "redis":
            raise ActionError(409, "the static lease has a fixed primary: change the config")
        if not self.cfg.candidate:
            raise ActionError(409, f"{self.me.node_id} is not a candidate (candidate = false)")
        primary = self.state.primary
        if primary is None:
            raise ActionError(503, "no primary is known; try again once one is")
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{primary.node.api_url}/handoff",
                json=self.me.as_dict(),
                headers=bearer(self.token),
                timeout=aiohttp.ClientTimeout(total=HANDOFF_TIMEOUT + 5),
            ) as resp,
        ):
            if resp.status != 200:
                raise ActionError(resp.status, (await resp.text()).strip())
            answer: dict[str, Any] = await resp.json()
        await self.state.wait_for(lambda: self.state.is_primary, HANDOFF_TIMEOUT)
        return {**answer, "changed": True, "role": self.state.role}

    async def _handle_handoff(self, request: web.Request) -> web.Response:
        """POST /handoff on the primary: pause writes, let the target catch up, hand over."""
        try:
            doc = await request.json()
            target = NodeInfo(
                str(doc["node_id"]), str(doc["api_url"]), str(doc.get("proxy_url", ""))
            )
        except (ValueError, KeyError, TypeError):
            return web.Response(status=400, text="body: expected {node_id, api_url, proxy_url}\n")
        term, lease, primary = self._term, self.lease, self.primary
        if term is None or lease is None or primary is None or not self.state.is_primary:
            return web.Response(status=409, text="this node is not the primary\n")
        if target.node_id not in self.state.replicas:
            return web.Response(status=409, text=f"{target.node_id} is not a connected replica\n")
        async with self._handoff_lock:
            started = time.monotonic()
            pause = WritePause(self.cfg, [w.path for w in primary.by_name.values()])
            # New writes through the proxy and execute wait (and are re-routed once the
            # lease moved); the ones under way finish first.
            self.state.pause_writes(True)
            try:
                await self.state.wait_for(lambda: self.state.writes_in_flight == 0, 2.0)
                await asyncio.to_thread(pause.take)
                final = {name: await primary.sync_now(name) for name in primary.names()}
                caught_up = await self.state.wait_for(
                    lambda: all(
                        self.state.replicas.get(target.node_id) is not None
                        and self.state.replicas[target.node_id].positions.get(n, (0, 0))[0] >= t
                        for n, t in final.items()
                    ),
                    HANDOFF_TIMEOUT,
                )
                if not caught_up:
                    raise ActionError(409, f"{target.node_id} did not catch up in time")
                new_term = await lease.handoff(term, target)
                if new_term is None:
                    raise ActionError(409, "the lease is no longer ours")
            except ActionError as exc:
                await asyncio.to_thread(pause.release)
                self.state.pause_writes(False)
                return web.Response(status=exc.status, text=f"{exc.message}\n")
            except (LeaseError, OSError) as exc:
                await asyncio.to_thread(pause.release)
                self.state.pause_writes(False)
                return web.Response(status=503, text=f"handoff failed: {exc}\n")
            positions = tuple(
                DatabasePosition(n, *self.state.replicas[target.node_id].positions[n])
                for n in final
            )
            await self.stream_server.handoff(target.node_id, positions)
            self._pause = pause  # released once this node no longer acts as primary
            self._step_down.set()
            ms = (time.monotonic() - started) * 1000
            log.info(
                "handed the lease to %s (epoch %d) after pausing writes %.1f ms",
                target.node_id,
                new_term.epoch,
                ms,
            )
            return web.json_response(
                {"primary": target.node_id, "epoch": new_term.epoch, "pause_ms": round(ms, 3)}
            )

    # -- roles -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.start_api()
        proxy: web.AppRunner | None = None
        try:
            if self.cfg.proxy.enabled:
                proxy = await start_proxy(self.cfg, self.state, self.token)
                log.info("proxy on http://%s:%d", self.cfg.proxy.host, self.cfg.proxy.port)
            self.lease = open_lease(self.cfg, self.me)
            await self._roles(stop)
        finally:
            if proxy is not None:
                await proxy.cleanup()
            if self.lease is not None:
                await self.lease.close()
            await self.stop_api()

    async def _roles(self, stop: asyncio.Event) -> None:
        """Take the lease or follow whoever holds it, until `stop`."""
        assert self.lease is not None
        lease = self.lease
        retry = max(0.05, min(1.0, lease.renew_interval))
        while not stop.is_set():
            term: Term | None = None
            if self.cfg.candidate and not await self._should_wait(lease):
                try:
                    term = await lease.acquire(self.me)
                except LeaseError as exc:
                    self._lease_problem(f"cannot take the lease: {exc}")
            if term is not None and lease.acquired_after_reset:
                term = await self._hold_off(lease, term, stop)
            if term is not None:
                await self._primary_term(lease, term, stop)
                continue
            try:
                holder = await lease.current()
            except LeaseError as exc:
                self._lease_problem(f"cannot read the lease: {exc}")
                holder = None
            if holder is not None and holder.holder.node_id == self.me.node_id:
                # Our own term from before a restart: renew it as ours, or wait it out.
                renewed = await _quietly(lease.renew(holder))
                if renewed is not None:
                    await self._primary_term(lease, renewed, stop)
                    continue
                holder = None
            if holder is None:
                await _sleep_or(stop, retry)
                continue
            lease.observe_epoch(holder.epoch)
            await self._replica_term(lease, holder, stop)

    async def _hold_off(self, lease: Lease, term: Term, stop: asyncio.Event) -> Term | None:
        """Hold a lease taken from a store that lost its data, without acting on it, for
        one TTL: the previous holder may still believe it is primary until its own term
        runs out (it steps down at its next renewal). Found by the chaos suite: without
        this, two primaries overlapped after Redis restarted empty."""
        log.warning(
            "the lease store lost its data (Redis restarted empty?): holding the lease %.1fs "
            "before acting as primary, so the previous primary has stopped",
            lease.ttl,
        )
        until = time.monotonic() + lease.ttl
        while time.monotonic() < until:
            await _sleep_or(stop, min(lease.renew_interval, until - time.monotonic()))
            if stop.is_set():
                return None
            try:
                renewed = await lease.renew(term)
            except LeaseError as exc:
                self._lease_problem(f"cannot renew the lease: {exc}")
                return None
            if renewed is None:
                return None
            term = renewed
        # Candidates have published their positions again meanwhile: one more current
        # than this node takes the lease instead, so no acknowledged write is dropped.
        if await self._should_wait(lease):
            log.info("a more current candidate is alive: giving the lease up to it")
            with contextlib.suppress(LeaseError):
                await lease.release(term)
            return None
        return term

    def _lease_problem(self, message: str) -> None:
        if message != self._last_lease_problem:
            log.warning("%s", message)
            self._last_lease_problem = message

    async def _should_wait(self, lease: Lease) -> bool:
        """A candidate leaves the lease to a more current live one (sidecar.peers).

        Deferring is bounded: a more current candidate that has not taken the lease within
        a TTL (it cannot reach the store, say) stops holding the cluster up.
        """
        try:
            published, candidates = await lease.positions()
        except LeaseError:
            return False
        candidates.pop(self.me.node_id, None)
        fresh = await fresh_positions(candidates, timeout=min(1.0, lease.ttl / 4))
        stale = {i: c.positions for i, c in candidates.items() if i not in fresh}
        if not published:  # unknown (Redis lost it): the best live candidate stands in
            for positions in [*stale.values(), *fresh.values()]:
                for name, (txid, checksum) in positions.items():
                    if txid > published.get(name, (0, 0))[0]:
                        published[name] = (txid, checksum)
        if not candidate_should_wait(self._positions(), published, stale, fresh):
            self._deferring_since = None
            return False
        now = time.monotonic()
        if self._deferring_since is None:
            self._deferring_since = now
            log.info("a more current candidate is alive: leaving the lease to it")
        elif now - self._deferring_since > lease.ttl:
            log.warning(
                "the more current candidate has not taken the lease in %.1fs: taking it",
                now - self._deferring_since,
            )
            return False
        return True

    async def _primary_term(self, lease: Lease, term: Term, stop: asyncio.Event) -> None:
        """Act as primary while the term lasts: renew it, and stop before it can expire."""
        self._last_lease_problem = None
        until = asyncio.Event()
        self._term = term
        self._step_down = asyncio.Event()
        role = asyncio.create_task(self.run_primary(term.epoch, until), name="primary")
        try:
            while not stop.is_set() and not role.done() and not self._step_down.is_set():
                wait = min(lease.renew_interval, term.expires - time.monotonic())
                await _wait_any((stop, self._step_down), max(0.0, wait))
                if stop.is_set() or self._step_down.is_set():
                    break
                if time.monotonic() >= term.expires:
                    log.warning("the lease expired before it could be renewed: stepping down")
                    break
                try:
                    budget = max(0.01, term.expires - time.monotonic())
                    renewed = await asyncio.wait_for(lease.renew(term), budget)
                except (LeaseError, TimeoutError) as exc:
                    self._lease_problem(f"cannot renew the lease: {exc or 'timed out'}")
                    continue
                if renewed is None:
                    log.warning("the lease was lost (epoch %d): stepping down", term.epoch)
                    break
                term = self._term = renewed
                self._last_lease_problem = None
                with contextlib.suppress(LeaseError):
                    await lease.publish(self.me, self._positions(), primary=True)
        finally:
            until.set()
            await asyncio.gather(role, return_exceptions=True)
            self._term = None
            if self._pause is not None:  # after a handoff: writes may go on, as a replica's
                await asyncio.to_thread(self._pause.release)
                self._pause = None
                self.state.pause_writes(False)  # held writes now go to the new primary
        if stop.is_set() and not self._step_down.is_set():
            with contextlib.suppress(LeaseError):
                await lease.release(term)
                log.info("released the lease (epoch %d)", term.epoch)

    async def _replica_term(self, lease: Lease, holder: Term, stop: asyncio.Event) -> None:
        """Follow `holder` until the lease names someone else (or nobody, for a candidate)."""
        until = asyncio.Event()
        self.state.set_role("replica", Primary(holder.holder, holder.epoch))
        role = asyncio.create_task(self.run_replica(holder.holder.api_url, until), name="replica")
        try:
            while not stop.is_set() and not role.done():
                await _wait_any((stop, self._handoff_seen), lease.renew_interval)
                self._handoff_seen.clear()
                if stop.is_set():
                    break
                try:
                    current = await lease.current()
                except LeaseError as exc:
                    self._lease_problem(f"cannot read the lease (still following): {exc}")
                    continue
                self._last_lease_problem = None
                if self.cfg.candidate:
                    with contextlib.suppress(LeaseError):
                        await lease.publish(self.me, self._positions(), primary=False)
                if current is None:
                    if self.cfg.candidate:
                        log.info("the primary's lease is gone: trying to take it")
                        break
                    continue
                if current.holder != holder.holder or current.epoch != holder.epoch:
                    log.info(
                        "the primary is now %s (epoch %d)", current.holder.node_id, current.epoch
                    )
                    break
        finally:
            until.set()
            await asyncio.gather(role, return_exceptions=True)

    def _positions(self) -> dict[str, tuple[int, int]]:
        return {v.name: (v.txid, v.checksum) for v in self.state if not v.deleted}

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
            log.info("no longer primary (epoch %d)", epoch)

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
        replica = ReplicaRole(self.cfg, self.state, self.token, on_handoff=self._handoff_seen.set)
        self.replica = replica
        if self.state.role != "replica":
            self.state.set_role("replica", self.state.primary)
        try:
            await replica.run(primary_url, until)
        finally:
            with contextlib.suppress(Exception):
                await replica.close()
            self.replica = None


async def _wait_any(events: tuple[asyncio.Event, ...], timeout: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when="FIRST_COMPLETED")
    finally:
        for w in waiters:
            w.cancel()


async def _sleep_or(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)


async def _quietly(call: Awaitable[Term | None]) -> Term | None:
    try:
        return await call
    except LeaseError:
        return None


class _NoDatabases:
    """The stream server's source while this node is not the primary."""

    node_id_number = 0

    async def open_reader(self, name: str) -> PinnedReader:
        raise TailerError("not the primary")

    def names(self) -> list[str]:
        return []

    def log_of(self, name: str) -> None:
        return None

    async def snapshot(self, name: str, out: BinaryIO) -> ltx.Pos:
        raise RuntimeError("not the primary")

    async def changed(self) -> None:
        await asyncio.Event().wait()
