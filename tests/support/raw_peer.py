"""A raw UDP socket speaking rpcudp's wire format (kind byte, 20-byte message id, msgpack
`[name, args]`), for attacks no real node would make: many ids from one socket, requests from
an address that never answers, bytes counted as they arrive."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack

__all__ = ["REQUEST", "RESPONSE", "RawPeer", "Received", "open_raw_peer", "parse_datagram"]

REQUEST, RESPONSE = b"\x00", b"\x01"

Address = tuple[str, int]
# What the peer answers a request with (None: stay silent): (sender, name, args) -> answer.
Answerer = Callable[[Address, str, list[Any]], Any]


@dataclass
class Received:
    """Everything that reached the socket, by sender: datagrams, bytes, requests by name."""

    datagrams: int = 0
    bytes: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    by_sender: dict[Address, int] = field(default_factory=dict)


def parse_datagram(data: bytes) -> tuple[bytes, bytes, Any]:
    """(kind, message id, body) of a datagram; the zeros that pad our nodes' requests are
    passed over, as the stock library passes them over."""
    try:
        body = msgpack.unpackb(data[21:])
    except msgpack.ExtraData as extra:
        body = extra.unpacked
    return data[:1], data[1:21], body


class RawPeer(asyncio.DatagramProtocol):
    """One socket; `request` sends a datagram and returns its message id, `reply` waits for the
    answer to it; requests from others go to `answer` (silence when it returns None). Message
    ids start with `tag` (our nodes' SERVER_TAG, or nothing as a stock node's); requests are
    padded with zeros to `pad` bytes, as our nodes pad theirs."""

    def __init__(self, answer: Answerer | None = None, tag: bytes = b"", pad: int = 0) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.answer = answer
        self.tag = tag
        self.pad = pad
        self.received = Received()
        self.sent_bytes = 0
        self._replies: dict[bytes, asyncio.Future[Any]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    @property
    def address(self) -> Address:
        """Where this socket is bound."""
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        sender = (addr[0], addr[1])
        self.received.datagrams += 1
        self.received.bytes += len(data)
        self.received.by_sender[sender] = self.received.by_sender.get(sender, 0) + len(data)
        kind, msg_id, body = parse_datagram(data)
        if kind == RESPONSE:
            future = self._replies.pop(msg_id, None)
            if future is not None and not future.done():
                future.set_result(body)
            return
        name, args = body
        self.received.requests[name] = self.received.requests.get(name, 0) + 1
        if self.answer is None:
            return
        answer = self.answer(sender, name, args)
        if answer is not None:
            self._sendto(RESPONSE + msg_id + msgpack.packb(answer), sender)

    def _sendto(self, datagram: bytes, addr: Address) -> None:
        assert self.transport is not None
        self.sent_bytes += len(datagram)
        self.transport.sendto(datagram, addr)

    def request(self, addr: Address, name: str, *args: Any) -> bytes:
        """Send one request; its message id (to wait for the reply with `reply`)."""
        msg_id = self.tag + os.urandom(20 - len(self.tag))
        self._replies[msg_id] = asyncio.get_running_loop().create_future()
        datagram = REQUEST + msg_id + msgpack.packb([name, list(args)])
        self._sendto(datagram + bytes(max(0, self.pad - len(datagram))), addr)
        return msg_id

    async def reply(self, msg_id: bytes, timeout: float) -> Any:  # noqa: ASYNC109
        """The reply to `msg_id`; raises TimeoutError if none came within `timeout`."""
        future = self._replies[msg_id]
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._replies.pop(msg_id, None)

    async def ask(self, addr: Address, name: str, *args: Any, timeout: float = 2.0) -> Any:  # noqa: ASYNC109
        """Send a request and wait for its reply."""
        return await self.reply(self.request(addr, name, *args), timeout)


async def open_raw_peer(
    answer: Answerer | None = None, tag: bytes = b"", pad: int = 0
) -> tuple[asyncio.DatagramTransport, RawPeer]:
    """A RawPeer on a fresh 127.0.0.1 socket; close the transport when done."""
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(
        lambda: RawPeer(answer, tag, pad), local_addr=("127.0.0.1", 0)
    )
    return transport, peer
