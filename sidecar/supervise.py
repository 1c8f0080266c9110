"""Run the app as a child of the sidecar, LiteFS ``exec`` style.

The app must not start before its databases are ready: a replica's app would open a
database the sidecar has not received yet, and a primary's app would write before
the node knows it is primary. So :class:`Supervisor` waits for ``ready``, runs the
migrate command on the primary only (its failure stops startup with its status),
then starts the app and forwards SIGTERM, SIGINT and SIGHUP to it. Its exit status
becomes the sidecar's, so a platform that restarts failed processes (Fly.io,
systemd, Kubernetes) sees the app's failure.

The child runs in its own process group: a terminal's Ctrl-C reaches the sidecar
alone, which forwards it once, to the whole group (a shell wrapper's children get it
too). When the app exits, whatever it left behind in its group is killed, so nothing
outlives the sidecar. A child killed by signal N gives status 128 + N, as a shell does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence

log = logging.getLogger("ltx_sidecar.supervise")

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
EXIT_NOT_FOUND = 127  # the command does not exist (as a shell says)
EXIT_NOT_EXECUTABLE = 126  # it exists but cannot be run


class CommandError(ValueError):
    """A command line that cannot be split into words (an unclosed quote)."""


def parse_command(text: str) -> list[str]:
    """Split a configured command into words with shell quoting rules; "" gives [].

    No shell runs it: ``$VAR``, pipes and ``&&`` are plain words. Write
    ``sh -c '...'`` for those.
    """
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise CommandError(f"cannot split command {text!r}: {exc}") from None


def app_command(after_dashes: Sequence[str], configured: str) -> list[str]:
    """The app to run: the words after ``--`` on the command line win over ``exec.command``."""
    return list(after_dashes) if after_dashes else parse_command(configured)


def exit_status(returncode: int) -> int:
    """A process's exit status as a shell reports it: 128 + N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Starts the migrate command and the app, forwards signals, reports the app's status.

    ``env`` is the children's environment (default: the sidecar's own).
    ``install_signal_handlers`` makes :meth:`run` own SIGTERM, SIGINT and SIGHUP on the
    running loop while it runs; without it, the caller forwards with :meth:`forward`.
    """

    def __init__(
        self, *, env: Mapping[str, str] | None = None, install_signal_handlers: bool = True
    ) -> None:
        self.env = dict(os.environ if env is None else env)
        self.install_signal_handlers = install_signal_handlers
        self._child: asyncio.subprocess.Process | None = None
        self._stop_signal: int | None = None
        self._stopping = asyncio.Event()

    @property
    def pid(self) -> int | None:
        """The running child's pid (migrate command or app), if one runs."""
        child = self._child
        return child.pid if child is not None and child.returncode is None else None

    def forward(self, sig: int) -> None:
        """Pass `sig` to the running child's process group; before the app starts, stop."""
        child = self._child
        if child is not None and child.returncode is None:
            log.info("forwarding %s to pid %d", signal.Signals(sig).name, child.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, sig)
        if self._stop_signal is None and sig != signal.SIGHUP:
            self._stop_signal = sig
            self._stopping.set()

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the child and wait; SIGKILL its group if it outlives `timeout` seconds."""
        self.forward(signal.SIGTERM)
        child = self._child
        if child is None or child.returncode is not None:
            return
        try:
            await asyncio.wait_for(child.wait(), timeout)
        except TimeoutError:
            log.warning("pid %d ignored SIGTERM for %.0f s: killing it", child.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            await child.wait()

    async def run(
        self,
        cmd: list[str],
        *,
        migrate: list[str] | None,
        is_primary: Callable[[], bool],
        ready: Awaitable[None],
    ) -> int:
        """Wait for `ready`, migrate on the primary, run `cmd`; return the exit status.

        A signal before the app starts stops here with 128 + its number, the app never
        started. A failing migrate command's status is returned and the app not started.
        """
        if not cmd:
            raise CommandError("no command to run")
        loop = asyncio.get_running_loop()
        installed = FORWARDED_SIGNALS if self.install_signal_handlers else ()
        for signum in installed:
            loop.add_signal_handler(signum, self.forward, signum)
        try:
            if not await self._until_stopped(ready):
                return self._signal_status()
            if migrate and is_primary():
                log.info(
                    "this node is primary: running the migrate command %s", shlex.join(migrate)
                )
                status = await self._run_child(migrate, "migrate command")
                if status != 0:
                    log.error(
                        "the migrate command failed with status %d: not starting the app", status
                    )
                    return status
                if self._stop_signal is not None:
                    return self._signal_status()
            elif migrate:
                log.info("this node is a replica: skipping the migrate command")
            status = await self._run_child(cmd, "app")
            log.info("the app exited with status %d", status)
            return status
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    def _signal_status(self) -> int:
        signum = int(self._stop_signal or signal.SIGTERM)
        log.info("stopped by %s before the app started", signal.Signals(signum).name)
        return 128 + signum

    async def _until_stopped(self, ready: Awaitable[None]) -> bool:
        """Await `ready`; False if a stop signal came first."""
        ready_task = asyncio.ensure_future(ready)
        stop_task = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({ready_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_task.cancel()
        if not ready_task.done():
            ready_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready_task
            return False
        ready_task.result()  # a failed ready raises here
        return self._stop_signal is None

    async def _run_child(self, argv: list[str], what: str) -> int:
        try:
            child = await asyncio.create_subprocess_exec(
                *argv, env=self.env, start_new_session=True
            )
        except FileNotFoundError:
            log.error("cannot start the %s: %s: command not found", what, argv[0])
            return EXIT_NOT_FOUND
        except PermissionError:
            log.error("cannot start the %s: %s: permission denied", what, argv[0])
            return EXIT_NOT_EXECUTABLE
        except OSError as exc:
            log.error("cannot start the %s %s: %s", what, argv[0], exc.strerror or exc)
            return EXIT_NOT_EXECUTABLE
        self._child = child
        log.info("started the %s (pid %d): %s", what, child.pid, shlex.join(argv))
        try:
            returncode = await child.wait()
        except asyncio.CancelledError:
            await self._kill_group(child.pid)
            raise
        await self._kill_group(child.pid, quiet=True)
        return exit_status(returncode)

    @staticmethod
    async def _kill_group(pgid: int, *, quiet: bool = False) -> None:
        """SIGKILL what is left of a child's process group (nothing outlives the sidecar)."""
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if not quiet:
            log.warning("killed process group %d", pgid)
