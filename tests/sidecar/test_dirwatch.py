"""inotify read only while somebody listens: real files in a temporary directory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sidecar import dirwatch

pytestmark = pytest.mark.skipif(not dirwatch.available(), reason="needs Linux inotify")


class Collected:
    def __init__(self) -> None:
        self.batches: list[list[Path] | None] = []
        self.arrived = asyncio.Event()

    def __call__(self, paths: list[Path] | None) -> None:
        self.batches.append(paths)
        self.arrived.set()

    def paths(self) -> set[Path]:
        return {p for batch in self.batches if batch for p in batch}


async def settle() -> None:
    """Give the loop a few turns to run reader callbacks."""
    for _ in range(5):
        await asyncio.sleep(0.01)


async def test_events_wait_in_the_kernel_until_somebody_listens(tmp_path: Path) -> None:
    got = Collected()
    watch = dirwatch.DirWatch([tmp_path], dirwatch.CHANGES, got)
    try:
        wal = tmp_path / "app.db-wal"
        with wal.open("wb") as f:
            for _ in range(1000):  # merged into one queued event: nobody reads them
                f.write(b"x" * 100)
                f.flush()
        await settle()
        assert got.batches == []
        with watch.listening():
            await asyncio.wait_for(got.arrived.wait(), 5)
            assert got.paths() == {wal}
            got.batches.clear()
            got.arrived.clear()
            (tmp_path / "app.db").write_bytes(b"y")
            await asyncio.wait_for(got.arrived.wait(), 5)
            assert got.paths() == {tmp_path / "app.db"}
        got.batches.clear()
        wal.write_bytes(b"z")
        await settle()
        assert got.batches == []  # nobody listens again
    finally:
        watch.close()


async def test_listeners_nest_and_opening_a_file_is_no_event(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    db.write_bytes(b"")
    got = Collected()
    watch = dirwatch.DirWatch([tmp_path], dirwatch.CHANGES, got)
    try:
        with watch.listening():
            with watch.listening():
                pass
            db.open("rb").close()  # an app opening and closing a connection
            db.open("r+b").close()
            await settle()
            assert got.batches == []
            (tmp_path / "new.db").touch()  # the outer listener still reads
            await asyncio.wait_for(got.arrived.wait(), 5)
            assert got.paths() == {tmp_path / "new.db"}
    finally:
        watch.close()


async def test_arrivals_ignore_writes(tmp_path: Path) -> None:
    existing = tmp_path / "app.db-wal"
    existing.write_bytes(b"")
    got = Collected()
    watch = dirwatch.DirWatch([tmp_path], dirwatch.ARRIVALS, got)
    try:
        with watch.listening():
            existing.write_bytes(b"frames")
            await settle()
            assert got.batches == []
            (tmp_path / "tmp").write_bytes(b"")
            (tmp_path / "tmp").rename(tmp_path / "moved.db")
            await asyncio.wait_for(got.arrived.wait(), 5)
            await settle()
            assert got.paths() == {tmp_path / "tmp", tmp_path / "moved.db"}
    finally:
        watch.close()


async def test_an_overflowed_queue_says_anything_may_have_changed(tmp_path: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to create")
    got = Collected()
    watch = dirwatch.DirWatch([tmp_path], dirwatch.ARRIVALS, got)
    try:
        for i in range(limit + 10):  # distinct names: never merged
            (tmp_path / f"f{i}").touch()
        with watch.listening():
            await asyncio.wait_for(got.arrived.wait(), 5)
            await settle()
        assert None in got.batches
    finally:
        watch.close()


async def test_a_directory_that_cannot_be_watched_is_skipped(tmp_path: Path) -> None:
    got = Collected()
    watch = dirwatch.DirWatch([tmp_path / "missing", tmp_path], dirwatch.CHANGES, got)
    try:
        with watch.listening():
            (tmp_path / "a.db").touch()
            await asyncio.wait_for(got.arrived.wait(), 5)
        assert got.paths() == {tmp_path / "a.db"}
    finally:
        watch.close()
