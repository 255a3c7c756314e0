"""`rma demo [--workers N] [--services ocr,gpu] [--port 8080]`: everything on loopback."""

from __future__ import annotations

import argparse
import os

from dht_bridge.errors import ConfigError
from dht_bridge.records import SERVICE_RE
from rma.demo import DemoConfig, run_demo
from rma.process import run_service


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rma demo`."""
    parser.add_argument("--workers", type=int, default=20, help="worker agents to start")
    parser.add_argument("--services", default="ocr,gpu", help="comma-separated services")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("RMA_PORT", "8080")),
        help="the router's HTTP port (RMA_PORT)",
    )
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=30.0,
        help="worker heartbeat interval, seconds (lease: 3x)",
    )


def run(args: argparse.Namespace) -> int:
    """Build the demo's configuration and run it until Ctrl-C or SIGTERM."""
    services = tuple(s.strip() for s in args.services.split(",") if s.strip())
    if not services or not all(SERVICE_RE.fullmatch(s) for s in services):
        raise ConfigError(f"--services {args.services!r}: names must match [a-z0-9-]{{1,32}}")
    if not 1 <= args.workers <= 500:
        raise ConfigError("--workers must be from 1 to 500")
    if args.heartbeat <= 0:
        raise ConfigError("--heartbeat must be > 0")
    config = DemoConfig(
        workers=args.workers,
        services=services,
        port=args.port,
        redis_url=os.environ.get("RMA_REDIS_URL") or None,
        heartbeat=args.heartbeat,
        ttl=args.heartbeat * 3,
    )
    try:
        return run_service(lambda stop: run_demo(config, stop))
    except OSError as exc:
        raise SystemExit(f"rma demo: could not start: {exc}") from None
