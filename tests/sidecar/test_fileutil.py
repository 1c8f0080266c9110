"""fileutil's replacements: atomic for readers, nothing left behind."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from sidecar.fileutil import atomic_write, replace_unsynced


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_replace_unsynced_puts_the_new_file_in_place_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    target = tmp_path / "db-pos"
    target.write_bytes(b"old")
    new = _write(tmp_path / ".db-pos.tmp", b"new")
    inode = os.stat(new).st_ino

    replace_unsynced(new, target)

    assert target.read_bytes() == b"new"
    assert target.stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db-pos"]


def test_replace_unsynced_creates_a_missing_target(tmp_path: Path) -> None:
    target = tmp_path / "db-pos"
    replace_unsynced(_write(tmp_path / ".tmp", b"first"), target)
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db-pos"]


def test_replace_unsynced_without_a_source_raises_and_keeps_the_target(tmp_path: Path) -> None:
    target = tmp_path / "db-pos"
    target.write_bytes(b"kept")
    with pytest.raises(FileNotFoundError):
        replace_unsynced(str(tmp_path / "missing"), target)
    assert target.read_bytes() == b"kept"


def test_a_reader_always_finds_a_whole_file_while_it_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "db-pos"
    target.write_bytes(b"%08d" % 0)
    stop = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(target.read_bytes())
            except BaseException as exc:
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 2000):
            replace_unsynced(_write(tmp_path / ".tmp", b"%08d" % i), target)
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert all(len(data) == 8 for data in seen)
    assert [int(x) for x in seen] == sorted(int(x) for x in seen)  # never backwards
    assert target.read_bytes() == b"%08d" % 1999


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_keeps_the_mode_and_leaves_only_the_target(
    tmp_path: Path, durable: bool
) -> None:
    target = tmp_path / "page1"
    target.write_bytes(b"old")
    target.chmod(0o640)
    with atomic_write(target, durable=durable) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page1"]


def test_atomic_write_that_raises_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "page1"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target, durable=False) as f:
        f.write(b"half")
        raise RuntimeError("stop")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page1"]
