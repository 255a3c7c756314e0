"""The emulated internet (dht_bridge.netem): round trips within the model, loss at its rate,
cut links, NAT filtering, and DHT networks (ours and the stock library's gets) running on it."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncIterator

import pytest

from dht_bridge.dht.values import RecordVerifier, decode_value, key_digest
from dht_bridge.errors import ConfigError
from dht_bridge.netem import (
    CONTINENT,
    LAN,
    PROFILES,
    WORLD,
    Address,
    EmulatedNetwork,
    EmulatedTransport,
    Host,
    Traffic,
    profile,
)
from dht_bridge.netem.clock import run_virtual
from dht_bridge.records import WorkerRecord
from tests.support.helpers import POLICY, make_record, wait_for
from tests.support.netem import Field, bounded, start_field, start_stock

# The clock's resolution: a timer may be run this much before its time.
EARLY = 0.001


class Echo:
    """A datagram protocol that answers every datagram with the same bytes."""

    transport: EmulatedTransport

    def connection_made(self, transport: EmulatedTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.transport.sendto(data, addr)


class Sink:
    """A datagram protocol that notes when each datagram (a sequence number) arrived."""

    def __init__(self) -> None:
        self.arrived: dict[int, float] = {}
        self.senders: set[Address] = set()
        self.lost: list[Exception | None] = []

    def connection_made(self, transport: EmulatedTransport) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.arrived[int.from_bytes(data[:4], "big")] = time.monotonic()
        self.senders.add(addr)


async def bind(host: Host, protocol: Echo | Sink, port: int = 0) -> EmulatedTransport:
    transport, _ = await host.endpoint(lambda: protocol, (host.ip, port))
    assert isinstance(transport, EmulatedTransport)
    return transport


def send_numbered(transport: EmulatedTransport, to: Address, count: int) -> dict[int, float]:
    sent = {}
    for seq in range(count):
        sent[seq] = time.monotonic()
        transport.sendto(seq.to_bytes(4, "big") + b"x" * 60, to)
    return sent


@pytest.mark.parametrize(
    ("regions", "bounds"),
    [(("europe", "europe"), (0.010, 0.040)), (("europe", "asia"), (0.150, 0.250))],
)
def test_round_trips_stay_within_the_model(
    regions: tuple[str, str], bounds: tuple[float, float]
) -> None:
    # On the virtual clock: the model's delays exactly, whatever the machine's load (on the
    # real clock a busy loop adds its lateness, which says nothing of the model).
    async def scenario() -> tuple[float, list[float], Sink, EmulatedTransport]:
        network = EmulatedNetwork(dataclasses.replace(WORLD, loss=0.0), seed=3)
        near, far = network.add_host(regions[0]), network.add_host(regions[1])
        sink = Sink()
        sender = await bind(near, sink)
        echo = await bind(far, Echo())
        sent = send_numbered(sender, echo.address, 300)
        await wait_for(lambda: len(sink.arrived) == 300, timeout=10, message="300 echoes")
        rtts = sorted(sink.arrived[seq] - sent[seq] for seq in sent)
        return network.rtt(near, far), rtts, sink, echo

    base, rtts, sink, echo = run_virtual(scenario())
    assert bounds[0] <= base <= bounds[1]
    ceiling = base * (1 + WORLD.jitter)
    assert rtts[0] >= base - EARLY, "a datagram went faster than its link"
    # The jitter spreads the round trips over [base, ceiling]: the median sits near the middle.
    assert base * (1 + WORLD.jitter * 0.3) <= rtts[150] <= ceiling
    assert rtts[-1] <= ceiling + EARLY
    assert sink.senders == {echo.address}


async def test_loss_rate_matches_the_profile() -> None:
    network = EmulatedNetwork(dataclasses.replace(LAN, loss=0.05), seed=4)
    a, b = network.add_host(), network.add_host()
    sink = Sink()
    sender, receiver = await bind(a, Sink()), await bind(b, sink)
    send_numbered(sender, receiver.address, 4000)
    lost = a.traffic.lost
    await wait_for(lambda: len(sink.arrived) == 4000 - lost, timeout=10, message="the survivors")
    # 4000 draws at 5%: the standard deviation is 0.35 points; 2 points is a wide margin.
    assert 0.03 <= lost / 4000 <= 0.07
    assert (b.traffic.received, a.traffic.sent) == (4000 - lost, 4000)


async def test_a_cut_link_drops_everything_until_healed() -> None:
    network = EmulatedNetwork(dataclasses.replace(CONTINENT, loss=0.0), seed=5)
    a, b, c = network.add_host(), network.add_host(), network.add_host()
    sink_b, sink_c = Sink(), Sink()
    sender = await bind(a, Sink())
    to_b, to_c = await bind(b, sink_b), await bind(c, sink_c)
    # Datagrams already in flight when the link is cut are lost too.
    send_numbered(sender, to_b.address, 100)
    network.cut(a, b)
    send_numbered(sender, to_b.address, 100)
    send_numbered(sender, to_c.address, 50)
    await wait_for(lambda: a.traffic.cut == 200, timeout=10, message="every datagram to b cut")
    await wait_for(lambda: len(sink_c.arrived) == 50, timeout=10, message="a to c untouched")
    assert sink_b.arrived == {}
    network.heal(a, b)
    send_numbered(sender, to_b.address, 20)
    await wait_for(lambda: len(sink_b.arrived) == 20, timeout=10, message="the healed link")
    network.isolate(c)
    send_numbered(sender, to_c.address, 10)
    assert a.traffic.cut == 210


async def test_a_host_behind_nat_gets_only_what_answers_its_own_datagrams() -> None:
    network = EmulatedNetwork(dataclasses.replace(LAN, loss=0.0), seed=6)
    inside, outside, stranger = network.add_host(nat=True), network.add_host(), network.add_host()
    sink = Sink()
    behind = await bind(inside, sink)
    peer, other = await bind(outside, Echo()), await bind(stranger, Sink())
    send_numbered(other, behind.address, 5)
    await wait_for(lambda: inside.traffic.filtered == 5, timeout=10, message="refused")
    send_numbered(behind, peer.address, 5)
    await wait_for(lambda: len(sink.arrived) == 5, timeout=10, message="the echoes")
    assert sink.senders == {peer.address}


async def test_a_crashed_host_vanishes_without_its_protocol_being_told() -> None:
    network = EmulatedNetwork(LAN, seed=7)
    a, b = network.add_host(), network.add_host()
    sink = Sink()
    receiver = await bind(b, sink)
    sender = await bind(a, Sink())
    b.crash()
    send_numbered(sender, receiver.address, 3)
    await wait_for(lambda: a.traffic.undeliverable == 3, timeout=10, message="undeliverable")
    assert (receiver.is_closing(), sink.lost, sink.arrived) == (True, [], {})
    # Its port is free again: a restart binds it.
    assert (await bind(b, Sink(), receiver.address[1])).address == receiver.address


def test_an_uplink_drops_what_overflows_its_line_and_nothing_under_it() -> None:
    # On the virtual clock: the line refills with the loop's time, whatever the machine's load.
    async def scenario(uplink: float | None) -> tuple[Traffic, list[float]]:
        network = EmulatedNetwork(dataclasses.replace(WORLD, loss=0.05), seed=8, uplink=uplink)
        a, b = network.add_host("europe"), network.add_host("asia")
        sink = Sink()
        sender, receiver = await bind(a, Sink()), await bind(b, sink)
        # 92 bytes a datagram on the line (64 + 28 of headers), one every 10 ms: 9200 B/s.
        sent = {}
        for seq in range(200):
            sent[seq] = time.monotonic()
            sender.sendto(seq.to_bytes(4, "big") + b"x" * 60, receiver.address)
            await asyncio.sleep(0.01)
        if uplink is not None:
            assert a.traffic.overflow == 0
            # A burst of 100 at once: the 0.2 s buffer (2000 bytes at 10 kB/s) takes 21.
            for seq in range(1000, 1100):
                sender.sendto(seq.to_bytes(4, "big") + b"x" * 60, receiver.address)
            assert a.traffic.overflow == 100 - 21
        expected = a.traffic.sent - a.traffic.lost
        await wait_for(lambda: len(sink.arrived) == expected, timeout=10, message="the rest")
        return a.traffic, [sink.arrived[seq] - sent[seq] for seq in sent if seq in sink.arrived]

    limited, limited_delays = run_virtual(scenario(10_000))
    free, free_delays = run_virtual(scenario(None))
    # Under the limit, the same losses and the same delays as without one.
    assert limited_delays == free_delays
    # What overflowed never left: 200 sent without a limit, 200 + 21 with it.
    assert (free.overflow, free.sent, limited.sent) == (0, 200, 221)
    assert 0 < free.lost < 30
    with pytest.raises(ValueError, match="uplink"):
        EmulatedNetwork(LAN, uplink=0)


def test_profiles_are_named_and_describe_themselves() -> None:
    assert set(PROFILES) == {"lan", "continent", "world"}
    assert profile("world") is WORLD
    assert WORLD.describe().startswith("world: 5 region(s)")
    assert "loss 1.0%" in WORLD.describe()
    assert 0.070 <= WORLD.median_rtt() <= 0.250
    assert 0.010 <= CONTINENT.median_rtt() <= 0.060
    with pytest.raises(ConfigError):
        profile("moon")


# DHT networks on the emulated internet.


@pytest.fixture
async def field() -> AsyncIterator[Field]:
    """8 servers (3 coordinators) and 12 clients behind NAT on the `continent` profile."""
    built = await start_field(EmulatedNetwork(CONTINENT, seed=8), servers=8, clients=12, seed=8)
    try:
        yield built
    finally:
        await built.aclose()


async def publish_from_clients(field: Field, services: tuple[str, ...]) -> list[WorkerRecord]:
    records = [make_record(services=services) for _ in field.clients]
    jobs = [functools.partial(c.publish, r) for c, r in zip(field.clients, records, strict=True)]
    reports = await bounded(jobs)
    assert all(report.stored for report in reports)
    return records


async def test_our_nodes_join_publish_and_look_up_on_a_continent(field: Field) -> None:
    records = await publish_from_clients(field, ("ocr",))
    reader = field.clients[0]
    found = await reader.lookup("ocr", limit=20)
    assert {r.worker_id for r in found} == {r.worker_id for r in records}
    got = await field.clients[-1].get_record(records[3].worker_id)
    assert got is not None
    assert got.worker_id == records[3].worker_id
    # Clients stay out of routing tables, and no server started a conversation with one.
    client_addresses = {c.address for c in field.clients}
    for server in field.servers:
        known = {(n.ip, n.port) for n in server.rpc.router.find_neighbors(server.node, k=100)}
        assert not known & client_addresses
    assert sum(field.host_of(c).traffic.filtered for c in field.clients) == 0
    # The emulated network carried every byte the nodes counted, and lost about 1% of it.
    for node in field.nodes:
        assert field.host_of(node).traffic.sent_bytes == node.rpc.stats.bytes_out
    traffic = field.network.traffic
    assert 0 < traffic.lost < 0.03 * traffic.sent


async def test_a_client_joins_asking_fewer_nodes_than_a_server_and_works_at_once() -> None:
    """A client is in nobody's table: its join fills its own from the closest few, and it
    publishes and finds records right after. A server's join waits for its k closest, so that
    they add it."""
    built = await start_field(EmulatedNetwork(LAN, seed=5), servers=30, clients=4, seed=5)
    try:
        seeds = [c.address for c in built.coordinators]
        client = await built.new_node(client=True)
        server = await built.new_node(client=False)
        built.clients.append(client)
        built.servers.append(server)
        await client.bootstrap(seeds)
        await server.bootstrap(seeds)
        asked_by_client = client.crawl_queries["join"]
        asked_by_server = server.crawl_queries["join"]
        assert asked_by_client < asked_by_server
        assert asked_by_server >= server.ksize  # its k closest answered
        record = make_record(services=("ocr",))
        assert (await client.publish(record)).stored
        found = await client.lookup("ocr", limit=10)
        assert record.worker_id in {r.worker_id for r in found}
        assert server.node.id in {
            n.id for s in built.servers if s is not server for n in s.rpc.router.contacts()
        }
    finally:
        await built.aclose()


async def test_a_stock_server_joins_and_gets_through_the_emulation(field: Field) -> None:
    records = await publish_from_clients(field, ("ocr",))
    stock = await start_stock(field.network, [field.coordinators[0].address])
    try:
        value = await stock.get("svc:ocr:0")
        assert value is not None
        decoded = decode_value(
            value, digest=key_digest("svc:ocr:0"), verifier=RecordVerifier(POLICY), now=time.time()
        )
        # The stock get returns the first holder's copy, which a lost STORE may have left a
        # record short of (1% loss): a subset, but most of the records.
        published = {r.worker_id for r in records}
        got = {r.worker_id for r in decoded.records}
        assert got <= published
        assert len(got) >= len(published) - 2
        assert await stock.get(f"worker:{records[0].worker_id}") is not None
    finally:
        stock.stop()
