"""One hostile peer against a node, each case on real UDP sockets on 127.0.0.1: a crawl it
would keep open with ever nearer ids of its own, holders it would mint next to a key, datagrams
bigger than any node sends, entries it would leave in our memory for good, keys it would
create without a record."""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any

import msgpack
from kademlia.node import Node

from dht_bridge.dht.crawl import MAX_QUERIES_FACTOR
from dht_bridge.dht.protocol import CLIENT_TAG, WELCOME_BURST
from dht_bridge.dht.routing import RMARoutingTable
from dht_bridge.dht.values import key_digest
from tests.support.dht import start_network, start_node, stop_all
from tests.support.helpers import wait_for
from tests.support.raw_peer import REQUEST, RESPONSE, open_raw_peer

Address = tuple[str, int]


async def test_a_peer_naming_ever_nearer_ids_of_its_own_cannot_hold_a_lookup_open() -> None:
    victim = await start_node()
    named = 0
    home: list[Address] = []

    def answer(sender: Address, name: str, args: list[Any]) -> Any:
        nonlocal named
        if name == "ping":
            return os.urandom(20)
        if name in ("find_node", "find_value"):
            # One more id at its own address, a little nearer the key each time.
            named += 1
            key = int.from_bytes(args[1], "big")
            return [((key ^ ((1 << 150) - named)).to_bytes(20, "big"), *home[0])]
        return None

    transport, peer = await open_raw_peer(answer)
    home.append(peer.address)
    try:
        key = int.from_bytes(key_digest("svc:llm:0"), "big")
        victim.rpc.router.add_contact(Node((key ^ (1 << 155)).to_bytes(20, "big"), *home[0]))
        async with asyncio.timeout(10.0):
            assert await victim.lookup("llm", limit=5) == []
        asked = sum(peer.received.requests.get(n, 0) for n in ("find_node", "find_value"))
        # Each level read at once is a crawl of its own; each asks one address a few times.
        limits = victim.rpc.router.limits
        assert asked <= 4 * limits.per_ip_table
        assert asked < MAX_QUERIES_FACTOR * victim.ksize
    finally:
        transport.close()
        await victim.aclose()


async def test_datagrams_no_node_sends_and_replies_to_nothing_asked_are_dropped_unparsed() -> None:
    victim = await start_node()
    transport, _ = await open_raw_peer()
    try:
        stats = victim.rpc.stats
        # Bigger than any node's datagram: 64 KB of empty msgpack arrays.
        huge = REQUEST + os.urandom(20) + b"\xdc\xfd\xe8" + b"\x90" * 65000
        # A reply to no request of the victim's, whose body would not even parse.
        stray = RESPONSE + os.urandom(20) + b"\xc1" * 100
        for datagram in (huge, stray):
            transport.sendto(datagram, victim.address)
        await wait_for(lambda: stats.packets_in >= 2, timeout=10.0, message="both datagrams read")
        assert stats.malformed == 1  # the big one, refused by its size alone
        assert stats.rpc_bytes.get("unmatched") == len(stray)
        assert stats.requests_in == 0
    finally:
        transport.close()
        await victim.aclose()


async def test_requests_forged_as_clients_from_contacts_addresses_evict_no_contact() -> None:
    nodes = await start_network(12)
    victim = nodes[0]
    try:
        contacts = victim.rpc.router.contacts()
        assert len(contacts) >= 8
        # What the kernel would hand the victim for a datagram whose source was forged as each
        # contact's address: a PING tagged as from a client, naming the contact's id.
        for contact in contacts:
            forged = REQUEST + CLIENT_TAG + os.urandom(16) + msgpack.packb(["ping", [contact.id]])
            victim.rpc.datagram_received(forged, (contact.ip, contact.port))
        held = {c.id for c in contacts}
        assert {c.id for c in victim.rpc.router.contacts()} >= held
        # Each contact is pinged, answers as the server it is, and stays.
        await wait_for(
            lambda: not victim.rpc._leaving, timeout=10.0, message="the contacts checked"
        )
        assert {c.id for c in victim.rpc.router.contacts()} >= held
    finally:
        await stop_all(nodes)


async def test_one_address_minting_newcomers_gets_a_few_pushes_then_none() -> None:
    victim = await start_node()
    current: list[bytes] = []

    def answer(sender: Address, name: str, args: list[Any]) -> Any:
        return current[-1] if name == "ping" else None

    transport, peer = await open_raw_peer(answer)
    try:
        router = victim.rpc.router
        for _ in range(2 * WELCOME_BURST):
            current.append(os.urandom(20))
            newcomer = Node(current[-1], *peer.address)
            # A fresh id pings; the victim checks the address and takes it in.
            await peer.ask(victim.address, "ping", current[-1])
            await wait_for(
                functools.partial(_held, router, newcomer),
                timeout=10.0,
                message="the newcomer in the table",
            )
            router.remove_contact(newcomer)  # as a drop would, making room for the next id
        # Each welcome beyond the burst would walk every stored key to find what to push.
        assert victim.rpc.stats.unpushed == WELCOME_BURST
    finally:
        transport.close()
        await victim.aclose()


def _held(router: RMARoutingTable, node: Node) -> bool:
    return router.held(node) is not None
