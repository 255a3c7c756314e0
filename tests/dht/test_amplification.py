"""No amplification towards an address that has not shown it receives: measured on the wire
at a raw socket that never answers (what a spoofed victim looks like from the node), the node
sends it at most `AMPLIFICATION` times the bytes sent in its name, and pushes no STOREs to it,
whether the requests look like a stock node's (the answer waits for a check that fails) or our
nodes' (a cut answer at once); an address that answers our check gets the full answer, and
our nodes asking a node that never heard of them get its contact list at once (their requests
are padded to pay for it) and still read values at once."""

from __future__ import annotations

import os
import socket
from collections import Counter
from typing import Any

import pytest
from kademlia.network import Server
from kademlia.node import Node

from dht_bridge.dht import shards
from dht_bridge.dht.admission import AMPLIFICATION
from dht_bridge.dht.lookup import PARTIAL_LIMIT
from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.protocol import SERVER_TAG, VALUE_PADDED, is_partial, padded_size
from dht_bridge.dht.values import DecodedValue, backs_mark, decode_value, key_digest
from tests.support.dht import NetworkFactory, publish_all, start_node
from tests.support.helpers import free_port, make_record, wait_for
from tests.support.raw_peer import RESPONSE, RawPeer, open_raw_peer

NETWORK = 8
PROVIDERS = 12


async def quiet(nodes: list[DHTNode]) -> None:
    """Wait until no node has a background task left (checks, pushes): all it will send."""
    await wait_for(
        lambda: not any(node.rpc._tasks for node in nodes),
        timeout=10,
        message="the nodes' background tasks to end",
    )


async def published(network_factory: NetworkFactory) -> list[DHTNode]:
    nodes = await network_factory(NETWORK)
    await publish_all(nodes, [make_record(services=["ocr"]) for _ in range(PROVIDERS)])
    return nodes


@pytest.mark.parametrize(
    ("tag", "pad"),
    [
        (b"", 0),
        (SERVER_TAG, 0),
        (SERVER_TAG, padded_size(20, socket.AF_INET)),
        (SERVER_TAG, VALUE_PADDED),
    ],
    ids=["stock", "ours", "ours-padded", "ours-value-padded"],
)
@pytest.mark.parametrize("rpc", ["find_value", "find_node"])
async def test_an_unproved_sender_gets_at_most_3x_its_request_on_the_wire(
    rpc: str, tag: bytes, pad: int, network_factory: NetworkFactory
) -> None:
    nodes = await published(network_factory)
    digest = key_digest(shards.service_key("ocr", 0))
    holders = [n for n in nodes if n.storage.value(digest) is not None]
    value = holders[0].storage.value(digest)
    assert value is not None
    assert len(value) > 2000
    transport, victim = await open_raw_peer(None, tag, pad)  # never answers: a spoofed source
    try:
        for node in holders:
            answer = await victim.ask(node.address, rpc, os.urandom(20), digest)
            if pad < VALUE_PADDED:
                # Contacts, or for our nodes a share of the value marked so (`cut_value`).
                assert isinstance(answer, list) or (tag and is_partial(answer)), (
                    "the full answer went to an unproved address"
                )
        await quiet(nodes)
        ratio = victim.received.bytes / victim.sent_bytes
        assert ratio <= AMPLIFICATION, (victim.received.bytes, victim.sent_bytes)
        assert victim.received.requests.get("store", 0) == 0
    finally:
        transport.close()


async def test_fresh_ids_from_an_unproved_address_draw_no_stores_and_one_check(
    network_factory: NetworkFactory,
) -> None:
    nodes = await published(network_factory)
    transport, victim = await open_raw_peer(None)
    try:
        for _ in range(5):  # every round a new id: each would be a newcomer to welcome
            for node in nodes:
                await victim.ask(node.address, "ping", os.urandom(20))
        await quiet(nodes)
        assert victim.received.requests.get("store", 0) == 0
        # One check per node: a silent address is not checked again for a while.
        assert victim.received.requests.get("ping", 0) <= len(nodes)
        ratio = victim.received.bytes / victim.sent_bytes
        assert ratio <= AMPLIFICATION, (victim.received.bytes, victim.sent_bytes)
        assert all((c.ip, c.port) != victim.address for n in nodes for c in n.rpc.router.contacts())
    finally:
        transport.close()


async def test_a_sender_that_answers_our_check_gets_the_full_answer_and_its_values(
    network_factory: NetworkFactory,
) -> None:
    nodes = await published(network_factory)
    digest = key_digest(shards.service_key("ocr", 0))
    # The node closest to the key: no contact is closer, so it is the one to push the value.
    holder = min(nodes, key=lambda n: n.node.long_id ^ int.from_bytes(digest, "big"))
    assert holder.storage.value(digest) is not None
    peer_id = bytes(a ^ b for a, b in zip(digest, b"\x00" * 19 + b"\x01", strict=True))

    def node_like(_sender: tuple[str, int], name: str, _args: list[object]) -> object:
        return peer_id if name == "ping" else "ok"

    transport, peer = await open_raw_peer(node_like)
    try:
        answer = await peer.ask(holder.address, "find_value", peer_id, digest)
        assert answer == {"value": holder.storage.value(digest)}
        # It answered from its address with its id: a contact now, and one next to the key,
        # so the values it should hold are pushed to it.
        await wait_for(
            lambda: peer.received.requests.get("store", 0) > 0,
            timeout=5,
            message="values pushed to the new contact",
        )
        assert any((c.ip, c.port) == peer.address for c in holder.rpc.router.contacts())
    finally:
        transport.close()


# Enough providers that a shard's value outgrows what even a value request pays for.
MANY = 30


async def stranger_to(network_factory: NetworkFactory) -> tuple[list[DHTNode], DHTNode]:
    """A network with MANY providers of ocr, and a reader that knows its nodes (from a state
    file, say) while none of them knows it."""
    nodes = await network_factory(NETWORK)
    await publish_all(nodes, [make_record(services=["ocr"]) for _ in range(MANY)])
    reader = await start_node()
    for node in nodes:
        reader.rpc.router.add_contact(Node(node.node.id, *node.address))
    return nodes, reader


async def test_a_node_nobody_has_heard_of_reads_every_provider(
    network_factory: NetworkFactory,
) -> None:
    nodes, reader = await stranger_to(network_factory)
    try:
        found = await reader.lookup("ocr", limit=100)
        assert len(found) == MANY
        # The value outgrows what a padded request pays for: the holders cut their answers,
        # and a reader wanting more providers than a cut holds asked again once it answered
        # their checks.
        assert sum(n.rpc.stats.bounded_answers for n in nodes) > 0
    finally:
        await reader.aclose()


async def test_a_lookup_for_a_few_providers_takes_a_holders_cut_value_at_once(
    network_factory: NetworkFactory,
) -> None:
    nodes, reader = await stranger_to(network_factory)
    asked: Counter[tuple[bytes, bytes]] = Counter()
    call_find_value = reader.rpc.call_find_value

    async def counted(node: Node, target: Node, *, near: bool = False) -> tuple[bool, Any]:
        asked[node.id, target.id] += 1
        return await call_find_value(node, target, near=near)

    reader.rpc.call_find_value = counted  # type: ignore[method-assign,assignment]
    try:
        found = await reader.lookup("ocr", limit=PARTIAL_LIMIT)
        assert len(found) == PARTIAL_LIMIT
        # Every holder that never heard the reader sent a share of its records at once, and
        # was not asked again for the rest: no contact list naming the reader went out, and
        # no node was asked twice for one key.
        cuts = sum(n.rpc.stats.cut_values for n in nodes)
        assert cuts > 0
        assert sum(n.rpc.stats.bounded_answers for n in nodes) == cuts
        assert asked
        assert max(asked.values()) == 1, asked
    finally:
        await reader.aclose()


async def test_a_cut_value_keeps_its_overflow_mark_backed(
    network_factory: NetworkFactory,
) -> None:
    nodes = await network_factory(NETWORK)
    # More than the root shard holds: it overflows, and its holders mark it.
    await publish_all(nodes, [make_record(services=["ocr"]) for _ in range(2 * MANY)])
    digest = key_digest(shards.service_key("ocr", 0))
    holders = [n for n in nodes if n.storage.value(digest) is not None]
    now = holders[0].clock()

    def decoded(node: DHTNode, value: bytes | None) -> DecodedValue:
        return decode_value(value, digest=digest, verifier=node.verifier, now=now)

    marked = [n for n in holders if decoded(n, n.storage.value(digest)).overflowed(now)]
    assert marked, "the root shard was never marked overflowed"
    transport, victim = await open_raw_peer(None, SERVER_TAG, VALUE_PADDED)
    try:
        for node in marked:
            answer = await victim.ask(node.address, "find_value", os.urandom(20), digest)
            assert is_partial(answer)
            cut = decoded(node, answer["value"])
            assert 0 < len(cut.records) < len(decoded(node, node.storage.value(digest)).records)
            # A reader sent this share goes one level down, as the whole value would send it.
            assert backs_mark(cut, node.verifier, now)
        assert victim.received.bytes <= AMPLIFICATION * victim.sent_bytes
    finally:
        transport.close()


async def test_our_first_request_to_a_node_that_never_heard_of_us_is_answered_in_full(
    network_factory: NetworkFactory,
) -> None:
    nodes = await published(network_factory)
    callee = nodes[-1]
    reader = await start_node()  # knows nobody, and nobody knows it
    try:
        contact = Node(callee.node.id, *callee.address)
        before = reader.rpc.stats.bytes_out
        ok, answer = await reader.rpc.call_find_node(contact, Node(os.urandom(20)))
        assert ok
        # Padded: three times the request paid for the callee's check and a full answer.
        assert reader.rpc.stats.bytes_out - before >= padded_size(20, socket.AF_INET)
        assert callee.rpc.stats.bounded_answers == 0
        assert len(answer) == NETWORK - 1
        assert reader.node.id not in [entry[0] for entry in answer]
        # The reader answered the callee's check: the callee has proved it, so the next
        # request goes unpadded, and is still answered in full.
        await wait_for(
            lambda: callee.address in reader.rpc.heard_us,
            timeout=5,
            message="the reader to answer the callee's check",
        )
        before = reader.rpc.stats.bytes_out
        ok, again = await reader.rpc.call_find_node(contact, Node(os.urandom(20)))
        assert ok
        assert reader.rpc.stats.bytes_out - before < padded_size(20, socket.AF_INET) / 2
        assert len(again) == NETWORK - 1
        assert callee.rpc.stats.bounded_answers == 0
    finally:
        await reader.aclose()


async def test_a_stock_kademlia_server_answers_our_padded_request() -> None:
    stock = Server()
    await stock.listen(free_port(socket.SOCK_DGRAM), interface="127.0.0.1")
    reader = await start_node()
    try:
        contact = Node(stock.node.id, "127.0.0.1", stock.transport.get_extra_info("sockname")[1])
        before = reader.rpc.stats.bytes_out
        ok, answer = await reader.rpc.call_find_node(contact, Node(os.urandom(20)))
        assert reader.rpc.stats.bytes_out - before >= padded_size(20, socket.AF_INET)
        assert ok
        assert answer == []  # it knows nobody but the reader, whom it never lists
    finally:
        await reader.aclose()
        stock.stop()


def test_the_raw_peer_counts_what_it_receives() -> None:
    peer = RawPeer(None)
    peer.datagram_received(RESPONSE + os.urandom(20) + b"\xc0", ("127.0.0.1", 9))
    assert (peer.received.datagrams, peer.received.bytes) == (1, 22)
