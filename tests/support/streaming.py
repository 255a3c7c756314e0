"""A worker stand-in for streaming tests: it sinks a request body and sources a response body,
each gated after its first chunk, so that a proxy that buffers a whole body stalls the test."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

CHUNK = 64 * 1024
_TAIL = (bytes(range(256)) * (CHUNK // 256))[8:]


def _chunk(index: int) -> bytes:
    return index.to_bytes(8, "big") + _TAIL


class StreamingUpstream:
    """`/sink` takes `total` bytes, `/source` sends them; `gate` is how long (seconds) a side
    waits for the other before the test fails as "buffered"."""

    def __init__(self, total: int, gate: float) -> None:
        self.total = total
        self.gate = gate
        self.received = 0
        self.crc = 0
        self.got_first_chunk = asyncio.Event()  # set by the sink
        self.client_got_first_chunk = asyncio.Event()  # set by `download`
        self.app = Starlette(
            routes=[
                Route("/sink", self._sink, methods=["POST"]),
                Route("/source", self._source),
            ]
        )

    def expected_crc(self) -> int:
        """The CRC-32 of the `total` bytes either way."""
        crc = 0
        for i in range(self.total // CHUNK):
            crc = zlib.crc32(_chunk(i), crc)
        return crc

    async def upload(self) -> AsyncIterator[bytes]:
        """A request body whose rest waits until the upstream has seen data: the second chunk
        is past any replay buffer, so a proxy holding the body back stalls here."""
        for i in range(self.total // CHUNK):
            yield _chunk(i)
            if i == 1:
                await asyncio.wait_for(self.got_first_chunk.wait(), self.gate)

    async def download(
        self, client: httpx.AsyncClient, url: str
    ) -> tuple[httpx.Response, int, int]:
        """GET `url` as a stream: the response, bytes received and their CRC-32."""
        received, crc = 0, 0
        async with client.stream("GET", url) as streamed:
            async for chunk in streamed.aiter_raw():
                received += len(chunk)
                crc = zlib.crc32(chunk, crc)
                self.client_got_first_chunk.set()
        return streamed, received, crc

    async def _sink(self, request: Request) -> Response:
        async for chunk in request.stream():
            if chunk:
                self.received += len(chunk)
                self.crc = zlib.crc32(chunk, self.crc)
                self.got_first_chunk.set()
        return JSONResponse({"size": self.received, "crc": self.crc})

    async def _source(self, request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for i in range(self.total // CHUNK):
                yield _chunk(i)
                if i == 0:  # the rest only once the client holds the first chunk
                    await asyncio.wait_for(self.client_got_first_chunk.wait(), self.gate)

        return StreamingResponse(body(), media_type="application/octet-stream")
