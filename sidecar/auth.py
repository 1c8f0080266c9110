"""The cluster's shared secret: where it comes from and how requests prove they have it.

Every node-to-node request and every request that changes state carries
``Authorization: Bearer <token>``. Without it the answer is 401 and nothing else
happens (docs/protocol.md §1). The token comes from the configuration (``token`` or
``LTX_SIDECAR_TOKEN``); when none is set, a random one is created once in
``<data-dir>/token`` (mode 0600), which ``ltxctl`` on the same machine reads too. A
cluster of several machines must be given the same token.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

from aiohttp import web

from sidecar.fileutil import atomic_write


def read_token_file(path: Path) -> str | None:
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        return None
    return token or None


def load_token(configured: str, path: Path) -> str:
    """The configured token, else the one in `path`, created there if missing."""
    if configured:
        return configured
    token = read_token_file(path)
    if token is not None:
        return token
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, mode=0o600) as f:
        f.write(token.encode() + b"\n")
    return token


def bearer(token: str) -> dict[str, str]:
    """The request header that carries `token`."""
    return {"Authorization": f"Bearer {token}"}


def has_token(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def unauthorized() -> web.Response:
    """401 with an empty body: nothing about the server or the request is revealed."""
    return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})


def require_token(request: web.Request, token: str) -> None:
    """Raise the 401 response unless the request carries `token`."""
    if not has_token(request, token):
        raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"}, text="")
