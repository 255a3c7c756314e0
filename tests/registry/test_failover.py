"""Beyond one machine: a Sentinel deployment and a Cluster, each started here from the
redis-server binary, with two `rma router` processes and a bridge over a real DHT of simulated
workers on them. Then the primary holding the registry is SIGKILLed.

On each topology: a flush on one router reaches the other; during the failover lookups are
answered (cache or DHT), never with a 500; registrations through a router continue once a
replica is promoted; the routers hear events again; and once the workers have heartbeated,
Redis holds every worker's newest record (the bridge journals what it could not write).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from dht_bridge.errors import RegistryError
from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry
from tests.e2e.test_router_processes import RouterProcess, metrics_of, routers
from tests.support.bridge import (
    Swarm,
    fault_registry,
    missing_in_redis,
    redis_has_at_least,
    running_bridge,
    start_bridge_node,
)
from tests.support.dht import start_network, stop_all
from tests.support.helpers import make_record, wait_for
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import ClusterTopology, SentinelTopology
from tests.support.router import ADMIN_TOKEN

WORKERS = 20
# Generous: a Sentinel failover takes about 3 s here and a Cluster one about 3 s too, but a
# loaded 2-core machine can stretch either several times over.
FAILOVER = 60.0
CONVERGE = 60.0
EVENTS = 15.0
# The router's events listener backs off up to 30 s between attempts; a failover of a few
# seconds keeps it at a few seconds.
RESUBSCRIBE = 60.0

Topology = SentinelTopology | ClusterTopology


@pytest.fixture(params=["sentinel", "cluster"])
def topology(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Topology]:
    """A private topology (its primary gets killed), every process killed at the end."""
    started: Topology = (
        SentinelTopology(tmp_path / "sentinel")
        if request.param == "sentinel"
        else ClusterTopology(tmp_path / "cluster")
    )
    started.start()
    try:
        yield started
    finally:
        started.stop()


def registry_primary(topology: Topology, registry: Registry) -> RedisServer:
    """The data server that holds the registry now."""
    if isinstance(topology, ClusterTopology):
        return topology.master_for(registry.held_key)
    primary = topology.primary()
    assert primary is not None, "the Sentinels agree on no primary"
    return primary


@contextlib.asynccontextmanager
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    """A client for the routers, no proxies from the environment."""
    async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
        yield client


async def flush_reaches(
    client: httpx.AsyncClient, source: RouterProcess, target: RouterProcess
) -> bool:
    """Fill `target`'s cache, flush through `source`: True when `target` emptied within a few
    seconds (False while its events subscription is not back yet)."""
    answer = await client.get(target.url + "/services/ocr")
    if answer.status_code != 200 or (await metrics_of(client, target))["rma_cache_entries"] < 1:
        return False
    flushed = await client.post(
        source.url + "/admin/cache/flush",
        json={"service": "ocr"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    if flushed.status_code != 200:
        return False

    async def emptied() -> bool:
        return (await metrics_of(client, target))["rma_cache_entries"] == 0

    try:
        await wait_for(emptied, timeout=3.0, message="flush")
    except AssertionError:
        return False
    return True


async def test_failover_keeps_routers_and_registrations_and_loses_no_record(
    topology: Topology, tmp_path: Path
) -> None:
    registry = fault_registry(topology.url)
    nodes = await start_network(WORKERS + 1)
    bridge_node = await start_bridge_node(nodes[0])
    swarm = Swarm(interval=1.5, ttl=60.0)
    seed = nodes[0].address
    try:
        workers = [swarm.add(node, ("ocr",)) for node in nodes[1:]]
        await swarm.first_beats(workers)
        async with (
            running_bridge(
                bridge_node, registry, tmp_path / "journal.jsonl", bootstrap=[seed]
            ) as bridge,
            http_client() as client,
        ):
            # Their DHT nodes join the test's network, so they can answer from the DHT.
            extra_env = {
                "RMA_BOOTSTRAP": f"{seed[0]}:{seed[1]}",
                "RMA_REDIS_TIMEOUT": "0.5",
                "RMA_DHT_RPC_TIMEOUT": "1.0",
            }
            with routers(topology.url, tmp_path, "one", "two", extra_env=extra_env) as (one, two):
                for router in (one, two):
                    await router.ready(client)
                published = swarm.start()
                await wait_for(
                    lambda: redis_has_at_least(registry, published),
                    timeout=CONVERGE,
                    message=f"{WORKERS} workers in Redis",
                )
                # Replicas share nothing but Redis: a flush on one reaches the other.
                await wait_for(
                    lambda: flush_reaches(client, one, two),
                    timeout=EVENTS,
                    message="a flush on router one reaching router two",
                )
                assert (await client.get(one.url + "/services/ocr")).status_code == 200

                primary = registry_primary(topology, registry)
                primary.kill()
                killed = time.monotonic()
                await wait_for(lambda: not bridge.redis_up, timeout=FAILOVER, message="outage")

                # Registrations through a router continue once a replica took over; lookups
                # meanwhile are answered from the cache or the DHT, never with a 500.
                statuses: list[int] = []
                region = 0

                async def registered() -> bool:
                    nonlocal region
                    region += 1  # a region of its own: a backend read, not a cache hit
                    looked = await client.get(
                        two.url + "/services/ocr", params={"region": f"r{region}"}
                    )
                    statuses.append(looked.status_code)
                    assert looked.status_code != 500, looked.text
                    record = make_record(services=("ocr",))
                    stored = await client.post(one.url + "/workers", json=record.to_dict())
                    assert stored.status_code != 500, stored.text
                    return stored.status_code == 200 and stored.json()["stored_in"] == "redis"

                await wait_for(registered, timeout=FAILOVER, interval=0.2, message="a registration")
                took = time.monotonic() - killed
                assert 200 in statuses, statuses

                # The routers subscribe again by themselves: flushes reach across once more.
                await wait_for(
                    lambda: flush_reaches(client, two, one),
                    timeout=RESUBSCRIBE,
                    message="a flush on router two reaching router one after the failover",
                )

                # Every worker heartbeats at least once more, then hold still: Redis must
                # hold each one's newest record (the journal covered the outage).
                after = {w.worker_id: w.seq for w in workers}
                await wait_for(
                    lambda: all(w.seq > after[w.worker_id] for w in workers),
                    timeout=CONVERGE,
                    message="a heartbeat of every worker after the failover",
                )
                swarm.pause()
                wanted = swarm.newest()
                try:
                    await wait_for(
                        lambda: redis_has_at_least(registry, wanted),
                        timeout=CONVERGE,
                        message="every worker's newest record after the failover",
                    )
                except AssertionError as exc:
                    missing = await _missing(registry, wanted)
                    raise AssertionError(f"{exc}; missing: {missing[:10]}") from None
                figures = bridge.figures()
                assert figures["rma_bridge_redis_outages_total"] >= 1
                assert figures["rma_bridge_journaled_total"] > 0  # the gap went to the journal
                assert figures["rma_bridge_journal_dropped_total"] == 0
                assert took < FAILOVER
                for router in (one, two):
                    assert "Traceback" not in router.log(), router.log()
    finally:
        await swarm.aclose()
        await stop_all([*nodes, bridge_node])
        await registry.aclose()


async def _missing(registry: Registry, wanted: dict[str, WorkerRecord]) -> list[str]:
    with contextlib.suppress(RegistryError):
        return await missing_in_redis(registry, wanted)
    return ["(Redis did not answer)"]
