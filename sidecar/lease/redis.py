"""The Redis lease: a key set with NX PX, renewed and released by compare-and-set scripts.

Keys (``<key>`` is ``lease.key``, by default ``ltx-sidecar/$FLY_APP_NAME``):

* ``<key>``: the lease, a JSON value ``{"node_id","api_url","proxy_url","epoch"}`` that
  expires after the TTL unless its holder renews it;
* ``<key>:epoch``: the epoch counter, raised by one for every new term;
* ``<key>:positions``: the positions the primary last published (no expiry);
* ``<key>:candidate:<node_id>`` and the set ``<key>:candidates``: each candidate's own
  positions, expiring after 3 TTLs so dead candidates vanish.

Every change is one Lua script, so "is it still ours?" and the change are atomic. The
epoch is taken only when a term actually starts, and never below the highest epoch this
object has seen: a Redis that restarted empty cannot make epochs go backwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.cluster import NodeInfo
from sidecar.lease import Candidate, LeaseError, Positions, Term, safety_margin

log = logging.getLogger(__name__)

T = TypeVar("T")

CANDIDATE_TTL_FACTOR = 3  # a candidate's positions live this many TTLs without a refresh

# The epoch of a new term: one above both the stored counter and the highest epoch the
# caller has seen (ARGV[known]), stored back. A counter that is not a number is an error.
_NEXT_EPOCH = """
local stored = redis.call('GET', KEYS[2])
local n = 0
if stored then
  n = tonumber(stored)
  if n == nil then
    return redis.error_reply('epoch counter ' .. KEYS[2] .. ' holds a value that is not a number')
  end
end
local known = tonumber(ARGV[KNOWN])
if known > n then n = known end
local epoch = string.format('%d', n + 1)
redis.call('SET', KEYS[2], epoch)
"""

# KEYS: lease, epoch counter. ARGV: value prefix, value suffix, ttl ms, known epoch.
# Returns {epoch, reset}: reset is 1 when the counter was behind an epoch we had seen
# (Redis lost its data), so the previous holder may still believe it holds the lease.
_ACQUIRE = (
    "if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0} end\n"
    + _NEXT_EPOCH.replace("KNOWN", "4")
    + "redis.call('SET', KEYS[1], ARGV[1] .. epoch .. ARGV[2], 'PX', ARGV[3])\n"
    + "local reset = 0\n"
    + "if known > 0 and (not stored or tonumber(stored) < known) then reset = 1 end\n"
    + "return {tonumber(epoch), reset}\n"
)

# KEYS: lease, epoch counter. ARGV: our value, new prefix, new suffix, ttl ms, known epoch.
_HANDOFF = (
    "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end\n"
    + _NEXT_EPOCH.replace("KNOWN", "5")
    + "redis.call('SET', KEYS[1], ARGV[2] .. epoch .. ARGV[3], 'PX', ARGV[4])\n"
    + "return tonumber(epoch)\n"
)

# KEYS: lease. ARGV: our value, ttl ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease. ARGV: our value.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: lease, positions. ARGV: our value, positions JSON. Only the holder publishes.
_PUBLISH_PRIMARY = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# KEYS: the candidates set, then one candidate key per id in ARGV. Forget the ids whose
# key expired, checked in the script so a candidate that just republished is kept.
_FORGET_GONE = """
for i, id in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then redis.call('SREM', KEYS[1], id) end
end
return 0
"""


# -- the values, pure ------------------------------------------------------------------------


def _value_parts(node: NodeInfo) -> tuple[str, str]:
    """The lease value around its epoch: ``prefix + str(epoch) + suffix``."""
    head = json.dumps(
        {"node_id": node.node_id, "api_url": node.api_url, "proxy_url": node.proxy_url},
        separators=(",", ":"),
    )
    return head[:-1] + ',"epoch":', "}"


def encode_value(node: NodeInfo, epoch: int) -> str:
    """The lease value of `node`'s term `epoch`; the same inputs give the same bytes."""
    prefix, suffix = _value_parts(node)
    return f"{prefix}{epoch}{suffix}"


def decode_value(raw: bytes | str) -> tuple[NodeInfo, int]:
    """(holder, epoch) of a lease value; ValueError naming what is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    node_id, api_url = data.get("node_id"), data.get("api_url")
    proxy_url, epoch = data.get("proxy_url", ""), data.get("epoch")
    if not isinstance(node_id, str) or not node_id:
        raise ValueError("node_id is missing or not a non-empty string")
    if not isinstance(api_url, str) or not isinstance(proxy_url, str):
        raise ValueError("api_url or proxy_url is not a string")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise ValueError("epoch is missing or not a positive integer")
    return NodeInfo(node_id=node_id, api_url=api_url, proxy_url=proxy_url), epoch


def encode_positions(positions: Positions, extra: dict[str, Any]) -> str:
    """Positions as JSON, each in the LiteFS ``txid/checksum`` form (16 hex digits each)."""
    dbs = {name: f"{txid:016x}/{checksum:016x}" for name, (txid, checksum) in positions.items()}
    return json.dumps({**extra, "positions": dbs}, separators=(",", ":"), sort_keys=True)


def decode_positions(raw: bytes | str) -> dict[str, tuple[int, int]]:
    """The positions of an encode_positions value; ValueError naming what is wrong."""
    return _positions_of(_json_object(raw))


def decode_candidate(raw: bytes | str) -> Candidate:
    """A candidate's entry: its positions and the api_url it published beside them."""
    data = _json_object(raw)
    url = data.get("api_url")
    return Candidate(url if isinstance(url, str) else "", _positions_of(data))


def _json_object(raw: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("no positions object")
    return data


def _positions_of(data: dict[str, Any]) -> dict[str, tuple[int, int]]:
    dbs = data.get("positions")
    if not isinstance(dbs, dict):
        raise ValueError("no positions object")
    out: dict[str, tuple[int, int]] = {}
    for name, pos in dbs.items():
        txid_hex, _, checksum_hex = pos.partition("/") if isinstance(pos, str) else ("", "", "")
        if len(txid_hex) != 16 or len(checksum_hex) != 16:
            raise ValueError(f"position of {name!r} is not TXID/CHECKSUM in hex: {pos!r}")
        try:
            out[name] = (int(txid_hex, 16), int(checksum_hex, 16))
        except ValueError:
            raise ValueError(f"position of {name!r} is not hexadecimal: {pos!r}") from None
    return out


def _preview(raw: bytes | str) -> str:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return repr(text if len(text) <= 80 else text[:77] + "...")


def redis_address(url: str) -> str:
    """``host:port/db`` of a Redis URL, without the password, for messages."""
    parts = urlsplit(url)
    try:
        port = parts.port or 6379
    except ValueError:
        port = 0
    return f"{parts.hostname or '?'}:{port}{parts.path or '/0'}"


# -- the lease -------------------------------------------------------------------------------


class RedisLease:
    """A lease in one Redis; see the module docstring and docs/leases.md."""

    def __init__(self, url: str, key: str, *, ttl: float, renew_interval: float) -> None:
        if not url:
            raise LeaseError("lease.type is redis but lease.redis-url is empty")
        if not key:
            raise LeaseError("lease.key is empty")
        self.ttl = ttl
        self.renew_interval = renew_interval
        self.key = key
        self.where = redis_address(url)
        self._ttl_ms = max(1, round(ttl * 1000))
        self._margin = safety_margin(ttl)
        # Short timeouts so a dead or cut-off Redis is noticed well within the TTL; one
        # immediate retry on a fresh connection covers a pooled connection that a Redis
        # restart left dead. The whole call is bounded again by _timeout.
        socket_timeout = min(1.0, ttl / 5)
        self._timeout = min(2.0, ttl / 2)
        try:
            self._redis: aioredis.Redis = aioredis.Redis.from_url(
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=Retry(NoBackoff(), 1),
                health_check_interval=0,
            )
        except ValueError as exc:
            raise LeaseError(f"lease.redis-url is not a valid Redis URL: {exc}") from None
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._handoff = self._redis.register_script(_HANDOFF)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._publish_primary = self._redis.register_script(_PUBLISH_PRIMARY)
        self._forget_gone = self._redis.register_script(_FORGET_GONE)
        self.highest_epoch = 0  # the highest epoch this object has seen anywhere
        self.acquired_after_reset = False  # the last acquire found Redis had lost its data
        self._held: Term | None = None  # the term this object last acquired or renewed

    # -- keys

    @property
    def epoch_key(self) -> str:
        return f"{self.key}:epoch"

    @property
    def positions_key(self) -> str:
        return f"{self.key}:positions"

    @property
    def candidates_key(self) -> str:
        return f"{self.key}:candidates"

    def candidate_key(self, node_id: str) -> str:
        return f"{self.key}:candidate:{node_id}"

    # -- the protocol

    def observe_epoch(self, epoch: int) -> None:
        self.highest_epoch = max(self.highest_epoch, epoch)

    async def acquire(self, me: NodeInfo) -> Term | None:
        prefix, suffix = _value_parts(me)
        start = time.monotonic()
        answer = await self._call(
            "acquire",
            lambda: self._acquire(
                keys=[self.key, self.epoch_key],
                args=[prefix, suffix, self._ttl_ms, self.highest_epoch],
            ),
        )
        epoch, reset = (int(v) for v in answer)
        self.acquired_after_reset = bool(reset)
        if not epoch:
            return None
        return self._now_held(Term(me, epoch, start + self.ttl - self._margin))

    async def renew(self, term: Term) -> Term | None:
        value = encode_value(term.holder, term.epoch)
        start = time.monotonic()
        ok = await self._call(
            "renew", lambda: self._renew(keys=[self.key], args=[value, self._ttl_ms])
        )
        if not ok:
            if self._held == term:
                self._held = None
            return None
        return self._now_held(Term(term.holder, term.epoch, start + self.ttl - self._margin))

    async def release(self, term: Term) -> None:
        value = encode_value(term.holder, term.epoch)
        await self._call("release", lambda: self._release(keys=[self.key], args=[value]))
        if self._held is not None and self._held.epoch == term.epoch:
            self._held = None

    async def current(self) -> Term | None:
        start = time.monotonic()

        async def read() -> tuple[bytes | None, int]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(self.key)
                pipe.pttl(self.key)
                raw, pttl = await pipe.execute()
            return raw, int(pttl)

        raw, pttl = await self._call("read", read)
        if raw is None:
            return None
        try:
            holder, epoch = decode_value(raw)
        except ValueError as exc:
            raise LeaseError(
                f"lease key {self.key!r} in Redis {self.where} holds a value that is not a "
                f"lease ({exc}): {_preview(raw)}; it counts as held by an unknown node until "
                f"it expires or someone deletes it"
            ) from None
        if epoch < self.highest_epoch:
            log.warning(
                "lease %r names epoch %d, below epoch %d seen before (Redis lost its data?)",
                self.key,
                epoch,
                self.highest_epoch,
            )
        self.observe_epoch(epoch)
        expires = math.inf if pttl < 0 else start + pttl / 1000 - self._margin
        return Term(holder, epoch, expires)

    async def handoff(self, term: Term, to: NodeInfo) -> Term | None:
        ours = encode_value(term.holder, term.epoch)
        prefix, suffix = _value_parts(to)
        start = time.monotonic()
        epoch = await self._call(
            "handoff",
            lambda: self._handoff(
                keys=[self.key, self.epoch_key],
                args=[ours, prefix, suffix, self._ttl_ms, self.highest_epoch],
            ),
        )
        if self._held is not None and self._held.epoch == term.epoch:
            self._held = None
        if not epoch:
            return None
        self.observe_epoch(int(epoch))
        return Term(to, int(epoch), start + self.ttl - self._margin)

    async def publish(self, me: NodeInfo, positions: Positions, *, primary: bool) -> None:
        if primary:
            await self._publish_as_primary(me, positions)
            return
        payload = encode_positions(positions, {"node_id": me.node_id, "api_url": me.api_url})
        ttl_ms = self._ttl_ms * CANDIDATE_TTL_FACTOR

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self.candidate_key(me.node_id), payload, px=ttl_ms)
                pipe.sadd(self.candidates_key, me.node_id)
                await pipe.execute()

        await self._call("publish", write)

    async def _publish_as_primary(self, me: NodeInfo, positions: Positions) -> None:
        """Written only while the lease in Redis is still our term: a deposed primary's
        late publication must not move the bar candidates are measured against."""
        held = self._held
        if held is None or held.holder.node_id != me.node_id:
            log.debug("not publishing primary positions: this node holds no term")
            return
        payload = encode_positions(positions, {"node_id": me.node_id, "epoch": held.epoch})
        value = encode_value(held.holder, held.epoch)
        done = await self._call(
            "publish",
            lambda: self._publish_primary(
                keys=[self.key, self.positions_key], args=[value, payload]
            ),
        )
        if not done:
            log.debug("not publishing primary positions: the lease is no longer ours")

    async def positions(self) -> tuple[dict[str, tuple[int, int]], dict[str, Candidate]]:
        async def read() -> tuple[bytes | None, dict[str, bytes]]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self.positions_key)
                pipe.smembers(self.candidates_key)
                raw, members = await pipe.execute()
            ids = sorted(m.decode(errors="replace") for m in members)
            values: list[Any] = (
                await self._redis.mget([self.candidate_key(i) for i in ids]) if ids else []
            )
            gone = [i for i, v in zip(ids, values, strict=True) if v is None]
            if gone:
                keys = [self.candidates_key, *(self.candidate_key(i) for i in gone)]
                await self._forget_gone(keys=keys, args=gone)
            return raw, {i: v for i, v in zip(ids, values, strict=True) if v is not None}

        raw, candidates = await self._call("read positions", read)
        published: dict[str, tuple[int, int]] = {}
        if raw is not None:
            try:
                published = decode_positions(raw)
            except ValueError as exc:
                raise LeaseError(
                    f"key {self.positions_key!r} in Redis {self.where} does not hold "
                    f"positions ({exc}): {_preview(raw)}"
                ) from None
        live: dict[str, Candidate] = {}
        for node_id, value in candidates.items():
            try:
                live[node_id] = decode_candidate(value)
            except ValueError as exc:
                log.warning(
                    "ignoring candidate %s: key %r does not hold positions (%s)",
                    node_id,
                    self.candidate_key(node_id),
                    exc,
                )
        return published, live

    async def close(self) -> None:
        await self._redis.aclose()

    # -- helpers

    def _now_held(self, term: Term) -> Term:
        self.observe_epoch(term.epoch)
        self._held = term
        return term

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation, bounded in time; every failure is one LeaseError."""
        try:
            async with asyncio.timeout(self._timeout):
                return await op()
        except (TimeoutError, RedisTimeoutError):
            raise LeaseError(
                f"Redis {self.where} did not answer ({what}) within {self._timeout:g}s"
            ) from None
        except (RedisConnectionError, OSError) as exc:
            raise LeaseError(f"cannot reach Redis {self.where} ({what}): {exc}") from None
        except RedisError as exc:
            raise LeaseError(f"Redis {self.where} refused {what}: {exc}") from None
        except RuntimeError as exc:  # uvloop: a write on a transport the cut just closed
            raise LeaseError(f"cannot reach Redis {self.where} ({what}): {exc}") from None
