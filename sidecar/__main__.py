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
from sidecar.logsetup import setup_logging
from sidecar.node import Node
from sidecar.supervise import CommandError, Supervisor, app_command, parse_command

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
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default: log.level in the config, INFO)",
    )
    return parser


async def _serve(cfg: Config, command: list[str]) -> int:
    """Run the node; with an app command, supervise the app and exit with its status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    node = Node(cfg)
    if not command:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await node.run(stop)
        return 0
    supervisor = Supervisor()  # owns SIGTERM, SIGINT and SIGHUP: forwards them to the app
    state = node.state

    async def ready() -> None:
        await state.wait_for(
            lambda: state.is_primary or (state.role == "replica" and state.ready), None
        )

    node_task = asyncio.create_task(node.run(stop), name="node")
    app = asyncio.create_task(
        supervisor.run(
            command,
            migrate=parse_command(cfg.exec.migrate) or None,
            is_primary=lambda: state.is_primary,
            ready=ready(),
        ),
        name="app",
    )
    await asyncio.wait({node_task, app}, return_when="FIRST_COMPLETED")
    if node_task.done() and not app.done():
        log.error("the sidecar stopped: stopping the app")
        await supervisor.stop()
    status = await app
    stop.set()
    await node_task
    return status


def _run(cfg: Config, command: list[str]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional in spirit
        return asyncio.run(_serve(cfg, command))
    return uvloop.run(_serve(cfg, command))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] = []
    if "--" in argv:  # ltx-sidecar --config F -- CMD ARGS: the app to supervise
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    setup_logging("text", args.log_level or "INFO")
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"ltx-sidecar: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ltx-sidecar: cannot read the configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.format, args.log_level or cfg.log.level)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # one line per file event
    try:
        command = app_command(tail, cfg.exec.command)
    except CommandError as exc:
        print(f"ltx-sidecar: invalid app command: {exc}", file=sys.stderr)
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
    status = _run(cfg, command)
    log.info("ltx-sidecar stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
