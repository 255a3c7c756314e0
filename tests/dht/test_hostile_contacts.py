"""One hostile peer must not close anyone's socket: contacts whose address the socket layer
cannot take are refused where they arrive, a bad address never reaches `sendto`, and a socket
that closes all the same is reopened where peers know it."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any, cast

import msgpack
import pytest

from dht_bridge.dht.address import contact_address, sendable
from dht_bridge.dht.crawl import parse_contacts
from dht_bridge.dht.node import DHTNode, udp_endpoint
from dht_bridge.dht.protocol import RMAProtocol
from dht_bridge.registry.registry import Registry
from tests.support.dht import TEST_SETTINGS, NetworkFactory, start_network, stop_all
from tests.support.helpers import POLICY, wait_for
from tests.support.raw_peer import parse_datagram
from tests.support.router import client_for, router_app

REQUEST, RESPONSE = b"\x00", b"\x01"

# Each of these, passed to sendto, raises something other than OSError (TypeError, ValueError,
# OverflowError) or makes the socket layer resolve a name: asyncio closes the transport on the
# former, and the latter blocks the event loop on DNS.
POISON = [
    "127.0.0.1\x00x",
    "127.0.0.1 ",
    " 127.0.0.1",
    "127.0.0.1\t",
    "localhost",
    "evil.example",
    "",
    "0.0.0.0",
    "255.255.255.255",
    "224.0.0.1",
    "x" * 300,
]


class PoisonPeer(asyncio.DatagramProtocol):
    """A peer that answers PING like a node and every FIND_NODE / FIND_VALUE with contacts
    no socket can send to."""

    def __init__(self) -> None:
        self.node_id = os.urandom(20)
        self.transport: asyncio.DatagramTransport | None = None
        self.asked = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:1] != REQUEST or self.transport is None:
            return
        _, msg_id, (name, _args) = parse_datagram(data)
        answer: Any
        if name in ("find_node", "find_value"):
            self.asked += 1
            answer = [(os.urandom(20), host, 4000 + i) for i, host in enumerate(POISON)]
            answer += [(os.urandom(20), "127.0.0.1", port) for port in (0, 70000, -1)]
        else:
            answer = self.node_id
        self.transport.sendto(RESPONSE + msg_id + msgpack.packb(answer), addr)

    def introduce(self, node: DHTNode) -> None:
        """PING `node` so that it takes this peer as a contact."""
        assert self.transport is not None
        body = msgpack.packb(["ping", [self.node_id]])
        self.transport.sendto(REQUEST + os.urandom(20) + body, node.address)


async def ping_from_outside(node: DHTNode) -> bool:
    """Does `node` answer a PING sent from a fresh socket?"""
    loop = asyncio.get_running_loop()
    answered = loop.create_future()

    class Probe(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            # The node may ping this fresh address back first (its admission check).
            if data[:1] == RESPONSE and not answered.done():
                answered.set_result(True)

    transport, _ = await loop.create_datagram_endpoint(Probe, local_addr=("127.0.0.1", 0))
    try:
        transport.sendto(
            REQUEST + os.urandom(20) + msgpack.packb(["ping", [os.urandom(20)]]), node.address
        )
        return await asyncio.wait_for(answered, 2.0)
    except TimeoutError:
        return False
    finally:
        transport.close()


def test_only_ip_literals_with_a_port_in_range_are_contact_addresses() -> None:
    for host in POISON:
        assert contact_address(host, 4000) is None, host
    for port in (0, 65536, -1, True, 4000.0, "4000"):
        assert contact_address("127.0.0.1", port) is None, port
    assert contact_address("127.0.0.1", 4000) == ("127.0.0.1", 4000)
    assert contact_address("::1", 4000) == ("::1", 4000)
    assert contact_address("2001:DB8::1", 1) == ("2001:db8::1", 1)
    assert sendable(("::1", 4000), socket.AF_INET) is None
    assert sendable(("127.0.0.1", 4000), socket.AF_INET6) is None
    assert sendable(("127.0.0.1", 4000), socket.AF_INET) == ("127.0.0.1", 4000)
    reply = [(os.urandom(20), host, 4000) for host in POISON] + [(os.urandom(20), "10.1.2.3", 9)]
    assert [(n.ip, n.port) for n in parse_contacts(reply)] == [("10.1.2.3", 9)]


async def test_a_peer_answering_with_unsendable_contacts_closes_no_socket() -> None:
    nodes = await start_network(8)
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(PoisonPeer, local_addr=("127.0.0.1", 0))
    try:
        for node in nodes:
            peer.introduce(node)
        await wait_for(
            lambda: all(len(n.rpc.router) == len(nodes) for n in nodes),
            timeout=10,
            message="every node to take the poisoning peer as a contact",
        )
        # Every node crawls, asks the peer, and is handed the poisoned contacts.
        await asyncio.gather(*(node.get_record(f"w{i}") for i, node in enumerate(nodes)))
        await asyncio.gather(*(node.bootstrap([nodes[0].address]) for node in nodes[1:]))
        assert peer.asked >= len(nodes)
        for node in nodes:
            assert node.listening, "a node's socket was closed"
            assert await ping_from_outside(node), "a node stopped answering"
            assert node.reopened == 0
        # Nothing unsendable was taken in: the routing tables hold real addresses only.
        for node in nodes:
            for contact in node.rpc.router.contacts():
                assert contact_address(contact.ip, contact.port) == (contact.ip, contact.port)
    finally:
        transport.close()
        await stop_all(nodes)


@pytest.mark.parametrize("address", [("127.0.0.1\x00x", 9), ("localhost", 9), ("127.0.0.1", 0)])
async def test_a_request_to_an_address_no_contact_can_have_fails_at_once(
    address: tuple[str, int], network_factory: NetworkFactory
) -> None:
    nodes = await network_factory(2)
    node = nodes[0]
    before = node.rpc.stats.unsendable
    ok, reply = await asyncio.wait_for(node.rpc.request(address, "ping", node.node.id), 0.5)
    assert (ok, reply) == (False, None)
    assert node.rpc.stats.unsendable == before + 1
    assert node.listening
    ok, _ = await node.rpc.request(nodes[1].address, "ping", node.node.id)
    assert ok


async def test_a_socket_closed_under_a_node_is_reopened_where_peers_know_it(
    network_factory: NetworkFactory,
) -> None:
    nodes = await network_factory(3)
    node = nodes[1]
    address = node.address
    assert node.transport is not None
    # What asyncio does on a fatal send error: the transport closes, the protocol is told.
    node.transport.close()
    await wait_for(lambda: node.reopened == 1, timeout=10, message="the socket to reopen")
    assert node.listening
    assert node.address == address
    assert await ping_from_outside(node)
    ok, reply = await nodes[0].rpc.request(address, "ping", nodes[0].node.id)
    assert ok
    assert reply == node.node.id


async def test_a_node_closed_on_purpose_stays_closed() -> None:
    nodes = await start_network(2)
    node = nodes[1]
    await node.aclose()
    try:
        assert not node.listening
        assert node.reopened == 0
        assert not await ping_from_outside(node)
    finally:
        await stop_all(nodes[:1])


async def test_a_closed_node_has_let_its_port_go_when_aclose_returns() -> None:
    """An agent restarted in the same process binds the port its last run had: the socket
    must be closed by then, not a loop turn later."""
    nodes = await start_network(2)
    host, port = nodes[1].address
    await nodes[1].aclose()  # and no await in between that could let the loop turn
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind((host, port))
    finally:
        await stop_all(nodes[:1])


async def test_the_router_reports_a_dht_whose_socket_closed_until_it_is_reopened(
    registry: Registry,
) -> None:
    allowed = asyncio.Event()
    opened = 0

    async def gated(factory: Callable[[], RMAProtocol], local: tuple[str, int]) -> Any:
        nonlocal opened
        opened += 1
        if opened > 1:
            await allowed.wait()  # hold the reopen until the test has seen the outage
        return await udp_endpoint(factory, local)

    nodes = await start_network(2)
    node = DHTNode(TEST_SETTINGS, policy=POLICY, endpoint=gated)
    await node.listen()
    await node.bootstrap([nodes[0].address])
    try:
        async with client_for(router_app(registry, dht=node)) as client:
            assert (await client.get("/healthz")).json()["dht"] is True
            assert node.transport is not None
            node.transport.close()
            await wait_for(lambda: opened == 2, timeout=5, message="a reopen to be tried")
            health = await client.get("/healthz")
            assert health.json()["dht"] is False
            assert health.json()["status"] == "degraded"
            allowed.set()
            await wait_for(lambda: node.reopened == 1, timeout=5, message="the socket to reopen")
            assert (await client.get("/healthz")).json()["dht"] is True
    finally:
        await node.aclose()
        await stop_all(nodes)
