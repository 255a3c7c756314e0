"""DiscoveryCache: warm discoveries answered from the cache with no datagram sent, stale ones
refreshed behind the answer, nothing older than `max_age`, expired leases and tombstoned
workers left out. The DHT runs on the emulated internet (dht_bridge.netem), so every datagram
a discovery sends is counted on its host."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from dht_bridge.dht.node import DHTNode
from dht_bridge.identity import Identity
from dht_bridge.netem import LAN, EmulatedNetwork, Host
from dht_bridge.records import WorkerRecord, tombstone_for
from tests.support.helpers import ManualClock, make_record, wait_for
from tests.support.netem import Field, start_field
from worker.discovery import SOURCE_DHT, SOURCE_EDGE, Discovery, DiscoveryCache, discover

MAX_AGE = 30.0
FRESH_FOR = 15.0


@dataclass
class Scene:
    """Six servers and four clients, each client a worker offering `ocr`; the reader is a
    server, so it holds a copy of every record (six holders of eight wanted)."""

    field: Field
    identities: list[Identity]
    records: list[WorkerRecord]

    @property
    def reader(self) -> DHTNode:
        """The node discoveries are made from."""
        return self.field.servers[-1]

    @property
    def reader_host(self) -> Host:
        """The reader's emulated host (its traffic)."""
        return self.field.host_of(self.reader)

    def cache(
        self, *, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time
    ) -> DiscoveryCache:
        """A cache over `discover` from the reader (no edge)."""

        async def fetch(service: str, limit: int) -> Discovery:
            return await discover(service, limit=limit, node=self.reader, edge=None, deadline=5)

        return DiscoveryCache(fetch, max_age=MAX_AGE, fresh_for=FRESH_FOR, clock=clock, wall=wall)


@pytest.fixture
async def scene() -> AsyncIterator[Scene]:
    built = await start_field(EmulatedNetwork(LAN, seed=11), servers=6, clients=4, coordinators=2)
    try:
        identities = [Identity.generate() for _ in built.clients]
        # Loaded a little, so that a test's record at load 0 comes first.
        records = [make_record(i, services=("ocr",), load=0.5) for i in identities]
        for client, record in zip(built.clients, records, strict=True):
            await client.publish(record)
        yield Scene(built, identities, records)
    finally:
        await built.aclose()


def ids(answer: Discovery) -> set[str]:
    return {r.worker_id for r in answer.providers}


async def test_a_warm_discovery_sends_no_datagram(scene: Scene) -> None:
    cache = scene.cache()
    try:
        cold = await cache.discover("ocr")
        assert (cold.source, cold.cached, ids(cold)) == (
            SOURCE_DHT,
            False,
            {r.worker_id for r in scene.records},
        )
        sent = scene.reader_host.traffic.sent
        for _ in range(20):
            warm = await cache.discover("ocr")
            assert (warm.source, warm.cached, ids(warm)) == (SOURCE_DHT, True, ids(cold))
        assert scene.reader_host.traffic.sent == sent
        assert (cache.hits, cache.misses, cache.refreshes) == (20, 1, 0)
    finally:
        await cache.aclose()


async def test_a_stale_answer_comes_at_once_and_is_refreshed_behind_it(scene: Scene) -> None:
    clock = ManualClock(1000.0)
    cache = scene.cache(clock=clock)
    try:
        first = await cache.discover("ocr")
        newcomer = make_record(services=("ocr",))
        await scene.field.clients[0].publish(newcomer)
        clock.advance(FRESH_FOR + 1)
        stale = await cache.discover("ocr")
        # The old answer, at once, while one lookup runs behind it.
        assert (stale.cached, stale.age, ids(stale)) == (True, FRESH_FOR + 1, ids(first))
        assert cache.refreshes == 1
        await wait_for(
            lambda: newcomer.worker_id in ids(cache._entries[("ocr", 10)].answer),
            timeout=10,
            message="the refresh",
        )
        fresh = await cache.discover("ocr")
        assert fresh.age == 0
        assert newcomer.worker_id in ids(fresh)
        # Never older than max_age: past it the caller waits for a new lookup.
        clock.advance(MAX_AGE)
        sent = scene.reader_host.traffic.sent
        late = await cache.discover("ocr")
        assert (late.cached, late.age) == (False, 0.0)
        assert scene.reader_host.traffic.sent > sent
    finally:
        await cache.aclose()


async def test_expired_leases_are_left_out_of_cached_answers(scene: Scene) -> None:
    wall = ManualClock(time.time())
    cache = scene.cache(wall=wall)
    try:
        assert len((await cache.discover("ocr")).providers) == 4
        wall.advance(max(r.expires_at for r in scene.records) - wall.now)
        assert (await cache.discover("ocr")).providers == []
        # A young answer left short by a lapsed lease is refreshed behind it, not kept.
        assert (cache.hits, cache.misses, cache.refreshes) == (1, 1, 1)
    finally:
        await cache.aclose()


async def test_spare_providers_keep_a_warm_answer_full_when_a_lease_lapses(
    scene: Scene,
) -> None:
    wall = ManualClock(time.time())
    short = make_record(services=("ocr",), ttl=5.0, load=0.0)  # the least loaded: listed first
    await scene.field.clients[0].publish(short)
    cache = scene.cache(wall=wall)
    try:
        first = await cache.discover("ocr", limit=2)
        assert short.worker_id in ids(first)
        assert len(first.providers) == 2
        wall.advance(short.expires_at - wall.now)
        warm = await cache.discover("ocr", limit=2)
        assert warm.cached
        assert short.worker_id not in ids(warm)
        assert len(warm.providers) == 2  # a spare took its place
    finally:
        await cache.aclose()


async def test_records_already_past_their_lease_when_fetched_start_no_refresh() -> None:
    # The edge lists held records past their lease during a partition: each discovery must
    # not send the cache back to it.
    wall = ManualClock(time.time())
    held = make_record(services=("ocr",), now=wall.now - 100, ttl=10)
    live = make_record(services=("ocr",), ttl=300)
    fetched: list[str] = []

    async def fetch(service: str, limit: int) -> Discovery:
        fetched.append(service)
        return Discovery(service, [live, held], SOURCE_EDGE, 0.0)

    cache = DiscoveryCache(fetch, max_age=MAX_AGE, fresh_for=FRESH_FOR, wall=wall)
    try:
        await cache.discover("ocr")
        for _ in range(5):
            assert ids(await cache.discover("ocr")) == {live.worker_id}
        assert (len(fetched), cache.refreshes) == (1, 0)
    finally:
        await cache.aclose()


async def test_a_tombstone_seen_takes_the_worker_out_at_once(scene: Scene) -> None:
    cache = scene.cache()
    cache.watch(scene.reader.storage)
    try:
        await cache.discover("ocr")
        leaver, record = scene.identities[1], scene.records[1]
        await scene.field.clients[1].publish(tombstone_for(leaver, record, now=time.time()))
        # The reader holds a copy: the tombstone merged there reaches the cache directly.
        gone = await cache.discover("ocr")
        assert gone.cached
        assert record.worker_id not in ids(gone)
        assert ids(gone) == {r.worker_id for r in scene.records} - {record.worker_id}
    finally:
        await cache.aclose()
    assert scene.reader.storage.on_merge is None
