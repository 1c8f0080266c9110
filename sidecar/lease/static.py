"""The static lease: one node is configured as the primary, for setups without Redis.

The primary is the node whose ``lease.primary-url`` is empty; it holds epoch 1 forever.
Every other node is told the primary's API URL and never becomes primary. Replicas do
not know the primary's node id from the configuration, so they name it after the URL's
``host:port`` until the stream's HELLO frame tells them its real id.
"""

from __future__ import annotations

import math
from urllib.parse import urlsplit

from sidecar.cluster import NodeInfo
from sidecar.lease import Candidate, LeaseError, Positions, Term

STATIC_EPOCH = 1


def node_id_from_url(url: str) -> str:
    """A stable stand-in id for the node at `url`: its ``host:port``."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise LeaseError(f"lease.primary-url {url!r} has an invalid port") from None
    if not parts.hostname:
        raise LeaseError(f"lease.primary-url {url!r} has no host")
    default_port = 443 if parts.scheme == "https" else 80
    return f"{parts.hostname}:{port or default_port}"


class StaticLease:
    """A lease that never moves; see the module docstring."""

    def __init__(self, me: NodeInfo, primary_url: str, *, ttl: float, renew_interval: float):
        self.ttl = ttl
        self.renew_interval = renew_interval
        self.acquired_after_reset = False  # a static lease has no store to lose
        self._me = me
        if primary_url:
            api_url = primary_url.rstrip("/")
            self._primary = NodeInfo(node_id=node_id_from_url(api_url), api_url=api_url)
        else:
            self._primary = me
        self._published: dict[str, tuple[int, int]] = {}
        self._candidates: dict[str, Candidate] = {}

    @property
    def is_primary(self) -> bool:
        """Whether this node is the configured primary."""
        return self._primary is self._me

    def _term(self) -> Term:
        return Term(self._primary, STATIC_EPOCH, math.inf)

    async def acquire(self, me: NodeInfo) -> Term | None:
        if self.is_primary and me.node_id == self._me.node_id:
            return Term(me, STATIC_EPOCH, math.inf)
        return None

    async def renew(self, term: Term) -> Term | None:
        if self.is_primary and term.holder.node_id == self._me.node_id:
            return Term(term.holder, STATIC_EPOCH, math.inf)
        return None

    async def release(self, term: Term) -> None:
        """Nothing to give up: the configured primary stays the primary."""

    async def current(self) -> Term | None:
        return self._term()

    async def handoff(self, term: Term, to: NodeInfo) -> Term | None:
        raise LeaseError(
            "a static lease cannot be handed off: change lease.primary-url on every node "
            "(or use lease.type = redis)"
        )

    async def publish(self, me: NodeInfo, positions: Positions, *, primary: bool) -> None:
        if primary:
            self._published = dict(positions)
        else:
            self._candidates[me.node_id] = Candidate(me.api_url, dict(positions))

    async def positions(self) -> tuple[dict[str, tuple[int, int]], dict[str, Candidate]]:
        return dict(self._published), dict(self._candidates)

    def observe_epoch(self, epoch: int) -> None:
        """The static epoch never changes."""

    async def close(self) -> None:
        """Nothing to close."""
