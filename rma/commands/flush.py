"""`rma flush [--service S]`: ask a router to flush its caches; it tells every replica."""

from __future__ import annotations

import argparse
import logging

from dht_bridge.errors import ConfigError
from dht_bridge.options import Option, OptionTable
from edge_router.config import ADMIN_TOKEN
from rma.client import ROUTER_URL, TIMEOUT, RequestFailed, request, router_url
from rma.exits import Exit

logger = logging.getLogger(__name__)

FLUSH_OPTIONS = OptionTable(
    Option("service", None, "flush one service only", shown="everything"),
    ROUTER_URL,
    TIMEOUT,
    ADMIN_TOKEN,
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rma flush` (`FLUSH_OPTIONS`)."""
    FLUSH_OPTIONS.add_to(parser)


def run(args: argparse.Namespace) -> int:
    """POST /admin/cache/flush with the admin bearer token; say what was flushed."""
    values = FLUSH_OPTIONS.resolve(args)
    token = values["admin_token"]
    if not token:
        raise ConfigError(f"no admin token: set {ADMIN_TOKEN.variable} (or --admin-token)")
    url = router_url(values["router"]) + "/admin/cache/flush"
    service = values["service"]
    try:
        answer = request(
            "POST",
            url,
            timeout=values["timeout"],
            json={"service": service} if service else {},
            headers={"Authorization": f"Bearer {token}"},
        )
    except RequestFailed as exc:
        logger.error("flush failed: %s", exc)
        return Exit.FAILURE
    if not isinstance(answer, dict):
        logger.error("flush failed: %s answered JSON that is not a flush answer", url)
        return Exit.FAILURE
    told = "yes" if answer.get("propagated") else "no (events channel unavailable)"
    print(
        f"flushed {answer.get('flushed', 0)} cached lookups "
        f"({'service ' + service if service else 'all services'}) on {values['router']}; "
        f"other routers told: {told}"
    )
    return Exit.OK
