"""Fake "full" shards: a holder that answers every STORE with `full` and serves a bare, deep
overflow mark. A `full` counts only once a holder shows a value full of signed records, a
mark sends readers down only when the value carrying it is full of them, its depth is a
bounded hint, and readers pass over holders whose values show nothing they can check."""

from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Any

import pytest
from kademlia.node import Node

from dht_bridge.dht import lookup as reading
from dht_bridge.dht import publish as publishing
from dht_bridge.dht import shards
from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.storage import OVERFLOW_MEMORY, RecordStorage, StoreResult
from dht_bridge.dht.values import (
    RecordVerifier,
    backs_mark,
    decode_value,
    encode_value,
    key_digest,
    leaves_no_room,
)
from tests.support.dht import ManualClock, NetworkFactory, publish_all, start_node
from tests.support.helpers import POLICY, make_record, wait_for
from tests.support.raw_peer import RawPeer, open_raw_peer

Address = tuple[str, int]
PROVIDERS = 5
# Every shard down to this level, by digest: what the liar serves its deep mark under.
NAMED_LEVELS = 6


class Liar:
    """One socket. Ids of its own next to the top shards enter routing tables (as many as one
    address may place); asked about any key, it names two fakes of its own next to it (so it is
    among every key's holders), answers STORE and RENEW with `full`, and FIND_VALUE of a shard
    with a bare mark claiming publishers filed 16 deep."""

    def __init__(self, service: str) -> None:
        self.home: Address = ("127.0.0.1", 0)
        self.ids = [
            key_digest(shards.service_key(service, s))[:17] + os.urandom(3) for s in range(2)
        ]
        self.last_id: dict[Address, bytes] = {}
        self.names = {
            key_digest(shards.service_key(service, s)): shards.service_key(service, s)
            for s in range(shards.shard_id(NAMED_LEVELS, 0))
        }
        self.told_full = 0
        self.marks_served = 0

    def __call__(self, sender: Address, name: str, args: list[Any]) -> Any:
        if name == "ping":
            return self.last_id.get(sender, self.ids[0])
        if name in ("store", "renew"):
            self.told_full += 1
            return "full"
        if name == "find_value" and args[1] in self.names:
            self.marks_served += 1
            mark = encode_value(
                self.names[args[1]], [], time.time() + OVERFLOW_MEMORY, shards.MAX_LEVEL
            )
            return {"value": mark}
        if name in ("find_node", "find_value"):
            key = args[1]
            return [(key[:17] + os.urandom(3), *self.home) for _ in range(2)]
        return None


async def admit(liar: Liar, peer: RawPeer, nodes: list[DHTNode]) -> None:
    """The liar's ids into every node's table (one at a time: its checks meet the id)."""
    for fake in liar.ids:
        for node in nodes:
            liar.last_id[node.address] = fake
            peer.request(node.address, "ping", fake)
        await wait_for(
            lambda fake=fake: all(n.rpc.router.held(Node(fake)) for n in nodes),  # type: ignore[misc]
            timeout=10,
            message="the liar's ids to be admitted",
        )


async def test_a_holder_that_says_full_and_serves_a_deep_mark_moves_nobody_down(
    network_factory: NetworkFactory,
) -> None:
    nodes = await network_factory(12)
    liar = Liar("ocr")
    transport, peer = await open_raw_peer(liar)
    readers: list[DHTNode] = []
    try:
        liar.home = peer.address
        await admit(liar, peer, nodes)
        records = [make_record(services=["ocr"]) for _ in range(PROVIDERS)]
        reports = await publish_all(nodes, records)

        # The liar was among the holders and said full; nobody could see a full shard.
        assert liar.told_full > 0
        assert all(report.stored for report in reports)
        # Before: every publisher filed one level down per lie, to level 16.
        assert [report.levels["ocr"] for report in reports] == [0] * PROVIDERS
        assert sum(k.unproven for report in reports for k in report.keys) > 0

        # Readers with no history: the bare mark is not believed, and the liar's empty value
        # does not end a read. Before: they read 17 levels and counted the liar's value.
        expected = {r.worker_id for r in records}
        for seed in nodes[::3]:
            reader = await start_node(seeds=[seed.address])
            readers.append(reader)
            report = await reader.lookup_report("ocr", limit=50)
            assert {r.worker_id for r in report.providers} == expected
            assert report.shards_read == 1
        assert liar.marks_served > 0, "no reader met the liar's mark: the test proves nothing"
    finally:
        transport.close()
        for reader in readers:
            await reader.aclose()


def fill(storage: RecordStorage, key: str, now: float) -> None:
    """Store records under `key` until the holder answers full."""
    digest = key_digest(key)
    while storage.merge(digest, encode_value(key, [make_record(now=now, ttl=3000)])) is not (
        StoreResult.FULL
    ):
        pass


def test_a_mark_counts_only_on_a_value_half_full_of_signed_live_records() -> None:
    clock = ManualClock()
    verifier = RecordVerifier(POLICY)
    root = shards.service_key("ocr", 0)
    digest = key_digest(root)
    until = clock() + OVERFLOW_MEMORY

    def decoded(records: list[Any]) -> Any:
        value = encode_value(root, records, until, shards.MAX_LEVEL)
        return decode_value(value, digest=digest, verifier=verifier, now=clock(), lazy=True)

    assert not backs_mark(decoded([]), verifier, clock())
    few = [make_record(now=clock(), ttl=3000) for _ in range(3)]
    assert not backs_mark(decoded(few), verifier, clock())
    storage = RecordStorage(POLICY, clock=clock)
    fill(storage, root, clock())
    full = storage.records(digest)
    assert backs_mark(decoded(full), verifier, clock())
    # Forged copies of the same size back nothing.
    forged = [dataclasses.replace(r, load=0.99) for r in full]
    assert not backs_mark(decoded(forged), verifier, clock())
    # A full value is the proof a `full` answer needs; a newcomer would not fit.
    newcomer = make_record(now=clock(), ttl=3000)
    assert leaves_no_room(decoded(full), newcomer, clock())
    assert not leaves_no_room(decoded(few), newcomer, clock())


async def test_a_reader_goes_down_at_most_a_few_levels_past_what_it_read(
    network_factory: NetworkFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = await network_factory(8)
    clock_now = nodes[0].clock()
    root = shards.service_key("ocr", 0)
    # A real full root, whose mark claims a depth of 16.
    publisher = nodes[0]
    for _ in range(40):
        await publisher.publish(make_record(now=clock_now, ttl=3000))
    mark = encode_value(root, [], clock_now + OVERFLOW_MEMORY, shards.MAX_LEVEL)
    digest = key_digest(root)
    for node in nodes:
        node.storage.merge(digest, mark)
    reader = await start_node(seeds=[nodes[3].address])
    asked: list[str] = []
    read_key = reader.reader._read_key

    async def counted(key: str, **kwargs: Any) -> reading.KeyRead:
        asked.append(key)
        return await read_key(key, **kwargs)

    monkeypatch.setattr(reader.reader, "_read_key", counted)
    reader.reader.depth_hints["ocr"] = 0  # its last lookup ended at the root: it reads that first
    try:
        report = await reader.lookup_report("ocr", limit=10)
        assert len(report.providers) == 10
        # Level 0, then at most MAX_PREFETCH levels below it at once: not all 16.
        levels = [shards.level_of(shards.parse_service_key(k)[1]) for k in asked]  # type: ignore[index]
        assert max(levels) == reading.MAX_PREFETCH, levels
    finally:
        await reader.aclose()


async def test_a_liar_asked_alone_cannot_keep_a_worker_from_rising(
    network_factory: NetworkFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rise asks one holder of the shard above first; when that one is the liar, its `full`
    # must not keep the worker below a root with room.
    nodes = await network_factory(12)
    liar = Liar("ocr")
    transport, peer = await open_raw_peer(liar)
    try:
        liar.home = peer.address
        await admit(liar, peer, nodes)
        record = make_record(services=["ocr"])
        publisher = nodes[4]
        publisher.restore_levels([["ocr", record.worker_id, 1]])
        monkeypatch.setattr(publishing, "RISE_EVERY", 1)
        choose = random.choice
        monkeypatch.setattr(
            random,
            "choice",
            lambda seq: next((n for n in seq if _at(n, liar.home)), None) or choose(seq),
        )
        told = liar.told_full
        report = await publisher.publish(record)
        assert liar.told_full > told
        assert report.levels["ocr"] == 0  # before: 16, on the liar's word alone
    finally:
        transport.close()


def _at(item: object, home: Address) -> bool:
    return (getattr(item, "ip", None), getattr(item, "port", None)) == home
