"""File events on Linux, read only while somebody waits for them.

watchfiles (the portable fallback in sidecar.primary) reads every inotify event as it
happens. A writer committing 50,000 single-row transactions a second makes about as many
writes to its -wal file, and reading an event for each one cost that writer a third of
its rate (51,000 -> 34,000 commits/s with nothing but a watchfiles watcher on the
directory; bench/tailer_overhead measures the whole daemon). Here the descriptor is
registered with the event loop only while some worker is idle and waiting. While every
worker is busy syncing nobody reads it: the kernel merges each new event into the
identical one at the tail of its queue and wakes nobody, and the events left queued wake
the first worker that waits again, so none is lost.

The mask leaves out opens and closes: an app opening and closing connections does not
wake the sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

log = logging.getLogger("ltx_sidecar.dirwatch")

# inotify(7) flags, as in <sys/inotify.h>.
IN_MODIFY = 0x00000002
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
IN_ONLYDIR = 0x01000000

CHANGES = IN_MODIFY | IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
ARRIVALS = IN_CREATE | IN_MOVED_TO

# Called with the paths of the events read, or None when the queue overflowed (anything
# may have changed).
Deliver = Callable[[list[Path] | None], None]


def available() -> bool:
    """Whether inotify can be used here (Linux with inotify_simple installed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import inotify_simple  # noqa: F401
    except ImportError:
        return False
    return True


class DirWatch:
    """Events for the files in some directories, delivered while somebody listens."""

    def __init__(self, dirs: Iterable[Path], mask: int, deliver: Deliver) -> None:
        import inotify_simple

        self._loop = asyncio.get_running_loop()
        self._deliver = deliver
        self._inotify = inotify_simple.INotify(nonblocking=True)
        self._dirs: dict[int, Path] = {}
        for directory in dirs:
            try:
                wd = self._inotify.add_watch(directory, mask | IN_ONLYDIR)
            except OSError as exc:
                log.warning("cannot watch %s (%s): polling it instead", directory, exc)
                continue
            self._dirs[wd] = directory
        self._listeners = 0

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """Read events (and deliver them) for as long as the block runs."""
        self._listeners += 1
        if self._listeners == 1:
            self._loop.add_reader(self._inotify.fileno(), self.read)
        try:
            yield
        finally:
            self._listeners -= 1
            if self._listeners == 0 and not self._inotify.closed:
                self._loop.remove_reader(self._inotify.fileno())

    def read(self) -> None:
        """Deliver the events queued now, if any (never blocks)."""
        try:
            events = self._inotify.read(timeout=0)
        except OSError as exc:  # closed meanwhile, or an unexpected error: poll instead
            log.debug("inotify read failed: %s", exc)
            return
        if not events:
            return
        if any(e.mask & IN_Q_OVERFLOW for e in events):
            self._deliver(None)
            return
        paths = {self._dirs[e.wd] / e.name for e in events if e.wd in self._dirs and e.name}
        if paths:
            self._deliver(sorted(paths))

    def close(self) -> None:
        if self._inotify.closed:
            return
        if self._listeners:
            self._loop.remove_reader(self._inotify.fileno())
        self._inotify.close()
