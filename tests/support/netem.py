"""DHT networks on the emulated internet (dht_bridge.netem), for tests and the field bench.

`start_field` builds a network as volunteers would form it: a few coordinators (servers that
every node knows, exempt from the per-address limits), then servers joining through two
coordinators and one earlier server, then clients behind NAT joining through servers. Every
node runs on its own emulated host, so its traffic is that host's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import BootstrapError
from dht_bridge.netem import EmulatedNetwork, Host, StockServer
from dht_bridge.settings import DHTSettings
from tests.support.helpers import POLICY
from worker.config import worker_dht_settings

__all__ = [
    "FIELD_SETTINGS",
    "FIELD_WORKER_SETTINGS",
    "Field",
    "bounded",
    "start_field",
    "start_stock",
]

# The product's defaults; the host part is ignored by emulated endpoints.
FIELD_SETTINGS = DHTSettings(host="0.0.0.0", port=0)
# A worker agent's node: the core's defaults with the worker's own (its holder cache).
FIELD_WORKER_SETTINGS = dataclasses.replace(worker_dht_settings(), port=0)
# Joins under way at once: one event loop hosts the whole network.
DEFAULT_GATE = 16
# A node whose seeds all went unanswered (lost datagrams) tries other seeds this many times.
JOIN_ATTEMPTS = 3

T = TypeVar("T")


async def bounded(jobs: Iterable[Callable[[], Awaitable[T]]], gate: int = DEFAULT_GATE) -> list[T]:
    """Run `jobs`, `gate` at a time; results in order."""
    semaphore = asyncio.Semaphore(gate)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await job()

    return list(await asyncio.gather(*(one(job) for job in jobs)))


@dataclass
class Field:
    """A DHT network on an emulated internet: its nodes and the host each one runs on."""

    network: EmulatedNetwork
    coordinators: list[DHTNode] = field(default_factory=list)
    servers: list[DHTNode] = field(default_factory=list)  # coordinators included
    clients: list[DHTNode] = field(default_factory=list)
    hosts: dict[int, Host] = field(default_factory=dict)  # id(node) -> its host
    join_failures: int = 0  # nodes that found no answering seed in JOIN_ATTEMPTS tries

    @property
    def nodes(self) -> list[DHTNode]:
        """Servers, then clients."""
        return [*self.servers, *self.clients]

    def host_of(self, node: DHTNode) -> Host:
        """The emulated host `node` runs on."""
        return self.hosts[id(node)]

    async def new_node(
        self,
        *,
        client: bool,
        settings: DHTSettings = FIELD_SETTINGS,
        region: str | None = None,
    ) -> DHTNode:
        """A listening node on a new host (behind NAT when `client`), not joined yet."""
        host = self.network.add_host(region, nat=client)
        node = DHTNode(
            settings,
            policy=POLICY,
            client=client,
            endpoint=host.endpoint,
            coordinators=[c.address for c in self.coordinators],
        )
        await node.listen()
        self.hosts[id(node)] = host
        return node

    async def aclose(self) -> None:
        """Close every node."""
        await asyncio.gather(*(node.aclose() for node in self.nodes))


async def start_field(
    network: EmulatedNetwork,
    *,
    servers: int,
    clients: int,
    coordinators: int = 3,
    settings: DHTSettings = FIELD_SETTINGS,
    coordinator_settings: DHTSettings | None = None,
    seed: int = 0,
    gate: int = DEFAULT_GATE,
) -> Field:
    """`servers` server nodes (the first `coordinators` of them coordinators, built with
    `coordinator_settings`, by default `settings`) and `clients` client nodes, joined
    (`join_failures` counts those that never could); the nodes are closed if building fails."""
    rng = random.Random(seed)
    built = Field(network)
    try:
        for _ in range(max(1, min(coordinators, servers))):
            built.coordinators.append(
                await built.new_node(client=False, settings=coordinator_settings or settings)
            )
        built.servers.extend(built.coordinators)
        first = built.coordinators[0]

        async def attempt(node: DHTNode, seeds: Callable[[], list[DHTNode]]) -> None:
            # A lost ping (1% of datagrams) must not leave a node out: try other seeds.
            for _ in range(JOIN_ATTEMPTS):
                try:
                    await node.bootstrap([s.address for s in seeds()])
                    return
                except BootstrapError:
                    continue
            built.join_failures += 1

        await bounded(
            [functools.partial(attempt, c, lambda: [first]) for c in built.coordinators[1:]]
        )

        async def join(client: bool) -> None:
            node = await built.new_node(client=client, settings=settings)
            pool = built.servers if client else built.coordinators
            (built.clients if client else built.servers).append(node)

            def seeds() -> list[DHTNode]:
                chosen = rng.sample(pool, min(2, len(pool)))
                earlier = [s for s in built.servers[len(built.coordinators) :] if s is not node]
                if not client and earlier:
                    chosen.append(rng.choice(earlier))
                return chosen

            await attempt(node, seeds)

        others = servers - len(built.coordinators)
        await bounded([lambda: join(False)] * max(0, others), gate)
        await bounded([lambda: join(True)] * clients, gate)
    except BaseException:
        await built.aclose()
        raise
    return built


async def start_stock(network: EmulatedNetwork, seeds: Iterable[tuple[str, int]]) -> StockServer:
    """A stock `kademlia.network.Server` on a new host, joined through `seeds`."""
    stock = StockServer(network.add_host())
    await stock.listen()
    await stock.bootstrap(list(seeds))
    return stock
