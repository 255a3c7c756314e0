"""What one lookup costs Redis and the router: one round trip per page, and each stored record
parsed once per version, not once per read."""

from __future__ import annotations

import time
from typing import Any

import pytest

from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry
from tests.support.helpers import make_record


async def test_a_lookup_is_one_redis_command(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    for i in range(5):
        assert await registry.upsert(make_record(now=now, ttl=600, load=i / 10))
    await registry.lookup("ocr", limit=10)  # the script is loaded once
    sent: list[str] = []
    client = registry.client
    original = client.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]).upper())
        return await original(*args, **options)

    monkeypatch.setattr(client, "execute_command", counting)
    found = await registry.lookup("ocr", limit=10)

    assert [r.load for r in found] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert sent == ["EVALSHA"]


async def test_each_record_version_is_parsed_once(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    identities = [Identity.generate() for _ in range(3)]
    for i, identity in enumerate(identities):
        assert await registry.upsert(make_record(identity, now=now, ttl=600, load=i / 10))
    parsed: list[str] = []
    original = WorkerRecord.from_json

    def counting(text: str | bytes) -> WorkerRecord:
        record = original(text)
        parsed.append(record.worker_id)
        return record

    monkeypatch.setattr(WorkerRecord, "from_json", staticmethod(counting))
    first = await registry.lookup("ocr", limit=10)
    second = await registry.lookup("ocr", limit=10)
    assert first == second
    assert sorted(parsed) == sorted(i.worker_id for i in identities)

    # A heartbeat writes a new version: that one record is parsed again, and its load shows.
    parsed.clear()
    heartbeat = make_record(identities[0], now=now, ttl=600, load=0.9, seq=2)
    assert await registry.upsert(heartbeat)
    third = await registry.lookup("ocr", limit=10)
    assert parsed == [heartbeat.worker_id]
    assert third[-1] == heartbeat
