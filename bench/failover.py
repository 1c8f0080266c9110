"""Failover and planned handoff with the Redis lease (issue 5), measured as a client sees them.

Three ltx-sidecar processes on 127.0.0.1 share a real redis-server (started here on a
free port, stopped at the end) with the default lease TTL. A writer in this process sends
single-row INSERTs through the execute endpoint of a node that is not involved in the
role change (it forwards each write to whoever is primary) and records, for every
acknowledged write, its row id and when it was sent and acknowledged. From that log:

* failover: kill -9 of the primary to the first write sent after the kill and
  acknowledged (necessarily by the new primary: the old one is dead);
* handoff: the primary's own ``pause_ms`` from its /handoff answer, and the longest gap
  between two acknowledged writes around the handoff, as the writer saw it;
* lost writes: acknowledged rows missing from the final primary once converged.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import sqlite3
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.registry import Context, Result, Target, benchmark
from tests.e2e.cluster import TOKEN, TestNode, redis_nodes, the_primary, wait_until
from tests.e2e.cluster import converge as converge_nodes
from tests.e2e.cluster import start_cluster as start_nodes
from tests.helpers import free_port

DB = "app.db"
TTL_SECONDS = 5.0  # the lease's default TTL: the target is stated at defaults
KILLS = {"quick": 2, "full": 20}
HANDOFFS = {"quick": 2, "full": 20}
WRITE_RATE = 200.0  # acknowledged writes per second the writer aims at (two threads)
WRITE_TIMEOUT = 10.0

FAILOVER_TARGET = Target(TTL_SECONDS + 1, "<=")
PAUSE_TARGET = Target(100, "<=")
LOST_TARGET = Target(0, "<=")


class BenchError(RuntimeError):
    """The benchmark could not set itself up (no redis-server, a node that never started)."""


# -- redis-server ----------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not on PATH (make redis installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with (workdir / "redis.log").open("wb") as log:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"redis-server did not start: see {workdir / 'redis.log'}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _redis_answers(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# -- the writer ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    row: int
    sent: float  # time.monotonic()
    acked: float
    txid: int


def execute(api_url: str, sql: str, params: list[Any]) -> int:
    """One write through a node's execute endpoint (no catch-up wait); its TXID."""
    body = json.dumps({"sql": sql, "params": params, "wait": False}).encode()
    req = urllib.request.Request(
        f"{api_url}/db/{DB}/execute",
        data=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=WRITE_TIMEOUT) as resp:
        return int(json.load(resp)["txid"], 16)


@dataclass
class AckWriter:
    """Threads that insert numbered rows through `target`'s execute endpoint, paced."""

    target: TestNode
    rate: float = WRITE_RATE
    threads: int = 2
    acks: list[Ack] = field(default_factory=list)
    failures: int = 0
    _rows: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _stop: threading.Event = field(default_factory=threading.Event)
    _running: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> AckWriter:
        self._running.set()
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"writer{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._running.set()
        for worker in self._workers:
            worker.join(WRITE_TIMEOUT + 5)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No new writes inside the block (one in flight may still finish)."""
        self._running.clear()
        time.sleep(0.2)
        try:
            yield
        finally:
            self._running.set()

    def _run(self) -> None:
        interval = self.threads / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._running.wait()
            now = time.monotonic()
            if next_at > now:
                time.sleep(next_at - now)
            next_at = max(next_at + interval, time.monotonic() - 1)
            row = next(self._rows)
            sent = time.monotonic()
            try:
                txid = execute(self.target.url, "INSERT INTO acked(id) VALUES (?)", [row])
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                self.failures += 1  # not acknowledged: may or may not have landed
                time.sleep(0.01)
                continue
            self.acks.append(Ack(row, sent, time.monotonic(), txid))

    def acked_after(self, t: float) -> list[Ack]:
        return [a for a in list(self.acks) if a.sent >= t]


# -- pure measures ---------------------------------------------------------------------------


def first_ack_after(acks: Sequence[Ack], t: float) -> float | None:
    """Seconds from t to the first acknowledgement of a write sent at or after t."""
    times = [a.acked for a in acks if a.sent >= t]
    return min(times) - t if times else None


def longest_gap(ack_times: Sequence[float], start: float, end: float) -> float:
    """The longest time between consecutive acknowledgements overlapping [start, end]."""
    times = sorted(ack_times)
    gaps = [b - a for a, b in itertools.pairwise(times) if b >= start and a <= end]
    return max(gaps, default=float("nan"))


def acked_rows(path: Path) -> set[int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM acked")}
    finally:
        conn.close()


# -- the cluster -----------------------------------------------------------------------------


def make_nodes(root: Path, redis_url: str) -> list[TestNode]:
    key = f"ltx-sidecar/bench/{uuid.uuid4().hex}"
    return redis_nodes(
        root, redis_url, key, ttl=f"{TTL_SECONDS:g}s", extra='[log]\nlevel = "WARNING"\n'
    )


def converge(nodes: Sequence[TestNode], timeout: float = 60) -> TestNode:
    """Every live node at the primary's position; the primary."""
    return converge_nodes(nodes, DB, timeout=timeout, pages=False)


def start_cluster(nodes: Sequence[TestNode]) -> TestNode:
    return start_nodes(nodes, "CREATE TABLE IF NOT EXISTS acked(id INTEGER PRIMARY KEY)")


@contextlib.contextmanager
def cluster(root: Path) -> Iterator[list[TestNode]]:
    with redis_server(root / "redis") as url:
        nodes = make_nodes(root, url)
        try:
            yield nodes
        finally:
            for node in nodes:
                node.stop()


def wait_for_acks(
    writer: AckWriter, after: float, count: int, what: str, nodes: Sequence[TestNode]
) -> None:
    """Wait until `count` writes sent at or after `after` are acknowledged."""
    wait_until(lambda: len(writer.acked_after(after)) >= count, 60, what, *nodes)


def wait_for_role(node: TestNode, role: str, nodes: Sequence[TestNode]) -> None:
    wait_until(lambda: node.role() == role, 30, f"{node.name} {role}", *nodes)


def _s(x: float) -> float:
    return round(x, 3)


def _ms(x: float) -> float:
    return round(x, 1)


# -- failover --------------------------------------------------------------------------------


@benchmark("failover", description="kill -9 of the primary to the first write on the new one")
def failover(ctx: Context) -> list[Result]:
    """Over N kills of the primary under write load: time to the first acknowledged write."""
    kills = KILLS[ctx.mode]
    times: list[float] = []
    events: list[dict[str, object]] = []  # the timeline bench/plots.py draws
    t0 = time.monotonic()

    def event(node: TestNode, role: str) -> None:
        events.append({"t": round(time.monotonic() - t0, 3), "node": node.name, "role": role})

    with cluster(ctx.tmp_dir) as nodes:
        primary = start_cluster(nodes)
        for node in nodes:
            event(node, "primary" if node is primary else "replica")
        writer = AckWriter(next(n for n in nodes if n is not primary))
        with writer:
            for _ in range(kills):
                primary = the_primary(nodes)
                writer.target = next(n for n in nodes if n is not primary)
                mark = time.monotonic()
                wait_for_acks(writer, mark, 5, "writes", nodes)
                killed_at = time.monotonic()
                primary.kill()
                event(primary, "down")
                survivors = [n for n in nodes if n is not primary]
                event(the_primary(survivors), "primary")
                wait_for_acks(writer, killed_at, 1, "a write acknowledged after the kill", nodes)
                times.append(first_ack_after(writer.acks, killed_at) or float("nan"))
                primary.start()
                event(primary, "replica")
                with writer.paused():
                    converge(nodes)
            with writer.paused():
                final = converge(nodes)
                acked = {a.row for a in writer.acks}
                lost = len(acked - acked_rows(final.db()))
        timeline = {"nodes": [n.name for n in nodes], "events": events,
                    "end": round(time.monotonic() - t0, 3)}  # fmt: skip
        (ctx.out_dir / "failover.json").write_text(json.dumps(timeline, indent=1) + "\n")
    return [
        Result(
            f"failover time, max over {kills} kills",
            _s(max(times)),
            "s",
            FAILOVER_TARGET,
            f"lease TTL {TTL_SECONDS:g} s (default); kill -9 of the primary to the first write "
            "sent after it and acknowledged, through a surviving node's execute endpoint; "
            f"all: {', '.join(f'{t:.2f}' for t in times)} s",
        ),
        Result(f"failover time, median over {kills} kills", _s(statistics.median(times)), "s"),
        Result(
            "acknowledged writes missing after the kills",
            lost,
            "rows",
            notes=f"of {len(acked)} acknowledged; asynchronous replication may drop the "
            "last writes a killed primary acknowledged (LiteFS does too)",
        ),
    ]


# -- planned handoff -------------------------------------------------------------------------


def promote(
    target: TestNode, primary: TestNode, timeout: float = 30
) -> tuple[dict[str, Any], float, float]:
    """POST /promote on target once the primary sees it connected; (answer, start, end)."""

    def connected() -> bool:
        status = primary.status()
        return status is not None and any(
            r["node_id"] == target.name and r["connected"] for r in status["replicas"]
        )

    wait_until(connected, timeout, f"{target.name} connected to {primary.name}", primary, target)
    start = time.monotonic()
    answer = target.post_json("/promote", {})
    return answer, start, time.monotonic()


@benchmark("handoff", description="Write pause of a planned handoff under load")
def handoff(ctx: Context) -> list[Result]:
    """Over N planned handoffs under ~200 writes/s: the primary's pause and the client's gap."""
    rounds = HANDOFFS[ctx.mode]
    pauses: list[float] = []
    gaps: list[float] = []
    quiet_gaps: list[float] = []
    with cluster(ctx.tmp_dir) as nodes:
        a, b, c = nodes
        start_cluster(nodes)
        with AckWriter(c) as writer:  # c stays a replica: it only forwards
            for i in range(rounds):
                primary = a if i % 2 == 0 else b
                target = b if i % 2 == 0 else a
                quiet_start = time.monotonic()
                wait_for_acks(writer, quiet_start, 200, "writes", nodes)
                quiet_end = time.monotonic()
                answer, start, end = promote(target, primary)
                wait_for_role(target, "primary", nodes)
                wait_for_acks(writer, end, 20, "writes after the handoff", nodes)
                settled = time.monotonic()
                acks = [x.acked for x in writer.acks]
                pauses.append(float(answer["pause_ms"]))
                gaps.append(longest_gap(acks, start, settled) * 1000)
                quiet_gaps.append(longest_gap(acks, quiet_start + 0.1, quiet_end) * 1000)
            with writer.paused():
                final = converge(nodes)
                acked = {x.row for x in writer.acks}
                lost = len(acked - acked_rows(final.db()))
                failures = writer.failures
    pause_note = f"all: {', '.join(f'{p:.0f}' for p in pauses)} ms"
    gap_note = (
        f"all: {', '.join(f'{g:.0f}' for g in gaps)} ms; longest gap between acknowledged "
        f"writes at ~{WRITE_RATE:.0f}/s through a third node's execute endpoint, "
        f"without a handoff: {max(quiet_gaps):.0f} ms"
    )
    return [
        Result(f"pause reported by the primary, max of {rounds}", _ms(max(pauses)), "ms",
               PAUSE_TARGET, pause_note),
        Result("pause reported by the primary, median", _ms(statistics.median(pauses)), "ms"),
        Result(f"write gap seen by the client, max of {rounds}", _ms(max(gaps)), "ms",
               PAUSE_TARGET, gap_note),
        Result("write gap seen by the client, median", _ms(statistics.median(gaps)), "ms"),
        Result("acknowledged writes lost", lost, "rows", LOST_TARGET,
               f"of {len(acked)} acknowledged; {failures} writes failed (not acknowledged)"),
    ]  # fmt: skip
