"""What a long-running node remembers per name stays bounded: a router looks up whatever
service names clients send, and a bridge publishes for workers that come and go for good."""

from __future__ import annotations

import pytest

from dht_bridge.dht import lookup as reading
from dht_bridge.dht import publish as publishing
from tests.support.dht import network_of
from tests.support.helpers import make_record


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
