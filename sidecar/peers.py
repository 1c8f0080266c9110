"""Ask the other candidates where they are, just before taking the lease.

Candidates publish their positions to the lease store only once per renew interval, so
the store can miss a write that a replica applied, and that a synchronous primary then
acknowledged, a moment before the primary died. The replica that has it is alive and
knows it: a candidate about to take the lease asks each live candidate's ``GET /status``
and defers to one that is more current (``candidate_should_wait``). A candidate that
does not answer in time is judged by what it published, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from sidecar.lease import Candidate, Positions

log = logging.getLogger("ltx_sidecar.peers")


def positions_from_status(doc: Any, node_id: str) -> Positions | None:
    """The database positions in a /status document of `node_id`; None if it is not one."""
    if not isinstance(doc, dict) or doc.get("node_id") != node_id:
        return None
    dbs = doc.get("databases")
    if not isinstance(dbs, list):
        return None
    out: dict[str, tuple[int, int]] = {}
    try:
        for db in dbs:
            if not db.get("deleted"):
                out[str(db["name"])] = (int(db["txid"], 16), int(db["checksum"], 16))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return out


async def fresh_positions(
    candidates: Mapping[str, Candidate], timeout: float
) -> dict[str, Positions]:
    """{candidate id: its positions now} for every candidate that answered in time."""
    asking = {i: c for i, c in candidates.items() if c.api_url}
    if not asking:
        return {}
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        answers = await asyncio.gather(
            *(_ask(session, node_id, c.api_url) for node_id, c in asking.items())
        )
    return {i: p for i, p in zip(asking, answers, strict=True) if p is not None}


async def _ask(session: aiohttp.ClientSession, node_id: str, api_url: str) -> Positions | None:
    try:
        async with session.get(f"{api_url.rstrip('/')}/status") as resp:
            if resp.status != 200:
                return None
            doc = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.debug("candidate %s at %s did not answer: %s", node_id, api_url, exc)
        return None
    return positions_from_status(doc, node_id)
