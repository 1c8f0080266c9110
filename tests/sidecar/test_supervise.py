"""The app supervisor with real child processes (Python scripts run by this interpreter)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.supervise import (
    CommandError,
    Supervisor,
    app_command,
    exit_status,
    parse_command,
)

WAIT = 30.0  # generous: a loaded 2-core machine starts Python slowly


def script(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


# Writes "<tmp>/started", then waits for SIGTERM, records it and exits 7.
TRAPS_SIGTERM = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def on_term(sig, frame):
    (out / "got").write_text(signal.Signals(sig).name)
    sys.exit(7)
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGHUP, on_term)
(out / "started").write_text("yes")
while True:
    time.sleep(0.05)
"""

# Writes "<tmp>/started" and sleeps; killed by the default SIGTERM action.
SLEEPS = """
import pathlib, sys, time
(pathlib.Path(sys.argv[1]) / "started").write_text("yes")
time.sleep(600)
"""


async def ready_now() -> None:
    return None


async def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.02)


async def supervise(
    cmd: list[str],
    *,
    migrate: list[str] | None = None,
    is_primary: Callable[[], bool] = lambda: True,
    supervisor: Supervisor | None = None,
) -> int:
    sup = supervisor or Supervisor(install_signal_handlers=False)
    return await asyncio.wait_for(
        sup.run(cmd, migrate=migrate, is_primary=is_primary, ready=ready_now()), WAIT
    )


@pytest.mark.parametrize("status", [0, 3, 255])
async def test_app_exit_status_is_passed_through(status: int) -> None:
    assert await supervise(script(f"raise SystemExit({status})")) == status


async def test_app_gets_its_environment() -> None:
    sup = Supervisor(env={**os.environ, "APP_SETTING": "42"}, install_signal_handlers=False)
    code = "import os, sys; sys.exit(0 if os.environ['APP_SETTING'] == '42' else 1)"
    assert await supervise(script(code), supervisor=sup) == 0


async def test_sigterm_to_the_sidecar_reaches_the_app(tmp_path: Path) -> None:
    sup = Supervisor()  # installs handlers on this loop: a real signal to this process
    run = asyncio.create_task(supervise(script(TRAPS_SIGTERM, str(tmp_path)), supervisor=sup))
    await wait_for_file(tmp_path / "started")
    os.kill(os.getpid(), signal.SIGTERM)
    assert await run == 7
    assert (tmp_path / "got").read_text() == "SIGTERM"


async def test_sighup_is_forwarded_too(tmp_path: Path) -> None:
    sup = Supervisor()
    run = asyncio.create_task(supervise(script(TRAPS_SIGTERM, str(tmp_path)), supervisor=sup))
    await wait_for_file(tmp_path / "started")
    os.kill(os.getpid(), signal.SIGHUP)
    assert await run == 7
    assert (tmp_path / "got").read_text() == "SIGHUP"


async def test_app_killed_by_a_signal_gives_128_plus_the_signal(tmp_path: Path) -> None:
    sup = Supervisor(install_signal_handlers=False)
    run = asyncio.create_task(supervise(script(SLEEPS, str(tmp_path)), supervisor=sup))
    await wait_for_file(tmp_path / "started")
    sup.forward(signal.SIGTERM)
    assert await run == 128 + signal.SIGTERM


async def test_stop_kills_an_app_that_ignores_sigterm(tmp_path: Path) -> None:
    ignores = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + SLEEPS
    sup = Supervisor(install_signal_handlers=False)
    run = asyncio.create_task(supervise(script(ignores, str(tmp_path)), supervisor=sup))
    await wait_for_file(tmp_path / "started")
    await sup.stop(timeout=0.5)
    assert await run == 128 + signal.SIGKILL


async def test_the_app_waits_for_ready(tmp_path: Path) -> None:
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sup = Supervisor(install_signal_handlers=False)
    cmd = script(SLEEPS, str(tmp_path))
    run = asyncio.create_task(sup.run(cmd, migrate=None, is_primary=lambda: True, ready=ready))
    await asyncio.sleep(0.3)
    assert not (tmp_path / "started").exists()
    assert sup.pid is None
    ready.set_result(None)
    await wait_for_file(tmp_path / "started")
    await sup.stop()
    assert await asyncio.wait_for(run, WAIT) == 128 + signal.SIGTERM


async def test_a_signal_before_ready_stops_without_starting_the_app(tmp_path: Path) -> None:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sup = Supervisor()
    cmd = script(SLEEPS, str(tmp_path))
    run = asyncio.create_task(sup.run(cmd, migrate=None, is_primary=lambda: True, ready=never))
    await asyncio.sleep(0.1)
    os.kill(os.getpid(), signal.SIGINT)
    assert await asyncio.wait_for(run, WAIT) == 128 + signal.SIGINT
    assert never.cancelled()
    assert not (tmp_path / "started").exists()


# The migrate command leaves a marker; the app exits 0 only if the marker exists.
MIGRATE = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('migrated')"
APP_CHECKS_MIGRATED = """
import pathlib, sys
marker, ran = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ran.write_text("app ran")
sys.exit(0 if marker.exists() else 9)
"""


async def test_migrate_runs_on_the_primary_before_the_app(tmp_path: Path) -> None:
    marker, ran = tmp_path / "marker", tmp_path / "ran"
    status = await supervise(
        script(APP_CHECKS_MIGRATED, str(marker), str(ran)),
        migrate=script(MIGRATE, str(marker)),
        is_primary=lambda: True,
    )
    assert status == 0
    assert marker.read_text() == "migrated"


async def test_migrate_does_not_run_on_a_replica(tmp_path: Path) -> None:
    marker, ran = tmp_path / "marker", tmp_path / "ran"
    status = await supervise(
        script(APP_CHECKS_MIGRATED, str(marker), str(ran)),
        migrate=script(MIGRATE, str(marker)),
        is_primary=lambda: False,
    )
    assert status == 9  # the app ran and found no marker
    assert ran.exists() and not marker.exists()


async def test_a_failing_migrate_stops_startup_with_its_status(tmp_path: Path) -> None:
    marker, ran = tmp_path / "marker", tmp_path / "ran"
    status = await supervise(
        script(APP_CHECKS_MIGRATED, str(marker), str(ran)),
        migrate=script("raise SystemExit(4)"),
        is_primary=lambda: True,
    )
    assert status == 4
    assert not ran.exists()


async def test_a_missing_command_gives_127(tmp_path: Path) -> None:
    assert await supervise([str(tmp_path / "no-such-program")]) == 127


async def test_a_missing_migrate_command_stops_startup(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    status = await supervise(
        script(APP_CHECKS_MIGRATED, str(tmp_path / "marker"), str(ran)),
        migrate=[str(tmp_path / "no-such-migrate")],
    )
    assert status == 127
    assert not ran.exists()


async def test_processes_the_app_left_behind_are_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "orphan.pid"
    leaves_orphan = (
        "import subprocess, sys, pathlib\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "pathlib.Path(sys.argv[1]).write_text(str(p.pid))\n"
    )
    assert await supervise(script(leaves_orphan, str(pidfile))) == 0
    orphan = int(pidfile.read_text())
    deadline = time.monotonic() + WAIT
    while _alive(orphan):
        assert time.monotonic() < deadline, "the app's child outlived it"
        await asyncio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead, waiting for its parent (init) to reap it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_parse_command_splits_like_a_shell() -> None:
    assert parse_command("python app.py --db '/data/my app.db'") == [
        "python",
        "app.py",
        "--db",
        "/data/my app.db",
    ]
    assert parse_command("") == []
    assert parse_command("   ") == []


def test_parse_command_rejects_an_unclosed_quote() -> None:
    with pytest.raises(CommandError, match="cannot split command"):
        parse_command("python 'app.py")


def test_words_after_dashes_win_over_the_configured_command() -> None:
    assert app_command(["./serve", "-v"], "python app.py") == ["./serve", "-v"]
    assert app_command([], "python app.py") == ["python", "app.py"]


def test_exit_status_maps_signals_like_a_shell() -> None:
    assert exit_status(0) == 0
    assert exit_status(2) == 2
    assert exit_status(-signal.SIGKILL) == 137


async def test_an_empty_command_is_an_error() -> None:
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    ready.set_result(None)
    with pytest.raises(CommandError):
        await Supervisor(install_signal_handlers=False).run(
            [], migrate=None, is_primary=lambda: True, ready=ready
        )
