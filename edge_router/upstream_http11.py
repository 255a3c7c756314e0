"""A lean HTTP/1.1 connection to a tunnel for the routing proxy's pool (edge_router.upstream_pool).

httpcore's HTTP/1.1 connection runs every request through h11's state machine, anyio streams,
an anyio lock and a shielded cancel scope per step: measured alone (64 concurrent keep-alive
requests to nginx on loopback), httpx over httpcore made about 2,000 requests a second where
plain asyncio streams made over 40,000, and it was most of a routed request's CPU. This one is an
asyncio protocol that writes the request head in one piece and parses the answer's head and
framing itself, strictly: a volunteer's answer is untrusted input, so anything h11 would refuse
or could read two ways (a bare LF, folded or malformed header lines, Content-Length beside
Transfer-Encoding, conflicting lengths, an unknown transfer coding) is refused here too.

It speaks httpcore's interfaces (requests, responses, exceptions, trace events), so httpx and
the proxy see no difference: connect failures are httpcore.ConnectError/ConnectTimeout, a
connection the tunnel closed before answering is the RemoteProtocolError httpcore raises
("Server disconnected without sending a response."), and the trace reports
`connection.connect_tcp.*` and `http11.receive_response_headers.complete` as httpcore does.
HTTP/2 stays httpcore's.
"""

from __future__ import annotations

import asyncio
import re
import select
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpcore

__all__ = ["MAX_HEAD_BYTES", "LeanHTTP11Connection"]

MAX_HEAD_BYTES = 64 * 1024  # an answer's status line and headers, at most
MAX_CHUNK_LINE = 1024  # a chunk-size line with its extensions, at most
READ_HIGH = 256 * 1024  # bytes buffered from a tunnel before its socket is no longer read
READ_LOW = 64 * 1024  # and below which it is read again
PIECE = 64 * 1024  # the largest piece of a body handed on at once

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
# RFC 9110 section 5.6.2 (token) and 5.5 (field-value); no CR, LF or NUL can pass either.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(
    rb"(?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
)
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_BAD_REQUEST_BYTES = re.compile(rb"[\r\n\x00]")

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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_HIGH and not self._reading_paused and self.transport:
            # A body streams: the tunnel waits while the client is slower (bounded memory).
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

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
        self.eof = True
        self.error = exc
        self._wake()
        self._resume()

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

    async def drain(self, seconds: float | None) -> None:
        """Wait while the kernel's send buffer is full; httpcore.WriteTimeout after `seconds`."""
        while self._paused and not self.eof:
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
        """Close the socket (an answer still being read ends with it)."""
        self._close()

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
            await self._send(wire, request, timeouts.get("write"))
            status, reason, headers, framing, keep_alive = await self._read_head(
                wire, request, timeouts.get("read")
            )
            if trace is not None:
                await trace("http11.receive_response_headers.complete", {"request": request})
        except BaseException:
            self._close()
            raise
        body = _Body(self, wire, framing, keep_alive, timeouts.get("read"))
        if framing[0] == "none":
            body.finish()
        return httpcore.Response(
            status,
            headers=headers,
            content=body,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason},
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

    async def _send(self, wire: _Wire, request: httpcore.Request, seconds: float | None) -> None:
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
        transport = wire.transport
        assert transport is not None
        if wire.eof:
            raise httpcore.WriteError(_describe(wire.error) or "connection closed by the tunnel")
        head = b"".join(parts)
        sent = 0
        async for chunk in _request_chunks(request):
            if not chunk:
                continue
            sent += len(chunk)
            if length is not None and sent > length:
                raise httpcore.LocalProtocolError("Too much data for declared Content-Length")
            data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
            if head:  # the head goes out with the first piece of the body
                data, head = head + data, b""
            transport.write(data)
            await wire.drain(seconds)
        if length is not None and sent != length:
            raise httpcore.LocalProtocolError("Too little data for declared Content-Length")
        tail = head + (b"0\r\n\r\n" if chunked else b"")
        if tail:
            transport.write(tail)
            await wire.drain(seconds)

    async def _read_head(
        self, wire: _Wire, request: httpcore.Request, seconds: float | None
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]], tuple[str, int], bool]:
        while True:
            head = await _head(wire, seconds)
            status, reason, headers, version = _parse_head(head)
            if status >= 200:
                break
            if status == 101:
                raise httpcore.RemoteProtocolError("a protocol switch was not asked for")
            # 1xx (103 Early Hints, say): informational, the answer follows.
        framing = _framing(status, headers, request.method)
        keep_alive = version == b"1" and not any(
            name.lower() == b"connection" and b"close" in _tokens(value) for name, value in headers
        )
        if framing[0] == "eof":
            keep_alive = False
        return status, reason, headers, framing, keep_alive

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


async def _request_chunks(request: httpcore.Request) -> AsyncIterator[bytes]:
    stream: Any = request.stream
    if isinstance(stream, bytes):
        yield stream
        return
    async for chunk in stream:
        yield bytes(chunk)


async def _head(wire: _Wire, seconds: float | None) -> bytes:
    searched = 0
    while True:
        buffer = wire.buffer
        end = buffer.find(b"\r\n\r\n", max(0, searched - 3))
        if end >= 0:
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            wire.taken()
            return head
        searched = len(buffer)
        if searched > MAX_HEAD_BYTES:
            raise httpcore.RemoteProtocolError("the answer's head is too long")
        if wire.eof:
            if buffer:
                raise httpcore.RemoteProtocolError("connection closed in the answer's head")
            if isinstance(wire.error, OSError):
                raise httpcore.ReadError(_describe(wire.error))
            raise httpcore.RemoteProtocolError("Server disconnected without sending a response.")
        await wire.more(seconds)


def _parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
    lines = head.split(b"\r\n")
    matched = _STATUS_LINE.fullmatch(lines[0])
    if matched is None:
        raise httpcore.RemoteProtocolError(f"malformed status line {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon or not _FIELD_NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            # A bare LF or CR, a folded line, a name with spaces: h11 refuses these too.
            raise httpcore.RemoteProtocolError(f"malformed header line {line[:80]!r}")
        headers.append((name, value))
    return int(matched.group(2)), matched.group(3) or b"", headers, matched.group(1)


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip().lower() for token in value.split(b",")]


def _framing(status: int, headers: list[tuple[bytes, bytes]], method: bytes) -> tuple[str, int]:
    """How the body is delimited (RFC 9112 section 6.3): ("none", 0), ("length", n),
    ("chunked", 0) or ("eof", 0)."""
    if method == b"HEAD" or status in (204, 304):
        return "none", 0
    codings: list[bytes] = []
    lengths: set[bytes] = set()
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            codings += _tokens(value)
        elif lowered == b"content-length":
            lengths.update(part.strip() for part in value.split(b","))
    if codings:
        if lengths:
            raise httpcore.RemoteProtocolError("both Content-Length and Transfer-Encoding")
        if codings != [b"chunked"]:
            raise httpcore.RemoteProtocolError(f"unsupported transfer coding {codings!r}")
        return "chunked", 0
    if lengths:
        if len(lengths) > 1:
            raise httpcore.RemoteProtocolError("conflicting Content-Length values")
        (text,) = lengths
        if not text.isdigit() or len(text) > 18:
            raise httpcore.RemoteProtocolError(f"bad Content-Length {text[:40]!r}")
        length = int(text)
        return ("length", length) if length else ("none", 0)
    return "eof", 0


class _Body:
    """The answer's body as httpcore hands it out: async iteration, then aclose (which gives the
    connection back for another request when the body was read to its end)."""

    def __init__(
        self,
        connection: LeanHTTP11Connection,
        wire: _Wire,
        framing: tuple[str, int],
        keep_alive: bool,
        seconds: float | None,
    ) -> None:
        self._connection = connection
        self._wire = wire
        self._kind, self._left = framing
        self._keep_alive = keep_alive
        self._timeout = seconds
        self._done = False

    def finish(self) -> None:
        """The body is complete."""
        if not self._done:
            self._done = True
            self._connection._finished(self._keep_alive)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        wire = self._wire
        if self._kind == "length":
            while self._left > 0:
                chunk = await self._take(self._left)
                self._left -= len(chunk)
                yield chunk
        elif self._kind == "chunked":
            while True:
                size = await self._chunk_size()
                if size == 0:
                    await self._trailers()
                    break
                while size > 0:
                    chunk = await self._take(size)
                    size -= len(chunk)
                    yield chunk
                if await self._exactly(2) != b"\r\n":
                    raise httpcore.RemoteProtocolError("chunk not followed by CRLF")
        elif self._kind == "eof":
            while True:
                if not wire.buffer:
                    if wire.eof:
                        if isinstance(wire.error, OSError):
                            raise httpcore.ReadError(_describe(wire.error))
                        break
                    await wire.more(self._timeout)
                    continue
                chunk = bytes(wire.buffer[:PIECE])
                del wire.buffer[:PIECE]
                wire.taken()
                yield chunk
        self.finish()

    async def _take(self, most: int) -> bytes:
        """Up to `most` bytes, at least one."""
        wire = self._wire
        while not wire.buffer:
            if wire.eof:
                if isinstance(wire.error, OSError):
                    raise httpcore.ReadError(_describe(wire.error))
                raise httpcore.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            await wire.more(self._timeout)
        most = min(most, PIECE)
        chunk = bytes(wire.buffer[:most])
        del wire.buffer[:most]
        wire.taken()
        return chunk

    async def _exactly(self, count: int) -> bytes:
        out = b""
        while len(out) < count:
            out += await self._take(count - len(out))
        return out

    async def _line(self) -> bytes:
        wire = self._wire
        while True:
            end = wire.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(wire.buffer[:end])
                del wire.buffer[: end + 2]
                wire.taken()
                return line
            if len(wire.buffer) > MAX_CHUNK_LINE:
                raise httpcore.RemoteProtocolError("chunk-size line too long")
            if wire.eof:
                raise httpcore.RemoteProtocolError("peer closed connection in a chunked body")
            await wire.more(self._timeout)

    async def _chunk_size(self) -> int:
        line = await self._line()
        matched = _CHUNK_SIZE.fullmatch(line)
        if matched is None:
            raise httpcore.RemoteProtocolError(f"malformed chunk-size line {line[:40]!r}")
        return int(matched.group(1), 16)

    async def _trailers(self) -> None:
        while True:
            line = await self._line()
            if not line:
                return
            if len(line) > MAX_HEAD_BYTES:
                raise httpcore.RemoteProtocolError("trailers too long")

    async def aclose(self) -> None:
        """Done with the body: an unread rest makes the connection unusable, so it closes."""
        if not self._done:
            self._done = True
            self._connection._close()


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
