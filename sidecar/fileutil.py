"""Small, careful file operations: atomic replacement and durable removal.

A file written with :func:`atomic_write` is either absent or complete at its
final path, never half written: the bytes go to a temporary file in the same
directory, which is flushed, fsynced and renamed over the target, and then the
directory itself is fsynced so the rename survives a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO


def current_umask() -> int:
    """The process umask.

    Linux reports it in /proc/self/status; elsewhere it can only be read by
    setting it, which is set straight back (a brief race with other threads).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that creations, renames and removals in it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], *, mode: int | None = None, durable: bool = True
) -> Iterator[BinaryIO]:
    """Yield a binary file whose contents replace ``path`` atomically on success.

    ``durable=False`` skips the fsyncs: still atomic for readers and across a process
    crash, but a power loss may leave the old file (or, on some file systems, an empty
    one); for files that are a view of something durable elsewhere.

    ``mode`` is the permission of the new file. By default an existing file's
    permissions are kept, and a new file gets ``0o666`` less the umask, as
    ``open()`` would give it. If the block raises, the temporary file is
    removed and ``path`` is left as it was.
    """
    target = Path(path)
    directory = target.parent
    if mode is None:
        try:
            mode = target.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~current_umask()
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.tmp-")
    except OSError as exc:  # name the file the caller asked for, not the temporary
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode)
            if durable:
                os.fsync(f.fileno())
        if durable:
            os.replace(tmp_name, target)
        else:
            replace_unsynced(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if durable:
        fsync_dir(directory)


def _load_libc(name: str) -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn: Callable[..., int] = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    return fn


_syncfs = _load_libc("syncfs")
_renameat2 = _load_libc("renameat2")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def replace_unsynced(source: str, target: str | os.PathLike[str]) -> None:
    """``os.replace(source, target)`` for a file that was not fsynced, without its cost.

    ext4 (auto_da_alloc, the default) starts writing the new file's unallocated data
    before a rename over an existing file returns: measured 90 to 350 us per replace
    of a 34-byte file, against 5 to 15 us for this. Swapping the two names atomically
    (renameat2 RENAME_EXCHANGE) and unlinking the old file does not trigger it, and a
    reader still sees the old file or the new one, never neither. Where the swap is
    not available (not Linux, a file system without it, no target yet), a plain replace.
    """
    if _renameat2 is not None:
        src, dst = os.fsencode(source), os.fsencode(target)
        if _renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_EXCHANGE) == 0:
            os.unlink(source)  # the old file, now under the temporary name
            return
    os.replace(source, target)


def sync_files(paths: Sequence[str | os.PathLike[str]], directory: str | os.PathLike[str]) -> None:
    """Make files (and their names in `directory`) durable.

    On Linux one syncfs(2) of the file system does it for any number of files; an fsync
    per file costs as much per file as the whole batch (measured: 0.19 ms each, for
    files of a few hundred bytes). Elsewhere, an fsync per file and one of the directory.
    """
    if not paths:
        return
    if _syncfs is not None:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            if _syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # removed since (retention, a snapshot)
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(directory)


_held: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> descriptor, never closed
_held_lock = threading.Lock()


def held_fd(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor on `path` that stays open for the life of the process.

    POSIX record locks belong to the process: closing *any* descriptor on a file drops
    every lock the process holds on it, including those SQLite connections hold on the
    database and its -shm (DESIGN.md choice 3). Raw reads of those files therefore go
    through one descriptor per file that is never closed; the file is identified by its
    inode, so a database deleted and created again gets a new one. (Closing the
    descriptor of a file SQLite does not have open would be harmless, but we cannot know
    that of a file some other role of this process may open later.)
    """
    st = os.stat(path)
    key = (st.st_dev, st.st_ino)
    with _held_lock:
        fd = _held.get(key)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            fst = os.fstat(fd)  # the file may have been replaced since the stat
            _held[(fst.st_dev, fst.st_ino)] = fd
        return fd


def release_held(dev_ino: tuple[int, int]) -> None:
    """Close the held descriptor of a file that is gone (deleted or replaced), once no
    SQLite connection of this process has it open: its locks no longer matter, and an
    open descriptor would keep a deleted file's disk space."""
    with _held_lock:
        fd = _held.pop(dev_ino, None)
    if fd is not None:
        os.close(fd)


def read_head(path: str | os.PathLike[str], size: int) -> bytes:
    """The first `size` bytes of a file, through its held descriptor (see held_fd)."""
    return os.pread(held_fd(path), size, 0)


def remove_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Remove each existing path and fsync the directories touched; return those removed."""
    removed: list[Path] = []
    for p in map(Path, paths):
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    for directory in {p.parent for p in removed}:
        fsync_dir(directory)
    return removed


__all__ = [
    "atomic_write",
    "current_umask",
    "fsync_dir",
    "held_fd",
    "read_head",
    "release_held",
    "remove_files",
    "replace_unsynced",
]
