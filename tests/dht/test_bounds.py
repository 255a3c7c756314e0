"""What a long-running node remembers per name stays bounded (a router looks up whatever
service names clients send, a bridge publishes for workers that come and go for good), and a
full storage says so without a line per refused key."""

from __future__ import annotations

import logging

import pytest

from dht_bridge.dht import lookup as reading
from dht_bridge.dht import publish as publishing
from dht_bridge.dht import shards
from dht_bridge.dht.storage import RecordStorage, StoreResult
from dht_bridge.dht.values import encode_value, key_digest
from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord
from tests.support.dht import network_of
from tests.support.helpers import POLICY, make_record


async def test_depth_hints_keep_the_services_read_lately(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reading, "MAX_DEPTH_HINTS", 3)
    async with network_of(4) as nodes:
        reader = nodes[3]
        for name in ("a", "b", "c", "a", "d", "e"):
            await reader.lookup(f"svc-{name}")
        assert list(reader.reader.depth_hints) == ["svc-a", "svc-d", "svc-e"]


async def test_a_publisher_forgets_the_oldest_places_beyond_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publishing, "MAX_SLOTS", 2)
    async with network_of(4) as nodes:
        bridge = nodes[0]
        records = [make_record(services=("ocr",)) for _ in range(4)]
        for record in records:
            await bridge.publish(record)
        kept = [("ocr", r.worker_id) for r in records[2:]]
        assert list(bridge.publisher.levels) == kept
        assert list(bridge.publisher._publishes) == kept
        await bridge.publish(records[0])  # a forgotten worker files from the root again
        assert bridge.publisher.levels[("ocr", records[0].worker_id)] == 0


def test_a_full_storage_refuses_new_keys_looking_for_room_and_saying_so_seldom(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dht_bridge.dht.storage")
    storage = RecordStorage(POLICY, max_keys=3)

    def store(record: WorkerRecord) -> StoreResult:
        key = shards.worker_key(record.worker_id)
        return storage.merge(key_digest(key), encode_value(key, [record]))

    identities = [Identity.generate() for _ in range(3)]
    assert [store(make_record(i)) for i in identities] == [StoreResult.OK] * 3
    walks = 0
    cull = storage.cull

    def counted() -> int:
        nonlocal walks
        walks += 1
        return cull()

    storage.cull = counted  # type: ignore[method-assign]
    assert [store(make_record()) for _ in range(5)] == [StoreResult.FULL] * 5
    assert walks == 1  # not a walk over every key for each refused one
    assert storage.refused_full == 5
    said = [r for r in caplog.records if "storage full" in r.getMessage()]
    assert len(said) == 1  # one line for the five, not five
    # Keys already held still take newer records.
    assert store(make_record(identities[0], seq=2)) is StoreResult.OK
