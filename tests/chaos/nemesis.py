"""Fault injectors (nemeses) and the cluster they act on.

A ChaosCluster is a primary and replicas as processes on 127.0.0.1 (tests/e2e/cluster.py,
static lease), with app writers on the primary and client sessions reading the replicas
(tests/chaos/workload.py). Each replica reaches the primary through two proxies::

    replica --> FaultProxy (drop, delay, cut, half-open) --> CorruptingProxy --> primary

A nemesis is anything with a ``kind``, ``unavailable(cluster)`` (None, or why this
machine cannot run it) and ``inject(cluster, rng)``, which breaks something and returns
a Fault whose ``heal()`` undoes what can be undone. To add one (say, for the Redis
lease: Redis restarted empty, a proxy between a node and Redis), write a small class
with those three members and add an instance to NEMESES.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import resource
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tests.chaos.wire import CorruptingProxy
from tests.chaos.workload import SCHEMA, Workload
from tests.e2e.cluster import TestNode, open_writer
from tests.faultproxy import Direction, FaultProxy

FAST_FAILURE_DETECTION = {
    "LTX_SIDECAR_REPLICATION_HEARTBEAT_INTERVAL": "250ms",
    "LTX_SIDECAR_REPLICATION_STREAM_TIMEOUT": "2s",
    "LTX_SIDECAR_RETENTION_MAX_AGE": "30s",
}
STREAM_SILENCE = 3.0  # seconds: past the stream timeout, so a silent stream is noticed
TMPFS_SIZE = "256m"
DISK_RESERVE = 64 << 10  # bytes left free on a "full" disk (SQLite's journal needs more)
DISK_FULL_ERRORS = r"No space left on device|File too large|database or disk is full"
CLOCK_JUMPS = (120, 3600, 86400)  # seconds; forward only, see ClockJump


def find_libfaketime() -> Path | None:
    """libfaketime's preload library (Debian package faketime), or None."""
    for pattern in ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1"):
        for path in sorted(Path("/").glob(pattern.lstrip("/"))):
            return path
    return None


def can_mount_tmpfs(scratch: Path) -> bool:
    """True when this process may mount a tmpfs (root in a machine that allows it)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = scratch / "tmpfs-probe"
    probe.mkdir(parents=True, exist_ok=True)
    ok = _mount_tmpfs(probe, "1m")
    if ok:
        _umount(probe)
    probe.rmdir()
    return ok


def _mount_tmpfs(path: Path, size: str) -> bool:
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@dataclass
class Link:
    """The two proxies between one replica and the primary."""

    faults: FaultProxy
    corrupter: CorruptingProxy

    def stop(self) -> None:
        self.faults.stop()
        self.corrupter.stop()


@dataclass
class ChaosCluster:
    """A primary, replicas behind proxies, and the workload; start() then stop()."""

    root: Path
    replica_count: int = 2
    seed: int = 0
    writers: int = 2
    full_disk_on_tmpfs: bool = True  # the first replica's files on a small tmpfs, if allowed
    clock_on_primary: bool = True  # the primary runs under libfaketime, if installed
    primary: TestNode = field(init=False)
    replicas: list[TestNode] = field(init=False, default_factory=list)
    links: dict[str, Link] = field(init=False, default_factory=dict)
    workload: Workload = field(init=False)
    mounts: list[Path] = field(init=False, default_factory=list)
    clock_file: Path | None = field(init=False, default=None)
    clock_offset: int = field(init=False, default=0)  # seconds the primary's clock is ahead

    @property
    def nodes(self) -> list[TestNode]:
        return [self.primary, *self.replicas]

    def start(self) -> None:
        self.primary = TestNode("primary", self.root / "primary", env=dict(FAST_FAILURE_DETECTION))
        self._clock(self.primary)
        self.primary.write_config()
        conn = open_writer(self.primary.db())
        conn.executescript(SCHEMA)
        conn.close()
        self.primary.start()
        tmpfs = self.full_disk_on_tmpfs and can_mount_tmpfs(self.root)
        for i in range(self.replica_count):
            name = f"replica{i + 1}"
            corrupter = CorruptingProxy(self.primary.api_port, seed=self.seed + i).start()
            faults = FaultProxy(corrupter.port).start()
            self.links[name] = Link(faults, corrupter)
            node = TestNode(
                name, self.root / name, primary_url=faults.url(), env=dict(FAST_FAILURE_DETECTION)
            )
            if tmpfs and i == 0:
                node.root.mkdir(parents=True)
                if _mount_tmpfs(node.root, TMPFS_SIZE):
                    self.mounts.append(node.root)
            node.start()
            self.replicas.append(node)
        self.workload = Workload(
            self.primary.db(),
            {r.name: r.db() for r in self.replicas},
            writers=self.writers,
            seed=self.seed,
        )
        self.workload.start()

    def _clock(self, node: TestNode) -> None:
        lib = find_libfaketime()
        if not self.clock_on_primary or lib is None:
            return
        self.clock_file = self.root / "faketime"
        self.clock_file.write_text("+0\n")
        node.env.update(
            LD_PRELOAD=str(lib),
            FAKETIME_TIMESTAMP_FILE=str(self.clock_file),
            FAKETIME_CACHE_DURATION="1",  # the file is read again at most once a second
        )

    def stop_workload(self) -> None:
        self.workload.stop()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.workload.stop()
        for node in reversed(self.nodes):
            node.stop()
        for link in self.links.values():
            link.stop()
        for mount in self.mounts:
            with contextlib.suppress(OSError):  # keep the log of a node on a tmpfs
                shutil.copy(mount / "sidecar.log", mount.with_name(f"{mount.name}.log"))
            _umount(mount)

    def replica_on_tmpfs(self) -> TestNode | None:
        return next((r for r in self.replicas if r.root in self.mounts), None)


# -- faults --------------------------------------------------------------------------------


@dataclass
class Fault:
    """One injected fault: what, where, and how to undo it."""

    kind: str
    target: str
    heal: Callable[[], None] = lambda: None
    detail: str = ""
    hold: float = 0.5  # seconds to leave it in place: long enough for it to bite
    expected_errors: str = ""  # regex: ERROR log entries this fault legitimately causes


class Nemesis(Protocol):
    kind: str

    def unavailable(self, cluster: ChaosCluster) -> str | None: ...

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> Fault: ...


class KillReplica:
    """kill -9 of a replica; healed by starting it again."""

    kind = "kill-replica"

    def unavailable(self, cluster: ChaosCluster) -> str | None:
        return None

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> Fault:
        node = rng.choice(cluster.replicas)
        node.kill()
        return Fault(self.kind, node.name, node.start)


class RestartPrimary:
    """kill -9 of the primary's sidecar (the app keeps writing); the same node comes back."""

    kind = "kill-primary"

    def unavailable(self, cluster: ChaosCluster) -> str | None:
        return None

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> Fault:
        cluster.primary.kill()
        return Fault(self.kind, cluster.primary.name, cluster.primary.start)


class KillApp:
    """kill -9 of an app writer, nearly always mid-transaction; a new one starts on heal."""

    kind = "kill-app"

    def unavailable(self, cluster: ChaosCluster) -> str | None:
        return None

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> Fault:
        writer = rng.choice(cluster.workload.writers)
        writer.kill()
        return Fault(self.kind, f"writer{writer.ledger.writer_id}", writer.start)


class NetworkFault:
    """A misbehaving network between one replica and the primary (tests/faultproxy.py)."""

    def __init__(self, mode: str) -> None:
        if mode not in ("drop", "delay", "cut", "half-open"):
            raise ValueError(f"unknown network fault {mode!r}")
        self.mode = mode
        self.kind = f"net-{mode}"

    def unavailable(self, cluster: ChaosCluster) -> str | None:
        return None

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> Fault:
        name = rng.choice(sorted(cluster.links))
        proxy = cluster.links[name].faults
        detail = ""
        if self.mode == "drop":
            proxy.drop()
        elif self.mode == "delay":
            seconds = rng.choice((0.05, 0.3, 1.0))
            proxy.delay(seconds)
            detail = f"{seconds}s"
        elif self.mode == "cut":
            proxy.cut()
        else:
            direction: Direction = rng.choice(("up", "down"))
            proxy.half_open(direction)
            detail = f"only {direction}"
        hold = STREAM_SILENCE if self.mode in ("drop", "half-open") else 1.0
        return Fault(self.kind, name, proxy.heal, detail, hold)


class CorruptWire:
    """Bits flipped in what the primary sends one replica; it must refuse them."""

    kind = "corrupt-wire"

    def unavailable(self, cluster: ChaosCluster) -> str | None:
        return None

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> Fault:
        name = rng.choice(sorted(cluster.links))
        corrupter = cluster.links[name].corrupter
        rate = rng.choice((0.05, 0.3, 1.0))
        corrupter.corrupt(rate)
        return Fault(self.kind, name, corrupter.heal, f"rate {rate}", hold=2.0)


def newest_ltx(node: TestNode, db: str = "app.db") -> Path | None:
    files = sorted((node.data_dir / "dbs" / db / "ltx").glob("*.ltx"))
    return files[-1] if files else None


def flip_file_bit(path: Path, rng: random.Random) -> int:
    """Invert one bit of a file in place; returns the byte offset."""
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        offset = rng.randrange(size)
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return offset


class CorruptLtxOnDisk:
    """A replica killed, one bit of its newest LTX file flipped, the replica restarted."""

    kind = "corrupt-ltx-file"

    def unavailable(self, cluster: ChaosCluster) -> str | None:
        return None

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> Fault:
        node = rng.choice(cluster.replicas)
        node.kill()
        path = newest_ltx(node)
        detail = "no LTX file yet"
        if path is not None:
            detail = f"{path.name} byte {flip_file_bit(path, rng)}"
        node.start()
        return Fault(self.kind, node.name, detail=detail)


def fill_disk(root: Path, reserve: int = DISK_RESERVE) -> Path:
    """A ballast file that fills root's filesystem, then gives back `reserve` bytes."""
    ballast = root / "ballast"
    block = b"\0" * (1 << 20)
    with ballast.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        size = f.seek(0, os.SEEK_END)
        f.truncate(max(0, size - reserve))
    return ballast


class FullDisk:
    """A replica's disk fills up; healed by freeing it.

    On a tmpfs (the first replica's files, when this machine lets us mount one) a ballast
    file fills the filesystem for real: writes fail with ENOSPC. Otherwise the replica's
    RLIMIT_FSIZE is lowered to 0 (Python ignores SIGXFSZ, so writes past the limit fail
    with EFBIG): an emulation, in which every file write fails as on a full disk.
    """

    kind = "full-disk"

    def unavailable(self, cluster: ChaosCluster) -> str | None:
        return None

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> Fault:
        node = cluster.replica_on_tmpfs()
        if node is not None:
            ballast = fill_disk(node.root)
            return Fault(
                self.kind,
                node.name,
                lambda: ballast.unlink(missing_ok=True),
                "tmpfs",
                hold=2.0,
                expected_errors=DISK_FULL_ERRORS,
            )
        node = rng.choice(cluster.replicas)
        process = node.process
        assert process is not None
        soft, hard = resource.prlimit(process.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (0, hard))

        def heal() -> None:
            with contextlib.suppress(ProcessLookupError):  # restarted meanwhile: no limit
                resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (soft, hard))

        return Fault(
            self.kind,
            node.name,
            heal,
            "RLIMIT_FSIZE emulation",
            hold=2.0,
            expected_errors=DISK_FULL_ERRORS,
        )


def set_clock(clock_file: Path, offset: str) -> None:
    """libfaketime reads the offset ("+7200") from this file (at most once a second)."""
    tmp = clock_file.with_suffix(".tmp")
    tmp.write_text(f"{offset}\n")
    tmp.replace(clock_file)  # never a half-written file


class ClockJump:
    """The primary's clock steps forward (libfaketime); the step stays (no heal).

    libfaketime 0.9.10 cannot step the wall clock alone: with
    FAKETIME_DONT_FAKE_MONOTONIC=1 every time.sleep() fails with EINVAL (its
    clock_nanosleep wrapper), so the monotonic clock steps too, and only forward jumps
    are realistic (as after a VM pause); steps add up over a soak.
    """

    kind = "clock-jump"

    def unavailable(self, cluster: ChaosCluster) -> str | None:
        if cluster.clock_file is None:
            return "libfaketime is not installed (Debian package faketime)"
        return None

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> Fault:
        clock = cluster.clock_file
        assert clock is not None
        jump = rng.choice(CLOCK_JUMPS)
        cluster.clock_offset += jump
        set_clock(clock, f"+{cluster.clock_offset}")
        return Fault(self.kind, cluster.primary.name, detail=f"+{jump}s")


NEMESES: list[Nemesis] = [
    KillReplica(),
    RestartPrimary(),
    KillApp(),
    NetworkFault("drop"),
    NetworkFault("delay"),
    NetworkFault("cut"),
    NetworkFault("half-open"),
    CorruptWire(),
    CorruptLtxOnDisk(),
    FullDisk(),
    ClockJump(),
]


def by_kind(kind: str) -> Nemesis:
    for nemesis in NEMESES:
        if nemesis.kind == kind:
            return nemesis
    raise KeyError(f"no nemesis {kind!r}; known: {', '.join(n.kind for n in NEMESES)}")
