"""The on-disk LTX log of one database: ``<data-dir>/dbs/<name>/ltx/<min>-<max>.ltx``.

The log is a contiguous chain of LTX files: each file applies at exactly the
position the previous one ends at (``min_txid == previous max_txid + 1`` and its
pre-apply checksum equal to the previous post-apply checksum). Only file names
are read at open; the newest file's header and trailer (116 bytes) give the
position. A file appears under its final name only complete and durable
(written to a temporary name, fsynced, renamed, directory fsynced), so after a
crash the directory holds whole files plus temporaries, which the owner's open
removes (``LTXLog(directory, clean=True)``: the daemon that writes the log). Any
other reader opens it without cleaning, so it never deletes a file the writer is
still making.

Crash residue and the one rule that resolves it. Appends only extend the end,
so open keeps the chain that ends at the newest file, walking back through
predecessors (the longest one when several end at the same TXID, as after a
compaction that renamed its output but did not finish removing its inputs), and
removes every other file, which such a crash left behind:

* a snapshot is renamed in first, then removes the old files: a crash in
  between leaves both histories, and the newest file (the snapshot, which needs
  no predecessor) wins; the TXIDs never go backwards;
* retention and compaction remove a prefix, oldest first; any subset of those
  removals may reach the disk, and the files cut off before a gap were on their
  way out.
* a restart (``restart_with``: a replica's log after a page-hash resync holds
  only the resync file, which starts from the replica's own pages) removes the
  old files before renaming the new one in; a crash in between leaves a shorter
  old chain or none, which the replica's reconciliation reports or resyncs.

Durability. A durable log (the default) fsyncs each file and the directory before
``append`` returns. A log opened with ``durable=False`` renames files in without
waiting for the disk and makes them durable in batches with ``sync()``: the primary's
tailer syncs before every checkpoint and at least once a second (until a checkpoint
the WAL still holds every frame a lost file was made from, and a restart makes it
again), and replicas never sync (their truth is the primary's). A process crash loses
nothing either way (the page cache survives it). A power loss can leave the newest
files missing or damaged: open moves a damaged newest file aside into ``../damaged/`` with
a log line, and the owner's reconciliation (a snapshot on the primary, a resync on a
replica) repairs the rest; never a silently wrong log. Snapshots are always durable.

One writer at a time (appends, retention, compaction are serialized by a lock);
readers (``pos``, ``files_after``, iteration) may run in other threads. A path
returned by ``files_after`` can be removed by a later snapshot, retention or
compaction before it is opened: a reader that gets FileNotFoundError asks again.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import ltx
from ltx.header import HEADER_SIZE, TRAILER_SIZE, Header, Pos, Trailer
from sidecar.fileutil import current_umask, fsync_dir, remove_files, sync_files

log = logging.getLogger(__name__)

# Temporary files are dot files holding ".tmp-" (fileutil.atomic_write's names match too).
TEMP_PREFIX = ".ltx.tmp-"


class LogError(ltx.LTXError):
    """An append that would break the chain, or a log directory that cannot be read."""


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def _parse_ends(head: bytes, tail: bytes, size: int, path: str | None) -> tuple[Header, Trailer]:
    """Header and trailer of a file from its first 116 and last 16 bytes, validated."""
    if size < HEADER_SIZE + TRAILER_SIZE:
        raise LogError(f"file is {size} bytes, too short for an LTX file", path=path, field="size")
    header = Header.from_bytes(head, path=path)
    header.validate(ltx.detect_versions(head, size)[0], path=path)
    trailer = Trailer.from_bytes(tail)
    trailer.validate(header, path=path)
    return header, trailer


def _read_ends(f: BinaryIO, path: str) -> tuple[Header, Trailer]:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    head = f.read(HEADER_SIZE + 16)
    f.seek(max(size - TRAILER_SIZE, 0))
    tail = f.read(TRAILER_SIZE)
    return _parse_ends(head, tail, size, path)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _resolve_chain(
    entries: list[tuple[int, int]],
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(chain, stray): the chain ending at the newest file, walked back; the rest is stray."""
    if not entries:
        return [], []
    by_max: dict[int, int] = {}  # max_txid -> smallest min_txid ending there
    for mn, mx in entries:
        by_max[mx] = min(mn, by_max.get(mx, mn))
    newest = max(by_max)
    chain = [(by_max[newest], newest)]
    while (prev := chain[-1][0] - 1) in by_max:
        chain.append((by_max[prev], prev))
    chain.reverse()
    kept = set(chain)
    return chain, sorted(e for e in set(entries) if e not in kept)


class LTXLog:
    """The LTX files of one database, as a contiguous chain (see the module docstring)."""

    def __init__(self, directory: Path, *, clean: bool = False, durable: bool = True) -> None:
        self.directory = Path(directory)
        self._clean = clean
        # durable=False: appends are not fsynced one by one; sync() makes them durable
        # (see "Durability" in the module docstring).
        self._durable = durable
        self._unsynced: list[Path] = []
        self.unsynced_since: float | None = None  # time.monotonic() of the oldest one
        self._writer = threading.Lock()  # serializes mutations, held across their I/O
        self._state = threading.Lock()  # guards the fields below, held briefly
        self._mins: list[int] = []
        self._maxs: list[int] = []
        self._last: tuple[Header, Trailer] | None = None
        self._mode = 0o666 & ~current_umask()
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._writer:
            self._scan()

    # -- reading -------------------------------------------------------------------

    def _scan(self) -> None:
        entries: list[tuple[int, int]] = []
        garbage: list[Path] = []
        with os.scandir(self.directory) as it:
            for entry in it:
                if is_temp_name(entry.name):
                    garbage.append(Path(entry.path))
                    continue
                try:
                    mn, mx = ltx.parse_filename(entry.name)
                except ltx.LTXError:
                    log.warning(
                        "%s: ignoring a file that is not named like an LTX file", entry.path
                    )
                    continue
                if mx < mn or mn < 1 or not entry.is_file():
                    log.warning("%s: ignoring an invalid LTX file name or non-file", entry.path)
                    continue
                entries.append((mn, mx))
        chain, stray = _resolve_chain(entries)
        last = None
        while chain:  # read the newest file before removing anything on its word
            path = self.path_of(*chain[-1])
            try:
                with open(path, "rb") as f:
                    last = _read_ends(f, str(path))
                break
            except ltx.LTXError as exc:
                if not self._clean:
                    raise
                self._set_aside(path, exc)
                entries.remove(chain[-1])
                chain, stray = _resolve_chain(entries)
        if chain and last is not None and (last[0].min_txid, last[0].max_txid) != chain[-1]:
            raise LogError(
                f"header says TXIDs {last[0].min_txid}-{last[0].max_txid}, the name "
                f"{chain[-1][0]}-{chain[-1][1]}",
                path=str(path),
                field="filename",
            )
        if stray and self._clean:
            log.warning(
                "%s: removing %d file(s) outside the chain ending at TXID %d, left by an "
                "interrupted snapshot, compaction or retention: %s",
                self.directory,
                len(stray),
                chain[-1][1],
                ", ".join(ltx.format_filename(*e) for e in stray[:5])
                + (", ..." if len(stray) > 5 else ""),
            )
        if self._clean:
            if garbage:
                log.info("%s: removing %d leftover temporary file(s)", self.directory, len(garbage))
            remove_files([*garbage, *(self.path_of(mn, mx) for mn, mx in stray)])
        with self._state:
            self._mins = [mn for mn, _ in chain]
            self._maxs = [mx for _, mx in chain]
            self._last = last

    def _set_aside(self, path: Path, exc: Exception) -> None:
        """A damaged newest file (a power loss before it was synced): keep it for a look."""
        aside = self.directory.parent / "damaged"
        aside.mkdir(exist_ok=True)
        os.replace(path, aside / path.name)
        log.warning("%s: damaged newest LTX file moved to %s: %s", path, aside, exc)

    @property
    def pos(self) -> Pos | None:
        """Max TXID and post-apply checksum of the newest file; None for an empty log."""
        last = self._last
        return None if last is None else Pos(last[0].max_txid, last[1].post_apply_checksum)

    @property
    def last_header(self) -> Header | None:
        """The newest file's header (its WAL offset, size and salts let a tailer resume)."""
        last = self._last
        return None if last is None else last[0]

    def path_of(self, min_txid: int, max_txid: int) -> Path:
        """Where the file for this range lives (whether or not it exists)."""
        return self.directory / ltx.format_filename(min_txid, max_txid)

    def header_of(self, min_txid: int, max_txid: int) -> Header:
        """Read one file's header, e.g. to compare its pre-apply checksum with a peer's."""
        path = self.path_of(min_txid, max_txid)
        with open(path, "rb") as f:
            return Header.from_bytes(f.read(HEADER_SIZE), path=str(path))

    def __len__(self) -> int:
        return len(self._mins)

    def __iter__(self) -> Iterator[tuple[int, int, Path]]:
        with self._state:
            pairs = list(zip(self._mins, self._maxs, strict=True))
        return iter([(mn, mx, self.path_of(mn, mx)) for mn, mx in pairs])

    def files_after(self, txid: int) -> list[Path] | None:
        """The files that take a database at ``txid`` to the end of the log, in order.

        [] when ``txid`` is the log's last TXID; None when the log cannot do it:
        ``txid`` is ahead of the log, older than its first file, or inside a
        (compacted) file, since an LTX file applies only at exactly min_txid - 1.
        Only TXIDs are compared: check the first file's pre-apply checksum
        (``header_of``) against the reader's checksum to detect divergence.
        """
        if txid < 0:
            raise ValueError(f"txid must not be negative, got {txid}")
        with self._state:
            last = self._maxs[-1] if self._maxs else 0
            if txid >= last:
                return [] if txid == last else None
            i = bisect.bisect_left(self._mins, txid + 1)
            if i == len(self._mins) or self._mins[i] != txid + 1:
                return None
            pairs = list(zip(self._mins[i:], self._maxs[i:], strict=True))
        return [self.path_of(mn, mx) for mn, mx in pairs]

    # -- appending -----------------------------------------------------------------

    def check(self, header: Header) -> None:
        """Raise LogError unless a file with this header may be appended now.

        A snapshot may follow anything, as long as it moves the log forward (its
        max TXID past the last one: TXIDs never go backwards). An incremental file (a deletion file
        is one, with commit 0) must start right after the last file, with a
        pre-apply checksum equal to its post-apply checksum unless either file
        has FLAG_NO_CHECKSUM, and the same page size (unless the last file was
        a deletion). An empty log takes only a snapshot.
        """
        name = ltx.format_filename(header.min_txid, header.max_txid)
        last = self._last
        if header.is_snapshot:
            if last is not None and header.max_txid <= last[0].max_txid:
                raise LogError(
                    f"a snapshot must move the log forward: max TXID {header.max_txid} is not "
                    f"past the log's last TXID {last[0].max_txid}",
                    path=name,
                    field="max_txid",
                )
            return
        if last is None:
            raise LogError(
                f"the log is empty: its first file must be a snapshot, not TXIDs "
                f"{header.min_txid}-{header.max_txid}",
                path=name,
                field="min_txid",
            )
        prev, trailer = last
        if header.min_txid != prev.max_txid + 1:
            raise LogError(
                f"min TXID {header.min_txid} does not follow the log's last TXID "
                f"{prev.max_txid} (want {prev.max_txid + 1})",
                path=name,
                field="min_txid",
            )
        if (
            not header.no_checksum
            and not prev.no_checksum
            and header.pre_apply_checksum != trailer.post_apply_checksum
        ):
            raise LogError(
                f"pre-apply checksum {header.pre_apply_checksum:016x} differs from the log's "
                f"post-apply checksum {trailer.post_apply_checksum:016x} at TXID {prev.max_txid}",
                path=name,
                field="pre_apply_checksum",
            )
        if prev.commit != 0 and header.page_size != prev.page_size:
            raise LogError(
                f"page size {header.page_size} differs from the log's {prev.page_size}",
                path=name,
                field="page_size",
            )

    def append(
        self,
        data: bytes | memoryview | Callable[[BinaryIO], object],
        *,
        verify: bool = False,
        link: Callable[[str], bool] | None = None,
    ) -> Path:
        """Add one LTX file durably and atomically; return its path.

        ``data`` is the file's bytes or a function that writes them to a binary
        file (an ``ltx.Encoder`` target). ``link``, when given, is tried first: a
        function that gives an existing file with the same bytes the name it is passed
        (``Spool.link_to``), so a large received file is moved in, not copied; when it
        answers False, ``data`` is written. Header and trailer are validated and
        the chain rules of ``check`` enforced (call ``check`` first to fail
        before encoding); ``verify=True`` also decodes the whole file.

        A snapshot replaces history: every older file is removed, because the
        old chain no longer leads to the state the snapshot starts. The removal
        is made durable before the snapshot's rename, so a crash in between
        leaves the old files (or some of them, oldest gone first) and no
        snapshot, never a mix of both histories.
        """
        with self._writer:
            if isinstance(data, bytes | bytearray | memoryview):
                head, tail = bytes(data[: HEADER_SIZE + 16]), bytes(data[-TRAILER_SIZE:])
                header, trailer = _parse_ends(head, tail, len(data), None)
                self.check(header)  # before writing a byte
                tmp = self._write_bytes(data)
            elif link is not None and (linked := self._link_temp(link)) is not None:
                tmp, header, trailer = linked
            else:
                tmp, header, trailer = self._write_temp(data)
            if verify:
                self._verify(tmp, trailer)
            durable = self._durable or header.is_snapshot
            try:
                if durable:
                    _fsync_path(tmp)
                final = self.path_of(header.min_txid, header.max_txid)
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            if durable:
                fsync_dir(self.directory)
            else:
                self._unsynced.append(final)
                if self.unsynced_since is None:
                    self.unsynced_since = time.monotonic()
            if header.is_snapshot and self._mins:
                self._drop_prefix(len(self._mins))  # after the snapshot is durable
            with self._state:
                self._mins.append(header.min_txid)
                self._maxs.append(header.max_txid)
                self._last = (header, trailer)
            return final

    def restart_with(self, data: bytes | Callable[[BinaryIO], object]) -> Path:
        """Replace the whole log with one file; return its path.

        For a replica after a resync (docs/protocol.md §7.3): the answer follows from
        the replica's own pages, not from the old chain, and its TXID may be below the
        old log's (a replica that was ahead). Any valid file is taken, snapshot or not;
        a later append must follow it. The file is written and fsynced under a
        temporary name first; then every old file is removed, oldest first, durably;
        only then is the new one renamed in. A crash in between leaves a shorter old
        chain or an empty log (the replica then resyncs or takes a snapshot), never
        the old history shadowing the new file (they may even share a name).
        """
        with self._writer:
            tmp, header, trailer = self._write_temp(data, check=False)
            try:
                _fsync_path(tmp)
                if self._mins:
                    self._drop_prefix(len(self._mins))
                final = self.path_of(header.min_txid, header.max_txid)
                os.replace(tmp, final)
                fsync_dir(self.directory)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            with self._state:
                self._mins = [header.min_txid]
                self._maxs = [header.max_txid]
                self._last = (header, trailer)
            return final

    def _temp_name(self) -> str:
        # One writer at a time (self._writer) and one process per log, so a fixed name
        # will do; a random one (mkstemp) costs more than writing a small file.
        return str(self.directory / f"{TEMP_PREFIX}{os.getpid()}")

    def _write_bytes(self, data: bytes | bytearray | memoryview) -> str:
        """Write a whole file held in memory under the temporary name: a few system
        calls, where a file object costs a dozen (most files are one small transaction)."""
        tmp = self._temp_name()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data).cast("B")
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, self._mode)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp

    def _link_temp(self, link: Callable[[str], bool]) -> tuple[str, Header, Trailer] | None:
        """Have ``link`` name its file with the temporary name; its header and trailer
        (checked), or None when it could not."""
        tmp = self._temp_name()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by a failed append: a link needs the name free
        if not link(tmp):
            return None
        try:
            with open(tmp, "rb") as f:
                header, trailer = _read_ends(f, tmp)
            self.check(header)
            os.chmod(tmp, self._mode)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp, header, trailer

    def _verify(self, tmp: str, trailer: Trailer) -> None:
        try:
            with open(tmp, "rb") as f:
                if ltx.open_decoder(f, path=tmp).verify() != trailer:
                    raise LogError("trailer changed while verifying", path=tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _write_temp(
        self,
        data: bytes | Callable[[BinaryIO], object],
        *,
        check: bool = True,
    ) -> tuple[str, Header, Trailer]:
        """Write a file under the writer's temporary name; its header and trailer.

        The file is removed if anything fails; the caller renames it in (or removes it).
        """
        tmp = self._temp_name()
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w+b") as f:
                if isinstance(data, bytes | bytearray | memoryview):
                    f.write(data)
                else:
                    data(f)
                f.flush()
                header, trailer = _read_ends(f, tmp)
                if check:
                    self.check(header)
                os.fchmod(f.fileno(), self._mode)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp, header, trailer

    def sync(self) -> int:
        """Make every append so far durable (a non-durable log); return how many."""
        with self._writer:
            pending, self._unsynced = self._unsynced, []
            self.unsynced_since = None
            sync_files(pending, self.directory)
            return len(pending)

    def _drop_prefix(self, count: int) -> list[Path]:
        """Remove the oldest ``count`` files, oldest first, and fsync the directory."""
        with self._state:
            paths = [
                self.path_of(mn, mx)
                for mn, mx in zip(self._mins[:count], self._maxs[:count], strict=True)
            ]
        try:
            removed = remove_files(paths)
            gone = count
        except BaseException:
            gone = sum(1 for p in paths if not p.exists())  # a prefix: removal is in order
            raise
        finally:
            with self._state:
                del self._mins[:gone], self._maxs[:gone]
                if not self._mins:
                    self._last = None
        return removed

    # -- retention -----------------------------------------------------------------

    def retain(self, now_ms: int, max_age_ms: int, keep_count: int) -> list[Path]:
        """Remove the oldest files that are past ``max_age_ms`` and not among the newest
        ``keep_count``; return the paths removed.

        Only a prefix is removed, so the chain stays contiguous, and the newest
        file always stays (it holds the log's position). A file's age is
        ``now_ms`` minus its mtime: the time this node wrote it, present for
        every file, read with a stat rather than an open, and independent of
        the clock of the node that made the transaction (the header timestamp).
        """
        with self._writer:
            with self._state:
                candidates = list(zip(self._mins, self._maxs, strict=True))
            candidates = candidates[: max(len(candidates) - max(keep_count, 1), 0)]
            count = 0
            for mn, mx in candidates:
                try:
                    mtime_ms = self.path_of(mn, mx).stat().st_mtime_ns // 1_000_000
                except FileNotFoundError:
                    mtime_ms = 0  # already gone: drop it from the chain too
                if now_ms - mtime_ms <= max_age_ms:
                    break
                count += 1
            return self._drop_prefix(count) if count else []

    def compact_prefix(self, upto_txid: int, *, max_inputs: int = 256) -> Path | None:
        """Merge the files from the first through the one ending at ``upto_txid`` into one.

        Keeps one older catch-up file instead of many. The newest file is never
        merged (its header holds the WAL position a tailer resumes from), so
        ``upto_txid`` must end a file before the last. Runs of more than
        ``max_inputs`` files are merged in steps, each crash-safe on its own:
        the output is renamed in place, then the inputs are removed (open
        resolves an interruption, see the module docstring). The output keeps
        the last input's mtime so retention ages it like the files it holds.
        Returns the merged file's path, or None when there was nothing to merge.
        """
        if max_inputs < 2:
            raise ValueError(f"max_inputs must be at least 2, got {max_inputs}")
        with self._writer:
            with self._state:
                maxs = list(self._maxs)
            if upto_txid not in maxs[:-1]:
                raise LogError(
                    f"TXID {upto_txid} does not end a file before the newest one",
                    path=str(self.directory),
                    field="upto_txid",
                )
            merged: Path | None = None
            while (n := maxs.index(upto_txid) + 1) > 1:
                merged = self._compact_first(min(n, max_inputs))
                with self._state:
                    maxs = list(self._maxs)
            return merged

    def _compact_first(self, n: int) -> Path:
        with self._state:
            pairs = list(zip(self._mins[:n], self._maxs[:n], strict=True))
        inputs = [self.path_of(mn, mx) for mn, mx in pairs]
        final = self.path_of(pairs[0][0], pairs[-1][1])
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=TEMP_PREFIX)
        try:
            with contextlib.ExitStack() as stack, os.fdopen(fd, "w+b") as out:
                decoders = []
                for p in inputs:
                    f = stack.enter_context(open(p, "rb"))
                    decoders.append(ltx.open_decoder(f, path=str(p)))
                no_checksum = any(d.header.no_checksum for d in decoders)
                ltx.compact(decoders, out, flags=ltx.FLAG_NO_CHECKSUM if no_checksum else 0)
                out.flush()
                os.fchmod(out.fileno(), self._mode)
                os.fsync(out.fileno())
            mtime = inputs[-1].stat().st_mtime_ns
            os.utime(tmp, ns=(mtime, mtime))
            os.replace(tmp, final)
            fsync_dir(self.directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # The output now stands for the inputs: drop them from the chain, then the disk.
        with self._state:
            self._mins[:n] = [pairs[0][0]]
            self._maxs[:n] = [pairs[-1][1]]
        remove_files(p for p in inputs if p != final)
        return final


__all__ = ["TEMP_PREFIX", "LTXLog", "LogError", "is_temp_name"]
