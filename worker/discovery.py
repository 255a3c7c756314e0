"""Finding providers of a service: the DHT first, the edge's `/services` when it does not answer."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import DHTError
from dht_bridge.records import WorkerRecord
from worker.edge import EdgeClient
from worker.errors import EdgeError

logger = logging.getLogger(__name__)

SOURCE_DHT = "dht"
SOURCE_EDGE = "edge"
SOURCE_NONE = "none"


@dataclass(frozen=True)
class Discovery:
    """Providers found, least loaded first, and which side answered (`dht`, `edge` or `none`)."""

    service: str
    providers: list[WorkerRecord] = field(default_factory=list)
    source: str = SOURCE_NONE
    seconds: float = 0.0
    detail: str = ""


async def discover(
    service: str,
    *,
    limit: int,
    node: DHTNode | None,
    edge: EdgeClient | None,
    deadline: float,
    region: str = "",
) -> Discovery:
    """Ask the DHT, bounded by `deadline`; fall back to the edge when no other node answered.

    An answer from our own storage alone does not count as the DHT answering: we hold one
    replica of one shard at most, and the edge knows every registered provider.
    """
    started = time.monotonic()
    local: list[WorkerRecord] = []
    if node is None or node.protocol is None:
        reason = "not on the DHT"
    elif len(node.rpc.router) == 0:
        reason = "no DHT contact left"
    else:
        try:
            report = await asyncio.wait_for(node.lookup_report(service, limit), deadline)
        except TimeoutError:
            reason = f"the DHT gave no answer within {deadline:g}s"
        except (DHTError, OSError, RuntimeError) as exc:
            reason = f"the DHT lookup failed: {exc}"
        else:
            if report.hops > 0:
                return Discovery(service, report.providers, SOURCE_DHT, _since(started))
            local = report.providers
            reason = "no DHT node answered"
    if edge is None:
        source = SOURCE_DHT if local else SOURCE_NONE
        return Discovery(service, local, source, _since(started), f"{reason}; no edge configured")
    try:
        providers = await edge.services(service, limit=limit, region=region)
    except EdgeError as exc:
        logger.warning("discovery of %s: %s, and the edge failed too: %s", service, reason, exc)
        source = SOURCE_DHT if local else SOURCE_NONE
        return Discovery(service, local, source, _since(started), f"{reason}; edge: {exc}")
    logger.info("discovery of %s answered by the edge: %s", service, reason)
    return Discovery(service, providers, SOURCE_EDGE, _since(started), reason)


def _since(started: float) -> float:
    return time.monotonic() - started
