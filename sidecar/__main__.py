"""Entry point for ``python -m sidecar`` and the ``ltx-sidecar`` console script.

The replication daemon is not built yet; for now this only answers ``--version``
and ``--help`` and says so plainly otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sidecar import __version__

NOT_YET = (
    "ltx-sidecar: the replication daemon is not implemented yet; "
    "it arrives in a later milestone. Nothing was started."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltx-sidecar",
        description="Replicate one SQLite database to many regions (daemon not yet built).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print(NOT_YET, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
