"""A cache hit sends the JSON built for the first request of its kind; a lease that ends while
the answer is cached still takes its provider out of the next answer."""

from __future__ import annotations

import time
from typing import Any

import pytest
from starlette.responses import JSONResponse

from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry
from edge_router.app import create_app
from edge_router.config import RouterConfig
from edge_router.handlers import KEPT_BODIES, lookup_body
from tests.support.dht import ManualClock
from tests.support.helpers import make_record
from tests.support.router import client_for


async def test_hits_reuse_the_serialized_answer_until_a_lease_ends(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    short = make_record(now=now, ttl=100, load=0.1)
    long = make_record(now=now, ttl=600, load=0.2)
    for record in (short, long):
        assert await registry.upsert(record)
    wall = ManualClock(now)
    app = create_app(
        RouterConfig(),
        registry=registry,
        clock=wall,
        monotonic=ManualClock(0.0),
        listen_events=False,
    )
    built: list[str] = []
    original = WorkerRecord.to_dict

    def counting(self: WorkerRecord) -> dict[str, Any]:
        built.append(self.worker_id)
        return original(self)

    monkeypatch.setattr(WorkerRecord, "to_dict", counting)
    async with client_for(app) as client:
        miss = await client.get("/services/ocr")
        first = await client.get("/services/ocr")
        built_for_hits = len(built)
        second = await client.get("/services/ocr")
        assert [a.headers["x-cache"] for a in (miss, first, second)] == ["MISS", "HIT", "HIT"]
        assert second.content == first.content
        assert len(built) == built_for_hits  # the second hit built nothing
        assert [p["worker_id"] for p in second.json()["providers"]] == [
            short.worker_id,
            long.worker_id,
        ]

        wall.advance(200)  # the short lease ends; the cached answer is still fresh
        third = await client.get("/services/ocr")
        assert third.headers["x-cache"] == "HIT"
        assert [p["worker_id"] for p in third.json()["providers"]] == [long.worker_id]


async def test_kept_answers_per_cached_answer_are_bounded(registry: Registry) -> None:
    assert await registry.upsert(make_record(ttl=600))
    app = create_app(RouterConfig(), registry=registry, listen_events=False)
    async with client_for(app) as client:
        for i in range(3 * KEPT_BODIES):
            answer = await client.get("/services/ocr", params={"cap": f"mem_gb>={i}"})
            assert answer.status_code == 200
    entry = app.state.rma.lookups._entries[("svc", "ocr", "")]
    assert len(entry.derived) == KEPT_BODIES


async def test_a_spliced_body_is_what_json_response_renders(registry: Registry) -> None:
    now = time.time()
    records = [
        make_record(now=now, ttl=600, load=0.25, capabilities={"gpu": True, "mem_gb": 8}),
        make_record(now=now, ttl=600, load=0.5, region="de", capabilities={"model": "größe ✓"}),
        make_record(now=now, ttl=600, load=1.0, services=["ocr", "asr"]),
    ]
    state = create_app(RouterConfig(), registry=registry, listen_events=False).state.rma
    for chosen in (records, records[1:], []):
        for source in ("cache", "redis", "dht"):
            expected = JSONResponse(
                {
                    "service": "ocr",
                    "providers": [r.to_dict() for r in chosen],
                    "source": source,
                }
            ).body
            assert lookup_body(state, "ocr", chosen, source) == expected
    assert len(state.record_json) == len(records)
