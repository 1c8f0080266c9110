"""Replication: commit-to-visible lag on replicas, fan-out, and bootstrapping a new replica.

Nodes are separate ltx-sidecar processes on 127.0.0.1 (static lease). The writer is the
tailer benchmark's writer process: one single-row commit per TXID, paced at 1,000/s or
unpaced, recording time.time_ns() after each COMMIT.

Visibility on a replica is detected through its ``<db>-pos`` file, which the replica
replaces (rename) right after each apply's COMMIT: an inotify watch on the database
directory reports the rename, and the file's TXID says which commits became visible. A
reader could see them a moment before the rename, so the lag is an upper bound by the
few microseconds between COMMIT and rename.

Memory is each sidecar's peak RSS (VmHWM from /proc) at the end of the run.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.registry import Context, Result, Target, benchmark
from bench.tailer_overhead import (
    BenchError,
    WriterRun,
    _inotify_watch,
    make_database,
    percentile,
    run_writer,
)
from tests.e2e.cluster import TestNode, database_checksum, wait_until

DB = "app.db"
LAG_SECONDS = {"quick": 2.0, "full": 20.0}
MAX_RATE_SECONDS = {"quick": 1.5, "full": 15.0}
BOOTSTRAP_MB = {"quick": 256, "full": 1024}  # quick: a 48 MB one was mostly start-up
RESYNC_FRACTION = 0.01  # of the pages of a replica edited behind its back
FANOUT = 8

P50_TARGET = Target(2, "<=")
P99_TARGET = Target(20, "<=")
FANOUT_P99_TARGET = Target(50, "<=")
DRAIN_TARGET = Target(1000, "<=")
RSS_TARGET = Target(100, "<=")
BOOTSTRAP_TARGET = Target(200, ">=")

_EVENT_SIZE = 16
_IN_MOVED_TO = 0x00000080


@dataclass(slots=True)
class Visibility:
    """When each TXID first became visible on one replica (time.time_ns())."""

    txids: list[int] = field(default_factory=list)
    times: list[int] = field(default_factory=list)

    def time_of(self, txid: int) -> int | None:
        # txids only grow; find the first event at or past txid
        lo, hi = 0, len(self.txids)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.txids[mid] < txid:
                lo = mid + 1
            else:
                hi = mid
        return self.times[lo] if lo < len(self.txids) else None


class PosWatcher:
    """Records (TXID, time) each time a replica's -pos file is replaced."""

    def __init__(self, directory: Path, db: str = DB) -> None:
        self.pos_path = directory / f"{db}-pos"
        self.name = f"{db}-pos".encode()
        self.seen = Visibility()
        self._stop = threading.Event()
        fd = _inotify_watch(directory)
        if fd is None:
            raise BenchError("inotify is needed for the replication benchmark (Linux)")
        self._fd = fd
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _record(self, t_ns: int) -> None:
        try:
            text = self.pos_path.read_bytes()
        except FileNotFoundError:
            return
        txid = int(text[:16], 16)
        if not self.seen.txids or txid > self.seen.txids[-1]:
            self.seen.txids.append(txid)
            self.seen.times.append(t_ns)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            try:
                buf = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            t_ns = time.time_ns()
            if self.name in buf:
                self._record(t_ns)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self._fd)

    @property
    def txid(self) -> int:
        return self.seen.txids[-1] if self.seen.txids else 0


def peak_rss_mb(node: TestNode) -> float:
    if node.process is None:
        return 0.0
    with contextlib.suppress(OSError), open(f"/proc/{node.process.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def cluster(root: Path, replicas: int) -> Iterator[tuple[TestNode, list[TestNode]]]:
    primary = TestNode("primary", root / "primary", extra='[log]\nlevel = "WARNING"\n')
    primary.write_config()
    make_database(primary.db())
    nodes = [primary]
    try:
        primary.start()
        followers = []
        for i in range(replicas):
            node = TestNode(f"replica{i}", root / f"replica{i}", primary_url=primary.url)
            nodes.append(node)
            node.start()
            followers.append(node)
        wait_until(
            lambda: primary.txid() > 0 and all(r.txid() == primary.txid() for r in followers),
            60,
            "replicas bootstrapped",
            *nodes,
        )
        yield primary, followers
    finally:
        for node in reversed(nodes):
            node.stop()


@dataclass(slots=True)
class LagRun:
    lags_ms: list[float]  # sorted, every commit on every replica; inf if never visible
    drain_ms: float  # last commit to visible on the slowest replica
    commits: int
    rate: float
    rss_mb: float  # the largest sidecar peak RSS


@dataclass(slots=True)
class _Observed:
    """One writer run seen from every replica."""

    base: int  # the primary's TXID before the writer's first commit
    writer: WriterRun
    names: list[str]
    watchers: list[PosWatcher]
    rss_mb: float

    def lags_ms(self, watcher: PosWatcher) -> list[float]:
        """Commit-to-visible per commit, in commit order; inf when never seen."""
        out = []
        for i, t_commit in enumerate(self.writer.times_ns):
            seen = watcher.seen.time_of(self.base + i + 1)
            out.append(float("inf") if seen is None else (seen - t_commit) / 1e6)
        return out


def _observe(root: Path, replicas: int, seconds: float, rate: float) -> _Observed:
    """Run the writer on a fresh cluster and record when each replica saw each TXID."""
    with cluster(root, replicas) as (primary, followers):
        base = primary.txid()
        watchers = [PosWatcher(r.db_dir) for r in followers]
        try:
            run_dir = root / "writer"
            run_dir.mkdir(exist_ok=True)
            w = run_writer(run_dir, primary.db(), seconds, rate)
            last = base + w.commits
            deadline = time.monotonic() + 30
            while any(x.txid < last for x in watchers) and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            for x in watchers:
                x.stop()
        rss = max(peak_rss_mb(n) for n in (primary, *followers))
        return _Observed(base, w, [r.name for r in followers], watchers, rss)


def lag_run(root: Path, replicas: int, seconds: float, rate: float) -> LagRun:
    run = _observe(root, replicas, seconds, rate)
    w, last = run.writer, run.base + run.writer.commits
    lags: list[float] = []
    drain = 0.0
    for watcher in run.watchers:
        lags += run.lags_ms(watcher)
        end = watcher.seen.time_of(last)
        drain = max(drain, float("inf") if end is None else (end - w.times_ns[-1]) / 1e6)
    return LagRun(sorted(lags), drain, w.commits, w.commits / w.seconds, run.rss_mb)


def _ms(x: float) -> float:
    return round(x, 3)


@benchmark("replication_lag", description="Commit-to-visible lag on two replicas")
def replication_lag(ctx: Context) -> list[Result]:
    """Commit-to-visible lag with two replicas at 1,000 commits/s and at the max rate."""
    paced = lag_run(ctx.tmp_dir / "paced", 2, LAG_SECONDS[ctx.mode], 1000.0)
    unpaced = lag_run(ctx.tmp_dir / "max", 2, MAX_RATE_SECONDS[ctx.mode], 0.0)
    return [
        Result(
            "lag p50 at 1,000 commits/s, 2 replicas",
            _ms(percentile(paced.lags_ms, 50)),
            "ms",
            P50_TARGET,
            f"{paced.commits} commits at {paced.rate:.0f}/s, seen on each replica",
        ),
        Result(
            "lag p99 at 1,000 commits/s, 2 replicas",
            _ms(percentile(paced.lags_ms, 99)),
            "ms",
            P99_TARGET,
        ),
        Result(
            "lag p99 at the writer's max rate, 2 replicas",
            _ms(percentile(unpaced.lags_ms, 99)),
            "ms",
            notes=f"{unpaced.commits} commits at {unpaced.rate:.0f}/s",
        ),
        Result(
            "drain after the writer stops (max rate)",
            _ms(unpaced.drain_ms),
            "ms",
            DRAIN_TARGET,
            "last commit to visible on the slowest replica",
        ),
        Result("sidecar peak RSS (2 replicas)", round(paced.rss_mb, 1), "MB", RSS_TARGET),
    ]


@benchmark("replication_fanout", description="Eight replicas on one primary at 1,000/s")
def replication_fanout(ctx: Context) -> list[Result]:
    """p99 lag with eight replicas at 1,000 commits/s, and the sidecars' peak memory."""
    run = lag_run(ctx.tmp_dir / "fanout", FANOUT, LAG_SECONDS[ctx.mode], 1000.0)
    return [
        Result(
            "lag p99 at 1,000 commits/s, 8 replicas",
            _ms(percentile(run.lags_ms, 99)),
            "ms",
            FANOUT_P99_TARGET,
            f"p50 {_ms(percentile(run.lags_ms, 50))} ms; {run.commits} commits at {run.rate:.0f}/s",
        ),
        Result("sidecar peak RSS (8 replicas)", round(run.rss_mb, 1), "MB", RSS_TARGET),
    ]


def fill_database(path: Path, megabytes: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS blob(id INTEGER PRIMARY KEY, data BLOB)")
    chunk = os.urandom(1 << 20)
    for i in range(megabytes):
        conn.execute("BEGIN")
        for j in range(16):
            conn.execute("INSERT INTO blob(data) VALUES (?)", (chunk[j * 65536 : (j + 1) * 65536],))
        conn.execute("COMMIT")
        if i % 64 == 63:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _large_primary(ctx: Context) -> TestNode:
    """A primary node (not started) with a database of the mode's bootstrap size."""
    primary = TestNode("primary", ctx.tmp_dir / "primary", extra='[log]\nlevel = "WARNING"\n')
    primary.write_config()
    fill_database(primary.db(), BOOTSTRAP_MB[ctx.mode])
    return primary


def _start_and_snapshot(primary: TestNode) -> None:
    primary.start()
    wait_until(
        lambda: (p := primary.position()) is not None and p[1] == database_checksum(primary.db()),
        600,
        "the primary's first snapshot",
        primary,
    )


@benchmark("replication_bootstrap", description="A new replica bootstraps from a large database")
def replication_bootstrap(ctx: Context) -> list[Result]:
    """Time for an empty replica to reach the primary's position on a large database."""
    primary = _large_primary(ctx)
    size = primary.db().stat().st_size
    replica = TestNode("replica", ctx.tmp_dir / "replica", primary_url=primary.url)
    try:
        _start_and_snapshot(primary)
        start = time.perf_counter()
        replica.start()
        wait_until(lambda: replica.position() == primary.position(), 900, "bootstrap", replica)
        seconds = time.perf_counter() - start
        rss = max(peak_rss_mb(primary), peak_rss_mb(replica))
    finally:
        replica.stop()
        primary.stop()
    mb = size / 1e6
    return [
        Result(
            f"bootstrap of a {mb:,.0f} MB database",
            round(mb / seconds, 1),
            "MB/s",
            BOOTSTRAP_TARGET,
            f"{seconds:.2f} s from starting the replica to its position equal to the primary's",
        ),
        Result("sidecar peak RSS during bootstrap", round(rss, 1), "MB", RSS_TARGET),
    ]


def edit_pages(path: Path, fraction: float, seed: int = 1) -> tuple[int, int]:
    """Overwrite ``fraction`` of a closed database's pages (never page 1) with random
    bytes, behind SQLite's back; return (pages edited, pages)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    conn.close()
    pages = path.stat().st_size // page_size
    chosen = random.Random(seed).sample(range(2, pages + 1), max(1, int(pages * fraction)))
    with path.open("r+b") as f:
        for pgno in chosen:
            f.seek((pgno - 1) * page_size)
            f.write(os.urandom(page_size))
    return len(chosen), pages


@benchmark("replication_resync", description="Page-hash resync of a replica differing in 1%")
def replication_resync(ctx: Context) -> list[Result]:
    """A replica whose file was edited behind its back (1% of its pages) comes back: it
    hashes its pages and the primary sends the pages that differ, not the database."""
    primary = _large_primary(ctx)
    size = primary.db().stat().st_size
    replica = TestNode("replica", ctx.tmp_dir / "replica", primary_url=primary.url)
    try:
        _start_and_snapshot(primary)
        replica.start()
        # A few transactions after the snapshot: a copy whose log ends with a snapshot
        # repairs itself from it, without the primary.
        conn = sqlite3.connect(primary.db(), isolation_level=None)
        for _ in range(5):
            conn.execute("INSERT INTO blob(data) VALUES (randomblob(100))")
        conn.close()
        wait_until(lambda: replica.position() == primary.position(), 900, "bootstrap", replica)
        replica.stop()
        edited, pages = edit_pages(replica.db(), RESYNC_FRACTION)
        start = time.perf_counter()
        replica.start()
        # (Its position is the log's meanwhile: the database is what differs.)
        wait_until(lambda: "resynced to TXID" in replica.logs(), 900, "resync", replica)
        seconds = time.perf_counter() - start
        resynced = "with a resync file" in replica.logs()
        wait_until(lambda: replica.position() == primary.position(), 60, "position", replica)
    finally:
        replica.stop()
        primary.stop()
    answer = sum(p.stat().st_size for p in (replica.data_dir / "dbs" / DB / "ltx").glob("*.ltx"))
    how = "page-hash resync" if resynced else "a snapshot (no page-hash resync seen in the log)"
    return [
        Result(
            f"resync of a {size / 1e6:,.0f} MB database differing in 1% of its pages",
            round(seconds, 2),
            "s",
            notes=f"{edited:,} of {pages:,} pages overwritten; {how}, from starting the "
            f"replica to its resync applied",
        ),
        Result(
            "bytes sent for that resync, % of the database",
            round(100 * answer / size, 2),
            "%",
            notes=f"{answer / 1e6:.1f} MB LTX answer; the request is {8 * pages / 1e6:.1f} MB "
            f"of page hashes (8 bytes a page)",
        ),
    ]


def lag_over_time(
    root: Path, replicas: int = 2, seconds: float = 4.0, rate: float = 1000.0
) -> list[tuple[str, float, float]]:
    """(replica, seconds since the first commit, lag in ms) for every commit on every
    replica, for bench/plots.py; a commit never seen has lag inf."""
    run = _observe(root, replicas, seconds, rate)
    start = run.writer.times_ns[0]
    samples: list[tuple[str, float, float]] = []
    for name, watcher in zip(run.names, run.watchers, strict=True):
        for t_commit, lag in zip(run.writer.times_ns, run.lags_ms(watcher), strict=True):
            samples.append((name, (t_commit - start) / 1e9, lag))
    return samples
