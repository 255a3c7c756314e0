"""Our DHT node on real UDP sockets on 127.0.0.1: merging, forgery, sharding, expiry,
replication to newcomers, churn, routing, the stock library as a peer, hostile datagrams."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import random
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest
from kademlia.network import Server
from kademlia.node import Node

from dht_bridge.dht import shards
from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.publish import PublishReport
from dht_bridge.dht.storage import _Entry
from dht_bridge.dht.values import (
    MAX_DATAGRAM_BODY,
    MAX_RECORDS_BYTES,
    RecordVerifier,
    decode_value,
    encode_value,
    key_digest,
)
from dht_bridge.errors import BootstrapError, PublishError, RecordError, RecordSignatureError
from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord, sign_record, tombstone_for
from tests.support.dht import (
    TEST_SETTINGS,
    ManualClock,
    NetworkFactory,
    publish_all,
    start_network,
    start_node,
    stop_all,
)
from tests.support.helpers import POLICY, free_port, make_record, wait_for


@pytest.fixture
async def network() -> AsyncIterator[list[DHTNode]]:
    nodes = await start_network(32)
    yield nodes
    await stop_all(nodes)


def holders_of(nodes: list[DHTNode], key: str) -> list[DHTNode]:
    digest = key_digest(key)
    return [n for n in nodes if n.storage.value(digest) is not None]


async def test_publish_and_lookup_least_loaded_first(network: list[DHTNode]) -> None:
    records = [make_record(services=["ocr"], load=load) for load in (0.7, 0.1, 0.4, 0.9, 0.2)]
    await publish_all(network, records)
    found = await network[-1].lookup("ocr", limit=3)
    assert [r.load for r in found] == [0.1, 0.2, 0.4]
    assert await network[5].lookup("gpu") == []
    one = await network[9].get_record(records[0].worker_id)
    assert one == records[0]


async def test_concurrent_publishers_of_one_service_are_merged_none_lost(
    network: list[DHTNode],
) -> None:
    # Thirty publishers at once in one process are a burst of some 4,000 requests (2 to 4 s of
    # CPU on a slow 2-core machine): replies wait unread in the sockets past the 1 s rpc
    # timeout, and are not taken for misses (`_expire` looks for unread datagrams).
    records = [make_record(services=["ocr", "gpu"]) for _ in range(30)]
    # Every publisher at once: the library would keep one of them (last writer wins).
    await asyncio.gather(*(network[i].publish(r) for i, r in enumerate(records)))
    expected = {r.worker_id for r in records}
    for reader in (network[0], network[17], network[31]):
        assert {r.worker_id for r in await reader.lookup("ocr", limit=100)} == expected
        assert {r.worker_id for r in await reader.lookup("gpu", limit=100)} == expected


async def test_tampered_forged_and_replayed_records_are_refused_by_every_node(
    network: list[DHTNode],
) -> None:
    victim_id = Identity.generate()
    victim = make_record(victim_id, seq=5, load=0.1)
    await network[3].publish(victim)
    key = shards.worker_key(victim.worker_id)
    digest = key_digest(key)
    attacker = Identity.generate()
    tampered = dataclasses.replace(make_record(victim_id, seq=6), load=1.0)
    forged = dataclasses.replace(
        make_record(attacker, seq=99), worker_id=victim.worker_id, public_key=victim.public_key
    )
    fake_tombstone = dataclasses.replace(
        tombstone_for(attacker, make_record(attacker, seq=50), now=time.time()),
        worker_id=victim.worker_id,
    )
    replay = make_record(victim_id, seq=4)
    wrong_key = make_record(attacker, seq=1)  # a valid record, filed under the victim's key
    sender = network[0]
    for node in network[1:]:
        answers = [
            (await sender.rpc.request(node.address, "store", sender.node.id, digest, value))[1]
            for value in (
                encode_value(key, [tampered]),
                encode_value(key, [forged]),
                encode_value(key, [fake_tombstone]),
                encode_value(key, [wrong_key]),
                encode_value("worker:elsewhere", [victim]),
                b"not msgpack at all",
            )
        ]
        assert answers == ["invalid"] * 6, node.address
        replayed = await sender.rpc.request(
            node.address, "store", sender.node.id, digest, encode_value(key, [replay])
        )
        assert replayed[1] in ("stale", "ok")  # "ok" only on a node that never held the victim
        held = node.storage.records(digest)
        assert all(r.worker_id == victim.worker_id for r in held)
        assert all(r.seq >= 4 and not r.tombstone and r.load != 1.0 for r in held)
    assert await network[20].get_record(victim.worker_id) == victim
    assert [r.worker_id for r in await network[21].lookup("ocr")] == [victim.worker_id]
    with pytest.raises(RecordSignatureError):
        await network[1].publish(tampered)


async def test_two_hundred_workers_in_one_service_spread_over_shards(
    network: list[DHTNode],
) -> None:
    records = [make_record(services=["ocr"], load=(i % 50) / 50) for i in range(200)]
    reports = await publish_all(network, records)
    # Turned away by a full shard and filed one level down is still stored.
    assert all(report.stored for report in reports)
    assert any(report.levels["ocr"] > 0 for report in reports)
    every = await network[7].service_records("ocr")
    assert {r.worker_id for r in every} == {r.worker_id for r in records}
    used = set()
    for node in network:
        for digest, value in node.storage:
            name = node.storage.key_name(digest) or ""
            parsed = shards.parse_service_key(name)
            if parsed:
                used.add(parsed[1])
                store = msgpack.packb(["store", [node.node.id, digest, value]])
                assert len(value) < 8 * 1024
                assert len(store) <= MAX_DATAGRAM_BODY
    assert len(used) > 1, "200 workers cannot fit one 8 KB shard"
    top = await network[12].lookup_report("ocr", limit=10)
    assert len(top.providers) == 10
    assert [r.load for r in top.providers] == sorted(r.load for r in top.providers)
    assert top.shards_read > 1  # the root is marked overflowed: the reader went down
    small = [make_record(services=["tts"]) for _ in range(20)]
    await publish_all(network, small)
    few = await network[12].lookup_report("tts", limit=50)
    assert len(few.providers) == 20
    assert few.shards_read == 1  # twenty workers fit the root: one read, no empty shards probed


async def test_records_expire_with_their_lease(network_factory: NetworkFactory) -> None:
    clock = ManualClock()
    nodes = await network_factory(12, clock=clock)
    identity = Identity.generate()
    first = make_record(identity, now=clock(), ttl=90)
    await nodes[2].publish(first)
    assert len(await nodes[9].lookup("ocr")) == 1
    clock.advance(91)
    assert await nodes[9].lookup("ocr") == []
    assert await nodes[9].get_record(identity.worker_id) is None
    assert all(n.storage.cull() >= 0 and len(n.storage) == 0 for n in nodes)
    second = make_record(identity, now=clock(), seq=2, ttl=90)
    await nodes[4].publish(second)
    assert [r.seq for r in await nodes[9].lookup("ocr")] == [2]


async def test_tombstone_removes_a_provider(network: list[DHTNode]) -> None:
    identity = Identity.generate()
    live = make_record(identity, seq=3)
    await network[1].publish(live)
    assert len(await network[8].lookup("ocr")) == 1
    await network[1].publish(tombstone_for(identity, live, now=time.time()))
    assert await network[8].lookup("ocr") == []
    gone = await network[8].get_record(identity.worker_id)
    assert gone is not None
    assert gone.tombstone
    assert gone.seq == 4


async def test_newcomers_closest_to_a_key_receive_it_and_keep_it_after_holders_die(
    network: list[DHTNode],
) -> None:
    record = make_record(services=["gpu"])
    await network[4].publish(record)
    key = shards.service_key("gpu", 0)
    digest = key_digest(key)
    original = holders_of(network, key)
    assert original
    newcomers = []
    for i in range(1, 5):
        # Ids one bit-flip away from the key: closer to it than any existing node.
        node_id = digest[:-1] + bytes([digest[-1] ^ i])
        newcomers.append(await start_node(node_id=node_id, seeds=[network[0].address]))
    try:
        for node in newcomers:
            await wait_for(
                functools.partial(lambda n: n.storage.value(digest) is not None, node),
                timeout=10,
                message=f"newcomer {node.address} to receive {key}",
            )
        reader = next(n for n in network if n not in original)
        await stop_all(original)
        found = await reader.lookup("gpu")
        assert [r.worker_id for r in found] == [record.worker_id]
    finally:
        await stop_all(newcomers)


def udp_port_free(port: int) -> bool:
    """Can a UDP socket bind 127.0.0.1:`port` now (its last owner closed)?"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def restarted_holder_receives(
    contact: Node, seed: tuple[str, int], digest: bytes
) -> list[WorkerRecord]:
    """Restart the crashed `contact` (same id and port, empty storage) through `seed`, wait
    until it is pushed `digest` again, and return the records it then holds there."""
    await wait_for(lambda: udp_port_free(contact.port), timeout=5, message="the port to be free")
    back = DHTNode(TEST_SETTINGS, policy=POLICY, node_id=contact.id)
    await back.listen(port=contact.port)
    try:
        await back.bootstrap([seed])
        await wait_for(
            lambda: back.storage.value(digest) is not None,
            timeout=10,
            message="the restarted holder to receive the key again",
        )
        return back.storage.records(digest)
    finally:
        await back.aclose()


@pytest.mark.parametrize("dropped", [False, True], ids=["still-held", "dropped"])
async def test_a_holder_back_from_a_crash_receives_what_it_held(
    network: list[DHTNode], dropped: bool
) -> None:
    record = make_record(services=["gpu"])
    await network[4].publish(record)
    digest = key_digest(shards.service_key("gpu", 0))
    node_id = digest[:-1] + bytes([digest[-1] ^ 1])  # closer to the key than anyone
    holder = await start_node(node_id=node_id, seeds=[network[0].address])
    await wait_for(
        lambda: holder.storage.value(digest) is not None,
        timeout=10,
        message="the newcomer to receive the key",
    )
    contact = Node(node_id, *holder.address)
    await holder.aclose()  # a crash: nobody is told
    # Its neighbours still hold it, or dropped it after missed replies but welcomed it
    # minutes ago: either way it would be no newcomer to welcome.
    assert any(n.rpc.router.knows(contact) for n in network)
    if dropped:

        async def drop(node: DHTNode) -> None:
            for _ in range(2 * TEST_SETTINGS.max_failures):
                if not node.rpc.router.knows(contact):
                    return
                await node.rpc.call_ping(contact)

        await asyncio.gather(*(drop(n) for n in network))
        assert not any(n.rpc.router.knows(contact) for n in network)
    held = await restarted_holder_receives(contact, network[0].address, digest)
    assert [r.worker_id for r in held] == [record.worker_id]


class HeldRelay(asyncio.DatagramProtocol):
    """A UDP address in front of `target` that holds what it is sent until `release`, then
    passes both ways: a seed that answers late."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.held: list[tuple[bytes, tuple[str, int]]] = []
        self.released = False
        self.client: tuple[str, int] | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if addr == self.target:  # the real node's answer, back to whoever asked
            if self.client is not None:
                self.transport.sendto(data, self.client)
        elif self.released:
            self.client = addr
            self.transport.sendto(data, self.target)
        else:
            self.held.append((data, addr))

    def release(self) -> None:
        """Pass on what was held, and everything from now on."""
        self.released = True
        for data, addr in self.held:
            self.datagram_received(data, addr)


async def test_a_join_starts_on_the_first_seeds_answer_and_takes_a_late_seed_after() -> None:
    """A join waited for every seed's ping: the farthest seed's round trip, a lost ping the
    whole rpc timeout. It now crawls from the seeds that answered by a stall after the first,
    and a seed answering later still joins the routing table."""
    nodes = await start_network(2)
    lone = await start_node()  # in no one's table: only its own answer can put it in ours
    nodes.append(lone)
    relay = HeldRelay(lone.address)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: relay, local_addr=("127.0.0.1", 0)
    )
    late = transport.get_extra_info("sockname")[:2]
    joiner = await start_node()
    try:
        await joiner.bootstrap([nodes[0].address, late])
        # The join ended with the late seed's ping still out, not after waiting it out.
        assert relay.held
        assert joiner.rpc.stats.timeouts == 0
        relay.release()
        await wait_for(
            lambda: any(
                (n.ip, n.port) == late and n.id == lone.node.id
                for n in joiner.rpc.router.contacts()
            ),
            timeout=5,
            message="the late seed in the joiner's table",
        )
    finally:
        transport.close()
        await stop_all([*nodes, joiner])


async def test_a_join_that_does_not_wait_publishes_while_its_crawl_runs_on(
    network_factory: NetworkFactory,
) -> None:
    """A start publishes beside its join's crawl (`bootstrap(wait=False)`): the call returns
    the seeds before the crawl has asked anyone, the crawl then fills the table, and a node
    closed mid-crawl leaves no task behind."""
    nodes = await network_factory(6)
    joiner = await start_node()
    try:
        seeds = await joiner.bootstrap([nodes[0].address], wait=False)
        assert [s.id for s in seeds] == [nodes[0].node.id]
        assert "join" not in joiner.crawl_queries  # counted when the crawl ends
        report = await joiner.publish(make_record(services=["ocr"]))
        assert report.final["ocr"].landed
        await wait_for(
            lambda: "join" in joiner.crawl_queries and len(joiner.rpc.router) >= 5,
            timeout=5,
            message="the join's crawl done, the table filled",
        )
    finally:
        await joiner.aclose()
    quitter = await start_node()
    await quitter.bootstrap([nodes[0].address], wait=False)
    await quitter.aclose()
    assert quitter.rpc._tasks == set()


async def test_a_join_whose_welcome_came_first_leaves_a_later_restart_its_push(
    network: list[DHTNode],
) -> None:
    # Each seed's check of the joiner answers before the joiner's own-id lookup reaches it
    # (the order a loaded machine or a near seed gives): that lookup is the same join, and
    # must not spend the once-per-REJOIN_MEMORY allowance the restart below needs.
    record = make_record(services=["gpu"])
    await network[4].publish(record)
    digest = key_digest(shards.service_key("gpu", 0))
    node_id = digest[:-1] + bytes([digest[-1] ^ 1])
    holder = DHTNode(TEST_SETTINGS, policy=POLICY, node_id=node_id)
    await holder.listen()
    contact = Node(node_id, *holder.address)
    try:
        for node in network:
            assert (await holder.rpc.call_ping(Node(node.node.id, *node.address)))[0]
        await wait_for(
            lambda: all(n.rpc.router.knows(contact) for n in network),
            timeout=10,
            message="every node to have checked and welcomed the joiner",
        )
        await holder.bootstrap([network[0].address])
        await wait_for(
            lambda: holder.storage.value(digest) is not None,
            timeout=10,
            message="the joiner to receive the key",
        )
    finally:
        await holder.aclose()
    await restarted_holder_receives(contact, network[0].address, digest)


async def test_lookups_survive_twenty_percent_of_nodes_vanishing() -> None:
    nodes = await start_network(50)
    try:
        services = ["ocr", "gpu", "asr", "tts"]
        records = [make_record(services=[services[i % 4]]) for i in range(40)]
        await publish_all(nodes, records)
        rng = random.Random(7)
        victims = rng.sample(nodes[1:], 10)
        await stop_all(victims)  # no goodbye: their sockets just close
        survivors = [n for n in nodes if n not in victims]
        dead = {v.node.id for v in victims}

        def dead_known() -> int:
            return sum(1 for n in survivors for c in n.rpc.router.contacts() if c.id in dead)

        known_before = dead_known()
        attempts = succeeded = 0
        for reader in rng.sample(survivors, 10):
            for service in services:
                attempts += 1
                found = {r.worker_id for r in await reader.lookup(service, limit=50)}
                expected = {r.worker_id for r in records if service in r.services}
                succeeded += found == expected
        assert succeeded == attempts
        for record in records[:10]:
            assert await survivors[-1].get_record(record.worker_id) == record

        # Requests a finished lookup stopped waiting for still time out and count as misses
        # (the contact goes after several: see the test above), so lookups themselves clear
        # dead contacts out of the tables.
        def dead_misses() -> int:
            return sum(n.rpc.router.misses(d) for n in survivors for d in dead)

        await wait_for(
            lambda: dead_misses() > 0 or dead_known() < known_before,
            timeout=15,
            message="lookups to count misses against dead contacts",
        )
    finally:
        await stop_all(n for n in nodes if n.transport and not n.transport.is_closing())


def true_closest(nodes: list[DHTNode], searcher: DHTNode, target: bytes, k: int) -> list[bytes]:
    """The ids of the k nodes closest to `target`, the searcher left out (by brute force)."""
    others = [n for n in nodes if n is not searcher]
    others.sort(key=lambda n: n.node.long_id ^ int.from_bytes(target, "big"))
    return [n.node.id for n in others[:k]]


async def test_lookup_finds_the_true_k_closest_nodes(network_factory: NetworkFactory) -> None:
    # A wide stall window: on a loaded machine a slow live node must not be taken for dead here.
    exact = dataclasses.replace(TEST_SETTINGS, ksize=8, stall=0.5, stall_floor=0.5)
    nodes = await network_factory(80, settings=exact)
    rng = random.Random(3)
    for _ in range(10):
        target = rng.randbytes(20)
        searcher = rng.choice(nodes)
        result = await searcher.crawl(target, purpose="test")
        assert [n.id for n in result.closest] == true_closest(nodes, searcher, target, 8)


async def test_a_holder_lookup_settles_on_the_replicas_closest_asking_fewer_contacts(
    network_factory: NetworkFactory,
) -> None:
    # A heartbeat needs the `replicas` closest nodes, not the k closest: settling on those
    # finds the same nodes and asks fewer contacts (each answer carries k of them).
    exact = dataclasses.replace(TEST_SETTINGS, ksize=20, replicas=8, stall=0.5, stall_floor=0.5)
    nodes = await network_factory(60, settings=exact)
    rng = random.Random(11)
    for _ in range(6):
        target = rng.randbytes(20)
        searcher = rng.choice(nodes)
        before = dict(searcher.crawl_queries)
        holders, cached = await searcher.publisher._holders(target)
        asked = searcher.crawl_queries["holders"] - before.get("holders", 0)
        wide = await searcher.crawl(target, purpose="test")
        want = true_closest(nodes, searcher, target, 8)
        assert not cached
        assert [n.id for n in holders] == want
        assert [n.id for n in wide.closest[:8]] == want
        # The k-wide crawl cannot stop before its k closest answered; this one can.
        assert wide.queried >= exact.ksize
        assert asked < exact.ksize, (asked, wide.queried)


async def test_a_holder_lookup_waits_for_a_slow_node_among_the_closest(
    network_factory: NetworkFactory,
) -> None:
    # A busy node answers late. Readers ask the closest nodes first, so a heartbeat stored
    # past the slowest of them would be missed: the lookup for holders waits for it (up to
    # the RPC timeout), where a lookup for routing moves on after the stall.
    nodes = await network_factory(30)
    rng = random.Random(5)
    target = rng.randbytes(20)
    searcher = nodes[0]
    want = true_closest(nodes, searcher, target, TEST_SETTINGS.replicas)
    slow = next(n for n in nodes if n.node.id == want[0])
    loop = asyncio.get_running_loop()
    send = slow.rpc._send
    delay = TEST_SETTINGS.stall * 4
    assert delay < TEST_SETTINGS.rpc_timeout

    def late(datagram: bytes, addr: tuple[str, int], name: str) -> bool:
        loop.call_later(delay, send, datagram, addr, name)
        return True

    slow.rpc._send = late  # type: ignore[method-assign]
    holders, _ = await searcher.publisher._holders(target)
    assert [n.id for n in holders] == want


async def test_expired_holders_are_rechecked_by_asking_them_and_a_newcomer_is_taken_in(
    network_factory: NetworkFactory,
) -> None:
    # Once the cache of a key's holders is out of date, two of the holders are asked whom they
    # know near the key, instead of a crawl: a node that joined next to the key is found.
    stale = dataclasses.replace(TEST_SETTINGS, holder_cache_ttl=1e-6)
    nodes = await network_factory(24, settings=stale)
    publisher = nodes[0]
    digest = key_digest(shards.service_key("ocr", 0))
    first, _ = await publisher.publisher._holders(digest)
    assert [n.id for n in first] == true_closest(nodes, publisher, digest, stale.replicas)
    # Joined through the last node: the publisher has never heard of it.
    newcomer_id = bytes([*digest[:-1], digest[-1] ^ 1])
    newcomer = await start_node(settings=stale, node_id=newcomer_id, seeds=[nodes[-1].address])
    try:
        nodes.append(newcomer)
        assert publisher.rpc.router.find_neighbors(newcomer.node, k=1)[0].id != newcomer_id
        crawled = dict(publisher.crawl_queries)
        again, cached = await publisher.publisher._holders(digest)
        assert cached
        assert [n.id for n in again] == true_closest(nodes, publisher, digest, stale.replicas)
        assert again[0].id == newcomer_id
        assert publisher.crawl_queries.get("holders") == crawled.get("holders")
        assert publisher.crawl_queries["recheck"] == crawled.get("recheck", 0) + 2
    finally:
        await newcomer.aclose()  # not the factory's: it stops only the network it started


async def test_a_contact_is_dropped_after_several_missed_replies_not_one() -> None:
    nodes = await start_network(4)
    try:
        a, b = nodes[0], nodes[3]
        contact = next(c for c in a.rpc.router.contacts() if c.id == b.node.id)
        await b.aclose()
        for miss in range(1, TEST_SETTINGS.max_failures + 1):
            ok, _ = await a.rpc.call_ping(contact)
            assert not ok
            still_there = a.rpc.router.knows(contact)
            assert still_there == (miss < TEST_SETTINGS.max_failures), miss
    finally:
        await stop_all(nodes[:3])


async def test_a_reply_held_up_by_our_own_busy_loop_is_not_a_miss(
    network_factory: NetworkFactory,
) -> None:
    # A stalled event loop (a busy process) fires its timeouts late, before it has read the
    # replies waiting in its sockets: such a timeout waits once more instead of blaming the peer.
    nodes = await network_factory(2)
    a, b = nodes
    contact = next(c for c in a.rpc.router.contacts() if c.id == b.node.id)
    ping = asyncio.ensure_future(a.rpc.call_ping(contact))
    sent = a.rpc.stats.packets_out
    await wait_for(lambda: a.rpc.stats.packets_out > sent, timeout=5, interval=0)
    # Blocks the loop on purpose: the stall under test, not a wait.
    time.sleep(TEST_SETTINGS.rpc_timeout * 1.5)  # noqa: ASYNC251
    ok, _ = await ping
    assert ok
    assert (a.rpc.stats.reprieves, a.rpc.stats.timeouts) == (1, 0)
    assert a.rpc.router.knows(contact)


@pytest.mark.skipif(sys.platform == "win32", reason="FIONREAD on a datagram socket")
async def test_a_reply_queued_unread_in_our_socket_at_the_deadline_is_not_a_miss() -> None:
    # A busy node's replies queue behind the requests it is sent, and asyncio reads one
    # datagram a loop pass: its timer fires on time with the reply still unread. Here a peer
    # in a thread answers behind 50 other datagrams while our loop is held past the deadline,
    # by less than a late timer's reprieve allows.
    node = await start_node()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)

    def answer_behind_a_queue() -> None:
        request, addr = peer.recvfrom(2048)
        for _ in range(50):
            peer.sendto(b"\x07" * 30, addr)  # malformed: dropped when read
        peer.sendto(b"\x01" + request[1:21] + msgpack.packb(os.urandom(20)), addr)

    try:
        thread = threading.Thread(target=answer_behind_a_queue)
        thread.start()
        asking = asyncio.ensure_future(node.rpc.request(peer.getsockname(), "ping", node.node.id))
        sent = node.rpc.stats.packets_out
        await wait_for(lambda: node.rpc.stats.packets_out > sent, timeout=5, interval=0)
        thread.join(5)
        # Blocks the loop on purpose: the busy process under test, not a wait.
        time.sleep(TEST_SETTINGS.rpc_timeout * 1.1)  # noqa: ASYNC251
        ok, _ = await asking
        assert ok
        assert (node.rpc.stats.reprieves, node.rpc.stats.timeouts) == (1, 0)
        assert node.rpc.stats.malformed == 50
    finally:
        peer.close()
        await node.aclose()


async def test_a_stock_kademlia_server_joins_and_reads_a_key(network: list[DHTNode]) -> None:
    record = make_record(services=["ocr"])
    await network[6].publish(record)
    stock = Server()
    await stock.listen(free_port(socket.SOCK_DGRAM), interface="127.0.0.1")
    try:
        joined = await stock.bootstrap([network[0].address])
        assert joined, "the stock server found no neighbours in our network"
        value = await stock.get("svc:ocr:0")
        assert value is not None
        decoded = decode_value(
            value, digest=key_digest("svc:ocr:0"), verifier=RecordVerifier(POLICY), now=time.time()
        )
        assert [r.worker_id for r in decoded.records] == [record.worker_id]
        assert await stock.get(f"worker:{record.worker_id}") is not None
    finally:
        stock.stop()


async def test_malformed_datagrams_do_not_crash_a_node(network: list[DHTNode]) -> None:
    target = network[0]
    msg_id = os.urandom(20)
    node_id = os.urandom(20)
    garbage = [
        b"\x00" * 5,
        b"\x00" + msg_id + b"\xc1",
        b"\x00" + msg_id + msgpack.packb({"not": "a list"}),
        b"\x00" + msg_id + msgpack.packb(["store", [b"short"]]),
        b"\x00" + msg_id + msgpack.packb(["no_such_rpc", []]),
        b"\x00" + msg_id + msgpack.packb(["find_node", [node_id, "not bytes"]]),
        b"\x00" + msg_id + msgpack.packb(["ping", [node_id, 1, 2, 3]]),
        b"\x00" + msg_id + b"\x91" * 60_000 + b"\xc0",
        b"\x07" + msg_id + msgpack.packb([]),
        os.urandom(600),
    ]
    before = target.rpc.stats.malformed
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in garbage:
            sock.sendto(datagram, target.address)
        sock.sendto(b"\x01" + msg_id + msgpack.packb(True), target.address)  # unsolicited reply
    await wait_for(
        lambda: target.rpc.stats.malformed - before >= len(garbage) - 1,
        timeout=10,
        message="every hostile datagram to be counted",
    )
    ok, reply = await network[1].rpc.request(target.address, "ping", network[1].node.id)
    assert ok
    assert reply == target.node.id
    record = make_record()
    await network[2].publish(record)
    assert await target.get_record(record.worker_id) == record
    assert target.rpc.stats.rpc_bytes["malformed"] >= sum(len(d) for d in garbage[1:-1])


async def test_traffic_by_rpc_adds_up_to_every_byte_in_and_out(network: list[DHTNode]) -> None:
    records = [make_record(services=["ocr"]) for _ in range(4)]
    await publish_all(network, records)
    assert await network[3].lookup("ocr")
    for node in network:
        stats = node.rpc.stats
        assert sum(stats.rpc_bytes.values()) == stats.bytes_in + stats.bytes_out, stats
    tallies = [node.rpc.stats.rpc_bytes for node in network]
    assert sum(t.get("store", 0) for t in tallies) > 0
    assert sum(t.get("find_value", 0) for t in tallies) > 0


async def test_bootstrap_by_host_name_and_json_state(
    network: list[DHTNode], tmp_path: Path
) -> None:
    node = await start_node(seeds=[("localhost", network[0].address[1])])
    try:
        assert len(node.rpc.router) > 5
        path = tmp_path / "dht-state.json"
        node.save_state(path)
        state = json.loads(path.read_text())  # JSON, never pickle
        assert state["node_id"] == node.node.id.hex()
        assert len(state["neighbors"]) >= 5
        assert DHTNode.read_state(path) == state
        again = await start_node(
            node_id=bytes.fromhex(state["node_id"]), seeds=[tuple(p) for p in state["neighbors"]]
        )
        await again.aclose()
    finally:
        await node.aclose()


async def test_bootstrap_with_no_live_peer_says_what_it_tried() -> None:
    node = await start_node(settings=dataclasses.replace(TEST_SETTINGS, rpc_timeout=0.2))
    try:
        dead = ("127.0.0.1", free_port(socket.SOCK_DGRAM))
        with pytest.raises(BootstrapError, match=str(dead[1])) as info:
            await node.bootstrap([dead, ("no-such-host.invalid", 4000)])
        assert "no-such-host.invalid" in str(info.value)
    finally:
        await node.aclose()


@pytest.mark.parametrize("bad", ["a" * 64 + ".example", "é" * 70, "a" * 300 + ".com"])
async def test_a_peer_name_the_resolver_refuses_is_skipped_not_fatal(
    network: list[DHTNode], bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    # getaddrinfo raises UnicodeError (a ValueError, not an OSError) for a label over 63
    # characters: one such peer in a list must not stop the join through the others.
    node = await start_node()
    try:
        await node.bootstrap([(bad, 4000), network[0].address])
        assert len(node.rpc.router) > 0
        assert "cannot resolve bootstrap peer" in caplog.text
        with pytest.raises(BootstrapError, match="no usable bootstrap peer"):
            await node.bootstrap([(bad, 4000)])
    finally:
        await node.aclose()


async def test_a_lone_node_stores_and_finds_its_own_record() -> None:
    node = await start_node()
    try:
        identity = Identity.generate()
        record = sign_record(
            identity,
            tunnel_url="https://solo.trycloudflare.com",
            services=["ocr"],
            seq=1,
            now=time.time(),
        )
        report = await node.publish(record)
        assert report.stored
        assert await node.lookup("ocr") == [record]
    finally:
        await node.aclose()


async def test_heartbeats_reuse_the_holder_set_and_replace_a_dead_holder(
    network: list[DHTNode],
) -> None:
    identity = Identity.generate()
    publisher = network[5]
    await publisher.publish(make_record(identity, seq=1))
    before = publisher.rpc.stats.packets_out
    report = await publisher.publish(make_record(identity, seq=2))
    remote_stores = sum(k.stored + k.full + k.refused + k.unreachable for k in report.keys)
    # One STORE per holder and key (a local copy sends nothing): no crawl on a heartbeat.
    assert publisher.rpc.stats.packets_out - before <= remote_stores
    key = shards.worker_key(identity.worker_id)
    victim = next(n for n in holders_of(network, key) if n is not publisher)
    await victim.aclose()
    report = await publisher.publish(make_record(identity, seq=3))
    outcome = next(k for k in report.keys if k.key == key)
    assert outcome.unreachable == 1
    assert outcome.stored >= TEST_SETTINGS.replicas
    reader = next(n for n in network if n not in (publisher, victim))
    found = await reader.get_record(identity.worker_id)
    assert found is not None
    assert found.seq == 3


async def test_a_heartbeat_reaches_a_node_that_joined_closer_to_the_key(
    network: list[DHTNode],
) -> None:
    identity = Identity.generate()
    publisher = network[5]
    await publisher.publish(make_record(identity, seq=1))  # holder set found and cached
    digest = key_digest(shards.worker_key(identity.worker_id))
    # Closer to the key than any node can be by chance; it joins through the publisher, so
    # the publisher's routing table learns it, as it would from any request it gets.
    near = bytes([*digest[:-1], digest[-1] ^ 1])
    newcomer = await start_node(node_id=near, seeds=[publisher.address])
    try:
        await wait_for(
            lambda: publisher.rpc.router.knows(newcomer.node),
            timeout=10,
            message="the publisher knows the newcomer",
        )
        before = publisher.rpc.stats.packets_out
        report = await publisher.publish(make_record(identity, seq=2))
        remote = sum(k.stored + k.full + k.refused + k.unreachable for k in report.keys)
        assert publisher.rpc.stats.packets_out - before <= remote  # still no crawl
        value = newcomer.storage.value(digest)
        assert value is not None
        held = decode_value(value, digest=digest, verifier=newcomer.verifier, now=time.time())
        # Readers ask the closest nodes first: the newcomer must hold the live record, not
        # only the copy the old holders handed it when it joined.
        assert [r.seq for r in held.records] == [2]
    finally:
        await newcomer.aclose()


def test_the_verifier_remembers_records_but_not_altered_ones() -> None:
    verifier = RecordVerifier(POLICY)
    record = make_record()
    key = shards.worker_key(record.worker_id)
    item = record.to_wire()
    now = time.time()
    assert verifier.record(item, key=key, now=now) == record
    assert verifier.record(list(item), key=key, now=now) == record
    assert (verifier.misses, verifier.hits) == (1, 1)
    altered = list(item)
    altered[8] = 0.99  # the load, under the same key and signature
    with pytest.raises(RecordSignatureError):
        verifier.record(altered, key=key, now=now)
    with pytest.raises(RecordError, match="belong"):
        verifier.record(item, key="worker:" + "0" * 40, now=now)
    with pytest.raises(RecordError):
        verifier.record(item, key=key, now=record.expires_at + 1)


async def test_a_lookup_sees_through_a_holder_serving_forged_copies(
    network: list[DHTNode],
) -> None:
    victim_id, other_id = Identity.generate(), Identity.generate()
    victim = make_record(victim_id, seq=5, load=0.5)
    other = make_record(other_id, seq=2, load=0.3)
    await publish_all(network, [victim, other])
    reader = network[9]
    digest = key_digest(shards.service_key("ocr", 0))
    # A dishonest holder (here the reader's own storage, written around validation) serves a
    # newer-looking copy of the victim with a bad signature, and a forged tombstone of the other.
    forged = dataclasses.replace(make_record(victim_id, seq=99, load=0.0), load=0.01)
    fake_tomb = dataclasses.replace(
        tombstone_for(Identity.generate(), other, now=time.time()),
        worker_id=other.worker_id,
        public_key=other.public_key,
    )
    entry = reader.storage._data.get(digest)
    if entry is None:
        entry = reader.storage._data[digest] = _Entry(key=shards.service_key("ocr", 0))
    entry.records = {victim.worker_id: forged, other.worker_id: fake_tomb}
    entry.encoded = None
    found = await reader.lookup("ocr", limit=10)
    assert [(r.worker_id, r.seq) for r in found] == [
        (other.worker_id, other.seq),
        (victim.worker_id, victim.seq),
    ]


async def test_a_full_read_drops_a_holders_value_at_its_first_forged_record(
    network: list[DHTNode],
) -> None:
    records = [make_record(services=["ocr"], load=i / 10) for i in range(3)]
    await publish_all(network, records)
    reader = network[9]
    digest = key_digest(shards.service_key("ocr", 0))
    # A dishonest holder (the reader's own storage, written around validation) serves one
    # real record, then 30 forged ones: each would cost the reader a signature check.
    forged = [dataclasses.replace(make_record(services=["ocr"]), load=0.5) for _ in range(30)]
    entry = reader.storage._data.setdefault(digest, _Entry(key=shards.service_key("ocr", 0)))
    entry.records = {r.worker_id: r for r in [records[0], *forged]}
    entry.encoded = None
    checked = reader.verifier.misses
    everything = await reader.service_records("ocr")
    assert {r.worker_id for r in everything} == {r.worker_id for r in records}
    assert reader.verifier.misses - checked < 10


async def test_the_full_walk_looks_below_a_full_shard_its_holders_never_marked(
    network: list[DHTNode],
) -> None:
    # Holders whose copy of a full root was made before it was marked (or that never heard
    # the mark) serve it bare; a newcomer was filed one level down all the same.
    root = shards.service_key("ocr", 0)
    now = time.time()
    filling: list[WorkerRecord] = []
    while True:
        record = make_record(services=["ocr"], now=now, ttl=3000)
        if len(encode_value(root, [*filling, record])) > MAX_RECORDS_BYTES:
            break
        filling.append(record)
    newcomer = make_record(services=["ocr"], now=now, ttl=3000)
    below = shards.service_key("ocr", shards.shard_for(newcomer.worker_id, 1))
    for node in network:
        node.storage.merge(key_digest(root), encode_value(root, filling))
        node.storage.merge(key_digest(below), encode_value(below, [newcomer]))
    everything = await network[7].service_records("ocr")
    assert newcomer.worker_id in {r.worker_id for r in everything}
    assert len(everything) == len(filling) + 1


async def test_one_node_publishing_many_workers_records_files_each_where_readers_look(
    network: list[DHTNode],
) -> None:
    # A bridge publishes for many workers from one node: each worker's shard level is its own,
    # so none lands below a shard that readers would not descend from.
    bridge = network[0]
    seen: list[str] = []
    network[5].storage.on_merge = lambda key, records: seen.extend(r.worker_id for r in records)
    records = [make_record(services=["ocr"], load=(i % 10) / 10) for i in range(150)]
    gate = asyncio.Semaphore(16)

    async def publish(record: WorkerRecord) -> PublishReport:
        async with gate:
            return await bridge.publish(record)

    reports = await asyncio.gather(*(publish(r) for r in records))
    assert all(report.stored for report in reports)
    everything = await network[20].service_records("ocr")
    assert {r.worker_id for r in everything} == {r.worker_id for r in records}
    assert seen, "the merge hook saw nothing"
    assert set(seen) <= {r.worker_id for r in records}


def test_shard_children_agree_with_where_workers_are_filed() -> None:
    for _ in range(200):
        worker_id = os.urandom(20).hex()
        for level in range(shards.MAX_LEVEL):
            here = shards.shard_for(worker_id, level)
            assert shards.shard_for(worker_id, level + 1) in shards.children(here)
            assert shards.level_of(here) == level


async def test_a_node_cut_off_from_every_holder_does_not_call_its_own_copy_a_publish() -> None:
    nodes = await start_network(6)
    try:
        worker = nodes[5]
        await stop_all(nodes[:5])  # everyone it knows is gone
        with pytest.raises(PublishError):
            await worker.publish(make_record())
    finally:
        await worker.aclose()


async def test_a_read_of_a_key_nobody_holds_shares_the_k_closest_between_its_paths(
    network_factory: NetworkFactory,
) -> None:
    # Two disjoint paths each concluding "absent" from k closest of their own asked 2k nodes.
    nodes = await network_factory(60)
    for i in range(4):
        read = await nodes[i].crawl(
            key_digest(f"nobody-{i}"), purpose="read", find_value=True, want_values=2, paths=2
        )
        assert not read.values
        assert len(read.closest) == TEST_SETTINGS.ksize
        assert read.queried < 2 * TEST_SETTINGS.ksize
