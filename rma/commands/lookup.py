"""`rma lookup SERVICE`: ask a router which workers offer a service, as a client would."""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from dht_bridge.errors import ConfigError
from dht_bridge.options import Option, OptionTable
from dht_bridge.records import SERVICE_RE
from rma.client import ROUTER_URL, TIMEOUT, RequestFailed, request, router_url
from rma.exits import Exit

logger = logging.getLogger(__name__)

LOOKUP_OPTIONS = OptionTable(
    Option("limit", None, "providers at most", "int", 10),
    Option("region", None, "prefer providers in this region (others follow)", shown="any"),
    Option("json", None, "print the router's JSON answer as it is", "bool", False),
    ROUTER_URL,
    TIMEOUT,
)


def configure(parser: argparse.ArgumentParser) -> None:
    """`rma lookup SERVICE` and its options (`LOOKUP_OPTIONS`)."""
    parser.add_argument("service", help="the service to look up, e.g. ocr")
    LOOKUP_OPTIONS.add_to(parser)


def run(args: argparse.Namespace) -> int:
    """GET /services/SERVICE and print the providers; exit 1 when there are none."""
    values = LOOKUP_OPTIONS.resolve(args)
    if not SERVICE_RE.fullmatch(args.service):
        raise ConfigError(f"service {args.service!r} does not match [a-z0-9-]{{1,32}}")
    params: dict[str, Any] = {"limit": values["limit"]}
    if values["region"]:
        params["region"] = values["region"]
    url = f"{router_url(values['router'])}/services/{args.service}"
    try:
        answer = request("GET", url, timeout=values["timeout"], params=params)
        providers = providers_of(url, answer)
    except RequestFailed as exc:
        logger.error("lookup failed: %s", exc)
        return Exit.FAILURE
    if values["json"]:
        print(json.dumps(answer, indent=2))
    else:
        print(_table(args.service, answer.get("source", "?"), providers))
    return Exit.OK if providers else Exit.FAILURE


def providers_of(url: str, answer: Any) -> list[dict[str, Any]]:
    """The providers of a lookup answer; RequestFailed when it is not one (a URL that names
    some other service, say)."""
    listed = answer.get("providers") if isinstance(answer, dict) else None
    if not (isinstance(listed, list) and all(isinstance(p, dict) for p in listed)):
        raise RequestFailed(f"{url} answered JSON that is not a lookup answer")
    for p in listed:
        if not all(isinstance(p.get(k, 0), int | float) for k in ("load", "expires_at")):
            raise RequestFailed(f"{url} answered a provider with a non-numeric load or lease")
    return listed


def _table(service: str, source: str, providers: list[dict[str, Any]]) -> str:
    if not providers:
        return f"no live providers of {service!r} (source: {source})"
    now = time.time()
    rows = [("worker", "load", "region", "lease", "tunnel")]
    for p in providers:
        left = float(p.get("expires_at", now)) - now
        rows.append(
            (
                str(p.get("worker_id", ""))[:12],
                f"{float(p.get('load', 0)):.2f}",
                str(p.get("region") or "-"),
                f"{max(left, 0):.0f}s",
                str(p.get("tunnel_url", "")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    # Every column padded but the last (the tunnel URL), which is shown whole.
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in rows
    ]
    return "\n".join([*lines, f"{len(providers)} provider(s) of {service!r} (source: {source})"])
