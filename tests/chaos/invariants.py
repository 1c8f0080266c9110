"""What must hold at the end of every chaos run, whatever the nemeses did.

The checks on recorded facts are pure (values in, a list of problems out, empty when all
is well); ``check_cluster`` gathers the facts from the nodes and runs them all:

* all nodes converge to one position (TXID and checksum) and equal page bytes;
* ``PRAGMA integrity_check`` is ok on every node;
* every acknowledged transaction is on every node, and every transaction that is
  there at all is whole (a writer killed mid-transaction leaves all of it or none);
* no read in a client session went backwards (rows seen, or the replica's TXID);
* no sidecar logged a traceback or an ERROR line, and no writer died unexpectedly.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import sqlean

from tests.chaos.workload import PARTS, TABLE, Read, WriterLedger
from tests.e2e.cluster import TestNode, database_checksum, integrity, same_pages, wait_until

DB = "app.db"
TIMESTAMP = r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d[\d.,]*Z?"  # "2026-11-22 06:02:04,415" or ISO
ENTRY_START = re.compile(f"^{TIMESTAMP} ")
BAD_LEVEL = re.compile(f"^{TIMESTAMP} (ERROR|CRITICAL) ")
# Reported to the lead, not fixed yet: remove each pattern once its fix lands.
KNOWN_ISSUES: list[re.Pattern[str]] = []  # log patterns of reported, unfixed bugs


@dataclass
class Verdict:
    """The outcome of one check_cluster call."""

    checked: Counter[str] = field(default_factory=Counter)  # invariant -> times checked
    problems: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)  # log entries of already reported bugs

    def add(self, invariant: str, problems: Iterable[str]) -> None:
        self.checked[invariant] += 1
        self.problems.extend(f"{invariant}: {p}" for p in problems)

    @property
    def ok(self) -> bool:
        return not self.problems


# -- pure checks ---------------------------------------------------------------------------


def check_writes(ledgers: Iterable[WriterLedger], present: Counter[tuple[int, int]]) -> list[str]:
    """`present` counts rows per (writer, seq) on one node."""
    problems = []
    by_writer = {ledger.writer_id: ledger for ledger in ledgers}
    for ledger in by_writer.values():
        lost = sorted(s for s in ledger.acked if present[(ledger.writer_id, s)] == 0)
        if lost:
            problems.append(f"writer {ledger.writer_id}: acknowledged seqs lost: {lost[:20]}")
    for (writer, seq), rows in sorted(present.items()):
        if rows != PARTS:
            problems.append(f"writer {writer} seq {seq}: {rows} of {PARTS} rows (torn)")
        owner = by_writer.get(writer)
        if owner is not None and seq > owner.begun:
            problems.append(f"writer {writer} seq {seq}: present but never begun")
    return problems


def check_reads(reads: Iterable[Read]) -> list[str]:
    """Within a session, neither the rows seen nor the replica's TXID may go backwards."""
    problems = []
    last: dict[str, Read] = {}
    for read in reads:
        prev = last.get(read.session)
        if prev is not None:
            if read.rows < prev.rows:
                problems.append(f"{read.session}: saw {read.rows} rows after {prev.rows}")
            if read.txid_after < prev.txid_before:
                problems.append(
                    f"{read.session}: TXID {read.txid_after:#x} after {prev.txid_before:#x}"
                )
        last[read.session] = read
    return problems


def log_entries(text: str) -> list[str]:
    """A text log split into entries: a timestamped line and the lines that follow it."""
    entries: list[str] = []
    for line in text.splitlines():
        if ENTRY_START.match(line) or not entries:
            entries.append(line)
        else:
            entries[-1] += "\n" + line
    return entries


def bad_log_entries(text: str, expected: str = "") -> tuple[list[str], list[str]]:
    """(unexpected, known) entries with a traceback or at ERROR/CRITICAL level.

    Known entries are the lead's bugs already reported (KNOWN_ISSUES): counted and
    shown by the soak, not failed on, so the suite keeps catching new ones.
    """
    unexpected, known = [], []
    for entry in log_entries(text):
        if not (BAD_LEVEL.match(entry) or "Traceback" in entry):
            continue
        if expected and "Traceback" not in entry and re.search(expected, entry):
            continue  # an error the fault was meant to cause (a full disk)
        short = " | ".join(entry.splitlines()[:1] + entry.splitlines()[-1:])
        if any(pattern.search(entry) for pattern in KNOWN_ISSUES):
            known.append(short)
        else:
            unexpected.append(short)
    return unexpected, known


# -- gathering the facts -------------------------------------------------------------------


def rows_per_transaction(db: Path) -> Counter[tuple[int, int]]:
    conn = sqlean.connect(f"file:{db}?mode=ro", uri=True, timeout=10, isolation_level=None)
    try:
        rows = conn.execute(f"SELECT writer, seq, count(*) FROM {TABLE} GROUP BY writer, seq")
        return Counter({(int(w), int(s)): int(n) for w, s, n in rows})
    finally:
        conn.close()


def wait_converged(
    primary: TestNode, replicas: list[TestNode], timeout: float = 90, db: str = DB
) -> None:
    """Wait until the primary shipped everything and every replica is at its position."""

    def shipped() -> bool:
        pos = primary.position(db)
        return pos is not None and pos[0] > 0 and pos[1] == database_checksum(primary.db(db))

    wait_until(shipped, timeout, "the primary shipped everything", primary, *replicas)

    def same() -> bool:
        want = primary.position(db)
        return want is not None and all(r.position(db) == want for r in replicas)

    wait_until(same, timeout, "replicas at the primary's position", primary, *replicas)


def check_cluster(
    primary: TestNode,
    replicas: list[TestNode],
    ledgers: list[WriterLedger],
    reads: list[Read],
    writer_errors: list[str],
    *,
    log_offsets: dict[str, int] | None = None,
    expected_errors: str = "",
    timeout: float = 90,
    db: str = DB,
) -> Verdict:
    """All invariants, once the writers have stopped. Convergence is waited for."""
    verdict = Verdict()
    nodes = [primary, *replicas]
    try:
        wait_converged(primary, replicas, timeout, db)
        verdict.add("converged", [])
    except AssertionError as exc:
        verdict.add("converged", [str(exc).splitlines()[0]])
    verdict.add(
        "equal pages",
        [
            f"{r.name} differs from the primary"
            for r in replicas
            if not same_pages(primary.db(db), r.db(db))
        ],
    )
    verdict.add(
        "integrity",
        [f"{n.name}: {result}" for n in nodes if (result := integrity(n.db(db))) != "ok"],
    )
    for node in nodes:
        verdict.add(
            "acknowledged writes",
            (f"{node.name}: {p}" for p in check_writes(ledgers, rows_per_transaction(node.db(db)))),
        )
    verdict.add("monotonic reads", check_reads(reads))
    verdict.add("writers", writer_errors)
    for node in nodes:
        text = node.logs()[(log_offsets or {}).get(node.name, 0) :]
        unexpected, known = bad_log_entries(text, expected_errors)
        verdict.add("clean logs", (f"{node.name}: {entry}" for entry in unexpected))
        verdict.known.extend(f"{node.name}: {entry}" for entry in known)
    return verdict
