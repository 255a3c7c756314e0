"""The bridge's DHT side: files the records that reach the bridge's node for Redis, keeps the
node joined (probing a few contacts; after a cut, retrying bootstrap peers and remembered
contacts with backoff), and publishes into the DHT what Redis learned first."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from dht_bridge.backoff import Backoff
from dht_bridge.bridge.state import BridgeState
from dht_bridge.dht import shards
from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import BootstrapError, DHTError, RecordError
from dht_bridge.records import WorkerRecord

logger = logging.getLogger(__name__)

PROBE_CONTACTS = 3
# Consecutive probes without an answer before the DHT side counts as lost: on a loaded machine
# a few pings can miss their timeout without anything being cut.
PROBE_MISSES = 2
REMEMBERED_PEERS = 16


class DHTSide:
    """The node's storage hook, DHT health and rejoins, and publishing into the DHT."""

    def __init__(
        self, state: BridgeState, node: DHTNode, bootstrap: Iterable[tuple[str, int]]
    ) -> None:
        self.state = state
        self.node = node
        self._bootstrap = list(dict.fromkeys(bootstrap))
        self._remembered: list[tuple[str, int]] = []
        self._backoff = Backoff(state.settings.backoff, state.rng)
        self._probe_misses = 0
        self._alone_logged = False

    # -- DHT to Redis ----------------------------------------------------------------------

    def on_merge(self, key: str, records: list[WorkerRecord]) -> None:
        """The node's storage hook: records that changed what the node holds. Runs inside
        datagram handling, so it only files them; the Redis side's flush round writes them."""
        parsed = shards.parse_service_key(key)
        if parsed is not None:
            self.state.note_service(parsed[0])
        for record in records:
            self.state.seen_in_dht(record)
            self.state.offer(record)

    # -- health ----------------------------------------------------------------------------

    async def health_round(self) -> None:
        """Probe while up; count the side lost after PROBE_MISSES misses; then rejoin."""
        state = self.state
        wake = state.wakes.dht
        if await self._probe():
            self._probe_misses = 0
            self._backoff.reset()
            if not state.dht_up:
                self._back()
            self._remember_peers()
            await state.wakes.pause(state.settings.probe_interval, wake)
            return
        self._probe_misses += 1
        if state.dht_up and self._probe_misses < PROBE_MISSES:
            await state.wakes.pause(state.settings.probe_interval / 2, wake)
            return
        if state.dht_up:
            state.dht_up = False
            state.counters.dht_outages += 1
            logger.warning(
                "DHT side unreachable: no contact answers; Redis keeps serving, retrying "
                "bootstrap peers with backoff"
            )
            state.wakes.preserve.set()  # judge self-preservation now
        if await self._rejoin():
            self._back()
            return
        if not self._peers() and not self._alone_logged:
            self._alone_logged = True
            logger.info("no DHT peers known yet: waiting for nodes to contact this one")
        await state.wakes.pause(self._backoff.next(), wake)

    async def _probe(self) -> bool:
        """True when one of a few contacts answers a ping."""
        contacts = self.node.rpc.router.contacts()
        if not contacts:
            return False
        sample = self.state.rng.sample(contacts, min(PROBE_CONTACTS, len(contacts)))
        replies = await asyncio.gather(*(self.node.rpc.call_ping(c) for c in sample))
        return any(ok for ok, _ in replies)

    def _peers(self) -> list[tuple[str, int]]:
        own = self.node.address
        return [p for p in dict.fromkeys(self._bootstrap + self._remembered) if p != own]

    async def _rejoin(self) -> bool:
        peers = self._peers()
        if not peers:
            return False
        self.state.counters.bootstrap_attempts += 1
        try:
            await self.node.bootstrap(peers)
        except BootstrapError as exc:
            logger.debug("rejoin failed: %s", exc)
            return False
        return True

    def _remember_peers(self) -> None:
        # Contacts seen while connected are peers to retry after a cut, beside the configured.
        neighbours = self.node.bootstrappable_neighbors()
        if neighbours:
            self._remembered = neighbours[:REMEMBERED_PEERS]

    def _back(self) -> None:
        state = self.state
        was_lost = state.counters.dht_outages > 0
        state.dht_up = True
        if was_lost:
            logger.info(
                "DHT side reachable again (%d contacts): republishing %d records Redis learned",
                len(self.node.rpc.router),
                len(state.fallback),
            )
        else:
            logger.info("DHT side reachable (%d contacts)", len(self.node.rpc.router))
        for record in state.fallback.values():
            state.to_publish[record.worker_id] = record
        state.wakes.publish.set()
        state.wakes.sync.set()

    # -- Redis to DHT ----------------------------------------------------------------------

    async def publish_round(self) -> None:
        """Publish what waits once something is filed, or every sync interval, while up."""
        state = self.state
        await state.wakes.pause(state.settings.sync_interval, state.wakes.publish)
        if not state.dht_up or not state.to_publish or state.wakes.stop.is_set():
            return
        batch = list(state.to_publish.values())
        state.to_publish.clear()
        gate = asyncio.Semaphore(state.settings.publish_concurrency)

        async def one(record: WorkerRecord) -> None:
            async with gate:
                await self._publish(record)

        await asyncio.gather(*(one(record) for record in batch))

    async def _publish(self, record: WorkerRecord) -> None:
        state = self.state
        if record.is_expired(state.clock()):
            state.fallback.pop(record.worker_id, None)
            return
        state.counters.publish_attempts += 1
        try:
            report = await self.node.publish(record)
        except RecordError as exc:
            state.fallback.pop(record.worker_id, None)
            logger.warning("not publishing %s: %s", record.worker_id, exc)
            return
        except DHTError as exc:
            state.counters.publish_failures += 1
            logger.debug(
                "publish of %s failed (the next sync pass retries): %s", record.worker_id, exc
            )
            return
        if report.stored:
            state.counters.merged_to_dht += 1
            state.counters.last_dht_sync = state.clock()
            state.seen_in_dht(record)  # in the DHT now: sync passes need not publish it again
        else:
            state.counters.publish_failures += 1


__all__ = ["DHTSide"]
