"""Whole-database copies in and out of a live database: export, validate, import.

These are the local operations behind ``ltxctl export`` and ``ltxctl import``. They go
through SQLite itself (sqlean.py, the one SQLite library of the process, see DESIGN.md
choice 3), never through plain file reads of a live database:

* :func:`export_copy` copies a database with SQLite's backup API on a read-only
  connection, in one read transaction: the copy is exactly one committed state, WAL
  content included, written to a temporary file and renamed into place.
* :func:`validate_sqlite_file` decides whether an uploaded file is a SQLite database at
  all (header magic, page size, size) and whether SQLite finds it intact
  (``PRAGMA integrity_check``), with one clear reason when it is not.
* :func:`import_into` replaces a live WAL-mode database's content with the backup API in
  one write transaction, so the primary's tailer ships it as an ordinary transaction.

Every function is synchronous and may block (locks, large files): call them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlean

from ltx.apply import SQLITE_MAGIC, header_page_size
from ltx.header import is_valid_page_size
from sidecar.fileutil import fsync_dir

SQLITE_HEADER_SIZE = 100
DEFAULT_LOCK_TIMEOUT = 10.0  # seconds an import waits for the write lock (export: a read)
_INTEGRITY_MESSAGES = 3  # how many integrity_check complaints a refusal quotes


class CopyError(ValueError):
    """A copy that must not happen (bad file, page size mismatch, lock timeout): why."""


def _copy_info(page_size: int, pages: int) -> dict[str, Any]:
    return {"page_size": page_size, "pages": pages, "size": page_size * pages}


def check_header(path: Path) -> int:
    """The page size of a SQLite database file, after checking its header and size.

    Raises CopyError naming what is wrong. Reads the file with a plain descriptor, so
    call it only for files no SQLite connection of this process has open.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(SQLITE_HEADER_SIZE)
    except OSError as exc:
        raise CopyError(f"{path}: {exc.strerror}") from None
    if size == 0:
        raise CopyError("empty file, not a SQLite database")
    if not head.startswith(SQLITE_MAGIC):
        raise CopyError("not a SQLite database (no 'SQLite format 3' header)")
    if len(head) < SQLITE_HEADER_SIZE:
        raise CopyError(
            f"file is {size} bytes, shorter than the {SQLITE_HEADER_SIZE}-byte SQLite header"
        )
    page_size = header_page_size(head)
    if not is_valid_page_size(page_size):
        raise CopyError(f"invalid page size {page_size} in the SQLite header")
    if size % page_size:
        raise CopyError(
            f"file size {size} is not a multiple of the page size {page_size} (truncated?)"
        )
    return page_size


def _immutable_uri(path: Path) -> str:
    # immutable=1: no locks, no -wal or -shm files created beside a file we only read.
    return f"{path.resolve().as_uri()}?immutable=1"


def validate_sqlite_file(path: Path) -> None:
    """Raise CopyError (a ValueError) with a clear reason unless `path` is a sound database.

    Checks the header magic, the page size and the file size, refuses a file with a
    non-empty ``-wal`` beside it (its newest transactions would be left behind), then
    runs ``PRAGMA integrity_check`` on the file as it is, without creating files.
    """
    check_header(path)
    wal = Path(f"{path}-wal")
    with contextlib.suppress(FileNotFoundError):
        if wal.stat().st_size > 0:
            raise CopyError(
                f"{wal.name} beside it holds transactions not in the file: checkpoint it "
                "first (PRAGMA wal_checkpoint(TRUNCATE)) or export a copy with VACUUM INTO"
            )
    try:
        conn = sqlean.connect(_immutable_uri(path), uri=True)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    except sqlean.DatabaseError as exc:
        raise CopyError(f"SQLite cannot read it: {exc}") from None
    messages = [str(row[0]) for row in rows]
    if messages != ["ok"]:
        quoted = "; ".join(messages[:_INTEGRITY_MESSAGES])
        extra = len(messages) - _INTEGRITY_MESSAGES
        more = f" (and {extra} more)" if extra > 0 else ""
        raise CopyError(f"integrity check failed: {quoted}{more}")


def _backup(source: Any, target: Any, timeout: float) -> None:
    """source.backup(target) in one step, giving up after `timeout` seconds of busy locks.

    Python's backup loop retries a busy lock forever; the progress callback, called
    after every step, stops it by raising.
    """
    deadline = time.monotonic() + timeout

    def progress(status: int, remaining: int, total: int) -> None:
        if status in (5, 6) and time.monotonic() > deadline:  # SQLITE_BUSY, SQLITE_LOCKED
            raise TimeoutError

    try:
        source.backup(target, pages=-1, progress=progress, sleep=0.01)
    except TimeoutError:
        raise CopyError(
            f"the database stayed locked for {timeout:g}s (a long write transaction?)"
        ) from None


def export_copy(
    db_path: Path, out_path: Path, *, timeout: float = DEFAULT_LOCK_TIMEOUT
) -> dict[str, Any]:
    """Write a consistent copy of the database at `db_path` to `out_path`.

    The copy is one committed state read in one transaction (WAL included), in rollback
    journal mode so it is a single self-contained file. It appears at `out_path` only
    when complete. Returns its page size, page count and size.
    """
    if not db_path.exists():
        raise CopyError(f"{db_path}: no such database")
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.tmp-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        source = sqlean.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            target = sqlean.connect(str(tmp), isolation_level=None)
            try:
                _backup(source, target, timeout)
                target.execute("PRAGMA journal_mode=DELETE")
                page_size = int(target.execute("PRAGMA page_size").fetchone()[0])
                pages = int(target.execute("PRAGMA page_count").fetchone()[0])
            finally:
                target.close()
        finally:
            source.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(out_path)
        fsync_dir(out_path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return _copy_info(page_size, pages)


def import_into(
    db_path: Path, src_path: Path, *, timeout: float = DEFAULT_LOCK_TIMEOUT
) -> dict[str, Any]:
    """Replace the content of the database at `db_path` with the database at `src_path`.

    The whole copy is one write transaction through SQLite's backup API, so readers see
    the old content or the new, never a mix, and a WAL-mode database stays in WAL mode
    (its tailer ships the change as one transaction). A live database in WAL mode keeps
    its page size: a file with another page size is refused with the fix. A database
    that does not exist yet (or is empty) is created in WAL mode. `src_path` should have
    passed :func:`validate_sqlite_file`; it is only read.
    """
    src_page_size = check_header(src_path)
    source = sqlean.connect(_immutable_uri(src_path), uri=True)
    try:
        target = sqlean.connect(str(db_path), isolation_level=None)
        try:
            target.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            dst_pages = int(target.execute("PRAGMA page_count").fetchone()[0])
            dst_page_size = int(target.execute("PRAGMA page_size").fetchone()[0])
            wal = str(target.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal"
            if dst_pages > 0 and wal and dst_page_size != src_page_size:
                raise CopyError(
                    f"page size mismatch: the database uses {dst_page_size}-byte pages and "
                    f"the file {src_page_size}-byte pages; rebuild the file first with "
                    f"PRAGMA page_size={dst_page_size}; VACUUM;"
                )
            _backup(source, target, timeout)
            if dst_pages == 0 or not wal:
                mode = str(target.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
                if mode != "wal":
                    raise CopyError(f"cannot switch the database to WAL mode (got {mode!r})")
            page_size = int(target.execute("PRAGMA page_size").fetchone()[0])
            pages = int(target.execute("PRAGMA page_count").fetchone()[0])
        finally:
            target.close()
    finally:
        source.close()
    return _copy_info(page_size, pages)


__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "CopyError",
    "check_header",
    "export_copy",
    "import_into",
    "validate_sqlite_file",
]
