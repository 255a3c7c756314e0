"""`rma router` (and `python -m rma router`): the edge router under uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

import uvicorn

from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import BootstrapError, RegistryError
from dht_bridge.options import format_hostport
from dht_bridge.registry.registry import Registry, open_registry
from edge_router import page
from edge_router.app import create_app
from edge_router.config import ROUTER_OPTIONS, RouterConfig
from edge_router.server import server_config
from rma.exits import Exit
from rma.process import wait_for_stop_signal

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rma router` (`ROUTER_OPTIONS`)."""
    ROUTER_OPTIONS.add_to(parser)


def run(args: argparse.Namespace) -> int:
    """Build the configuration and serve until SIGTERM/SIGINT."""
    config = RouterConfig.build(args)
    return asyncio.run(serve(config, log_level=args.log_level))


async def serve(config: RouterConfig, *, log_level: str = "info") -> int:
    """Open the registry and a DHT node, run the app, close everything on the way out."""
    registry = open_registry(config.registry, policy=config.policy)
    dht = DHTNode(config.dht, policy=config.policy, coordinators=config.coordinators)
    try:
        await dht.listen()
    except OSError as exc:
        where = format_hostport(config.dht.host, config.dht.port)
        logger.error("cannot bind the DHT node to %s: %s", where, exc)
        await registry.aclose()
        return Exit.START_FAILED
    try:
        await _join(dht, config)
        await _check_registry(registry)
        app = create_app(config, registry=registry, dht=dht)
        server = QuietServer(
            server_config(
                app,
                host=config.host,
                port=config.port,
                refusals=app.state.rma.refused,
                log_level=log_level,
                # A line per request only when the operator asks (RMA_ACCESS_LOG).
                access_log=config.access_log,
                timeout_graceful_shutdown=max(1, round(config.shutdown_timeout)),
            )
        )
        state = app.state.rma
        watcher = asyncio.get_running_loop().create_task(
            _stop_on_signal(server, lambda: setattr(state, "draining", True), config.drain_seconds)
        )
        try:
            with page.quiet_page_polls():
                await server.serve()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        return 0 if server.started else Exit.START_FAILED
    finally:
        await dht.aclose()
        await registry.aclose()


class QuietServer(uvicorn.Server):
    """uvicorn's server without its signal handling: after a graceful stop uvicorn re-raises
    the signal it caught, which would kill the process before it closes the DHT node and the
    registry. `serve` watches SIGTERM/SIGINT itself and asks the server to exit."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _stop_on_signal(
    server: uvicorn.Server, drain: Callable[[], None], drain_seconds: float
) -> None:
    """On SIGTERM/SIGINT: /readyz says draining for `drain_seconds` while requests are still
    served, then uvicorn stops accepting and gives open requests its graceful timeout."""
    await wait_for_stop_signal()
    drain()
    logger.info("stopping on signal: draining for %gs", drain_seconds)
    with contextlib.suppress(TimeoutError):
        # A second signal cuts the drain short.
        await asyncio.wait_for(wait_for_stop_signal(), drain_seconds)
    server.should_exit = True


async def _join(dht: DHTNode, config: RouterConfig) -> None:
    peers = list(config.dht_bootstrap) + list(config.coordinators)
    if not peers:
        logger.info("no DHT peers configured; lookups come from Redis only until peers join")
        return
    try:
        await dht.bootstrap(peers)
    except BootstrapError as exc:
        logger.warning("%s; the DHT fallback stays empty until a peer answers", exc)


async def _check_registry(registry: Registry) -> None:
    try:
        await registry.ping()
    except RegistryError as exc:
        logger.warning("registry not reachable at start (%s); serving from the DHT", exc)
