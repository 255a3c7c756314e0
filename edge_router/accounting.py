"""Request accounting: every answered request counted by class, status and latency series, and
the failures logged with their CF-Ray; the middleware, and the same for the lookup fast path."""

from __future__ import annotations

import logging
import time

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dht_bridge.logcontext import log_fields_bound
from edge_router.errors import BROKEN_OFF, AnswerBroken
from edge_router.metrics import ROUTED_SERVICE, Metrics, request_class, route_label

logger = logging.getLogger(__name__)

__all__ = ["CLIENT_CLOSED", "Accounting", "answered", "cf_ray"]

# nginx's status for a client that closed the connection before the answer: counted, never sent.
CLIENT_CLOSED = 499


class Accounting:
    """Counts every answered request by class and status, and logs CF-Ray with failures.

    A client that hangs up before its answer (ClientDisconnect, raised wherever its body is
    read) is counted as 499 and logged at debug: it is not a server error. An answer its
    provider broke off (BROKEN_OFF in the scope) is counted as 502, and AnswerBroken raised
    here, outside Starlette's exception handlers (they cannot take one after the answer began),
    makes the server abort the client's connection.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        cache: str | None = None
        started = time.perf_counter()

        async def send_counted(message: Message) -> None:
            nonlocal status, cache
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-cache":
                        cache = value.decode("latin-1")
            await send(message)

        ray = cf_ray(scope)
        try:
            if ray is None:
                await self.app(scope, receive, send_counted)
            else:
                # Every line logged while serving it carries the request's CF-Ray (JSON logs).
                with log_fields_bound(cf_ray=ray):
                    await self.app(scope, receive, send_counted)
            broken = scope.get(BROKEN_OFF)
            if broken is not None:
                status = 502
                raise AnswerBroken(broken)
        except ClientDisconnect:
            status = CLIENT_CLOSED
            logger.debug("%s %s: the client hung up first", scope["method"], scope["path"])
        finally:
            answered(self.metrics, scope, status, time.perf_counter() - started, cache, ray)


def answered(
    metrics: Metrics, scope: Scope, status: int, seconds: float, cache: str | None, ray: str | None
) -> None:
    """Count one answered request (`cache`: its X-Cache, if any); a failure is logged."""
    path = scope["path"]
    klass = request_class(path)
    routed = scope.get("state", {}).get(ROUTED_SERVICE)
    metrics.count(klass, status, seconds, route_label(klass, cache, routed))
    if status >= 500:
        logger.warning("%s %s -> %d (cf-ray %s)", scope["method"], path, status, ray or "-")


def cf_ray(scope: Scope) -> str | None:
    """The request's CF-Ray header (at most 64 characters), if it has one."""
    for name, value in scope.get("headers") or ():
        if name == b"cf-ray":
            return str(value.decode("latin-1"))[:64]
    return None
