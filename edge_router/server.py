"""The router's HTTP/1.1 server protocol: uvicorn's h11 protocol with strict framing, a deadline
for each request head, an idle timeout while a body is read, and a bound on how many slow
connections one client address may hold.

uvicorn alone arms no timer until a first response is complete (measured: a connection sending
nothing, one sending a header byte every 0.5 s, and one stalled mid-body were all still open
after 8 s), and any byte received cancels its keep-alive timer. Pass `protocol_class()` as
`uvicorn.Config(http=...)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from starlette.types import ASGIApp
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol
from uvicorn.server import ServerState

from edge_router.errors import AnswerBroken
from edge_router.framing import StrictConnection

logger = logging.getLogger(__name__)

# Tunables an operator may want as options; constants until the router's options are reworked.
HEAD_TIMEOUT = 10.0  # seconds from connection (or the end of the last response) to a full head
BODY_TIMEOUT = 30.0  # seconds without a body byte while the router is ready to read the body
SLOW_AFTER = 2.0  # seconds after which a connection still without a full head counts as slow
MAX_SLOW_PER_ADDRESS = 8  # slow connections one client address may hold at once
MAX_HEAD_BYTES = 16 * 1024  # request line and headers (h11's max_incomplete_event_size)
REFUSALS_LOG_INTERVAL = 60.0  # seconds between log lines about refused requests, at least
# What uvicorn's protocol warns of, a line a request, about what a client sent: a malformed
# request (its refusal is counted by RefusalLog) and an Upgrade header (ignored: the request
# is served as it is).
CLIENT_CAUSED = frozenset({"Invalid HTTP request received.", "Unsupported upgrade request."})


@dataclass(frozen=True)
class ServerLimits:
    """Per-connection read deadlines and the slow-connection bound of the router's server."""

    head_timeout: float = HEAD_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    slow_after: float = SLOW_AFTER
    max_slow_per_address: int = MAX_SLOW_PER_ADDRESS
    max_head_bytes: int = MAX_HEAD_BYTES


class SlowHeads:
    """How many connections each client address holds whose request head is late."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def count(self, address: str) -> int:
        """Slow connections `address` holds now."""
        return self._counts.get(address, 0)

    def admit(self, address: str) -> bool:
        """Count one more slow connection of `address`; False (not counted) when at the limit."""
        held = self._counts.get(address, 0)
        if held >= self.limit:
            return False
        self._counts[address] = held + 1
        return True

    def release(self, address: str) -> None:
        """One slow connection of `address` completed its head or closed."""
        held = self._counts.get(address, 0) - 1
        if held > 0:
            self._counts[address] = held
        else:
            self._counts.pop(address, None)


class Deadline:
    """A deadline that is cheap to move: `set` and `clear` only write a time, and the one loop
    timer behind it, when it fires before the time (moved later since), arms again for what
    is left. A keep-alive connection moves its deadlines on every request, and a streamed body
    on every read: a `call_later` and a `cancel` each time were 7% of the router's CPU on its
    hottest path (py-spy, `router_bench.py --paths hit`), most of it in the timer heap."""

    def __init__(self, expired: Callable[[], None]) -> None:
        self._expired = expired
        self._at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> bool:
        """Is a deadline set?"""
        return self._at is not None

    def set(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        """Expire `delay` seconds from now (instead of whenever it was set for)."""
        self._at = loop.time() + delay
        if self._timer is not None and self._timer.when() > self._at:
            self._timer.cancel()  # armed for later than the new time: arm again
            self._timer = None
        if self._timer is None:
            self._timer = loop.call_at(self._at, self._fire, loop)

    def clear(self) -> None:
        """No deadline (the timer, if armed, finds nothing to do)."""
        self._at = None

    def cancel(self) -> None:
        """No deadline, and no timer left in the loop (the connection is gone)."""
        self._at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._at is None:
            return
        if loop.time() < self._at:
            self._timer = loop.call_at(self._at, self._fire, loop)
            return
        self._at = None
        self._expired()


class RefusalLog:
    """Requests the server refused before the app (malformed, too large, too slow), counted and
    logged at most once an interval: a line for each would let any client write the
    operator's log as fast as it can send junk."""

    def __init__(
        self,
        interval: float = REFUSALS_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.total = 0
        self._unlogged = 0
        self._next_line = float("-inf")

    def note(self, status: int, detail: str, client: tuple[str, int] | None) -> None:
        """Count one refusal; log it with those since the last line, when a line is due."""
        self.total += 1
        self._unlogged += 1
        now = self.clock()
        if now < self._next_line:
            logger.debug("%s: refused with %d: %s", client, status, detail)
            return
        logger.warning(
            "refused %d request(s) before the app since the last such line (%d in all); "
            "the latest with %d from %s: %s",
            self._unlogged,
            self.total,
            status,
            client[0] if client else "?",
            detail,
        )
        self._unlogged = 0
        self._next_line = now + self.interval


class _ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """uvicorn.error as uvicorn's protocol uses it, with its warnings about what a client sent
    (`CLIENT_CAUSED`) at debug: any client could otherwise write a line a request."""

    @property
    def level(self) -> int:
        """The logger's own level (uvicorn compares it with its TRACE level)."""
        return int(self.logger.level)

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Client-caused warnings at debug, the others as they were."""
        if msg in CLIENT_CAUSED:
            self.logger.debug(msg, *args, **kwargs)
        else:
            self.logger.warning(msg, *args, **kwargs)

    def error(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """An answer a worker broke off (AnswerBroken: how the app aborts the connection, logged
        where it happened) at debug without a traceback: a worker could otherwise write one a
        request. The others as they were."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, AnswerBroken):
            self.logger.debug("connection aborted: %s", exc)
        else:
            self.logger.error(msg, *args, **kwargs)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with strict framing, read deadlines and the slow-connection bound.

    Use a subclass from `protocol_class`, which gives it its limits and one shared `SlowHeads`.
    """

    limits: ClassVar[ServerLimits]
    slow_heads: ClassVar[SlowHeads]
    refusals: ClassVar[RefusalLog]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn types it a Logger; its protocol calls only what an adapter has as well.
        self.logger = _ProtocolLog(self.logger, {})  # type: ignore[assignment]
        self.conn: StrictConnection = StrictConnection(
            config.h11_max_incomplete_event_size or self.limits.max_head_bytes
        )
        self._head = Deadline(self._head_late)
        self._slow = Deadline(self._head_slow)
        self._body = Deadline(self._body_late)
        self._slow_address: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the first head's deadline with the connection."""
        super().connection_made(transport)
        self._follow_state()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the timers and give back the slow-connection count."""
        self._stop_head_timers()
        for deadline in (self._head, self._slow, self._body):
            deadline.cancel()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        """uvicorn's event loop over h11, then the timers that fit the client's new state."""
        super().handle_events()
        if not self.transport.is_closing():
            self._follow_state()

    def send_400_response(self, msg: str) -> None:
        """Refuse a malformed, ambiguous or oversized request, saying why, and close the
        connection."""
        if self.conn.refused_status == 431:
            self._answer_and_close(431, "head_too_large", self.conn.refused or msg)
        else:
            self._answer_and_close(400, "bad_request", self.conn.refused or msg)

    def _follow_state(self) -> None:
        state = self.conn.their_state
        if state is h11.IDLE:
            if not self._head.pending:
                self._head.set(self.loop, self.limits.head_timeout)
                self._slow.set(self.loop, self.limits.slow_after)
        else:
            self._stop_head_timers()
        if state is h11.SEND_BODY:
            # Every call follows received data: each read restarts the idle timeout.
            self._body.set(self.loop, self.limits.body_timeout)
        else:
            self._body.clear()

    def _head_late(self) -> None:
        if self.transport.is_closing():
            return
        buffered, _ = self.conn.trailing_data
        if not buffered:  # an idle connection: closed as a keep-alive timeout would close it
            self.transport.close()
            return
        logger.debug("%s: request head late (%g s)", self.client, self.limits.head_timeout)
        self._answer_and_close(
            408,
            "request_timeout",
            f"request head not complete within {self.limits.head_timeout:g} s",
        )

    def _head_slow(self) -> None:
        if self.transport.is_closing():
            return
        address = self.client[0] if self.client else ""
        if self.slow_heads.admit(address):
            self._slow_address = address
            return
        buffered, _ = self.conn.trailing_data
        if not buffered:
            # Idle, not slow: a kept-alive or preconnected socket (a browser opens several)
            # that has sent nothing. Closed as a keep-alive timeout closes it, without a 408 a
            # client could read as the answer to the request it is about to send.
            self.transport.close()
            return
        logger.debug("%s: too many slow connections from this address", self.client)
        self._answer_and_close(
            408, "request_timeout", "too many connections from this address are slow to send"
        )

    def _body_late(self) -> None:
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.flow.read_paused:  # we stopped reading (the app is behind), not the client
            self._body.set(self.loop, self.limits.body_timeout)
            return
        # A response may be under way, so nothing more is written: the app sees a disconnect.
        logger.debug("%s: no request body byte for %g s", self.client, self.limits.body_timeout)
        self.transport.close()

    def _stop_head_timers(self) -> None:
        self._head.clear()
        self._slow.clear()
        if self._slow_address is not None:
            self.slow_heads.release(self._slow_address)
            self._slow_address = None

    def _answer_and_close(self, status: int, code: str, detail: str) -> None:
        self.refusals.note(status, detail, self.client)
        body = json.dumps({"error": code, "detail": detail}).encode("ascii")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"connection", b"close"),
        ]
        try:
            for event in (
                h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                output = self.conn.send(event)
                if output:
                    self.transport.write(output)
        except h11.LocalProtocolError:
            pass  # a response had already begun: closing is all that is left
        self.transport.close()


def server_config(
    app: ASGIApp, *, host: str, port: int, refusals: RefusalLog | None = None, **options: Any
) -> Config:
    """uvicorn's Config for serving the router, the same wherever it is served (`rma router`,
    the demo, the benches): its guarded h11 protocol, no Server header, no access log, the
    process's logging setup rather than uvicorn's own, and no proxy headers, since the app
    alone decides whom to believe about a client's address (edge_router.cloudflare;
    uvicorn's default takes X-Forwarded-For from any loopback peer). Refused requests are
    counted in `refusals` (the router's is `app.state.rma.refused`, exposed in /metrics).
    `options` go to uvicorn.Config, over these."""
    chosen: dict[str, Any] = {
        "http": protocol_class(refusals=refusals),
        "proxy_headers": False,
        "server_header": False,
        "access_log": False,
        "log_config": None,
    }
    return Config(app, host=host, port=port, **(chosen | options))


def protocol_class(
    limits: ServerLimits | None = None, refusals: RefusalLog | None = None
) -> type[GuardedH11Protocol]:
    """A protocol class for `uvicorn.Config(http=...)`, with its own count of slow connections
    and of refusals (one per server: every connection of a server shares them)."""
    chosen = limits or ServerLimits()
    # Not read from inside the class: a class body looks a name it assigns up in its own
    # namespace and the globals only, never in this function.
    counted = RefusalLog() if refusals is None else refusals

    class EdgeH11Protocol(GuardedH11Protocol):
        limits = chosen
        slow_heads = SlowHeads(chosen.max_slow_per_address)
        refusals = counted

    return EdgeH11Protocol


__all__ = [
    "BODY_TIMEOUT",
    "HEAD_TIMEOUT",
    "MAX_HEAD_BYTES",
    "MAX_SLOW_PER_ADDRESS",
    "SLOW_AFTER",
    "Deadline",
    "GuardedH11Protocol",
    "RefusalLog",
    "ServerLimits",
    "SlowHeads",
    "protocol_class",
    "server_config",
]
