"""IPv6: the whole path on ::1 (DHT nodes, the edge handing them out, a worker joining and
being found); a node bound to `::` on a dual-stack host in an IPv4 network; and what a node
says of peers of the other family. Volunteers' hosts are often reachable on IPv6 alone."""

from __future__ import annotations

import logging
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from dht_bridge.dht.address import dual_stack
from dht_bridge.errors import BootstrapError
from dht_bridge.registry.registry import Registry
from tests.support.dht import TEST_SETTINGS, start_node, stop_all
from tests.support.helpers import make_record, wait_for
from tests.support.worker import (
    AGENT_DHT,
    dht_ids,
    reach_checked,
    router_config,
    running_edge,
    worker_config,
)
from worker.agent import Mode

V6 = replace(TEST_SETTINGS, host="::1")
WILDCARD = replace(TEST_SETTINGS, host="::")


def _binds(host: str) -> socket.socket | None:
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.bind((host, 0))
    except OSError:
        return None
    return sock


def _has(host: str, *, dual: bool = False) -> bool:
    sock = _binds(host)
    if sock is None:
        return False
    with sock:
        return dual_stack(sock) or not dual


needs_v6 = pytest.mark.skipif(not _has("::1"), reason="no IPv6 loopback (::1)")
needs_dual = pytest.mark.skipif(not _has("::", dual=True), reason="no dual-stack IPv6 socket")


@needs_v6
async def test_a_worker_joins_publishes_and_is_found_over_ipv6(
    tmp_path: Path, registry: Registry
) -> None:
    first = await start_node(settings=V6)
    nodes = [first, *[await start_node(settings=V6, seeds=[first.address]) for _ in range(2)]]
    try:
        async with running_edge(registry, router_config(nodes)) as edge:
            answer = await edge.client.get("/dht/bootstrap")
            assert {p["host"] for p in answer.json()["peers"]} == {"::1"}

            config = worker_config(tmp_path, "w-v6", dht=replace(AGENT_DHT, host="::1"))
            async with edge.agent(config) as agent:
                assert agent.mode is Mode.DHT
                assert agent.edge_requests == {"bootstrap": 1}
                await reach_checked(agent)
                assert agent.node is not None
                assert agent.node.address[0] == "::1"
                assert agent.record is not None
                assert agent.record.dht_host == "::1"  # a server, at the address servers saw

                async def found() -> bool:
                    return agent.worker_id in await dht_ids(nodes[2])

                await wait_for(found, timeout=10, message="the v6 worker found by a lookup")
                record = await nodes[1].get_record(agent.worker_id)
                assert record is not None
                assert record.dht_host == "::1"
    finally:
        await stop_all(nodes)


@needs_dual
async def test_a_node_on_the_v6_wildcard_of_a_dual_stack_host_joins_an_ipv4_network() -> None:
    first = await start_node()
    v4 = [first, *[await start_node(seeds=[first.address]) for _ in range(3)]]
    dual = await start_node(settings=WILDCARD, seeds=[first.address])
    try:
        assert dual.rpc.dual_stack

        # It sends to IPv4 contacts (v4-mapped on the wire) and its contacts are plain IPv4,
        # the form an IPv4-only node can use when it is handed them.
        def contacts() -> list[tuple[str, int]]:
            return sorted((c.ip, c.port) for c in dual.rpc.router.contacts())

        everyone = sorted(node.address for node in v4)
        await wait_for(lambda: contacts() == everyone, timeout=10, message=f"{contacts()}")

        # A reachability check through IPv4 servers: their probes come back to `::`.
        verdict = await dual.check_reachability([node.address for node in v4])
        assert verdict.reachable
        assert verdict.observed == ("127.0.0.1", dual.address[1])

        # The IPv4 nodes know it by its IPv4 address, never a v4-mapped one.
        known = {(c.ip, c.port) for node in v4 for c in node.rpc.router.contacts()}
        assert ("127.0.0.1", dual.address[1]) in known
        assert not [ip for ip, _ in known if ip.startswith("::ffff:")]

        # Records go both ways.
        theirs, ours = make_record(services=("ocr",)), make_record(services=("ocr",))
        await v4[2].publish(theirs)
        await dual.publish(ours)
        assert theirs.worker_id in await dht_ids(dual)
        assert ours.worker_id in await dht_ids(v4[3])
        got = await v4[1].get_record(ours.worker_id)
        assert got is not None
    finally:
        await stop_all([*v4, dual])


@needs_v6
async def test_a_node_says_which_bootstrap_peers_are_of_the_other_family(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dht_bridge.dht.node")
    v6 = await start_node(settings=V6)
    v4 = await start_node()
    try:
        with pytest.raises(BootstrapError, match=r"no usable bootstrap peer .*\[::1\]:\d+"):
            await v4.bootstrap([v6.address])
        assert f"bootstrap peer [::1]:{v6.address[1]} is IPv6" in caplog.text
        assert "IPv4 only" in caplog.text
        with pytest.raises(BootstrapError, match=r"no usable bootstrap peer .*127\.0\.0\.1:\d+"):
            await v6.bootstrap([v4.address])  # bound to ::1, not `::`: no IPv4
        assert "is IPv4 and this node's DHT socket ([::1]:" in caplog.text
    finally:
        await stop_all([v4, v6])
