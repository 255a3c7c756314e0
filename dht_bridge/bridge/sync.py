"""The bridge's anti-entropy pass: every sync interval (or when a side comes back), read what
Redis holds and every record in the shards of every known service, write each side's newer
records to the other, end self-preservation's holds after a whole pass, and forget what
expired. It catches whatever the hook and the events channel missed while a side was away."""

from __future__ import annotations

import asyncio
import logging
import time

from dht_bridge.bridge.redis_side import RedisSide
from dht_bridge.bridge.state import BridgeState
from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import RegistryError
from dht_bridge.records import WorkerRecord, merge_into, supersedes
from dht_bridge.registry.registry import Registry

logger = logging.getLogger(__name__)

# Own-key reads per pass of workers the shard walk missed (see `SyncPass._read_vanished`).
MAX_VANISHED_READS = 256


class SyncPass:
    """Full passes both ways, one at a time; reads Redis and the DHT, writes through the sides."""

    def __init__(
        self, state: BridgeState, registry: Registry, node: DHTNode, redis_side: RedisSide
    ) -> None:
        self.state = state
        self.registry = registry
        self.node = node
        self.redis_side = redis_side
        self._lock = asyncio.Lock()

    async def round(self) -> None:
        """One pass every sync interval (jittered), or at once when woken."""
        state = self.state
        await state.wakes.pause(state.jittered(state.settings.sync_interval), state.wakes.sync)
        if not state.wakes.stop.is_set():
            await self.once()

    async def wait_synced(self, passes: int = 1) -> None:
        """Return once `passes` passes that started after this call are complete; asks for
        them at once rather than at the next interval."""
        counters, wakes = self.state.counters, self.state.wakes
        target = counters.syncs + passes + (1 if self._lock.locked() else 0)
        while counters.syncs < target and not wakes.stop.is_set():
            wakes.synced.clear()
            wakes.sync.set()
            await wakes.synced.wait()

    async def once(self) -> None:
        """One pass both ways (see the module's docstring)."""
        async with self._lock:
            try:
                await self._pass()
            finally:
                self.state.counters.syncs += 1
                self.state.wakes.synced.set()

    async def _pass(self) -> None:
        state = self.state
        now = state.clock()
        started = time.monotonic()
        redis_view = await self._read_redis() if state.redis_up else None
        redis_read = time.monotonic()
        outages = state.counters.dht_outages
        dht_view = await self._read_dht(now) if state.dht_up else None
        dht_read = time.monotonic()
        if dht_view is not None:
            for record in dht_view.values():
                if redis_view is None:
                    state.offer(record)
                else:
                    # Against what Redis really holds: it may have restarted empty.
                    state.offer(record, known=redis_view.get(record.worker_id), force=True)
        if redis_view is not None and state.dht_up:
            for record in redis_view.values():
                seen = state.dht_seen.get(record.worker_id)
                if record.is_expired(now) or (seen is not None and not supersedes(record, seen)):
                    continue
                state.queue_publish(record)
        waiting = len(state.pending)
        await self.redis_side.flush()
        flushed = time.monotonic()
        # Only a read that ran with the DHT up throughout may end holds: one that a cut
        # overtook saw less than the DHT holds, and would drop the records being held.
        whole = dht_view is not None and state.dht_up and state.counters.dht_outages == outages
        if whole and state.redis_up:
            await self.redis_side.release_holds()
        state.forget(now)
        logger.debug(
            "sync pass: Redis read %.3f s (%s records), DHT read %.3f s (%s records), "
            "%d written in %.3f s",
            redis_read - started,
            "-" if redis_view is None else len(redis_view),
            dht_read - redis_read,
            "-" if dht_view is None else len(dht_view),
            waiting,
            flushed - dht_read,
        )

    async def _read_redis(self) -> dict[str, WorkerRecord] | None:
        state = self.state
        try:
            for service in await self.registry.services():
                state.note_service(service)
            stored = await self.registry.records(limit=state.settings.max_records)
        except RegistryError as exc:
            self.redis_side.mark_down(exc)
            return None
        view = {record.worker_id: record for record in stored}
        for record in stored:
            for name in record.services:
                state.note_service(name)
        state.in_redis = dict(view)
        state.counters.last_redis_sync = state.clock()
        return view

    async def _read_dht(self, now: float) -> dict[str, WorkerRecord]:
        state = self.state
        gate = asyncio.Semaphore(state.settings.service_concurrency)

        async def one(service: str) -> list[WorkerRecord]:
            async with gate:
                return await self.node.service_records(service)

        services = sorted(state.services)
        results = await asyncio.gather(*(one(s) for s in services), return_exceptions=True)
        view: dict[str, WorkerRecord] = {}
        for service, result in zip(services, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                logger.warning("reading the shards of %s failed: %s", service, result)
                continue
            merge_into(view, result, now=now)
        await self._read_vanished(view, now)
        for record in view.values():
            state.seen_in_dht(record)
        state.counters.last_dht_sync = state.clock()
        return view

    async def _read_vanished(self, view: dict[str, WorkerRecord], now: float) -> None:
        """Read the own key of live workers the shard walk did not return.

        A walk can miss a worker: a holder serving a copy of a shard made before it was
        marked overflowed sends the reader no further down, where the worker is filed. Its
        `worker:<id>` key still holds its newest record, a tombstone included, so a worker
        that left is not taken for one that merely vanished. Live records in Redis are read
        whatever their lease: one past it is held by self-preservation, and the release at
        the end of this pass would delete it unless the DHT shows a newer one.
        """
        state = self.state
        known = {
            wid for wid, record in state.in_redis.items() if wid not in view and record.live
        } | {
            wid
            for wid, record in state.dht_seen.items()
            if wid not in view and record.live and not record.is_expired(now)
        }
        if not known:
            return
        ids = sorted(known)
        if len(ids) > MAX_VANISHED_READS:
            ids = state.rng.sample(ids, MAX_VANISHED_READS)  # each gets its turn over passes
        gate = asyncio.Semaphore(state.settings.publish_concurrency)

        async def one(wid: str) -> WorkerRecord | None:
            async with gate:
                return await self.node.get_record(wid)

        found = await asyncio.gather(*(one(wid) for wid in ids), return_exceptions=True)
        state.counters.vanished_reads += len(ids)
        merge_into(view, [r for r in found if isinstance(r, WorkerRecord)], now=now)


__all__ = ["SyncPass"]
