"""Server and client mode with nodes that are unreachable for real: behind a UDP NAT on loopback
(tests/udp_nat.py) that lets in only replies from peers a node has written to."""

from __future__ import annotations

import asyncio
import functools
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import pytest
from kademlia.network import Server

from dht_bridge.dht import shards
from dht_bridge.dht.node import CLIENT, SERVER, DHTNode
from dht_bridge.records import WorkerRecord
from tests.support.dht import TEST_SETTINGS, start_network, stop_all
from tests.support.helpers import POLICY, free_port, make_record, wait_for
from tests.support.udp_nat import UdpNat

SERVERS = 30
CLIENTS = 30
# Nodes joining or publishing at once: one event loop hosts all sixty.
GATE = 8

T = TypeVar("T")


@dataclass
class Mixed:
    """Servers reachable on loopback, clients behind the NAT, and the clients' records."""

    servers: list[DHTNode]
    clients: list[DHTNode]
    nat: UdpNat
    records: list[WorkerRecord]

    def client_ids(self) -> set[bytes]:
        """Node ids of the nodes now in client mode."""
        return {n.node.id for n in self.clients if n.mode == CLIENT}

    def server_addresses(self) -> set[tuple[str, int]]:
        """Addresses of the server nodes."""
        return {n.address for n in self.servers}


async def bounded(jobs: list[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run `jobs`, GATE at a time."""
    gate = asyncio.Semaphore(GATE)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(job) for job in jobs)))


async def start_client(nat: UdpNat, seeds: list[tuple[str, int]]) -> DHTNode:
    """A node behind `nat`, starting in client mode (as an auto-mode worker does)."""
    node = DHTNode(TEST_SETTINGS, policy=POLICY, client=True, endpoint=nat.endpoint)
    await node.listen()
    await node.bootstrap(seeds)
    return node


@pytest.fixture
async def mixed() -> AsyncIterator[Mixed]:
    """30 servers, 30 clients behind a NAT, each client's record published by itself."""
    rng = random.Random(10)
    servers = await start_network(SERVERS)
    nat = UdpNat()
    await nat.start()
    clients: list[DHTNode] = []
    try:

        def join() -> Awaitable[DHTNode]:
            return start_client(nat, [s.address for s in rng.sample(servers, 2)])

        clients.extend(await bounded([join] * CLIENTS))
        records = [make_record(services=("ocr",)) for _ in clients]
        reports = await bounded(
            [functools.partial(c.publish, r) for c, r in zip(clients, records, strict=True)]
        )
        assert all(report.stored for report in reports)
        yield Mixed(servers, clients, nat, records)
    finally:
        await stop_all([*servers, *clients])
        await nat.aclose()


async def test_reachability_check_tells_servers_from_clients_behind_nat(mixed: Mixed) -> None:
    coordinator = mixed.servers[0].address
    verdicts = await bounded(
        [
            functools.partial(n.check_reachability, [coordinator])
            for n in mixed.clients + mixed.servers
        ]
    )
    client_verdicts, server_verdicts = verdicts[:CLIENTS], verdicts[CLIENTS:]
    assert all(v.reachable is False for v in client_verdicts)
    assert all(v.reachable is True for v in server_verdicts)
    # What servers saw is the NAT's public side, never the inside address.
    for node, verdict in zip(mixed.clients, client_verdicts, strict=True):
        assert verdict.observed == mixed.nat.mapping_of(node.address).public_address


async def test_clients_are_found_by_everyone_and_held_by_no_one(mixed: Mixed) -> None:
    rng = random.Random(11)

    async def found(reader: DHTNode, record: WorkerRecord) -> bool:
        got = await reader.get_record(record.worker_id)
        return got is not None and got.seq == record.seq and got.dht_host == ""

    from_servers = await bounded(
        [functools.partial(found, rng.choice(mixed.servers), r) for r in mixed.records]
    )
    from_clients = await bounded(
        [
            functools.partial(found, mixed.clients[(i + 1) % CLIENTS], r)
            for i, r in enumerate(mixed.records)
        ]
    )
    assert all(from_servers), f"{from_servers.count(False)} records not found from servers"
    assert all(from_clients), f"{from_clients.count(False)} records not found from clients"
    # The whole service, as the bridge reads it, from a client and from a server.
    wanted = {r.worker_id for r in mixed.records}
    for reader in (mixed.clients[0], mixed.servers[-1]):
        assert {r.worker_id for r in await reader.service_records("ocr")} == wanted
    assert len(await mixed.clients[3].lookup("ocr", limit=5)) == 5

    clients = mixed.client_ids()
    for server in mixed.servers:
        held = {n.id for b in server.rpc.router.buckets for n in b.get_nodes()}
        held |= {n.id for b in server.rpc.router.buckets for n in b.replacement_nodes.values()}
        assert not held & clients, "a server's routing table holds a client"
    assert sum(s.rpc.stats.client_requests for s in mixed.servers) >= CLIENTS
    # Nobody ever sent a client a DHT request: no lookup could have waited on one.
    assert [c.rpc.stats.ignored for c in mixed.clients] == [0] * CLIENTS
    servers = mixed.server_addresses()
    for node in mixed.clients:
        turned_away = set(mixed.nat.mapping_of(node.address).dropped)
        assert not turned_away & servers, "a server tried to contact a client"
    # Nor do crawls ever learn a client's address from a server's reply.
    for reader in (mixed.servers[5], mixed.clients[5]):
        closest = await reader.bootstrap([mixed.servers[1].address])
        assert not {n.id for n in closest} & clients


async def test_a_client_that_becomes_reachable_turns_into_a_server(mixed: Mixed) -> None:
    node = mixed.clients[7]
    coordinator = [mixed.servers[0].address]
    assert (await node.check_reachability(coordinator)).reachable is False
    mixed.nat.open(node.address)  # the volunteer switched on port forwarding
    verdict = await node.check_reachability(coordinator)
    assert verdict.reachable is True
    assert verdict.observed == mixed.nat.mapping_of(node.address).public_address
    assert await node.set_mode(SERVER)
    assert node.mode == SERVER

    def held_by() -> int:
        return sum(
            1 for s in mixed.servers if node.node.id in {n.id for n in s.rpc.router.contacts()}
        )

    await wait_for(lambda: held_by() > 0, timeout=20, message="the new server in a routing table")
    # Its record now hands out the address servers reached it at, and lookups use it.
    record = make_record(
        services=("ocr",), dht_host=verdict.observed[0], dht_port=verdict.observed[1]
    )
    assert (await node.publish(record)).stored
    got = await mixed.servers[2].get_record(record.worker_id)
    assert got is not None
    assert (got.dht_host, got.dht_port) == verdict.observed
    answered = node.rpc.stats.requests_in
    for server in mixed.servers[:10]:
        await server.bootstrap([verdict.observed])
    assert node.rpc.stats.requests_in > answered
    assert node.rpc.stats.ignored == 0

    # Back behind a closed NAT: the next check says so, and the servers it knows forget it.
    mixed.nat.open(node.address, open=False)
    assert (await node.check_reachability(coordinator)).reachable is False
    assert await node.set_mode(CLIENT)
    known = {(n.ip, n.port) for n in node.rpc.router.contacts()}
    assert known
    told = [server for server in mixed.servers if server.address in known]
    # Each drops it once a ping goes unanswered: the client tag alone could be forged.
    await wait_for(
        lambda: all(node.node.id not in {n.id for n in s.rpc.router.contacts()} for s in told),
        timeout=20,
        message="the servers it told forget it",
    )


async def test_a_stock_kademlia_server_reads_a_clients_record(mixed: Mixed) -> None:
    stock = Server()
    await stock.listen(free_port(socket.SOCK_DGRAM), interface="127.0.0.1")
    try:
        assert await stock.bootstrap([mixed.servers[0].address])
        record = mixed.records[4]
        assert await stock.get(shards.worker_key(record.worker_id)) is not None
    finally:
        stock.stop()
