"""Entry point for ``python -m sidecar`` and the ``ltx-sidecar`` console script."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from sidecar import __version__
from sidecar.config import Config, ConfigError, load_config, render_config
from sidecar.node import Node

log = logging.getLogger("ltx_sidecar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltx-sidecar",
        description="Replicate SQLite databases as LTX files, beside the app, without FUSE.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("LTX_SIDECAR_CONFIG"),
        help="TOML configuration file (default: $LTX_SIDECAR_CONFIG; none: built-in defaults)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print the effective settings (secrets masked), exit",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LTX_SIDECAR_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO)",
    )
    return parser


async def _serve(cfg: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Node(cfg).run(stop)


def _run(cfg: Config) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional in spirit
        asyncio.run(_serve(cfg))
    else:
        uvloop.run(_serve(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # one line per file event
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"ltx-sidecar: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ltx-sidecar: cannot read the configuration: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        sys.stdout.write(render_config(cfg))
        return 0
    if not cfg.databases.paths and not cfg.databases.dirs:
        print(
            "ltx-sidecar: no databases configured: set [databases] paths or dirs "
            "(or LTX_SIDECAR_DATABASES_PATHS / LTX_SIDECAR_DATABASES_DIRS)",
            file=sys.stderr,
        )
        return 2
    log.info(
        "ltx-sidecar %s starting as node %s, data in %s", __version__, cfg.node_id, cfg.data_dir
    )
    _run(cfg)
    log.info("ltx-sidecar stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
