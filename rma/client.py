"""What the client subcommands (`rma flush`, `rma lookup`) share: the router's URL and one
request with clear failures."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from dht_bridge.errors import ConfigError, RMAError
from dht_bridge.jsontext import loads_bounded
from dht_bridge.options import Option

__all__ = ["ROUTER_URL", "TIMEOUT", "RequestFailed", "request", "router_url"]

ROUTER_URL = Option(
    "router",
    "ROUTER_URL",
    "the router's (or the edge's) base URL",
    default="http://127.0.0.1:8080",
    metavar="URL",
)
TIMEOUT = Option("timeout", None, "seconds to wait for the answer", "float", 10.0)
MAX_ANSWER_DEPTH = 16  # a lookup answer nests 4 levels


class RequestFailed(RMAError):
    """The router could not be reached, or answered with an error."""


def router_url(text: str) -> str:
    """The base URL without a trailing slash; ConfigError when it is not http(s)://host."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--router ({ROUTER_URL.variable}) {text!r} is not an http(s) URL")
    return text.rstrip("/")


def request(method: str, url: str, *, timeout: float, **kwargs: Any) -> Any:
    """The JSON answer of one request; RequestFailed says why there is none, ConfigError
    that `timeout` leaves it no time."""
    if timeout <= 0:
        raise ConfigError(f"--timeout must be > 0 seconds, not {timeout:g}")
    try:
        response = httpx.request(method, url, timeout=timeout, **kwargs)
    except httpx.HTTPError as exc:
        raise RequestFailed(f"{url}: {exc or type(exc).__name__}") from exc
    try:
        answer = loads_bounded(response.content, max_depth=MAX_ANSWER_DEPTH)
    except ValueError:  # not JSON, or nested past any answer of ours
        answer = None
    if response.status_code != 200:
        detail = answer.get("detail") if isinstance(answer, dict) else response.text[:200]
        raise RequestFailed(f"{url} answered {response.status_code}: {detail}")
    if answer is None:
        raise RequestFailed(f"{url} answered 200 without JSON")
    return answer
