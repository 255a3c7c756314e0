"""A Sybil flood from one socket: thousands of ids cost nothing, an address does. Contacts
enter a routing table only after answering our ping from their address, at most a few per IP
and subnet per bucket and per table, and a lookup's shortlist holds at most a few per address:
after 2,400 ids from one socket, answers hold at most the allowed fakes and every live
provider is still found."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from kademlia.node import Node

from dht_bridge.dht.admission import DiversityLimits
from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.routing import RMARoutingTable
from dht_bridge.errors import ConfigError
from tests.support.dht import NetworkFactory, NoNetwork, publish_all, start_node
from tests.support.eclipse import introduce_ids
from tests.support.helpers import make_record, wait_for
from tests.support.raw_peer import RawPeer, open_raw_peer

FLOOD_IDS = 2400
NETWORK = 20
PROVIDERS = 5
LIMITS = DiversityLimits()

Address = tuple[str, int]


class Sybil:
    """Answers for every id it claimed, from one socket: PING with the id it last introduced to
    the asker (so our checks pass), FIND_NODE / FIND_VALUE with 20 fresh fakes of its own minted
    next to the target, STORE with ok."""

    def __init__(self) -> None:
        self.home: Address = ("127.0.0.1", 0)
        self.last_id: dict[Address, bytes] = {}
        self.asked = 0

    def __call__(self, sender: Address, name: str, args: list[Any]) -> Any:
        if name == "ping":
            return self.last_id.get(sender, os.urandom(20))
        if name in ("find_node", "find_value"):
            self.asked += 1
            key = args[1]
            return [(key[:17] + os.urandom(3), *self.home) for _ in range(20)]
        if name == "store":
            return "ok"
        return None


async def flood(peer: RawPeer, sybil: Sybil, nodes: list[DHTNode], count: int) -> None:
    """`count` fresh ids, each introduced to one node by a PING and a FIND_NODE, every node's
    share in turn (the answer awaited before the next id, so checks meet the id they test)."""
    await introduce_ids(peer, sybil.last_id, nodes, [os.urandom(20) for _ in range(count)])


def held_at(node: DHTNode, home: Address) -> int:
    """Contacts (buckets and replacement lists) this node holds at `home`."""
    return sum(
        (contact.ip, contact.port) == home
        for bucket in node.rpc.router.buckets
        for contact in (*bucket.nodes.values(), *bucket.replacement_nodes.values())
    )


async def test_a_flood_of_2400_ids_from_one_socket_leaves_answers_and_lookups_honest(
    network_factory: NetworkFactory,
) -> None:
    nodes = await network_factory(NETWORK)
    records = [make_record(services=["ocr"]) for _ in range(PROVIDERS)]
    await publish_all(nodes, records)
    sybil = Sybil()
    transport, peer = await open_raw_peer(sybil)
    try:
        sybil.home = peer.address
        await flood(peer, sybil, nodes, FLOOD_IDS)

        # Routing tables: at most the per-table limit from the one address.
        held = [held_at(node, sybil.home) for node in nodes]
        assert max(held) <= LIMITS.per_ip_table, held

        # FIND_NODE answers, as an honest node sees them.
        fakes = total = 0
        asker = nodes[0]
        for node in nodes[1:]:
            for _ in range(3):
                ok, answer = await asker.rpc.request(
                    node.address, "find_node", asker.node.id, os.urandom(20)
                )
                assert ok
                mine = sum((entry[1], entry[2]) == sybil.home for entry in answer)
                assert mine <= LIMITS.per_ip_table, (mine, len(answer))
                fakes, total = fakes + mine, total + len(answer)
        # Before: 87% of the answers were fakes (120 per table of 139).
        assert fakes / total <= 0.25

        # Readers, old and new, find every live provider while the fakes keep answering.
        expected = {r.worker_id for r in records}
        reader = await start_node(seeds=[nodes[7].address])
        try:
            for who in (reader, *nodes[::4]):
                found = await who.lookup("ocr", limit=50)
                assert {r.worker_id for r in found} == expected
            assert all([await reader.get_record(r.worker_id) for r in records])
        finally:
            await reader.aclose()
        # The providers' next heartbeats still land on real holders.
        reports = await publish_all(nodes, list(records))
        assert all(report.stored for report in reports)
        assert {r.worker_id for r in await nodes[-1].lookup("ocr", limit=50)} == expected
        assert sybil.asked > 0, "no lookup met the fakes: the test proves nothing"
    finally:
        transport.close()


async def test_a_caller_enters_the_table_only_once_it_answered_our_ping_from_its_address(
    network_factory: NetworkFactory,
) -> None:
    nodes = await network_factory(2)
    node = nodes[0]
    silent_transport, silent = await open_raw_peer(None)  # never answers anything
    liar_id, real_id = os.urandom(20), os.urandom(20)
    honest_transport, honest = await open_raw_peer(lambda _s, name, _a: real_id)
    try:
        # A request alone admits nobody: the silent caller is pinged, and never answers.
        await silent.ask(node.address, "ping", os.urandom(20))
        assert held_at(node, silent.address) == 0
        await wait_for(
            lambda: silent.received.requests.get("ping") == 1, timeout=5, message="a check"
        )
        await wait_for(lambda: not node.rpc._checking, timeout=5, message="the check to end")
        assert held_at(node, silent.address) == 0
        # A caller that answers is taken in under the id it answered with, not the one it
        # claimed in its request.
        await honest.ask(node.address, "ping", liar_id)
        await wait_for(
            lambda: held_at(node, honest.address) == 1, timeout=5, message="the admission"
        )
        held = node.rpc.router.held(Node(real_id))
        assert held is not None
        assert (held.ip, held.port) == honest.address
        assert node.rpc.router.held(Node(liar_id)) is None
    finally:
        silent_transport.close()
        honest_transport.close()


async def test_a_held_contact_keeps_its_address_against_a_newcomer_claiming_its_id(
    network_factory: NetworkFactory,
) -> None:
    nodes = await network_factory(3)
    node, victim = nodes[0], nodes[1]
    stolen = victim.node.id
    transport, thief = await open_raw_peer(lambda _s, name, _a: stolen)
    try:
        await thief.ask(node.address, "ping", stolen)
        assert held_at(node, thief.address) == 0
        await wait_for(
            lambda: thief.received.requests.get("ping", 0) >= 1, timeout=5, message="a check"
        )
        await wait_for(lambda: not node.rpc._checking, timeout=5, message="the check to end")
        held = node.rpc.router.held(Node(stolen))
        assert held is not None
        assert (held.ip, held.port) == victim.address
        assert node.rpc.router.refused >= 1
    finally:
        transport.close()


def test_groups_are_the_ip_and_its_24_or_the_64_and_48_and_loopback_counts_by_port() -> None:
    assert LIMITS.groups("203.0.113.7", 1) == ("203.0.113.7", "203.0.113.0/24")
    assert LIMITS.groups("2001:db8:1:2:3::1", 1) == ("2001:db8:1:2::/64", "2001:db8:1::/48")
    assert LIMITS.groups("127.0.0.1", 4000) == ("127.0.0.1:4000", "127.0.0.1:4000")
    assert LIMITS.groups("::1", 4000) == ("::1:4000", "::1:4000")
    by_ip = DiversityLimits(loopback_by_port=False)
    assert by_ip.groups("127.0.0.1", 4000) == ("127.0.0.1", "127.0.0.0/24")
    with pytest.raises(ConfigError, match="subnet"):
        DiversityLimits(per_ip_bucket=3, per_subnet_bucket=2)


def test_the_table_takes_a_few_per_ip_and_subnet_and_never_evicts_for_a_newcomer() -> None:
    rng = random.Random(7)
    me = Node(rng.randbytes(20))
    coordinator = ("198.51.100.9", 7000)
    table = RMARoutingTable(NoNetwork(), 20, me, max_failures=3, pinned=[coordinator])
    # Honest contacts from many networks all fit (and split the table into buckets).
    for host in range(1, 201):
        table.add_contact(Node(rng.randbytes(20), f"10.{host}.0.1", 4000))
    old = {c.id for c in table.contacts()}
    assert len(table.buckets) > 3
    # Many ids from one IP (any ports): 4 in the table, never 3 in one bucket.
    for port in range(1000, 3000):
        table.add_contact(Node(rng.randbytes(20), "203.0.113.7", port))
    one_ip = [c for c in table.contacts() if c.ip == "203.0.113.7"]
    assert len(one_ip) == LIMITS.per_ip_table
    for bucket in table.buckets:
        assert sum(c.ip == "203.0.113.7" for c in bucket.nodes.values()) <= LIMITS.per_ip_bucket
    # Its /24 holds 8 at most; an IPv6 /64 counts as one IP.
    for host in range(1, 250):
        table.add_contact(Node(rng.randbytes(20), f"203.0.113.{host}", 4000))
    assert sum(c.ip.startswith("203.0.113.") for c in table.contacts()) == LIMITS.per_subnet_table
    for low in range(1, 500):
        table.add_contact(Node(rng.randbytes(20), f"2001:db8:0:1::{low:x}", 4000))
    assert sum(c.ip.startswith("2001:db8:0:1:") for c in table.contacts()) == LIMITS.per_ip_table
    # Coordinators are exempt.
    for _ in range(6):
        table.add_contact(Node(rng.randbytes(20), *coordinator))
    assert sum((c.ip, c.port) == coordinator for c in table.contacts()) >= 3
    # Nobody old was evicted for the newcomers.
    assert old <= {c.id for c in table.contacts()}


async def test_one_address_fills_at_most_a_few_places_of_a_lookup(
    network_factory: NetworkFactory,
) -> None:
    nodes = await network_factory(8)
    sybil = Sybil()
    transport, peer = await open_raw_peer(sybil)
    try:
        sybil.home = peer.address
        # The node knows the fake address as a contact; the fakes it hands out are next to
        # every target, closer than any real node.
        for node in nodes:
            sybil.last_id[node.address] = os.urandom(20)
            await peer.ask(node.address, "ping", sybil.last_id[node.address])
        await wait_for(
            lambda: all(held_at(n, sybil.home) == 1 for n in nodes), timeout=5, message="admission"
        )
        digest = os.urandom(20)
        closest = await nodes[0].crawl(digest, purpose="test")
        at_home = [n for n in closest.closest if (n.ip, n.port) == sybil.home]
        assert len(at_home) <= LIMITS.per_ip_bucket
        assert len(closest.closest) >= len(nodes) - 1
        assert sybil.asked > 0
    finally:
        transport.close()
