"""What this node knows about the cluster, in one place, for everything that asks.

The role machinery (node.py), the stream client and server write it; the proxy, the
middleware, the API (/status, /metrics, /health) and synchronous replication read it and
wait on it. It is plain in-process state owned by the event loop: every method is called
from the loop's thread, and waiters are woken by the change itself (no polling).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# Seconds of silence from the primary counted as normal: heartbeats come every second.
HEARTBEAT_GRACE = 2.0


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node as others reach it: its id and URLs (the proxy's may be empty)."""

    node_id: str
    api_url: str
    proxy_url: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "api_url": self.api_url, "proxy_url": self.proxy_url}


@dataclass(frozen=True, slots=True)
class Primary:
    """The primary of one term: who it is and the term's epoch."""

    node: NodeInfo
    epoch: int

    def as_dict(self) -> dict[str, Any]:
        return {**self.node.as_dict(), "epoch": self.epoch}


@dataclass(slots=True)
class DatabaseView:
    """One database as this node has it, and as the primary last said it has it."""

    name: str
    txid: int = 0
    checksum: int = 0
    updated: float = 0.0  # time.time() of the last change of txid
    primary_txid: int = 0  # from heartbeats (replicas); equal to txid on the primary
    primary_checksum: int = 0
    behind_since: float | None = None  # monotonic time we first saw primary_txid > txid
    deleted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # role-specific details for /status

    def lag_seconds(self, now: float | None = None) -> float:
        """Time since this node first knew of a TXID it has not applied yet; 0 if current."""
        if self.behind_since is None:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - self.behind_since)

    def lag_txids(self) -> int:
        return max(0, self.primary_txid - self.txid)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "txid": f"{self.txid:016x}",
            "checksum": f"{self.checksum:016x}",
            "primary_txid": f"{self.primary_txid:016x}",
            "lag_txids": self.lag_txids(),
            "lag_seconds": round(self.lag_seconds(), 6),
            "deleted": self.deleted,
            **self.extra,
        }


@dataclass(slots=True)
class ReplicaView:
    """A replica as the primary sees it: connected streams and reported positions."""

    node_id: str
    connected_since: float  # time.time()
    streams: int = 0
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (txid, sum)
    last_report: float | None = None  # time.time() of the last POSITIONS frame

    def as_dict(self, primary: dict[str, DatabaseView]) -> dict[str, Any]:
        dbs = {}
        for name, (txid, checksum) in self.positions.items():
            view = primary.get(name)
            dbs[name] = {
                "txid": f"{txid:016x}",
                "checksum": f"{checksum:016x}",
                "lag_txids": max(0, view.txid - txid) if view else 0,
            }
        return {
            "node_id": self.node_id,
            "connected": self.streams > 0,
            "connected_since": self.connected_since,
            "last_report": self.last_report,
            "databases": dbs,
        }


class ClusterState:
    """This node's view of the cluster; see the module docstring."""

    def __init__(self, me: NodeInfo) -> None:
        self.me = me
        self.role = "starting"  # "primary", "replica", "candidate" (no primary known)
        self.epoch = 0  # highest epoch seen
        self.primary: Primary | None = None
        self.ready = False  # replica: the primary's first pass is done (READY)
        self.databases: dict[str, DatabaseView] = {}
        self.replicas: dict[str, ReplicaView] = {}  # primary only
        self.started = time.time()
        self.heard_at: float | None = None  # monotonic time of the last frame from the primary
        self.pausing_writes = False  # a planned handoff is under way (primary)
        self.writes_in_flight = 0  # writes through the proxy or execute, on the primary
        self.counters: dict[str, int] = {}  # metric name -> count, e.g. "resyncs"
        self._changed = asyncio.Event()
        # Set by the primary role: make the tailer read the WAL to its end now and return
        # the database's TXID, so a write that just committed has its TXID.
        self.sync_hook: Callable[[str], Awaitable[int]] | None = None

    # -- writers ---------------------------------------------------------------------------

    def database(self, name: str) -> DatabaseView:
        view = self.databases.get(name)
        if view is None:
            view = self.databases[name] = DatabaseView(name)
        return view

    def set_position(self, name: str, txid: int, checksum: int, *, deleted: bool = False) -> None:
        """This node now has `name` at (txid, checksum): wake whoever waits for it."""
        view = self.database(name)
        if txid != view.txid:
            view.updated = time.time()
        view.txid, view.checksum, view.deleted = txid, checksum, deleted
        if self.role == "primary":
            view.primary_txid, view.primary_checksum = txid, checksum
        if view.txid >= view.primary_txid:
            view.behind_since = None
        self._notify()

    def set_primary_position(self, name: str, txid: int, checksum: int) -> None:
        """The primary said it has `name` at (txid, checksum) (heartbeat or LTX header)."""
        view = self.database(name)
        if txid > view.primary_txid or (txid < view.primary_txid and self.role != "primary"):
            view.primary_txid, view.primary_checksum = txid, checksum
        if view.txid < view.primary_txid:
            if view.behind_since is None:
                view.behind_since = time.monotonic()
        else:
            view.behind_since = None

    def remove_database(self, name: str) -> None:
        self.databases.pop(name, None)
        self._notify()

    def set_role(self, role: str, primary: Primary | None) -> None:
        self.role = role
        self.primary = primary
        if primary is not None:
            self.epoch = max(self.epoch, primary.epoch)
        if role != "replica":
            self.ready = role == "primary"
        if role != "primary":
            self.replicas.clear()
        self._notify()

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self._notify()

    def replica_connected(self, node_id: str) -> ReplicaView:
        view = self.replicas.get(node_id)
        if view is None:
            view = self.replicas[node_id] = ReplicaView(node_id, time.time())
        view.streams += 1
        self._notify()
        return view

    def replica_disconnected(self, node_id: str) -> None:
        view = self.replicas.get(node_id)
        if view is not None:
            view.streams = max(0, view.streams - 1)
        self._notify()

    def replica_reported(self, node_id: str, positions: dict[str, tuple[int, int]]) -> None:
        """A POSITIONS frame from a replica: what it has applied."""
        view = self.replicas.get(node_id)
        if view is None:
            view = self.replicas[node_id] = ReplicaView(node_id, time.time())
        view.positions.update(positions)
        view.last_report = time.time()
        self._notify()

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _notify(self) -> None:
        # One event per generation of the state: setting it wakes every waiter at once,
        # and each waiter re-checks its own predicate against the new state.
        self._changed.set()
        self._changed = asyncio.Event()

    def pause_writes(self, paused: bool) -> None:
        """A planned handoff holds new writes at the proxy and the execute endpoint."""
        self.pausing_writes = paused
        self._notify()

    @contextlib.asynccontextmanager
    async def primary_write(self, timeout: float | None) -> AsyncIterator[bool]:
        """A slot for one write on this node as primary.

        Waits while a handoff pauses writes, then yields whether this node is (still)
        the primary. While a slot is held, a handoff waits for it before pausing, so a
        write is either done before the pause or re-routed after it: never committed
        here once the node has handed over.
        """
        await self.wait_for(lambda: not self.pausing_writes, timeout)
        if not self.is_primary or self.pausing_writes:
            yield False
            return
        self.writes_in_flight += 1
        try:
            yield True
        finally:
            self.writes_in_flight -= 1
            self._notify()

    # -- readers ---------------------------------------------------------------------------

    @property
    def is_primary(self) -> bool:
        return self.role == "primary"

    def txid(self, name: str) -> int:
        view = self.databases.get(name)
        return view.txid if view else 0

    async def committed_txid(self, name: str) -> int:
        """The TXID that covers every commit made before this call (primary: after a sync)."""
        if self.role == "primary" and self.sync_hook is not None:
            return await self.sync_hook(name)
        return self.txid(name)

    async def write_txid(self, name: str) -> int | None:
        """The TXID of a write just committed here as primary; None when this node stopped
        being the primary meanwhile: the write may never have been shipped (then it is in
        the quarantine), so no TXID can honestly be promised for it."""
        if self.role != "primary":
            return None
        txid = await self.committed_txid(name)
        return txid if self.role == "primary" else None

    def heard_from_primary(self) -> None:
        """A frame arrived from the primary (replicas call this for every frame)."""
        self.heard_at = time.monotonic()

    def max_lag_seconds(self) -> float:
        """How far behind this node may be: the oldest unapplied TXID it knows of, or the
        silence of its primary beyond a heartbeat's grace (a dead primary announces no
        TXID, so silence is the only measure of what a replica may be missing)."""
        if self.role == "primary":
            return 0.0
        now = time.monotonic()
        lag = max((v.lag_seconds(now) for v in self.databases.values()), default=0.0)
        if self.heard_at is not None:
            lag = max(lag, now - self.heard_at - HEARTBEAT_GRACE)
        return lag

    def health_problem(self, max_lag: float) -> str | None:
        """Why this node should not get traffic now (None: healthy); one rule for the
        API's /health and the proxy's health check."""
        if self.role == "primary":
            return None
        if self.primary is None:
            return f"no primary known (role {self.role})"
        if self.heard_at is None:
            return "not ready: not connected to the primary yet"
        lag = self.max_lag_seconds()
        if max_lag > 0 and lag > max_lag:
            return f"replication lag {lag:.1f}s exceeds proxy.max-lag {max_lag:g}s"
        return None

    def replicas_at(self, name: str, txid: int) -> int:
        """How many replicas reported `name` at `txid` or beyond."""
        return sum(1 for r in self.replicas.values() if r.positions.get(name, (0, 0))[0] >= txid)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until predicate() is true (re-checked on every change); False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            return predicate()
        return True

    async def wait_for_txid(self, name: str, txid: int, timeout: float | None) -> bool:
        """Read-your-writes: wait until this node has applied `txid` of `name`."""
        return await self.wait_for(lambda: self.txid(name) >= txid, timeout)

    async def wait_for_primary(self, timeout: float | None) -> Primary | None:
        await self.wait_for(lambda: self.primary is not None, timeout)
        return self.primary

    async def wait_replicated(self, name: str, txid: int, replicas: int, timeout: float) -> bool:
        """Synchronous mode: wait until `replicas` replicas have applied `txid` of `name`."""
        return await self.wait_for(lambda: self.replicas_at(name, txid) >= replicas, timeout)

    def __iter__(self) -> Iterator[DatabaseView]:
        return iter(self.databases.values())

    def as_dict(self) -> dict[str, Any]:
        """The data behind GET /status and ``ltxctl status --json``."""
        return {
            "node_id": self.me.node_id,
            "api_url": self.me.api_url,
            "proxy_url": self.me.proxy_url,
            "role": self.role,
            "epoch": self.epoch,
            "ready": self.ready,
            "primary": self.primary.as_dict() if self.primary else None,
            "uptime_seconds": round(time.time() - self.started, 3),
            "databases": [v.as_dict() for v in sorted(self, key=lambda v: v.name)],
            "replicas": [r.as_dict(self.databases) for _, r in sorted(self.replicas.items())],
            "counters": dict(sorted(self.counters.items())),
        }
