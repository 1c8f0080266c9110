"""A stand-in for Fly.io's edge proxy, for tests: it honours ``fly-replay: instance=<id>``.

A request reaches one instance (the one named by the ``fly-force-instance-id`` request
header, as on Fly, else the next one in turn). When the answer carries
``fly-replay: instance=<id>``, the edge sends the same request to that instance with a
``fly-replay-src`` header and returns that answer instead; the client never sees the
replay. Like Fly, it buffers the request body to replay it and refuses bodies over 1 MB.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from tests.helpers import free_port

MAX_REPLAY_BODY = 1 << 20
MAX_REPLAYS = 3
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer"}


async def serve_app(app: web.Application, host: str = "127.0.0.1") -> tuple[web.AppRunner, str]:
    """Serve app on a free port of host; returns the runner (cleanup() stops it) and URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port(host)
    await web.TCPSite(runner, host, port).start()
    return runner, f"http://{host}:{port}"


def parse_fly_replay(value: str) -> dict[str, str]:
    """``instance=abc;state=x`` -> {"instance": "abc", "state": "x"}."""
    fields = {}
    for part in value.split(";"):
        key, _, val = part.strip().partition("=")
        if key:
            fields[key.strip().lower()] = val.strip()
    return fields


@dataclass
class FlyEdge:
    """The edge: instances maps Fly machine ids to their public (proxy) base URLs."""

    instances: dict[str, str]
    replays: int = 0
    requests: int = 0
    _turn: itertools.cycle[str] = field(init=False, repr=False)
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._turn = itertools.cycle(list(self.instances))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REPLAY_BODY)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        body = await request.read()
        forced = request.headers.get("fly-force-instance-id")
        instance = forced if forced else next(self._turn)
        headers = CIMultiDict(
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in ("host", "fly-force-instance-id")
        )
        source = instance
        for _ in range(MAX_REPLAYS + 1):
            if instance not in self.instances:
                return web.Response(status=502, text=f"fly edge: no instance {instance!r}\n")
            url = URL(self.instances[instance] + request.raw_path, encoded=True)
            async with self._session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            ) as answer:
                replay = answer.headers.get("fly-replay")
                if replay is None:
                    out = CIMultiDict(
                        (k, v) for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP
                    )
                    out.pop("Content-Length", None)
                    return web.Response(status=answer.status, body=await answer.read(), headers=out)
            target = parse_fly_replay(replay).get("instance")
            if target is None:
                return web.Response(status=502, text=f"fly edge: unsupported replay {replay!r}\n")
            self.replays += 1
            headers["fly-replay-src"] = f"instance={source};region=test;t=0"
            source, instance = target, target
        return web.Response(status=508, text="fly edge: too many replays\n")
