"""`rma worker` (and `python -m rma worker`): run a worker agent until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging

from dht_bridge.errors import IdentityError
from rma.exits import Exit
from rma.logs import LOG_LEVELS
from rma.process import run_service
from worker.agent import WorkerAgent
from worker.config import WORKER_OPTIONS, WorkerConfig
from worker.errors import StartError

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rma worker` (`WORKER_OPTIONS`), and `--log-level` after the subcommand."""
    WORKER_OPTIONS.add_to(parser)
    # Its own dest: `rma --log-level` is parsed by the parent, whose value a subparser
    # default would otherwise overwrite.
    parser.add_argument(
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
