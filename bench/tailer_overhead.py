"""Tailer overhead: what the ltx-sidecar daemon costs a SQLite writer, and how closely it follows.

Every figure comes from real processes: the writer is a small script run with
sys.executable (stdlib sqlite3, PRAGMA journal_mode=WAL, synchronous=NORMAL, the default
wal_autocheckpoint and a 5 s busy timeout) committing single-row INSERT transactions into
a fresh database; the daemon is ``python -m sidecar --config FILE`` with the database in
[databases] paths and its data directory beside it, on the same file system as
ctx.tmp_dir. The writer starts only once the daemon's first snapshot LTX file has landed.

1. Writer throughput. Runs alternate without / with the daemon (A B A B ...); the figure
   is the median over pairs of (commits/s with) / (commits/s without), since a shared
   2-core VM drifts between runs. The daemon's CPU time (utime + stime from
   /proc/<pid>/stat, 10 ms ticks) from the writer's start to the end of the drain is
   divided by the commits.
2. Commit-to-LTX latency. The writer paces itself to PACED_RATE commits/s and records
   time.time_ns() right after each COMMIT returns. Each commit is one transaction, so
   commit k is TXID snapshot + k; the run checks it: the log's last max TXID must equal
   snapshot + commits (a rescan or second snapshot would add TXIDs). A file "lands" when
   its final name appears (the log renames a fsynced temporary file into place), seen by
   the LandingWatcher below; latency = landing time of the file whose [min, max] holds
   the TXID - commit time.
3. Backlog at the writer's maximum rate, measured in the "with" runs of (1): every
   SAMPLE_INTERVAL the writer's commit count (published through a shared mmap) minus the
   log's max TXID; its mean in the last third of the run against the first third tells
   a bounded backlog from one that grows (the median over runs is the figure, as one
   3 s run holds only ~10 samples per third); the drain time is the landing time of the file
   holding the final TXID minus the time the last commit returned.

Landing detection: Linux inotify read directly (ctypes, IN_MOVED_TO on the ltx
directory) by a thread blocked in poll(): the kernel queues the event at the rename and
the thread wakes at once, whatever the directory holds. The two alternatives were
measured with the calibration below (another process renames 300 files 1 ms apart and
records the time): scandir polling every 0.2 ms gave p50/p99 0.13/0.35 ms in an empty
directory but 0.64/15 ms beside 5,000 files and 1.0/79 ms beside 30,000 (each poll lists
the whole directory while holding the GIL, and a run leaves thousands of files);
watchfiles with debounce=1, step=1 gave 1.2/2.3 ms (its Rust loop batches events before
Python sees them), the size of the 2 ms target itself; inotify gave 0.035/0.16 ms at
any size. The calibration result repeats that measurement on every run, as the error
bound of the latency figures. Without inotify (not Linux) scandir polling is used.

The writer also reports the commits that took over 1 ms and how long they took: without
the daemon these are its own checkpoints (fsyncs); with it, mostly waits for the
daemon's checkpoint seal (BEGIN IMMEDIATE), which is what holds the writer back.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import mmap
import os
import select
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.registry import Context, Result, Target, benchmark
from ltx import LTXError, parse_filename
from ltx.header import HEADER_SIZE, Header

RUN_SECONDS = {"quick": 2.0, "full": 15.0}  # each throughput run
PAIRS = {"quick": 2, "full": 5}  # without/with pairs
LATENCY_SECONDS = {"quick": 3.0, "full": 30.0}
PACED_RATE = 1000.0  # commits/s for the latency run
SAMPLE_INTERVAL = 0.1  # seconds between backlog samples
CALIBRATION_FILES = 300

DAEMON_START_TIMEOUT = 20.0  # seconds until the first snapshot must have landed
DRAIN_TIMEOUT = 10.0  # seconds after the writer stops to wait for the last TXID
WRITER_GRACE = 30.0  # seconds past its run time before the writer is killed
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL

RATIO_TARGET = Target(90, ">=")
TUNED_PASSIVE_FRAMES = 10_000  # the README's setting for write-heavy apps
P50_TARGET = Target(2, "<=")
P99_TARGET = Target(20, "<=")
DRAIN_TARGET = Target(1000, "<=")
# The backlog "grows without bound" when its last-third mean exceeds its first-third mean
# by more than this many milliseconds' worth of the writer's commits.
GROWTH_TARGET = Target(100, "<=")

DB_NAME = "app.db"
SCHEMA = "CREATE TABLE t (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, payload BLOB NOT NULL)"

# The writer process. argv: db seconds rate counter_file times_file. rate 0 = unpaced.
# Publishes its commit count in the first 8 bytes of counter_file (mmap) and 1 in the
# next 8 once it has stopped committing, writes the
# time.time_ns() after each COMMIT to times_file, prints one JSON line at the end.
WRITER = r"""
import array, json, mmap, os, resource, sqlite3, struct, sys, time

db, seconds, rate, counter_path, times_path, autocheckpoint = sys.argv[1:7]
seconds, rate = float(seconds), float(rate)
conn = sqlite3.connect(db, isolation_level=None, timeout=5.0)
mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
conn.execute("PRAGMA synchronous=NORMAL")
if autocheckpoint == "0":
    conn.execute("PRAGMA wal_autocheckpoint=0")
payloads = [os.urandom(100) for _ in range(64)]
with open(counter_path, "r+b") as f:
    counter = mmap.mmap(f.fileno(), 16)
times = array.array("q")
stamp, record, publish = time.time_ns, times.append, struct.pack_into
execute, clock, sleep = conn.execute, time.perf_counter, time.sleep
sql = "INSERT INTO t (seq, payload) VALUES (?, ?)"
interval = 1.0 / rate if rate > 0 else 0.0
cpu0 = resource.getrusage(resource.RUSAGE_SELF)
start = clock()
deadline = start + seconds
k = slow = 0
slow_seconds = longest = 0.0
while True:
    now = clock()
    if interval:
        slot = start + k * interval
        if slot >= deadline:
            break
        if slot > now:
            sleep(slot - now)
    elif now >= deadline:
        break
    k += 1
    before = clock()
    execute(sql, (k, payloads[k & 63]))
    record(stamp())
    publish("<q", counter, 0, k)
    took = clock() - before
    if took > 0.001:
        slow += 1
        slow_seconds += took
        longest = max(longest, took)
elapsed = clock() - start
publish("<q", counter, 8, 1)  # done: later backlog samples would measure the drain
cpu1 = resource.getrusage(resource.RUSAGE_SELF)
with open(times_path, "wb") as f:
    times.tofile(f)
conn.close()
print(json.dumps({
    "commits": k,
    "seconds": elapsed,
    "cpu": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
    "journal_mode": mode,
    "slow": slow,
    "slow_seconds": slow_seconds,
    "longest": longest,
}))
"""

# Renames `count` files into a directory about 1 ms apart, printing time_ns after each.
CALIBRATOR = r"""
import json, os, sys, time
directory, count = sys.argv[1], int(sys.argv[2])
stamps = []
for i in range(1, count + 1):
    tmp = os.path.join(directory, ".cal.tmp")
    with open(tmp, "wb") as f:
        f.write(b"x" * 200)
    os.replace(tmp, os.path.join(directory, "%016x-%016x.ltx" % (i, i)))
    stamps.append(time.time_ns())
    time.sleep(0.001)
print(json.dumps(stamps))
"""


class BenchError(RuntimeError):
    pass


# -- landing detection ---------------------------------------------------------------------

_IN_MOVED_TO = 0x00000080
_IN_Q_OVERFLOW = 0x00004000
_IN_ONLYDIR = 0x01000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


@dataclass(frozen=True, slots=True)
class Landing:
    min_txid: int
    max_txid: int
    t_ns: int  # time.time_ns() when the final name was first seen


class LandingWatcher:
    """Records when each final LTX file name first appears in a directory (see module doc)."""

    def __init__(self, directory: Path, *, poll_interval: float = 0.0002) -> None:
        self.directory = directory
        self.landings: list[Landing] = []
        self.max_txid = 0
        self.overflows = 0
        self.cpu_seconds = 0.0  # the watcher thread's own CPU time
        self.method = "scandir polling"
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._poll_interval = poll_interval
        self._fd = _inotify_watch(directory)
        if self._fd is not None:
            self.method = "inotify IN_MOVED_TO"
        self._thread = threading.Thread(target=self._run, name="landing-watcher", daemon=True)
        self._scan(time.time_ns())  # files already there (none, normally)
        self._thread.start()

    def __enter__(self) -> LandingWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _add(self, name: str, t_ns: int) -> None:
        if name in self._seen or name.startswith("."):
            return
        try:
            mn, mx = parse_filename(name)
        except LTXError:
            return
        self._seen.add(name)
        self.landings.append(Landing(mn, mx, t_ns))
        if mx > self.max_txid:
            self.max_txid = mx

    def _scan(self, t_ns: int) -> None:
        with contextlib.suppress(FileNotFoundError), os.scandir(self.directory) as it:
            for entry in it:
                if entry.name not in self._seen:
                    self._add(entry.name, t_ns)

    def _run(self) -> None:
        cpu0 = time.thread_time()
        try:
            if self._fd is not None:
                self._run_inotify(self._fd)
            else:
                while not self._stop.is_set():
                    self._scan(time.time_ns())
                    time.sleep(self._poll_interval)
        finally:
            self.cpu_seconds = time.thread_time() - cpu0

    def _run_inotify(self, fd: int) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            try:
                buf = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            t_ns = time.time_ns()
            offset = 0
            while offset + _EVENT.size <= len(buf):
                _wd, mask, _cookie, length = _EVENT.unpack_from(buf, offset)
                start = offset + _EVENT.size
                offset = start + length
                if mask & _IN_Q_OVERFLOW:
                    self.overflows += 1
                    self._scan(t_ns)
                elif mask & _IN_MOVED_TO:
                    name = buf[start:offset].rstrip(b"\x00").decode("utf-8", "replace")
                    self._add(name, t_ns)

    def wait_for(self, txid: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
        """Wait (bounded, and while alive()) until a file holding txid has landed."""
        deadline = time.monotonic() + timeout
        while self.max_txid < txid:
            if time.monotonic() >= deadline or not alive():
                return False
            time.sleep(0.001)
        return True


def _inotify_watch(directory: Path) -> int | None:
    """A non-blocking inotify descriptor watching renames into directory; None if unavailable."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols include libc's
        fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    wd = int(libc.inotify_add_watch(fd, os.fsencode(directory), _IN_MOVED_TO | _IN_ONLYDIR))
    if wd < 0:
        os.close(fd)
        return None
    return fd


# -- the daemon ----------------------------------------------------------------------------


class Daemon:
    """ltx-sidecar as a subprocess, its log in a file; stopped (TERM, then KILL) on exit."""

    def __init__(self, run_dir: Path, db: Path, extra_config: str = "") -> None:
        self.data_dir = run_dir / "data"
        self.ltx_dir = self.data_dir / "dbs" / db.name / "ltx"
        self.state_path = self.data_dir / "dbs" / db.name / "state.json"
        self.config = run_dir / "sidecar.toml"
        self.config.write_text(
            f"data-dir = {json.dumps(str(self.data_dir))}\n"
            'node-id = "bench"\n'
            "[databases]\n"
            f"paths = [{json.dumps(str(db))}]\n" + extra_config
        )
        self.log_path = run_dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return float("nan")
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(STOP_TIMEOUT)

    def state(self) -> dict[str, object]:
        try:
            state: dict[str, object] = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return state

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no daemon log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty daemon log)"

    def fail(self, message: str) -> BenchError:
        return BenchError(f"{message}; daemon log tail: {self.log_tail()}")


@contextlib.contextmanager
def running_daemon(run_dir: Path, db: Path, extra_config: str = "") -> Iterator[Daemon]:
    daemon = Daemon(run_dir, db, extra_config)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


# -- the writer ----------------------------------------------------------------------------


@dataclass(slots=True)
class WriterRun:
    commits: int
    seconds: float
    cpu_seconds: float
    times_ns: array.array[int]
    slow_commits: int  # commits that took over 1 ms (waiting for a lock, or a checkpoint)
    slow_seconds: float  # the time they took
    longest_commit: float
    backlog: list[tuple[float, int]] = field(default_factory=list)  # (seconds in, TXIDs behind)

    @property
    def rate(self) -> float:
        return self.commits / self.seconds if self.seconds > 0 else 0.0


def make_database(path: Path) -> None:
    """A fresh WAL-mode database with the writer's table; the WAL is gone once closed."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(SCHEMA)
    finally:
        conn.close()


def run_writer(
    run_dir: Path,
    db: Path,
    seconds: float,
    rate: float = 0.0,
    watcher: LandingWatcher | None = None,
    snapshot_txid: int = 0,
    *,
    autocheckpoint: bool = True,
) -> WriterRun:
    """Run the writer process; with a watcher, sample the backlog while it runs.

    ``autocheckpoint=False``: the app leaves checkpoints to the sidecar
    (``PRAGMA wal_autocheckpoint=0``)."""
    script = run_dir / "writer.py"
    script.write_text(WRITER)
    counter_path = run_dir / "counter"
    counter_path.write_bytes(bytes(16))
    times_path = run_dir / "times.bin"
    backlog: list[tuple[float, int]] = []
    with counter_path.open("r+b") as f:
        counter = mmap.mmap(f.fileno(), 16)
    argv = [sys.executable, script, db, seconds, rate, counter_path, times_path]
    argv.append(1 if autocheckpoint else 0)
    proc = subprocess.Popen(
        [str(arg) for arg in argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + seconds + WRITER_GRACE
        started: float | None = None
        tick = time.monotonic()
        while proc.poll() is None:
            if time.monotonic() >= deadline:
                raise BenchError(f"the writer did not finish within {seconds + WRITER_GRACE} s")
            tick += SAMPLE_INTERVAL
            time.sleep(max(0.0, tick - time.monotonic()))
            count, done = struct.unpack_from("<qq", counter, 0)
            if watcher is not None and count > 0 and not done:
                now = time.monotonic()
                if started is None:
                    started = now
                backlog.append((now - started, snapshot_txid + count - watcher.max_txid))
        out, err = proc.communicate(timeout=WRITER_GRACE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
        counter.close()
    if proc.returncode != 0:
        tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-5:])
        raise BenchError(f"the writer failed with status {proc.returncode}: {tail}")
    info = json.loads(out.decode().strip().splitlines()[-1])
    if info["journal_mode"] != "wal":
        raise BenchError(f"the writer got journal_mode {info['journal_mode']!r}, not wal")
    times: array.array[int] = array.array("q")
    times.frombytes(times_path.read_bytes())
    if len(times) != info["commits"] or not times:
        raise BenchError(f"the writer recorded {len(times)} times for {info['commits']} commits")
    return WriterRun(
        commits=int(info["commits"]),
        seconds=float(info["seconds"]),
        cpu_seconds=float(info["cpu"]),
        times_ns=times,
        slow_commits=int(info["slow"]),
        slow_seconds=float(info["slow_seconds"]),
        longest_commit=float(info["longest"]),
        backlog=backlog,
    )


# -- one run with the daemon ---------------------------------------------------------------


@dataclass(slots=True)
class DaemonRun:
    writer: WriterRun
    snapshot_txid: int
    latencies_ms: list[float]  # per commit, sorted; inf when its file never landed
    drain_ms: float  # landing of the last TXID - last commit; inf if it never landed
    daemon_cpu: float  # seconds from the writer's start to the end of the drain
    files: int  # LTX files written for the commits (the snapshot excluded)
    watcher_cpu: float
    watcher_overflows: int
    detector: str
    state: dict[str, object]

    @property
    def cpu_per_commit_us(self) -> float:
        return self.daemon_cpu / self.writer.commits * 1e6

    @property
    def cpu_share(self) -> float:
        return self.daemon_cpu / self.writer.seconds


def run_with_daemon(
    run_dir: Path, seconds: float, rate: float = 0.0, *, tuned: bool = False
) -> DaemonRun:
    """One writer run beside the daemon. ``tuned``: the write-heavy setup the README
    recommends, the app leaving checkpoints to the sidecar and the sidecar checkpointing
    every TUNED_PASSIVE_FRAMES frames."""
    run_dir.mkdir()
    db = run_dir / DB_NAME
    make_database(db)
    extra = f"[checkpoint]\npassive-frames = {TUNED_PASSIVE_FRAMES}\n" if tuned else ""
    with running_daemon(run_dir, db, extra) as daemon:
        daemon.ltx_dir.mkdir(parents=True)  # so the watcher sees the snapshot land
        with LandingWatcher(daemon.ltx_dir) as watcher:
            deadline = time.monotonic() + DAEMON_START_TIMEOUT
            while not watcher.landings:
                if not daemon.alive():
                    raise daemon.fail("the daemon exited before writing its first snapshot")
                if time.monotonic() >= deadline:
                    raise daemon.fail(f"no snapshot LTX within {DAEMON_START_TIMEOUT} s")
                time.sleep(0.005)
            snapshot = watcher.landings[0]
            cpu0 = daemon.cpu_seconds()
            writer = run_writer(
                run_dir, db, seconds, rate, watcher, snapshot.max_txid, autocheckpoint=not tuned
            )
            final = snapshot.max_txid + writer.commits
            drained = watcher.wait_for(final, DRAIN_TIMEOUT, daemon.alive)
            cpu1 = daemon.cpu_seconds()
            if not daemon.alive():
                raise daemon.fail("the daemon exited during the run")
        exit_status = daemon.stop()
        landings = list(watcher.landings)
    state = daemon.state()
    if exit_status != 0:
        raise daemon.fail(f"the daemon stopped with status {exit_status}")
    _verify_txids(daemon, snapshot.max_txid, writer.commits, state, drained)
    latencies = _latencies(landings, snapshot.max_txid, writer.times_ns)
    last = next(x for x in landings if x.min_txid <= final <= x.max_txid)  # verified above
    drain_ms = (last.t_ns - writer.times_ns[-1]) / 1e6
    return DaemonRun(
        writer=writer,
        snapshot_txid=snapshot.max_txid,
        latencies_ms=latencies,
        drain_ms=drain_ms,
        daemon_cpu=cpu1 - cpu0,
        files=sum(1 for x in landings if x.max_txid > snapshot.max_txid),
        watcher_cpu=watcher.cpu_seconds,
        watcher_overflows=watcher.overflows,
        detector=watcher.method,
        state=state,
    )


def _verify_txids(
    daemon: Daemon, snapshot_txid: int, commits: int, state: dict[str, object], drained: bool
) -> None:
    """Check that commit k is TXID snapshot + k: the last file's header ends at snapshot + commits."""
    names = sorted(
        (parse_filename(p.name), p)
        for p in daemon.ltx_dir.iterdir()
        if p.name.endswith(".ltx") and not p.name.startswith(".")
    )
    if not names:
        raise daemon.fail("the LTX directory is empty after the run")
    _, path = names[-1]
    with path.open("rb") as f:
        header = Header.from_bytes(f.read(HEADER_SIZE), path=str(path))
    want = snapshot_txid + commits
    if header.max_txid != want or not drained:
        raise daemon.fail(
            f"the log ends at TXID {header.max_txid} ({path.name}), expected snapshot "
            f"{snapshot_txid} + {commits} commits = {want}"
            + ("" if drained else f" (not reached within {DRAIN_TIMEOUT} s)")
            + f"; rescans {state.get('rescans')}, snapshots {state.get('snapshots')}"
        )


def _latencies(
    landings: Sequence[Landing], snapshot_txid: int, times_ns: Sequence[int]
) -> list[float]:
    """Sorted commit-to-landing latencies in ms (inf for a commit whose file never landed)."""
    files = sorted((x.max_txid, x.min_txid, x.t_ns) for x in landings)
    maxs = [f[0] for f in files]
    out: list[float] = []
    for k, t_commit in enumerate(times_ns, start=1):
        txid = snapshot_txid + k
        i = bisect_left(maxs, txid)
        if i < len(files) and files[i][1] <= txid:
            out.append((files[i][2] - t_commit) / 1e6)
        else:
            out.append(float("inf"))
    out.sort()
    return out


# -- statistics ----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted values (p in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


@dataclass(frozen=True, slots=True)
class Backlog:
    max: int
    first_mean: float
    last_mean: float
    samples: int

    def growth_ms(self, rate: float) -> float:
        """Last-third mean minus first-third mean, as milliseconds of the writer's commits."""
        return (self.last_mean - self.first_mean) / rate * 1000 if rate > 0 else float("nan")


def backlog_summary(samples: Sequence[tuple[float, int]]) -> Backlog:
    values = [b for _, b in samples]
    if len(values) < 3:
        m = float(max(values, default=0))
        return Backlog(int(m), m, m, len(values))
    third = len(values) // 3
    return Backlog(
        max(values),
        statistics.fmean(values[:third]),
        statistics.fmean(values[-third:]),
        len(values),
    )


def calibrate(tmp_dir: Path) -> list[float]:
    """The watcher's own delay in ms, sorted: rename time (in another process) to detection."""
    directory = tmp_dir / "calibration"
    directory.mkdir()
    script = tmp_dir / "calibrate.py"
    script.write_text(CALIBRATOR)
    with LandingWatcher(directory) as watcher:
        out = subprocess.run(
            [sys.executable, str(script), str(directory), str(CALIBRATION_FILES)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout
        stamps: list[int] = json.loads(out)
        watcher.wait_for(len(stamps), 5.0)
    landed = {x.max_txid: x.t_ns for x in watcher.landings}
    delays = [(landed[i] - t) / 1e6 for i, t in enumerate(stamps, 1) if i in landed]
    if len(delays) != len(stamps):
        raise BenchError(f"calibration: {len(stamps) - len(delays)} renames were not seen")
    return sorted(delays)


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding path (from /proc/mounts)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    best, kind = "", "unknown"
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        inside = len(parts) >= 3 and (
            target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")
        )
        if inside and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def _ms(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


# -- the benchmark -------------------------------------------------------------------------


@benchmark(
    "tailer_overhead",
    description="Writer throughput with and without the ltx-sidecar daemon, commit-to-LTX "
    "latency at 1,000 commits/s, and backlog at the writer's maximum rate",
)
def run(ctx: Context) -> list[Result]:
    seconds = RUN_SECONDS[ctx.mode]
    pairs = PAIRS[ctx.mode]
    fs = _fs_type(ctx.tmp_dir)

    delays = calibrate(ctx.tmp_dir)

    without: list[WriterRun] = []
    with_: list[DaemonRun] = []
    tuned: list[DaemonRun] = []
    for i in range(pairs):
        plain_dir = ctx.tmp_dir / f"without-{i}"
        plain_dir.mkdir()
        make_database(plain_dir / DB_NAME)
        without.append(run_writer(plain_dir, plain_dir / DB_NAME, seconds))
        with_.append(run_with_daemon(ctx.tmp_dir / f"with-{i}", seconds))
        tuned.append(run_with_daemon(ctx.tmp_dir / f"tuned-{i}", seconds, tuned=True))
    paced = run_with_daemon(ctx.tmp_dir / "paced", LATENCY_SECONDS[ctx.mode], PACED_RATE)

    return _results(ctx, fs, delays, without, with_, tuned, paced)


def _tuned_result(without: list[WriterRun], tuned: list[DaemonRun]) -> Result:
    ratios = [100 * t.writer.rate / p.rate for p, t in zip(without, tuned, strict=True)]
    return Result(
        "writer rate with sidecar, % of without, app leaving checkpoints to the sidecar",
        statistics.median(ratios),
        "%",
        notes=f"median of per-run ratios {', '.join(f'{r:.1f}' for r in ratios)}, each "
        "against the same run without as the target figure; the writer sets "
        f"wal_autocheckpoint=0 and the sidecar checkpoint.passive-frames = "
        f"{TUNED_PASSIVE_FRAMES:,} (the README's setting for write-heavy apps); writer "
        f"blocked: {'; '.join(_blocked(t.writer) for t in tuned)}",
    )


def _blocked(w: WriterRun) -> str:
    """How long the writer spent in commits over 1 ms (lock waits, its own checkpoints)."""
    return (
        f"{w.slow_seconds / w.seconds:.0%} of the run in {w.slow_commits} commits over 1 ms "
        f"(longest {w.longest_commit * 1000:.0f} ms)"
    )


def _results(
    ctx: Context,
    fs: str,
    delays: list[float],
    without: list[WriterRun],
    with_: list[DaemonRun],
    tuned: list[DaemonRun],
    paced: DaemonRun,
) -> list[Result]:
    seconds = RUN_SECONDS[ctx.mode]
    ratios = [100 * w.writer.rate / p.rate for p, w in zip(without, with_, strict=True)]
    rates_without = [p.rate for p in without]
    rates_with = [w.writer.rate for w in with_]
    writer_cpu = statistics.median(1e6 * p.cpu_seconds / p.commits for p in without)
    writer_cpu_with = statistics.median(
        1e6 * w.writer.cpu_seconds / w.writer.commits for w in with_
    )
    results = [
        Result(
            "writer commits/s without sidecar",
            statistics.median(rates_without),
            "commits/s",
            notes=f"median of {len(without)} runs of {seconds:g} s: "
            f"{', '.join(f'{r:,.0f}' for r in rates_without)}; writer CPU {writer_cpu:.0f} "
            f"us/commit; blocked: {'; '.join(_blocked(p) for p in without)}; fresh database "
            f"per run on {fs}; single-row INSERT, synchronous=NORMAL, default "
            "wal_autocheckpoint, busy timeout 5 s",
        ),
        Result(
            "writer commits/s with sidecar",
            statistics.median(rates_with),
            "commits/s",
            notes=f"median of {len(with_)} runs, each after a run without: "
            f"{', '.join(f'{r:,.0f}' for r in rates_with)}; writer CPU {writer_cpu_with:.0f} "
            f"us/commit; blocked: {'; '.join(_blocked(w.writer) for w in with_)}",
        ),
        Result(
            "writer rate with sidecar, % of without",
            statistics.median(ratios),
            "%",
            RATIO_TARGET,
            f"median of per-pair ratios {', '.join(f'{r:.1f}' for r in ratios)}",
        ),
        _tuned_result(without, tuned),
        Result(
            "sidecar CPU per commit at max rate",
            statistics.median(w.cpu_per_commit_us for w in with_),
            "us",
            notes="median; the daemon's utime+stime from the writer's start to the drain: "
            f"{', '.join(f'{w.cpu_per_commit_us:.0f}' for w in with_)} us/commit, "
            f"{', '.join(f'{w.cpu_share:.2f}' for w in with_)} cores; "
            f"{', '.join(f'{w.writer.commits / max(w.files, 1):,.0f}' for w in with_)} "
            "commits per LTX file",
        ),
    ]

    lat = paced.latencies_ms
    missing = sum(1 for v in lat if v == float("inf"))
    results += [
        Result(
            f"commit-to-LTX latency p50 at {PACED_RATE:,.0f} commits/s",
            percentile(lat, 50),
            "ms",
            P50_TARGET,
            f"{paced.writer.commits:,} commits in {paced.writer.seconds:.1f} s "
            f"({paced.writer.rate:,.0f}/s) -> {paced.files:,} LTX files; commit k = TXID "
            f"snapshot + k, checked against the last file's header; landing seen by "
            f"{paced.detector}" + (f"; {missing} commits never landed" if missing else ""),
        ),
        Result(
            f"commit-to-LTX latency p99 at {PACED_RATE:,.0f} commits/s",
            percentile(lat, 99),
            "ms",
            P99_TARGET,
            f"p90 {percentile(lat, 90):.2f} ms, p99.9 {percentile(lat, 99.9):.2f} ms",
        ),
        Result(
            f"commit-to-LTX latency max at {PACED_RATE:,.0f} commits/s",
            lat[-1],
            "ms",
            notes=f"sidecar CPU {paced.cpu_per_commit_us:.0f} us/commit "
            f"({paced.cpu_share:.2f} cores); writer blocked: {_blocked(paced.writer)}",
        ),
    ]

    backlogs = [backlog_summary(w.writer.backlog) for w in with_]
    growth = [b.growth_ms(w.writer.rate) for b, w in zip(backlogs, with_, strict=True)]
    drains = [w.drain_ms for w in with_]
    at_max = [(percentile(w.latencies_ms, 50), percentile(w.latencies_ms, 99)) for w in with_]
    results += [
        Result(
            "drain time after a max-rate run (worst)",
            max(drains),
            "ms",
            DRAIN_TARGET,
            f"last commit returned -> its LTX file landed; runs {_ms(drains)} ms",
        ),
        Result(
            "backlog at max rate (max)",
            max(b.max for b in backlogs),
            "TXIDs",
            notes=f"writer's TXID minus the log's, every {SAMPLE_INTERVAL * 1000:.0f} ms; "
            "per run "
            + ", ".join(
                f"{b.max:,} ({b.max / w.writer.rate * 1000:.0f} ms of commits)"
                for b, w in zip(backlogs, with_, strict=True)
            ),
        ),
        Result(
            "backlog growth at max rate (median)",
            statistics.median(growth),
            "ms",
            GROWTH_TARGET,
            "mean backlog of the last third of a run minus the first third, in ms of the "
            "writer's commits (positive and large: grows without bound); per run "
            + ", ".join(
                f"{g:.0f} ms ({b.first_mean:,.0f} -> {b.last_mean:,.0f} TXIDs)"
                for g, b in zip(growth, backlogs, strict=True)
            ),
        ),
        Result(
            "commit-to-LTX latency p50 at max rate",
            statistics.median(p50 for p50, _ in at_max),
            "ms",
            notes="median of the with-sidecar runs; per run p50/p99 "
            + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in at_max)
            + " ms",
        ),
        Result(
            "landing detection delay p50 (calibration)",
            percentile(delays, 50),
            "ms",
            notes=f"{len(delays)} renames by another process ~1 ms apart: p99 "
            f"{percentile(delays, 99):.3f} ms, max {delays[-1]:.3f} ms, the error of the "
            "latency figures; the watcher thread used "
            + ", ".join(f"{w.watcher_cpu / w.writer.seconds:.1%}" for w in with_)
            + " of a core in the max-rate runs"
            + (
                f"; inotify queue overflows {sum(w.watcher_overflows for w in with_)}"
                if any(w.watcher_overflows for w in with_)
                else ""
            ),
        ),
    ]
    return results
