"""A tailer in its own process, for crash tests: loops open/sync until killed.

Usage: python tail_runner.py DB LTX_DIR [--passive-frames N] [--truncate-frames N]

Prints ``ready`` on stdout once the tailer is open and has synced once; logs (INFO) go
to stderr. SIGTERM makes it sync once more, close the tailer and exit 0; SIGKILL is the
crash the tests are about.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sidecar.log import LTXLog
from sidecar.tailer import DatabaseTailer, TailerError, TailerOptions

_stop = False


def _on_term(signum: int, frame: FrameType | None) -> None:
    global _stop
    _stop = True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("db", type=Path)
    parser.add_argument("ltx_dir", type=Path)
    parser.add_argument("--passive-frames", type=int, default=1000)
    parser.add_argument("--truncate-frames", type=int, default=100_000)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    signal.signal(signal.SIGTERM, _on_term)
    options = TailerOptions(
        passive_frames=args.passive_frames, truncate_frames=args.truncate_frames
    )
    tailer = DatabaseTailer("db", args.db, LTXLog(args.ltx_dir), options)
    deadline = time.monotonic() + 30
    while True:
        try:
            tailer.open()
            tailer.sync()
            break
        except TailerError as exc:
            if time.monotonic() > deadline:
                raise
            logging.info("not ready: %s", exc)
            time.sleep(0.01)
    print("ready", flush=True)
    while not _stop:
        tailer.sync()
        time.sleep(0.001)
    tailer.sync()
    tailer.close()
    logging.info("stopped at TXID %d", tailer.state.txid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
