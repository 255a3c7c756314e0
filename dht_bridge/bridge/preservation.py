"""Self-preservation, as Eureka does: a bridge that has lost the DHT side cannot tell a
partition from mass death, so when many leases in Redis would lapse at once it holds them,
marked stale, until the DHT is back; then records whose lease ended go and the rest are fresh
again. Tombstones still remove at once (the registry's scripts see to that)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dht_bridge.bridge.metrics import BridgeCounters
from dht_bridge.bridge.state import BridgeSettings
from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry

logger = logging.getLogger(__name__)


class SelfPreservation:
    """Judges the leases in Redis while the DHT side is lost, holds them, and ends the holds.

    Registry errors (RegistryError) reach the caller, which knows what Redis being down means.
    """

    def __init__(
        self, registry: Registry, settings: BridgeSettings, counters: BridgeCounters
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.counters = counters
        self.active = False

    async def judge(self, stored: Sequence[WorkerRecord], now: float) -> None:
        """If the leases lapsing before the next round are more than the stale share of the
        live ones (or preservation is already on), hold every lease that would lapse before
        the hold ends."""
        live = [r for r in stored if r.live]
        if not live:
            return
        # The next round may come up to a tenth later (jitter): look that far, and more.
        horizon = now + 1.5 * self.settings.sync_interval
        lapsing = sum(1 for r in live if r.expires_at < horizon)
        share = lapsing / len(live)
        if not self.active and share <= self.settings.stale_share:
            logger.debug(
                "%d of %d leases lapse soon (%.0f%%): below the self-preservation share, "
                "letting them lapse",
                lapsing,
                len(live),
                100 * share,
            )
            return
        # Hold all that would lapse before the hold itself ends, not only before the next
        # round: a round that comes late (a busy loop, a slow Redis) must find nothing lapsed.
        until = now + self.settings.hold_intervals * self.settings.sync_interval
        held = [r.worker_id for r in live if r.expires_at < until]
        await self.registry.hold(held, lapse_before=until, until=until)
        self.counters.held = await self.registry.held_count()
        if not self.active:
            self.active = True  # only once the holds are in Redis
            logger.warning(
                "self-preservation ON: the DHT side is lost and %d of %d leases (%.0f%% > "
                "%.0f%%) would lapse within %.0f s; keeping them in Redis, marked stale, until "
                "the DHT is back",
                lapsing,
                len(live),
                100 * share,
                100 * self.settings.stale_share,
                horizon - now,
            )

    async def release(self) -> None:
        """End the holds: records whose lease ended go, the rest are fresh again. Also ends
        holds a dead or cut-off bridge left behind."""
        if not (self.active or await self.registry.held_count()):
            return
        removed, restored = await self.registry.release()
        self.counters.released += removed
        if self.active:
            logger.warning(
                "self-preservation OFF: DHT back; %d held records whose lease ended removed, "
                "%d fresh again",
                removed,
                restored,
            )
        self.active = False
        self.counters.held = 0


__all__ = ["SelfPreservation"]
