"""The primary-side WAL tailer: every committed transaction of a live database, in the log.

Apps are separate processes (tests/sidecar/writer.py with the stdlib sqlite3 module, and
the sqlite3 command-line shell); the tailer runs in the test process (or in
tests/sidecar/tail_runner.py when it must be killed) and the log is checked by replaying
it onto an empty image: pages equal to the live database's, checksums equal to the
tailer's own (kept incrementally), PRAGMA integrity_check ok.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ltx
from sidecar import wal
from sidecar.log import LTXLog
from sidecar.tailer import DatabaseTailer, TailerError, TailerOptions
from tests.sidecar.tailer_support import (
    REPO,
    SQLITE3_CLI,
    Runner,
    SteppingWriter,
    assert_log_matches,
    assert_tailer_matches_live,
    chain,
    create_db,
    finish,
    live_pages,
    make_tailer,
    pages_checksum,
    query,
    replay_at,
    snapshot_count,
    sqlite_cli,
    start_writer,
    sync_while_running,
)

SMALL = TailerOptions(passive_frames=50, truncate_frames=400)
FRAME = wal.WAL_FRAME_HEADER_SIZE + 4096

needs_cli = pytest.mark.skipif(
    SQLITE3_CLI is None, reason="the sqlite3 command-line shell is not installed"
)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "app" / "app.db"
    create_db(path)
    return path


@pytest.fixture
def ltx_dir(tmp_path: Path) -> Path:
    return tmp_path / "dbs" / "db" / "ltx"


@pytest.fixture
def tailers() -> Iterator[list[DatabaseTailer]]:
    """Tailers a test opened; closed at teardown."""
    opened: list[DatabaseTailer] = []
    yield opened
    for t in opened:
        t.close()


@pytest.fixture
def writers() -> Iterator[list[SteppingWriter]]:
    started: list[SteppingWriter] = []
    yield started
    for w in started:
        w.close()


def open_tailer(
    tailers: list[DatabaseTailer], db: Path, ltx_dir: Path, options: TailerOptions = SMALL
) -> DatabaseTailer:
    tailer = make_tailer(db, ltx_dir, options)
    tailers.append(tailer)
    tailer.open()
    return tailer


def stepping(writers: list[SteppingWriter], db: Path, writer_id: int = 0) -> SteppingWriter:
    w = SteppingWriter(db, writer_id)
    writers.append(w)
    return w


def insert_blobs(rows: int, size: int) -> str:
    """SQL inserting ``rows`` random blobs of ``size`` bytes into t(v) in one statement."""
    return (
        f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {rows}) "
        f"INSERT INTO t(v) SELECT randomblob({size}) FROM s;"
    )


def wal_header(db: Path) -> wal.WALHeader | None:
    data = Path(f"{db}-wal").read_bytes()[:32]  # reading the -wal with open() is safe
    return wal.parse_wal_header(data) if len(data) == 32 else None


# -- random workloads -------------------------------------------------------------------------


def test_random_workloads_from_several_writer_processes_replay_to_the_live_database(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer]
) -> None:
    tailer = open_tailer(tailers, db, ltx_dir)
    checked: dict[int, list[bytes]] = {}
    for phase in range(4):
        procs = [start_writer(db, seed=100 * phase + i, ops=60, writer_id=i) for i in range(3)]
        sync_while_running(tailer, procs)
        txid = assert_tailer_matches_live(tailer, tmp_path)
        checked[txid] = live_pages(db)
    state = tailer.state
    assert state.snapshots == 1
    assert state.last_checkpoint_mode is not None
    # Every state checked along the way is still what the log replays to at that TXID.
    replayed = replay_at(LTXLog(ltx_dir), tmp_path / "steps.db", checked)
    for txid, pages in checked.items():
        assert replayed[txid] == pages, f"TXID {txid}"


def test_every_transaction_of_a_lock_step_writer_replays_exactly_and_checksums_are_incremental(
    tmp_path: Path, ltx_dir: Path, tailers: list[DatabaseTailer], writers: list[SteppingWriter]
) -> None:
    db = tmp_path / "inc.db"
    create_db(db, auto_vacuum="INCREMENTAL")  # incremental_vacuum shrinks inside transactions
    tailer = open_tailer(tailers, db, ltx_dir)
    w = stepping(writers, db)
    checked: dict[int, list[bytes]] = {tailer.state.txid: live_pages(db)}
    for step in range(120):
        w.do(f"random {step} 1")
        tailer.sync()
        pages = live_pages(db)
        # The checksum kept incrementally is the live database's at every step.
        assert tailer.state.checksum == pages_checksum(pages), f"step {step}"
        assert tailer.state.pages == len(pages)
        checked[tailer.state.txid] = pages
    assert tailer.state.snapshots == 1
    replayed = replay_at(LTXLog(ltx_dir), tmp_path / "steps.db", checked)
    for txid, pages in checked.items():
        assert replayed[txid] == pages, f"TXID {txid}"
    assert_tailer_matches_live(tailer, tmp_path)


@needs_cli
def test_sqlite3_shell_as_the_writer(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer]
) -> None:
    tailer = open_tailer(tailers, db, ltx_dir)
    sqlite_cli(db, "CREATE TABLE cli(id INTEGER PRIMARY KEY, v TEXT, b BLOB);")
    tailer.sync()
    assert_tailer_matches_live(tailer, tmp_path)
    rng = random.Random(7)
    scripts = [
        "INSERT INTO cli(v) VALUES('a'); INSERT INTO cli(v) VALUES('b');",
        "UPDATE cli SET v = v || 'x' WHERE id % 2 = 0; DELETE FROM cli WHERE id % 7 = 3;",
        "INSERT INTO cli(v, b) VALUES('big', randomblob(40000));",
        "BEGIN; INSERT INTO cli(v) VALUES('t1'); INSERT INTO cli(v, b) VALUES('t2', "
        "randomblob(9000)); UPDATE cli SET v = 'u' WHERE v = 'a'; CREATE INDEX IF NOT EXISTS "
        "cli_v ON cli(v); COMMIT;",
        "BEGIN; INSERT INTO cli(v, b) VALUES('gone', randomblob(50000)); ROLLBACK;",
        "DELETE FROM cli WHERE b IS NOT NULL; VACUUM;",
        "DROP INDEX IF EXISTS cli_v; CREATE TABLE IF NOT EXISTS cli2(x); WITH RECURSIVE "
        "s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 500) INSERT INTO cli2 "
        "SELECT i FROM s;",
    ]
    for step in range(24):
        script = scripts[step] if step < len(scripts) else rng.choice(scripts)
        before = tailer.state.txid
        sqlite_cli(db, script)
        tailer.sync()
        if "ROLLBACK" not in script:
            assert tailer.state.txid > before, script
        assert_tailer_matches_live(tailer, tmp_path)
    assert tailer.state.snapshots == 1


def test_transactions_longer_than_the_read_chunk_are_read_whole(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer],
    writers: list[SteppingWriter], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr("sidecar.tailer._READ_CHUNK", 3 * FRAME + 100)
    tailer = open_tailer(
        tailers, db, ltx_dir, TailerOptions(passive_frames=40, truncate_frames=10**6)
    )
    w = stepping(writers, db)
    w.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
    for rows in (1, 2, 10, 1, 1, 30, 3, 1):  # 1 row is 1-2 frames, 10 rows 10+
        w.sql(insert_blobs(rows, 3000))
        w.sql(insert_blobs(1, 10) + insert_blobs(1, 20))  # several small transactions
        tailer.sync()
        assert_tailer_matches_live(tailer, tmp_path)
    assert tailer.state.rescans == 0


# -- opening a database -----------------------------------------------------------------------


def test_a_rollback_journal_database_is_switched_to_wal_with_a_log_line(
    tmp_path: Path, ltx_dir: Path, tailers: list[DatabaseTailer], caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "rollback.db"
    create_db(db, wal=False)
    assert query(db, "PRAGMA journal_mode") == [("delete",)]
    with caplog.at_level(logging.INFO, logger="ltx_sidecar.tailer"):
        tailer = open_tailer(tailers, db, ltx_dir)
    assert "switched the database from delete to WAL journal mode" in caplog.text
    assert query(db, "PRAGMA journal_mode") == [("wal",)]
    assert tailer.state.snapshots == 1
    assert_tailer_matches_live(tailer, tmp_path)


def test_a_database_locked_in_rollback_mode_is_refused_with_the_reason_until_released(
    tmp_path: Path, ltx_dir: Path, tailers: list[DatabaseTailer], writers: list[SteppingWriter]
) -> None:
    db = tmp_path / "locked.db"
    create_db(db, wal=False)
    app = stepping(writers, db)
    app.sql("BEGIN EXCLUSIVE; INSERT INTO shared(n) VALUES(1);")  # held until COMMIT
    tailer = make_tailer(db, ltx_dir, SMALL)
    tailers.append(tailer)
    with pytest.raises(TailerError, match="locked") as excinfo:
        tailer.open()
    assert str(db) in str(excinfo.value)
    assert not tailer.is_open
    assert db.read_bytes()[18:20] == b"\x01\x01"  # still rollback mode (nobody holds it open)
    app.do("exec COMMIT")
    tailer.open()
    assert query(db, "PRAGMA journal_mode") == [("wal",)]
    assert tailer.state.snapshots == 1
    assert_tailer_matches_live(tailer, tmp_path)


@needs_cli
def test_an_app_cannot_take_a_followed_database_out_of_wal_mode(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer]
) -> None:
    tailer = open_tailer(tailers, db, ltx_dir)
    assert SQLITE3_CLI is not None
    out = subprocess.run(
        [SQLITE3_CLI, str(db), "PRAGMA journal_mode=DELETE;"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "locked" in out.stderr  # the pin holds it in WAL mode
    assert query(db, "PRAGMA journal_mode") == [("wal",)]
    sqlite_cli(db, "INSERT INTO shared(n) VALUES(5);")
    tailer.sync()
    assert_tailer_matches_live(tailer, tmp_path)


_OPEN_SCRIPT = """
import json, sys
from pathlib import Path
from sidecar.log import LTXLog
from sidecar.tailer import DatabaseTailer, TailerOptions
tailer = DatabaseTailer("db", Path(sys.argv[1]), LTXLog(Path(sys.argv[2])), TailerOptions())
try:
    tailer.open()
    result = {"error": None, "message": "", "txid": tailer.state.txid}
except Exception as exc:
    result = {"error": type(exc).__name__, "message": str(exc), "txid": tailer.state.txid}
tailer.close()
print(json.dumps(result))
"""


def _open_without_write_permission(db: Path, ltx_dir: Path) -> dict[str, object]:
    """Open a tailer in a process that file permissions apply to (root's are dropped)."""
    args = [sys.executable, "-c", _OPEN_SCRIPT, str(db), str(ltx_dir)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing")
        args = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *args]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("case", ["rollback-file", "wal-directory", "wal-file"])
def test_a_read_only_database_or_directory_is_refused_naming_read_only(
    tmp_path: Path, case: str
) -> None:
    directory = tmp_path / "ro"
    db = directory / "ro.db"
    create_db(db, wal=case != "rollback-file")  # closed: no -wal or -shm left
    ltx_dir = tmp_path / "ltx"
    ltx_dir.mkdir()
    before = db.read_bytes()
    if case == "wal-directory":
        directory.chmod(0o555)
    else:
        db.chmod(0o444)
    try:
        result = _open_without_write_permission(db, ltx_dir)
    finally:
        directory.chmod(0o755)
        db.chmod(0o644)
    assert result["error"] == "TailerError", result
    assert "read-only" in str(result["message"]), result
    assert str(db) in str(result["message"])
    assert db.read_bytes() == before
    assert list(ltx_dir.iterdir()) == []


def test_a_file_that_is_not_a_sqlite_database_is_refused(
    tmp_path: Path, ltx_dir: Path, tailers: list[DatabaseTailer]
) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database\n" * 500)
    tailer = make_tailer(junk, ltx_dir)
    tailers.append(tailer)
    with pytest.raises(TailerError, match="not a SQLite database"):
        tailer.open()
    # The magic is right but the header is garbage.
    fake = tmp_path / "fake.db"
    fake.write_bytes(b"SQLite format 3\x00" + b"\xff" * 8000)
    tailer = make_tailer(fake, ltx_dir)
    tailers.append(tailer)
    with pytest.raises(TailerError, match=str(fake)):
        tailer.open()
    assert fake.read_bytes() == b"SQLite format 3\x00" + b"\xff" * 8000
    assert len(LTXLog(ltx_dir)) == 0


@needs_cli
def test_a_database_that_does_not_exist_yet_is_picked_up_with_a_snapshot_when_created(
    tmp_path: Path, ltx_dir: Path, tailers: list[DatabaseTailer]
) -> None:
    db = tmp_path / "later.db"
    tailer = make_tailer(db, ltx_dir, SMALL)
    tailers.append(tailer)
    with pytest.raises(TailerError, match="does not exist"):
        tailer.open()
    assert tailer.sync() == 0
    assert not db.exists()  # the tailer never creates it
    sqlite_cli(db, "CREATE TABLE t(x); INSERT INTO t VALUES(1);")
    tailer.sync()
    assert tailer.is_open and tailer.state.snapshots == 1
    sqlite_cli(db, "INSERT INTO t VALUES(2); INSERT INTO t VALUES(3);")
    tailer.sync()
    assert_tailer_matches_live(tailer, tmp_path)


# -- restarts -------------------------------------------------------------------------------


def test_a_clean_restart_in_the_same_wal_generation_resumes_without_a_snapshot(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer],
    writers: list[SteppingWriter],
) -> None:  # fmt: skip
    options = TailerOptions(passive_frames=100_000, truncate_frames=1_000_000)
    w = stepping(writers, db)
    tailer = open_tailer(tailers, db, ltx_dir, options)
    for step in range(10):
        w.do(f"random {step} 1")
        tailer.sync()
    txid = tailer.state.txid
    tailer.close()
    for step in range(10, 20):  # while the sidecar is down (no app checkpoints)
        w.do(f"random {step} 1 plain")
    tailer = open_tailer(tailers, db, ltx_dir, options)
    assert tailer.state.snapshots == 0
    # What was committed meanwhile (ten transactions), as one file with a TXID range.
    assert chain(tailer.log)[-1][:2] == (txid + 1, txid + 10)
    assert snapshot_count(tailer.log) == 1 and chain(tailer.log)[0][:2] == (1, 1)
    w.do("random 99 3")
    tailer.sync()
    assert tailer.state.rescans == 0
    assert_tailer_matches_live(tailer, tmp_path)


def test_a_clean_restart_after_the_sidecars_own_checkpoint_resumes_without_a_snapshot(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer],
    writers: list[SteppingWriter],
) -> None:  # fmt: skip
    options = TailerOptions(passive_frames=20, truncate_frames=1_000_000)
    w = stepping(writers, db)
    tailer = open_tailer(tailers, db, ltx_dir, options)
    w.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
    w.sql(insert_blobs(30, 3000))
    tailer.sync()
    assert tailer.state.last_checkpoint_mode == "PASSIVE"
    salts = wal_header(db)
    tailer.close()
    # Writes while the sidecar is down start a new WAL generation (the old one was fully
    # checkpointed): the database file holds exactly the state at the log's end.
    w.sql("INSERT INTO t(v) VALUES(randomblob(100)); UPDATE t SET v = randomblob(10);")
    assert wal_header(db) != salts
    tailer = open_tailer(tailers, db, ltx_dir, options)
    assert tailer.state.snapshots == 0 and tailer.state.rescans == 0
    assert snapshot_count(tailer.log) == 1 and chain(tailer.log)[0][:2] == (1, 1)
    assert_tailer_matches_live(tailer, tmp_path)
    # Restarted right after its own checkpoint, with no writes while down: the first
    # write resets the WAL, which the new pin allows and the tailer follows.
    w.sql(insert_blobs(30, 3000))
    tailer.sync()
    assert tailer.state.last_checkpoint_mode == "PASSIVE"
    tailer.close()
    tailer = open_tailer(tailers, db, ltx_dir, options)
    w.sql("INSERT INTO t(v) VALUES(randomblob(100));")
    tailer.sync()
    w.sql("INSERT INTO t(v) VALUES(randomblob(100));")
    tailer.sync()
    assert tailer.state.snapshots == 0 and tailer.state.rescans == 0
    assert snapshot_count(tailer.log) == 1
    assert_tailer_matches_live(tailer, tmp_path)


def _kill_runners_while_writers_run(
    tmp_path: Path, db: Path, ltx_dir: Path, procs: list[subprocess.Popen[bytes]], seed: int
) -> int:
    """Start tail_runner.py, SIGKILL it at a random point, repeat while the writers run."""
    rng = random.Random(seed)
    kills = 0
    try:
        for run in range(12):
            runner = Runner(db, ltx_dir, SMALL, tmp_path / f"runner-{run:02d}.log")
            runner.wait_ready()
            time.sleep(rng.uniform(0.02, 0.3))
            runner.kill()
            kills += 1
            chain(LTXLog(ltx_dir))  # loads, contiguous, starts with a snapshot
            if all(p.poll() is not None for p in procs):
                break
            time.sleep(rng.uniform(0.0, 0.1))  # writes while the sidecar is down
    finally:
        finish(procs)
    assert kills >= 3
    return kills


def test_sigkilled_at_random_points_under_load_the_log_never_has_a_gap(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer]
) -> None:
    procs = [start_writer(db, seed=500 + i, ops=300, writer_id=i, pause=0.01) for i in range(2)]
    _kill_runners_while_writers_run(tmp_path, db, ltx_dir, procs, seed=1234)
    tailer = open_tailer(tailers, db, ltx_dir)
    tailer.sync()
    assert_tailer_matches_live(tailer, tmp_path)


def test_sigkilled_while_apps_leave_checkpoints_to_it_every_restart_resumes_the_log(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer],
    writers: list[SteppingWriter],
) -> None:  # fmt: skip
    idle = stepping(writers, db, 9)  # an app connection open throughout: the WAL stays
    procs = [
        start_writer(db, seed=600 + i, ops=300, writer_id=i, pause=0.01, plain=True,
                     autocheckpoint=False)
        for i in range(2)
    ]  # fmt: skip
    kills = _kill_runners_while_writers_run(tmp_path, db, ltx_dir, procs, seed=4321)
    tailer = open_tailer(tailers, db, ltx_dir)
    tailer.sync()
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("runner-*.log")))
    assert logs.count("writing a snapshot") == 1, logs  # the first one, at TXID 1
    assert logs.count(": resumed at TXID") == kills - 1
    assert tailer.state.snapshots == 0
    assert chain(tailer.log)[0][:2] == (1, 1)
    assert_tailer_matches_live(tailer, tmp_path)
    idle.close()


# -- what the log cannot explain ----------------------------------------------------------------


def test_a_deleted_database_gives_a_deletion_file_and_a_recreated_one_a_snapshot(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer]
) -> None:
    tailer = open_tailer(tailers, db, ltx_dir)
    sync_while_running(tailer, [start_writer(db, seed=1, ops=20, plain=True)])
    txid = tailer.state.txid
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink()
    tailer.sync()
    files = chain(tailer.log)
    assert files[-1][:2] == (txid + 1, txid + 1)
    last = tailer.log.last_header
    assert last is not None and last.commit == 0
    assert tailer.log.pos == ltx.Pos(txid + 1, ltx.EMPTY_DB_CHECKSUM)
    assert_log_matches(tailer.log, [], tmp_path)  # replays to no database at all
    assert tailer.sync() == 0 and tailer.state.txid == txid + 1  # nothing more while gone
    create_db(db)
    tailer.sync()
    assert chain(tailer.log)[0][:2] == (1, txid + 2)  # a snapshot at the next TXID
    sync_while_running(tailer, [start_writer(db, seed=2, ops=20)])
    assert_tailer_matches_live(tailer, tmp_path)


def test_a_database_replaced_by_another_file_gives_a_deletion_then_a_snapshot(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer]
) -> None:
    tailer = open_tailer(tailers, db, ltx_dir)
    sync_while_running(tailer, [start_writer(db, seed=3, ops=10, plain=True)])
    txid = tailer.state.txid
    other = tmp_path / "other.db"
    create_db(other)
    os.replace(other, db)
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    tailer.sync()
    header = tailer.log.last_header
    assert header is not None and header.commit == 0 and header.max_txid == txid + 1
    tailer.sync()
    assert chain(tailer.log)[0][:2] == (1, txid + 2)
    assert_tailer_matches_live(tailer, tmp_path)


def test_an_app_truncate_checkpoint_while_the_sidecar_is_down_gives_a_snapshot_on_restart(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer],
    writers: list[SteppingWriter],
) -> None:  # fmt: skip
    options = TailerOptions(passive_frames=100_000, truncate_frames=1_000_000)
    w = stepping(writers, db)
    tailer = open_tailer(tailers, db, ltx_dir, options)
    for step in range(5):
        w.do(f"random {step} 1")
    tailer.sync()
    txid = tailer.state.txid
    tailer.close()
    w.sql("INSERT INTO shared(n, v) VALUES(1, randomblob(5000));")
    w.sql("PRAGMA wal_checkpoint(TRUNCATE);")
    assert Path(f"{db}-wal").stat().st_size == 0
    w.sql("INSERT INTO shared(n, v) VALUES(2, randomblob(5000));")
    tailer = open_tailer(tailers, db, ltx_dir, options)
    assert tailer.state.snapshots == 1
    assert chain(tailer.log)[0][:2] == (1, txid + 1)
    assert_tailer_matches_live(tailer, tmp_path)
    w.do("random 77 3")
    tailer.sync()
    assert_tailer_matches_live(tailer, tmp_path)


def _corrupt_in_last_frame(db: Path, marker: bytes) -> None:
    """Flip one byte of ``marker`` (a row's payload) inside the WAL's last frame."""
    path = Path(f"{db}-wal")
    data = path.read_bytes()
    last = len(data) - FRAME
    assert (len(data) - 32) % FRAME == 0
    at = data.index(marker, last + wal.WAL_FRAME_HEADER_SIZE)
    with path.open("r+b") as f:  # the -wal holds no SQLite locks: safe to open and close
        f.seek(at + 10)
        f.write(bytes([data[at + 10] ^ 0xFF]))


def test_a_published_frame_corrupted_on_disk_is_shipped_as_sqlite_reads_it(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer],
    writers: list[SteppingWriter],
) -> None:  # fmt: skip
    """Frames up to the wal-index mxFrame are trusted as SQLite's own readers trust them
    (their checksums are not recomputed): the log follows what the database serves, so
    the log and the database never diverge. (Unpublished frames are never shipped, and a
    scan without -shm verifies every checksum: see test_wal.py.)"""
    w = stepping(writers, db)
    w.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB); INSERT INTO t(v) VALUES(x'00');")
    tailer = open_tailer(tailers, db, ltx_dir)
    w.sql("INSERT INTO t(v) VALUES(randomblob(1000));")
    tailer.sync()
    w.sql("INSERT INTO t(v) VALUES(zeroblob(2000));")  # the app is done writing
    _corrupt_in_last_frame(db, bytes(64))
    tailer.sync()
    assert_log_matches(tailer.log, live_pages(db), tmp_path, checksum=tailer.state.checksum)
    tailer.checkpoint("PASSIVE")
    assert tailer.state.rescans == 0
    assert_log_matches(tailer.log, live_pages(db), tmp_path, checksum=tailer.state.checksum)


def test_a_truncated_wal_stops_the_tailer_at_the_last_valid_commit(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer],
    writers: list[SteppingWriter],
) -> None:  # fmt: skip
    w = stepping(writers, db)
    w.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
    tailer = open_tailer(tailers, db, ltx_dir)
    w.sql("INSERT INTO t(v) VALUES(randomblob(1000));")
    tailer.sync()
    good_txid, good = tailer.state.txid, live_pages(db)
    w.sql(insert_blobs(5, 3000))
    w.close()  # the app is done writing
    path = Path(f"{db}-wal")
    size = path.stat().st_size
    for cut in (size - 1, size - FRAME, size - FRAME - 100):
        os.truncate(path, cut)  # by path: no descriptor of ours is opened or closed
        assert tailer.sync() == 0
        assert tailer.state.txid == good_txid
    assert_log_matches(tailer.log, good, tmp_path, checksum=tailer.state.checksum)


# -- checkpoints ------------------------------------------------------------------------------


def test_own_passive_checkpoints_reset_the_wal_without_rescans_and_keep_it_small(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer]
) -> None:
    tailer = open_tailer(
        tailers, db, ltx_dir, TailerOptions(passive_frames=50, truncate_frames=10**6)
    )
    procs = [
        start_writer(db, seed=40 + i, ops=150, writer_id=i, plain=True, pause=0.005)
        for i in range(3)
    ]
    generations: set[tuple[int, int]] = set()
    max_wal = 0
    deadline = time.monotonic() + 60
    while any(p.poll() is None for p in procs):
        assert time.monotonic() < deadline
        tailer.sync()
        header = wal_header(db)
        if header is not None:
            generations.add(header.salts)
        max_wal = max(max_wal, Path(f"{db}-wal").stat().st_size)
        time.sleep(0.002)
    sync_while_running(tailer, procs)
    state = tailer.state
    assert state.last_checkpoint_mode == "PASSIVE"
    assert len(generations) >= 5  # the WAL was reset again and again...
    assert state.rescans == 0 and state.snapshots == 1  # ...and followed every time
    assert max_wal < state.ltx_bytes  # bounded, far below what was written through it
    assert max_wal < 2_000 * FRAME
    assert_tailer_matches_live(tailer, tmp_path)


def test_no_checkpoint_runs_again_until_new_frames_arrive(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer],
    writers: list[SteppingWriter],
) -> None:  # fmt: skip
    tailer = open_tailer(tailers, db, ltx_dir, TailerOptions(passive_frames=20, truncate_frames=40))
    w = stepping(writers, db)
    w.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
    w.sql(insert_blobs(25, 3000))
    tailer.sync()
    assert tailer.state.last_checkpoint_mode == "PASSIVE"
    when = tailer.state.last_checkpoint
    for _ in range(5):  # the WAL is fully checkpointed: nothing to do until it resets
        tailer.sync()
    assert tailer.state.last_checkpoint == when
    assert tailer.state.last_checkpoint_mode == "PASSIVE"
    w.sql("INSERT INTO t(v) VALUES(1);")
    tailer.sync()
    assert tailer.state.rescans == 0
    assert_tailer_matches_live(tailer, tmp_path)


def test_truncate_past_the_cap_empties_the_wal_and_tailing_continues_without_rescans(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer],
    writers: list[SteppingWriter],
) -> None:  # fmt: skip
    tailer = open_tailer(
        tailers, db, ltx_dir, TailerOptions(passive_frames=10**6, truncate_frames=60)
    )
    a, b = stepping(writers, db, 0), stepping(writers, db, 1)
    a.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
    truncations = 0
    for step in range(12):
        (a if step % 2 else b).sql(insert_blobs(25, 3000))
        before = tailer.state.last_checkpoint
        tailer.sync()  # ships the commits: a writer is busy, TRUNCATE waits
        if tailer.state.last_checkpoint != before:
            assert tailer.state.last_checkpoint_mode == "PASSIVE"
        before = tailer.state.last_checkpoint
        tailer.sync()  # nothing new: the quiet moment TRUNCATE waits for
        if tailer.state.last_checkpoint != before:
            assert tailer.state.last_checkpoint_mode == "TRUNCATE"
            assert Path(f"{db}-wal").stat().st_size == 0
            truncations += 1
        assert_tailer_matches_live(tailer, tmp_path)
    assert truncations >= 3
    assert tailer.state.rescans == 0 and tailer.state.snapshots == 1


def test_checkpoints_keep_up_with_a_writer_committing_in_a_loop(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer]
) -> None:
    # SQLite's busy handler sleeps 1, 2, 5 ms between tries for the write lock; each
    # let hundreds of frames in, the seal was released and the checkpoint put off, and
    # the WAL grew by tens of thousands of frames before one went through.
    options = TailerOptions(passive_frames=200, truncate_frames=10**6)
    tailer = open_tailer(tailers, db, ltx_dir, options)
    script = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
        "c.execute('PRAGMA wal_autocheckpoint=0')\n"
        "end = time.monotonic() + 2\n"
        "while time.monotonic() < end:\n"
        "    c.execute('INSERT INTO shared(n) VALUES (1)')\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(db)], stderr=subprocess.PIPE)
    most = 0
    while writer.poll() is None:
        tailer.sync()
        most = max(most, tailer.state.wal_frames)
    sync_while_running(tailer, [writer])
    # measured: at most 300-420 frames; 4,400-7,100 (the whole run) before the change
    assert most < 2_500, f"the WAL grew to {most} frames between checkpoints"
    assert tailer.state.rescans == 0
    assert_tailer_matches_live(tailer, tmp_path)


def test_a_commit_slipping_in_before_a_busy_truncate_is_read_from_the_wal_not_rescanned(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer],
    writers: list[SteppingWriter],
) -> None:  # fmt: skip
    # A busy TRUNCATE (a reader on an older snapshot) neither rewinds nor truncates the
    # WAL: the slipped commit is still there. Rescanning for it held the seal while the
    # whole WAL was read (6.8 s for a 1 GB WAL, past the app's busy timeout).
    w, reader = stepping(writers, db, 0), stepping(writers, db, 1)
    w.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB); PRAGMA wal_checkpoint(TRUNCATE);")
    tailer = open_tailer(
        tailers, db, ltx_dir, TailerOptions(passive_frames=10**6, truncate_frames=30)
    )
    run_checkpoint = tailer._run_checkpoint
    results: list[tuple[int, int, int]] = []

    def slip_then_checkpoint(mode: str) -> tuple[int, int, int]:
        if mode == "TRUNCATE":
            w.sql("UPDATE shared SET v = 'slipped in';")
        result = run_checkpoint(mode)
        results.append(result)
        return result

    tailer._run_checkpoint = slip_then_checkpoint  # type: ignore[method-assign]
    w.sql(insert_blobs(40, 3000))
    reader.do("exec BEGIN")
    reader.do("exec SELECT count(*) FROM shared")  # a snapshot in the WAL: no rewind
    tailer.sync()
    tailer.sync()  # a quiet sync: TRUNCATE runs, and stays busy
    assert tailer.state.last_checkpoint_mode == "TRUNCATE" and results[-1][0] == 1
    reader.do("exec COMMIT")
    tailer.sync()
    assert tailer.state.rescans == 0
    assert query(db, "SELECT count(*) FROM shared WHERE v = 'slipped in'") == [(1,)]
    assert_tailer_matches_live(tailer, tmp_path)


def test_a_commit_slipping_in_before_a_truncate_checkpoint_is_not_lost(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer],
    writers: list[SteppingWriter],
) -> None:  # fmt: skip
    w = stepping(writers, db)
    # An app connection that has reset the WAL itself writes the next WAL header with
    # salt-1 + 1, exactly like a reset the tailer expects after its own checkpoint.
    w.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB); PRAGMA wal_checkpoint(TRUNCATE);")
    tailer = open_tailer(
        tailers, db, ltx_dir, TailerOptions(passive_frames=10**6, truncate_frames=30)
    )
    run_checkpoint = tailer._run_checkpoint

    def slip_then_checkpoint(mode: str) -> tuple[int, int, int]:
        if mode == "TRUNCATE":  # the seal is released: an app commit gets in first
            w.sql("UPDATE shared SET v = 'slipped in';")
        return run_checkpoint(mode)

    tailer._run_checkpoint = slip_then_checkpoint  # type: ignore[method-assign]
    w.sql(insert_blobs(40, 3000))
    tailer.sync()
    tailer.sync()  # a quiet sync: TRUNCATE runs
    assert tailer.state.last_checkpoint_mode == "TRUNCATE"
    assert query(db, "SELECT count(*) FROM shared WHERE v = 'slipped in'") == [(1,)]
    w.sql("INSERT INTO t(v) VALUES('after');")  # on other pages than the slipped commit
    tailer.sync()
    assert_tailer_matches_live(tailer, tmp_path)


def _rewrite_wal_salts(db: Path) -> None:
    """Another process rewrites the WAL header with new salts (and a valid checksum).

    SQLite does not notice (its connections trust the wal-index); the tailer sees a second
    WAL reset under one pin, which nothing legitimate can cause.
    """
    path = Path(f"{db}-wal")
    header = wal.parse_wal_header(path.read_bytes()[:32])
    fields = [header.magic, header.format_version, header.page_size, header.checkpoint_seq]
    fields += [header.salt1 ^ 0x5A5A5A5A, header.salt2 ^ 0xA5A5A5A5]
    head = struct.pack(">6I", *fields)
    head += struct.pack(">2I", *wal.wal_checksum(head, 0, 0, header.big_endian))
    with path.open("r+b") as f:  # the -wal holds no SQLite locks: safe to open and close
        f.write(head)


def test_a_checkpoint_that_finds_an_unexplained_wal_reset_rescans_instead_of_failing(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer],
    writers: list[SteppingWriter],
) -> None:  # fmt: skip
    w = stepping(writers, db)
    w.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
    tailer = open_tailer(
        tailers, db, ltx_dir, TailerOptions(passive_frames=10**6, truncate_frames=10**6)
    )
    w.sql("INSERT INTO t(v) VALUES(randomblob(100));")
    tailer.sync()
    tailer.checkpoint("PASSIVE")
    w.sql("INSERT INTO t(v) VALUES(randomblob(100));")  # resets the WAL: allowed, followed
    tailer.sync()
    assert tailer.state.rescans == 0
    _rewrite_wal_salts(db)
    tailer.checkpoint("PASSIVE")  # finds the "reset" under its own seal
    assert tailer.state.rescans >= 1
    assert_tailer_matches_live(tailer, tmp_path)
    w.sql("INSERT INTO t(v) VALUES(randomblob(100));")
    tailer.sync()
    assert_tailer_matches_live(tailer, tmp_path)


def _append_unpublished_commit(db: Path) -> None:
    """Append a commit frame to the -wal the way a writer that died before publishing it
    in the wal-index (-shm) leaves it: salts and checksum chain valid, never committed.
    """
    path = Path(f"{db}-wal")
    data = path.read_bytes()
    header = wal.parse_wal_header(data[:32])
    result = wal.scan(data, 0, wal.ScanState.from_header(header))
    last = result.transactions[-1]
    pgno, image = next(iter(last.pages.items()))
    page = bytearray(image)
    page[-1] ^= 0xFF
    frame_head = struct.pack(">II", pgno, last.commit_size)
    s0, s1 = wal.wal_checksum(frame_head, *last.checksum, header.big_endian)
    s0, s1 = wal.wal_checksum(bytes(page), s0, s1, header.big_endian)
    frame = frame_head + struct.pack(">IIII", header.salt1, header.salt2, s0, s1) + page
    with path.open("r+b") as f:  # the -wal holds no SQLite locks: safe to open and close
        f.seek(last.end_offset)
        f.write(frame)


def test_a_commit_frame_sqlite_has_not_published_is_not_shipped(
    tmp_path: Path, db: Path, ltx_dir: Path, tailers: list[DatabaseTailer],
    writers: list[SteppingWriter],
) -> None:  # fmt: skip
    w = stepping(writers, db)
    w.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
    tailer = open_tailer(tailers, db, ltx_dir)
    w.sql("INSERT INTO t(v) VALUES(randomblob(100));")
    tailer.sync()
    _append_unpublished_commit(db)
    assert Path(f"{db}-wal").stat().st_size > 32 + 3 * FRAME  # SQLite does not see it
    tailer.sync()
    assert_tailer_matches_live(tailer, tmp_path)
    # The next real commit overwrites those frames; the tailer follows it.
    w.sql("INSERT INTO t(v) VALUES(randomblob(100));")
    tailer.sync()
    assert_tailer_matches_live(tailer, tmp_path)
    assert tailer.state.rescans == 0
