"""A NAT for tests, on loopback: nodes behind it are unreachable for real.

Each node behind the NAT binds its own socket, but that socket takes datagrams only from the
NAT's inside socket, and everything it sends goes to the NAT first, tunnelled with the
destination in a 6-byte header (as a SOCKS5 UDP relay does). The NAT gives each inside node a
public socket of its own (endpoint-independent mapping, as home routers do) and sends the
payload on from there. What arrives on a public socket is let in only from an address the node
has sent to (address-and-port-dependent filtering, what makes a NAT unreachable for UDP); the
test can open a node's mapping to everyone, as port forwarding would. Every datagram turned
away is counted, with its sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from dht_bridge.dht.protocol import RMAProtocol

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
HEADER = struct.Struct("!4sH")

Address = tuple[str, int]


def _pack(addr: Address, data: bytes) -> bytes:
    return HEADER.pack(ipaddress.IPv4Address(addr[0]).packed, addr[1]) + data


def _unpack(datagram: bytes) -> tuple[Address, bytes]:
    raw, port = HEADER.unpack_from(datagram)
    return (str(ipaddress.IPv4Address(raw)), port), datagram[HEADER.size :]


@dataclass
class Mapping:
    """One inside node: its inside socket, its public socket, who may write to it."""

    inside: Address
    public: asyncio.DatagramTransport
    allowed: set[Address] = field(default_factory=set)
    open: bool = False  # port forwarding: anyone may write to the public address
    dropped: Counter[Address] = field(default_factory=Counter)

    @property
    def public_address(self) -> Address:
        """The address the outside sees this node at."""
        host, port = self.public.get_extra_info("sockname")[:2]
        return host, port


class _Public(asyncio.DatagramProtocol):
    def __init__(self, nat: UdpNat, inside: Address) -> None:
        self.nat = nat
        self.inside = inside

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.nat.arrived(self.inside, data, (addr[0], addr[1]))


class _InsideSide(asyncio.DatagramProtocol):
    def __init__(self, nat: UdpNat) -> None:
        self.nat = nat

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.nat.departing((addr[0], addr[1]), data)


class UdpNat:
    """The NAT box. `await nat.start()`, pass `nat.endpoint` to a DHTNode, `await nat.aclose()`."""

    def __init__(self) -> None:
        self._inside: asyncio.DatagramTransport | None = None
        self.mappings: dict[Address, Mapping] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls) -> AsyncIterator[UdpNat]:
        """A started NAT, closed on the way out."""
        nat = cls()
        await nat.start()
        try:
            yield nat
        finally:
            await nat.aclose()

    async def start(self) -> None:
        """Bind the NAT's inside socket."""
        loop = asyncio.get_running_loop()
        self._inside, _ = await loop.create_datagram_endpoint(
            lambda: _InsideSide(self), local_addr=(HOST, 0)
        )

    @property
    def inside_address(self) -> Address:
        """Where inside nodes send their tunnelled datagrams."""
        assert self._inside is not None
        host, port = self._inside.get_extra_info("sockname")[:2]
        return host, port

    async def aclose(self) -> None:
        """Close every public socket and the inside one."""
        for mapping in self.mappings.values():
            mapping.public.close()
        if self._inside is not None:
            self._inside.close()

    async def endpoint(
        self, factory: Any, local_addr: Address
    ) -> tuple[asyncio.DatagramTransport, RMAProtocol]:
        """A DHTNode endpoint behind this NAT (what `DHTNode(endpoint=...)` takes)."""
        loop = asyncio.get_running_loop()
        protocol: RMAProtocol = factory()
        inner, _ = await loop.create_datagram_endpoint(
            lambda: _Tunnel(protocol, self.inside_address), local_addr=(HOST, 0)
        )
        inside = inner.get_extra_info("sockname")[:2]
        public, _ = await loop.create_datagram_endpoint(
            lambda: _Public(self, inside), local_addr=(HOST, 0)
        )
        self.mappings[inside] = Mapping(inside, public)
        wrapper = _TunnelTransport(inner, self.inside_address)
        protocol.connection_made(wrapper)
        return wrapper, protocol

    def mapping_of(self, node_address: Address) -> Mapping:
        """The mapping of the node bound at `node_address` (its `DHTNode.address`)."""
        return self.mappings[node_address]

    def open(self, node_address: Address, *, open: bool = True) -> None:
        """Forward the node's public port to it from anyone (or stop doing so)."""
        self.mappings[node_address].open = open

    @property
    def dropped(self) -> int:
        """Datagrams turned away at every public socket so far."""
        return sum(sum(m.dropped.values()) for m in self.mappings.values())

    # The two directions.

    def departing(self, inside: Address, datagram: bytes) -> None:
        mapping = self.mappings.get(inside)
        if mapping is None or mapping.public.is_closing():
            return
        target, data = _unpack(datagram)
        mapping.allowed.add(target)
        mapping.public.sendto(data, target)

    def arrived(self, inside: Address, data: bytes, sender: Address) -> None:
        mapping = self.mappings[inside]
        if not (mapping.open or sender in mapping.allowed):
            mapping.dropped[sender] += 1
            return
        if self._inside is not None and not self._inside.is_closing():
            self._inside.sendto(_pack(sender, data), inside)


class _Tunnel(asyncio.DatagramProtocol):
    """The inside node's socket: takes datagrams from the NAT only, unwraps them."""

    def __init__(self, protocol: RMAProtocol, nat: Address) -> None:
        self.protocol = protocol
        self.nat = nat

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if (addr[0], addr[1]) != self.nat:
            return  # straight to the inside address: a NAT would never deliver it
        sender, payload = _unpack(data)
        self.protocol.datagram_received(payload, sender)

    def error_received(self, exc: Exception) -> None:
        self.protocol.error_received(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)


class _TunnelTransport(asyncio.DatagramTransport):
    """What the node's protocol writes to: every datagram goes to the NAT, wrapped."""

    def __init__(self, inner: asyncio.DatagramTransport, nat: Address) -> None:
        super().__init__()
        self._inner = inner
        self._nat = nat

    def sendto(self, data: Any, addr: Any = None) -> None:
        if not self._inner.is_closing():
            self._inner.sendto(_pack((addr[0], addr[1]), bytes(data)), self._nat)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()
