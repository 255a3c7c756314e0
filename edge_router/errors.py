"""The router's errors, and the one place where every error becomes an HTTP status and JSON body."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dht_bridge.errors import (
    ConfigError,
    DHTError,
    IdentityError,
    JSONTooDeep,
    RecordError,
    RecordTooLarge,
    RegistryError,
    RMAError,
)

logger = logging.getLogger(__name__)


class RouterError(RMAError):
    """Base of the router's own errors; `status` and `code` say how it is answered."""

    status = 500
    code = "internal"


class BadRequest(RouterError):
    """Malformed input (bad JSON, bad parameter)."""

    status, code = 400, "bad_request"


class Unauthorized(RouterError):
    """No credentials where they are required."""

    status, code = 401, "unauthorized"


class Forbidden(RouterError):
    """Credentials that are wrong."""

    status, code = 403, "forbidden"


class PayloadTooLarge(RouterError):
    """A request body over the configured limit."""

    status, code = 413, "too_large"


class RateLimited(RouterError):
    """A client over its rate limit (edge_router/ratelimit.py adds Retry-After)."""

    status, code = 429, "rate_limited"


class NoProvider(RouterError):
    """No healthy provider of the service could be found or reached."""

    status, code = 503, "no_provider"


class BackendUnavailable(RouterError):
    """Neither Redis nor the DHT answered, and no cached answer was left."""

    status, code = 503, "unavailable"


class UpstreamUnavailable(RouterError):
    """Every provider tried failed to connect or broke the exchange."""

    status, code = 502, "bad_gateway"


class AnswerBroken(RouterError):
    """A provider broke off an answer the client had begun to receive: too late for a status,
    its connection is aborted (raised by edge_router.accounting once the app has returned)."""

    status, code = 502, "bad_gateway"


# The scope key where a response notes that its provider broke it off (why, as text).
BROKEN_OFF = "rma.broken_off"


class UpstreamTimeout(RouterError):
    """The provider did not answer in time."""

    status, code = 504, "gateway_timeout"


# Errors of dht_bridge, most specific first. Every one is mapped here (a test walks them all):
# a client is told which side failed, never "internal" for an error we raise on purpose.
_CORE_ERRORS: tuple[tuple[type[RMAError], int, str], ...] = (
    (RecordTooLarge, 413, "too_large"),
    (JSONTooDeep, 400, "bad_request"),
    (RecordError, 422, "invalid_record"),
    (RegistryError, 503, "registry_unavailable"),
    (DHTError, 503, "dht_unavailable"),
    # The router's own key file or settings: it cannot serve this now, the client did no wrong.
    (IdentityError, 503, "misconfigured"),
    (ConfigError, 503, "misconfigured"),
)


def status_for(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and error code an exception is answered with."""
    if isinstance(exc, RouterError):
        return exc.status, exc.code
    if isinstance(exc, HTTPException):
        return exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error")
    for kind, status, code in _CORE_ERRORS:
        if isinstance(exc, kind):
            return status, code
    return 500, "internal"


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 400: "bad_request"}


def error_response(exc: BaseException, *, headers: dict[str, str] | None = None) -> JSONResponse:
    """`{"error": code, "detail": text}` with the mapped status."""
    status, code = status_for(exc)
    detail = exc.detail if isinstance(exc, HTTPException) else str(exc)
    if status == 500:
        detail = "internal error"  # an unmapped error: never leak its text to a client
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


async def handle_error(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: every error the app raises ends here."""
    status, _ = status_for(exc)
    if isinstance(exc, AnswerBroken):
        pass  # nothing can be answered any more, and the proxy logged the break
    elif status >= 500 and not isinstance(exc, RMAError | HTTPException):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
    elif status >= 500:
        logger.warning("%s %s: %s", request.method, request.url.path, exc)
    return error_response(exc)
