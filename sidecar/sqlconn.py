"""Small helpers for the process's sqlean connections."""

from __future__ import annotations

import contextlib
from typing import Any

import sqlean


def close_quietly(conn: Any) -> None:
    """Roll back whatever is open and close, ignoring SQLite's errors: for shutdown paths
    (a connection whose database vanished, or that a failed statement left in a state)
    where there is nothing left to report."""
    if conn is None:
        return
    with contextlib.suppress(sqlean.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    with contextlib.suppress(sqlean.Error):
        conn.close()
