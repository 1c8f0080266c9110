"""A SQLite app for the tailer tests: run as its own process, with the stdlib sqlite3 module.

Usage::

    python writer.py random DB --seed N --ops N [--id K] [--plain] [--pause SECONDS]
                               [--no-autocheckpoint]
    python writer.py serve DB [--id K]

``random`` commits ``--ops`` random transactions (sleeping ``--pause`` after each) and
exits 0. ``serve`` reads one command
per stdin line and answers one line on stdout once it is committed, so a test can move in
lock step with it:

* ``random SEED N [plain]``: N random transactions (as ``random``), answers ``ok``;
* ``sql STATEMENTS``: run the statements (``executescript``, which commits a pending
  transaction first), answers ``ok``;
* ``exec STATEMENT``: run one statement as is (e.g. a COMMIT), answers ``ok``;
* ``quit``: answers ``bye`` and exits.

Errors answer ``err <message>`` (serve) or exit 1 (random).

The random workload is what an application does to a database: inserts, updates and
deletes of rows of every size (blobs spanning many overflow pages), CREATE/DROP TABLE and
INDEX, VACUUM, growth and shrinking (``incremental_vacuum`` when the database has
auto_vacuum), rolled-back transactions that spill uncommitted frames into the WAL (the
page cache is tiny), and its own ``wal_checkpoint(PASSIVE)`` and ``(TRUNCATE)`` calls. Each
writer keeps to its own tables (``w<id>_...``) except the shared ``shared`` table, which every
writer updates. ``--plain`` leaves out VACUUM, checkpoints and schema changes;
``--no-autocheckpoint`` sets ``wal_autocheckpoint=0`` (an app that leaves checkpoints to
the sidecar).
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import time
from pathlib import Path

BUSY_TIMEOUT_S = 30.0  # writers wait for the tailer's seal and for each other


class Workload:
    def __init__(
        self, path: Path, writer_id: int, *, plain: bool = False, autocheckpoint: bool = True
    ) -> None:
        self.path = path
        self.id = writer_id
        self.plain = plain
        self.db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self.db.execute("PRAGMA cache_size=8")  # spill big transactions into the WAL early
        if not autocheckpoint:
            self.db.execute("PRAGMA wal_autocheckpoint=0")
        self.rng = random.Random(0)
        self._retry(
            self.db.execute,
            "CREATE TABLE IF NOT EXISTS shared(id INTEGER PRIMARY KEY, n INTEGER, v BLOB)",
        )

    # -- helpers ---------------------------------------------------------------------------

    def _tables(self) -> list[str]:
        return self._names("table")

    def _indexes(self) -> list[str]:
        return self._names("index")

    def _names(self, kind: str) -> list[str]:
        rows = self.db.execute(
            "SELECT name FROM sqlite_schema WHERE type = ? AND name GLOB ? ORDER BY name",
            (kind, f"w{self.id}_*"),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def _table(self) -> str:
        tables = self._tables()
        if not tables:
            name = f"w{self.id}_t{self.rng.randrange(1_000_000)}"
            self.db.execute(f"CREATE TABLE {name}(id INTEGER PRIMARY KEY, k INTEGER, v BLOB)")
            return name
        return self.rng.choice(tables)

    def _blob(self, big: bool = False) -> bytes:
        rng = self.rng
        if big:
            size = rng.randrange(20_000, 200_000)
        else:
            size = rng.choice([0, 8, 50, 300, 1000, 3000, 5000])
        return rng.randbytes(size)

    def _retry(self, fn: object, *args: object) -> None:
        """Run fn in its own transaction, retrying when another process holds a lock."""
        assert callable(fn)
        for attempt in range(200):
            try:
                fn(*args)
                return
            except sqlite3.OperationalError as exc:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                message = str(exc)
                if "locked" not in message and "busy" not in message:
                    raise
                time.sleep(0.005 * (attempt % 10 + 1))
        raise RuntimeError("writer: gave up after 200 busy retries")

    def _txn(self, *ops: object) -> None:
        def run() -> None:
            self.db.execute("BEGIN IMMEDIATE")
            for op in ops:
                assert callable(op)
                op()
            self.db.execute("COMMIT")

        self._retry(run)

    # -- operations (each runs inside a transaction unless it says otherwise) --------------

    def op_insert(self, n: int = 0, big: bool = False) -> None:
        table = self._table()
        rows = n or self.rng.randrange(1, 20)
        self.db.executemany(
            f"INSERT INTO {table}(k, v) VALUES(?, ?)",
            [(self.rng.randrange(1000), self._blob(big)) for _ in range(rows)],
        )

    def op_update(self) -> None:
        table = self._table()
        k = self.rng.randrange(1000)
        self.db.execute(
            f"UPDATE {table} SET v = ?, k = k + 1 WHERE k BETWEEN ? AND ?",
            (self._blob(), k, k + 30),
        )
        sid = self.rng.randrange(50)
        self.db.execute(
            "INSERT INTO shared(id, n, v) VALUES(?, 1, ?) "
            "ON CONFLICT(id) DO UPDATE SET n = n + 1, v = excluded.v",
            (sid, self._blob()),
        )

    def op_delete(self) -> None:
        table = self._table()
        k = self.rng.randrange(1000)
        self.db.execute(f"DELETE FROM {table} WHERE k BETWEEN ? AND ?", (k, k + 100))

    def op_shrink(self) -> None:
        table = self._table()
        self.db.execute(f"DELETE FROM {table} WHERE id % 3 != 0")
        self.db.execute("PRAGMA incremental_vacuum(50)")

    def op_create_table(self) -> None:
        name = f"w{self.id}_t{self.rng.randrange(1_000_000)}"
        self.db.execute(f"CREATE TABLE IF NOT EXISTS {name}(id INTEGER PRIMARY KEY, k, v)")
        self.db.execute(
            f"INSERT INTO {name}(k, v) VALUES(?, ?)", (self.rng.randrange(1000), self._blob())
        )

    def op_drop_table(self) -> None:
        tables = self._tables()
        if len(tables) > 1:
            self.db.execute(f"DROP TABLE {self.rng.choice(tables)}")

    def op_create_index(self) -> None:
        table = self._table()
        self.db.execute(f"CREATE INDEX IF NOT EXISTS {table}_k ON {table}(k)")

    def op_drop_index(self) -> None:
        indexes = self._indexes()
        if indexes:
            self.db.execute(f"DROP INDEX {self.rng.choice(indexes)}")

    def rollback_spill(self) -> None:
        """A big transaction that spills frames into the WAL, then rolls back."""

        def run() -> None:
            self.db.execute("BEGIN IMMEDIATE")
            self.op_insert(n=30, big=True)
            self.db.execute("ROLLBACK")

        self._retry(run)

    def vacuum(self) -> None:
        self._retry(self.db.execute, "VACUUM")

    def checkpoint(self, mode: str) -> None:
        # TRUNCATE waits for readers (the tailer's pin is one) while holding the write
        # lock: keep that wait short, as a polite app would.
        self.db.execute("PRAGMA busy_timeout=20")
        try:
            self.db.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        finally:
            self.db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")

    def step(self) -> None:
        rng = self.rng
        roll = rng.random()
        if self.plain:
            op = rng.choice([self.op_insert, self.op_insert, self.op_update, self.op_delete])
            self._txn(op)
            return
        if roll < 0.25:
            self._txn(self.op_insert)
        elif roll < 0.37:
            self._txn(self.op_update)
        elif roll < 0.45:
            self._txn(self.op_delete)
        elif roll < 0.50:
            self._txn(lambda: self.op_insert(n=rng.randrange(1, 4), big=True))
        elif roll < 0.55:
            self._txn(self.op_create_table)
        elif roll < 0.58:
            self._txn(self.op_drop_table)
        elif roll < 0.62:
            self._txn(self.op_create_index)
        elif roll < 0.64:
            self._txn(self.op_drop_index)
        elif roll < 0.74:  # several operations in one transaction
            ops = [self.op_insert, self.op_update, self.op_delete, self.op_create_index]
            self._txn(*(rng.choice(ops) for _ in range(rng.randrange(2, 6))))
        elif roll < 0.80:  # growth
            self._txn(lambda: self.op_insert(n=rng.randrange(50, 200)))
        elif roll < 0.84:  # shrink
            self._txn(self.op_shrink)
        elif roll < 0.87:
            self.rollback_spill()
        elif roll < 0.89:
            self.vacuum()
        elif roll < 0.95:
            self.checkpoint("PASSIVE")
        else:
            self.checkpoint("TRUNCATE")

    def run(self, seed: int, ops: int, plain: bool | None = None, pause: float = 0.0) -> None:
        self.rng = random.Random(seed)
        saved = self.plain
        if plain is not None:
            self.plain = plain
        try:
            for _ in range(ops):
                self.step()
                if pause:
                    time.sleep(pause)
        finally:
            self.plain = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["random", "serve"])
    parser.add_argument("db", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", type=int, default=100)
    parser.add_argument("--id", type=int, default=0)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--no-autocheckpoint", action="store_true")
    args = parser.parse_args(argv)
    work = Workload(args.db, args.id, plain=args.plain, autocheckpoint=not args.no_autocheckpoint)
    if args.mode == "random":
        work.run(args.seed, args.ops, pause=args.pause)
        return 0
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        try:
            if command == "random":
                seed, count, *flags = rest.split()
                work.run(int(seed), int(count), plain=True if "plain" in flags else None)
            elif command == "sql":
                work.db.executescript(rest)
            elif command == "exec":
                work.db.execute(rest)
            elif command == "quit":
                print("bye", flush=True)
                return 0
            else:
                raise ValueError(f"unknown command {command!r}")
        except Exception as exc:
            print(f"err {type(exc).__name__}: {exc}", flush=True)
            continue
        print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
