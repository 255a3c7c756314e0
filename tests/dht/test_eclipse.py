"""An eclipse: nodes placed next to a worker's keys, each at an address of its own, swallow
every STORE and answer every read with each other. Readers of the DHT then find nothing; the
coordinators (bridges) must still hear every heartbeat, straight from the worker, so that
Redis and the edge keep listing it."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pytest

from dht_bridge.dht import node as dht
from dht_bridge.dht import shards
from dht_bridge.dht.crawl import Crawl
from dht_bridge.dht.lookup import DISJOINT_PATHS
from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.publish import COORDINATOR_COPIES
from dht_bridge.dht.storage import RecordStorage
from dht_bridge.dht.values import key_digest
from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord
from tests.support.dht import TEST_SETTINGS, NetworkFactory, publish_all, start_node
from tests.support.eclipse import eclipse_around
from tests.support.helpers import POLICY, make_record

Address = tuple[str, int]


async def coordinator_node(seed: Address) -> tuple[DHTNode, list[WorkerRecord]]:
    """A node whose storage reports what it merges, as a bridge's does (to Redis)."""
    merged: list[WorkerRecord] = []
    storage = RecordStorage(POLICY, on_merge=lambda _key, records: merged.extend(records))
    node = DHTNode(TEST_SETTINGS, policy=POLICY, storage=storage)
    await node.listen()
    await node.bootstrap([seed])
    return node, merged


async def test_an_eclipsed_worker_still_reaches_the_coordinators_every_heartbeat(
    network_factory: NetworkFactory,
) -> None:
    nodes = await network_factory(6)
    coordinator, merged = await coordinator_node(nodes[0].address)
    worker = await start_node(seeds=[nodes[1].address])
    stack = contextlib.AsyncExitStack()
    try:
        identity = Identity.generate()
        first = make_record(identity, services=["ocr"], seq=1)
        keys = [shards.worker_key(first.worker_id), shards.service_key("ocr", 0)]
        eclipse = await stack.enter_async_context(eclipse_around(keys))
        await eclipse.introduce([worker, *nodes, coordinator])
        worker.set_coordinators([coordinator.address])

        report = await worker.publish(first)

        # The fakes took every copy: readers of the DHT find nothing.
        assert eclipse.stores > 0
        assert await nodes[2].lookup("ocr") == []
        # The coordinator heard it straight from the worker, at its address.
        assert report.coordinators == 1
        assert [(r.worker_id, r.seq) for r in merged] == [(first.worker_id, 1)]
        # And hears every heartbeat: a renewal, since it holds the last record.
        second = make_record(identity, services=["ocr"], seq=2)
        report = await worker.publish(second)
        assert report.coordinators == 1
        assert [(r.worker_id, r.seq) for r in merged][-1] == (first.worker_id, 2)
        held = coordinator.storage.records(key_digest(keys[0]))
        assert [r.seq for r in held] == [2]
        assert coordinator.rpc.stats.rpc_bytes.get("renew", 0) > 0
    finally:
        await stack.aclose()
        await worker.aclose()
        await coordinator.aclose()


async def test_a_worker_copies_to_the_same_two_coordinators_and_workers_spread_over_them(
    network_factory: NetworkFactory,
) -> None:
    nodes = await network_factory(1)
    node = nodes[0]
    coordinators = [("127.0.0.1", 7000 + i) for i in range(6)]
    node.set_coordinators([node.address, *coordinators])
    assert node.rpc.router.pinned == frozenset([node.address, *coordinators])
    used: set[Address] = set()
    for _ in range(40):
        worker_id = os.urandom(20).hex()
        picked = [(n.ip, n.port) for n in node.publisher._coordinator_nodes(worker_id)]
        assert len(picked) == COORDINATOR_COPIES
        assert node.address not in picked  # never itself
        assert picked == [(n.ip, n.port) for n in node.publisher._coordinator_nodes(worker_id)]
        used.update(picked)
    assert used == set(coordinators)


async def test_service_reads_take_two_disjoint_paths_that_each_find_a_copy(
    network_factory: NetworkFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = await network_factory(16)
    records = [make_record(services=["ocr"]) for _ in range(5)]
    await publish_all(nodes, records)
    crawls: list[Crawl] = []

    class Recorded(Crawl):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            crawls.append(self)

    monkeypatch.setattr(dht, "Crawl", Recorded)
    # One shard read (a cold reader reads a few levels at once).
    nodes[9].reader.depth_hints["ocr"] = 0
    found = await nodes[9].lookup("ocr", limit=50)
    assert {r.worker_id for r in found} == {r.worker_id for r in records}
    reads = [c for c in crawls if c.find_value]
    assert len(reads) == DISJOINT_PATHS == 2
    asked = [
        {n for n, c in crawl._candidates.items() if c.state.name != "WAITING"} for crawl in reads
    ]
    assert all(asked)
    assert not asked[0] & asked[1]  # no node answered on both paths
    assert all(crawl.result.values for crawl in reads)
