"""The `rma` command: one parser, one subcommand per process (see `rma.commands`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from types import ModuleType

from dht_bridge.errors import ConfigError
from dht_bridge.options import OptionTable
from dht_bridge.version import __version__
from rma.commands import bridge, demo, flush, lookup, node, router, worker
from rma.exits import Exit
from rma.logs import LOG_LEVEL, LOG_STYLE, configure_logging

SUBCOMMANDS: dict[str, tuple[ModuleType, str]] = {
    "router": (router, "run the edge router (HTTP API, cache, proxy)"),
    "bridge": (bridge, "run a bridge: a coordinator DHT node synced with Redis"),
    "worker": (worker, "run a worker agent"),
    "demo": (demo, "run everything on loopback, no Redis needed"),
    "flush": (flush, "flush the routers' lookup caches"),
    "lookup": (lookup, "ask a router which workers offer a service"),
    "node": (node, "run a plain DHT node (a bootstrap or storage node)"),
}

GLOBAL_OPTIONS = OptionTable(LOG_LEVEL, LOG_STYLE)


def build_parser() -> argparse.ArgumentParser:
    """The full `rma` parser."""
    parser = argparse.ArgumentParser(
        prog="rma",
        description="RMA discovery: service discovery and routing for a volunteer compute network.",
    )
    parser.add_argument("--version", action="version", version=f"rma {__version__}")
    GLOBAL_OPTIONS.add_to(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        # Each option's help names its variable and default (from its `Option`): argparse's
        # own defaults are None, so that an unset option falls through to RMA_*.
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.configure(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rma` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        values = GLOBAL_OPTIONS.resolve(args)
    except ConfigError as exc:
        parser.exit(Exit.USAGE, f"rma: configuration error: {exc}\n")
    configure_logging(values["log_level"], values["log_format"])
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        parser.exit(Exit.USAGE, f"rma {args.command}: configuration error: {exc}\n")
    except KeyboardInterrupt:
        return Exit.OK
    return code


if __name__ == "__main__":
    raise SystemExit(main())
