"""The bridge: keeps the Redis registry and the DHT in sync, through partitions, losing nothing.

One long-lived DHT node (a coordinator) and a Redis client, both injected. What it does:

- DHT to Redis. Records that reach the bridge's node (its storage's `on_merge` hook) and, every
  sync interval, every record in the shards of every known service are merged into Redis by the
  merge rule (the upsert script). Services are learned from Redis, from the DHT, and from options.
- Redis to DHT. Records registered through the router's fallback path arrive as change events
  on `rma:events`; the bridge reads each and publishes it into the DHT. Its own writes carry
  `origin: bridge` in their event, so no bridge copies a record that came from the DHT back into
  it; a periodic anti-entropy pass catches events missed while disconnected.
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

Several bridges may run over one Redis and one DHT: every write goes through the merge rule, so
they converge on the same newest records and never undo each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dht_bridge.backoff import Backoff, BackoffPolicy, ExponentialBackoff
from dht_bridge.bridge.journal import Journal
from dht_bridge.bridge.metrics import BridgeCounters
from dht_bridge.bridge.preservation import SelfPreservation
from dht_bridge.dht import shards
from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import BootstrapError, DHTError, RecordError, RecordExpired, RegistryError
from dht_bridge.identity import WORKER_ID_RE
from dht_bridge.records import (
    SERVICE_RE,
    WorkerRecord,
    merge_into,
    supersedes,
    validate_parsed,
)
from dht_bridge.registry.registry import Registry

logger = logging.getLogger(__name__)

# The origin a bridge writes into change events; events with it are never copied into the DHT.
BRIDGE_ORIGIN = "bridge"
DEFAULT_SYNC_INTERVAL = 10.0
DEFAULT_STALE_SHARE = 0.15
DEFAULT_PROBE_INTERVAL = 5.0
DEFAULT_MAX_RECORDS = 100_000
PROBE_CONTACTS = 3
# Consecutive probes without an answer before the DHT side counts as lost: on a loaded machine
# a few pings can miss their timeout without anything being cut.
PROBE_MISSES = 2
# Own-key reads per pass of workers the shard walk missed (see `_read_vanished`).
MAX_VANISHED_READS = 256
REMEMBERED_PEERS = 16
# Services with no record seen on either side for this many sync intervals stop being polled.
SERVICE_FORGET_INTERVALS = 30


@dataclass(frozen=True)
class BridgeSettings:
    """How often the bridge syncs and probes, and when it preserves itself."""

    sync_interval: float = DEFAULT_SYNC_INTERVAL
    stale_share: float = DEFAULT_STALE_SHARE
    probe_interval: float = DEFAULT_PROBE_INTERVAL
    # Records that reach the node are gathered this long before one pipelined Redis write.
    flush_delay: float = 0.05
    publish_concurrency: int = 16
    service_concurrency: int = 4
    # A hold lasts this many sync intervals unless renewed, so a dead bridge pins nothing long.
    hold_intervals: float = 3.0
    max_records: int = DEFAULT_MAX_RECORDS
    backoff: BackoffPolicy = field(default_factory=ExponentialBackoff)

    def __post_init__(self) -> None:
        if self.sync_interval <= 0 or self.probe_interval <= 0 or self.flush_delay < 0:
            raise ValueError("sync and probe intervals must be > 0, flush delay >= 0")
        if not 0 <= self.stale_share < 1:
            raise ValueError(f"stale share must be in [0, 1), not {self.stale_share}")
        if self.publish_concurrency < 1 or self.service_concurrency < 1:
            raise ValueError("concurrency limits must be >= 1")
        if self.hold_intervals < 2:
            raise ValueError("a hold must outlast the next sync: hold_intervals >= 2")


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
        self.counters = BridgeCounters()
        self._rng = rng or random.Random()
        self._redis_backoff = Backoff(self.settings.backoff, self._rng)
        self._dht_backoff = Backoff(self.settings.backoff, self._rng)
        self._events_backoff = Backoff(self.settings.backoff, self._rng)
        self._alone_logged = False
        self._probe_misses = 0
        self._bootstrap = list(dict.fromkeys(bootstrap))
        self._remembered: list[tuple[str, int]] = []
        self._configured = {s for s in services if SERVICE_RE.fullmatch(s)}
        self._services: dict[str, float] = dict.fromkeys(self._configured, clock())
        # Records waiting for Redis, and when the oldest of them arrived.
        self._pending: dict[str, WorkerRecord] = {}
        self._pending_since: float | None = None
        # The newest record known to be in Redis (or the journal), and seen in the DHT.
        self._in_redis: dict[str, WorkerRecord] = {}
        self._dht_seen: dict[str, WorkerRecord] = {}
        # Records Redis had before the DHT (the router's fallback path), to publish.
        self._fallback: dict[str, WorkerRecord] = {}
        self._to_publish: dict[str, WorkerRecord] = {}
        self.redis_up = False
        self.dht_up = False
        self.preservation = SelfPreservation(registry, self.settings, self.counters)
        self._stop = asyncio.Event()
        self._wake_flush = asyncio.Event()
        self._wake_sync = asyncio.Event()
        self._wake_publish = asyncio.Event()
        self._wake_dht = asyncio.Event()
        self._wake_preserve = asyncio.Event()
        self._redis_lost = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._sync_lock = asyncio.Lock()
        self._synced = asyncio.Event()

    # -- life cycle ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Sync until `stop` is set; then deliver what is pending (Redis, else the journal)."""
        self._stop = stop
        await asyncio.to_thread(self.journal.open)
        previous = self.node.storage.on_merge
        self.node.storage.on_merge = self._on_merge
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._relay_stop(), name="bridge-stop")
                for name, round_ in (
                    ("flush", self._flush_round),
                    ("redis", self._redis_round),
                    ("dht", self._dht_round),
                    ("sync", self._sync_round),
                    ("publish", self._publish_round),
                    ("preserve", self._preserve_round),
                    ("events", self._events_round),
                ):
                    group.create_task(self._loop(name, round_), name=f"bridge-{name}")
        finally:
            self.node.storage.on_merge = previous
            await self._flush()
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

    async def _relay_stop(self) -> None:
        await self._stop.wait()
        for event in (
            self._synced,
            self._wake_flush,
            self._wake_sync,
            self._wake_publish,
            self._wake_dht,
            self._wake_preserve,
            self._redis_lost,
        ):
            event.set()

    async def _loop(self, name: str, round_: Callable[[], Awaitable[None]]) -> None:
        """Run one of the bridge's rounds until stop; an unexpected error is logged and the
        loop goes on (a long-lived process must not stop syncing over one bad round)."""
        while not self._stop.is_set():
            try:
                await round_()
            except Exception:
                logger.exception("bridge %s round failed; going on", name)
                await self._pause(1.0)

    async def _pause(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """Wait `seconds`, or less if `wake` (or stop) is set; clears `wake`."""
        event = wake or self._stop
        if not event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), seconds)
        if wake is not None:
            wake.clear()

    def _jittered(self, seconds: float) -> float:
        return seconds * self._rng.uniform(0.9, 1.1)

    # -- figures ---------------------------------------------------------------------------

    @property
    def preserving(self) -> bool:
        """Is self-preservation holding leases in Redis (see preservation)?"""
        return self.preservation.active

    def figures(self) -> dict[str, float]:
        """Every exported figure by metric name (see bridge_metrics.METRICS)."""
        now = self.clock()
        c = self.counters
        waiting = [t for t in (self._pending_since, self.journal.oldest) if t is not None]
        contacts = len(self.node.rpc.router) if self.node.protocol is not None else 0
        return {
            "rma_bridge_sync_lag_seconds": max(0.0, now - min(waiting)) if waiting else 0.0,
            "rma_bridge_journal_records": self.journal.depth,
            "rma_bridge_journal_bytes": self.journal.size,
            "rma_bridge_journal_dropped_total": self.journal.dropped,
            "rma_bridge_journaled_total": c.journaled,
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
            "rma_bridge_known_services": len(self._services),
            "rma_bridge_dht_contacts": contacts,
        }

    @property
    def services(self) -> list[str]:
        """The services whose shards are polled."""
        return sorted(self._services)

    # -- DHT to Redis ----------------------------------------------------------------------

    def _on_merge(self, key: str, records: list[WorkerRecord]) -> None:
        """The node's storage hook: records that changed what the node holds. Runs inside
        datagram handling, so it only files them; the flush loop writes them."""
        service = _service_of(key)
        if service is not None:
            self._note_service(service)
        for record in records:
            self._seen_in_dht(record)
            self._offer(record)

    def _seen_in_dht(self, record: WorkerRecord) -> None:
        wid = record.worker_id
        seen = self._dht_seen.get(wid)
        if seen is None or supersedes(record, seen):
            self._dht_seen[wid] = record
        for name in record.services:
            self._note_service(name)
        fallback = self._fallback.get(wid)
        if fallback is not None and supersedes(record, fallback):
            del self._fallback[wid]  # the worker is on the DHT again; nothing to republish

    def _offer(
        self, record: WorkerRecord, *, known: WorkerRecord | None = None, force: bool = False
    ) -> None:
        """File `record` for Redis unless Redis (or what waits) already has it or newer.

        `known` is what Redis holds when the caller has just read it (`force`: trust that
        read, even when it holds nothing); otherwise the bridge's own memory of Redis.
        """
        wid = record.worker_id
        base = known if force else self._in_redis.get(wid)
        if base is not None and not supersedes(record, base):
            return
        waiting = self._pending.get(wid)
        if waiting is not None and not supersedes(record, waiting):
            return
        self._pending[wid] = record
        if self._pending_since is None:
            self._pending_since = self.clock()
        self._wake_flush.set()

    def _note_service(self, service: str) -> None:
        self._services[service] = self.clock()

    async def _flush_round(self) -> None:
        await self._pause(self.settings.sync_interval, self._wake_flush)
        if self._pending and not self._stop.is_set():
            # Gather what arrives in a short window into one pipelined write.
            await self._pause(self.settings.flush_delay)
        await self._flush()

    async def _flush(self) -> None:
        """Write pending records to Redis, or to the journal while Redis is down."""
        async with self._write_lock:
            if not self._pending:
                return
            now = self.clock()
            batch = self._usable(list(self._pending.values()), now)
            self._pending, self._pending_since = {}, None
            if not batch:
                return
            if self.redis_up:
                try:
                    applied = await self.registry.upsert_many(batch, origin=BRIDGE_ORIGIN)
                except RegistryError as exc:
                    self._mark_redis_down(exc)
                else:
                    for record in batch:
                        self._in_redis[record.worker_id] = record
                    self.counters.merged_to_redis += sum(applied)
                    self.counters.last_redis_sync = now
                    return
            written = await asyncio.to_thread(self.journal.append, batch)
            self.counters.journaled += written
            for record in batch[:written]:
                self._in_redis[record.worker_id] = record

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

    # -- Redis health and the journal ------------------------------------------------------

    def _mark_redis_down(self, exc: Exception) -> None:
        if self.redis_up:
            self.redis_up = False
            self.counters.redis_outages += 1
            logger.warning(
                "Redis unreachable (%s): journaling what it must learn to %s",
                exc,
                self.journal.path,
            )
        self._redis_lost.set()

    async def _redis_round(self) -> None:
        if self.redis_up:
            # Writes notice an outage first; the ping notices one while nothing is written.
            await self._pause(self.settings.probe_interval, self._redis_lost)
            if self._stop.is_set() or not self.redis_up:
                return
            try:
                await self.registry.ping()
            except RegistryError as exc:
                self._mark_redis_down(exc)
            return
        try:
            # Connections from before the outage are dead: drop them before they fail a write.
            await self.registry.drop_idle_connections()
            await self.registry.ping()
            await self._recover_redis()
        except RegistryError as exc:
            logger.debug("Redis still unreachable: %s", exc)
            await self._pause(self._redis_backoff.next())
        else:
            self._redis_backoff.reset()

    async def _recover_redis(self) -> None:
        """Replay the journal into Redis and truncate it; then Redis is up again."""
        async with self._write_lock:
            replay = await asyncio.to_thread(self.journal.replay)
            records = self._usable(replay.records, self.clock())
            applied = 0
            if records:
                results = await self.registry.upsert_many(records, origin=BRIDGE_ORIGIN)
                applied = sum(results)
            await asyncio.to_thread(self.journal.truncate, replay.end)
            self.counters.replayed += len(records)
            self.counters.merged_to_redis += applied
            # A restarted Redis may be empty: forget what we believed it held, and let the
            # next pass compare against what it really holds.
            self._in_redis = {r.worker_id: r for r in records}
            self.redis_up = True
            self._redis_lost.clear()
            self.counters.last_redis_sync = self.clock()
        logger.info(
            "Redis reachable: replayed %d journaled records (%d applied, %d lines, %d unreadable)",
            len(records),
            applied,
            replay.lines,
            replay.skipped,
        )
        self._wake_sync.set()

    # -- DHT health ------------------------------------------------------------------------

    async def _dht_round(self) -> None:
        if await self._probe_dht():
            self._probe_misses = 0
            self._dht_backoff.reset()
            if not self.dht_up:
                self._dht_back()
            self._remember_peers()
            await self._pause(self.settings.probe_interval, self._wake_dht)
            return
        self._probe_misses += 1
        if self.dht_up and self._probe_misses < PROBE_MISSES:
            await self._pause(self.settings.probe_interval / 2, self._wake_dht)
            return
        if self.dht_up:
            self.dht_up = False
            self.counters.dht_outages += 1
            logger.warning(
                "DHT side unreachable: no contact answers; Redis keeps serving, retrying "
                "bootstrap peers with backoff"
            )
            self._wake_preserve.set()  # judge self-preservation now
        if await self._rejoin():
            self._dht_back()
            return
        if not self._peers() and not self._alone_logged:
            self._alone_logged = True
            logger.info("no DHT peers known yet: waiting for nodes to contact this one")
        await self._pause(self._dht_backoff.next(), self._wake_dht)

    async def _probe_dht(self) -> bool:
        """True when one of a few contacts answers a ping."""
        contacts = self.node.rpc.router.contacts()
        if not contacts:
            return False
        sample = self._rng.sample(contacts, min(PROBE_CONTACTS, len(contacts)))
        replies = await asyncio.gather(*(self.node.rpc.call_ping(c) for c in sample))
        return any(ok for ok, _ in replies)

    def _peers(self) -> list[tuple[str, int]]:
        own = self.node.address
        return [p for p in dict.fromkeys(self._bootstrap + self._remembered) if p != own]

    async def _rejoin(self) -> bool:
        peers = self._peers()
        if not peers:
            return False
        self.counters.bootstrap_attempts += 1
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

    def _dht_back(self) -> None:
        was_lost = self.counters.dht_outages > 0
        self.dht_up = True
        if was_lost:
            logger.info(
                "DHT side reachable again (%d contacts): republishing %d records Redis learned",
                len(self.node.rpc.router),
                len(self._fallback),
            )
        else:
            logger.info("DHT side reachable (%d contacts)", len(self.node.rpc.router))
        for record in self._fallback.values():
            self._to_publish[record.worker_id] = record
        self._wake_publish.set()
        self._wake_sync.set()

    # -- Redis to DHT ----------------------------------------------------------------------

    async def _events_round(self) -> None:
        """One subscription to the events channel, until stop or a lost connection. It polls
        and stops by the flag: redis-py's pubsub read does not reliably honour cancellation
        on Python 3.11."""
        try:
            async with self.registry.subscribe_events() as events:
                self._events_backoff.reset()
                while not self._stop.is_set():
                    event = await events.get()
                    if event is not None:
                        await self._on_event(event)
        except RegistryError as exc:
            logger.debug("events subscription lost: %s", exc)
        await self._pause(self._events_backoff.next())

    async def _on_event(self, event: dict[str, Any]) -> None:
        """A record written by someone other than a bridge: publish it into the DHT."""
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
        if record is None or record.is_expired(self.clock()):
            return
        known = self._in_redis.get(wid)
        if known is None or supersedes(record, known):
            self._in_redis[wid] = record
        self._queue_publish(record)

    def _queue_publish(self, record: WorkerRecord) -> None:
        wid = record.worker_id
        held = self._fallback.get(wid)
        if held is not None and not supersedes(record, held):
            return
        self._fallback[wid] = record
        self._to_publish[wid] = record
        self._wake_publish.set()

    async def _publish_round(self) -> None:
        await self._pause(self.settings.sync_interval, self._wake_publish)
        if not self.dht_up or not self._to_publish or self._stop.is_set():
            return
        batch = list(self._to_publish.values())
        self._to_publish.clear()
        gate = asyncio.Semaphore(self.settings.publish_concurrency)

        async def one(record: WorkerRecord) -> None:
            async with gate:
                await self._publish(record)

        await asyncio.gather(*(one(record) for record in batch))

    async def _publish(self, record: WorkerRecord) -> None:
        if record.is_expired(self.clock()):
            self._fallback.pop(record.worker_id, None)
            return
        self.counters.publish_attempts += 1
        try:
            report = await self.node.publish(record)
        except RecordError as exc:
            self._fallback.pop(record.worker_id, None)
            logger.warning("not publishing %s: %s", record.worker_id, exc)
            return
        except DHTError as exc:
            self.counters.publish_failures += 1
            logger.debug("publish of %s failed (kept to retry): %s", record.worker_id, exc)
            return
        if report.stored:
            self.counters.merged_to_dht += 1
            self.counters.last_dht_sync = self.clock()
        else:
            self.counters.publish_failures += 1

    # -- the anti-entropy pass -------------------------------------------------------------

    async def _sync_round(self) -> None:
        await self._pause(self._jittered(self.settings.sync_interval), self._wake_sync)
        if not self._stop.is_set():
            await self.sync_once()

    async def wait_synced(self, passes: int = 1) -> None:
        """Return once `passes` sync passes that started after this call are complete (for
        tests and the bench); asks for them at once rather than at the next interval."""
        target = self.counters.syncs + passes + (1 if self._sync_lock.locked() else 0)
        while self.counters.syncs < target and not self._stop.is_set():
            self._synced.clear()
            self._wake_sync.set()
            await self._synced.wait()

    async def sync_once(self) -> None:
        """One pass both ways: compare what Redis holds with every record in the shards of
        every known service, write each side's newer records to the other, then judge
        self-preservation."""
        async with self._sync_lock:
            try:
                await self._sync_pass()
            finally:
                self.counters.syncs += 1
                self._synced.set()

    async def _sync_pass(self) -> None:
        now = self.clock()
        started = time.monotonic()
        redis_view = await self._read_redis() if self.redis_up else None
        redis_read = time.monotonic()
        outages = self.counters.dht_outages
        dht_view = await self._read_dht(now) if self.dht_up else None
        dht_read = time.monotonic()
        if dht_view is not None:
            for record in dht_view.values():
                if redis_view is None:
                    self._offer(record)
                else:
                    # Against what Redis really holds: it may have restarted empty.
                    self._offer(record, known=redis_view.get(record.worker_id), force=True)
        if redis_view is not None and self.dht_up:
            for record in redis_view.values():
                seen = self._dht_seen.get(record.worker_id)
                if record.is_expired(now) or (seen is not None and not supersedes(record, seen)):
                    continue
                self._queue_publish(record)
        waiting = len(self._pending)
        await self._flush()
        flushed = time.monotonic()
        # Only a read that ran with the DHT up throughout may end holds: one that a cut
        # overtook saw less than the DHT holds, and would drop the records being held.
        whole = dht_view is not None and self.dht_up and self.counters.dht_outages == outages
        if whole and self.redis_up:
            await self._release_holds()
        self._forget(now)
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
        try:
            for service in await self.registry.services():
                self._note_service(service)
            stored = await self.registry.records(limit=self.settings.max_records)
        except RegistryError as exc:
            self._mark_redis_down(exc)
            return None
        view = {record.worker_id: record for record in stored}
        for record in stored:
            for name in record.services:
                self._note_service(name)
        self._in_redis = dict(view)
        self.counters.last_redis_sync = self.clock()
        return view

    async def _read_dht(self, now: float) -> dict[str, WorkerRecord]:
        gate = asyncio.Semaphore(self.settings.service_concurrency)

        async def one(service: str) -> list[WorkerRecord]:
            async with gate:
                return await self.node.service_records(service)

        services = sorted(self._services)
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
            self._seen_in_dht(record)
        self.counters.last_dht_sync = self.clock()
        return view

    async def _read_vanished(self, view: dict[str, WorkerRecord], now: float) -> None:
        """Read the own key of live workers the shard walk did not return.

        A walk can miss a worker: a holder serving a copy of a shard made before it was
        marked overflowed sends the reader no further down, where the worker is filed. Its
        `worker:<id>` key still holds its newest record, a tombstone included, so a worker
        that left is not taken for one that merely vanished.
        """
        known = {
            wid
            for table in (self._in_redis, self._dht_seen)
            for wid, record in table.items()
            if wid not in view and record.live and not record.is_expired(now)
        }
        if not known:
            return
        ids = sorted(known)
        if len(ids) > MAX_VANISHED_READS:
            ids = self._rng.sample(ids, MAX_VANISHED_READS)  # each gets its turn over passes
        gate = asyncio.Semaphore(self.settings.publish_concurrency)

        async def one(wid: str) -> WorkerRecord | None:
            async with gate:
                return await self.node.get_record(wid)

        found = await asyncio.gather(*(one(wid) for wid in ids), return_exceptions=True)
        self.counters.vanished_reads += len(ids)
        merge_into(view, [r for r in found if isinstance(r, WorkerRecord)], now=now)

    async def _release_holds(self) -> None:
        """After a full pass with the DHT back: end the holds (see preservation)."""
        try:
            await self.preservation.release()
        except RegistryError as exc:
            self._mark_redis_down(exc)

    async def _preserve_round(self) -> None:
        """While the DHT side is lost, judge self-preservation every sync interval. Its own
        loop, not the sync pass: a pass can be slow while the DHT goes away, and the holds
        must land before the leases lapse."""
        await self._pause(self._jittered(self.settings.sync_interval), self._wake_preserve)
        if self._stop.is_set() or self.dht_up or not self.redis_up:
            return
        try:
            stored = await self.registry.records(limit=self.settings.max_records)
            await self.preservation.judge(stored, self.clock())
        except RegistryError as exc:
            self._mark_redis_down(exc)

    def _forget(self, now: float) -> None:
        """Drop what expired from the bridge's memory, and services nobody offers any more."""
        for table in (self._in_redis, self._dht_seen, self._fallback):
            for wid in [wid for wid, r in table.items() if r.is_expired(now)]:
                del table[wid]
        offered = {name for r in self._in_redis.values() for name in r.services}
        offered.update(name for r in self._dht_seen.values() for name in r.services)
        cutoff = now - SERVICE_FORGET_INTERVALS * self.settings.sync_interval
        for service, seen in list(self._services.items()):
            if service in offered:
                self._services[service] = now
            elif seen < cutoff and service not in self._configured:
                del self._services[service]


def _service_of(key: str) -> str | None:
    """The service of a shard key name `svc:<service>:<n>`, else None."""
    parsed = shards.parse_service_key(key)
    return parsed[0] if parsed else None


def _age(now: float, then: float) -> float:
    return max(0.0, now - then) if then else -1.0


__all__ = ["BRIDGE_ORIGIN", "Bridge", "BridgeSettings"]
