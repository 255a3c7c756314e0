"""Heartbeat renewals: holders that hold a worker's record get only what a heartbeat changes,
and anything they cannot rebuild and verify falls back to the whole record."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dht_bridge.dht import shards
from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.renew import HeldCopy, RenewalBook, renewal_args
from dht_bridge.dht.storage import RecordStorage, StoreResult
from dht_bridge.dht.values import encode_value, key_digest
from dht_bridge.identity import Identity
from tests.support.dht import NetworkFactory, start_network, stop_all
from tests.support.helpers import POLICY, ManualClock, make_record


@pytest.fixture
async def network() -> AsyncIterator[list[DHTNode]]:
    nodes = await start_network(16)
    yield nodes
    await stop_all(nodes)


def holding(nodes: list[DHTNode], key: str, worker_id: str) -> dict[DHTNode, int]:
    """The seq each node holds for `worker_id` under `key`."""
    digest = key_digest(key)
    held = {}
    for node in nodes:
        for record in node.storage.records(digest):
            if record.worker_id == worker_id:
                held[node] = record.seq
    return held


async def test_a_heartbeat_renews_holders_that_hold_the_record_with_fewer_bytes(
    network: list[DHTNode],
) -> None:
    identity = Identity.generate()
    publisher = network[3]
    first = make_record(identity, seq=1, load=0.5)
    await publisher.publish(first)
    stores_before = publisher.rpc.stats.rpc_bytes.get("store", 0)
    second = make_record(identity, seq=2, load=0.25)
    report = await publisher.publish(second)
    renew_bytes = publisher.rpc.stats.rpc_bytes.get("renew", 0)
    assert publisher.rpc.stats.rpc_bytes.get("store", 0) == stores_before  # no whole record
    remote = sum(k.stored for k in report.keys)
    assert remote >= 2 * 8  # both keys, every holder renewed
    # A renewal with its answer is well under a STORE of the same record with its answer.
    assert renew_bytes / remote < 0.75 * stores_before / remote
    for key in (shards.worker_key(identity.worker_id), "svc:ocr:0"):
        held = holding(network, key, identity.worker_id)
        assert len(held) >= 8, key
        assert set(held.values()) == {2}, key
    found = await network[10].get_record(identity.worker_id)
    assert found == second  # rebuilt field for field, signature included
    assert (await network[12].lookup("ocr")) == [second]


async def test_a_holder_that_lost_the_record_is_sent_it_whole(network: list[DHTNode]) -> None:
    identity = Identity.generate()
    publisher = network[2]
    await publisher.publish(make_record(identity, seq=1))
    key = shards.worker_key(identity.worker_id)
    victim = next(n for n in holding(network, key, identity.worker_id) if n is not publisher)
    victim.storage._data.clear()  # a restart
    await publisher.publish(make_record(identity, seq=2))
    assert publisher.publisher.renewals_refused >= 1
    assert holding([victim], key, identity.worker_id) == {victim: 2}


async def test_a_record_whose_other_fields_changed_is_stored_whole(
    network: list[DHTNode],
) -> None:
    identity = Identity.generate()
    publisher = network[5]
    await publisher.publish(make_record(identity, seq=1))
    renewals = publisher.rpc.stats.rpc_bytes.get("renew", 0)
    moved = make_record(identity, seq=2, tunnel_url="https://moved.trycloudflare.com")
    await publisher.publish(moved)
    assert publisher.rpc.stats.rpc_bytes.get("renew", 0) == renewals
    assert await network[9].get_record(identity.worker_id) == moved


async def test_a_cached_holder_that_misses_one_heartbeat_is_asked_again_not_recrawled(
    network: list[DHTNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = Identity.generate()
    publisher = network[4]
    await publisher.publish(make_record(identity, seq=1))
    key = shards.worker_key(identity.worker_id)
    victim = next(n for n in holding(network, key, identity.worker_id) if n is not publisher)
    renew = publisher.rpc.call_renew
    lost: list[bytes] = []

    async def lossy(node: Any, digest: bytes, args: list[Any]) -> tuple[bool, Any]:
        if node.id == victim.node.id and digest == key_digest(key) and not lost:
            lost.append(node.id)  # the datagram is lost: the request times out
            return False, None
        return await renew(node, digest, args)

    monkeypatch.setattr(publisher.rpc, "call_renew", lossy)
    crawled = publisher.crawl_queries.get("holders", 0)
    await publisher.publish(make_record(identity, seq=2))
    assert lost
    assert publisher.publisher.store_retries == 1
    assert publisher.crawl_queries.get("holders", 0) == crawled  # no crawl for the key again
    assert holding([victim], key, identity.worker_id) == {victim: 2}


async def test_a_cached_holder_that_left_is_replaced_by_asking_two_holders_not_a_crawl(
    network: list[DHTNode],
) -> None:
    identity = Identity.generate()
    publisher = network[6]
    await publisher.publish(make_record(identity, seq=1))
    key = shards.worker_key(identity.worker_id)
    digest = key_digest(key)
    cached = publisher.publisher._holder_cache[digest][1]
    victim = next(n for n in network if n is not publisher and n.node.id == cached[0].id)
    among = sum(
        victim.node.id in [n.id for n in h] for _, h in publisher.publisher._holder_cache.values()
    )
    await victim.aclose()  # crashed: no answer, ever
    crawled = publisher.crawl_queries.get("holders", 0)
    rechecked = publisher.crawl_queries.get("recheck", 0)
    await publisher.publish(make_record(identity, seq=2))
    assert publisher.crawl_queries.get("holders", 0) == crawled
    # Two questions for each key (worker, shard) whose cached holders it was among.
    assert publisher.crawl_queries.get("recheck", 0) - rechecked == 2 * among
    now_cached = [n.id for n in publisher.publisher._holder_cache[digest][1]]
    assert victim.node.id not in now_cached
    assert len(now_cached) == len(cached)  # the next closest took its place
    alive = [n for n in network if n is not victim]
    assert sum(1 for seq in holding(alive, key, identity.worker_id).values() if seq == 2) >= 8


def test_storage_refuses_forged_stale_and_malformed_renewals() -> None:
    storage = RecordStorage(POLICY)
    identity = Identity.generate()
    key = shards.worker_key(identity.worker_id)
    digest = key_digest(key)
    held = make_record(identity, seq=5)
    assert storage.merge(digest, encode_value(key, [held])) is StoreResult.OK

    forged = renewal_args(make_record(identity, seq=6))
    forged[4] = os.urandom(64)
    assert storage.renew(digest, forged) is StoreResult.UNKNOWN
    other_url = make_record(identity, seq=6, tunnel_url="https://other.trycloudflare.com")
    assert storage.renew(digest, renewal_args(other_url)) is StoreResult.UNKNOWN
    assert storage.renew(digest, renewal_args(make_record(identity, seq=4))) is StoreResult.STALE
    stranger = make_record(seq=9)
    assert storage.renew(digest, renewal_args(stranger)) is StoreResult.UNKNOWN
    assert storage.renew(key_digest("svc:ocr:0"), renewal_args(held)) is StoreResult.UNKNOWN
    for bad in ([], [b"short"], [*renewal_args(held)[:4], b"sig"], [*renewal_args(held), 1]):
        assert storage.renew(digest, bad) is StoreResult.INVALID, bad
    assert storage.records(digest) == [held]

    good = make_record(identity, seq=6, load=0.9)
    assert storage.renew(digest, renewal_args(good)) is StoreResult.OK
    assert storage.records(digest) == [good]


def test_only_holders_that_answered_as_our_nodes_do_are_renewed() -> None:
    book = RenewalBook()
    record = make_record()
    digest = key_digest("svc:ocr:0")
    ours, stock, full, silent = b"a" * 20, b"b" * 20, b"c" * 20, b"d" * 20
    book.note(digest, record, [(ours, "ok"), (stock, True), (full, "full"), (silent, None)])
    assert book.holders(digest, record).keys() == {ours}
    book.note(digest, record, [(ours, "unknown")])
    assert book.holders(digest, record) == {}
    book.note(digest, record, [(ours, "stale")])
    moved = dataclasses.replace(record, tunnel_url="https://moved.trycloudflare.com")
    assert book.holders(digest, moved) == {}  # other fields: nobody holds this one


def test_a_copy_waits_only_when_it_outlives_the_next_publish_and_shows_a_close_load() -> None:
    record = make_record(now=1000.0, ttl=90, load=0.5)
    assert HeldCopy(1060.0, 0.5).can_wait(record, now=1000.0, again_within=33)
    assert HeldCopy(1060.0, 0.4).can_wait(record, now=1000.0, again_within=33)
    # Lapses too soon after the next publish, were it late: renewed now.
    assert not HeldCopy(1045.0, 0.5).can_wait(record, now=1000.0, again_within=33)
    # Shows a load far from the current one: readers would pick it wrongly for a minute.
    assert not HeldCopy(1060.0, 0.1).can_wait(record, now=1000.0, again_within=33)


async def test_a_publisher_that_says_when_it_publishes_next_renews_every_other_beat(
    network_factory: NetworkFactory,
) -> None:
    clock = ManualClock()
    nodes = await network_factory(16, clock=clock)
    identity = Identity.generate()
    publisher, reader = nodes[3], nodes[11]
    keys = (shards.worker_key(identity.worker_id), "svc:ocr:0")
    first = make_record(identity, seq=1, now=clock(), ttl=90)
    await publisher.publish(first, again_within=33)
    sent = publisher.rpc.stats.packets_out

    clock.advance(30)
    second = make_record(identity, seq=2, now=clock(), ttl=90)
    report = await publisher.publish(second, again_within=33)
    assert publisher.rpc.stats.packets_out == sent  # every copy outlives the next beat
    assert report.only_deferred
    assert report.stored  # held, not lost
    assert report.held_until == first.expires_at  # what readers can count on
    others = [n for n in nodes if n is not publisher]  # it keeps its own copy current
    for key in keys:
        assert set(holding(others, key, identity.worker_id).values()) == {1}, key
    assert [r.worker_id for r in await reader.lookup("ocr")] == [identity.worker_id]

    clock.advance(30)  # the copies of seq 1 now lapse before the beat after next
    third = make_record(identity, seq=3, now=clock(), ttl=90)
    report = await publisher.publish(third, again_within=33)
    assert sum(k.deferred for k in report.keys) == 0
    assert report.held_until == third.expires_at
    for key in keys:
        held = holding(nodes, key, identity.worker_id)
        assert len(held) >= 8, key
        assert set(held.values()) == {3}, key

    clock.advance(30)  # a load that jumps reaches every holder at once
    busy = make_record(identity, seq=4, now=clock(), ttl=90, load=0.9)
    report = await publisher.publish(busy, again_within=33)
    assert sum(k.deferred for k in report.keys) == 0
    assert (await reader.lookup("ocr")) == [busy]
