"""The worker agent against real DHT nodes on loopback and a real router app in process."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.protocol import RMAProtocol
from dht_bridge.dht.publish import PublishReport
from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry
from edge_router.config import RouterConfig
from tests.support.dht import TEST_SETTINGS, NetworkFactory, start_node, stop_all
from tests.support.helpers import POLICY, free_port, make_record, wait_for
from tests.support.worker import (
    HEARTBEAT,
    Edge,
    dht_ids,
    reach_checked,
    running_edge,
    worker_config,
)
from worker.agent import Mode
from worker.discovery import Discovery


async def test_joins_with_one_edge_request_and_restarts_with_none(
    tmp_path: Path, network: list[DHTNode], edge: Edge
) -> None:
    config = worker_config(tmp_path, "w-join")
    async with edge.agent(config) as agent:
        assert agent.mode is Mode.DHT
        assert agent.edge_requests == {"bootstrap": 1}
        assert agent.node is not None
        assert agent.node.node.id.hex() == agent.worker_id  # the id the edge hands out
        await reach_checked(agent)  # then a server on loopback: its record names its address
        assert agent.record is not None
        assert (agent.record.dht_host, agent.record.dht_port) == agent.node.address
        worker_id = agent.worker_id
        assert worker_id in await dht_ids(network[0])
        first_seq = agent.state.seq

    async with edge.agent(config) as again:
        assert again.worker_id == worker_id
        assert again.mode is Mode.DHT
        assert again.edge_requests == {}
        assert again.state.seq > first_seq + 1  # past the tombstone the first run left
        await wait_for(
            lambda: _listed(network[1], worker_id), timeout=5, message="restarted worker listed"
        )


async def _listed(node: DHTNode, worker_id: str) -> bool:
    return worker_id in await dht_ids(node)


async def test_twenty_workers_heartbeat_for_many_leases_without_an_edge_request(
    tmp_path: Path, network: list[DHTNode], edge: Edge
) -> None:
    # Twenty agents in one event loop, at 75 times the real pace, are CPU-bound on a loaded
    # 2-core machine: a slower scale (0.5 s beats, 2 s leases; real: 30 s and 90 s) keeps the
    # test about leases, not about how fast one loop can sign and verify.
    heartbeat, ttl = 0.5, 2.0
    agents = [
        edge.agent(worker_config(tmp_path, f"w-{i:02d}", heartbeat=heartbeat, ttl=ttl))
        for i in range(20)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for agent in agents:
            await stack.enter_async_context(agent)
        assert all(agent.mode is Mode.DHT for agent in agents)
        joined = {agent.worker_id: dict(agent.edge_requests) for agent in agents}
        assert all(counts == {"bootstrap": 1} for counts in joined.values())
        beats = {agent.worker_id: agent.heartbeats for agent in agents}
        leases = 3
        target = math.ceil(leases * ttl / heartbeat)

        # Time passes: every worker renews its lease `leases` times over, or the test fails.
        await wait_for(
            lambda: all(a.heartbeats - beats[a.worker_id] >= target for a in agents),
            timeout=leases * ttl * 6,
            message=f"{target} heartbeats from every worker",
        )

        assert {a.worker_id: a.edge_requests for a in agents} == joined  # not one more
        assert all(agent.mode is Mode.DHT for agent in agents)
        listed = await dht_ids(network[2])
        assert sorted(listed) == sorted(beats)  # every lease is live
        # ...though most beats renewed no holder: a copy lasts four beats, and waits for the
        # next one while it outlives it with room.
        held_older = [a for a in agents if a.record and a.dht_lease_until < a.record.expires_at]
        assert held_older


async def test_discovery_falls_back_to_the_edge_while_the_dht_is_down_and_returns(
    tmp_path: Path, network: list[DHTNode], edge: Edge, registry: Registry
) -> None:
    provider = make_record(services=["ocr"], ttl=120)
    assert await registry.upsert(provider)  # the edge knows it
    await network[0].publish(provider)  # and so does the DHT
    config = worker_config(tmp_path, "w-seeker", services=("gpu",))
    # Each discovery here asks the network now (fresh=True): which side answers is the point.
    async with edge.agent(config) as seeker:
        found = await seeker.discover("ocr", fresh=True)
        assert (found.source, _ids(found)) == ("dht", [provider.worker_id])

        homes = [(node.node.id, node.address[1]) for node in network]
        await stop_all(network)  # every DHT node the seeker knows
        down = await seeker.discover("ocr", fresh=True)
        assert (down.source, _ids(down)) == ("edge", [provider.worker_id]), down.detail
        # Its heartbeats cannot reach the DHT either: before the lease ends it uses the edge.
        await wait_for(lambda: seeker.mode is Mode.EDGE, timeout=10, message="edge fallback")
        assert seeker.edge_requests["register"] >= 1

        network[:] = await _restart(homes)  # same ids, same ports, empty storage
        await network[0].publish(provider)

        async def answered_by_dht() -> bool:
            return (await seeker.discover("ocr", fresh=True)).source == "dht"

        await wait_for(answered_by_dht, timeout=15, message="discovery back on the DHT")
        back = await seeker.discover("ocr", fresh=True)
        assert (back.source, _ids(back)) == ("dht", [provider.worker_id])
        await wait_for(lambda: seeker.mode is Mode.DHT, timeout=10, message="back on the DHT")
        seeker_id = seeker.worker_id
        assert seeker_id in await dht_ids(network[1], "gpu")


async def test_a_worker_off_the_dht_registers_through_the_edge_and_switches_back(
    tmp_path: Path, registry: Registry
) -> None:
    dead_port = free_port(socket.SOCK_DGRAM)  # nothing listens there (yet)
    config = RouterConfig(coordinators=(("127.0.0.1", dead_port),))
    nodes: list[DHTNode] = []
    async with running_edge(registry, config) as edge:
        agent = edge.agent(worker_config(tmp_path, "w-off"))
        try:
            await agent.start()
            assert agent.mode is Mode.EDGE
            assert agent.edge_requests == {"bootstrap": 1, "register": 1}
            assert await edge.lookup() == [agent.worker_id]  # lookups at the router find it

            # The DHT comes up where the edge said it would: the agent rejoins on its own.
            nodes.append(await start_node(settings=replace(TEST_SETTINGS, port=dead_port)))
            await wait_for(lambda: agent.mode is Mode.DHT, timeout=10, message="back on the DHT")
            assert agent.edge_requests["bootstrap"] == 1  # it retried the peers it had
            assert agent.worker_id in await dht_ids(nodes[0])
        finally:
            await agent.aclose()
        # It had registered at the edge: the tombstone went there too, and counts at once.
        assert agent.edge_requests["leave"] == 1
        assert await edge.lookup() == []
        assert await dht_ids(nodes[0]) == []
    await stop_all(nodes)


async def _restart(homes: list[tuple[bytes, int]]) -> list[DHTNode]:
    nodes: list[DHTNode] = []
    for node_id, port in homes:
        node = DHTNode(TEST_SETTINGS, policy=POLICY, node_id=node_id)
        await node.listen(port=port)
        nodes.append(node)
    for node in nodes[1:]:
        await node.bootstrap([nodes[0].address])
    return nodes


def _ids(found: Discovery) -> list[str]:
    return [record.worker_id for record in found.providers]


async def test_leaving_publishes_a_tombstone_that_lookups_honour_at_once(
    tmp_path: Path, network: list[DHTNode], edge: Edge
) -> None:
    seeker = edge.agent(worker_config(tmp_path, "w-seek", services=("gpu",)))
    leaver = edge.agent(worker_config(tmp_path, "w-leave"))
    async with seeker:
        await leaver.start()
        try:
            assert (await seeker.discover("ocr")).providers[0].worker_id == leaver.worker_id
        finally:
            await leaver.aclose()
        # No waiting: the stop path returns once the tombstone is stored.
        assert await dht_ids(network[2]) == []
        gone = await seeker.discover("ocr")
        assert (gone.source, gone.providers) == ("dht", [])
        record = await network[1].get_record(leaver.worker_id)
        assert record is not None
        assert record.tombstone
        assert record.seq == leaver.state.seq
        assert leaver.edge_requests == {"bootstrap": 1}  # the edge never held it: no DELETE


async def test_a_tombstone_no_dht_node_took_goes_to_the_edge(
    tmp_path: Path, registry: Registry, edge: Edge, network_factory: NetworkFactory
) -> None:
    # The worker's DHT peers are gone at its stop (down, or UDP cut) while HTTPS to the edge
    # works: the tombstone went nowhere, and the worker stayed listed until its lease ended.
    peers = await network_factory(3)
    config = worker_config(
        tmp_path, "w-cut", bootstrap=tuple(n.address for n in peers), heartbeat=20.0, ttl=60.0
    )
    agent = edge.agent(config)
    await agent.start()
    try:
        assert agent.mode is Mode.DHT
        assert agent.record is not None
        assert await registry.upsert(agent.record)  # as the bridge copies it from the DHT
        assert await edge.lookup() == [agent.worker_id]
        await stop_all(peers)
    finally:
        await agent.aclose()
    assert agent.edge_requests == {"leave": 1}
    assert await edge.lookup() == []
    held = await registry.get(agent.worker_id)
    assert held is not None
    assert held.tombstone


async def test_client_mode_records_carry_no_dht_address(
    tmp_path: Path, network: list[DHTNode], edge: Edge
) -> None:
    config = worker_config(tmp_path, "w-client", advertise="none")
    async with edge.agent(config) as agent:
        assert agent.mode is Mode.DHT
        listed = await network[0].get_record(agent.worker_id)
        assert listed is not None
        assert (listed.dht_host, listed.dht_port) == ("", 0)


async def test_an_observed_address_no_record_can_carry_is_dropped_and_checked_again(
    tmp_path: Path, network: list[DHTNode], edge: Edge
) -> None:
    # A verdict naming port 70000 (the check now drops such answers; this is the agent's own
    # guard) made every record unsignable: the worker fell off the DHT for good.
    async with edge.agent(worker_config(tmp_path, "w-observed")) as agent:
        await reach_checked(agent)
        assert agent.node is not None
        assert agent.reachability is not None
        agent.reachability = replace(agent.reachability, observed=("127.0.0.1", 70000))
        await agent.update(load=0.5)  # a beat now, signed with what servers "saw"

        def republished() -> bool:
            record = agent.record
            return record is not None and record.load == 0.5

        await wait_for(republished, timeout=10, message="the record republished")
        assert agent.record is not None
        assert agent.mode is Mode.DHT
        assert (agent.record.dht_host, agent.record.dht_port) == agent.node.address
        await wait_for(
            lambda: agent.reachability is not None and agent.reachability.observed is not None,
            timeout=15,
            message="a new reachability check",
        )
        assert agent.reachability is not None
        assert agent.reachability.observed == agent.node.address


class HeldDatagrams(asyncio.DatagramProtocol):
    """Between a node's socket and its protocol: keeps what arrives while `holding`, so that a
    test can hold a publish open until the replies are let through."""

    def __init__(self, protocol: RMAProtocol) -> None:
        self.protocol = protocol
        self.holding = False
        self.held: list[tuple[bytes, tuple[str, int]]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.protocol.connection_made(cast(asyncio.DatagramTransport, transport))

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.holding:
            self.held.append((data, addr))
        else:
            self.protocol.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.protocol.error_received(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)

    def release(self) -> None:
        """Deliver what was held, and hold nothing more."""
        self.holding = False
        held, self.held = self.held, []
        for data, addr in held:
            self.protocol.datagram_received(data, addr)


async def test_an_update_made_while_a_beat_is_in_flight_is_published_right_after_it(
    tmp_path: Path, network: list[DHTNode], edge: Edge
) -> None:
    gates: list[HeldDatagrams] = []

    async def endpoint(
        factory: Callable[[], RMAProtocol], local_addr: tuple[str, int]
    ) -> tuple[asyncio.DatagramTransport, RMAProtocol]:
        protocol = factory()
        gates.append(HeldDatagrams(protocol))
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: gates[-1], local_addr)
        return transport, protocol

    # A long interval: an update lost until the next regular beat shows as a 20 s wait.
    config = worker_config(tmp_path, "w-update", heartbeat=20.0, ttl=60.0, dht_mode="client")
    async with edge.agent(config, dht_endpoint=endpoint) as agent:
        assert agent.mode is Mode.DHT
        gate, seq = gates[-1], agent.state.seq
        gate.holding = True
        await agent.update(capabilities={"gpus": 1})  # a beat at once
        # That beat has signed (its seq is taken) and its publish waits for the replies.
        await wait_for(
            lambda: agent.state.seq > seq and bool(gate.held),
            timeout=10,
            message="a beat waiting for its publish's replies",
        )
        await agent.update(services=["ocr", "gpu"])
        gate.release()

        def published() -> bool:
            record = agent.record
            return record is not None and "gpu" in record.services

        await wait_for(published, timeout=5, message="the update made during the beat")
        assert agent.record is not None
        assert agent.record.capabilities == {"gpus": 1}


async def test_a_warm_discovery_is_answered_from_the_cache_and_refreshed_within_a_heartbeat(
    tmp_path: Path, network: list[DHTNode], edge: Edge
) -> None:
    provider = make_record(services=["ocr"], ttl=120)
    await network[0].publish(provider)
    async with edge.agent(worker_config(tmp_path, "w-warm", services=("gpu",))) as seeker:
        cold = await seeker.discover("ocr")
        warm = await seeker.discover("ocr")
        assert _ids(cold) == _ids(warm) == [provider.worker_id]
        assert warm.cached
        assert (seeker.discovery.misses, seeker.discovery.hits) == (1, 1)
        newcomer = make_record(services=["ocr"], ttl=120)
        await network[0].publish(newcomer)

        async def seen() -> bool:
            return newcomer.worker_id in _ids(await seeker.discover("ocr"))

        # Never older than one heartbeat: the newcomer shows up without a fresh=True.
        await wait_for(seen, timeout=HEARTBEAT * 4 + 2, message="the refreshed answer")


async def test_a_stop_while_the_first_publish_waits_leaves_with_a_tombstone(
    tmp_path: Path, network: list[DHTNode], edge: Edge
) -> None:
    agent = edge.agent(worker_config(tmp_path, "w-stop-publishing", dht_mode="client"))
    out = asyncio.Event()
    publish = agent._publish_out

    async def stays_open(record: WorkerRecord, **options: Any) -> PublishReport:
        report = await publish(record, **options)
        if record.tombstone:
            return report
        out.set()  # the record is out there; its publish has not returned yet
        await asyncio.Event().wait()
        return report

    agent._publish_out = stays_open  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    await wait_for(out.is_set, timeout=10, message="the first record published")
    assert agent.identity is not None
    worker_id = agent.identity.worker_id
    stop.set()  # a volunteer's Ctrl-C, while start() still waits for its publish
    async with asyncio.timeout(10):
        await running
    record = await network[1].get_record(worker_id)
    assert record is not None
    assert record.tombstone
