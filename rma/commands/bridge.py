"""`rma bridge` (and `python -m rma bridge`): a coordinator DHT node kept in sync with Redis."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dht_bridge.bridge.bridge import (
    DEFAULT_PROBE_INTERVAL,
    DEFAULT_STALE_SHARE,
    DEFAULT_SYNC_INTERVAL,
    Bridge,
    BridgeSettings,
)
from dht_bridge.bridge.journal import DEFAULT_MAX_BYTES, MIN_MAX_BYTES, Journal
from dht_bridge.bridge.metrics import MetricsServer
from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import ConfigError
from dht_bridge.options import Option, OptionTable, format_hostport
from dht_bridge.paths import STATE_DIR_TEXT, state_dir
from dht_bridge.records import SERVICE_RE
from dht_bridge.registry.registry import open_registry
from dht_bridge.settings import (
    DHT_OPTIONS,
    REGISTRY_OPTIONS,
    TUNNEL_OPTIONS,
    DHTSettings,
    RegistrySettings,
    tunnel_policy,
)
from dht_bridge.tunnels import TunnelPolicy
from rma.commands.node import load_state, save_state
from rma.exits import Exit
from rma.process import run_service

logger = logging.getLogger(__name__)

JOURNAL_NAME = "bridge-journal.jsonl"
DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_METRICS_PORT = 9464
STATE_VERSION = 1

BRIDGE_OPTIONS = OptionTable(
    Option(
        "journal",
        "JOURNAL_PATH",
        "the journal file",
        shown=f"{JOURNAL_NAME} in {STATE_DIR_TEXT}",
        metavar="PATH",
    ),
    Option(
        "journal_max_bytes",
        "JOURNAL_MAX_BYTES",
        "journal size limit, bytes",
        "int",
        DEFAULT_MAX_BYTES,
    ),
    Option(
        "state_file",
        "STATE_FILE",
        "JSON file: node id, contacts, known services",
        metavar="PATH",
    ),
    Option(
        "service",
        "BRIDGE_SERVICES",
        "a service to poll from the start (others are learnt); repeatable",
        "list",
        (),
    ),
    Option(
        "sync_interval",
        "SYNC_INTERVAL",
        "seconds between full syncs of Redis and the DHT",
        "float",
        DEFAULT_SYNC_INTERVAL,
    ),
    Option(
        "probe_interval",
        "DHT_PROBE_INTERVAL",
        "seconds between DHT and Redis health probes",
        "float",
        DEFAULT_PROBE_INTERVAL,
    ),
    Option(
        "stale_share",
        "STALE_SHARE",
        "self-preservation: the share of leases lapsing within one sync interval, with the "
        "DHT lost, above which they are held",
        "float",
        DEFAULT_STALE_SHARE,
    ),
    Option(
        "metrics_host",
        "BRIDGE_METRICS_HOST",
        "address of the bridge's /metrics",
        default=DEFAULT_METRICS_HOST,
    ),
    Option(
        "metrics_port",
        "BRIDGE_METRICS_PORT",
        "port of the bridge's /metrics, 0 for any, -1 for none",
        "int",
        DEFAULT_METRICS_PORT,
    ),
    DHT_OPTIONS.replacing(
        DHT_OPTIONS["bootstrap"].with_help(
            "a DHT peer to join through, and to retry when cut off; repeatable"
        )
    ),
    REGISTRY_OPTIONS,
    TUNNEL_OPTIONS,
)


@dataclass(frozen=True)
class BridgeConfig:
    """Everything `rma bridge` needs, read once from options and `RMA_*` variables."""

    registry: RegistrySettings = field(default_factory=RegistrySettings)
    dht: DHTSettings = field(default_factory=DHTSettings)
    policy: TunnelPolicy = field(default_factory=TunnelPolicy)
    bootstrap: tuple[tuple[str, int], ...] = ()
    journal: Path = field(default_factory=lambda: state_dir(os.environ) / JOURNAL_NAME)
    journal_max_bytes: int = DEFAULT_MAX_BYTES
    state_file: Path | None = None
    services: tuple[str, ...] = ()
    sync_interval: float = DEFAULT_SYNC_INTERVAL
    probe_interval: float = DEFAULT_PROBE_INTERVAL
    stale_share: float = DEFAULT_STALE_SHARE
    metrics_host: str = DEFAULT_METRICS_HOST
    metrics_port: int | None = DEFAULT_METRICS_PORT

    @classmethod
    def build(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> BridgeConfig:
        """Options win over variables, variables over defaults (see `BRIDGE_OPTIONS`)."""
        environ = os.environ if environ is None else environ
        values = BRIDGE_OPTIONS.resolve(args, environ)
        state = values["state_file"]
        metrics_port = values["metrics_port"]
        config = cls(
            registry=RegistrySettings.from_values(values),
            dht=DHTSettings.from_values(values),
            policy=tunnel_policy(values),
            bootstrap=values["bootstrap"],
            journal=Path(values["journal"] or state_dir(environ) / JOURNAL_NAME),
            journal_max_bytes=values["journal_max_bytes"],
            state_file=Path(state) if state else None,
            services=values["service"],
            sync_interval=values["sync_interval"],
            probe_interval=values["probe_interval"],
            stale_share=values["stale_share"],
            metrics_host=values["metrics_host"],
            metrics_port=None if metrics_port < 0 else metrics_port,
        )
        config.check()
        return config

    def check(self) -> None:
        """Refuse settings that cannot work, naming them."""
        bad = [s for s in self.services if not SERVICE_RE.fullmatch(s)]
        if bad:
            raise ConfigError(f"service names must match [a-z0-9-]{{1,32}}: {', '.join(bad)}")
        if self.journal_max_bytes < MIN_MAX_BYTES:
            raise ConfigError(f"RMA_JOURNAL_MAX_BYTES must be at least {MIN_MAX_BYTES}")
        if self.metrics_port is not None and self.metrics_port > 65535:
            raise ConfigError(f"metrics port {self.metrics_port} is not 0..65535")
        try:
            self.settings()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def settings(self) -> BridgeSettings:
        """The bridge's own settings."""
        return BridgeSettings(
            sync_interval=self.sync_interval,
            probe_interval=self.probe_interval,
            stale_share=self.stale_share,
        )


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rma bridge` (`BRIDGE_OPTIONS`)."""
    BRIDGE_OPTIONS.add_to(parser)


def run(args: argparse.Namespace) -> int:
    """Run the bridge until SIGTERM/SIGINT."""
    config = BridgeConfig.build(args)
    return run_service(lambda stop: serve(config, stop))


async def serve(config: BridgeConfig, stop: asyncio.Event) -> int:
    """Open the registry, the DHT node, the journal and /metrics; sync until `stop`."""
    saved = load_state(config.state_file)
    node_id = bytes.fromhex(saved["node_id"]) if saved else None
    node = DHTNode(config.dht, policy=config.policy, node_id=node_id)
    registry = open_registry(config.registry, policy=config.policy)
    journal = Journal(config.journal, max_bytes=config.journal_max_bytes)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(registry.aclose)
        try:
            await node.listen()
        except OSError as exc:
            logger.error(
                "cannot bind %s: %s", format_hostport(config.dht.host, config.dht.port), exc
            )
            return Exit.START_FAILED
        stack.push_async_callback(node.aclose)
        try:
            await asyncio.to_thread(journal.open)
        except OSError as exc:
            logger.error("cannot open the journal %s: %s", config.journal, exc)
            return Exit.START_FAILED
        stack.callback(journal.close)
        if saved:
            node.restore_levels(saved.get("levels"))
        remembered = [(str(h), int(p)) for h, p in (saved or {}).get("neighbors", [])]
        services = list(config.services) + [str(s) for s in (saved or {}).get("services", [])]
        bridge = Bridge(
            node,
            registry,
            journal,
            settings=config.settings(),
            bootstrap=list(config.bootstrap) + remembered,
            services=services,
        )
        metrics = await _start_metrics(config, bridge)
        if metrics is False:
            return Exit.START_FAILED
        if isinstance(metrics, MetricsServer):
            stack.push_async_callback(metrics.aclose)
        if config.state_file is not None:
            # Saved at once too: a path that cannot be written shows now, not at the stop.
            _save_state(config.state_file, node, bridge)
            stack.callback(_save_state, config.state_file, node, bridge)
        where = "off"
        if isinstance(metrics, MetricsServer):
            where = format_hostport(*metrics.address)
        logger.info(
            "bridge ready: DHT node %s on %s, journal %s, metrics %s",
            node.node.id.hex()[:12],
            format_hostport(*node.address),
            config.journal,
            where,
        )
        await bridge.run(stop)
    logger.info("bridge exited cleanly")
    return 0


async def _start_metrics(config: BridgeConfig, bridge: Bridge) -> MetricsServer | bool:
    if config.metrics_port is None:
        return True
    server = MetricsServer(bridge.figures, host=config.metrics_host, port=config.metrics_port)
    try:
        await server.start()
    except OSError as exc:
        where = format_hostport(config.metrics_host, config.metrics_port)
        logger.error("cannot serve /metrics on %s: %s", where, exc)
        return False
    return server


def _save_state(path: Path, node: DHTNode, bridge: Bridge) -> None:
    """The node's state (id, contacts, shard levels) plus the services the bridge polls."""
    if node.transport is not None:
        save_state(path, node, {"services": bridge.services})
