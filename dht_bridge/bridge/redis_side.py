"""The bridge's Redis side: writes what the DHT taught it into Redis by the merge rule (the upsert
script) or, while Redis is down, into the journal, replayed when Redis is back; reads the change
events (`rma:events`) of records registered through the router, to publish them into the DHT;
and holds leases while the DHT side is lost (self-preservation)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from dht_bridge.backoff import Backoff
from dht_bridge.bridge.journal import Journal
from dht_bridge.bridge.preservation import SelfPreservation
from dht_bridge.bridge.state import BRIDGE_ORIGIN, BridgeState
from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import RecordError, RecordExpired, RegistryError
from dht_bridge.identity import WORKER_ID_RE
from dht_bridge.records import WorkerRecord, supersedes, validate_parsed
from dht_bridge.registry.registry import Registry

logger = logging.getLogger(__name__)


class RedisSide:
    """Redis health, the writes into Redis or the journal, the events channel, and the holds.

    Registry errors never leave it: each marks Redis down, and the health round brings it back.
    """

    def __init__(
        self,
        state: BridgeState,
        registry: Registry,
        journal: Journal,
        node: DHTNode,
        preservation: SelfPreservation,
    ) -> None:
        self.state = state
        self.registry = registry
        self.journal = journal
        # Only to check records before they are written: the node's verifier remembers them.
        self.node = node
        self.preservation = preservation
        self._backoff = Backoff(state.settings.backoff, state.rng)
        self._events_backoff = Backoff(state.settings.backoff, state.rng)
        self._write_lock = asyncio.Lock()
        self._journal_failing = False  # said once per episode

    # -- writes ----------------------------------------------------------------------------

    async def flush_round(self) -> None:
        """Write what waits once something is offered, or every sync interval."""
        state = self.state
        await state.wakes.pause(state.settings.sync_interval, state.wakes.flush)
        if state.pending and not state.wakes.stop.is_set():
            # Gather what arrives in a short window into one pipelined write.
            await state.wakes.pause(state.settings.flush_delay)
        await self.flush()

    async def flush(self) -> None:
        """Write pending records to Redis, or to the journal while Redis is down."""
        state = self.state
        async with self._write_lock:
            if not state.pending:
                return
            now = state.clock()
            batch = self._usable(list(state.pending.values()), now)
            state.pending, state.pending_since = {}, None
            if not batch:
                return
            if state.redis_up:
                try:
                    applied = await self.registry.upsert_many(batch, origin=BRIDGE_ORIGIN)
                except RegistryError as exc:
                    self.mark_down(exc)
                else:
                    for record in batch:
                        state.in_redis[record.worker_id] = record
                    state.counters.merged_to_redis += sum(applied)
                    state.counters.last_redis_sync = now
                    return
            try:
                written = await asyncio.to_thread(self.journal.append, batch)
            except OSError as exc:
                self._keep(batch, exc)
                return
            self._journal_failing = False
            state.counters.journaled += len(written)
            for record in written:
                state.in_redis[record.worker_id] = record

    def _keep(self, batch: list[WorkerRecord], exc: OSError) -> None:
        """The journal could not be written (a full disk): keep the batch in memory, where
        the next flush tries again, unless something newer came for a worker meanwhile."""
        state = self.state
        for record in batch:
            waiting = state.pending.get(record.worker_id)
            if waiting is None or supersedes(record, waiting):
                state.pending[record.worker_id] = record
        if state.pending_since is None:
            state.pending_since = state.clock()
        state.counters.journal_failures += 1
        if not self._journal_failing:
            self._journal_failing = True
            logger.error(
                "cannot write the journal %s (%s): %d records kept in memory until it can be "
                "written or Redis is back; they are lost if the bridge stops meanwhile",
                self.journal.path,
                exc,
                len(state.pending),
            )

    def _usable(self, records: Iterable[WorkerRecord], now: float) -> list[WorkerRecord]:
        """Records that Redis would take: expired ones are dropped, invalid ones logged."""
        usable = []
        for record in records:
            try:
                # The node's verifier remembers records it checked: no second Ed25519 check.
                verified = self.node.verifier.confirm(record)
                validate_parsed(record, self.node.policy, now=now, verified=verified)
            except RecordExpired:
                continue
            except RecordError as exc:
                logger.warning("not syncing a record of %s: %s", record.worker_id, exc)
                continue
            usable.append(record)
        return usable

    # -- health and the journal ------------------------------------------------------------

    def mark_down(self, exc: Exception) -> None:
        """A Redis command failed: journal from now on, and let the health round retry."""
        state = self.state
        if state.redis_up:
            state.redis_up = False
            state.counters.redis_outages += 1
            logger.warning(
                "Redis unreachable (%s): journaling what it must learn to %s",
                exc,
                self.journal.path,
            )
        state.wakes.redis_lost.set()

    async def health_round(self) -> None:
        """While up, ping every probe interval; while down, retry with backoff and recover."""
        state = self.state
        if state.redis_up:
            # Writes notice an outage first; the ping notices one while nothing is written.
            await state.wakes.pause(state.settings.probe_interval, state.wakes.redis_lost)
            if state.wakes.stop.is_set() or not state.redis_up:
                return
            try:
                await self.registry.ping()
            except RegistryError as exc:
                self.mark_down(exc)
            return
        try:
            # Connections from before the outage are dead: drop them before they fail a write.
            await self.registry.drop_idle_connections()
            await self.registry.ping()
            await self._recover()
        except RegistryError as exc:
            if self._backoff.attempts == 0 and state.counters.redis_outages == 0:
                # Never up since the start (a wrong URL, a Redis not started yet): said once,
                # as an outage is, or an operator sees nothing until the first write fails.
                logger.warning(
                    "Redis not reachable since the start (%s): journaling what it must learn "
                    "to %s until it answers",
                    exc,
                    self.journal.path,
                )
            else:
                logger.debug("Redis still unreachable: %s", exc)
            await state.wakes.pause(self._backoff.next())
        else:
            self._backoff.reset()

    async def _recover(self) -> None:
        """Replay the journal into Redis and truncate it; then Redis is up again."""
        state = self.state
        async with self._write_lock:
            replay = await asyncio.to_thread(self.journal.replay)
            records = self._usable(replay.records, state.clock())
            applied = 0
            if records:
                results = await self.registry.upsert_many(records, origin=BRIDGE_ORIGIN)
                applied = sum(results)
            await asyncio.to_thread(self.journal.truncate, replay.end)
            state.counters.replayed += len(records)
            state.counters.merged_to_redis += applied
            # A restarted Redis may be empty: forget what we believed it held, and let the
            # next pass compare against what it really holds.
            state.in_redis = {r.worker_id: r for r in records}
            state.redis_up = True
            state.wakes.redis_lost.clear()
            state.counters.last_redis_sync = state.clock()
        logger.info(
            "Redis reachable: replayed %d journaled records (%d applied, %d lines, %d unreadable)",
            len(records),
            applied,
            replay.lines,
            replay.skipped,
        )
        state.wakes.sync.set()

    # -- change events (Redis to DHT) ------------------------------------------------------

    async def events_round(self) -> None:
        """One subscription to the events channel, until stop or a lost connection. It polls
        and stops by the flag: redis-py's pubsub read does not reliably honour cancellation
        on Python 3.11."""
        stop = self.state.wakes.stop
        try:
            async with self.registry.subscribe_events() as events:
                self._events_backoff.reset()
                while not stop.is_set():
                    event = await events.get()
                    if event is not None:
                        await self._on_event(event)
        except RegistryError as exc:
            logger.debug("events subscription lost: %s", exc)
        await self.state.wakes.pause(self._events_backoff.next())

    async def _on_event(self, event: dict[str, Any]) -> None:
        """A record written by someone other than a bridge: file it for the DHT."""
        if event.get("type") != "record" or event.get("origin") == BRIDGE_ORIGIN:
            return
        wid = event.get("worker_id")
        if not isinstance(wid, str) or not WORKER_ID_RE.fullmatch(wid):
            return
        try:
            record = await self.registry.get(wid)
        except RegistryError as exc:
            logger.debug("cannot read %s after its event: %s", wid, exc)
            return
        if record is None or record.is_expired(self.state.clock()):
            return
        known = self.state.in_redis.get(wid)
        if known is None or supersedes(record, known):
            self.state.in_redis[wid] = record
        self.state.queue_publish(record)

    # -- self-preservation -----------------------------------------------------------------

    async def preserve_round(self) -> None:
        """While the DHT side is lost, judge self-preservation every sync interval. Its own
        loop, not the sync pass: a pass can be slow while the DHT goes away, and the holds
        must land before the leases lapse."""
        state = self.state
        await state.wakes.pause(state.jittered(state.settings.sync_interval), state.wakes.preserve)
        if state.wakes.stop.is_set() or state.dht_up or not state.redis_up:
            return
        try:
            stored = await self.registry.records(limit=state.settings.max_records)
            await self.preservation.judge(stored, state.clock())
        except RegistryError as exc:
            self.mark_down(exc)

    async def release_holds(self) -> None:
        """After a whole pass with the DHT back: end the holds (see preservation)."""
        try:
            await self.preservation.release()
        except RegistryError as exc:
            self.mark_down(exc)


__all__ = ["RedisSide"]
