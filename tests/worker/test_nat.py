"""Worker agents behind a real NAT on loopback (tests/udp_nat.py): the reachability check picks
the DHT mode, and a worker whose reachability changes switches and republishes by itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dht_bridge.dht.node import CLIENT, SERVER, DHTNode
from tests.support.helpers import wait_for
from tests.support.udp_nat import UdpNat
from tests.support.worker import Edge, reach_checked, worker_config
from worker.agent import Mode, WorkerAgent

# Slower than the other agent tests' 0.3 s / 1.2 s: a check of a node behind the NAT waits
# out a probe (0.5 s) between heartbeats, on a loaded 2-core machine too.
HEARTBEAT = 1.0
TTL = 4.0
REACH_INTERVAL = 0.5


@pytest.fixture
async def nat() -> AsyncIterator[UdpNat]:
    """A NAT on loopback for the workers behind it."""
    async with UdpNat.running() as box:
        yield box


def agent(edge: Edge, tmp_path: Path, name: str, nat: UdpNat | None = None) -> WorkerAgent:
    """An auto-mode agent, behind `nat` when given."""
    config = worker_config(
        tmp_path, name, heartbeat=HEARTBEAT, ttl=TTL, reach_interval=REACH_INTERVAL
    )
    if nat is None:
        return edge.agent(config)
    return edge.agent(config, dht_endpoint=nat.endpoint)


def held(network: list[DHTNode], node_id: bytes) -> bool:
    """Does any coordinator's routing table hold this node?"""
    return any(node_id in {n.id for n in s.rpc.router.contacts()} for s in network)


async def advertised(network: list[DHTNode], worker_id: str) -> tuple[str, int] | None:
    """The DHT address the network's newest record of the worker hands out (None: no record)."""
    record = await network[1].get_record(worker_id)
    return None if record is None else (record.dht_host, record.dht_port)


async def test_a_worker_behind_nat_is_a_client_and_one_on_the_lan_a_server(
    tmp_path: Path, network: list[DHTNode], nat: UdpNat, edge: Edge
) -> None:
    async with (
        agent(edge, tmp_path, "w-nat", nat) as behind,
        agent(edge, tmp_path, "w-lan") as lan,
    ):
        assert behind.mode is Mode.DHT
        assert lan.mode is Mode.DHT
        await reach_checked(behind)
        await reach_checked(lan)
        assert behind.dht_mode == CLIENT
        assert lan.dht_mode == SERVER
        assert behind.node is not None
        assert lan.node is not None
        assert await advertised(network, behind.worker_id) == ("", 0)
        assert await advertised(network, lan.worker_id) == lan.node.address
        assert not held(network, behind.node.node.id)
        assert held(network, lan.node.node.id)
        # Heartbeats go on over the DHT as a client; the checks keep saying "client".
        beats = behind.heartbeats
        await wait_for(lambda: behind.heartbeats >= beats + 2, timeout=30, message="heartbeats")
        assert behind.dht_mode == CLIENT
        assert behind.node.rpc.stats.ignored == 0
        assert not held(network, behind.node.node.id)
        assert behind.edge_requests == {"bootstrap": 1}


async def test_a_worker_switches_mode_when_its_reachability_changes(
    tmp_path: Path, network: list[DHTNode], nat: UdpNat, edge: Edge
) -> None:
    async with agent(edge, tmp_path, "w-switch", nat) as worker:
        assert worker.node is not None
        assert worker.dht_mode == CLIENT
        public = nat.mapping_of(worker.node.address).public_address
        nat.open(worker.node.address)  # port forwarding switched on, no restart

        async def serving() -> bool:
            # The agent takes the record as its own once publish() returns, which can be after
            # a coordinator already hands it out: wait for both sides.
            record = worker.record
            return (
                worker.dht_mode == SERVER
                and record is not None
                and (record.dht_host, record.dht_port) == public
                and await advertised(network, worker.worker_id) == public
            )

        await wait_for(serving, timeout=30, interval=0.1, message="a server, record republished")
        await wait_for(
            lambda: held(network, worker.node.node.id) if worker.node else False,
            timeout=30,
            message="the new server in a coordinator's routing table",
        )

        nat.open(worker.node.address, open=False)  # and off again

        async def client_again() -> bool:
            return worker.dht_mode == CLIENT and await advertised(network, worker.worker_id) == (
                "",
                0,
            )

        await wait_for(client_again, timeout=30, interval=0.1, message="a client again")
        # Each server it told forgets it once a ping goes unanswered (a client answers none).
        await wait_for(
            lambda: not held(network, worker.node.node.id) if worker.node else True,
            timeout=30,
            message="the client forgotten by the servers",
        )
