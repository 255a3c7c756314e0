"""A lean HTTP/1.1 connection to a tunnel for the routing proxy's pool (edge_router.upstream.pool).

httpcore's HTTP/1.1 connection runs every request through h11's state machine, anyio streams,
an anyio lock and a shielded cancel scope per step: measured alone (64 concurrent keep-alive
requests to nginx on loopback), httpx over httpcore made about 2,000 requests a second where
plain asyncio streams made over 40,000, and it was most of a routed request's CPU. This one is an
asyncio protocol that writes the request head in one piece and parses the answer with llhttp
(httptools, as in uvicorn's `standard` extra) in its strict mode: a volunteer's answer is
untrusted input, so anything h11 would refuse or could read two ways (a bare CR or LF, folded or
malformed header lines, Content-Length beside Transfer-Encoding, repeated lengths, a transfer
coding other than chunked) is refused. What llhttp takes and h11 refuses is checked in _Answer.
llhttp replaced a hand-written regex parser of the head, framing and chunks: parsing nginx's 1 KB
answer takes 8.2 µs of CPU (8.7 before), a 1 MiB chunked body 168 µs (314); `/route` did not
move beyond the noise of a loaded machine (bench/README.md).

It speaks httpcore's interfaces (requests, responses, exceptions, trace events), so httpx and
the proxy see no difference: connect failures are httpcore.ConnectError/ConnectTimeout, a
connection the tunnel closed before answering is the RemoteProtocolError httpcore raises
("Server disconnected without sending a response."), and the trace reports
`connection.connect_tcp.*` and `http11.receive_response_headers.complete` as httpcore does.
HTTP/2 stays httpcore's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, cast

import httpcore
import httptools

from dht_bridge.closing import wait_closed

__all__ = ["MAX_HEAD_BYTES", "LeanHTTP11Connection"]

MAX_HEAD_BYTES = 64 * 1024  # an answer's status line and headers, at most
# Bytes of a chunk line or trailer fed in a row with nothing parsed out of them, at most. llhttp
# keeps no line in memory, so this stops an endless line rather than bounding a buffer.
MAX_CHUNK_LINE = 1024
READ_HIGH = 256 * 1024  # bytes buffered from a tunnel before its socket is no longer read
READ_LOW = 64 * 1024  # and below which it is read again
PIECE = 64 * 1024  # the largest piece of a body handed on at once

_BAD_REQUEST_BYTES = re.compile(rb"[\r\n\x00]")
# llhttp takes any byte but CR and LF in a reason phrase; RFC 9112 section 4 (and h11) allow
# HTAB, SP, VCHAR and obs-text only.
_BAD_REASON = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

Trace = Callable[[str, dict[str, Any]], Awaitable[None]]


class _Wire(asyncio.Protocol):
    """The socket's side: received bytes buffered, one reader woken per arrival, write flow."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self._reader: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._paused = False
        self._reading_paused = False
        # Done once the transport has closed the socket (`connection_lost`).
        self.lost: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are not asyncio.Transport's.
        self.transport = cast(asyncio.Transport, transport)
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_HIGH and not self._reading_paused and self.transport:
            # A body streams: the tunnel waits while the client is slower (bounded memory).
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()
        self._resume()  # a request body waiting to go out stops for an early answer

    def answered(self) -> bool:
        """Has a final answer begun? An interim 1xx does not count: the body is wanted after it.
        Whole 1xx heads are looked past (a 100 Continue then a 413 is an early answer)."""
        buffer = self.buffer
        start = 0
        while len(buffer) >= start + 10 and buffer.startswith(b"HTTP/", start):
            if buffer[start + 9 : start + 10] != b"1":
                return True
            end = buffer.find(b"\r\n\r\n", start)
            if end < 0:
                return False
            start = end + 4
        return False

    def taken(self) -> None:
        """The reader consumed from the buffer: read from the socket again below READ_LOW."""
        if self._reading_paused and len(self.buffer) <= READ_LOW and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # nothing more to write once the tunnel is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.answered():
            self._rescue()
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)
        self.eof = True
        self.error = exc
        self._wake()
        self._resume()

    def _rescue(self) -> None:
        """Read what the kernel still holds for a connection a failed write is closing.

        A tunnel that answers without reading the whole body (a 413, say) and closes makes the
        kernel reset the connection; the next write fails and the transport closes unread, but
        the answer is in the receive queue until the socket closes, which is after this call
        on asyncio and uvloop alike. Plain TCP only: under TLS those bytes are records.
        """
        transport = self.transport
        if transport is None or transport.get_extra_info("sslcontext") is not None:
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            with sock.dup() as copy:
                copy.setblocking(False)
                while len(self.buffer) < READ_HIGH:
                    data = copy.recv(PIECE)
                    if not data:
                        break
                    self.buffer += data
        except OSError:
            pass  # nothing more to read (EAGAIN, or the reset itself)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._resume()

    def _wake(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _resume(self) -> None:
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def more(self, seconds: float | None) -> None:
        """Wait for bytes or the end of the stream; httpcore.ReadTimeout after `seconds`."""
        future = asyncio.get_running_loop().create_future()
        self._reader = future
        try:
            await _within(future, seconds, httpcore.ReadTimeout)
        finally:
            self._reader = None

    async def send(self, data: bytes, seconds: float | None) -> bool:
        """Write a piece of the request and wait while the kernel cannot take more; False when
        the tunnel's final answer began meanwhile, or came before it closed the connection."""
        assert self.transport is not None
        self.transport.write(data)
        try:
            await self.drain(seconds)
        except httpcore.WriteError:
            if not self.answered():
                raise
            # The tunnel answered and closed (a 413 for a body it will not read, say): that
            # answer is the exchange's, not a broken pipe.
            return False
        return not (self._paused and self.answered())

    async def drain(self, seconds: float | None) -> None:
        """Wait while the kernel's send buffer is full and no answer has begun;
        httpcore.WriteTimeout after `seconds`."""
        while self._paused and not self.eof and not self.answered():
            future = asyncio.get_running_loop().create_future()
            self._writable = future
            try:
                await _within(future, seconds, httpcore.WriteTimeout)
            finally:
                self._writable = None
        if self.eof:
            raise httpcore.WriteError(_describe(self.error) or "connection closed by the tunnel")


async def _within(
    future: asyncio.Future[None], seconds: float | None, late: type[Exception]
) -> None:
    """Await `future`; `late` is raised if it is not done within `seconds` seconds. A timer, not
    asyncio.timeout: no task cancellation and uncancel per read."""
    if seconds is None:
        await future
        return
    timer = asyncio.get_running_loop().call_later(seconds, _expire, future, late)
    try:
        await future
    finally:
        timer.cancel()


def _expire(future: asyncio.Future[None], late: type[Exception]) -> None:
    if not future.done():
        future.set_exception(late("timed out"))


class LeanHTTP11Connection(httpcore.AsyncConnectionInterface):
    """One kept-alive HTTP/1.1 connection to `origin`, one request at a time."""

    def __init__(
        self,
        origin: httpcore.Origin,
        *,
        ssl_context: ssl.SSLContext | None,
        keepalive_expiry: float,
    ) -> None:
        self._origin = origin
        self._ssl = ssl_context
        self._expiry = keepalive_expiry
        self._wire: _Wire | None = None
        self._state = "new"  # new, active, idle, closed
        self._idle_until = 0.0

    # -- what the pool asks ------------------------------------------------------------------

    def can_handle_request(self, origin: httpcore.Origin) -> bool:
        """True for requests to this connection's origin."""
        return origin == self._origin

    def is_available(self) -> bool:
        """True when a request can go out on it now (not yet connected, or idle and open)."""
        wire = self._wire
        return self._state == "new" or (self._state == "idle" and wire is not None and not wire.eof)

    def has_expired(self) -> bool:
        """True when an idle connection must not be reused: its keep-alive time is over, the
        tunnel closed it, or it sent bytes nobody asked for."""
        if self._state == "closed":
            return True
        if self._state != "idle":
            return False
        return time.monotonic() > self._idle_until or self._wire_gone()

    def is_idle(self) -> bool:
        """True between two requests."""
        return self._state == "idle"

    def is_closed(self) -> bool:
        """True once closed, by either side."""
        return self._state == "closed"

    def info(self) -> str:
        """A short description, as httpcore's connections give."""
        return f"lean HTTP/1.1, {self._state.upper()}"

    def _wire_gone(self) -> bool:
        wire = self._wire
        return wire is None or wire.eof or bool(wire.buffer) or _readable(wire.transport)

    async def aclose(self) -> None:
        """Close the socket (an answer still being read ends with it), and wait until it is
        closed (dht_bridge.closing): a loop stopped first, at a shutdown or a test's end, left
        it open."""
        self._close()
        wire = self._wire
        if wire is not None and wire.transport is not None and wire.lost is not None:
            await wait_closed(wire.transport, wire.lost)

    def _close(self) -> None:
        self._state = "closed"
        wire = self._wire
        if wire is not None and wire.transport is not None:
            wire.transport.close()

    # -- one exchange ------------------------------------------------------------------------

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        """Send `request` and read its answer's head; the body streams from the response."""
        if not self.is_available():
            raise httpcore.ConnectionNotAvailable()
        timeouts = request.extensions.get("timeout", {})
        trace: Trace | None = request.extensions.get("trace")
        first = self._wire is None
        self._state = "active"
        try:
            if first:
                self._wire = await self._connect(timeouts.get("connect"), trace)
            wire = self._wire
            assert wire is not None
            whole = await self._send(wire, request, timeouts.get("write"))
            # The rest of a cut-off body must not pass for a request: no reuse after it.
            answer = _Answer(self, wire, request.method, timeouts.get("read"), reusable=whole)
            await answer.read_head()
            if trace is not None:
                await trace("http11.receive_response_headers.complete", {"request": request})
        except BaseException:
            self._close()
            raise
        if answer.complete:
            answer.finish()
        return httpcore.Response(
            answer.status,
            headers=answer.headers,
            content=answer,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": answer.reason},
        )

    async def _connect(self, seconds: float | None, trace: Trace | None) -> _Wire:
        origin = self._origin
        host = origin.host.decode("ascii")
        tls = self._ssl if origin.scheme == b"https" else None
        info = {"host": host, "port": origin.port, "timeout": seconds}
        if trace is not None:
            await trace("connection.connect_tcp.started", info)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(seconds):
                _, wire = await loop.create_connection(
                    _Wire, host, origin.port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"no connection to {host} within {seconds:g} s") from None
        except OSError as exc:
            raise httpcore.ConnectError(_describe(exc)) from exc
        if trace is not None:
            await trace("connection.connect_tcp.complete", info)
        return wire

    async def _send(self, wire: _Wire, request: httpcore.Request, seconds: float | None) -> bool:
        """Write the request; False when a final answer came before the whole body went out
        (RFC 9112 section 9.5: the client stops sending, reads that answer, then closes)."""
        length: int | None = None
        chunked = False
        parts = [request.method, b" ", request.url.target, b" HTTP/1.1\r\n"]
        for name, value in request.headers:
            if _BAD_REQUEST_BYTES.search(name) or _BAD_REQUEST_BYTES.search(value):
                raise httpcore.LocalProtocolError(f"illegal byte in request header {name[:40]!r}")
            lowered = name.lower()
            if lowered == b"content-length":
                length = int(value)
            elif lowered == b"transfer-encoding":
                chunked = value.strip().lower() == b"chunked"
                if not chunked:
                    raise httpcore.LocalProtocolError("only chunked request bodies are sent")
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        if wire.eof:
            raise httpcore.WriteError(_describe(wire.error) or "connection closed by the tunnel")
        head = b"".join(parts)
        sent = 0
        async with contextlib.aclosing(_request_chunks(request)) as chunks:
            async for chunk in chunks:
                if not chunk:
                    continue
                sent += len(chunk)
                if length is not None and sent > length:
                    raise httpcore.LocalProtocolError("Too much data for declared Content-Length")
                data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
                if head:  # the head goes out with the first piece of the body
                    data, head = head + data, b""
                elif wire.answered():
                    return False  # the tunnel answered before taking the whole body
                if not await wire.send(data, seconds):
                    return False
        if length is not None and sent != length:
            raise httpcore.LocalProtocolError("Too little data for declared Content-Length")
        tail = head + (b"0\r\n\r\n" if chunked else b"")
        return not tail or await wire.send(tail, seconds)

    def _finished(self, keep_alive: bool) -> None:
        """The answer was read to its end: the connection is idle again, or closed."""
        if keep_alive and self._state == "active" and not self._wire_gone():
            self._state = "idle"
            self._idle_until = time.monotonic() + self._expiry
        else:
            self._close()


def _readable(transport: asyncio.Transport | None) -> bool:
    """Has an idle connection's socket something to read (the tunnel's close, most likely) that
    the event loop has not delivered yet? One poll of that socket, as httpcore does on reuse."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


async def _request_chunks(request: httpcore.Request) -> AsyncGenerator[bytes, None]:
    stream: Any = request.stream
    if isinstance(stream, bytes):
        yield stream
        return
    async for chunk in stream:
        yield bytes(chunk)


class _Answer:
    """One answer, parsed by llhttp (this is the protocol of an httptools.HttpResponseParser),
    interim 1xx answers skipped, its body handed out as httpcore hands one out: async iteration,
    then aclose (which gives the connection back when the body was read to its end)."""

    def __init__(
        self,
        connection: LeanHTTP11Connection,
        wire: _Wire,
        method: bytes,
        seconds: float | None,
        *,
        reusable: bool = True,
    ) -> None:
        self._connection = connection
        self._wire = wire
        self._timeout = seconds
        self._head_only = method == b"HEAD"  # no body, whatever the head says
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        # Spaces after a chunk size are BWS before an extension in RFC 9112's grammar (section
        # 7.1.1), and h11 takes them at the end of the line; llhttp's strict mode refuses both.
        # The size cannot be read two ways with them.
        self._parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
        self.status = 0  # of the final answer, once its head is parsed
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self._framed = False  # by Content-Length or Transfer-Encoding, not by the close
        self._keep_alive = False
        self._pieces: list[bytes] = []  # of the body, parsed and not yet handed on
        self._events = 0  # callbacks so far: whether a feed got anything out of the parser
        self.complete = False  # the answer was parsed to its end
        self._stray = False  # and bytes came after it
        self._ended = False  # finish or aclose ran
        self._reusable = reusable  # False when the request's body was cut short by this answer

    async def read_head(self) -> None:
        """Parse up to the end of the answer's head and not a byte further: what follows stays
        in the buffer, for the body or, after an answer without one, as bytes nobody asked for
        (the connection is then not used again)."""
        wire = self._wire
        fed = 0  # bytes of the current head parsed so far
        # One deadline for the whole head, interim 1xx answers included: a timeout restarted by
        # every arrival let a tunnel dripping a header line (or a 103) a second hold it forever.
        loop = asyncio.get_running_loop()
        deadline = None if self._timeout is None else loop.time() + self._timeout
        while not self.status:
            buffer = wire.buffer
            # Strictly parsed, a head ends at its first CRLFCRLF; without one yet, all but the
            # last three bytes are parsed (they may begin one).
            end = buffer.find(b"\r\n\r\n")
            if fed + (end + 4 if end >= 0 else len(buffer)) > MAX_HEAD_BYTES:
                raise httpcore.RemoteProtocolError("the answer's head is too long")
            take = end + 4 if end >= 0 else len(buffer) - 3
            if take > 0:
                self._feed(take)
                fed = 0 if end >= 0 else fed + take
            elif not wire.eof:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:  # bytes kept coming, never the head's end
                    raise httpcore.ReadTimeout("timed out")
                await wire.more(left)
            elif fed or buffer:
                raise httpcore.RemoteProtocolError("connection closed in the answer's head")
            elif isinstance(wire.error, OSError):
                raise httpcore.ReadError(_describe(wire.error))
            else:
                raise httpcore.RemoteProtocolError(
                    "Server disconnected without sending a response."
                )

    async def __aiter__(self) -> AsyncIterator[bytes]:
        wire = self._wire
        stalled = 0  # bytes parsed in a row with nothing out of them: a chunk line or trailer
        while True:
            if self._pieces:
                piece = b"".join(self._pieces)
                self._pieces.clear()
                yield piece
            if self.complete:
                break
            count = min(len(wire.buffer), PIECE)
            if count:
                events = self._events
                self._feed(count)
                stalled = stalled + count if self._events == events else 0
                if stalled > MAX_CHUNK_LINE:
                    raise httpcore.RemoteProtocolError("chunk-size line or trailer too long")
            elif not wire.eof:
                await wire.more(self._timeout)
            elif isinstance(wire.error, OSError):
                raise httpcore.ReadError(_describe(wire.error))
            elif self._framed:
                raise httpcore.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            else:
                self.complete = True  # delimited by the close
        self.finish()

    def finish(self) -> None:
        """The body was read to its end: the connection is idle again, or closed."""
        if not self._ended:
            self._ended = True
            self._connection._finished(self._keep_alive and not self._stray and self._reusable)

    async def aclose(self) -> None:
        """Done with the body: an unread rest makes the connection unusable, so it closes."""
        if not self._ended:
            self._ended = True
            self._connection._close()

    def _feed(self, count: int) -> None:
        """Parse the first `count` bytes of the buffer and take them out of it."""
        buffer, parser = self._wire.buffer, self._parser
        assert parser is not None
        try:
            with memoryview(buffer) as view, view[:count] as data:
                parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # a 101 answer
            raise httpcore.RemoteProtocolError("a protocol switch was not asked for") from None
        except httptools.HttpParserError as exc:
            if not self.complete:
                refused = exc.__context__  # what a callback below raised, if one did
                if not isinstance(refused, httpcore.RemoteProtocolError):
                    refused = httpcore.RemoteProtocolError(f"malformed answer: {exc}")
                raise refused from None
            self._stray = True  # bytes after the answer, parsed no further
        finally:
            del buffer[:count]
            self._wire.taken()

    # -- llhttp's callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise httpcore.RemoteProtocolError("bytes after the answer")
        self.reason = b""
        self.headers = []

    def on_status(self, reason: bytes) -> None:
        self.reason += reason  # in pieces when it spans two reads

    def on_header(self, name: bytes, value: bytes) -> None:
        self._events += 1
        if not self.status:  # trailers are parsed and dropped
            self.headers.append((name, value.rstrip(b" \t")))  # llhttp keeps trailing spaces

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        version = parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise httpcore.RemoteProtocolError(f"unsupported HTTP version {version}")
        # llhttp takes any three digits; a status over 599 is no HTTP status (RFC 9110 15).
        if not 100 <= status <= 599 or _BAD_REASON.search(self.reason):
            raise httpcore.RemoteProtocolError(f"malformed status line {status} {self.reason!r}")
        if status < 200:
            return  # 1xx (103 Early Hints, say): informational, the answer follows
        codings = [
            coding.strip().lower()
            for name, value in self.headers
            if name.lower() == b"transfer-encoding"
            for coding in value.split(b",")
        ]
        # llhttp reads "gzip, chunked" as chunked and other codings to the close.
        if codings not in ([], [b"chunked"]) and not (self._head_only or status in (204, 304)):
            raise httpcore.RemoteProtocolError(f"unsupported transfer coding {codings!r}")
        self.status = status
        self._framed = bool(codings) or any(n.lower() == b"content-length" for n, _ in self.headers)
        # llhttp's rule (no "close" in Connection, and a body that does not end with the
        # connection), and never with HTTP/1.0, as with h11.
        self._keep_alive = version == "1.1" and parser.should_keep_alive()
        if self._head_only:
            self.on_message_complete()  # llhttp would wait for the body the head describes

    def on_body(self, body: bytes) -> None:
        self._events += 1
        self._pieces.append(body)

    def on_chunk_header(self) -> None:
        self._events += 1

    def on_message_complete(self) -> None:
        if self.status:  # the final answer, not an interim one
            self.complete = True
            self._parser = None  # it holds this object's methods: no cycle left for the GC


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
