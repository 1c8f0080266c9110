"""DatabaseWorker: cancelling it leaves no task of its own behind."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from sidecar.config import load_config
from sidecar.primary import DatabaseWorker


def _make_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
    finally:
        conn.close()


async def test_a_cancelled_worker_leaves_no_pending_task(tmp_path: Path) -> None:
    # A role change cancels the workers while they wait for a change: the task waiting
    # on their wake event was left pending, and asyncio logged "Task was destroyed but it
    # is pending!" when it was collected (an ERROR line in the chaos tests' logs).
    db = tmp_path / "app.db"
    _make_db(db)
    cfg = load_config(None, {"LTX_SIDECAR_DATA_DIR": str(tmp_path / "data")})
    worker = DatabaseWorker("app.db", db, cfg)
    before = asyncio.all_tasks()
    task = asyncio.create_task(worker.run(asyncio.Event()))
    for _ in range(200):  # until it waits for a change (its first sync is done)
        await asyncio.sleep(0.01)
        if worker.tailer.state.txid > 0 and len(asyncio.all_tasks() - before) > 2:
            break
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)  # let cancelled tasks finish
    left = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert left == []
    await asyncio.to_thread(worker.tailer.close)
