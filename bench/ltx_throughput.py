"""LTX library throughput: encode, decode and checksum a realistic SQLite database.

The database is made with the standard sqlite3 module (page_size 4096): users
with names, e-mail addresses and free text, orders with integers and floats,
two secondary indexes, and attachments whose blobs range from JSON text
(compresses well) to random bytes (does not compress). Figures are MB/s of page
data (10^6 bytes of page_size x pages per second), best of RUNS runs timed with
time.perf_counter. Pages are read into memory before encoding so disk I/O is not
measured; the checksum reads the database file through a warm OS cache.
"""

from __future__ import annotations

import gc
import io
import json
import random
import sqlite3
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bench.registry import Context, Result, Target, benchmark
from ltx import (
    FLAG_COMPRESS_LZ4,
    Decoder,
    Encoder,
    Header,
    Trailer,
    Version,
    checksum_file,
    lock_pgno,
)

PAGE_SIZE = 4096
RUNS = 3
SIZES = {"quick": 20_000_000, "full": 200_000_000}  # database bytes to generate

ENCODE_TARGET = Target(250, ">=")
DECODE_TARGET = Target(500, ">=")
CHECKSUM_TARGET = Target(1000, ">=")

Pages = list[tuple[int, bytes]]


def _words(text: str) -> list[str]:
    return text.split()


_FIRST = _words(
    "Ada Alan Barbara Claude Donald Edsger Frances Grace Guido Ken Linus Margaret Niklaus "
    "Radia Rob Shafi Sophie Tim Yukihiro Zhang"
)
_LAST = _words(
    "Lovelace Turing Liskov Shannon Knuth Dijkstra Allen Hopper Rossum Thompson Torvalds "
    "Hamilton Wirth Perlman Pike Goldwasser Wilson Berners-Lee Matsumoto Wei"
)
_DOMAINS = _words("example.com mail.example.org corp.example.net fly.example.dev")
_WORDS = _words(
    "the of and to in is was for on that with as by at from his her an be this which or "
    "have had not are but were they one all their there been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these "
    "two may then do first any my now such like our over man me even most made after also "
    "did many before must through back years where much your way well down should because "
    "replica primary sqlite page transaction checkpoint region latency lease snapshot wal "
    "order invoice shipped pending refund customer account balance warehouse delivery"
)
_STATUSES = ("pending", "paid", "shipped", "delivered", "refunded", "cancelled")

SCHEMA = """
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL,
    bio TEXT,
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX users_email ON users(email);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    quantity INTEGER NOT NULL,
    unit_price REAL NOT NULL,
    total REAL NOT NULL,
    discount REAL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX orders_user_created ON orders(user_id, created_at);
CREATE TABLE attachments (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    kind TEXT NOT NULL,
    body BLOB NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Database:
    path: Path
    page_count: int
    rows: dict[str, int]
    seconds: float
    layout: dict[str, int]  # table or index name -> bytes of pages (empty without dbstat)

    @property
    def page_bytes(self) -> int:
        return self.page_count * PAGE_SIZE


def make_database(path: Path, target_bytes: int, seed: int = 20240601) -> Database:
    """Fill a new database with batches of realistic rows until it reaches target_bytes."""
    start = time.perf_counter()
    rng = random.Random(seed)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode = OFF")  # generation speed; the file is what matters
        conn.execute("PRAGMA synchronous = OFF")
        conn.executescript(SCHEMA)
        rows = {"users": 0, "orders": 0, "attachments": 0}
        while conn.execute("PRAGMA page_count").fetchone()[0] * PAGE_SIZE < target_bytes:
            conn.execute("BEGIN")
            _insert_batch(conn, rng, rows)
            conn.execute("COMMIT")
        page_count = int(conn.execute("PRAGMA page_count").fetchone()[0])
        seconds = time.perf_counter() - start
        layout = _layout(conn)
    finally:
        conn.close()
    return Database(path, page_count, rows, seconds, layout)


def _layout(conn: sqlite3.Connection) -> dict[str, int]:
    """Bytes of pages per table and index, when this SQLite has the dbstat table."""
    try:
        found = conn.execute("SELECT name, count(*) FROM dbstat GROUP BY name ORDER BY 2 DESC")
        return {str(name): int(count) * PAGE_SIZE for name, count in found}
    except sqlite3.Error:
        return {}


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(_WORDS, k=rng.randint(low, high))).capitalize() + "."


def _insert_batch(conn: sqlite3.Connection, rng: random.Random, rows: dict[str, int]) -> None:
    first_user = rows["users"] + 1
    users = []
    for uid in range(first_user, first_user + 1000):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        email = f"{first.lower()}.{last.lower()}{uid}@{rng.choice(_DOMAINS)}"
        created = f"20{rng.randint(15, 25):02d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z"
        users.append((uid, f"{first} {last}", email, _text(rng, 5, 60), created))
    conn.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?)", users)
    rows["users"] += len(users)
    last_user = rows["users"]

    orders = []
    for oid in range(rows["orders"] + 1, rows["orders"] + 4001):
        quantity = rng.randint(1, 20)
        price = round(rng.lognormvariate(3, 1), 2)
        discount = round(rng.random() * 0.3, 3) if rng.random() < 0.2 else None
        total = round(quantity * price * (1 - (discount or 0)), 2)
        orders.append(
            (
                oid,
                rng.randint(1, last_user),
                quantity,
                price,
                total,
                discount,
                rng.choice(_STATUSES),
                rng.randint(1_420_000_000, 1_760_000_000),
            )
        )
    conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?, ?, ?)", orders)
    rows["orders"] += len(orders)

    attachments = []
    for aid in range(rows["attachments"] + 1, rows["attachments"] + 101):
        roll = rng.random()
        if roll < 0.55:  # JSON documents: compress well
            kind = "json"
            doc = {
                "id": aid,
                "title": _text(rng, 3, 8),
                "tags": rng.sample(_WORDS, 4),
                "lines": [
                    {
                        "sku": f"SKU-{rng.randint(1, 99999):05d}",
                        "qty": rng.randint(1, 9),
                        "price": round(rng.uniform(1, 500), 2),
                    }
                    for _ in range(rng.randint(5, 80))
                ],
                "comment": _text(rng, 10, 200),
            }
            body = json.dumps(doc).encode()
        elif roll < 0.75:  # images and other already-compressed data: incompressible
            kind = "image"
            body = rng.randbytes(rng.randint(1_000, 16_000))
        else:  # half text, half noise
            kind = "mixed"
            body = _text(rng, 50, 500).encode() + rng.randbytes(rng.randint(200, 4_000))
        attachments.append((aid, rng.randint(1, last_user), kind, body))
    conn.executemany("INSERT INTO attachments VALUES (?, ?, ?, ?)", attachments)
    rows["attachments"] += len(attachments)


def read_pages(path: Path) -> Pages:
    """Every page of the database as (pgno, bytes), skipping the lock page."""
    data = path.read_bytes()
    lock = lock_pgno(PAGE_SIZE)
    count = len(data) // PAGE_SIZE
    return [
        (pgno, data[(pgno - 1) * PAGE_SIZE : pgno * PAGE_SIZE])
        for pgno in range(1, count + 1)
        if pgno != lock
    ]


def encode(pages: Pages, commit: int, version: Version = Version.V3, flags: int = 0) -> bytes:
    """A snapshot LTX file (TXID 1) holding every page."""
    header = Header(
        page_size=PAGE_SIZE,
        commit=commit,
        min_txid=1,
        max_txid=1,
        flags=flags,
        timestamp=1_700_000_000_000,
    )
    buf = io.BytesIO()
    enc = Encoder(buf, header, version=version)
    for pgno, data in pages:
        enc.write_page(pgno, data)
    enc.finish()
    return buf.getvalue()


def decode(f: io.BufferedIOBase | io.BytesIO, version: Version) -> tuple[int, Trailer]:
    """Decode every page (discarding them); return the page count and verified trailer."""
    dec = Decoder(f, version=version)
    count = 0
    for _ in dec.pages():
        count += 1
    assert dec.trailer is not None
    return count, dec.trailer


def decode_bytes(data: bytes, version: Version) -> tuple[int, Trailer]:
    return decode(io.BytesIO(data), version)


@dataclass(frozen=True, slots=True)
class Timing:
    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    def rate(self, nbytes: int) -> float:
        return nbytes / 1e6 / self.best

    def spread(self, nbytes: int) -> str:
        rates = sorted(nbytes / 1e6 / s for s in self.seconds)
        return (
            f"best of {len(rates)}; runs {', '.join(f'{r:.0f}' for r in rates)} MB/s, "
            f"median {statistics.median(rates):.0f}"
        )


def time_runs(fn: Callable[[], object], runs: int = RUNS) -> Timing:
    """Time fn runs times. The garbage collector stays on (as in the sidecar) but
    starts each run with nothing left over from the previous one."""
    seconds = []
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return Timing(seconds)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


@benchmark(
    "ltx_throughput",
    description="LTX encode/decode/checksum throughput on a realistic SQLite database",
)
def run(ctx: Context) -> list[Result]:
    db = make_database(ctx.tmp_dir / "bench.db", SIZES[ctx.mode])
    nbytes = db.page_bytes
    pages = read_pages(db.path)
    _check(len(pages) == db.page_count, f"read {len(pages)} pages, SQLite says {db.page_count}")
    results = [
        Result(
            "database",
            nbytes / 1e6,
            "MB",
            notes=f"{db.page_count:,} pages of {PAGE_SIZE} B; rows: "
            + ", ".join(f"{n:,} {t}" for t, n in db.rows.items())
            + (
                "; MB by table/index: "
                + ", ".join(f"{name} {size / 1e6:.1f}" for name, size in db.layout.items())
                if db.layout
                else ""
            )
            + f"; made in {db.seconds:.1f} s with sqlite3 {sqlite3.sqlite_version}",
        )
    ]

    # Encode v3 (LZ4 block per page), snapshot: includes the running database checksum.
    v3 = encode(pages, db.page_count)
    timing = time_runs(partial(encode, pages, db.page_count))
    results.append(
        Result(
            "encode v3 snapshot (LZ4 blocks)",
            timing.rate(nbytes),
            "MB/s",
            ENCODE_TARGET,
            f"{timing.spread(nbytes)}; pages in memory, output to BytesIO",
        )
    )

    # Decode v3: every page decompressed, file and database checksums verified.
    count, trailer = decode(io.BytesIO(v3), Version.V3)
    _check(count == len(pages), f"decoded {count} pages, encoded {len(pages)}")
    timing = time_runs(partial(decode_bytes, v3, Version.V3))
    results.append(
        Result(
            "decode v3",
            timing.rate(nbytes),
            "MB/s",
            DECODE_TARGET,
            f"{timing.spread(nbytes)}; from BytesIO, checksums verified",
        )
    )

    v1 = encode(pages, db.page_count, Version.V1)
    v1_lz4 = encode(pages, db.page_count, Version.V1, FLAG_COMPRESS_LZ4)
    for label, data, note in (
        ("decode v1 (uncompressed)", v1, "for information (LiteFS peers)"),
        ("decode v1 LZ4 (one frame)", v1_lz4, "for information"),
    ):
        count, other = decode(io.BytesIO(data), Version.V1)
        _check(count == len(pages), f"{label}: decoded {count} pages, encoded {len(pages)}")
        _check(other.post_apply_checksum == trailer.post_apply_checksum, f"{label}: checksum")
        timing = time_runs(partial(decode_bytes, data, Version.V1))
        results.append(
            Result(label, timing.rate(nbytes), "MB/s", notes=f"{timing.spread(nbytes)}; {note}")
        )

    # Database checksum straight from the file (as the sidecar checks a database).
    def checksum() -> int:
        with db.path.open("rb") as f:
            return checksum_file(f, PAGE_SIZE)

    _check(checksum() == trailer.post_apply_checksum, "checksum_file disagrees with the encoder")
    timing = time_runs(checksum)
    results.append(
        Result(
            "database checksum (checksum_file)",
            timing.rate(nbytes),
            "MB/s",
            CHECKSUM_TARGET,
            f"{timing.spread(nbytes)}; read from the file with a warm OS page cache "
            "(it was just written and read), so this is CRC speed, not disk speed",
        )
    )

    results += [
        Result(
            "compression ratio v3",
            nbytes / len(v3),
            "x",
            notes=f"{nbytes / 1e6:.1f} MB of pages -> {len(v3) / 1e6:.1f} MB v3 file",
        ),
        Result(
            "compression ratio v1 LZ4",
            nbytes / len(v1_lz4),
            "x",
            notes=f"{nbytes / 1e6:.1f} MB of pages -> {len(v1_lz4) / 1e6:.1f} MB v1 LZ4 file",
        ),
    ]

    # Peak memory of a streaming decode from disk, in its own pass: tracemalloc is slow.
    path = ctx.tmp_dir / "snapshot.ltx"
    path.write_bytes(v3)
    gc.collect()
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            decode(f, Version.V3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    results.append(
        Result(
            "decode v3 peak memory",
            peak / (1 << 20),
            "MiB",
            notes=f"tracemalloc peak while decoding the {size / (1 << 20):.1f} MiB file from disk "
            f"({peak / size:.1%} of it, {peak / db.page_count:.0f} B per page); untimed pass",
        )
    )
    return results
