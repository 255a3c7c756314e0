"""HTTP at the byte level for the router's robustness tests: a client that sends exact bytes, and
an upstream that records every byte it receives and parses them the way a worker would (h11)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h11

from tests.support.helpers import wait_for

READ_TIMEOUT = 10.0


@dataclass
class Answer:
    """What a server sent back on one raw connection, up to its close."""

    raw: bytes
    closed: bool  # the server closed the connection (EOF) before the deadline

    @property
    def status(self) -> int:
        """The status code of the first response (0 when nothing came)."""
        parts = self.raw.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    @property
    def body(self) -> bytes:
        """The first response's body (everything after its head)."""
        return self.raw.partition(b"\r\n\r\n")[2]

    def json(self) -> object:
        """The first response's body as JSON."""
        return json.loads(self.body)


async def send_raw(port: int, data: bytes, *, timeout: float = READ_TIMEOUT) -> Answer:  # noqa: ASYNC109
    """Send `data` on a new connection to 127.0.0.1:`port`; read until the server closes it or
    `timeout` passes (then `closed` is False)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    closed = False
    deadline = time.monotonic() + timeout
    try:
        writer.write(data)
        await writer.drain()
        while (left := deadline - time.monotonic()) > 0:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return Answer(bytes(received), closed)


async def hang_up(port: int, data: bytes) -> None:
    """Send `data` on a new connection to 127.0.0.1:`port` and close it at once, as a client
    that gives up mid-request."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@dataclass
class Seen:
    """One request as a worker would read it."""

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        """The value of header `name` (lower case), None when absent."""
        values = [v for k, v in self.headers if k == name]
        return values[-1] if values else None


@dataclass
class RawUpstream:
    """A loopback HTTP/1.1 server: records each connection's bytes and parses its requests with
    h11, answering 200 and keeping the connection alive.

    `hang_up_on`: on each connection, the request number (1-based) at which it closes the
    connection without answering, as a server does when its idle timeout wins a race with a
    request on a kept-alive connection.
    """

    hang_up_on: int | None = None
    received: list[bytearray] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    url: str = ""
    _writers: set[asyncio.StreamWriter] = field(default_factory=set, repr=False)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve until the block ends; yield the base URL."""
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self.url
        finally:
            server.close()
            # Connections a client keeps alive would outlive the test: end them and their tasks.
            for writer in self._writers:
                writer.close()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

    def all_bytes(self) -> bytes:
        """Everything every connection sent."""
        return b"".join(self.received)

    async def wait_for_requests(self, count: int) -> None:
        """Wait until `count` requests were read whole."""
        await wait_for(
            lambda: len(self.requests) >= count, timeout=READ_TIMEOUT, message=f"{count} requests"
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._writers.add(writer)
        raw = bytearray()
        self.received.append(raw)
        conn = h11.Connection(h11.SERVER)
        number = 0
        current: Seen | None = None
        try:
            while True:
                data = await reader.read(65536)
                raw += data
                conn.receive_data(data)
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA or event is h11.PAUSED:
                        break
                    if isinstance(event, h11.ConnectionClosed):
                        return
                    if isinstance(event, h11.Request):
                        number += 1
                        if number == self.hang_up_on:
                            return
                        current = Seen(
                            event.method.decode(), event.target.decode(), list(event.headers)
                        )
                    elif isinstance(event, h11.Data) and current is not None:
                        current.body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage) and current is not None:
                        self.requests.append(current)
                        body = json.dumps({"n": len(self.requests)}).encode()
                        for reply in (
                            h11.Response(
                                status_code=200,
                                headers=[
                                    (b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                ],
                            ),
                            h11.Data(data=body),
                            h11.EndOfMessage(),
                        ):
                            writer.write(conn.send(reply) or b"")
                        await writer.drain()
                        conn.start_next_cycle()
                if not data:
                    return
        except (h11.ProtocolError, ConnectionError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


__all__ = ["Answer", "RawUpstream", "Seen", "hang_up", "send_raw"]
