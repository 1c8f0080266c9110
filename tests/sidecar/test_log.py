"""The on-disk LTX log: durable appends, a chain that never breaks, crash residue resolved."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import BinaryIO

import pytest

import ltx
from sidecar.log import TEMP_PREFIX, LogError, LTXLog
from sidecar.spool import Spool

PAGE_SIZE = 512


def make_ltx(
    min_txid: int,
    max_txid: int,
    pre: int,
    post: int | None,
    pages: dict[int, bytes],
    *,
    commit: int | None = None,
    flags: int = 0,
    page_size: int = PAGE_SIZE,
) -> bytes:
    """A valid LTX file holding ``pages``; post=None lets the encoder compute a snapshot's."""
    header = ltx.Header(
        page_size=page_size,
        commit=max(pages, default=0) if commit is None else commit,
        min_txid=min_txid,
        max_txid=max_txid,
        flags=flags,
        timestamp=1_700_000_000_000 + max_txid,
        pre_apply_checksum=pre,
    )
    out = io.BytesIO()
    enc = ltx.Encoder(out, header)
    for pgno in sorted(pages):
        enc.write_page(pgno, pages[pgno])
    enc.finish(post)
    return out.getvalue()


class FakeDb:
    """A database as a page dict that emits the LTX files a tailer would write for it."""

    def __init__(self) -> None:
        self.pages: dict[int, bytes] = {}
        self.txid = 0

    def checksum(self) -> int:
        if not self.pages:
            return ltx.EMPTY_DB_CHECKSUM
        return ltx.database_checksum(sorted(self.pages.items()))

    def snapshot(self, txid: int | None = None, npages: int = 3) -> bytes:
        self.txid = self.txid + 1 if txid is None else txid
        self.pages = {p: _page(self.txid, p) for p in range(1, npages + 1)}
        return make_ltx(1, self.txid, 0, None, self.pages)

    def commit(self, *pgnos: int, count: int = 1) -> bytes:
        """One file covering ``count`` transactions that together rewrite ``pgnos``."""
        pre = self.checksum()
        first = self.txid + 1
        self.txid += count
        changed = {p: _page(self.txid, p) for p in pgnos}
        self.pages.update(changed)
        return make_ltx(first, self.txid, pre, self.checksum(), changed, commit=max(self.pages))

    def delete(self) -> bytes:
        pre = self.checksum()
        self.txid += 1
        self.pages = {}
        return make_ltx(self.txid, self.txid, pre, ltx.EMPTY_DB_CHECKSUM, {}, commit=0)


def _page(txid: int, pgno: int) -> bytes:
    return bytes([txid % 251, pgno % 251]) * (PAGE_SIZE // 2)


def names(log: LTXLog) -> list[tuple[int, int]]:
    return [(mn, mx) for mn, mx, _ in log]


def on_disk(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def replay(paths: list[Path]) -> bytes:
    """Apply files to an empty image with ltx.apply_ltx (which verifies every checksum)."""
    db = io.BytesIO()
    for p in paths:
        with open(p, "rb") as f:
            ltx.apply_ltx(db, f, path=str(p))
    return db.getvalue()


def chain(tmp_path: Path, commits: int = 4) -> tuple[LTXLog, FakeDb]:
    log, db = LTXLog(tmp_path / "ltx"), FakeDb()
    log.append(db.snapshot())
    for i in range(commits):
        log.append(db.commit(i % 3 + 1))
    return log, db


# -- appending --------------------------------------------------------------------------


def test_empty_log_has_no_position(tmp_path: Path) -> None:
    log = LTXLog(tmp_path / "dbs" / "app.db" / "ltx")
    assert log.pos is None and log.last_header is None and len(log) == 0
    assert log.files_after(0) == [] and log.files_after(1) is None
    assert (tmp_path / "dbs" / "app.db" / "ltx").is_dir()


def test_append_chain_names_files_and_tracks_position(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=3)
    assert names(log) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert on_disk(log.directory) == [ltx.format_filename(i, i) for i in range(1, 5)]
    assert log.pos == ltx.Pos(4, db.checksum())
    assert log.last_header is not None and log.last_header.max_txid == 4
    path = log.append(db.commit(2, count=3))  # a writer faster than the tailer: a range
    assert path == log.path_of(5, 7) and path.is_file()
    assert log.pos == ltx.Pos(7, db.checksum())


def test_append_accepts_a_function_writing_the_file(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=1)
    pre = db.checksum()
    db.pages[2] = _page(9, 2)
    header = ltx.Header(
        page_size=PAGE_SIZE, commit=3, min_txid=3, max_txid=3, pre_apply_checksum=pre
    )
    log.check(header)  # what a tailer calls before encoding

    def write(f: BinaryIO) -> None:
        enc = ltx.Encoder(f, header)
        enc.write_page(2, db.pages[2])
        enc.finish(db.checksum())

    assert log.append(write, verify=True) == log.path_of(3, 3)
    assert log.pos == ltx.Pos(3, db.checksum())


def test_written_file_gets_permissions_from_the_umask(tmp_path: Path) -> None:
    log, _ = chain(tmp_path, commits=0)
    mode = log.path_of(1, 1).stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_append_rejects_a_gap(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=2)
    db.txid += 1  # skip TXID 4
    with pytest.raises(LogError, match="min TXID 5 does not follow the log's last TXID 3") as exc:
        log.append(db.commit(1))
    assert exc.value.field == "min_txid"
    assert on_disk(log.directory) == [ltx.format_filename(i, i) for i in range(1, 4)]


def test_append_rejects_an_overlap(tmp_path: Path) -> None:
    log, _ = chain(tmp_path, commits=2)
    stale = FakeDb()
    stale.snapshot()
    stale.commit(1)  # TXID 2 again, from another history
    with pytest.raises(LogError, match="min TXID 3 does not follow"):
        log.append(stale.commit(2))
    assert log.pos is not None and log.pos.txid == 3


def test_append_rejects_a_wrong_pre_apply_checksum(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=1)
    db.pages[1] = _page(77, 1)  # a change the log never saw
    with pytest.raises(LogError, match=r"pre-apply checksum .* differs") as exc:
        log.append(db.commit(2))
    assert exc.value.field == "pre_apply_checksum"
    assert len(log) == 2 and not [n for n in on_disk(log.directory) if n.startswith(".")]


def test_no_checksum_files_skip_the_checksum_check(tmp_path: Path) -> None:
    log = LTXLog(tmp_path)
    log.append(make_ltx(1, 1, 0, None, {1: _page(1, 1)}, flags=ltx.FLAG_NO_CHECKSUM))
    log.append(make_ltx(2, 2, 0, None, {1: _page(2, 1)}, flags=ltx.FLAG_NO_CHECKSUM))
    assert log.pos == ltx.Pos(2, 0)


def test_empty_log_takes_only_a_snapshot(tmp_path: Path) -> None:
    log = LTXLog(tmp_path)
    with pytest.raises(LogError, match="first file must be a snapshot"):
        log.append(make_ltx(5, 5, ltx.EMPTY_DB_CHECKSUM, ltx.EMPTY_DB_CHECKSUM, {}, commit=0))
    assert on_disk(tmp_path) == []


def test_append_rejects_a_page_size_change(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=0)
    other = make_ltx(2, 2, db.checksum(), db.checksum() ^ 1, {1: b"x" * 1024}, page_size=1024)
    with pytest.raises(LogError, match="page size 1024 differs"):
        log.append(other)


def test_a_function_whose_file_breaks_the_chain_leaves_nothing(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=1)
    db.txid += 5
    data = db.commit(1)
    with pytest.raises(LogError):
        log.append(lambda f: f.write(data))
    assert on_disk(log.directory) == [ltx.format_filename(1, 1), ltx.format_filename(2, 2)]


def test_append_moves_in_a_file_that_can_be_linked_and_writes_one_that_cannot(
    tmp_path: Path,
) -> None:
    log, db = chain(tmp_path, commits=0)
    data = db.commit(3)
    with Spool(tmp_path / "incoming", max_memory=16) as spool:
        spool.write(data)
        path = log.append(lambda f: f.write(b"not used"), link=spool.link_to)
        assert path.stat().st_ino == os.fstat(spool.fileno()).st_ino  # moved, not copied
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    data = db.commit(1)
    path = log.append(lambda f: f.write(data), link=lambda name: False)
    assert path.read_bytes() == data
    assert log.pos == ltx.Pos(3, db.checksum())
    assert not (tmp_path / "incoming").exists() or os.listdir(tmp_path / "incoming") == []


def test_a_linked_file_that_breaks_the_chain_leaves_nothing(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=1)
    db.txid += 5
    with Spool(tmp_path / "incoming", max_memory=16) as spool:
        spool.write(db.commit(1))
        with pytest.raises(LogError):
            log.append(lambda f: None, link=spool.link_to)
    assert on_disk(log.directory) == [ltx.format_filename(1, 1), ltx.format_filename(2, 2)]
    assert os.listdir(tmp_path / "incoming") == []


def test_append_rejects_bytes_that_are_not_ltx(tmp_path: Path) -> None:
    log, _ = chain(tmp_path, commits=0)
    with pytest.raises(ltx.LTXError):
        log.append(b"SQLite format 3\x00" + bytes(200))
    with pytest.raises(LogError, match="too short"):
        log.append(b"LTX1")
    assert len(on_disk(log.directory)) == 1


def test_verify_rejects_a_corrupt_body_before_it_lands(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=1)
    data = bytearray(db.commit(1, 2))
    data[ltx.HEADER_SIZE + 20] ^= 0xFF  # inside the first compressed page
    with pytest.raises(ltx.LTXError):
        log.append(bytes(data), verify=True)
    assert len(on_disk(log.directory)) == 2 and log.pos is not None and log.pos.txid == 2


def test_deletion_file_is_an_incremental_file_and_the_database_can_come_back(
    tmp_path: Path,
) -> None:
    log, db = chain(tmp_path, commits=1)
    log.append(db.delete())
    assert log.pos == ltx.Pos(3, ltx.EMPTY_DB_CHECKSUM)
    assert log.last_header is not None and log.last_header.commit == 0
    log.append(db.commit(1, 2))  # recreated: from the empty database at TXID 4
    assert replay(log.files_after(0) or []) == b"".join(db.pages[p] for p in sorted(db.pages))


# -- snapshots ----------------------------------------------------------------------------


def test_snapshot_replaces_history(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=3)
    path = log.append(db.snapshot(npages=5))  # TXID 5: a state the old chain cannot explain
    assert path == log.path_of(1, 5)
    assert names(log) == [(1, 5)] and on_disk(log.directory) == [path.name]
    assert log.pos == ltx.Pos(5, db.checksum())
    assert log.files_after(0) == [path] and log.files_after(2) is None
    log.append(db.commit(4))
    assert replay(log.files_after(0) or []) == b"".join(db.pages[p] for p in sorted(db.pages))


def test_snapshot_that_does_not_move_the_log_forward_is_refused(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=2)
    before = names(log)
    with pytest.raises(LogError) as err:
        log.append(db.snapshot(txid=1, npages=2))
    assert err.value.field == "max_txid"
    assert names(log) == before


def test_snapshot_lands_before_the_old_history_is_removed(tmp_path: Path) -> None:
    """A crash between the two leaves both histories; reopening keeps the snapshot's."""
    log, db = chain(tmp_path, commits=2)  # 1, 2, 3
    old = [path for _, _, path in log]
    log.append(db.snapshot(txid=4, npages=2))
    snapshot = log.path_of(1, 4)
    # Simulate the crash: the old files are back beside the snapshot.
    for path in old:
        path.write_bytes(b"")
    reopened = LTXLog(log.directory, clean=True)
    assert names(reopened) == [(1, 4)] and snapshot.exists()
    assert not any(path.exists() for path in old)


def test_a_reader_never_deletes_the_writers_files(tmp_path: Path) -> None:
    log, _ = chain(tmp_path, commits=1)
    temp = log.directory / ".ltx.tmp-inflight"
    temp.write_bytes(b"being written")
    LTXLog(log.directory)  # a reader (ltxctl, a test) opening the log
    assert temp.exists()


# -- finding files ---------------------------------------------------------------------


def test_files_after_gives_the_files_from_a_txid_to_the_end(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=2)  # 1, 2, 3
    log.append(db.commit(1, count=3))  # 4-6
    log.append(db.commit(2))  # 7
    p = log.path_of
    assert log.files_after(0) == [p(1, 1), p(2, 2), p(3, 3), p(4, 6), p(7, 7)]
    assert log.files_after(2) == [p(3, 3), p(4, 6), p(7, 7)]
    assert log.files_after(3) == [p(4, 6), p(7, 7)]
    assert log.files_after(6) == [p(7, 7)]
    assert log.files_after(7) == []
    assert log.files_after(4) is None  # inside 4-6: that file applies only at TXID 3
    assert log.files_after(5) is None
    assert log.files_after(8) is None  # ahead of the log
    with pytest.raises(ValueError):
        log.files_after(-1)


def test_files_after_a_txid_older_than_the_first_file_is_none(tmp_path: Path) -> None:
    log, _ = chain(tmp_path, commits=4)
    old = time.time() - 3600
    for _, _, path in log:
        os.utime(path, (old, old))
    log.retain(int(time.time() * 1000), max_age_ms=60_000, keep_count=2)
    assert names(log) == [(4, 4), (5, 5)]
    assert log.files_after(0) is None and log.files_after(2) is None
    assert log.files_after(3) == [log.path_of(4, 4), log.path_of(5, 5)]


# -- restart and crash residue ---------------------------------------------------------


def test_reopened_log_has_the_same_position(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=5)
    log.append(db.commit(1, 2, count=2))
    again = LTXLog(log.directory)
    assert again.pos == log.pos == ltx.Pos(db.txid, db.checksum())
    assert again.last_header == log.last_header
    assert names(again) == names(log)
    again.append(db.commit(3))  # and the chain continues
    assert again.pos == ltx.Pos(db.txid, db.checksum())


def test_crash_before_rename_leaves_a_temp_file_that_reopen_ignores_and_removes(
    tmp_path: Path,
) -> None:
    log, db = chain(tmp_path, commits=2)
    pos = log.pos
    # The crash: the next file was written and fsynced under the temporary name, not renamed.
    (log.directory / f"{TEMP_PREFIX}abc123").write_bytes(db.commit(1))
    (log.directory / f".{ltx.format_filename(9, 9)}.tmp-xyz").write_bytes(b"half")  # atomic_write's
    again = LTXLog(log.directory, clean=True)
    assert again.pos == pos and len(again) == 3
    assert on_disk(log.directory) == [ltx.format_filename(i, i) for i in range(1, 4)]


def test_unrelated_files_are_ignored_and_kept(tmp_path: Path) -> None:
    log, _ = chain(tmp_path, commits=1)
    (log.directory / "README").write_text("notes")
    assert len(LTXLog(log.directory)) == 2 and (log.directory / "README").exists()


def test_interrupted_compaction_keeps_the_merged_file(tmp_path: Path) -> None:
    log, _db = chain(tmp_path, commits=4)  # 1..5
    log.compact_prefix(3)
    # As if the crash came after the merged file's rename, before its inputs were removed.
    for i in (2, 3):
        (log.directory / ltx.format_filename(i, i)).write_bytes(b"an old input")
    (log.directory / ltx.format_filename(1, 1)).write_bytes(FakeDb().snapshot())
    again = LTXLog(log.directory, clean=True)
    assert names(again) == [(1, 3), (4, 4), (5, 5)]
    assert on_disk(log.directory) == [log.path_of(*r).name for r in names(again)]


def test_interrupted_retention_with_a_gap_keeps_the_newest_run(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=4)
    os.unlink(log.path_of(3, 3))  # removals reached the disk out of order
    again = LTXLog(log.directory, clean=True)
    assert names(again) == [(4, 4), (5, 5)] and again.pos == ltx.Pos(5, db.checksum())
    assert not log.path_of(1, 1).exists() and not log.path_of(2, 2).exists()


def test_reopen_rejects_a_newest_file_whose_header_disagrees_with_its_name(
    tmp_path: Path,
) -> None:
    log, _db = chain(tmp_path, commits=1)
    os.replace(log.path_of(2, 2), log.path_of(2, 3))
    with pytest.raises(LogError, match="header says TXIDs 2-2"):
        LTXLog(log.directory)
    assert log.path_of(1, 1).exists()  # nothing removed on the word of a suspect file


# -- retention and compaction -----------------------------------------------------------


def _age(log: LTXLog, seconds_ago: list[float]) -> int:
    now = time.time()
    for (_, _, path), ago in zip(log, seconds_ago, strict=True):
        os.utime(path, (now - ago, now - ago))
    return int(now * 1000)


def test_retain_removes_old_files_beyond_keep_count(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=5)  # 6 files
    now = _age(log, [900, 800, 700, 600, 5, 1])
    removed = log.retain(now, max_age_ms=60_000, keep_count=3)
    assert removed == [log.path_of(1, 1), log.path_of(2, 2), log.path_of(3, 3)]
    assert names(log) == [(4, 4), (5, 5), (6, 6)]  # 4 is old but among the newest 3
    assert LTXLog(log.directory).pos == log.pos == ltx.Pos(6, db.checksum())


def test_retain_removes_a_prefix_only(tmp_path: Path) -> None:
    log, _ = chain(tmp_path, commits=5)
    now = _age(log, [900, 800, 10, 600, 500, 1])  # file 3 is young: 4 and 5 stay too
    log.retain(now, max_age_ms=60_000, keep_count=0)
    assert names(log) == [(3, 3), (4, 4), (5, 5), (6, 6)]
    assert log.files_after(2) is not None


def test_retain_never_removes_the_newest_file(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=2)
    now = _age(log, [900, 900, 900])
    log.retain(now, max_age_ms=0, keep_count=0)
    assert names(log) == [(3, 3)] and log.pos == ltx.Pos(3, db.checksum())
    assert log.retain(now, max_age_ms=0, keep_count=0) == []


def test_compact_prefix_merges_old_files_into_one_that_replays_the_same(tmp_path: Path) -> None:
    log, db = chain(tmp_path, commits=6)  # 1..7
    before = replay(log.files_after(0) or [])
    mtime = log.path_of(5, 5).stat().st_mtime_ns
    merged = log.compact_prefix(5, max_inputs=2)  # in steps of two files
    assert merged == log.path_of(1, 5)
    assert names(log) == [(1, 5), (6, 6), (7, 7)]
    assert on_disk(log.directory) == [log.path_of(*r).name for r in names(log)]
    assert merged.stat().st_mtime_ns == mtime
    assert replay(log.files_after(0) or []) == before
    assert LTXLog(log.directory).pos == log.pos == ltx.Pos(7, db.checksum())


def test_compact_prefix_of_incremental_files_keeps_them_applicable(tmp_path: Path) -> None:
    log, _ = chain(tmp_path, commits=6)  # 1..7
    full = replay(log.files_after(0) or [])
    at_2 = io.BytesIO(replay([log.path_of(1, 1), log.path_of(2, 2)]))
    old = time.time() - 3600
    for _, _, path in log:
        os.utime(path, (old, old))
    log.retain(int(time.time() * 1000), max_age_ms=0, keep_count=5)  # 3..7 remain
    log.compact_prefix(6)
    assert names(log) == [(3, 6), (7, 7)]
    assert log.header_of(3, 6).pre_apply_checksum != 0  # still an incremental file
    assert log.files_after(4) is None
    for path in log.files_after(2) or []:
        with open(path, "rb") as f:
            ltx.apply_ltx(at_2, f, path=str(path))
    assert at_2.getvalue() == full


def test_compact_prefix_refuses_the_newest_file_and_non_boundaries(tmp_path: Path) -> None:
    log, _ = chain(tmp_path, commits=3)
    with pytest.raises(LogError, match="does not end a file before the newest"):
        log.compact_prefix(4)
    with pytest.raises(LogError):
        log.compact_prefix(9)
    assert log.compact_prefix(1) is None  # one file: nothing to merge
    assert len(log) == 4


# -- durability ---------------------------------------------------------------------------


def test_a_non_durable_log_syncs_in_batches(tmp_path: Path) -> None:
    log = LTXLog(tmp_path / "ltx", durable=False)
    db = FakeDb()
    log.append(db.snapshot(1))  # snapshots are always durable
    assert log.sync() == 0
    log.append(db.commit(2))
    log.append(db.commit(3))
    assert log.unsynced_since is not None
    assert log.sync() == 2
    assert log.sync() == 0
    assert names(log) == [(1, 1), (2, 2), (3, 3)]


def test_a_damaged_newest_file_is_set_aside_at_open(tmp_path: Path) -> None:
    """A power loss can leave a renamed but unwritten (zero-filled) newest file."""
    log, _ = chain(tmp_path, commits=3)
    newest = log.path_of(4, 4)
    newest.write_bytes(bytes(newest.stat().st_size))
    reopened = LTXLog(log.directory, clean=True)
    assert names(reopened) == [(1, 1), (2, 2), (3, 3)]
    assert (log.directory.parent / "damaged" / newest.name).is_file()
    (log.directory.parent / "damaged" / newest.name).replace(newest)
    with pytest.raises(ltx.LTXError):
        LTXLog(log.directory)  # a reader that does not own the log never moves files
