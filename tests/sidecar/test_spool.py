"""The replica's receive buffer: in memory while small, an unnamed file beyond, which a
large received file (a snapshot) leaves by being linked into the LTX log."""

from __future__ import annotations

import os
from pathlib import Path

from sidecar.spool import Spool


def test_a_small_file_stays_in_memory_and_cannot_be_linked(tmp_path: Path) -> None:
    with Spool(tmp_path / "in", max_memory=100) as spool:
        spool.write(b"a" * 60)
        spool.write(b"b" * 40)
        assert not spool.on_disk
        assert not spool.link_to(str(tmp_path / "named"))
        spool.seek(0)
        assert spool.read() == b"a" * 60 + b"b" * 40
    assert not (tmp_path / "named").exists()


def test_a_large_file_moves_to_an_unnamed_file_that_a_link_names(tmp_path: Path) -> None:
    directory = tmp_path / "in"
    spool = Spool(directory, max_memory=100)
    spool.write(b"a" * 60)
    spool.write(b"b" * 60)  # past the limit: the first 60 bytes move to disk with it
    assert spool.on_disk and spool.tell() == 120
    assert os.listdir(directory) == []  # nothing to clean up after a crash
    named = directory / "named"
    assert spool.link_to(str(named))
    assert not spool.link_to(str(named))  # the name is taken: nothing changes
    spool.seek(0)
    assert spool.read() == b"a" * 60 + b"b" * 60  # still readable after the link
    assert named.stat().st_ino == os.fstat(spool.fileno()).st_ino
    spool.close()
    assert spool.closed
    assert named.read_bytes() == b"a" * 60 + b"b" * 60
    assert os.listdir(directory) == ["named"]


def test_a_file_on_disk_is_removed_when_closed_unless_linked(tmp_path: Path) -> None:
    directory = tmp_path / "in"
    with Spool(directory, max_memory=10) as spool:
        spool.write(os.urandom(1000))
        assert spool.on_disk
    assert os.listdir(directory) == []
