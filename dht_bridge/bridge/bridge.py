"""The bridge: keeps the Redis registry and the DHT in sync, through partitions, losing nothing.

One long-lived DHT node (a coordinator) and a Redis client, both injected. `Bridge` supervises
three parts that share one `BridgeState` and run as rounds in one task group: the DHT side
(`dht_side`: records reaching the node, DHT health, publishing), the Redis side (`redis_side`:
writes, the journal, change events, holds) and the anti-entropy pass (`sync`).

- Redis down. The DHT side keeps going; what Redis must learn goes into the journal (fsynced,
  bounded). When Redis answers again the journal is replayed, merged and truncated, then a full
  pass rewrites whatever a restarted, empty Redis lacks.
- DHT cut off. Redis keeps serving; the bridge retries its bootstrap peers (and contacts it knew)
  with exponential backoff and jitter, and when it is back republishes what Redis learned.
- Self-preservation, as Eureka does. While the DHT side is lost, if more than `stale_share` of the
  live leases in Redis would lapse within one sync interval, that is a partition, not mass death:
  every lease that would lapse before the hold ends is held in Redis, marked stale, renewed each
  interval until the DHT is back (then records whose lease ended are removed). Tombstones still
  remove at once.
- Loops. A bridge's own writes carry `origin: bridge` in their event, so no bridge copies a
  record that came from the DHT back into it. Several bridges may run over one Redis and one
  DHT: every write goes through the merge rule, so they converge on the same newest records and
  never undo each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from dht_bridge.bridge.dht_side import DHTSide
from dht_bridge.bridge.journal import Journal
from dht_bridge.bridge.metrics import BridgeCounters
from dht_bridge.bridge.preservation import SelfPreservation
from dht_bridge.bridge.redis_side import RedisSide
from dht_bridge.bridge.state import (
    BRIDGE_ORIGIN,
    DEFAULT_MAX_RECORDS,
    DEFAULT_PROBE_INTERVAL,
    DEFAULT_STALE_SHARE,
    DEFAULT_SYNC_INTERVAL,
    BridgeSettings,
    BridgeState,
)
from dht_bridge.bridge.sync import SyncPass
from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import RegistryError
from dht_bridge.registry.registry import Registry

logger = logging.getLogger(__name__)

# A report outlives this many probe intervals: a bridge that stops reporting drops off the page.
REPORT_LIFETIMES = 3


class Bridge:
    """Syncs an injected DHT node and Registry, journaling to an injected Journal.

    `clock` is the wall clock (leases are unix times). The caller opens and closes the node,
    the registry and the journal; `run(stop)` works until `stop` is set, then writes what it
    still holds to Redis or the journal.
    """

    def __init__(
        self,
        node: DHTNode,
        registry: Registry,
        journal: Journal,
        *,
        settings: BridgeSettings | None = None,
        bootstrap: Iterable[tuple[str, int]] = (),
        services: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.registry = registry
        self.journal = journal
        self.settings = settings or BridgeSettings()
        self.clock = clock
        self._state = BridgeState(
            self.settings, services=services, clock=clock, rng=rng or random.Random()
        )
        self.counters: BridgeCounters = self._state.counters
        self.preservation = SelfPreservation(registry, self.settings, self.counters)
        self._redis = RedisSide(self._state, registry, journal, node, self.preservation)
        self._dht = DHTSide(self._state, node, bootstrap)
        self._sync = SyncPass(self._state, registry, node, self._redis)

    # -- life cycle ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Sync until `stop` is set; then deliver what is pending (Redis, else the journal)."""
        wakes = self._state.wakes
        wakes.stop = stop
        await asyncio.to_thread(self.journal.open)
        previous = self.node.storage.on_merge
        self.node.storage.on_merge = self._dht.on_merge
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(wakes.relay_stop(), name="bridge-stop")
                for name, round_ in (
                    ("flush", self._redis.flush_round),
                    ("redis", self._redis.health_round),
                    ("dht", self._dht.health_round),
                    ("sync", self._sync.round),
                    ("publish", self._dht.publish_round),
                    ("preserve", self._redis.preserve_round),
                    ("events", self._redis.events_round),
                    ("report", self._report_round),
                ):
                    group.create_task(self._loop(name, round_), name=f"bridge-{name}")
        finally:
            self.node.storage.on_merge = previous
            await self._redis.flush()
            logger.info("bridge stopped; %d records left in the journal", self.journal.depth)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Bridge]:
        """Run in the background for the duration of an `async with` (tests, the bench)."""
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self.run(stop), name="bridge")
        try:
            yield self
        finally:
            stop.set()
            await task

    async def _report_round(self) -> None:
        """Every probe interval, leave the bridge's figures in Redis for the routers' page."""
        settings = self._state.settings
        await self._state.wakes.pause(settings.probe_interval)
        if self._state.wakes.stop.is_set() or not self.redis_up or self.node.protocol is None:
            return
        try:
            await self.registry.report_bridge(
                self.node.node.id.hex(),
                self.figures(),
                ttl=REPORT_LIFETIMES * settings.probe_interval,
            )
        except RegistryError as exc:
            logger.debug("bridge report not written: %s", exc)  # the health round notices

    async def _loop(self, name: str, round_: Callable[[], Awaitable[None]]) -> None:
        """Run one of the bridge's rounds until stop; an unexpected error is logged and the
        loop goes on (a long-lived process must not stop syncing over one bad round)."""
        wakes = self._state.wakes
        while not wakes.stop.is_set():
            try:
                await round_()
            except Exception:
                logger.exception("bridge %s round failed; going on", name)
                await wakes.pause(1.0)

    async def wait_synced(self, passes: int = 1) -> None:
        """Return once `passes` sync passes that started after this call are complete (for
        tests and the bench); asks for them at once rather than at the next interval."""
        await self._sync.wait_synced(passes)

    # -- figures ---------------------------------------------------------------------------

    @property
    def redis_up(self) -> bool:
        """Does Redis answer (else what it must learn goes to the journal)?"""
        return self._state.redis_up

    @property
    def dht_up(self) -> bool:
        """Does a DHT contact answer the bridge's probes?"""
        return self._state.dht_up

    @property
    def preserving(self) -> bool:
        """Is self-preservation holding leases in Redis (see preservation)?"""
        return self.preservation.active

    @property
    def services(self) -> list[str]:
        """The services whose shards are polled."""
        return sorted(self._state.services)

    def figures(self) -> dict[str, float]:
        """Every exported figure by metric name (see metrics.METRICS)."""
        now = self.clock()
        c = self.counters
        waiting = [t for t in (self._state.pending_since, self.journal.oldest) if t is not None]
        contacts = len(self.node.rpc.router) if self.node.protocol is not None else 0
        return {
            "rma_bridge_sync_lag_seconds": max(0.0, now - min(waiting)) if waiting else 0.0,
            "rma_bridge_journal_records": self.journal.depth,
            "rma_bridge_journal_bytes": self.journal.size,
            "rma_bridge_journal_dropped_total": self.journal.dropped,
            "rma_bridge_journaled_total": c.journaled,
            "rma_bridge_journal_write_failures_total": c.journal_failures,
            "rma_bridge_replayed_total": c.replayed,
            "rma_bridge_merged_to_redis_total": c.merged_to_redis,
            "rma_bridge_merged_to_dht_total": c.merged_to_dht,
            "rma_bridge_publish_attempts_total": c.publish_attempts,
            "rma_bridge_publish_failures_total": c.publish_failures,
            "rma_bridge_redis_up": int(self.redis_up),
            "rma_bridge_dht_up": int(self.dht_up),
            "rma_bridge_redis_outages_total": c.redis_outages,
            "rma_bridge_dht_outages_total": c.dht_outages,
            "rma_bridge_bootstrap_attempts_total": c.bootstrap_attempts,
            "rma_bridge_last_redis_sync_timestamp": c.last_redis_sync,
            "rma_bridge_last_dht_sync_timestamp": c.last_dht_sync,
            "rma_bridge_last_redis_sync_age_seconds": _age(now, c.last_redis_sync),
            "rma_bridge_last_dht_sync_age_seconds": _age(now, c.last_dht_sync),
            "rma_bridge_self_preservation": int(self.preserving),
            "rma_bridge_held_records": c.held,
            "rma_bridge_released_total": c.released,
            "rma_bridge_syncs_total": c.syncs,
            "rma_bridge_vanished_reads_total": c.vanished_reads,
            "rma_bridge_known_services": len(self._state.services),
            "rma_bridge_dht_contacts": contacts,
            "rma_bridge_dht_keys": len(self.node.storage),
            "rma_bridge_dht_keys_refused_total": (
                self.node.storage.refused_full + self.node.storage.refused_quota
            ),
            "rma_bridge_dht_refused_total": (
                self.node.storage.refused_checks
                + (self.node.rpc.stats.over_budget if self.node.protocol is not None else 0)
            ),
        }


def _age(now: float, then: float) -> float:
    return max(0.0, now - then) if then else -1.0


__all__ = [
    "BRIDGE_ORIGIN",
    "DEFAULT_MAX_RECORDS",
    "DEFAULT_PROBE_INTERVAL",
    "DEFAULT_STALE_SHARE",
    "DEFAULT_SYNC_INTERVAL",
    "Bridge",
    "BridgeSettings",
]
