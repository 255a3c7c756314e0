"""The `rma` command: one parser, one subcommand per process, each living in its own package.

Subcommands are found by module path so that `dht_bridge` never imports `edge_router` or
`worker` at import time; each module provides `configure(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from dht_bridge.errors import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_START_FAILED = 3

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "router": ("edge_router.cli", "run the edge router (HTTP API, cache, proxy)"),
    "bridge": ("dht_bridge.bridge_cli", "run a bridge: a coordinator DHT node synced with Redis"),
    "worker": ("worker.cli", "run a worker agent"),
    "demo": ("edge_router.demo_cli", "run everything on loopback, no Redis needed"),
    "flush": ("edge_router.flush_cli", "flush the routers' lookup caches"),
    "node": ("dht_bridge.node_cli", "run a plain DHT node (a bootstrap or storage node)"),
}

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _load(module_path: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        if exc.name == module_path:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    """The full `rma` parser; subcommands whose module is absent say so when run."""
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
    for name, (module_path, help_text) in SUBCOMMANDS.items():
        # Each option's help names its variable and real default itself: argparse's own
        # defaults are None, so that an unset option falls through to RMA_* in the config.
        sub = subparsers.add_parser(name, help=help_text)
        module = _load(module_path)
        if module is None:
            sub.set_defaults(handler=None, module_path=module_path)
            continue
        module.configure(sub)
        sub.set_defaults(handler=module.run, module_path=module_path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rma` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    if args.handler is None:
        parser.exit(EXIT_USAGE, f"rma {args.command}: not available in this version yet\n")
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        parser.exit(EXIT_USAGE, f"rma {args.command}: configuration error: {exc}\n")
    except KeyboardInterrupt:
        return EXIT_OK
    return code


if __name__ == "__main__":
    raise SystemExit(main())
