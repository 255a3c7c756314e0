"""What the bridge's parts share: its settings, the records each side is known to hold or still
owes the other, whether each side answers, and the events by which one round wakes another.

The Redis side, the DHT side and the sync pass each read and write one `BridgeState`; its
methods are the few operations more than one of them needs, so each table keeps one rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

from dht_bridge.backoff import BackoffPolicy, ExponentialBackoff, jittered
from dht_bridge.bridge.metrics import BridgeCounters
from dht_bridge.records import SERVICE_RE, WorkerRecord, supersedes

# The origin a bridge writes into change events; events with it are never copied into the DHT.
BRIDGE_ORIGIN = "bridge"
DEFAULT_SYNC_INTERVAL = 10.0
DEFAULT_STALE_SHARE = 0.15
DEFAULT_PROBE_INTERVAL = 5.0
DEFAULT_MAX_RECORDS = 100_000
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


@dataclass
class Wakes:
    """Events by which one round asks another to act now rather than at its next interval.

    `stop` ends every round; `synced` is set after each sync pass (for `wait_synced`).
    """

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    flush: asyncio.Event = field(default_factory=asyncio.Event)
    sync: asyncio.Event = field(default_factory=asyncio.Event)
    publish: asyncio.Event = field(default_factory=asyncio.Event)
    dht: asyncio.Event = field(default_factory=asyncio.Event)
    preserve: asyncio.Event = field(default_factory=asyncio.Event)
    redis_lost: asyncio.Event = field(default_factory=asyncio.Event)
    synced: asyncio.Event = field(default_factory=asyncio.Event)

    async def relay_stop(self) -> None:
        """Once `stop` is set, set every other event, so no round sleeps through it."""
        await self.stop.wait()
        for each in fields(self):
            getattr(self, each.name).set()

    async def pause(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """Wait `seconds`, or less if `wake` (or stop) is set; clears `wake`."""
        event = wake or self.stop
        if not event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), seconds)
        if wake is not None:
            wake.clear()


class BridgeState:
    """The bridge's memory of both sides, shared by its parts.

    `clock` is the wall clock (leases are unix times).
    """

    def __init__(
        self,
        settings: BridgeSettings,
        *,
        services: Iterable[str],
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.rng = rng
        self.counters = BridgeCounters()
        self.wakes = Wakes()
        self.redis_up = False
        self.dht_up = False
        # Services from the options are polled even while nobody offers them.
        self.configured = frozenset(s for s in services if SERVICE_RE.fullmatch(s))
        # Services polled (learned from Redis, the DHT and options), and when each was last seen.
        self.services: dict[str, float] = dict.fromkeys(self.configured, clock())
        # Records waiting for Redis, and when the oldest of them arrived.
        self.pending: dict[str, WorkerRecord] = {}
        self.pending_since: float | None = None
        # The newest record known to be in Redis (or the journal), and seen in the DHT.
        self.in_redis: dict[str, WorkerRecord] = {}
        self.dht_seen: dict[str, WorkerRecord] = {}
        # Records Redis had before the DHT (the router's fallback path), and those to publish.
        self.fallback: dict[str, WorkerRecord] = {}
        self.to_publish: dict[str, WorkerRecord] = {}

    def jittered(self, seconds: float) -> float:
        """`seconds` moved by up to a tenth either way, so bridges do not act in step."""
        return jittered(seconds, 0.1, self.rng)

    def note_service(self, service: str) -> None:
        """A record of `service` was seen: poll it (again)."""
        self.services[service] = self.clock()

    def seen_in_dht(self, record: WorkerRecord) -> None:
        """`record` is in the DHT: remember it, its services, and drop an older fallback."""
        wid = record.worker_id
        seen = self.dht_seen.get(wid)
        if seen is None or supersedes(record, seen):
            self.dht_seen[wid] = record
        for name in record.services:
            self.note_service(name)
        fallback = self.fallback.get(wid)
        if fallback is not None and supersedes(record, fallback):
            del self.fallback[wid]  # the worker is on the DHT again; nothing to republish

    def offer(
        self, record: WorkerRecord, *, known: WorkerRecord | None = None, force: bool = False
    ) -> None:
        """File `record` for Redis unless Redis (or what waits) already has it or newer.

        `known` is what Redis holds when the caller has just read it (`force`: trust that
        read, even when it holds nothing); otherwise the bridge's own memory of Redis.
        """
        wid = record.worker_id
        base = known if force else self.in_redis.get(wid)
        if base is not None and not supersedes(record, base):
            return
        waiting = self.pending.get(wid)
        if waiting is not None and not supersedes(record, waiting):
            return
        self.pending[wid] = record
        if self.pending_since is None:
            self.pending_since = self.clock()
        self.wakes.flush.set()

    def queue_publish(self, record: WorkerRecord) -> None:
        """File a record Redis holds for the DHT, unless a newer one already waits. The same
        record again is filed again: a sync pass that still finds it missing from the DHT
        retries a publish that failed."""
        wid = record.worker_id
        held = self.fallback.get(wid)
        if held is not None and supersedes(held, record):
            return
        if held is None or supersedes(record, held):
            self.fallback[wid] = record
        self.to_publish[wid] = self.fallback[wid]
        self.wakes.publish.set()

    def forget(self, now: float) -> None:
        """Drop what expired from memory, and services nobody offers any more."""
        for table in (self.in_redis, self.dht_seen, self.fallback, self.to_publish):
            for wid in [wid for wid, r in table.items() if r.is_expired(now)]:
                del table[wid]
        offered = {name for r in self.in_redis.values() for name in r.services}
        offered.update(name for r in self.dht_seen.values() for name in r.services)
        cutoff = now - SERVICE_FORGET_INTERVALS * self.settings.sync_interval
        for service, seen in list(self.services.items()):
            if service in offered:
                self.services[service] = now
            elif seen < cutoff and service not in self.configured:
                del self.services[service]


__all__ = [
    "BRIDGE_ORIGIN",
    "DEFAULT_MAX_RECORDS",
    "DEFAULT_PROBE_INTERVAL",
    "DEFAULT_STALE_SHARE",
    "DEFAULT_SYNC_INTERVAL",
    "BridgeSettings",
    "BridgeState",
    "Wakes",
]
