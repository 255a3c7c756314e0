"""Worker agent tests: a real router app in process, real DHT nodes on loopback, and agent
configurations with every interval scaled down (the same code paths, in seconds not minutes)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette

from dht_bridge.backoff import ExponentialBackoff
from dht_bridge.dht.node import CLIENT, DHTNode
from dht_bridge.registry.registry import Registry
from dht_bridge.settings import DHTSettings
from edge_router.app import create_app
from edge_router.config import RouterConfig
from tests.support.helpers import wait_for
from worker.agent import WorkerAgent
from worker.config import WorkerConfig

EDGE_URL = "http://edge.test"
# Short RPC timeouts so that a dead peer costs little; loopback answers in microseconds.
AGENT_DHT = DHTSettings(host="127.0.0.1", port=0, rpc_timeout=0.5, stall=0.1)
HEARTBEAT = 0.3  # for a 1.2 s lease: the real 30 s / 90 s, scaled down 75 times
TTL = 1.2


async def reach_checked(agent: WorkerAgent) -> None:
    """Wait for the reachability check that follows a start (in the agent's loop) to answer
    and, where it made the agent a server, for the record that hands out its address."""

    def settled() -> bool:
        node, record = agent.node, agent.record
        if agent.reachability is None or node is None or record is None:
            return False
        return agent.dht_mode == CLIENT or (record.dht_host, record.dht_port) == node.address

    await wait_for(settled, timeout=15, message="the start's reachability check")


def worker_config(tmp_path: Path, name: str, **changes: Any) -> WorkerConfig:
    """An agent's configuration with scaled intervals, its files under `tmp_path/name`."""
    config = WorkerConfig(
        services=("ocr",),
        tunnel_url=f"https://{name}.trycloudflare.com",
        state_file=tmp_path / name / "state.json",
        edge_url=EDGE_URL,
        dht=AGENT_DHT,
        heartbeat=HEARTBEAT,
        ttl=TTL,
        jitter=0.1,
        discovery_deadline=1.0,
        fallback_heartbeat=0.5,
        fallback_ttl=1.5,
        retry=ExponentialBackoff(base=0.1, cap=0.5),
        leave_timeout=3.0,
        edge_timeout=5.0,
    )
    return replace(config, **changes)


def router_config(nodes: list[DHTNode], **changes: Any) -> RouterConfig:
    """The router handing out `nodes` as coordinators from /dht/bootstrap."""
    return RouterConfig(coordinators=tuple(node.address for node in nodes), **changes)


class Edge:
    """A real router app in this process; agents reach it through an ASGI transport."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.client = httpx.AsyncClient(transport=self.transport(), base_url=EDGE_URL)

    def transport(self) -> httpx.ASGITransport:
        """A transport into the app, as a client on loopback."""
        return httpx.ASGITransport(app=self.app, client=("127.0.0.1", 40000))

    def agent(self, config: WorkerConfig, **kwargs: Any) -> WorkerAgent:
        """An agent whose edge is this router."""
        return WorkerAgent(config, edge_transport=self.transport(), **kwargs)

    async def lookup(self, service: str = "ocr") -> list[str]:
        """Worker ids the router lists for `service` (cache flushed first: what it knows now)."""
        self.app.state.rma.lookups.flush()
        answer = await self.client.get(f"/services/{service}", params={"limit": 100})
        assert answer.status_code == 200, answer.text
        return [p["worker_id"] for p in answer.json()["providers"]]


@contextlib.asynccontextmanager
async def running_edge(
    registry: Registry, config: RouterConfig, *, dht: DHTNode | None = None
) -> AsyncIterator[Edge]:
    """The router app around `registry`, its lifespan running."""
    app = create_app(config, registry=registry, dht=dht, listen_events=False)
    async with app.router.lifespan_context(app):
        edge = Edge(app)
        try:
            yield edge
        finally:
            await edge.client.aclose()


async def dht_ids(node: DHTNode, service: str = "ocr") -> list[str]:
    """Worker ids a DHT lookup from `node` returns for `service`."""
    return [record.worker_id for record in await node.lookup(service, limit=100)]
