"""Where provider lists come from: Redis first, the DHT when Redis is down or knows nobody."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cachetools import TTLCache
from limits import parse_many

from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import DHTError, RegistryUnavailable
from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry
from edge_router.errors import BackendUnavailable
from edge_router.windows import LocalWindows

logger = logging.getLogger(__name__)


# Held records remembered this long (the router's longest stale window) and this many at most.
HELD_MEMORY = 300.0
HELD_MAX = 65_536
# DHT reads for lookups, at most this many (per replica). A service nobody offers misses the
# cache under every new name, and each miss cost a DHT lookup of some 30 datagrams (30 nodes;
# more on a bigger network): a flood of made-up names must not become a flood of DHT traffic,
# nor grow the node's memory. A worker that joined seconds ago and is not in Redis yet is still
# found within it; beyond it, a lookup gets Redis's (empty) answer, or a 503 while Redis is down
# (a name read before is served from the cache, stale if need be).
DHT_READS = parse_many("20/second;600/minute")


class ProviderSource:
    """Reads providers of a service from the registry, falling back to our DHT node.

    Remembers which records the registry holds as stale (self-preservation during a partition):
    those are served after every fresh provider although their lease has ended.
    """

    def __init__(
        self,
        registry: Registry,
        dht: DHTNode | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.dht = dht
        self._held: TTLCache[tuple[str, int], bool] = TTLCache(HELD_MAX, HELD_MEMORY)
        self._budget = LocalWindows(longest=max(i.get_expiry() for i in DHT_READS), clock=clock)
        self.registry_failures = 0
        self.dht_reads = 0
        self.dht_reads_refused = 0
        self._registry_down = False  # said once an outage, not once a lookup

    async def find(
        self, service: str, *, region: str | None, limit: int
    ) -> tuple[list[WorkerRecord], str]:
        """Up to `limit` live providers (region first when given) and which side answered."""
        try:
            marked = await self.registry.lookup_marked(service, limit=limit, region=region)
        except RegistryUnavailable as exc:
            self.registry_failures += 1
            if not self._registry_down:
                self._registry_down = True
                logger.warning("registry unavailable for lookups, reading the DHT: %s", exc)
            return await self._from_dht(service, region, limit, reason=exc)
        if self._registry_down:
            self._registry_down = False
            logger.info("registry answers lookups again")
        for provider in marked:
            if provider.stale:
                self._held[(provider.record.worker_id, provider.record.seq)] = True
        found = [provider.record for provider in marked]
        if found or self.dht is None:
            return found, "redis"
        # A worker that joined over the DHT seconds ago may not have reached Redis yet.
        try:
            return await self._from_dht(service, region, limit, reason=None)
        except BackendUnavailable:
            return found, "redis"

    def servable(self, record: WorkerRecord, now: float) -> bool:
        """Live, or held by the registry through a partition (its lease ended on purpose)."""
        return not record.is_expired(now) or (record.worker_id, record.seq) in self._held

    async def _from_dht(
        self, service: str, region: str | None, limit: int, *, reason: Exception | None
    ) -> tuple[list[WorkerRecord], str]:
        if self.dht is None:
            raise BackendUnavailable(f"registry unavailable ({reason}) and no DHT node configured")
        if self._budget.hit(DHT_READS, "dht") is not None:
            self.dht_reads_refused += 1
            raise BackendUnavailable(f"registry unavailable ({reason}); DHT reads over budget")
        self.dht_reads += 1
        try:
            found = await self.dht.lookup(service, limit=max(limit * 4, limit))
        except (DHTError, RuntimeError, OSError) as exc:
            raise BackendUnavailable(f"registry ({reason}) and DHT ({exc}) both failed") from exc
        if region:
            found.sort(key=lambda r: (r.region != region, r.load, r.worker_id))
        return found[:limit], "dht"
