"""The Redis registry on a real redis-server: merge rule, leases, lookups, events, failures.

Every test that takes `registry` runs three times: on one redis-server, on a primary + replica +
3 Sentinels, and on a 3-primary Cluster (hash-tagged keys, sharded pub/sub). The fault tests
further down are about one server. The last section runs a few of the same behaviours on the
embedded fakeredis default; those tests are about logic (the Lua merge script and the key
layout) and say so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from dht_bridge.errors import (
    ConfigError,
    RecordError,
    RecordExpired,
    RecordInvalid,
    RecordSignatureError,
    RegistryUnavailable,
)
from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord, sign_record, supersedes, tombstone_for
from dht_bridge.registry.registry import EventSubscription, Registry, open_registry
from dht_bridge.settings import RegistrySettings
from tests.support.helpers import POLICY, free_port, make_record, wait_for
from tests.support.redis_server import TEST_REDIS_TIMEOUT, RedisServer

# An unreachable Redis must be reported within this many seconds (the timeout is 1 s or less).
FAST = 2.0
EVENT_WAIT = 5.0


def _tombstone(
    identity: Identity, *, seq: int, services: tuple[str, ...] = ("ocr",)
) -> WorkerRecord:
    return make_record(identity, seq=seq, services=services, tombstone=True)


async def _next_events(events: EventSubscription, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(EVENT_WAIT):
        return [await anext(events) for _ in range(count)]


async def _dbsize(registry: Registry) -> int:
    return int(await registry.client.dbsize())


def _open(url: str | None, *, timeout: float = TEST_REDIS_TIMEOUT) -> Registry:
    return open_registry(RegistrySettings(redis_url=url, timeout=timeout), policy=POLICY)


@pytest.fixture
def registry(topology_registry: Registry) -> Registry:
    """This module's registry: on each topology in turn (conftest `registry_settings`)."""
    return topology_registry


async def _publish_raw(registry: Registry, data: bytes) -> None:
    """Publish bytes on the events channel the way the registry does (sharded on Cluster)."""
    if registry.cluster:
        await registry.client.spublish(registry.channel, data)
    else:
        await registry.client.publish(registry.channel, data)


# -- storing and the merge rule --------------------------------------------------------------


async def test_upsert_stores_the_record_with_its_lease_as_ttl(registry: Registry) -> None:
    record = make_record(services=("ocr", "gpu"), load=0.25, ttl=90.0)
    assert await registry.upsert(record) is True
    assert await registry.get(record.worker_id) == record
    ttl_ms = await registry.client.pttl(registry.worker_key(record.worker_id))
    assert 80_000 < ttl_ms <= 90_000
    for service in ("ocr", "gpu"):
        score = await registry.client.zscore(registry.service_key(service), record.worker_id)
        assert score == pytest.approx(0.25)
    assert await registry.get("0" * 40) is None


async def test_an_equal_or_older_record_is_not_applied(registry: Registry) -> None:
    identity = Identity.generate()
    newer = make_record(identity, seq=2, load=0.2)
    assert await registry.upsert(newer) is True
    assert await registry.upsert(newer) is False
    assert await registry.upsert(make_record(identity, seq=1, load=0.9)) is False
    assert await registry.get(identity.worker_id) == newer
    assert [r.load for r in await registry.lookup("ocr")] == [0.2]


async def test_concurrent_writers_of_one_worker_keep_the_highest_seq(
    registry: Registry, registry_settings: RegistrySettings
) -> None:
    identity = Identity.generate()
    # Each seq lists a different service and load, so a torn update would show in the sets.
    batch = [
        make_record(identity, seq=seq, services=(f"s{seq % 5}",), load=seq / 100)
        for seq in range(1, 51)
    ]
    random.Random(7).shuffle(batch)
    async with AsyncExitStack() as stack:
        writers = [registry]
        for _ in range(4):
            writers.append(
                await stack.enter_async_context(open_registry(registry_settings, policy=POLICY))
            )
        events = await stack.enter_async_context(registry.subscribe_events())
        results = await asyncio.gather(
            *(writers[i % len(writers)].upsert(record) for i, record in enumerate(batch))
        )
        applied = await _next_events(events, sum(results))
    stored = await registry.get(identity.worker_id)
    assert stored is not None
    assert stored.seq == 50
    assert [r.worker_id for r in await registry.lookup("s0")] == [identity.worker_id]
    for service in ("s1", "s2", "s3", "s4"):
        assert await registry.count(service) == 0
    # Every applied record superseded the one before it: the event stream is in seq order.
    seqs = [event["seq"] for event in applied]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert seqs[-1] == 50


async def test_concurrent_registrations_of_many_workers_are_all_kept(registry: Registry) -> None:
    rng = random.Random(11)
    batch = [make_record(load=round(rng.random(), 4)) for _ in range(100)]
    assert all(await asyncio.gather(*(registry.upsert(record) for record in batch)))
    assert await registry.count("ocr") == 100
    found = await registry.lookup("ocr", limit=100)
    assert {r.worker_id for r in found} == {r.worker_id for r in batch}
    assert [r.load for r in found] == sorted(r.load for r in batch)


async def test_equal_seq_is_decided_by_the_larger_signature(registry: Registry) -> None:
    identity = Identity.generate()
    one, two = (make_record(identity, seq=3, load=load) for load in (0.1, 0.2))
    low, high = sorted((one, two), key=lambda r: r.signature)
    assert supersedes(high, low)
    assert await registry.upsert(high) is True
    assert await registry.upsert(low) is False
    assert await registry.get(identity.worker_id) == high
    await registry.client.flushall()
    assert await registry.upsert(low) is True
    assert await registry.upsert(high) is True
    assert await registry.get(identity.worker_id) == high


async def test_equal_seq_tombstone_beats_a_live_record(registry: Registry) -> None:
    identity = Identity.generate()
    live, dead = make_record(identity, seq=4), _tombstone(identity, seq=4)
    assert await registry.upsert(dead) is True
    assert await registry.upsert(live) is False
    await registry.client.flushall()
    assert await registry.upsert(live) is True
    assert await registry.upsert(dead) is True
    assert await registry.lookup("ocr") == []


async def test_tombstone_leaves_lookups_and_blocks_lower_seqs(registry: Registry) -> None:
    identity = Identity.generate()
    record = make_record(identity, seq=1, services=("ocr", "gpu"))
    other = make_record(services=("ocr",))
    assert await registry.upsert(record)
    assert await registry.upsert(other)
    tombstone = tombstone_for(identity, record, now=time.time())
    assert await registry.leave(tombstone) is True
    assert [r.worker_id for r in await registry.lookup("ocr")] == [other.worker_id]
    assert await registry.lookup("gpu") == []
    assert await registry.count("gpu") == 0
    assert await registry.get(identity.worker_id) == tombstone
    # Stored, so it still blocks: the old record replayed, and a live record of its own seq.
    assert await registry.upsert(record) is False
    assert await registry.upsert(make_record(identity, seq=tombstone.seq)) is False
    comeback = make_record(identity, seq=tombstone.seq + 1, services=("gpu",))
    assert await registry.upsert(comeback) is True
    assert await registry.lookup("gpu") == [comeback]


async def test_leave_requires_a_tombstone(registry: Registry) -> None:
    with pytest.raises(RecordInvalid, match="tombstone"):
        await registry.leave(make_record())
    assert await _dbsize(registry) == 0


async def test_changed_services_move_the_worker_between_sets(registry: Registry) -> None:
    identity = Identity.generate()
    assert await registry.upsert(make_record(identity, seq=1, services=("ocr", "gpu")))
    async with registry.subscribe_events() as events:
        assert await registry.upsert(make_record(identity, seq=2, services=("gpu", "tts")))
        [event] = await _next_events(events, 1)
    assert await registry.lookup("ocr") == []
    assert await registry.count("ocr") == 0
    for service in ("gpu", "tts"):
        assert [r.seq for r in await registry.lookup(service)] == [2]
    assert event["services"] == ["gpu", "tts"]
    assert event["removed"] == ["ocr"]


# -- leases ----------------------------------------------------------------------------------


async def test_an_ended_lease_removes_the_key_and_lookup_prunes_the_id(
    registry: Registry,
) -> None:
    long = make_record(ttl=90.0, load=0.5)
    assert await registry.upsert(long)
    short = make_record(ttl=1.0, load=0.1)
    assert await registry.upsert(short)

    async def gone() -> bool:
        return await registry.get(short.worker_id) is None

    await wait_for(gone, timeout=10.0, message="the short lease to end in Redis")
    assert await registry.count("ocr") == 2  # the set still lists it until a lookup prunes it
    assert await registry.lookup("ocr") == [long]
    assert await registry.count("ocr") == 1


async def test_a_worker_back_after_its_lease_ended_with_other_services_leaves_the_old_sets(
    registry: Registry,
) -> None:
    identity = Identity.generate()
    first = make_record(identity, seq=1, services=("ocr",), ttl=1.0)
    assert await registry.upsert(first)

    async def lapsed() -> bool:
        return await registry.get(identity.worker_id) is None

    await wait_for(lapsed, timeout=10.0, message="the first lease to end in Redis")
    # Back, offering something else: the upsert cannot see what the lapsed record offered.
    assert await registry.upsert(make_record(identity, seq=2, services=("gpu",)))
    assert await registry.count("ocr") == 1
    assert await registry.lookup("ocr") == []
    assert await registry.count("ocr") == 0
    assert "ocr" not in await registry.services()
    assert [r.seq for r in await registry.lookup("gpu")] == [2]
    # prune() does the same for a set nobody looks up.
    other = Identity.generate()
    assert await registry.upsert(make_record(other, seq=1, services=("tts",), ttl=1.0))

    async def other_lapsed() -> bool:
        return await registry.get(other.worker_id) is None

    await wait_for(other_lapsed, timeout=10.0, message="the other lease to end in Redis")
    assert await registry.upsert(make_record(other, seq=2, services=("gpu",)))
    assert await registry.prune("tts") == 1


async def test_prune_removes_ids_whose_record_is_gone(registry: Registry) -> None:
    batch = [make_record(load=i / 100) for i in range(10)]
    assert all(await registry.upsert_many(batch))
    await registry.client.delete(*(registry.worker_key(r.worker_id) for r in batch[:7]))
    assert await registry.prune("ocr") == 7
    assert await registry.count("ocr") == 3
    assert await registry.prune("ocr") == 0


async def test_the_clock_is_injected(registry: Registry) -> None:
    ahead = Registry(registry.client, policy=POLICY, clock=lambda: time.time() + 1000.0)
    with pytest.raises(RecordExpired):
        await ahead.upsert(make_record(ttl=90.0))
    await ahead.aclose()  # an injected client is the caller's to close
    await registry.ping()
    assert await _dbsize(registry) == 0


# -- lookups ---------------------------------------------------------------------------------


async def test_lookup_returns_least_loaded_first_up_to_limit(registry: Registry) -> None:
    loads = [0.5, 0.1, 0.9, 0.3, 0.7]
    for load in loads:
        assert await registry.upsert(make_record(load=load))
    assert [r.load for r in await registry.lookup("ocr")] == sorted(loads)
    assert [r.load for r in await registry.lookup("ocr", limit=2)] == [0.1, 0.3]
    with pytest.raises(ValueError, match="limit"):
        await registry.lookup("ocr", limit=0)


async def test_lookup_prefers_the_region_then_the_rest(registry: Registry) -> None:
    placed = [("eu", 0.6), ("eu", 0.2), ("us", 0.1), ("us", 0.4), ("", 0.3)]
    for region, load in placed:
        assert await registry.upsert(make_record(region=region, load=load))

    def shape(found: list[WorkerRecord]) -> list[tuple[str, float]]:
        return [(r.region, r.load) for r in found]

    eu_first = [("eu", 0.2), ("eu", 0.6), ("us", 0.1), ("", 0.3), ("us", 0.4)]
    assert shape(await registry.lookup("ocr", region="eu")) == eu_first
    assert shape(await registry.lookup("ocr", region="eu", limit=3)) == eu_first[:3]
    by_load = sorted(placed, key=lambda item: item[1])
    assert shape(await registry.lookup("ocr", region="ap")) == by_load


async def test_lookup_pages_past_vanished_ids_and_prunes_them(registry: Registry) -> None:
    batch = [make_record(load=i / 100) for i in range(40)]
    assert all(await registry.upsert_many(batch))
    # The 30 least loaded vanish, as if their leases had ended together.
    await registry.client.delete(*(registry.worker_key(r.worker_id) for r in batch[:30]))
    found = await registry.lookup("ocr", limit=5)
    assert [r.load for r in found] == [0.30, 0.31, 0.32, 0.33, 0.34]
    assert await registry.count("ocr") == 10


async def test_concurrent_lookups_past_vanished_ids_each_get_every_provider(
    registry: Registry,
) -> None:
    """Lookups sharing a page of vanished ids prune them once, and each pages on from where
    the pruning left the set (a sharer that saw 0 pruned once skipped the next page)."""
    batch = [make_record(load=i / 100) for i in range(20)]
    assert all(await registry.upsert_many(batch))
    await registry.client.delete(*(registry.worker_key(r.worker_id) for r in batch[:10]))
    found = await asyncio.gather(*(registry.lookup("ocr", limit=10) for _ in range(4)))
    expected = [round(0.10 + i / 100, 2) for i in range(10)]
    assert [[r.load for r in records] for records in found] == [expected] * 4
    assert await registry.count("ocr") == 10


async def test_lookup_of_an_unknown_or_impossible_service_is_empty(registry: Registry) -> None:
    assert await registry.upsert(make_record())
    assert await registry.lookup("gpu") == []
    assert await registry.lookup("Not A Service*") == []


async def test_a_corrupt_value_is_logged_and_treated_as_absent(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    record = make_record()
    await registry.client.set(registry.worker_key(record.worker_id), b"{not json")
    await registry.client.zadd(registry.service_key("ocr"), {record.worker_id: 0.0})
    with caplog.at_level(logging.WARNING, logger="dht_bridge.registry.registry"):
        assert await registry.get(record.worker_id) is None
        assert await registry.lookup("ocr") == []
        assert await registry.records() == []
    assert "corrupt record" in caplog.text
    # A corrupt value never blocks a valid record.
    assert await registry.upsert(record) is True
    assert await registry.lookup("ocr") == [record]


async def test_names_no_record_could_carry_never_become_keys_or_event_text(
    registry: Registry,
) -> None:
    identity = Identity.generate()
    old = make_record(identity, seq=1, services=("ocr",))
    assert await registry.upsert(old)
    # A value written by something else: the service list the scripts read back is hostile.
    tampered = {**old.to_dict(), "services": ["ocr", "Bad Name", "x" * 40, 7, 'a"]']}
    await registry.client.set(registry.worker_key(identity.worker_id), json.dumps(tampered))
    async with registry.subscribe_events() as events:
        assert await registry.upsert(make_record(identity, seq=2, services=("gpu",)))
        (event,) = await _next_events(events, 1)
    assert event["removed"] == ["ocr"]  # the one real name, and nothing else
    assert await registry.lookup("ocr") == []
    # Holding a lapsing record re-adds it to its sets: only under the names a record can carry.
    lapsing = {**tampered, "seq": 3, "services": ["gpu", "Bad Name", "x" * 40, 7, 'a"]']}
    await registry.client.set(registry.worker_key(identity.worker_id), json.dumps(lapsing))
    later = old.expires_at + 600
    assert await registry.hold([identity.worker_id], lapse_before=later, until=later) == 1
    bad = [registry.service_key(name) for name in ("Bad Name", "x" * 40, "7", 'a"]')]
    assert await registry.client.exists(*bad) == 0
    assert await registry.client.exists(registry.service_key("gpu")) == 1


# -- refused records -------------------------------------------------------------------------


def _forged() -> WorkerRecord:
    return dataclasses.replace(make_record(load=0.1), load=0.0)


def _someone_elses_key() -> WorkerRecord:
    return dataclasses.replace(make_record(), worker_id=Identity.generate().worker_id)


def _unsigned() -> WorkerRecord:
    return dataclasses.replace(make_record(), signature="")


def _expired() -> WorkerRecord:
    return make_record(now=time.time() - 200.0, ttl=90.0)


def _lease_too_long() -> WorkerRecord:
    return make_record(ttl=7200.0)


def _tunnel_off_the_allow_list() -> WorkerRecord:
    return make_record(tunnel_url="https://intranet.example.com")


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (_forged, RecordSignatureError),
        (_someone_elses_key, RecordSignatureError),
        (_unsigned, RecordSignatureError),
        (_expired, RecordExpired),
        (_lease_too_long, RecordInvalid),
        (_tunnel_off_the_allow_list, RecordInvalid),
    ],
)
async def test_invalid_records_are_refused_and_nothing_is_stored(
    registry: Registry, build: Callable[[], WorkerRecord], error: type[RecordError]
) -> None:
    record = build()
    with pytest.raises(error):
        await registry.upsert(record)
    assert await _dbsize(registry) == 0
    if error is not RecordExpired:  # a batch drops expired records instead (tested below)
        with pytest.raises(error):
            await registry.upsert_many([make_record(), record])
        assert await _dbsize(registry) == 0


async def test_upsert_many_answers_per_record_and_drops_expired_ones(registry: Registry) -> None:
    identity = Identity.generate()
    newer, older = make_record(identity, seq=2), make_record(identity, seq=1)
    fresh = make_record(load=0.5)
    assert await registry.upsert_many([newer, older, fresh, _expired()]) == [
        True,
        False,
        True,
        False,
    ]
    assert await registry.upsert_many([]) == []
    assert {r.worker_id for r in await registry.records()} == {newer.worker_id, fresh.worker_id}


async def test_upsert_many_spans_several_pipelines(registry: Registry) -> None:
    batch = [make_record(load=round(i / 1000, 4)) for i in range(600)]
    assert await registry.upsert_many(batch) == [True] * 600
    assert await registry.count("ocr") == 600
    assert [r.load for r in await registry.lookup("ocr", limit=3)] == [0.0, 0.001, 0.002]


# -- events ----------------------------------------------------------------------------------


async def test_applied_changes_are_published_and_refused_ones_are_not(
    registry: Registry,
) -> None:
    identity = Identity.generate()
    record = make_record(identity, seq=1, services=("ocr", "gpu"))
    async with registry.subscribe_events() as events:
        assert await registry.upsert(record)
        assert await registry.upsert(record) is False
        assert await registry.leave(tombstone_for(identity, record, now=time.time()))
        await registry.publish_event({"type": "marker"})
        received = await _next_events(events, 3)
    assert received == [
        {
            "type": "record",
            "worker_id": identity.worker_id,
            "seq": 1,
            "tombstone": False,
            "services": ["gpu", "ocr"],
            "removed": [],
        },
        {
            "type": "record",
            "worker_id": identity.worker_id,
            "seq": 2,
            "tombstone": True,
            "services": ["gpu", "ocr"],
            "removed": [],
        },
        {"type": "marker"},
    ]


async def test_a_malformed_event_is_skipped(registry: Registry) -> None:
    async with registry.subscribe_events() as events:
        await _publish_raw(registry, b"not json")
        await _publish_raw(registry, b"[1, 2]")
        await registry.publish_event({"type": "flush"})
        assert await _next_events(events, 1) == [{"type": "flush"}]


async def test_events_reach_every_subscriber(
    registry: Registry, registry_settings: RegistrySettings
) -> None:
    async with (
        open_registry(registry_settings, policy=POLICY) as other,
        other.subscribe_events() as first,
        registry.subscribe_events() as second,
    ):
        await registry.publish_event({"type": "flush", "service": "ocr"})
        assert await _next_events(first, 1) == [{"type": "flush", "service": "ocr"}]
        assert await _next_events(second, 1) == [{"type": "flush", "service": "ocr"}]


# -- topology helpers ------------------------------------------------------------------------


async def test_records_services_and_count(registry: Registry) -> None:
    batch = [
        make_record(services=("ocr",)),
        make_record(services=("ocr", "gpu")),
        make_record(services=("tts",)),
    ]
    assert all(await registry.upsert_many(batch))
    assert await registry.services() == ["gpu", "ocr", "tts"]
    assert [await registry.count(name) for name in ("gpu", "ocr", "tts", "none")] == [1, 2, 1, 0]
    assert {r.worker_id for r in await registry.records()} == {r.worker_id for r in batch}
    assert len(await registry.records(limit=2)) == 2


# -- failures --------------------------------------------------------------------------------


async def _assert_unavailable_fast(operation: Awaitable[object]) -> RegistryUnavailable:
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable) as caught:
        await operation
    assert time.monotonic() - started < FAST
    return caught.value


async def test_a_killed_redis_is_unavailable_fast_and_the_registry_recovers(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    server = make_redis_server()
    async with _open(server.url, timeout=1.0) as registry:
        before = make_record()
        assert await registry.upsert(before)
        server.kill()
        await _assert_unavailable_fast(registry.ping())
        await _assert_unavailable_fast(registry.upsert(make_record()))
        await _assert_unavailable_fast(registry.upsert_many([make_record()]))
        await _assert_unavailable_fast(registry.get(before.worker_id))
        await _assert_unavailable_fast(registry.lookup("ocr"))
        await _assert_unavailable_fast(registry.lookup("ocr", region="eu"))
        await _assert_unavailable_fast(registry.records())
        await _assert_unavailable_fast(registry.services())
        await _assert_unavailable_fast(registry.publish_event({"type": "flush"}))

        server.start()  # same port, empty: the same Registry object must work again
        await registry.ping()
        after = make_record()
        assert await registry.upsert(after) is True
        assert await registry.lookup("ocr") == [after]


async def test_a_hung_redis_is_unavailable_within_the_timeout(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    server = make_redis_server()
    async with _open(server.url, timeout=0.5) as registry:
        record = make_record()
        assert await registry.upsert(record)
        server.pause()
        try:
            error = await _assert_unavailable_fast(registry.lookup("ocr"))
            # Its outcome is unknown (Redis may run it on resume), hence another service.
            await _assert_unavailable_fast(registry.upsert(make_record(services=("gpu",))))
        finally:
            server.resume()
        assert error.__cause__ is not None
        assert "within 0.5 s" in str(error)
        assert await registry.lookup("ocr") == [record]


async def test_nothing_listening_is_unavailable_fast() -> None:
    async with _open(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0) as registry:
        error = await _assert_unavailable_fast(registry.ping())
        assert error.__cause__ is not None


async def test_a_subscription_reports_a_lost_connection(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    server = make_redis_server()
    async with _open(server.url, timeout=1.0) as registry, registry.subscribe_events() as events:
        server.kill()
        await _assert_unavailable_fast(anext(events))


def test_open_registry_refuses_other_url_schemes() -> None:
    with pytest.raises(ConfigError, match="redis://"):
        _open("http://127.0.0.1:1/")


# -- the embedded default (fakeredis): these tests are about logic ----------------------------


async def test_embedded_default_says_it_is_not_durable(caplog: pytest.LogCaptureFixture) -> None:
    """Logic only: the embedded registry announces itself and runs the same merge script."""
    with caplog.at_level(logging.WARNING, logger="dht_bridge.registry.registry"):
        registry = _open(None)
    async with registry:
        assert "embedded" in caplog.text
        assert "NOT durable" in caplog.text
        identity = Identity.generate()
        record = make_record(identity, seq=2, load=0.3)
        assert await registry.upsert(record) is True
        assert await registry.upsert(make_record(identity, seq=1)) is False
        assert await registry.lookup("ocr") == [record]
        assert await registry.leave(tombstone_for(identity, record, now=time.time()))
        assert await registry.lookup("ocr") == []


async def test_embedded_lookup_order_services_and_events() -> None:
    """Logic only: ordering, region preference, moved services and events on fakeredis."""
    async with _open(None) as registry, registry.subscribe_events() as events:
        identity = Identity.generate()
        assert await registry.upsert(make_record(identity, seq=1, services=("ocr", "gpu")))
        assert await registry.upsert(make_record(identity, seq=2, services=("gpu",), load=0.5))
        assert await registry.upsert(make_record(region="eu", services=("gpu",), load=0.9))
        assert [r.load for r in await registry.lookup("gpu")] == [0.5, 0.9]
        assert [r.load for r in await registry.lookup("gpu", region="eu")] == [0.9, 0.5]
        assert await registry.lookup("ocr") == []
        received = await _next_events(events, 3)
    assert [event["removed"] for event in received] == [[], ["ocr"], []]


async def test_embedded_registries_do_not_share_state() -> None:
    """Logic only: each open_registry() without a URL gets its own in-process server."""
    async with _open(None) as first, _open(None) as second:
        assert await first.upsert(make_record())
        assert await second.lookup("ocr") == []


async def test_equal_seq_rule_matches_supersedes_on_the_embedded_server() -> None:
    """Logic only: the Lua tie-break agrees with records.supersedes for many signature pairs."""
    async with _open(None) as registry:
        identity = Identity.generate()
        for round_ in range(20):
            a, b = (
                sign_record(
                    identity,
                    tunnel_url="https://w.trycloudflare.com",
                    services=("ocr",),
                    seq=100 + round_,
                    now=time.time(),
                    load=load,
                )
                for load in (0.1, 0.2)
            )
            assert await registry.upsert(a) is True
            assert await registry.upsert(b) is supersedes(b, a)
