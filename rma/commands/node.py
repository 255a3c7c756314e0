"""`rma node`: a plain DHT node, for a bootstrap or storage node that is not a bridge."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import BootstrapError, ConfigError
from dht_bridge.options import Option, OptionTable, format_hostport
from dht_bridge.settings import DHT_OPTIONS, TUNNEL_OPTIONS, DHTSettings, tunnel_policy
from dht_bridge.tunnels import TunnelPolicy
from rma.exits import Exit
from rma.process import run_service

logger = logging.getLogger(__name__)

STATE_SAVE_INTERVAL = 60.0


@dataclass(frozen=True)
class NodeConfig:
    """Everything `rma node` needs, read once from options and `RMA_*` variables."""

    dht: DHTSettings
    policy: TunnelPolicy
    bootstrap: tuple[tuple[str, int], ...]
    state_file: Path | None

    @classmethod
    def build(
        cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None
    ) -> NodeConfig:
        """Options win over variables, variables over defaults (see `NODE_OPTIONS`)."""
        values = NODE_OPTIONS.resolve(args, environ)
        state = values["state_file"]
        dht = DHTSettings.from_values(values)
        return cls(dht, tunnel_policy(values), values["bootstrap"], Path(state) if state else None)


NODE_OPTIONS = OptionTable(
    DHT_OPTIONS.replacing(
        DHT_OPTIONS["dht_host"].with_flag("--host"), DHT_OPTIONS["dht_port"].with_flag("--port")
    ),
    Option("state_file", "STATE_FILE", "JSON file for id and contacts", metavar="PATH"),
    TUNNEL_OPTIONS,
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rma node` (`NODE_OPTIONS`)."""
    NODE_OPTIONS.add_to(parser)


def run(args: argparse.Namespace) -> int:
    """Run a node until SIGTERM/SIGINT."""
    config = NodeConfig.build(args)
    return run_service(lambda stop: serve(config, stop))


async def serve(config: NodeConfig, stop: asyncio.Event) -> int:
    """Listen, join, save state now and then, and close on `stop`."""
    saved = load_state(config.state_file)
    node_id = bytes.fromhex(saved["node_id"]) if saved else None
    node = DHTNode(config.dht, policy=config.policy, node_id=node_id)
    try:
        await node.listen()
    except OSError as exc:
        logger.error("cannot bind %s: %s", format_hostport(config.dht.host, config.dht.port), exc)
        return Exit.START_FAILED
    try:
        known = [(str(h), int(p)) for h, p in (saved or {}).get("neighbors", [])]
        peers = list(config.bootstrap) + known
        if peers:
            try:
                await node.bootstrap(peers)
            except BootstrapError as exc:
                logger.warning("%s; serving alone until peers contact us", exc)
        logger.info("node %s ready on %s", node.node.id.hex(), format_hostport(*node.address))
        while not stop.is_set():
            if config.state_file is not None:
                save_state(config.state_file, node)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATE_SAVE_INTERVAL)
    finally:
        if config.state_file is not None and node.transport is not None:
            save_state(config.state_file, node)
        await node.aclose()
        logger.info("node stopped")
    return 0


def save_state(path: Path, node: DHTNode, extra: Mapping[str, Any] | None = None) -> bool:
    """`node.save_state` for `rma node` and `rma bridge`: False, and a warning, when the file
    cannot be written; the node runs on without it."""
    try:
        node.save_state(path, extra)
    except OSError as exc:
        logger.warning(
            "cannot save the state file %s (%s): this node's id and contacts will not survive "
            "a restart",
            path,
            exc.strerror or exc,
        )
        return False
    return True


def load_state(path: Path | None) -> dict[str, Any] | None:
    """A node's saved JSON state (`rma node` and `rma bridge`), None without one; a file that
    cannot be read or parsed is a configuration error, never silently replaced."""
    if path is None or not path.exists():
        return None
    try:
        return DHTNode.read_state(path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"state file {path}: {exc}") from None
