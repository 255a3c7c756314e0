"""Redis must not follow an eclipsed DHT (issue 20): fakes next to a worker's keys swallow its
heartbeats and hide it from every DHT reader, the bridge's shard reads included. Its
heartbeats still reach the bridge's node straight from the worker (a coordinator copy), so
Redis keeps every new seq and the edge keeps listing it."""

from __future__ import annotations

from pathlib import Path

from dht_bridge.dht import shards
from dht_bridge.registry.registry import Registry
from tests.support.bridge import (
    Swarm,
    redis_has_at_least,
    running_bridge,
    start_bridge_node,
)
from tests.support.dht import start_network, start_node, stop_all
from tests.support.eclipse import eclipse_around
from tests.support.helpers import wait_for
from tests.support.worker import router_config, running_edge, worker_config

CONVERGE = 20.0  # seconds: a bound for Redis to catch up on a loaded 2-core machine


async def test_an_eclipsed_worker_stays_in_redis_through_the_coordinator_copy(
    registry: Registry, tmp_path: Path
) -> None:
    nodes = await start_network(6)
    bridge_node = await start_bridge_node(nodes[0])
    worker_node = await start_node(seeds=[nodes[1].address])
    swarm = Swarm(interval=0.5, ttl=3.0)
    worker = swarm.add(worker_node, ("ocr",))
    keys = [shards.worker_key(worker.worker_id), shards.service_key("ocr", 0)]
    try:
        async with (
            eclipse_around(keys) as eclipse,
            running_bridge(bridge_node, registry, tmp_path / "j", bootstrap=[nodes[0].address]),
        ):
            await eclipse.introduce([worker_node, bridge_node, *nodes])
            worker_node.set_coordinators([bridge_node.address])
            swarm.start()
            # Several leases' worth of heartbeats: Redis has each new one.
            for _ in range(4):
                await wait_for(lambda: worker.seq >= 2, timeout=CONVERGE, message="a beat")
                wanted = swarm.newest()
                await wait_for(
                    lambda: redis_has_at_least(registry, wanted),  # noqa: B023
                    timeout=CONVERGE,
                    message="the newest record in Redis",
                )
                target = worker.seq + 3
                await wait_for(lambda: worker.seq >= target, timeout=CONVERGE, message="beats")  # noqa: B023
            # The DHT itself is eclipsed: readers find nothing, the swallowed copies pile up.
            assert eclipse.stores > 0
            assert await nodes[3].lookup("ocr") == []
            assert [r.worker_id for r in await registry.lookup("ocr", limit=10)] == [
                worker.worker_id
            ]
    finally:
        await swarm.aclose()
        await stop_all([*nodes, bridge_node, worker_node])


async def test_a_worker_copies_its_heartbeats_to_two_coordinators_the_edge_named(
    registry: Registry, tmp_path: Path
) -> None:
    network = await start_network(3)
    try:
        async with (
            running_edge(registry, router_config(network)) as edge,
            edge.agent(worker_config(tmp_path, "w-copies")) as agent,
        ):
            assert agent.node is not None
            assert agent.record is not None
            # The edge hands the network out as coordinators ("kind": "coordinator").
            assert set(agent.node.coordinators) == {n.address for n in network}
            report = await agent.node.publish(agent.record)
            assert report.coordinators == 2
    finally:
        await stop_all(network)
