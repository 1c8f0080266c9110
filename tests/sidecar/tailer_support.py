"""Helpers for the tailer tests: writer processes, log replay, live-database snapshots.

The rules of DESIGN.md choice 3 hold in the test process as in the sidecar: the live
database is read only through ``sqlean`` (the tailer's SQLite library), never through the
stdlib ``sqlite3`` module or a plain ``open()`` of the database or its ``-shm`` (closing such
a descriptor would drop the tailer's POSIX locks). Apps are separate processes:
``writer.py`` (stdlib sqlite3) and the ``sqlite3`` command-line shell.
"""

from __future__ import annotations

import itertools
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import sqlean

import ltx
from sidecar.log import LTXLog
from sidecar.tailer import DatabaseTailer, TailerOptions

HERE = Path(__file__).resolve().parent
WRITER = HERE / "writer.py"
RUNNER = HERE / "tail_runner.py"
REPO = HERE.parents[1]
SQLITE3_CLI = shutil.which("sqlite3")
PROCESS_TIMEOUT = 60.0  # no single writer or runner may take longer than this


# -- databases -------------------------------------------------------------------------------


def create_db(path: Path, *, wal: bool = True, auto_vacuum: str | None = None) -> None:
    """A small database with the ``shared`` table; closed before the tailer opens it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlean.connect(str(path), isolation_level=None)
    try:
        if auto_vacuum is not None:
            conn.execute(f"PRAGMA auto_vacuum={auto_vacuum}")
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS shared(id INTEGER PRIMARY KEY, n INTEGER, v BLOB)")
        conn.execute("INSERT INTO shared(id, n, v) VALUES(1000, 0, zeroblob(100))")
    finally:
        conn.close()


def _connect_ro(db: Path) -> sqlean.Connection:
    # Read-only: closing it never checkpoints or deletes the WAL, as an app's last
    # connection would.
    return sqlean.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)


def live_pages(db: Path) -> list[bytes]:
    """The live database's logical pages (WAL included), read in one read transaction."""
    conn = _connect_ro(db)
    try:
        conn.execute("BEGIN")
        rows = conn.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno").fetchall()
        conn.execute("COMMIT")
    finally:
        conn.close()
    pages = [bytes(data) for _, data in rows]
    assert [int(pgno) for pgno, _ in rows] == list(range(1, len(pages) + 1))
    return pages


def pages_checksum(pages: Sequence[bytes]) -> int:
    return ltx.database_checksum((i + 1, p) for i, p in enumerate(pages))


def query(db: Path, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
    conn = _connect_ro(db)
    try:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


# -- the log ---------------------------------------------------------------------------------


def chain(log: LTXLog) -> list[tuple[int, int, Path]]:
    """The log's files, checked to be one contiguous chain starting with a snapshot."""
    files = list(log)
    assert files, "the log is empty"
    assert files[0][0] == 1, f"the log does not start with a snapshot: {files[0][2].name}"
    for (_, prev_max, prev_path), (mn, _, path) in itertools.pairwise(files):
        assert mn == prev_max + 1, f"gap between {prev_path.name} and {path.name}"
    assert log.files_after(0) == [p for _, _, p in files]
    return files


def replay(log: LTXLog, image: Path, upto_txid: int | None = None) -> int:
    """Apply the log's files in order onto an empty image; return the image's checksum.

    ``apply_ltx`` checks each incremental file's pre-apply checksum against the image
    and the predicted post-apply checksum against the file's, before writing.
    """
    files = chain(log)
    if upto_txid is not None:
        assert upto_txid in {mx for _, mx, _ in files}, f"TXID {upto_txid} is not a file end"
    page_size = 0
    with image.open("w+b") as img:
        for _, mx, path in files:
            if upto_txid is not None and mx > upto_txid:
                break
            with path.open("rb") as f:
                header, trailer = ltx.apply_ltx(img, f, path=str(path))
            page_size = header.page_size
            img.seek(0)
            got = ltx.checksum_file(img, page_size, header.commit)
            assert got == trailer.post_apply_checksum, f"{path.name}: replay checksum differs"
        img.seek(0)
        return ltx.checksum_file(img, page_size) if page_size else ltx.EMPTY_DB_CHECKSUM


def replay_at(log: LTXLog, image: Path, txids: Iterable[int]) -> dict[int, list[bytes]]:
    """Apply the log file by file; the image's pages at each of ``txids`` (file ends)."""
    wanted = set(txids)
    states: dict[int, list[bytes]] = {}
    if 0 in wanted:
        states[0] = []
    with image.open("w+b") as img:
        for _, mx, path in chain(log):
            with path.open("rb") as f:
                header, _ = ltx.apply_ltx(img, f, path=str(path))
            if mx in wanted:
                img.seek(0)
                data = img.read()
                size = header.page_size
                states[mx] = [data[i : i + size] for i in range(0, len(data), size)]
    missing = wanted - set(states)
    assert not missing, f"TXIDs {sorted(missing)} do not end a file of the log"
    return states


def image_pages(image: Path, page_size: int) -> list[bytes]:
    data = image.read_bytes()
    assert len(data) % page_size == 0
    return [data[i : i + page_size] for i in range(0, len(data), page_size)]


def integrity_check(image: Path) -> str:
    """PRAGMA integrity_check of a copy of a replayed image (never the live database)."""
    copy = image.with_name(image.name + ".check")
    shutil.copyfile(image, copy)
    try:
        conn = sqlean.connect(str(copy), isolation_level=None)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)
    return "\n".join(str(r[0]) for r in rows)


def first_difference(a: Sequence[bytes], b: Sequence[bytes]) -> str:
    if len(a) != len(b):
        return f"{len(a)} pages vs {len(b)} pages"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            at = next(j for j in range(len(x)) if x[j] != y[j])
            return f"page {i + 1} differs first at byte {at}"
    return "equal"


def assert_log_matches(
    log: LTXLog, pages: Sequence[bytes], workdir: Path, *, checksum: int | None = None
) -> int:
    """Replaying the whole log yields exactly ``pages``; integrity ok; returns the TXID."""
    image = workdir / "replay.db"
    got = replay(log, image)
    assert log.pos is not None
    if not pages:
        assert got == ltx.EMPTY_DB_CHECKSUM
        return log.pos.txid
    replayed = image_pages(image, len(pages[0]))
    assert replayed == list(pages), first_difference(replayed, pages)
    assert got == pages_checksum(pages) == log.pos.post_apply_checksum
    if checksum is not None:
        assert checksum == got
    assert integrity_check(image) == "ok"
    return log.pos.txid


def assert_tailer_matches_live(tailer: DatabaseTailer, workdir: Path) -> int:
    """The tailer's log replays to the live database and its state checksum agrees."""
    pages = live_pages(tailer.path)
    txid = assert_log_matches(tailer.log, pages, workdir, checksum=tailer.state.checksum)
    assert tailer.state.txid == txid
    return txid


def snapshot_count(log: LTXLog) -> int:
    """Files that are snapshots (min TXID 1): a later snapshot removes all before it."""
    return sum(1 for mn, _, _ in log if mn == 1)


# -- processes -------------------------------------------------------------------------------


def start_writer(
    db: Path,
    *,
    seed: int,
    ops: int,
    writer_id: int = 0,
    plain: bool = False,
    pause: float = 0.0,
    autocheckpoint: bool = True,
) -> subprocess.Popen[bytes]:
    args = [sys.executable, str(WRITER), "random", str(db), "--seed", str(seed)]
    args += ["--ops", str(ops), "--id", str(writer_id), "--pause", str(pause)]
    if plain:
        args.append("--plain")
    if not autocheckpoint:
        args.append("--no-autocheckpoint")
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)


def finish(procs: Iterable[subprocess.Popen[bytes]], timeout: float = PROCESS_TIMEOUT) -> None:
    """Wait for writer processes; fail with their stderr if one failed."""
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            p.kill()
            _, err = p.communicate()
            message = f"writer {p.args!r} timed out:\n{err.decode(errors='replace')}"
            raise AssertionError(message) from exc
        assert p.returncode == 0, f"writer {p.args!r} failed:\n{err.decode(errors='replace')}"


def sync_while_running(
    tailer: DatabaseTailer,
    procs: Sequence[subprocess.Popen[bytes]],
    *,
    timeout: float = PROCESS_TIMEOUT,
    pause: float = 0.002,
) -> int:
    """Call sync() repeatedly while the processes run, then once more; return the syncs."""
    deadline = time.monotonic() + timeout
    syncs = 0
    while any(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "writers did not finish in time"
        tailer.sync()
        syncs += 1
        time.sleep(pause)
    finish(procs)
    tailer.sync()
    return syncs + 1


class SteppingWriter:
    """writer.py in serve mode: one command at a time, committed when it answers."""

    def __init__(self, db: Path, writer_id: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), "serve", str(db), "--id", str(writer_id)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )

    def do(self, command: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer == "ok", f"writer answered {answer!r} to {command!r}"

    def sql(self, statements: str) -> None:
        self.do("sql " + " ".join(statements.split()))

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=PROCESS_TIMEOUT)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def sqlite_cli(db: Path, sql: str, *, timeout: float = PROCESS_TIMEOUT) -> str:
    """Run statements through the sqlite3 command-line shell (its own process)."""
    assert SQLITE3_CLI is not None
    result = subprocess.run(
        [SQLITE3_CLI, "-bail", "-cmd", ".timeout 30000", str(db)],
        input=sql,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"sqlite3 failed ({result.returncode}): {result.stderr}"
    return result.stdout


class Runner:
    """tail_runner.py: a tailer in its own process, which a test may SIGKILL."""

    def __init__(self, db: Path, ltx_dir: Path, options: TailerOptions, log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(RUNNER),
                    str(db),
                    str(ltx_dir),
                    "--passive-frames",
                    str(options.passive_frames),
                    "--truncate-frames",
                    str(options.truncate_frames),
                ],
                stdout=subprocess.PIPE,
                stderr=out,
                text=True,
                cwd=REPO,
            )

    def wait_ready(self, timeout: float = PROCESS_TIMEOUT) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"runner said {line!r}:\n{self.log_path.read_text()}"
        assert time.monotonic() < deadline

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=PROCESS_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> None:
        """SIGTERM: a last sync and a clean close."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=PROCESS_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        assert code == 0, self.log_path.read_text()


def make_tailer(
    db: Path, ltx_dir: Path, options: TailerOptions | None = None, name: str = "db"
) -> DatabaseTailer:
    return DatabaseTailer(name, db, LTXLog(ltx_dir), options or TailerOptions())
