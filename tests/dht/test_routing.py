"""The routing table's neighbour search against a brute-force scan of the same table, and
what a node does for contacts it cannot keep."""

from __future__ import annotations

import random

import pytest
from kademlia.node import Node

from dht_bridge.dht import shards
from dht_bridge.dht.admission import DiversityLimits
from dht_bridge.dht.routing import RMARoutingTable
from dht_bridge.dht.values import encode_value, key_digest
from tests.support.dht import NoNetwork, start_node, stop_all
from tests.support.helpers import make_record, wait_for


def table_of(rng: random.Random, contacts: int, ksize: int = 20) -> RMARoutingTable:
    me = Node(rng.randbytes(20))
    # Without diversity limits: every contact has its own port on loopback, so they would
    # refuse none, and counting the table again after each add made 3,000 adds 13 s of CPU.
    unlimited = DiversityLimits(enabled=False)
    table = RMARoutingTable(NoNetwork(), ksize, me, max_failures=3, limits=unlimited)
    for index in range(contacts):
        table.add_contact(Node(rng.randbytes(20), "127.0.0.1", 1024 + index % 60000))
    return table


def brute_force(table: RMARoutingTable, target: Node, k: int, exclude: Node | None) -> list[bytes]:
    every = [
        contact
        for contact in table.contacts()
        if contact.id != target.id and (exclude is None or not contact.same_home_as(exclude))
    ]
    every.sort(key=lambda contact: contact.long_id ^ target.long_id)
    return [contact.id for contact in every[:k]]


@pytest.mark.parametrize(("contacts", "k"), [(5, 20), (300, 20), (3000, 20), (3000, 8)])
def test_find_neighbors_returns_the_true_k_closest_in_order(contacts: int, k: int) -> None:
    rng = random.Random(contacts * 31 + k)
    table = table_of(rng, contacts)
    held = table.contacts()
    assert len(table.buckets) > 1 or contacts < 20
    for round_ in range(200):
        # Random targets, targets that are contacts (never returned themselves), our own id.
        if round_ % 3 == 0:
            target = Node(rng.randbytes(20))
        elif round_ % 3 == 1:
            target = rng.choice(held)
        else:
            target = table.node
        exclude = rng.choice(held) if round_ % 5 == 0 else None
        found = [contact.id for contact in table.find_neighbors(target, k=k, exclude=exclude)]
        assert found == brute_force(table, target, k, exclude)


@pytest.mark.parametrize("contacts", [5, 3000])
def test_the_neighbourhood_is_the_kth_closest_distance_and_no_search(contacts: int) -> None:
    rng = random.Random(contacts)
    table = table_of(rng, contacts)
    own = table.buckets[table.get_bucket_for(table.node)]
    own.last_updated = 0.0
    ids = brute_force(table, table.node, table.ksize, None)
    if len(ids) < table.ksize:
        assert table.neighbourhood() == 2**160 - 1  # a small network: every node is near
    else:
        assert table.neighbourhood() == int.from_bytes(ids[-1], "big") ^ table.node.long_id
    # Asked before every value read: it must not mark our own bucket searched, or the
    # maintenance that keeps our neighbourhood fresh would skip it.
    assert own.last_updated == 0.0


def test_bucket_edges_count_as_close() -> None:
    # Ids at the exact ends of bucket ranges (the library's split puts the midpoint low).
    rng = random.Random(7)
    table = table_of(rng, 400)
    for bucket in table.buckets:
        for edge in bucket.range:
            if edge < 2**160:
                target = Node(edge.to_bytes(20, "big"))
                found = [contact.id for contact in table.find_neighbors(target, k=20)]
                assert found == brute_force(table, target, 20, None)


async def test_a_contact_the_table_cannot_keep_is_pushed_values_once_not_at_every_request() -> None:
    # In a big network a holder's full buckets cannot keep every publisher that STOREs to it;
    # such a caller looks new at each heartbeat and must not cost a scan of every stored key.
    holder = await start_node()
    caller = await start_node()
    try:
        record = make_record()
        key = shards.worker_key(record.worker_id)
        holder.storage.merge(key_digest(key), encode_value(key, [record]))
        for _ in range(3):
            await caller.rpc.call_ping(Node(holder.node.id, *holder.address))
            await wait_for(lambda: not holder.rpc._tasks, timeout=10)
            holder.rpc.router.remove_contact(caller.node)  # as a full bucket would forget it
        assert holder.rpc.stats.stores_pushed == 1
        assert caller.storage.value(key_digest(key)) is not None
    finally:
        await stop_all([holder, caller])


async def test_values_due_to_a_newcomer_match_the_rule_while_the_table_changes() -> None:
    # The per-key answers are cached until the table changes: check them against the rule
    # itself (we are the closest contact to the key, the newcomer would be among its k).
    rng = random.Random(11)
    node = await start_node()
    try:
        protocol, router = node.rpc, node.rpc.router
        for _ in range(40):
            record = make_record()
            key = shards.worker_key(record.worker_id)
            node.storage.merge(key_digest(key), encode_value(key, [record]))

        def expected(newcomer: Node) -> set[bytes]:
            due = set()
            for digest in node.storage.digests():
                target = int.from_bytes(digest, "big")
                ranked = sorted(router.contacts(), key=lambda c: c.long_id ^ target)[: router.ksize]
                if ranked and (ranked[0].long_id ^ target) < (node.node.long_id ^ target):
                    continue
                if ranked and (newcomer.long_id ^ target) >= (ranked[-1].long_id ^ target):
                    continue
                due.add(digest)
            return due

        for step in range(120):
            newcomer = Node(rng.randbytes(20), "127.0.0.1", 1)
            assert {d for d, _ in protocol._values_for(newcomer)} == expected(newcomer)
            if step % 3 == 0:  # the table grows (and splits) between some of the checks
                router.add_contact(Node(rng.randbytes(20), "127.0.0.1", 1024 + step))
            if step % 17 == 0 and router.contacts():
                router.remove_contact(rng.choice(router.contacts()))
    finally:
        await stop_all([node])


async def test_only_buckets_nobody_searched_lately_are_refreshed() -> None:
    node = await start_node()
    try:
        router = node.rpc.router
        rng = random.Random(5)
        for index in range(300):
            router.add_contact(Node(rng.randbytes(20), "127.0.0.1", 1024 + index))
        assert len(router.buckets) > 4
        for bucket in router.buckets:
            bucket.last_updated -= 2 * node.settings.refresh_interval  # nobody used them
        searched = router.buckets[-1]
        router.find_neighbors(Node(searched.range[0].to_bytes(20, "big")))
        due = [router.buckets[router.get_bucket_for(Node(i))] for i in node._refresh_ids()]
        assert searched not in due
        assert len(due) == len(router.buckets) - 1
    finally:
        await stop_all([node])


def test_misses_are_counted_for_held_contacts_only_and_forgotten_with_them() -> None:
    table = table_of(random.Random(7), 10)
    # Ids named in answers that never answer: nothing of them stays in the table's memory.
    for _ in range(500):
        assert not table.record_failure(Node(random.randbytes(20), "127.0.0.1", 9))
    assert table._failures == {}
    held = table.contacts()[0]
    assert not table.record_failure(held)
    assert table.misses(held.id) == 1
    table.remove_contact(held)
    assert table.misses(held.id) == 0
