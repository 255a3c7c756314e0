"""The embedded registry (no RMA_REDIS_URL): what `rma demo` and a lone router run on."""

from __future__ import annotations

import asyncio

from dht_bridge.registry.registry import open_registry
from dht_bridge.settings import RegistrySettings
from tests.support.helpers import POLICY, make_record


async def test_a_burst_beyond_redis_pys_pool_size_is_served_not_refused() -> None:
    # 300 workers leaving at once: redis-py's default pool of 100 answered the rest with
    # "Too many connections", and the router with 503s.
    registry = open_registry(RegistrySettings(), policy=POLICY)
    try:
        records = [make_record(services=["ocr"]) for _ in range(300)]
        applied = await asyncio.gather(*(registry.upsert(record) for record in records))
        assert all(applied)
        listed = await registry.lookup("ocr", limit=1000)
        assert {r.worker_id for r in listed} == {r.worker_id for r in records}
    finally:
        await registry.aclose()
