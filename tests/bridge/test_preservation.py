"""Self-preservation, as Eureka does: a bridge cut off from the DHT while many leases lapse
keeps those records in Redis, marked stale and listed after fresh providers, until the DHT is
back; tombstones still remove at once; below the share, leases lapse as usual."""

from __future__ import annotations

import time
from pathlib import Path

from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord, tombstone_for
from dht_bridge.registry.registry import Registry
from tests.support.bridge import (
    Partition,
    Swarm,
    redis_has_at_least,
    running_bridge,
    start_bridge_node,
)
from tests.support.dht import start_network, start_node, stop_all
from tests.support.helpers import make_record, wait_for

CONVERGE = 20.0


async def test_a_partitioned_bridge_holds_lapsing_records_until_the_dht_is_back(
    registry: Registry, tmp_path: Path
) -> None:
    nodes = await start_network(21)
    bridge_node = await start_bridge_node(nodes[0])
    partition = Partition(bridge_node)
    swarm = Swarm(interval=1.0, ttl=6.0)
    try:
        workers = [swarm.add(node, ("ocr",)) for node in nodes[1:]]
        await swarm.first_beats(workers)
        async with running_bridge(
            bridge_node, registry, tmp_path / "j", bootstrap=[nodes[0].address]
        ) as bridge:
            published = swarm.start()
            await wait_for(
                lambda: redis_has_at_least(registry, published),
                timeout=CONVERGE,
                message="workers in Redis",
            )
            partition.cut = True
            await wait_for(lambda: not bridge.dht_up, timeout=CONVERGE, message="DHT lost")
            # A worker registers through the router meanwhile: fresh, and Redis-only.
            fresh = make_record(ttl=60.0, load=0.9)
            assert await registry.upsert(fresh)
            await wait_for(lambda: bridge.preserving, timeout=CONVERGE, message="preserving")

            held_ids = {w.worker_id for w in workers}
            stored = [r for r in await registry.records() if r.worker_id in held_ids]
            assert len(stored) == len(workers)
            lapsed = max(r.expires_at for r in stored)
            await wait_for(
                lambda: time.time() > lapsed + 0.2, timeout=CONVERGE, message="leases ended"
            )
            marked = await registry.lookup_marked("ocr", limit=50)
            assert (marked[0].record, marked[0].stale) == (fresh, False)
            assert {p.record.worker_id for p in marked[1:]} == held_ids
            assert all(p.stale for p in marked[1:])
            assert bridge.figures()["rma_bridge_held_records"] == len(workers)

            # A tombstone through the router removes a held worker at once.
            leaving = workers[0]
            await swarm.stop(leaving)
            assert leaving.last is not None
            leaving.left = True
            await registry.leave(tombstone_for(leaving.identity, leaving.last, now=time.time()))
            listed = {p.record.worker_id for p in await registry.lookup_marked("ocr", limit=50)}
            assert leaving.worker_id not in listed
            # Some workers die during the partition: no tombstone, they just stop.
            dead = workers[1:6]
            for worker in dead:
                await swarm.stop(worker)

            partition.heal()
            await wait_for(lambda: bridge.dht_up, timeout=CONVERGE, message="DHT back")
            await wait_for(
                lambda: not bridge.preserving, timeout=CONVERGE, message="preservation off"
            )
            alive = {w.worker_id for w in workers[6:]} | {fresh.worker_id}

            async def settled() -> bool:
                found = await registry.lookup_marked("ocr", limit=50)
                listed = {p.record.worker_id for p in found} == alive
                # A dead worker's last records may still be live in the DHT when it comes back
                # (they went on beating there during the cut): Redis then lists them again
                # until their lease ends, and drops them with it. Lookups leave a record out
                # from its expiry on, Redis's own expiry a millisecond later: wait for both.
                gone = [await registry.get(w.worker_id) is None for w in dead]
                return listed and all(gone) and not any(p.stale for p in found)

            await wait_for(settled, timeout=CONVERGE, message="live fresh, the dead removed")
            assert await registry.held_count() == 0

            # What Redis learned during the cut reached the DHT once it was back.
            async def in_dht() -> bool:
                found = {r.worker_id for r in await nodes[7].lookup("ocr", limit=50)}
                gone = await nodes[7].get_record(leaving.worker_id)
                tombstoned = gone is not None and gone.tombstone
                return fresh.worker_id in found and tombstoned

            await wait_for(in_dht, timeout=CONVERGE, message="fallback records in the DHT")
    finally:
        await swarm.aclose()
        await stop_all([*nodes, bridge_node])


async def test_below_the_share_leases_lapse_and_above_it_they_are_held(
    registry: Registry, tmp_path: Path
) -> None:
    # A bridge node with no peers at all: the DHT side is lost from the start.
    lone = await start_node()
    try:
        steady = [make_record(ttl=60.0) for _ in range(18)]
        lapsing = [make_record(ttl=1.2) for _ in range(2)]  # 10%: below the 15% share
        await registry.upsert_many([*steady, *lapsing])
        async with running_bridge(lone, registry, tmp_path / "j") as bridge:
            await bridge.wait_synced(2)
            assert not bridge.dht_up
            assert not bridge.preserving
            ends = max(r.expires_at for r in lapsing)
            await wait_for(lambda: time.time() > ends + 0.1, timeout=10, message="leases end")
            for record in lapsing:
                assert await registry.get(record.worker_id) is None
            assert not bridge.preserving

            many = [make_record(ttl=2.0) for _ in range(6)]  # 6 of 24: 25%
            await registry.upsert_many(many)
            await wait_for(lambda: bridge.preserving, timeout=CONVERGE, message="preserving")
            assert await registry.held_count() == len(many)
            ends = max(r.expires_at for r in many)
            await wait_for(lambda: time.time() > ends + 0.1, timeout=10, message="leases end")
            await bridge.wait_synced()
            marked = await registry.lookup_marked("ocr", limit=50)
            assert [p.stale for p in marked] == [False] * len(steady) + [True] * len(many)
    finally:
        await lone.aclose()


async def test_a_held_worker_the_shard_walk_misses_is_read_by_its_own_key_before_release(
    registry: Registry, tmp_path: Path
) -> None:
    nodes = await start_network(6)
    bridge_node = await start_bridge_node(nodes[0])
    try:
        identity = Identity.generate()
        old = make_record(identity, services=("ocr",), seq=1, ttl=1.0)
        assert await registry.upsert(old)
        now = time.time()
        # A bridge cut off from the DHT held it; then its lease ended.
        assert await registry.hold([identity.worker_id], lapse_before=now + 60, until=now + 60)
        await wait_for(
            lambda: time.time() > old.expires_at + 0.1, timeout=CONVERGE, message="lease ended"
        )
        # Meanwhile the worker heartbeats on in the DHT.
        newer = make_record(identity, services=("ocr",), seq=2, ttl=120.0)
        await nodes[1].publish(newer)

        async def walk_that_misses(service: str) -> list[WorkerRecord]:
            return []  # as a walk stopped short of the shard level the worker is filed in

        bridge_node.service_records = walk_that_misses  # type: ignore[method-assign]
        async with running_bridge(
            bridge_node, registry, tmp_path / "j", bootstrap=[nodes[0].address], services=["ocr"]
        ) as bridge:
            await wait_for(
                lambda: bridge.dht_up and bridge.redis_up, timeout=CONVERGE, message="both up"
            )
            await bridge.wait_synced(2)
            assert await registry.held_count() == 0
            stored = await registry.get(identity.worker_id)
            assert stored is not None, "the held worker was deleted by the release"
            assert stored.seq == newer.seq
            assert bridge.counters.vanished_reads >= 1
    finally:
        await stop_all([*nodes, bridge_node])
