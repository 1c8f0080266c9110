"""Sidecar processes with their HTTP proxy in front of an app, for the end-to-end tests.

An AppNode is a tests.e2e.cluster.TestNode whose configuration also enables the proxy
(on its own port, in front of ``target``) and, unless told otherwise, has the sidecar
supervise the example app (examples/app.py) as ``exec.command``, the way a deployment
runs it. HTTP helpers answer every status as a value (urllib raises on 4xx/5xx) and
never go through an environment proxy.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.message import Message
from http.client import IncompleteRead
from pathlib import Path
from typing import Any

from tests.e2e.cluster import TestNode, wait_until
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_APP = ROOT / "examples" / "app.py"
DB_NAME = "app.db"

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, whatever its status."""

    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def set_cookies(self) -> list[str]:
        return self.headers.get_all("Set-Cookie") or []


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Answer:
    """Send one request; 4xx and 5xx are answers too, not exceptions. An answer that
    breaks off (its server died mid-answer) raises ConnectionError, as a refused or reset
    connection does (an OSError)."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return Answer(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, exc.headers, exc.read())
    except IncompleteRead as exc:
        raise ConnectionError(f"{method} {url}: the answer broke off: {exc!r}") from exc


def cookie_txid(answer: Answer) -> str | None:
    """The value of the ``__txid`` cookie an answer sets, if it sets one."""
    for header in answer.set_cookies():
        name, _, rest = header.partition("=")
        if name.strip() == "__txid":
            return rest.partition(";")[0].strip()
    return None


@dataclass
class AppNode(TestNode):
    """A sidecar with its proxy enabled in front of an app on ``app_port``.

    ``proxy`` holds more [proxy] keys as TOML values (``{"fly-replay": '"always"'}``);
    with ``run_app`` the sidecar supervises the example app on ``app_port``, else the
    test serves whatever it wants there.
    """

    proxy_port: int = field(default_factory=free_port)
    app_port: int = field(default_factory=free_port)
    proxy: dict[str, str] = field(default_factory=dict)
    run_app: bool = True

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def app_command(self) -> list[str]:
        return [
            sys.executable, str(EXAMPLE_APP), "serve",
            "--db", str(self.db(DB_NAME)),
            "--host", "127.0.0.1",
            "--port", str(self.app_port),
            "--node-id", self.name,
        ]  # fmt: skip

    def proxy_toml(self) -> str:
        keys = {
            "enabled": "true",
            "host": '"127.0.0.1"',
            "port": str(self.proxy_port),
            "target": f'"http://127.0.0.1:{self.app_port}"',
            "db": f'"{DB_NAME}"',
            **self.proxy,
        }
        text = "[proxy]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
        if self.run_app:
            text += f"[exec]\ncommand = {json.dumps(shlex.join(self.app_command()))}\n"
        return text

    def write_config(self) -> None:
        own = self.extra
        self.extra = self.proxy_toml() + own
        try:
            super().write_config()
        finally:
            self.extra = own

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        """A request to this node's proxy."""
        return http("GET", self.proxy_url + path, headers=headers)

    def app_answers(self) -> bool:
        """The app answers a read through the proxy (its database is there)."""
        try:
            return self.get("/?format=json").status == 200
        except OSError:
            return False


def migrate(db: Path) -> None:
    """Create the example app's schema, as its own ``migrate`` command does."""
    subprocess.run(
        [sys.executable, str(EXAMPLE_APP), "migrate", "--db", str(db)],
        check=True,
        capture_output=True,
        timeout=60,
    )


def start_app_cluster(
    root: Path,
    replicas: int = 2,
    *,
    primary_proxy: dict[str, str] | None = None,
    replica_proxy: dict[str, str] | None = None,
    primary_extra: str = "",
    run_app: bool = True,
) -> list[AppNode]:
    """A primary and `replicas` replicas (static lease), by default each with the example app.

    Returns once every node's app answers through its proxy (without apps: once every
    replica has the primary's position); the caller stops the nodes (stop_nodes)
    however the test ends.
    """
    primary = AppNode(
        "primary",
        root / "primary",
        proxy=primary_proxy or {},
        extra=primary_extra,
        run_app=run_app,
    )
    primary.write_config()
    migrate(primary.db(DB_NAME))
    nodes = [primary]
    try:
        primary.start()
        for i in range(1, replicas + 1):
            replica = AppNode(
                f"replica{i}",
                root / f"replica{i}",
                primary_url=primary.url,
                proxy=replica_proxy or {},
                run_app=run_app,
            )
            nodes.append(replica)
            replica.start()
        if run_app:
            for node in nodes:
                wait_until(node.app_answers, 60, f"{node.name}'s app through its proxy", *nodes)
        else:
            wait_until(lambda: in_step(nodes), 60, "replicas at the primary's position", *nodes)
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


def in_step(nodes: list[AppNode]) -> bool:
    """Every node has the first node's (nonzero) position of the database."""
    want = nodes[0].position(DB_NAME)
    return want is not None and want[0] > 0 and all(n.position(DB_NAME) == want for n in nodes)


def stop_nodes(nodes: list[AppNode]) -> None:
    """Stop every node (and so its app), replicas first."""
    for node in reversed(nodes):
        node.stop()


__all__ = [
    "DB_NAME",
    "EXAMPLE_APP",
    "Answer",
    "AppNode",
    "cookie_txid",
    "http",
    "in_step",
    "migrate",
    "start_app_cluster",
    "stop_nodes",
]
