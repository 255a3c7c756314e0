"""The bridge with real parts: UDP DHT nodes on loopback, a real redis-server, the router app.

DHT to Redis (records reaching the bridge's node and the polled shards), Redis to DHT (the
router's fallback path while the DHT is down, republished when it is back), two bridges that
converge without writing back and forth, and the exported figures.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dht_bridge.bridge.metrics import MetricsServer
from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.publish import PublishReport
from dht_bridge.errors import PublishError
from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord, tombstone_for
from dht_bridge.registry.registry import Registry
from tests.support.bridge import (
    Swarm,
    missing_in_redis,
    redis_has_at_least,
    running_bridge,
    settings_for_port,
    start_bridge_node,
)
from tests.support.dht import start_network, start_node, stop_all
from tests.support.helpers import make_record, wait_for
from tests.support.router import client_for, router_app

CONVERGE = 20.0  # seconds: a bound for Redis and the DHT to agree on a loaded 2-core machine


async def test_dht_records_and_tombstones_reach_redis(registry: Registry, tmp_path: Path) -> None:
    nodes = await start_network(12)
    bridge_node = await start_bridge_node(nodes[0])
    swarm = Swarm(interval=1.0)
    try:
        workers = [
            swarm.add(node, ("ocr",) if i % 2 else ("ocr", "gpu"))
            for i, node in enumerate(nodes[1:])
        ]
        await swarm.first_beats(workers)
        async with running_bridge(
            bridge_node, registry, tmp_path / "j", bootstrap=[nodes[0].address]
        ) as bridge:
            published = swarm.start()
            await wait_for(
                lambda: redis_has_at_least(registry, published),
                timeout=CONVERGE,
                message="every worker's record in Redis",
            )
            assert len(await registry.lookup("ocr", limit=100)) == len(workers)
            assert set(bridge.services) >= {"ocr", "gpu"}

            leaving = workers[0]
            tombstone = await swarm.leave(leaving)
            await wait_for(
                lambda: redis_has_at_least(registry, {leaving.worker_id: tombstone}),
                timeout=CONVERGE,
                message="the tombstone in Redis",
            )
            found = await registry.lookup("gpu", limit=100)
            assert leaving.worker_id not in {r.worker_id for r in found}
            figures = bridge.figures()
            assert figures["rma_bridge_merged_to_redis_total"] >= len(workers)
            assert figures["rma_bridge_redis_up"] == figures["rma_bridge_dht_up"] == 1
            assert figures["rma_bridge_journal_records"] == 0
    finally:
        await swarm.aclose()
        await stop_all([*nodes, bridge_node])


async def test_router_fallback_registrations_reach_the_dht_once_it_is_back(
    registry: Registry, tmp_path: Path
) -> None:
    nodes = await start_network(8)
    ports = [(node.address[1], node.node.id) for node in nodes]
    bridge_node = await start_bridge_node(nodes[0])
    app = router_app(registry)
    restarted: list[DHTNode] = []
    try:
        async with (
            running_bridge(
                bridge_node, registry, tmp_path / "j", bootstrap=[nodes[0].address]
            ) as bridge,
            client_for(app) as client,
        ):
            await wait_for(lambda: bridge.dht_up, timeout=CONVERGE, message="DHT up")
            await stop_all(nodes)  # the whole DHT but the bridge's node goes away
            await wait_for(lambda: not bridge.dht_up, timeout=CONVERGE, message="DHT lost")

            records = [make_record(services=("ocr",), load=0.1 * i) for i in range(4)]
            identity = Identity.generate()
            leaving = make_record(identity, services=("ocr",), seq=3)
            for record in [*records, leaving]:
                answer = await client.post("/workers", json=record.to_dict())
                assert answer.status_code == 200, answer.text
                assert answer.json()["stored_in"] == "redis"
            tombstone = tombstone_for(identity, leaving, now=time.time())
            answer = await client.request(
                "DELETE", f"/workers/{leaving.worker_id}", json=tombstone.to_dict()
            )
            assert answer.status_code == 200, answer.text

            # The DHT comes back where it was (same ports and ids), empty.
            for port, node_id in ports:
                seeds = [("127.0.0.1", ports[0][0])] if restarted else []
                restarted.append(
                    await start_node(settings=settings_for_port(port), node_id=node_id, seeds=seeds)
                )
            await wait_for(lambda: bridge.dht_up, timeout=CONVERGE, message="DHT back")

            reader = restarted[-1]

            async def all_found() -> bool:
                found = {r.worker_id for r in await reader.lookup("ocr", limit=50)}
                return found == {r.worker_id for r in records}

            await wait_for(all_found, timeout=CONVERGE, message="fallback records in the DHT")
            gone = await reader.get_record(leaving.worker_id)
            assert gone is not None
            assert gone.tombstone
            # The lookups may see a record before its publish has heard from every holder.
            await wait_for(
                lambda: bridge.counters.merged_to_dht >= len(records) + 1,
                timeout=CONVERGE,
                message="publishes counted",
            )
    finally:
        await stop_all([*restarted, bridge_node])


async def test_a_publish_that_failed_is_retried_by_the_next_sync_pass(
    registry: Registry, tmp_path: Path
) -> None:
    nodes = await start_network(6)
    bridge_node = await start_bridge_node(nodes[0])
    publish = bridge_node.publish
    attempts: list[str] = []

    async def fails_once(record: WorkerRecord, **options: Any) -> PublishReport:
        attempts.append(record.worker_id)
        if len(attempts) == 1:
            raise PublishError("no holder answered (this once)")
        return await publish(record, **options)

    bridge_node.publish = fails_once  # type: ignore[method-assign]
    try:
        async with running_bridge(
            bridge_node, registry, tmp_path / "j", bootstrap=[nodes[0].address]
        ) as bridge:
            await wait_for(lambda: bridge.dht_up, timeout=CONVERGE, message="DHT up")
            record = make_record(services=("ocr",), ttl=300)
            assert await registry.upsert(record)  # as the router's POST /workers does

            async def in_dht() -> bool:
                return await nodes[-1].get_record(record.worker_id) is not None

            await wait_for(in_dht, timeout=CONVERGE, message="the record in the DHT")
            assert len(attempts) >= 2
            assert bridge.counters.publish_failures >= 1
    finally:
        await stop_all([*nodes, bridge_node])


async def test_two_bridges_converge_and_stay_still(registry: Registry, tmp_path: Path) -> None:
    nodes = await start_network(16)
    first_node = await start_bridge_node(nodes[0])
    second_node = await start_bridge_node(nodes[0])
    swarm = Swarm(interval=1.0)
    try:
        workers = [swarm.add(node, ("ocr",)) for node in nodes[1:]]
        await swarm.first_beats(workers)
        seed = [nodes[0].address]
        async with (
            registry.subscribe_events() as events,
            running_bridge(first_node, registry, tmp_path / "a", bootstrap=seed) as first,
            running_bridge(second_node, registry, tmp_path / "b", bootstrap=seed) as second,
        ):
            writes: Counter[tuple[str, int]] = Counter()
            origins: Counter[str] = Counter()

            async def count_writes() -> None:
                while True:
                    event = await events.get()
                    if event is not None and event.get("type") == "record":
                        writes[(event["worker_id"], event["seq"])] += 1
                        origins[str(event.get("origin"))] += 1

            counter = asyncio.get_running_loop().create_task(count_writes())
            try:
                published = swarm.start()
                await wait_for(
                    lambda: redis_has_at_least(registry, published),
                    timeout=CONVERGE,
                    message="Redis converged",
                )
                beats = sum(w.seq for w in workers)
                # Quiet: nobody heartbeats; both bridges keep syncing.
                swarm.pause()
                await asyncio.gather(first.wait_synced(), second.wait_synced())
                await wait_for(
                    lambda: redis_has_at_least(registry, swarm.newest()),
                    timeout=CONVERGE,
                    message="the last beats in Redis",
                )
                before = sum(writes.values())
                attempts = (first.counters.publish_attempts, second.counters.publish_attempts)
                await asyncio.gather(first.wait_synced(3), second.wait_synced(3))
                assert sum(writes.values()) == before, "a bridge wrote during a quiet period"
                assert (
                    first.counters.publish_attempts,
                    second.counters.publish_attempts,
                ) == attempts
            finally:
                counter.cancel()
                await asyncio.gather(counter, return_exceptions=True)
            # Every applied write is one worker's new record, each applied once: no ping-pong.
            assert writes
            assert max(writes.values()) == 1
            assert sum(writes.values()) <= beats + len(workers)
            assert set(origins) == {"bridge"}
            assert first.counters.merged_to_redis + second.counters.merged_to_redis == sum(
                writes.values()
            )
            assert not await missing_in_redis(registry, swarm.newest())
    finally:
        await swarm.aclose()
        await stop_all([*nodes, first_node, second_node])


async def test_metrics_endpoint_serves_prometheus_text_and_health() -> None:
    figures = {
        "rma_bridge_journal_records": 3.0,
        "rma_bridge_journaled_total": 7.0,
        "rma_bridge_last_redis_sync_timestamp": 1796310123.25,
        "rma_bridge_redis_up": 1.0,
        "rma_bridge_dht_up": 0.0,
    }
    server = MetricsServer(lambda: figures)
    await server.start()
    try:
        host, port = server.address
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", trust_env=False) as http:
            metrics = await http.get("/metrics")
            health = await http.get("/healthz")
            missing = await http.get("/nope")
            figures["rma_bridge_dht_up"] = 1.0
            healthy = await http.get("/healthz")
    finally:
        await server.aclose()
    assert metrics.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    assert families["rma_bridge_journal_records"].type == "gauge"
    assert families["rma_bridge_journaled"].type == "counter"
    assert families["rma_bridge_journaled"].samples[0].value == 7.0
    # Full precision: a timestamp keeps its seconds (it was written with :g once).
    stamp = families["rma_bridge_last_redis_sync_timestamp"].samples[0].value
    assert stamp == 1796310123.25
    assert "process_cpu_seconds" in families  # the process's own figures
    assert health.status_code == 503
    assert health.json()["status"] == "degraded"
    assert (health.json()["redis"], health.json()["dht"]) == (True, False)
    assert healthy.status_code == 200
    assert healthy.json()["status"] == "ok"
    assert missing.status_code == 404


async def test_metrics_endpoint_serves_on_an_ipv6_address() -> None:
    # socket.create_server binds IPv4 unless told the family: --metrics-host ::1 failed with
    # "Address family for hostname not supported".
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    server = MetricsServer(lambda: {"rma_bridge_redis_up": 1.0}, host="::1", port=0)
    await server.start()
    try:
        host, port = server.address
        assert host == "::1"
        async with httpx.AsyncClient(base_url=f"http://[::1]:{port}", trust_env=False) as http:
            assert (await http.get("/healthz")).json()["redis"] is True
    finally:
        await server.aclose()
