"""Finding providers of a service: the DHT first, the edge's `/services` when it does not answer.

`discover` asks afresh on every call. `DiscoveryCache` keeps its answers and refreshes them in
the background (stale-while-revalidate), so a warm discovery sends nothing: on the internet a
DHT lookup costs a few round trips of 100 ms and more, a cached answer microseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.storage import RecordStorage
from dht_bridge.errors import ConfigError, DHTError
from dht_bridge.records import WorkerRecord, merge_into
from worker.config import check_service
from worker.edge import EdgeClient
from worker.errors import EdgeError

logger = logging.getLogger(__name__)

SOURCE_DHT = "dht"
SOURCE_EDGE = "edge"
SOURCE_NONE = "none"
# Answers kept at most (services x limits asked for); the least recently used goes first.
DEFAULT_MAX_ENTRIES = 256
# A cached answer is refreshed in the background once it is this share of `max_age` old.
DEFAULT_FRESH_SHARE = 0.5
# A cached answer holds this many times the providers asked for: leases lapse under it (a
# holder's copy is read up to a renewal behind, a crashed worker sends none), and the spares
# keep it full until the refresh. On `world` under churn a 30 s answer of exactly 10 fell
# short of 10 two times in three.
SPARE_FACTOR = 2
# The most providers one discovery may ask for: the router's API allows 1 to 100 a lookup
# (docs/design.md), and asking the edge for more is refused there.
MAX_LIMIT = 100

__all__ = [
    "DEFAULT_FRESH_SHARE",
    "DEFAULT_MAX_ENTRIES",
    "MAX_LIMIT",
    "SOURCE_DHT",
    "SOURCE_EDGE",
    "SOURCE_NONE",
    "Discovery",
    "DiscoveryCache",
    "Fetch",
    "MergeHook",
    "check_ask",
    "discover",
]


@dataclass(frozen=True)
class Discovery:
    """Providers found, least loaded first, and which side answered (`dht`, `edge` or `none`).

    `age` is how old the answer is: 0 for a lookup made for this call, the seconds since its
    lookup started for an answer from a `DiscoveryCache`."""

    service: str
    providers: list[WorkerRecord] = field(default_factory=list)
    source: str = SOURCE_NONE
    seconds: float = 0.0
    detail: str = ""
    age: float = 0.0
    cached: bool = False


def check_ask(service: str, limit: int) -> None:
    """Refuse a discovery that no provider could answer: ConfigError naming what is wrong."""
    check_service(service)
    if not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"limit {limit!r}: must be from 1 to {MAX_LIMIT}")


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
        # A cache asks for spares beyond `limit`: never past what the edge accepts.
        providers = await edge.services(service, limit=min(limit, MAX_LIMIT), region=region)
    except EdgeError as exc:
        logger.warning("discovery of %s: %s, and the edge failed too: %s", service, reason, exc)
        source = SOURCE_DHT if local else SOURCE_NONE
        return Discovery(service, local, source, _since(started), f"{reason}; edge: {exc}")
    logger.info("discovery of %s answered by the edge: %s", service, reason)
    live = _newest_live(providers, now=edge.clock())
    return Discovery(service, live, SOURCE_EDGE, _since(started), reason)


def _newest_live(records: list[WorkerRecord], *, now: float) -> list[WorkerRecord]:
    """The edge's records merged as a DHT answer is: the newest per worker, tombstones and
    lapsed leases left out, least loaded first. Each is signed, but an edge (or whatever
    answers at its address) may list a worker's old seqs, its tombstone, or one record many
    times."""
    newest: dict[str, WorkerRecord] = {}
    merge_into(newest, records, now=now)
    return sorted((r for r in newest.values() if r.live), key=lambda r: (r.load, r.worker_id))


def _since(started: float) -> float:
    return time.monotonic() - started


# A fresh discovery: (service, limit) -> answer. The agent's is `discover` with its node and edge.
Fetch = Callable[[str, int], Awaitable[Discovery]]
# RecordStorage's `on_merge`: told of the records that changed what a node holds under a key.
MergeHook = Callable[[str, list[WorkerRecord]], None]


@dataclass
class _Entry:
    answer: Discovery
    fetched_at: float  # when the lookup that gave it started (monotonic)
    fetched_wall: float  # and on the wall clock, which leases are in


class DiscoveryCache:
    """Discovery answers per (service, limit), refreshed in the background.

    An answer younger than `fresh_for` is returned as it is; an older one is returned at once
    while one refresh runs behind it (stale-while-revalidate); one `max_age` old (one heartbeat
    interval) is never returned: the caller waits for a new lookup. Providers whose lease has
    run out (`wall` clock) are left out of every answer, and the answer is refreshed behind
    it. A tombstone merged into a watched
    node's storage, or `forget(worker_id)`, takes that worker out of every answer at once and
    refreshes them. Answers that found nothing through no fault of the DHT or the edge
    (`none`) are not kept. Refresh tasks are owned here and cancelled by `aclose`.
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        max_age: float,
        fresh_for: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if max_age <= 0:
            raise ValueError("max_age must be > 0")
        self._fetch = fetch
        self.max_age = max_age
        self.fresh_for = max_age * DEFAULT_FRESH_SHARE if fresh_for is None else fresh_for
        self._clock = clock
        self._wall = wall
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self._pending: dict[tuple[str, int], asyncio.Task[Discovery]] = {}
        self._watched: list[tuple[RecordStorage, MergeHook | None]] = []
        self.hits = 0  # answered from the cache, fresh or stale
        self.misses = 0  # waited for a lookup
        self.refreshes = 0  # background lookups started

    async def discover(self, service: str, limit: int = 10) -> Discovery:
        """Up to `limit` providers of `service`, from the cache when it has a young enough
        answer, else from a lookup (one at a time per service and limit); ConfigError for a
        malformed service name or a limit outside 1..MAX_LIMIT."""
        check_ask(service, limit)
        started = self._clock()
        key = (service, limit)
        entry = self._entries.get(key)
        age = started - entry.fetched_at if entry is not None else self.max_age
        if entry is None or age >= self.max_age:
            self.misses += 1
            answer = await self._lookup(key)
            return dataclasses.replace(answer, seconds=self._clock() - started)
        self.hits += 1
        self._entries.move_to_end(key)
        now = self._wall()
        live = [r for r in entry.answer.providers if r.expires_at > now]
        providers = live[:limit]
        # Leases that ran out under a young answer (a holder's copy read one renewal behind,
        # a crashed worker) eat its spares: refresh it behind this answer as if it were old.
        # Only leases live when it was fetched: the edge lists held records past their lease
        # during a partition, and those must not send every discovery to the edge again.
        lapsed = any(entry.fetched_wall < r.expires_at <= now for r in entry.answer.providers)
        if (age >= self.fresh_for or lapsed) and key not in self._pending:
            self.refreshes += 1
            self._start(key)
        return dataclasses.replace(
            entry.answer,
            providers=providers,
            seconds=self._clock() - started,
            age=age,
            cached=True,
        )

    def _start(self, key: tuple[str, int]) -> asyncio.Task[Discovery]:
        task = asyncio.get_running_loop().create_task(
            self._refresh(key), name=f"discovery-{key[0]}"
        )
        self._pending[key] = task
        task.add_done_callback(lambda done: self._done(key, done))
        return task

    def _done(self, key: tuple[str, int], task: asyncio.Task[Discovery]) -> None:
        if self._pending.get(key) is task:
            del self._pending[key]
        if not task.cancelled() and task.exception() is not None:
            logger.warning("refreshing the discovery of %s failed: %r", key[0], task.exception())

    async def _lookup(self, key: tuple[str, int]) -> Discovery:
        task = self._pending.get(key) or self._start(key)
        # A caller that gives up must not cancel the lookup others wait for.
        return await asyncio.shield(task)

    async def _refresh(self, key: tuple[str, int]) -> Discovery:
        started, started_wall = self._clock(), self._wall()
        service, limit = key
        answer = await self._fetch(service, limit * SPARE_FACTOR)
        if answer.source != SOURCE_NONE:
            self._entries[key] = _Entry(answer, started, started_wall)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return dataclasses.replace(answer, providers=answer.providers[:limit])

    def forget(self, worker_id: str) -> int:
        """Take `worker_id` out of every cached answer (it is gone: a tombstone, a failed
        request) and refresh the answers it was in; how many answers held it."""
        touched = 0
        for key, entry in list(self._entries.items()):
            kept = [r for r in entry.answer.providers if r.worker_id != worker_id]
            if len(kept) == len(entry.answer.providers):
                continue
            touched += 1
            entry.answer = dataclasses.replace(entry.answer, providers=kept)
            if key not in self._pending:
                self.refreshes += 1
                self._start(key)
        return touched

    def observe(self, key: str, records: list[WorkerRecord]) -> None:
        """A storage merge hook: every tombstone among `records` is a worker gone."""
        for record in records:
            if record.tombstone:
                self.forget(record.worker_id)

    def watch(self, storage: RecordStorage) -> None:
        """Hear of the tombstones merged into `storage` (its `on_merge` hook, chained)."""
        previous = storage.on_merge

        def hook(key: str, records: list[WorkerRecord]) -> None:
            if previous is not None:
                previous(key, records)
            self.observe(key, records)

        storage.on_merge = hook
        self._watched.append((storage, previous))

    def clear(self) -> None:
        """Forget every answer (the next discovery of each waits for a lookup)."""
        self._entries.clear()

    async def aclose(self) -> None:
        """Cancel refreshes under way and stop watching storages."""
        for storage, previous in reversed(self._watched):
            storage.on_merge = previous
        self._watched.clear()
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
