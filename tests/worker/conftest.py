"""The worker tests' shared scene: three DHT nodes (the coordinators) and the router app on the
test Redis, handing them out as bootstrap peers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dht_bridge.dht.node import DHTNode
from dht_bridge.registry.registry import Registry
from tests.support.dht import network_of
from tests.support.worker import Edge, router_config, running_edge


@pytest.fixture
async def network() -> AsyncIterator[list[DHTNode]]:
    """Three DHT nodes: the coordinators the edge hands out."""
    async with network_of(3) as nodes:
        yield nodes


@pytest.fixture
async def edge(registry: Registry, network: list[DHTNode]) -> AsyncIterator[Edge]:
    """The router app on the test Redis, handing out the network as bootstrap peers."""
    async with running_edge(registry, router_config(network)) as running:
        yield running
