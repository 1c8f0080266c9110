"""Pause writes to a set of databases by holding their SQLite write locks.

A planned handoff stops the primary's apps from committing while the new primary
catches up and the lease moves: each database gets a connection of our own holding
``BEGIN IMMEDIATE``, so app writers wait in their busy handler (or fail with
"database is locked" past their busy timeout) until ``release``. Only our one SQLite
library opens these files (DESIGN.md choice 3), so closing the connections afterwards
cannot drop another connection's locks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import sqlean

from sidecar.config import Config
from sidecar.sqlconn import close_quietly

log = logging.getLogger("ltx_sidecar.pause")


class PauseError(OSError):
    """A write lock could not be taken in time; nothing stays paused."""


class WritePause:
    """Holds the write lock of each database between ``take`` and ``release`` (blocking)."""

    def __init__(self, cfg: Config, paths: list[Path]) -> None:
        self.paths = paths
        self.timeout = max(0.5, cfg.checkpoint.seal_timeout.total_seconds() * 10)
        self._conns: list[Any] = []

    def take(self) -> None:
        try:
            for path in self.paths:
                conn = sqlean.connect(
                    str(path), timeout=self.timeout, isolation_level=None, check_same_thread=False
                )
                self._conns.append(conn)
                conn.execute("BEGIN IMMEDIATE")
        except sqlean.Error as exc:
            self.release()
            raise PauseError(f"cannot pause writes to {path}: {exc}") from exc

    def release(self) -> None:
        conns, self._conns = self._conns, []
        for conn in conns:
            close_quietly(conn)

    @property
    def held(self) -> bool:
        return bool(self._conns)
