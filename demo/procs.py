"""Start the demo's sidecars and stop them, and everything they started, for sure.

Each sidecar runs in its own session, so a terminal's Ctrl-C reaches only the demo,
which then stops the nodes in order: SIGTERM to each sidecar (it forwards it to its
app), a wait, and SIGKILL for anything still in the session (Linux: found through
/proc), so nothing keeps running after the demo exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def start(
    argv: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    """Run `argv` in a new session with stdout and stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )


def session_members(sid: int) -> list[int]:
    """Pids of the processes in session `sid` (empty where /proc is not available)."""
    members = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getsid(int(entry)) == sid and not _is_zombie(int(entry)):
                    members.append(int(entry))
    return members


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 20.0) -> list[int]:
    """SIGTERM every process, wait up to `timeout` s, then SIGKILL what is left.

    Returns the pids that had to be killed (sidecars or their children).
    """
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
    killed: list[int] = []
    for proc in procs:
        if proc.poll() is None:
            killed.append(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
        for pid in session_members(proc.pid):  # the sidecar's session id is its pid
            killed.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return killed


def leftovers(procs: Sequence[subprocess.Popen[bytes]]) -> list[int]:
    """Pids still running from any of the sessions (should be none after stop_all)."""
    running = [p.pid for p in procs if p.poll() is None]
    for proc in procs:
        running += session_members(proc.pid)
    return sorted(set(running))
