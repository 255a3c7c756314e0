"""`rma demo [--workers N] [--services ocr,gpu] [--port 8080]`: everything on loopback."""

from __future__ import annotations

import argparse

from dht_bridge.errors import ConfigError
from dht_bridge.options import Option, OptionTable
from dht_bridge.records import SERVICE_RE
from dht_bridge.settings import REGISTRY_OPTIONS
from edge_router.config import HTTP_PORT
from rma.demo import DemoConfig, run_demo
from rma.process import run_service

MAX_WORKERS = 500
MIN_HEARTBEAT = 1.0

DEMO_OPTIONS = OptionTable(
    Option("workers", "DEMO_WORKERS", f"worker agents to start, 1 to {MAX_WORKERS}", "int", 20),
    Option("services", "DEMO_SERVICES", "services the workers offer", "list", ("ocr", "gpu")),
    HTTP_PORT,
    Option(
        "heartbeat",
        "DEMO_HEARTBEAT",
        f"worker heartbeat interval, seconds, at least {MIN_HEARTBEAT:g} (lease: 3 times it)",
        "float",
        30.0,
    ),
    REGISTRY_OPTIONS["redis_url"],
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rma demo` (`DEMO_OPTIONS`)."""
    DEMO_OPTIONS.add_to(parser)


def run(args: argparse.Namespace) -> int:
    """Build the demo's configuration and run it until Ctrl-C or SIGTERM."""
    values = DEMO_OPTIONS.resolve(args)
    services: tuple[str, ...] = values["services"]
    if not services or not all(SERVICE_RE.fullmatch(s) for s in services):
        raise ConfigError(f"--services {services!r}: names must match [a-z0-9-]{{1,32}}")
    if not 1 <= values["workers"] <= MAX_WORKERS:
        raise ConfigError(f"--workers must be from 1 to {MAX_WORKERS}")
    if values["heartbeat"] < MIN_HEARTBEAT:
        # Below a second, the demo's workers flood its one process with heartbeats.
        raise ConfigError(f"--heartbeat must be at least {MIN_HEARTBEAT:g} s")
    if not 0 <= values["port"] <= 65535:
        raise ConfigError(f"--port {values['port']} is not 0..65535")
    config = DemoConfig(
        workers=values["workers"],
        services=services,
        port=values["port"],
        redis_url=values["redis_url"],
        heartbeat=values["heartbeat"],
        ttl=values["heartbeat"] * 3,
    )
    try:
        return run_service(lambda stop: run_demo(config, stop))
    except OSError as exc:
        raise SystemExit(f"rma demo: could not start: {exc}") from None
