"""`rma demo`: the whole system on loopback in one process, for a first look.

An embedded (or `RMA_REDIS_URL`) registry, one bridge with its coordinator DHT node, the edge
router with its own DHT node, and N worker agents, each a real Kademlia node with a small HTTP
service standing in for its Cloudflare Tunnel. The tunnel allow-list is widened to loopback for
the demo only, and the log says so. Each stand-in service embeds its agent's tunnel proof
(`worker.ProofMiddleware`), as a volunteer's service would, so the router proves every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dht_bridge.bridge.bridge import Bridge, BridgeSettings
from dht_bridge.bridge.journal import Journal
from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import RegistryError
from dht_bridge.options import format_hostport
from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import DHTSettings, RegistrySettings
from dht_bridge.tunnels import TunnelPolicy
from edge_router.app import create_app
from edge_router.config import RouterConfig
from edge_router.server import RefusalLog, server_config
from edge_router.state import RouterState
from rma.commands.router import QuietServer
from worker.agent import WorkerAgent
from worker.config import WorkerConfig, worker_dht_settings
from worker.proof import ProofMiddleware, ProofSource

logger = logging.getLogger(__name__)

DEMO_POLICY = TunnelPolicy(allow_loopback=True)
REGIONS = ("eu", "us")
START_DEADLINE = 30.0
JOIN_CONCURRENCY = 8


@dataclass(frozen=True)
class DemoConfig:
    """What `rma demo` runs: how many workers, which services, where the router listens."""

    workers: int = 20
    services: tuple[str, ...] = ("ocr", "gpu")
    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = None
    heartbeat: float = 30.0
    ttl: float = 90.0


async def run_demo(config: DemoConfig, stop: asyncio.Event) -> int:
    """Start everything, say how to use it, run until `stop`, then shut down in order."""
    if logging.getLogger().getEffectiveLevel() >= logging.INFO:
        # Twenty new identities and state files are expected here; say so once, not per worker.
        logging.getLogger("worker").setLevel(logging.ERROR)
    logger.warning(
        "demo: the tunnel allow-list is widened to loopback (http://127.0.0.1:*) for the "
        "demo's stand-in services; never do this in production"
    )
    with tempfile.TemporaryDirectory(prefix="rma-demo-") as workdir:
        async with contextlib.AsyncExitStack() as stack:
            registry = open_registry(
                RegistrySettings(redis_url=config.redis_url), policy=DEMO_POLICY
            )
            stack.push_async_callback(registry.aclose)
            bridge_node = await _node(stack)
            bridge, halt_bridge = await _start_bridge(
                stack, bridge_node, registry, config, Path(workdir)
            )
            servers = _Servers(stack)
            token = secrets.token_urlsafe(18)
            router_url, router = await _start_router(
                stack, servers, config, registry, bridge, token
            )
            agents = await _start_workers(servers, config, router_url, Path(workdir))
            await until_registered(registry, {agent.worker_id for agent in agents})
            router.started = True  # /readyz: the demo's start-up is done
            _say_ready(config, router_url, token, agents)
            await stop.wait()
            logger.info("demo: stopping (workers leave with a tombstone)...")
            # All at once: the bridge's and the router's nodes stay up until every worker has
            # left, so each tombstone reaches them even as other workers' nodes close.
            await asyncio.gather(*(agent.aclose() for agent in agents), return_exceptions=True)
            # The bridge next, while the router's node still answers: with every worker gone,
            # its health probe would otherwise count the DHT side lost during the teardown.
            await halt_bridge()
            await servers.stop()
    logger.info("demo: stopped cleanly")
    return 0


async def _node(
    stack: contextlib.AsyncExitStack, seeds: list[tuple[str, int]] | None = None
) -> DHTNode:
    # Seeds are the bridge's node: the coordinator, exempt from the diversity limits.
    node = DHTNode(
        DHTSettings(host="127.0.0.1", port=0), policy=DEMO_POLICY, coordinators=seeds or ()
    )
    await node.listen()
    stack.push_async_callback(node.aclose)
    if seeds:
        await node.bootstrap(seeds)
    return node


async def _start_bridge(
    stack: contextlib.AsyncExitStack,
    node: DHTNode,
    registry: Registry,
    config: DemoConfig,
    workdir: Path,
) -> tuple[Bridge, Callable[[], Awaitable[None]]]:
    """The bridge running over `node` and `registry`, and how to halt it (again is a no-op)."""
    journal = Journal(workdir / "bridge.journal")
    journal.open()
    stack.callback(journal.close)
    bridge = Bridge(
        node,
        registry,
        journal,
        settings=BridgeSettings(sync_interval=5.0),
        services=config.services,
    )
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(bridge.run(stop), name="demo-bridge")

    async def halt() -> None:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)

    stack.push_async_callback(halt)
    logger.info("demo: bridge (coordinator) DHT node on %s", format_hostport(*node.address))
    return bridge, halt


async def _start_router(
    stack: contextlib.AsyncExitStack,
    servers: _Servers,
    config: DemoConfig,
    registry: Registry,
    bridge: Bridge,
    token: str,
) -> tuple[str, RouterState]:
    router_node = await _node(stack, [bridge.node.address])
    router_config = RouterConfig(
        host=config.host,
        port=config.port,
        admin_token=token,
        coordinators=(bridge.node.address,),
        policy=DEMO_POLICY,
    )
    app = create_app(
        router_config,
        registry=registry,
        dht=router_node,
        extra_figures=bridge.figures,
        ready_at_start=False,
    )
    port = await servers.serve(
        app, config.host, config.port, "demo-router", refusals=app.state.rma.refused
    )
    state: RouterState = app.state.rma
    return f"http://{format_hostport(config.host, port)}", state


async def _start_workers(
    servers: _Servers, config: DemoConfig, router_url: str, workdir: Path
) -> list[WorkerAgent]:
    rng = random.Random()
    agents: list[WorkerAgent] = []
    joined = 0
    gate = asyncio.Semaphore(JOIN_CONCURRENCY)

    async def one(index: int) -> None:
        nonlocal joined
        service = config.services[index % len(config.services)]
        load = round(rng.uniform(0.05, 0.9), 2)
        # The service listens before the agent exists (the agent's record names its port), so
        # its proof reads the agent when asked: None (503) until it is bound below.
        agent: WorkerAgent | None = None
        app = _tunnel_app(index, service, lambda: agent)
        async with gate:
            port = await servers.serve(app, "127.0.0.1", 0, f"demo-tunnel-{index}")
            worker_config = WorkerConfig(
                services=(service,),
                tunnel_url=f"http://127.0.0.1:{port}",
                state_file=workdir / f"worker-{index}.json",
                edge_url=router_url,
                region=REGIONS[(index // len(config.services)) % len(REGIONS)],
                dht=replace(worker_dht_settings(), host="127.0.0.1", port=0),
                policy=DEMO_POLICY,
                heartbeat=config.heartbeat,
                ttl=config.ttl,
                load=load,
            )
            agent = WorkerAgent(worker_config)  # the service's proof answers for it now
            await agent.start()
            agents.append(agent)
            joined += 1
            logger.info(
                "demo: worker %d/%d joined (%s, %s, load %.2f, tunnel :%d)",
                joined,
                config.workers,
                service,
                worker_config.region,
                load,
                port,
            )

    await asyncio.gather(*(one(i) for i in range(config.workers)))
    return agents


def _tunnel_app(index: int, service: str, agent: Callable[[], ProofSource | None]) -> Starlette:
    """The stand-in for a worker's own HTTP service behind its tunnel; it answers the router's
    tunnel proof with the key of the agent `agent()` returns."""

    async def work(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse(
            {
                "worker": index,
                "service": service,
                "method": request.method,
                "path": request.url.path,
                "received_bytes": len(body),
                "forwarded_for": request.headers.get("x-forwarded-for"),
            }
        )

    methods = ["GET", "POST", "PUT", "DELETE"]
    return Starlette(
        routes=[Route("/{path:path}", work, methods=methods)],
        middleware=[Middleware(ProofMiddleware, agent=agent)],
    )


class _Servers:
    """The demo's HTTP servers (router and stand-in tunnels): started one by one, stopped all
    at once. uvicorn notices `should_exit` at its next tick (0.1 s); 21 stopped one after
    another kept the demo's Ctrl-C waiting for seconds."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack
        self._running: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def serve(
        self, app: Starlette, host: str, port: int, name: str, refusals: RefusalLog | None = None
    ) -> int:
        """Serve `app` with uvicorn in this loop until `stop`; returns the bound port."""
        server = QuietServer(
            # The router's server stack for every demo server (the workers' stand-ins too).
            server_config(app, host=host, port=port, refusals=refusals, log_level="warning")
        )
        task = asyncio.get_running_loop().create_task(server.serve(), name=name)
        self._running.append((server, task))

        async def halt() -> None:
            server.should_exit = True
            await asyncio.gather(task, return_exceptions=True)

        # Unwound with the stack when start-up fails: each server stops before what it uses.
        self._stack.push_async_callback(halt)
        await _until(lambda: server.started or task.done(), f"{name} to start")
        if task.done():
            task.result()  # raises what stopped it (a port in use, ...)
            raise RuntimeError(f"{name} stopped before it started")
        bound: int = server.servers[0].sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        """Stop every server and wait for them all; again is a no-op."""
        for server, _ in self._running:
            server.should_exit = True
        await asyncio.gather(*(task for _, task in self._running), return_exceptions=True)


async def until_registered(
    registry: Registry, wanted: set[str], *, within: float = START_DEADLINE
) -> None:
    """Wait until the bridge has copied every worker into Redis, so "ready" means lookups see
    them all; after the deadline go on and say how many are there."""
    held: set[str] = set()
    said = False
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            held = {r.worker_id for r in await registry.records(limit=len(wanted) * 2 + 10)}
        except RegistryError as exc:
            # A Redis that stops during start-up is an outage like any other: the bridge
            # journals and the router serves from the DHT; the demo must not die of it.
            if not said:
                logger.warning("demo: the registry is out of reach while starting (%s)", exc)
                said = True
        if wanted <= held:
            return
        await asyncio.sleep(0.1)
    logger.warning(
        "demo: %d of %d workers reached the registry so far", len(wanted & held), len(wanted)
    )


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _say_ready(config: DemoConfig, url: str, token: str, agents: list[WorkerAgent]) -> None:
    service = config.services[0]
    lines = [
        f"demo ready: {len(agents)} workers offering {', '.join(config.services)}",
        f"  topology page:   {url}/",
        f"  network as JSON: {url}/topology",
        f"  metrics:         {url}/metrics",
        "try:",
        f"  curl -s {url}/services/{service}?limit=3",
        f"  curl -s {url}/route/{service}/hello -d 'some work'",
        f"  curl -s {url}/dht/bootstrap",
        f"  curl -s -X POST -H 'Authorization: Bearer {token}' -d '{{}}' {url}/admin/cache/flush",
        "press Ctrl-C to stop",
    ]
    for line in lines:
        logger.info("%s", line)
