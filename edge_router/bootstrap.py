"""Choosing DHT peers for a new worker: coordinators first, then long-lived healthy workers."""

from __future__ import annotations

import logging

from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import RegistryError
from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry

logger = logging.getLogger(__name__)

Peer = dict[str, object]
SCAN_LIMIT = 2000


async def choose_peers(
    *,
    coordinators: tuple[tuple[str, int], ...],
    registry: Registry,
    dht: DHTNode | None,
    region: str | None,
    count: int,
    now: float,
) -> list[Peer]:
    """Up to `count` peers: configured coordinators, then server-mode workers.

    Workers in `region` come first; among them the higher `seq` first, since a worker's seq grows
    with every heartbeat and so tells how long it has been up; then the less loaded.
    """
    peers = [_coordinator(host, port, dht) for host, port in coordinators]
    try:
        records = await registry.records(limit=SCAN_LIMIT)
    except RegistryError as exc:
        logger.warning("bootstrap: registry unavailable, coordinators only: %s", exc)
        records = []
    servers = [r for r in records if _serves(r, now)]
    servers.sort(key=lambda r: (region is not None and r.region != region, -r.seq, r.load))
    for record in servers[: max(count - len(peers), 0)]:
        peers.append(
            {
                "node_id": record.worker_id,
                "host": record.dht_host,
                "port": record.dht_port,
                "region": record.region,
                "kind": "worker",
            }
        )
    return peers[: max(count, len(coordinators))]


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
