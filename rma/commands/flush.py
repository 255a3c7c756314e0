"""`rma flush [--service S]`: ask a router to flush its caches; it tells every replica."""

from __future__ import annotations

import argparse
import logging
import os

import httpx

from dht_bridge.errors import ConfigError
from rma.exits import Exit

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rma flush`."""
    parser.add_argument("--service", help="flush one service only (default: everything)")
    parser.add_argument(
        "--router",
        default=os.environ.get("RMA_ROUTER_URL", "http://127.0.0.1:8080"),
        help="router (or edge) base URL (RMA_ROUTER_URL)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait")


def run(args: argparse.Namespace) -> int:
    """POST /admin/cache/flush with the bearer token from RMA_ADMIN_TOKEN."""
    token = os.environ.get("RMA_ADMIN_TOKEN")
    if not token:
        raise ConfigError("RMA_ADMIN_TOKEN is not set")
    body = {"service": args.service} if args.service else {}
    url = args.router.rstrip("/") + "/admin/cache/flush"
    try:
        response = httpx.post(
            url, json=body, timeout=args.timeout, headers={"Authorization": f"Bearer {token}"}
        )
    except httpx.HTTPError as exc:
        logger.error("flush failed: %s: %s", url, exc)
        return Exit.FAILURE
    if response.status_code != 200:
        logger.error("flush refused: %s %s", response.status_code, response.text)
        return Exit.FAILURE
    answer = response.json()
    logger.info(
        "flushed %s entries (%s); other routers told: %s",
        answer.get("flushed"),
        answer.get("service") or "all",
        answer.get("propagated"),
    )
    return 0
