"""The chaos workload: app writers on the primary and reading client sessions on replicas.

Writers are separate processes (the app, so a nemesis can kill -9 one mid-transaction).
Each transaction ``seq`` of writer ``w`` inserts PARTS rows ``(w, seq, part)`` and the
writer prints ``begin seq`` before it and ``ack seq`` once COMMIT returned; the parent
records both, so afterwards every acknowledged transaction must be on every node in
full, and a transaction that is there at all must be whole.

Readers are client sessions pinned to one replica. Each read notes the replica's
``<db>-pos`` TXID before and after it and the number of rows it saw. The workload only
inserts, so neither may go backwards within a session.

    python -m tests.chaos.workload writer DB --id N --start SEQ [--seed S] [--pause SECONDS]
"""

from __future__ import annotations

import argparse
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlean

TABLE = "chaos"  # the rows the invariants check: they stay
BODIES = "chaos_body"  # their payloads: the oldest are deleted, so the database stops growing
PARTS = 3  # rows per transaction
SCHEMA = "".join(
    f"CREATE TABLE IF NOT EXISTS {name}"
    "(writer INT, seq INT, part INT, body BLOB, PRIMARY KEY(writer, seq, part));"
    for name in (TABLE, BODIES)
)  # (two statements: executescript)
KEEP_BODIES = 300  # transactions per writer whose payloads are kept
READ_INTERVAL = 0.02
REPO = Path(__file__).resolve().parents[2]  # so `python -m tests.chaos.workload` resolves


# -- the writer process --------------------------------------------------------------------


def write_forever(db: Path, writer_id: int, start: int, seed: int, pause: float) -> None:
    """Commit transactions until killed; stdlib sqlite3, as an app would."""
    rng = random.Random(seed)
    conn = sqlite3.connect(str(db), timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA cache_size=8")  # big transactions spill uncommitted frames to the WAL
    conn.executescript(SCHEMA)
    seq = start
    while True:
        print(f"begin {seq}", flush=True)
        conn.execute("BEGIN IMMEDIATE")
        big = rng.random() < 0.05
        for part in range(PARTS):
            size = rng.randint(40_000, 120_000) if big else rng.randint(20, 2000)
            row = (writer_id, seq, part, rng.randbytes(rng.randint(8, 64)))
            conn.execute(f"INSERT INTO {TABLE}(writer, seq, part, body) VALUES (?, ?, ?, ?)", row)
            conn.execute(
                f"INSERT INTO {BODIES}(writer, seq, part, body) VALUES (?, ?, ?, ?)",
                (writer_id, seq, part, rng.randbytes(size)),
            )
            if big:
                time.sleep(0.01)  # widen the window for a kill mid-transaction
        # Without this a soak outgrew the full-disk nemesis's 256 MB tmpfs in about three
        # minutes; the freed pages are reused.
        conn.execute(
            f"DELETE FROM {BODIES} WHERE writer = ? AND seq = ?", (writer_id, seq - KEEP_BODIES)
        )
        conn.execute("COMMIT")
        print(f"ack {seq}", flush=True)
        seq += 1
        time.sleep(pause)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.workload")
    sub = parser.add_subparsers(dest="command", required=True)
    writer = sub.add_parser("writer", help="commit transactions until killed")
    writer.add_argument("db", type=Path)
    writer.add_argument("--id", type=int, required=True)
    writer.add_argument("--start", type=int, default=1)
    writer.add_argument("--seed", type=int, default=0)
    writer.add_argument("--pause", type=float, default=0.005)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    write_forever(args.db, args.id, args.start, args.seed, args.pause)
    return 0


# -- the parent side -----------------------------------------------------------------------


@dataclass
class WriterLedger:
    """What one writer was told: every transaction it began and every one acknowledged."""

    writer_id: int
    begun: int = 0  # highest seq begun
    acked: set[int] = field(default_factory=set)
    killed_in_flight: set[int] = field(default_factory=set)  # begun, killed before the ack


class AppWriter:
    """One writer process; kill() and start() as often as a nemesis likes."""

    def __init__(self, db: Path, writer_id: int, seed: int = 0, pause: float = 0.005) -> None:
        self.db = db
        self.ledger = WriterLedger(writer_id)
        self.seed = seed
        self.pause = pause
        self.process: subprocess.Popen[str] | None = None
        self.errors: list[str] = []
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self.seed += 1
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "tests.chaos.workload", "writer", str(self.db),
                "--id", str(self.ledger.writer_id), "--start", str(self.ledger.begun + 1),
                "--seed", str(self.seed), "--pause", str(self.pause),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._follow, args=(self.process,), daemon=True)
        self._reader.start()

    def _follow(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            word, _, number = line.partition(" ")
            with self._lock:
                if word == "begin":
                    self.ledger.begun = int(number)
                elif word == "ack":
                    self.ledger.acked.add(int(number))

    def _end(self, sig: int) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
        process.wait(30)
        if self._reader is not None:
            self._reader.join(10)
        assert process.stderr is not None
        err = process.stderr.read().strip()
        expected = {0, -signal.SIGKILL, -signal.SIGTERM}
        if process.returncode not in expected or "Traceback" in err:
            self.errors.append(f"writer {self.ledger.writer_id} exited {process.returncode}: {err}")
        with self._lock:
            if self.ledger.begun not in self.ledger.acked:
                self.ledger.killed_in_flight.add(self.ledger.begun)

    def kill(self) -> None:
        """kill -9, most likely mid-transaction (the writer is nearly always in one)."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def acked_count(self) -> int:
        with self._lock:
            return len(self.ledger.acked)


@dataclass(frozen=True, slots=True)
class Read:
    """One read in a client session: the replica's TXID around it, and the rows it saw."""

    session: str
    txid_before: int
    txid_after: int
    rows: int


def read_pos_txid(db: Path) -> int | None:
    """The TXID in a replica's ``<db>-pos`` file, or None when there is none (yet)."""
    try:
        text = Path(f"{db}-pos").read_text()
        return int(text[:16], 16)
    except (OSError, ValueError):
        return None


def count_rows(db: Path) -> int:
    conn = sqlean.connect(f"file:{db}?mode=ro", uri=True, timeout=10, isolation_level=None)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0])
    finally:
        conn.close()


class ReaderSession:
    """A client session that reads one replica's database directly, over and over."""

    def __init__(self, name: str, db: Path) -> None:
        self.name = name
        self.db = db
        self.reads: list[Read] = []
        self.failures = 0  # reads that could not run (no table yet, file busy)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def read_once(self) -> Read | None:
        before = read_pos_txid(self.db)
        if before is None:
            return None
        try:
            rows = count_rows(self.db)
        except sqlean.Error:
            self.failures += 1
            return None
        after = read_pos_txid(self.db)
        if after is None:
            return None
        read = Read(self.name, before, after, rows)
        self.reads.append(read)
        return read

    def _run(self) -> None:
        while not self._stop.wait(READ_INTERVAL):
            self.read_once()


class Workload:
    """Writers on the primary's database and one reader session per replica database."""

    def __init__(
        self, primary_db: Path, replica_dbs: dict[str, Path], writers: int = 2, seed: int = 0
    ) -> None:
        self.writers = [AppWriter(primary_db, i + 1, seed=seed * 1000 + i) for i in range(writers)]
        self.sessions = [ReaderSession(name, db) for name, db in replica_dbs.items()]

    def start(self) -> None:
        for w in self.writers:
            w.start()
        for s in self.sessions:
            s.start()

    def pause_writers(self) -> None:
        """Stop the writers (SIGTERM) so the cluster can settle; their ledgers stay."""
        for w in self.writers:
            w.stop()

    def resume_writers(self) -> None:
        for w in self.writers:
            if not w.running:
                w.start()

    def stop(self) -> None:
        self.pause_writers()
        for s in self.sessions:
            s.stop()

    def acked(self) -> int:
        return sum(w.acked_count() for w in self.writers)

    @property
    def ledgers(self) -> list[WriterLedger]:
        return [w.ledger for w in self.writers]

    @property
    def reads(self) -> list[Read]:
        return [r for s in self.sessions for r in s.reads]

    @property
    def errors(self) -> list[str]:
        return [e for w in self.writers for e in w.errors]


if __name__ == "__main__":
    sys.exit(main())
