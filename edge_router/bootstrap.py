"""Choosing DHT peers for a new worker: coordinators first, then long-lived healthy workers.

The registry is scanned once for the pool of candidates (`scan_pool`, cached by the caller),
whatever region each joining worker asks for; `choose_peers` only orders that pool. A scan
reads up to SCAN_LIMIT records: done per asked region, a client naming a new region on every
request turned each request into a scan of the registry.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import RegistryError
from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry

__all__ = ["SCAN_LIMIT", "Peer", "PeerPool", "choose_peers", "scan_pool"]

logger = logging.getLogger(__name__)

Peer = dict[str, object]
SCAN_LIMIT = 2000


@dataclass(frozen=True)
class PeerPool:
    """What `/dht/bootstrap` chooses from: the coordinators, then live server-mode workers,
    highest `seq` (the longest up) first, then the less loaded."""

    coordinators: tuple[Peer, ...]
    servers: tuple[WorkerRecord, ...]


async def scan_pool(
    *,
    coordinators: tuple[tuple[str, int], ...],
    registry: Registry,
    dht: DHTNode | None,
    now: float,
) -> PeerPool:
    """The pool, from one scan of the registry (coordinators only while it is unavailable)."""
    try:
        records = await registry.records(limit=SCAN_LIMIT)
    except RegistryError as exc:
        logger.warning("bootstrap: registry unavailable, coordinators only: %s", exc)
        records = []
    servers = sorted((r for r in records if _serves(r, now)), key=lambda r: (-r.seq, r.load))
    return PeerPool(tuple(_coordinator(h, p, dht) for h, p in coordinators), tuple(servers))


def choose_peers(pool: PeerPool, *, region: str | None, count: int) -> list[Peer]:
    """Up to `count` peers (never fewer than the coordinators): the coordinators, then the
    pool's servers, those in `region` first."""
    wanted = max(count - len(pool.coordinators), 0)
    if region is None:
        chosen = list(pool.servers[:wanted])
    else:
        # Stops at `wanted`: a few dozen records looked at for a region that has some.
        chosen = list(itertools.islice((r for r in pool.servers if r.region == region), wanted))
        if len(chosen) < wanted:
            others = (r for r in pool.servers if r.region != region)
            chosen += itertools.islice(others, wanted - len(chosen))
    peers = list(pool.coordinators)
    for record in chosen:
        peers.append(
            {
                "node_id": record.worker_id,
                "host": record.dht_host,
                "port": record.dht_port,
                "region": record.region,
                "kind": "worker",
            }
        )
    return peers[: max(count, len(pool.coordinators))]


def _serves(record: WorkerRecord, now: float) -> bool:
    return bool(record.dht_host and record.dht_port) and record.live and not record.is_expired(now)


def _coordinator(host: str, port: int, dht: DHTNode | None) -> Peer:
    node_id = ""
    if dht is not None and dht.protocol is not None:
        for contact in dht.rpc.router.contacts():
            if (contact.ip, contact.port) == (host, port):
                node_id = contact.id.hex()
                break
    return {"node_id": node_id, "host": host, "port": port, "region": "", "kind": "coordinator"}
