"""Real DHT networks on 127.0.0.1 for tests: N nodes in this event loop, joined through node 0."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any

from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.publish import PublishReport
from dht_bridge.records import WorkerRecord
from dht_bridge.settings import DHTSettings
from tests.support.helpers import POLICY, ManualClock

__all__ = [
    "TEST_SETTINGS",
    "ManualClock",
    "NetworkFactory",
    "NoNetwork",
    "network_factory",
    "network_of",
    "publish_all",
    "start_network",
    "start_node",
    "stop_all",
]

TEST_SETTINGS = DHTSettings(host="127.0.0.1", port=0, rpc_timeout=1.0)


class NoNetwork:
    """Stands in for the protocol under a bare routing table: a full bucket's ping of its
    oldest contact goes nowhere."""

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "") -> None:
        """Drop the coroutine unrun."""
        coro.close()


async def start_node(
    *,
    settings: DHTSettings = TEST_SETTINGS,
    clock: Callable[[], float] | None = None,
    node_id: bytes | None = None,
    seeds: Iterable[tuple[str, int]] = (),
) -> DHTNode:
    """One listening node, joined through `seeds` when given."""
    kwargs = {"clock": clock} if clock is not None else {}
    node = DHTNode(settings, policy=POLICY, node_id=node_id, **kwargs)  # type: ignore[arg-type]
    await node.listen()
    seeds = list(seeds)
    if seeds:
        await node.bootstrap(seeds)
    return node


async def start_network(
    count: int, *, settings: DHTSettings = TEST_SETTINGS, clock: Callable[[], float] | None = None
) -> list[DHTNode]:
    """`count` nodes; each joins through node 0 and the node before it."""
    first = await start_node(settings=settings, clock=clock)
    nodes = [first]
    for _ in range(count - 1):
        seeds = {first.address, nodes[-1].address}
        nodes.append(await start_node(settings=settings, clock=clock, seeds=seeds))
    return nodes


async def stop_all(nodes: Iterable[DHTNode]) -> None:
    """Close every node."""
    await asyncio.gather(*(node.aclose() for node in nodes))


# What the `network_factory` fixture hands a test: `start_network`, stopped at teardown.
NetworkFactory = Callable[..., Awaitable[list[DHTNode]]]


async def network_factory() -> AsyncIterator[NetworkFactory]:
    """Networks (`start_network`'s arguments) that the test need not stop: all are closed at
    teardown, whether the test passed or not."""
    started: list[DHTNode] = []

    async def make(count: int, **kwargs: Any) -> list[DHTNode]:
        nodes = await start_network(count, **kwargs)
        started.extend(nodes)
        return nodes

    try:
        yield make
    finally:
        await stop_all(started)


@contextlib.asynccontextmanager
async def network_of(count: int) -> AsyncIterator[list[DHTNode]]:
    """`start_network(count)`, stopped on the way out."""
    nodes = await start_network(count)
    try:
        yield nodes
    finally:
        await stop_all(nodes)


async def publish_all(
    nodes: list[DHTNode], records: list[WorkerRecord], *, concurrency: int = 16
) -> list[PublishReport]:
    """Publish each record from a node of the network, a bounded number at a time.

    Real workers each run their own process and heartbeat with jitter; one test process
    hosting dozens of nodes must not put every publish on its one loop at the same instant.
    """
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int, record: WorkerRecord) -> PublishReport:
        async with gate:
            return await nodes[index % len(nodes)].publish(record)

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(records))))
