"""`python -m demo`: a three-node ltx-sidecar cluster on 127.0.0.1, end to end.

It starts three sidecars as separate processes, each with its own data directory and
ports and the example app (examples/app.py) as its child behind its proxy; writes a
message through a replica's proxy; shows the write arriving on every node with its
lag; prints the URLs and an `ltxctl status` view; and runs until Ctrl-C (or for
--duration seconds), then stops every process it started.

The lease is static (node1 is the primary) unless --redis-url (or $REDIS_URL) is given:
then every node is a candidate and Redis elects the primary.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from http.cookies import SimpleCookie
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from demo import procs
from demo.nodes import DB_NAME, ROOT, Lease, Node, app_command, parse_txid, plan, sidecar_config

T = TypeVar("T")

MARKER = ".ltx-sidecar-demo"  # only a directory holding this is ever wiped
START_TIMEOUT = 120.0  # seconds for every node to be healthy and its app to answer
ARRIVE_TIMEOUT = 60.0  # seconds for the write to reach every node
HTTP_TIMEOUT = 5.0


class DemoError(Exception):
    """The demo cannot go on; the message says why (and where the logs are)."""


class Stop(Exception):
    """SIGTERM or SIGINT: shut the cluster down."""


def say(text: str = "") -> None:
    print(text, flush=True)


# -- HTTP (stdlib, blocking) ------------------------------------------------------------------


def http(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any] | str, list[str]]:
    """(status, JSON or text body, Set-Cookie headers); raises OSError if unreachable."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as resp:
            status, raw, cookies = resp.status, resp.read(), resp.headers.get_all("Set-Cookie")
    except urllib.error.HTTPError as exc:
        status, raw, cookies = exc.code, exc.read(), exc.headers.get_all("Set-Cookie")
    text = raw.decode("utf-8", "replace")
    try:
        parsed: dict[str, Any] | str = json.loads(text)
    except ValueError:
        parsed = text
    return status, parsed, cookies or []


def status_of(node: Node) -> dict[str, Any] | None:
    try:
        code, body, _ = http("GET", f"{node.api_url}/status")
    except OSError:
        return None
    return body if code == 200 and isinstance(body, dict) else None


def db_status(status: dict[str, Any] | None) -> dict[str, Any]:
    for db in (status or {}).get("databases") or []:
        if isinstance(db, dict) and db.get("name") == DB_NAME:
            return db
    return {}


def wait_for(
    what: str, check: Callable[[], T | None], timeout: float, alive: Callable[[], None]
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        alive()
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


# -- the demo -----------------------------------------------------------------------------


class Cluster:
    """Three sidecar processes and what the demo knows about them."""

    def __init__(self, base: Path, lease: Lease, token: str, sidecar: list[str]) -> None:
        self.base = base
        self.sidecar = sidecar
        self.lease = lease
        self.env = {**os.environ, "LTX_SIDECAR_TOKEN": token, "PYTHONUNBUFFERED": "1"}
        for var in [
            v for v in self.env if v.startswith("LTX_SIDECAR_") and v != "LTX_SIDECAR_TOKEN"
        ]:
            del self.env[var]  # the demo's own settings, not the caller's
        self.nodes = plan(base, free_ports(9))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        python = sys.executable
        primary = self.nodes[0]
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            node.config_path.write_text(sidecar_config(node, primary, self.lease, python))
            argv = [*self.sidecar, "--config", str(node.config_path), "--"]
            self.procs[node.name] = procs.start(
                argv + app_command(node, python), node.log_path, self.env, ROOT
            )

    def check_alive(self) -> None:
        for node in self.nodes:
            proc = self.procs[node.name]
            if proc.poll() is not None:
                raise DemoError(
                    f"{node.name}'s sidecar exited with status {proc.returncode}; "
                    f"its log ({node.log_path}) ends with:\n{tail(node.log_path)}"
                )

    def healthy(self, node: Node) -> bool:
        try:
            code, _, _ = http("GET", f"{node.api_url}/health")
            if code != 200:
                return False
            code, _, _ = http("GET", f"{node.proxy_url}/")
        except OSError:
            return False
        return code == 200

    def stop(self) -> list[int]:
        return procs.stop_all(list(self.procs.values()))

    def leftovers(self) -> list[int]:
        return procs.leftovers(list(self.procs.values()))


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free a moment ago on 127.0.0.1."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def prepare_base(base: Path) -> None:
    """Start from an empty directory; wipe only one an earlier demo made."""
    if base.exists():
        if not (base / MARKER).exists() and any(base.iterdir()):
            raise DemoError(
                f"{base} exists and was not made by the demo: choose another --data-dir"
            )
        shutil.rmtree(base)
    base.mkdir(parents=True)
    (base / MARKER).write_text("made by python -m demo; removed by the next run\n")


def wait_until_up(cluster: Cluster) -> tuple[Node, list[Node]]:
    """Every node healthy with its app answering; return (primary, replicas)."""
    for node in cluster.nodes:

        def is_up(node: Node = node) -> bool | None:
            return True if cluster.healthy(node) else None

        wait_for(
            f"{node.name} to be healthy (log: {node.log_path})",
            is_up,
            START_TIMEOUT,
            cluster.check_alive,
        )
        say(f"  {node.name} is up: proxy {node.proxy_url}, API {node.api_url}")

    def find_primary() -> Node | None:
        roles = {n.name: (status_of(n) or {}).get("role") for n in cluster.nodes}
        primaries = [n for n in cluster.nodes if roles[n.name] == "primary"]
        return primaries[0] if len(primaries) == 1 else None

    primary = wait_for("one node to be primary", find_primary, START_TIMEOUT, cluster.check_alive)
    return primary, [n for n in cluster.nodes if n != primary]


def write_through(node: Node, primary: Node, text: str) -> int:
    """POST a message to `node`'s proxy; return the TXID it committed at."""
    code, body, cookies = http("POST", f"{node.proxy_url}/messages", {"text": text})
    if code != 201 or not isinstance(body, dict):
        raise DemoError(f"the write through {node.name}'s proxy failed: {code} {body}")
    txid = -1
    for header in cookies:
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        if "__txid" in jar:
            txid = parse_txid(jar["__txid"].value)
    if txid < 0:  # no cookie: the primary's TXID now includes the write
        txid = parse_txid(db_status(status_of(primary)).get("txid"))
    if txid < 0:
        raise DemoError(f"cannot tell the write's TXID (primary status: {status_of(primary)})")
    say(f"  message #{body.get('id')} committed on the primary at TXID {txid:016x}")
    return txid


def show_arrival(cluster: Cluster, primary: Node, txid: int, written_at: float) -> None:
    """Poll each node's /status until it has `txid`; print when it arrived and its lag."""
    pending = {n.name for n in cluster.nodes}
    deadline = time.monotonic() + ARRIVE_TIMEOUT
    while pending:
        cluster.check_alive()
        for node in cluster.nodes:
            if node.name not in pending:
                continue
            db = db_status(status_of(node))
            if parse_txid(db.get("txid")) >= txid:
                pending.discard(node.name)
                after = (time.monotonic() - written_at) * 1000
                role = "primary" if node == primary else "replica"
                lag = db.get("lag_seconds", 0)
                say(
                    f"  {node.name} ({role:7}) has TXID {parse_txid(db.get('txid')):016x}: "
                    f"seen {after:6.1f} ms after the write, lag_seconds {lag}"
                )
        if pending and time.monotonic() > deadline:
            raise DemoError(f"the write did not reach {', '.join(sorted(pending))} in time")
        time.sleep(0.005)
    say(f"  the write arrived on all {len(cluster.nodes)} nodes")


def read_back(cluster: Cluster, txid: int, text: str) -> None:
    """Read through every proxy with the __txid cookie (read-your-writes)."""
    for node in cluster.nodes:
        code, body, _ = http("GET", f"{node.proxy_url}/", headers={"Cookie": f"__txid={txid:016x}"})
        found = isinstance(body, dict) and any(
            m.get("text") == text for m in body.get("messages", [])
        )
        say(
            f"  GET {node.proxy_url}/ -> {code}, {'shows' if found else 'does NOT show'} the message"
        )


def print_status(cluster: Cluster) -> None:
    """`ltxctl status` for every node, or the same facts from /status if it cannot."""
    for node in cluster.nodes:
        argv = [sys.executable, "-m", "sidecar.cli", "status", "--url", node.api_url]
        result = subprocess.run(argv, capture_output=True, text=True, env=cluster.env, timeout=30)
        if result.returncode == 0 and result.stdout.strip():
            say(f"$ ltxctl status --url {node.api_url}")
            say(result.stdout.rstrip())
            continue
        status = status_of(node) or {}
        db = db_status(status)
        primary = status.get("primary") or {}
        say(
            f"  {node.name:6} role {status.get('role', '?'):8} "
            f"primary {primary.get('node_id', '?') if isinstance(primary, dict) else primary!s:6} "
            f"{DB_NAME} TXID {db.get('txid', '?')} lag {db.get('lag_seconds', '?')} s"
        )


def print_urls(cluster: Cluster, primary: Node) -> None:
    for node in cluster.nodes:
        role = "primary" if node == primary else "replica"
        say(f"  {node.name} ({role}): app {node.proxy_url}/  status {node.api_url}/status")
        say(f"      log {node.log_path}")
    say(f"  try: curl -d text=hello {cluster.nodes[-1].proxy_url}/messages")


def run(args: argparse.Namespace) -> int:
    base = Path(args.data_dir).resolve()
    redis_url = args.redis_url or ""
    lease = Lease(redis_url, f"ltx-sidecar/demo-{secrets.token_hex(4)}")
    prepare_base(base)
    sidecar = shlex.split(args.sidecar) if args.sidecar else [sys.executable, "-m", "sidecar"]
    cluster = Cluster(base, lease, secrets.token_urlsafe(24), sidecar)
    say(f"Starting 3 nodes in {base} ({lease.kind} lease)")
    with ExitStack() as cleanup:
        cleanup.callback(shutdown, cluster)
        cluster.start()
        primary, replicas = wait_until_up(cluster)
        say(f"The primary is {primary.name}.")
        writer = replicas[0]
        text = f"hello from the demo at {time.strftime('%H:%M:%S')}"
        say(f"\nWriting through {writer.name}'s proxy (a replica; it sends writes to the primary):")
        txid = write_through(writer, primary, text)
        show_arrival(cluster, primary, txid, time.monotonic())
        say("\nReading it back through every node's proxy:")
        read_back(cluster, txid, text)
        say("\nCluster status:")
        print_status(cluster)
        say("\nURLs:")
        print_urls(cluster, primary)
        if args.duration is None:
            say("\nRunning; press Ctrl-C to stop.")
            while True:
                cluster.check_alive()
                time.sleep(0.5)
        else:
            say(f"\nRunning for {args.duration:g} s.")
            end = time.monotonic() + args.duration
            while time.monotonic() < end:
                cluster.check_alive()
                time.sleep(0.2)
    return 0


def shutdown(cluster: Cluster) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup short
    say("\nStopping the nodes...")
    killed = cluster.stop()
    if killed:
        say(f"  had to kill pids {killed} that did not stop on SIGTERM")
    left = cluster.leftovers()
    if left:
        say(f"  still running: pids {left}")
    else:
        say("  stopped: nothing left running")


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        default=str(ROOT / "demo-data"),
        help="where the nodes keep their files (default ./demo-data; wiped at start)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL"),
        help="use the Redis lease with this server (default $REDIS_URL; none: static lease)",
    )
    parser.add_argument(
        "--sidecar",
        help="the sidecar command (default: this Python's `-m sidecar`), e.g. ltx-sidecar",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--duration", type=float, help="stop after this many seconds (no Ctrl-C needed)"
    )
    mode.add_argument(
        "--non-interactive",
        action="store_const",
        const=0.0,
        dest="duration",
        help="same as --duration 0",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration is not None and args.duration < 0:
        print("python -m demo: --duration must be >= 0", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        return run(args)
    except Stop:
        return 0
    except DemoError as exc:
        print(f"python -m demo: {exc}", file=sys.stderr)
        return 1
