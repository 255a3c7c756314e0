"""`rma flush [--service S]`: ask a router to flush its caches; it tells every replica."""

from __future__ import annotations

import argparse
import logging

import httpx

from dht_bridge.errors import ConfigError
from dht_bridge.options import Option, OptionTable
from edge_router.config import ADMIN_TOKEN
from rma.exits import Exit

logger = logging.getLogger(__name__)

FLUSH_OPTIONS = OptionTable(
    Option("service", None, "flush one service only", shown="everything"),
    Option(
        "router",
        "ROUTER_URL",
        "the router's (or the edge's) base URL",
        default="http://127.0.0.1:8080",
        metavar="URL",
    ),
    Option("timeout", None, "seconds to wait for the answer", "float", 10.0),
    ADMIN_TOKEN,
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rma flush` (`FLUSH_OPTIONS`)."""
    FLUSH_OPTIONS.add_to(parser)


def run(args: argparse.Namespace) -> int:
    """POST /admin/cache/flush with the admin bearer token."""
    values = FLUSH_OPTIONS.resolve(args)
    token = values["admin_token"]
    if not token:
        raise ConfigError(f"no admin token: set {ADMIN_TOKEN.variable} (or --admin-token)")
    body = {"service": values["service"]} if values["service"] else {}
    url = values["router"].rstrip("/") + "/admin/cache/flush"
    try:
        response = httpx.post(
            url,
            json=body,
            timeout=values["timeout"],
            headers={"Authorization": f"Bearer {token}"},
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
