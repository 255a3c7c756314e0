"""Shared fixtures: our own redis-server (never the one on 6379) and registries on it, a
Sentinel deployment and a Cluster, started once per session when a test asks for them, and
DHT networks on 127.0.0.1 that are stopped for the test (`network_factory`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from tests.support import dht
from tests.support.helpers import POLICY
from tests.support.redis_server import TEST_REDIS_TIMEOUT, RedisServer
from tests.support.redis_topologies import ClusterTopology, SentinelTopology

network_factory = pytest.fixture(dht.network_factory)

# Where the registry's own tests run: `registry_settings` is parametrized over these.
TOPOLOGIES = ("single", "sentinel", "cluster")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session; tests must not stop it (use make_redis_server)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied for this test."""
    if not redis_server.running:
        redis_server.start()  # a test broke the rule above: give the next ones a server
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
async def registry(redis_url: str) -> AsyncIterator[Registry]:
    """A Registry on the (empty) session server, closed after the test."""
    settings = RegistrySettings(redis_url=redis_url, timeout=TEST_REDIS_TIMEOUT)
    opened = open_registry(settings, policy=POLICY)
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
def make_redis_server(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """A factory of private, started redis-servers for fault tests; all killed at teardown."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}")
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture(scope="session")
def sentinel_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    """A primary, a replica and 3 Sentinels for the session; tests must not kill them."""
    topology = SentinelTopology(tmp_path_factory.mktemp("sentinel"))
    topology.start()
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="session")
def cluster_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    """A 3-primary Cluster with a replica each for the session; tests must not kill nodes."""
    topology = ClusterTopology(tmp_path_factory.mktemp("cluster"))
    topology.start()
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture(params=TOPOLOGIES)
def registry_settings(request: pytest.FixtureRequest) -> RegistrySettings:
    """Settings for one Redis, the Sentinel deployment or the Cluster (each emptied first)."""
    if request.param == "single":
        url: str = request.getfixturevalue("redis_url")
        return RegistrySettings(redis_url=url, timeout=TEST_REDIS_TIMEOUT)
    topology: SentinelTopology | ClusterTopology = request.getfixturevalue(
        f"{request.param}_topology"
    )
    topology.flushall()
    return topology.settings()


@pytest.fixture
async def topology_registry(registry_settings: RegistrySettings) -> AsyncIterator[Registry]:
    """A Registry on each topology in turn (see `registry_settings`), closed after the test."""
    opened = open_registry(registry_settings, policy=POLICY)
    try:
        yield opened
    finally:
        await opened.aclose()
