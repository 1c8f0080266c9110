"""The chaos suite's Redis-lease variant: failover, quarantine and synchronous mode.

Three candidates (node1..node3) share a redis-server this module starts itself, so a
nemesis can kill it and start it again empty on the same port. Each node reaches Redis
through its own FaultProxy (tests/faultproxy.py), runs its proxy in front of the
example app (examples/app.py, a process started here, so it outlives a kill -9 of its
sidecar as an app would) and holds every write until one replica has it
(``sync.replicas = 1``)::

    node1 --> FaultProxy --+
    node2 --> FaultProxy --+--> redis-server (restartable, no persistence)
    node3 --> FaultProxy --+

The workload posts messages (each text a unique token) through the proxies of the live
nodes and records every answer: the node whose app committed it, its TXID (``Ltx-Txid``)
and ``Ltx-Sync`` (``ok`` or ``timeout``). A kill -9 of the primary's sidecar also
commits rows straight into its database while it is down (the app goes on), which the
new primary can never receive: those must reach the old primary's quarantine folder.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tests.chaos.invariants import Verdict, bad_log_entries
from tests.chaos.nemesis import FAST_FAILURE_DETECTION, Fault
from tests.chaos.quarantine import (
    Lost,
    QuarantinedFile,
    check_quarantined,
    check_sync_acks,
    read_quarantine,
)
from tests.e2e.appnodes import EXAMPLE_APP, AppNode, http, migrate
from tests.e2e.cluster import converge as converge_nodes
from tests.e2e.cluster import integrity, open_writer, same_pages, wait_until
from tests.faultproxy import FaultProxy
from tests.helpers import free_port

DB = "app.db"
LEASE_TTL = "1s"
SYNC_TIMEOUT = "2s"
WRITE_TIMEOUT = 15.0  # seconds a write may take (sync timeout, a failover behind it)
DIRECT_ROWS = 20  # rows the app commits straight into a killed primary's database
REDIS_START_TIMEOUT = 10.0
# ERROR lines a fault on the lease legitimately causes (Redis unreachable or emptied).
LEASE_FAULT_ERRORS = r"[Rr]edis|lease|[Ll]ease"


# -- redis-server ------------------------------------------------------------------------


class RedisProcess:
    """A redis-server without persistence on a fixed port: kill it, start it again empty."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (make redis installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: see {self.workdir}/redis.log")
            time.sleep(0.05)

    def answers(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(10)

    def restart_empty(self) -> None:
        """kill -9 and start again on the same port: every key (lease, epoch) is gone."""
        self.kill()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


# -- the workload ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncWrite:
    """One message the proxy answered 201 for."""

    token: str
    node: str  # whose app committed it
    txid: int
    sync: str  # the Ltx-Sync header: "ok", "timeout" or "" (none)


@dataclass(frozen=True, slots=True)
class DirectWrite:
    """One row committed straight into a node's database while its sidecar was down."""

    token: str
    node: str


@dataclass
class SyncWriter:
    """Threads posting messages through the proxies of the live nodes."""

    nodes: list[AppNode]
    seed: int = 0
    threads: int = 2
    writes: list[SyncWrite] = field(default_factory=list)
    failures: int = 0  # no answer, or not 201: not acknowledged
    _stop: threading.Event = field(default_factory=threading.Event)
    _running: threading.Event = field(default_factory=threading.Event)
    _idle: list[threading.Event] = field(default_factory=list)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for i in range(self.threads):
            idle = threading.Event()
            self._idle.append(idle)
            worker = threading.Thread(
                target=self._run, args=(random.Random(self.seed * 100 + i), idle), daemon=True
            )
            worker.start()
            self._workers.append(worker)

    def resume(self) -> None:
        self._running.set()

    def pause(self) -> None:
        """Returns once no write is in flight."""
        self._running.clear()
        for idle in self._idle:
            idle.wait(WRITE_TIMEOUT + 5)

    def stop(self) -> None:
        self._stop.set()
        self._running.set()
        for worker in self._workers:
            worker.join(WRITE_TIMEOUT + 5)

    def acked(self) -> int:
        with self._lock:
            return len(self.writes)

    def _run(self, rng: random.Random, idle: threading.Event) -> None:
        while not self._stop.is_set():
            idle.set()
            self._running.wait()
            if self._stop.is_set():
                return
            idle.clear()
            if not self._running.is_set():
                continue
            live = [n for n in self.nodes if n.process is not None]
            if not live:
                time.sleep(0.05)
                continue
            self.post(rng.choice(live))

    def post(self, node: AppNode) -> None:
        token = f"tok-{uuid.uuid4().hex}"
        body = json.dumps({"text": token}).encode()
        try:
            answer = http("POST", f"{node.proxy_url}/messages", body,
                          {"Content-Type": "application/json"}, timeout=WRITE_TIMEOUT)  # fmt: skip
            ok = answer.status == 201
            doc = answer.json() if ok else None
            txid = int(answer.headers.get("Ltx-Txid", ""), 16) if ok else 0
        except (OSError, ValueError):
            ok = False
        if not ok or not isinstance(doc, dict):
            with self._lock:
                self.failures += 1
            time.sleep(0.02)
            return
        write = SyncWrite(token, str(doc["node"]), txid, answer.headers.get("Ltx-Sync", ""))
        with self._lock:
            self.writes.append(write)


# -- the cluster -------------------------------------------------------------------------


@dataclass
class RedisChaosCluster:
    """Three candidates with the Redis lease, their apps, the proxies to Redis, the writer."""

    root: Path
    seed: int = 0
    count: int = 3
    redis: RedisProcess = field(init=False)
    nodes: list[AppNode] = field(init=False, default_factory=list)
    links: dict[str, FaultProxy] = field(init=False, default_factory=dict)  # node -> Redis
    apps: dict[str, subprocess.Popen[bytes]] = field(init=False, default_factory=dict)
    writer: SyncWriter = field(init=False)
    direct: list[DirectWrite] = field(init=False, default_factory=list)

    def start(self) -> None:
        self.redis = RedisProcess(self.root / "redis")
        self.redis.start()
        key = f"ltx-sidecar/chaos/{uuid.uuid4().hex}"
        for i in range(1, self.count + 1):
            name = f"node{i}"
            link = FaultProxy(self.redis.port).start()
            self.links[name] = link
            node = AppNode(
                name,
                self.root / name,
                redis_url=f"redis://127.0.0.1:{link.port}/0",
                lease_key=key,
                ttl=LEASE_TTL,
                env=dict(FAST_FAILURE_DETECTION),
                extra=f'[sync]\nreplicas = 1\ntimeout = "{SYNC_TIMEOUT}"\n',
                run_app=False,
            )
            self.nodes.append(node)
        first = self.nodes[0]
        first.write_config()
        migrate(first.db(DB))
        for node in self.nodes:
            node.write_config()
            self.start_app(node)
        first.start()
        wait_until(lambda: first.role() == "primary" and first.txid() > 0, 60,
                   "the first primary", first)  # fmt: skip
        for node in self.nodes[1:]:
            node.start()
        converge_nodes(self.nodes, DB, timeout=60, pages=False)
        self.writer = SyncWriter(self.nodes, seed=self.seed)
        self.writer.start()

    def start_app(self, node: AppNode) -> None:
        log = (node.root / "app.log").open("ab")
        self.apps[node.name] = subprocess.Popen(
            [sys.executable, str(EXAMPLE_APP), "serve", "--db", str(node.db(DB)),
             "--host", "127.0.0.1", "--port", str(node.app_port), "--node-id", node.name],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.stop()
        for node in reversed(self.nodes):
            node.stop()
        for app in self.apps.values():
            if app.poll() is None:
                app.send_signal(signal.SIGTERM)
                try:
                    app.wait(10)
                except subprocess.TimeoutExpired:
                    app.kill()
                    app.wait(10)
        for link in self.links.values():
            link.stop()
        self.redis.stop()

    @property
    def live(self) -> list[AppNode]:
        return [n for n in self.nodes if n.process is not None]

    def primary(self, timeout: float = 30) -> AppNode:
        """The one live node that says it is primary, once exactly one does."""
        found: list[AppNode] = []

        def one() -> bool:
            found[:] = [n for n in self.live if n.role() == "primary"]
            return len(found) == 1

        wait_until(one, timeout, "exactly one primary", *self.nodes)
        return found[0]

    def write_directly(self, node: AppNode, rows: int = DIRECT_ROWS) -> None:
        """The app commits rows into `node`'s database itself (its sidecar is down)."""
        conn = open_writer(node.db(DB))
        try:
            for _ in range(rows):
                token = f"direct-{uuid.uuid4().hex}"
                conn.execute("INSERT INTO messages (text, node, created) VALUES (?, ?, ?)",
                             (token, node.name, time.time()))  # fmt: skip
                self.direct.append(DirectWrite(token, node.name))
        finally:
            conn.close()


# -- nemeses -----------------------------------------------------------------------------


class RedisLinkFault:
    """The network between the primary and Redis cuts (resets) or drops (black hole):
    the primary cannot renew its lease, steps down, and another candidate takes over."""

    def __init__(self, mode: str) -> None:
        if mode not in ("cut", "drop"):
            raise ValueError(f"unknown Redis link fault {mode!r}")
        self.mode = mode
        self.kind = f"redis-{mode}"

    def inject(self, cluster: RedisChaosCluster, rng: random.Random) -> Fault:
        primary = cluster.primary()
        link = cluster.links[primary.name]
        link.cut() if self.mode == "cut" else link.drop()
        return Fault(self.kind, primary.name, link.heal, hold=3.0,
                     expected_errors=LEASE_FAULT_ERRORS)  # fmt: skip


class RedisRestartEmpty:
    """redis-server killed and started again with no data: no lease, no epoch counter."""

    kind = "redis-restart-empty"

    def inject(self, cluster: RedisChaosCluster, rng: random.Random) -> Fault:
        cluster.redis.restart_empty()
        return Fault(self.kind, "redis", hold=2.0, expected_errors=LEASE_FAULT_ERRORS)


class KillLeaseHolder:
    """kill -9 of the primary's sidecar; its app commits rows straight into the database
    while it is down; a new primary takes over; the old node comes back as a replica."""

    kind = "kill-primary-redis"

    def inject(self, cluster: RedisChaosCluster, rng: random.Random) -> Fault:
        primary = cluster.primary()
        primary.kill()
        cluster.write_directly(primary)
        wait_until(lambda: any(n.role() == "primary" for n in cluster.live), 30,
                   "a new primary", *cluster.nodes)  # fmt: skip
        return Fault(self.kind, primary.name, primary.start, hold=1.0)


class RedisNemesis(Protocol):
    kind: str

    def inject(self, cluster: RedisChaosCluster, rng: random.Random) -> Fault: ...


REDIS_NEMESES: list[RedisNemesis] = [
    RedisLinkFault("cut"),
    RedisLinkFault("drop"),
    RedisRestartEmpty(),
    KillLeaseHolder(),
]


def by_kind(kind: str) -> RedisNemesis:
    for nemesis in REDIS_NEMESES:
        if nemesis.kind == kind:
            return nemesis
    raise KeyError(f"no Redis nemesis {kind!r}; known: {', '.join(n.kind for n in REDIS_NEMESES)}")


# -- known product bugs --------------------------------------------------------------------

# Reported to the lead, not fixed yet: nemesis kind -> (the invariants the bug breaks, the
# bug). A round whose only problems are in those invariants is reported as an expected
# failure (xfail) naming the bug; any other problem fails. Remove an entry once fixed.
# Four found earlier are fixed (unlogged transactions quarantined, a hold-off after Redis
# loses its data, AHEAD checked against the checksum, the candidate lacking a synchronously
# acknowledged write taking the lease: candidates now ask each other before acting).
KNOWN_BROKEN: dict[str, tuple[frozenset[str], str]] = {}


def known_bug(kind: str, problems: list[str]) -> str | None:
    """The reported bug that explains every problem of a round of `kind`, if one does."""
    known = KNOWN_BROKEN.get(kind)
    if known is None or not problems:
        return None
    invariants, bug = known
    if all(p.split(":", 1)[0] in invariants for p in problems):
        return bug
    return None


# -- invariants --------------------------------------------------------------------------


def tokens(db: Path) -> set[str]:
    import sqlean

    conn = sqlean.connect(f"file:{db}?mode=ro", uri=True, timeout=10, isolation_level=None)
    try:
        return {str(r[0]) for r in conn.execute("SELECT text FROM messages")}
    finally:
        conn.close()


@dataclass(frozen=True, slots=True)
class Mark:
    """Where a round began: what was recorded before it is not checked again."""

    logs: dict[str, int]
    writes: int
    direct: int


def mark(cluster: RedisChaosCluster) -> Mark:
    return Mark({n.name: len(n.logs()) for n in cluster.nodes}, cluster.writer.acked(),
                len(cluster.direct))  # fmt: skip


def check_redis_cluster(
    cluster: RedisChaosCluster,
    since: Mark,
    *,
    expected_errors: str = "",
    timeout: float = 90,
) -> Verdict:
    """Every invariant, for what was recorded since `since`, once the writer has paused;
    convergence is waited for."""
    verdict = Verdict()
    nodes = cluster.nodes
    try:
        primary = converge_nodes(nodes, DB, timeout=timeout, pages=False)
        verdict.add("converged", [])
    except AssertionError as exc:
        verdict.add("converged", [str(exc).splitlines()[0]])
        return verdict
    replicas = [n for n in nodes if n is not primary]
    verdict.add("equal pages", [f"{r.name} differs from the primary"
                                for r in replicas if not same_pages(primary.db(DB), r.db(DB))])  # fmt: skip
    verdict.add("integrity", [f"{n.name}: {result}"
                              for n in nodes if (result := integrity(n.db(DB))) != "ok"])  # fmt: skip
    present = tokens(primary.db(DB))
    writes = list(cluster.writer.writes)[since.writes :]
    verdict.add("sync acks kept", check_sync_acks(
        [(w.token, w.node, w.txid) for w in writes if w.sync == "ok"], present))  # fmt: skip
    lost = [Lost(w.token, w.node, w.txid, f", answered Ltx-Sync: {w.sync or '(none)'}")
            for w in writes if w.token not in present]  # fmt: skip
    lost += [Lost(d.token, d.node, None) for d in cluster.direct[since.direct :]
             if d.token not in present]  # fmt: skip
    quarantined: dict[str, list[QuarantinedFile]] = {
        n.name: read_quarantine(n.data_dir / "quarantine" / DB) for n in nodes
    }
    verdict.add("quarantine", check_quarantined(lost, quarantined))
    verdict.checked["lost to quarantine"] += len(lost)
    for node in nodes:
        text = node.logs()[since.logs.get(node.name, 0) :]
        unexpected, known = bad_log_entries(text, expected_errors)
        verdict.add("clean logs", (f"{node.name}: {entry}" for entry in unexpected))
        verdict.known.extend(f"{node.name}: {entry}" for entry in known)
    return verdict
