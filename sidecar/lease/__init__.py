"""Who is primary: one small Lease protocol, a static and a Redis implementation.

node.py is the only caller. It acquires a Term, renews it every ``renew_interval`` and
stops acting as primary by ``Term.expires`` unless a renewal succeeded; every term has
an epoch that strictly increases, so frames from an older term can be told apart.
docs/leases.md describes the keys, the timing and the guarantees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sidecar.cluster import NodeInfo

if TYPE_CHECKING:
    from sidecar.config import Config

__all__ = [
    "Candidate",
    "Lease",
    "LeaseError",
    "Positions",
    "Term",
    "candidate_should_wait",
    "default_renew_interval",
    "open_lease",
    "safety_margin",
]

# name -> (txid, post-apply checksum), the position of each database.
Positions = Mapping[str, tuple[int, int]]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A live candidate as the lease store knows it: where to ask it, what it published."""

    api_url: str
    positions: Positions


@dataclass(frozen=True, slots=True)
class Term:
    """One primary term as this node holds or sees it."""

    holder: NodeInfo
    epoch: int  # fences the term; strictly increases across terms
    # time.monotonic() by which the holder must have stopped acting as primary unless it
    # renewed: start of the last successful acquire/renew + ttl - safety_margin(ttl).
    expires: float


class LeaseError(Exception):
    """The lease could not be read or changed (Redis unreachable, a garbage value, ...).

    The message is one line that says what and where; it never means the lease was lost
    or won, only that nobody can tell right now.
    """


class Lease(Protocol):
    """The one interface node.py uses; see docs/leases.md."""

    ttl: float  # seconds a term lasts without renewal
    renew_interval: float  # seconds between renewals
    # The last successful acquire found the lease store had lost its data (Redis
    # restarted empty): the previous holder may act as primary until its term runs out.
    acquired_after_reset: bool

    async def acquire(self, me: NodeInfo) -> Term | None:
        """Take the lease if nobody holds it; None when another node does."""
        ...

    async def renew(self, term: Term) -> Term | None:
        """Extend our term; None when it is lost (expired, taken, handed off, changed)."""
        ...

    async def release(self, term: Term) -> None:
        """Give the lease up if it is still ours; never deletes another node's."""
        ...

    async def current(self) -> Term | None:
        """Who holds the lease now; None if nobody."""
        ...

    async def handoff(self, term: Term, to: NodeInfo) -> Term | None:
        """Replace our term with one held by `to` under a new epoch; None if not ours."""
        ...

    async def publish(self, me: NodeInfo, positions: Positions, *, primary: bool) -> None:
        """Publish the primary's positions (primary=True) or a candidate's own."""
        ...

    async def positions(self) -> tuple[dict[str, tuple[int, int]], dict[str, Candidate]]:
        """(the primary's last published positions, {live candidate id: its entry})."""
        ...

    def observe_epoch(self, epoch: int) -> None:
        """Remember an epoch seen elsewhere (a stream frame): new terms go above it."""
        ...

    async def close(self) -> None: ...


def safety_margin(ttl: float) -> float:
    """How long before the lease expires in Redis the holder stops acting as primary.

    10% of the TTL but at least 0.5 s (clock-rate drift, the time to block writes), and
    never more than half the TTL so a short test TTL still leaves time to act.
    """
    return min(max(0.1 * ttl, 0.5), ttl / 2)


def default_renew_interval(ttl: float, configured: float) -> float:
    """The renewal period: the configured one, or TTL/3 when it is 0."""
    return configured if configured > 0 else ttl / 3


def candidate_should_wait(
    mine: Positions,
    published: Positions,
    stale: Mapping[str, Positions],
    fresh: Mapping[str, Positions] | None = None,
) -> bool:
    """Whether this candidate should leave the lease to a more current one.

    Only TXIDs are compared (a diverged checksum is the resync's business). Another
    candidate is *more current* than us when its TXID is nowhere lower than ours and
    somewhere higher (a database one lacks counts as TXID 0). We wait when:

    * a candidate that answered just now (``fresh``) is more current over every database
      either of us has: it holds all we hold and more, possibly a write a synchronous
      primary acknowledged after its last publication;
    * or, for candidates known only from what they published (``stale``: they did not
      answer), when we are *behind* the primary's published positions and one of them is
      more current over those databases.

    When no candidate is strictly better (equal, or ahead on different databases) nobody
    waits, so some candidate always takes the lease. Callers leave their own entry out.
    """
    for other in (fresh or {}).values():
        if _more_current(other, mine, set(other) | set(mine)):
            return True
    names = set(published)
    if not any(_txid(mine, n) < _txid(published, n) for n in names):
        return False
    return any(_more_current(other, mine, names) for other in stale.values())


def _txid(positions: Positions, name: str) -> int:
    return positions.get(name, (0, 0))[0]


def _more_current(other: Positions, mine: Positions, names: set[str]) -> bool:
    never_lower = all(_txid(other, n) >= _txid(mine, n) for n in names)
    return never_lower and any(_txid(other, n) > _txid(mine, n) for n in names)


def open_lease(cfg: Config, me: NodeInfo) -> Lease:
    """The lease cfg.lease.type names; LeaseError for a setting that cannot work."""
    ttl = cfg.lease.ttl.total_seconds()
    renew = default_renew_interval(ttl, cfg.lease.renew_interval.total_seconds())
    if renew >= ttl - safety_margin(ttl):
        raise LeaseError(
            f"lease.renew-interval {renew:g}s is too long for lease.ttl {ttl:g}s: "
            f"it must be shorter than the TTL less the {safety_margin(ttl):g}s safety margin"
        )
    if cfg.lease.type == "static":
        from sidecar.lease.static import StaticLease

        return StaticLease(me, cfg.lease.primary_url, ttl=ttl, renew_interval=renew)
    if cfg.lease.type == "redis":
        from sidecar.lease.redis import RedisLease

        return RedisLease(cfg.lease.redis_url, cfg.lease.key, ttl=ttl, renew_interval=renew)
    raise LeaseError(f"lease.type {cfg.lease.type!r} is not one of static, redis")
