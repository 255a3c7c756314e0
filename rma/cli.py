"""The `rma` command: one parser, one subcommand per process (see `rma.commands`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from dht_bridge.errors import ConfigError
from rma.commands import bridge, demo, flush, node, router, worker
from rma.exits import Exit

SUBCOMMANDS: dict[str, tuple[ModuleType, str]] = {
    "router": (router, "run the edge router (HTTP API, cache, proxy)"),
    "bridge": (bridge, "run a bridge: a coordinator DHT node synced with Redis"),
    "worker": (worker, "run a worker agent"),
    "demo": (demo, "run everything on loopback, no Redis needed"),
    "flush": (flush, "flush the routers' lookup caches"),
    "node": (node, "run a plain DHT node (a bootstrap or storage node)"),
}

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    """The full `rma` parser."""
    parser = argparse.ArgumentParser(
        prog="rma",
        description="RMA discovery: service discovery and routing for a volunteer compute network.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("RMA_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="logging level (RMA_LOG_LEVEL)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        # Each option's help names its variable and real default itself: argparse's own
        # defaults are None, so that an unset option falls through to RMA_* in the config.
        sub = subparsers.add_parser(name, help=help_text)
        module.configure(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rma` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        parser.exit(Exit.USAGE, f"rma {args.command}: configuration error: {exc}\n")
    except KeyboardInterrupt:
        return Exit.OK
    return code


if __name__ == "__main__":
    raise SystemExit(main())
