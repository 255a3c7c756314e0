"""`rma worker` (and `python -m rma worker`): run a worker agent until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging

from dht_bridge.errors import IdentityError
from rma.exits import Exit
from rma.process import run_service
from worker.agent import WorkerAgent
from worker.config import (
    DEFAULT_DISCOVERY_DEADLINE,
    DEFAULT_EDGE_TIMEOUT,
    DEFAULT_FALLBACK_HEARTBEAT,
    DEFAULT_FALLBACK_TTL,
    DEFAULT_HEARTBEAT,
    DEFAULT_JITTER,
    DEFAULT_LEAVE_TIMEOUT,
    DEFAULT_REACH_INTERVAL,
    DEFAULT_RETRY_BASE,
    DEFAULT_RETRY_CAP,
    DEFAULT_TTL,
    DHT_MODES,
    WorkerConfig,
)
from worker.errors import StartError

logger = logging.getLogger(__name__)

LOG_LEVELS = ["debug", "info", "warning", "error"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rma worker`; each also has an RMA_* variable (options win)."""
    add = parser.add_argument
    add(
        "--service",
        action="append",
        metavar="NAME",
        help="a service offered; repeatable (RMA_SERVICES, comma-separated)",
    )
    add("--tunnel-url", help="this worker's Cloudflare Tunnel URL (RMA_TUNNEL_URL)")
    add("--edge", metavar="URL", help="the edge router's base URL (RMA_EDGE_URL)")
    add("--region", help="region label, [a-z0-9-] (RMA_REGION)")
    add(
        "--capability",
        action="append",
        metavar="KEY=VALUE",
        help="a capability; repeatable (RMA_CAPABILITIES, comma-separated)",
    )
    add(
        "--key-file",
        help="Ed25519 key, created (0600) only if absent (RMA_KEY_FILE; default: the one "
        "the state file names, else beside the state file)",
    )
    add(
        "--state-file",
        help="JSON state: key path, seq, peers (RMA_STATE_FILE; "
        "default $XDG_STATE_HOME/rma/worker.json)",
    )
    add("--dht-host", help="UDP address to bind (RMA_DHT_HOST, default 0.0.0.0)")
    add("--dht-port", type=int, help="UDP port, 0 for any (RMA_DHT_PORT, default 0)")
    add(
        "--dht-advertise",
        metavar="auto|none|HOST[:PORT]",
        help="the DHT address the record hands out in server mode (RMA_DHT_ADVERTISE, default "
        "auto: the address servers see us at); none: always client mode",
    )
    add(
        "--dht-mode",
        choices=DHT_MODES,
        help="server: a full DHT node others contact; client: behind NAT, looks up and "
        "publishes through servers only; auto: a reachability check decides, again every "
        "--reach-interval (RMA_DHT_MODE, default auto)",
    )
    add(
        "--bootstrap",
        action="append",
        metavar="HOST:PORT",
        help="a DHT peer to try before asking the edge; repeatable (RMA_BOOTSTRAP)",
    )
    seconds: list[tuple[str, str, str, float]] = [
        ("--heartbeat", "HEARTBEAT", "seconds between DHT heartbeats", DEFAULT_HEARTBEAT),
        ("--ttl", "TTL", "record lease, seconds", DEFAULT_TTL),
        ("--jitter", "HEARTBEAT_JITTER", "heartbeat jitter, part of the interval", DEFAULT_JITTER),
        (
            "--discovery-deadline",
            "DISCOVERY_DEADLINE",
            "seconds the DHT has to answer a lookup before the edge is asked",
            DEFAULT_DISCOVERY_DEADLINE,
        ),
        (
            "--fallback-heartbeat",
            "FALLBACK_HEARTBEAT",
            "seconds between heartbeats through the edge while off the DHT",
            DEFAULT_FALLBACK_HEARTBEAT,
        ),
        (
            "--fallback-ttl",
            "FALLBACK_TTL",
            "lease of records registered through the edge",
            DEFAULT_FALLBACK_TTL,
        ),
        ("--retry-base", "RETRY_BASE", "first retry delay, seconds", DEFAULT_RETRY_BASE),
        ("--retry-cap", "RETRY_CAP", "longest retry delay, seconds", DEFAULT_RETRY_CAP),
        (
            "--leave-timeout",
            "LEAVE_TIMEOUT",
            "seconds allowed for the tombstone on stop",
            DEFAULT_LEAVE_TIMEOUT,
        ),
        ("--edge-timeout", "EDGE_TIMEOUT", "seconds per edge request", DEFAULT_EDGE_TIMEOUT),
        (
            "--reach-interval",
            "DHT_REACH_INTERVAL",
            "seconds between reachability checks in auto mode",
            DEFAULT_REACH_INTERVAL,
        ),
    ]
    for option, variable, text, default in seconds:
        add(option, type=float, help=f"{text} (RMA_{variable}, default {default:g})")
    add("--load", type=float, help="fixed load 0..1, or the --load-url fallback (RMA_LOAD)")
    add(
        "--load-url",
        help='our own service\'s URL answering {"load": x} or {"in_flight": n} (RMA_LOAD_URL)',
    )
    add("--capacity", type=int, help="in-flight requests meaning full load (RMA_CAPACITY)")
    add(
        "--edge-only",
        action="store_true",
        default=None,
        help="never use the DHT: register and heartbeat through the edge (RMA_EDGE_ONLY)",
    )
    # Its own dest: `rma --log-level` is parsed by the parent, whose value a subparser
    # default would otherwise overwrite.
    add(
        "--log-level",
        dest="worker_log_level",
        choices=LOG_LEVELS,
        help="logging level (also `rma --log-level`, RMA_LOG_LEVEL)",
    )


def run(args: argparse.Namespace) -> int:
    """Build the configuration and run the agent until SIGTERM/SIGINT."""
    if args.worker_log_level:
        logging.getLogger().setLevel(args.worker_log_level.upper())
    config = WorkerConfig.build(args)
    return run_service(lambda stop: serve(config, stop))


async def serve(config: WorkerConfig, stop: asyncio.Event) -> int:
    """Run one agent until `stop`; exit code 3 when it cannot start."""
    agent = WorkerAgent(config)
    try:
        await agent.run(stop)
    except (StartError, IdentityError) as exc:
        logger.error("worker failed to start: %s", exc)
        return Exit.START_FAILED
    return 0
