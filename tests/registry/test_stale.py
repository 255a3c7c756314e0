"""Self-preservation in the registry (real redis-server): held records outlive their lease,
marked stale and listed after fresh providers; a newer record or a tombstone replaces a hold;
`release` removes what lapsed and restores the rest. Also: the origin carried in events.

Each test that takes `registry` runs on one redis-server, on Sentinel and on Cluster (conftest
`registry_settings`). The last test runs the same scripts on the embedded fakeredis (logic only,
and says so).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord, tombstone_for
from dht_bridge.registry.registry import STALE_SCORE, EventSubscription, Registry, open_registry
from dht_bridge.settings import RegistrySettings
from tests.support.helpers import POLICY, make_record, wait_for
from tests.support.router import client_for, router_app

SHORT = 0.6  # seconds of lease for records that must lapse during a test
EVENT_WAIT = 5.0


@pytest.fixture
def registry(topology_registry: Registry) -> Registry:
    """This module's registry: on each topology in turn."""
    return topology_registry


async def _lapse(record: WorkerRecord) -> None:
    """Wait (on the wall clock, with a deadline) until the record's lease has ended."""
    await wait_for(
        lambda: time.time() > record.expires_at + 0.05, timeout=SHORT + 5, message="lease end"
    )


async def _score(registry: Registry, service: str, worker_id: str) -> float | None:
    score = await registry.client.zscore(registry.service_key(service), worker_id)
    return None if score is None else float(score)


async def _next_record_event(events: EventSubscription) -> dict[str, Any]:
    async with asyncio.timeout(EVENT_WAIT):
        while True:
            event = await anext(events)
            if event.get("type") == "record":
                return event


async def test_held_records_outlive_their_lease_and_come_after_fresh_ones(
    registry: Registry,
) -> None:
    lapsing = [make_record(ttl=SHORT, load=0.1 * i) for i in range(3)]
    fresh = make_record(load=0.9)
    gone = make_record(ttl=SHORT)  # not held: lapses as usual
    await registry.upsert_many([*lapsing, fresh, gone])
    now = time.time()
    held = await registry.hold(
        [r.worker_id for r in [*lapsing, fresh]], lapse_before=now + 5, until=now + 30
    )
    assert held == 3  # the fresh record's lease ends later: not held
    assert await registry.held_count() == 3
    await _lapse(lapsing[-1])
    marked = await registry.lookup_marked("ocr", limit=10)
    assert [(p.record.worker_id, p.stale) for p in marked] == [
        (fresh.worker_id, False),
        *((r.worker_id, True) for r in lapsing),
    ]
    assert [r.worker_id for r in await registry.lookup("ocr", stale=False)] == [fresh.worker_id]
    assert await registry.get(gone.worker_id) is None
    for record in lapsing:
        assert (await _score(registry, "ocr", record.worker_id) or 0) >= STALE_SCORE


async def test_a_newer_record_or_a_tombstone_replaces_a_hold_at_once(registry: Registry) -> None:
    renewed, leaving = Identity.generate(), Identity.generate()
    first = make_record(renewed, seq=1, ttl=SHORT, load=0.3)
    last = make_record(leaving, seq=4, ttl=SHORT)
    await registry.upsert_many([first, last])
    now = time.time()
    assert (
        await registry.hold(
            [renewed.worker_id, leaving.worker_id], lapse_before=now + 5, until=now + 30
        )
        == 2
    )
    newer = make_record(renewed, seq=2, load=0.5)
    assert await registry.upsert(newer)
    assert await _score(registry, "ocr", renewed.worker_id) == 0.5
    ttl_ms = await registry.client.pttl(registry.worker_key(renewed.worker_id))
    assert 80_000 < ttl_ms <= 90_000
    assert await registry.leave(tombstone_for(leaving, last, now=time.time()))
    assert await _score(registry, "ocr", leaving.worker_id) is None
    marked = await registry.lookup_marked("ocr")
    assert [(p.record, p.stale) for p in marked] == [(newer, False)]
    # Holding again leaves the fresh record and the tombstone alone.
    assert (
        await registry.hold(
            [renewed.worker_id, leaving.worker_id], lapse_before=now + 5, until=now + 30
        )
        == 0
    )


async def test_release_removes_lapsed_holds_and_restores_the_rest(registry: Registry) -> None:
    lapsed = make_record(ttl=SHORT, services=("ocr", "gpu"))
    early = make_record(ttl=60.0, load=0.4)  # held before its lease was near its end
    await registry.upsert_many([lapsed, early])
    now = time.time()
    assert (
        await registry.hold(
            [lapsed.worker_id, early.worker_id], lapse_before=now + 120, until=now + 30
        )
        == 2
    )
    await _lapse(lapsed)
    assert len(await registry.lookup("gpu")) == 1
    async with registry.subscribe_events() as events:
        assert await registry.release() == (1, 1)
        event = await _next_record_event(events)
    assert event == {
        "type": "record",
        "worker_id": lapsed.worker_id,
        "seq": lapsed.seq,
        "tombstone": False,
        "services": [],
        "removed": ["gpu", "ocr"],
        "origin": "bridge",
        "expired": True,
    }
    assert await registry.get(lapsed.worker_id) is None
    assert await registry.lookup("gpu") == []
    assert await _score(registry, "ocr", lapsed.worker_id) is None
    assert await _score(registry, "ocr", early.worker_id) == 0.4
    ttl_ms = await registry.client.pttl(registry.worker_key(early.worker_id))
    assert ttl_ms <= 60_000
    assert await registry.held_count() == 0
    assert await registry.release() == (0, 0)


async def test_a_hold_ends_by_itself_unless_renewed(registry: Registry) -> None:
    record = make_record(ttl=SHORT)
    await registry.upsert(record)
    now = time.time()
    assert await registry.hold([record.worker_id], lapse_before=now + 5, until=now + 1.5) == 1
    await _lapse(record)
    assert len(await registry.lookup("ocr")) == 1
    await wait_for(lambda: time.time() > now + 1.6, timeout=5, message="the end of the hold")
    assert await registry.lookup("ocr") == []
    assert await registry.get(record.worker_id) is None


async def test_region_lookups_keep_stale_providers_last(registry: Registry) -> None:
    stale_near = make_record(ttl=SHORT, region="eu", load=0.0)
    fresh_far = make_record(region="us", load=0.5)
    fresh_near = make_record(region="eu", load=0.7)
    await registry.upsert_many([stale_near, fresh_far, fresh_near])
    now = time.time()
    await registry.hold([stale_near.worker_id], lapse_before=now + 5, until=now + 30)
    found = await registry.lookup("ocr", region="eu")
    assert [r.worker_id for r in found] == [
        fresh_near.worker_id,
        fresh_far.worker_id,
        stale_near.worker_id,
    ]


async def test_hold_ignores_ids_that_are_not_worker_ids(registry: Registry) -> None:
    assert await registry.hold(["*", "../x", ""], lapse_before=time.time(), until=time.time()) == 0


async def test_events_carry_the_writer_origin_when_given(registry: Registry) -> None:
    first, second = make_record(), make_record()
    async with registry.subscribe_events() as events:
        await registry.upsert(first, origin="bridge")
        await registry.upsert_many([second])
        one = await _next_record_event(events)
        two = await _next_record_event(events)
    assert one["origin"] == "bridge"
    assert one["worker_id"] == first.worker_id
    assert "origin" not in two


async def test_hold_and_release_on_the_embedded_server() -> None:
    # Logic only: the same Lua scripts on fakeredis[lua].
    async with open_registry(RegistrySettings(redis_url=None), policy=POLICY) as registry:
        record = make_record(load=0.2)
        await registry.upsert(record)
        now = time.time()
        assert await registry.hold([record.worker_id], lapse_before=now + 120, until=now + 150)
        marked = await registry.lookup_marked("ocr")
        assert [(p.record, p.stale) for p in marked] == [(record, True)]
        assert await registry.release() == (0, 1)
        marked = await registry.lookup_marked("ocr")
        assert [(p.record, p.stale) for p in marked] == [(record, False)]


async def test_the_router_serves_held_records_after_every_fresh_provider(
    registry: Registry,
) -> None:
    lapsing = [make_record(ttl=SHORT, load=0.1 * i) for i in range(2)]
    fresh = make_record(load=0.9)
    await registry.upsert_many([*lapsing, fresh])
    now = time.time()
    await registry.hold([r.worker_id for r in lapsing], lapse_before=now + 5, until=now + 30)
    await _lapse(lapsing[-1])
    async with client_for(router_app(registry)) as client:
        answer = await client.get("/services/ocr")
    # Once the router left these out (0 providers during a partition, source redis).
    assert answer.status_code == 200
    assert [p["worker_id"] for p in answer.json()["providers"]] == [
        fresh.worker_id,
        *(r.worker_id for r in lapsing),
    ]
