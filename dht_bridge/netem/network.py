"""The emulated network: hosts with emulated addresses, in-memory datagram endpoints, and
delivery after the link's delay, unless the datagram is lost, its link cut, a NAT refuses it or
(with `uplink`) the sender's line is full.

No socket is opened and nothing leaves the process: a datagram is a `call_later` on the
running loop that hands its bytes to the protocol bound at the destination address, so the
same network runs under a virtual clock. Addresses are in 10.0.0.0/8 and mean nothing outside
this process; each host gets its own /24, as volunteers at home do.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import random
import socket
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, Protocol, TypeVar

from dht_bridge.netem.model import Profile, unit_hash

__all__ = ["Address", "EmulatedNetwork", "EmulatedTransport", "Host", "Receiver", "Traffic"]

logger = logging.getLogger(__name__)

Address = tuple[str, int]
# Ports handed out for port 0, as an OS's ephemeral range.
EPHEMERAL_PORTS = range(40000, 60000)
# 10.x.y.1: the host number's two bytes pick the /24, so up to this many hosts.
MAX_HOSTS = 65535
# Above this many hosts, the median round trip is taken over a sample of pairs.
MEDIAN_PAIRS = 20000
# With an uplink limit: what a line holds beyond its rate (its buffer), in seconds of the rate;
# and the bytes each datagram adds to its payload on the line (IPv4 and UDP headers).
UPLINK_BUFFER_S = 0.2
DATAGRAM_OVERHEAD = 28


@dataclass
class Traffic:
    """What one host sent and received (datagrams and payload bytes) and what the network did
    not deliver: lost by the loss model, dropped on a cut link, refused by the receiver's NAT,
    or sent to an address where nothing is bound; and the datagrams the host's uplink had no
    room for (`overflow`, with an uplink limit only: they never left, so are not in `sent`)."""

    sent: int = 0
    sent_bytes: int = 0
    received: int = 0
    received_bytes: int = 0
    lost: int = 0
    cut: int = 0
    filtered: int = 0
    undeliverable: int = 0
    overflow: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Receiver(Protocol):
    """What an endpoint hands datagrams to: an asyncio datagram protocol."""

    def connection_made(self, transport: Any) -> None:
        """The endpoint is bound."""

    def connection_lost(self, exc: Exception | None) -> None:
        """The endpoint closed."""

    def datagram_received(self, data: bytes, addr: Address) -> None:
        """One datagram arrived from `addr`."""


P = TypeVar("P", bound=Receiver)


class _SocketFacts:
    """What callers read of a datagram socket (its family and name); options are ignored.
    DHTNode reads the family off the socket to resolve peers and check addresses."""

    family = socket.AF_INET
    type = socket.SOCK_DGRAM

    def __init__(self, address: Address) -> None:
        self._address = address

    def getsockname(self) -> Address:
        return self._address

    def setsockopt(self, *args: Any) -> None:
        """Buffer sizes mean nothing here."""


class EmulatedTransport(asyncio.DatagramTransport):
    """A datagram endpoint bound at an emulated address: what a protocol writes to."""

    def __init__(self, host: Host, address: Address, protocol: Receiver) -> None:
        super().__init__()
        self.host = host
        self.address = address
        self.protocol = protocol
        self._closed = False

    def sendto(self, data: Any, addr: Any = None) -> None:
        if not self._closed:
            self.host.network.send(self, bytes(data), addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self.address
        if name == "socket":
            return _SocketFacts(self.address)
        return default

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self.vanish()
        # As asyncio does: the protocol hears of the close on the loop, not inside close().
        self.host.network.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def vanish(self) -> None:
        """Unbind without telling the protocol, as when its process dies."""
        self._closed = True
        self.host.network.unbind(self)

    def get_write_buffer_size(self) -> int:
        return 0


class Host:
    """A machine of the emulated network: one address, a region, its access quality (0 the
    best line, up to 1 the slowest), and whether it sits behind a NAT."""

    def __init__(
        self, network: EmulatedNetwork, ip: str, region: str, access: float, *, nat: bool
    ) -> None:
        self.network = network
        self.ip = ip
        self.region = region
        self.access = access
        self.nat = nat
        # Behind a NAT: the addresses this host wrote to, the only ones whose datagrams get in
        # (address-and-port-dependent filtering). The mapping keeps the inside port.
        self.allowed: set[Address] = set()
        self.forwarded = False
        self.traffic = Traffic()
        self.endpoints: list[EmulatedTransport] = []
        self._next_port = EPHEMERAL_PORTS.start
        # The uplink's free room in bytes, as of the loop time `_line_at` (uplink limit only).
        self._line_room: float | None = None
        self._line_at = 0.0

    def __repr__(self) -> str:
        nat = ", nat" if self.nat else ""
        return f"Host({self.ip}, {self.region}{nat})"

    async def endpoint(
        self, factory: Callable[[], P], local_addr: Address
    ) -> tuple[asyncio.DatagramTransport, P]:
        """Bind a datagram endpoint on this host (what `DHTNode(endpoint=...)` takes). The host
        part of `local_addr` is ignored; port 0 picks a free port."""
        self.network.attach(asyncio.get_running_loop())
        protocol = factory()
        transport = self.bind(protocol, local_addr[1])
        protocol.connection_made(transport)
        return transport, protocol

    def bind(self, protocol: Receiver, port: int = 0) -> EmulatedTransport:
        """An endpoint at (this host, `port`) for `protocol`; OSError when the port is taken."""
        if port == 0:
            port = self._free_port()
        address = (self.ip, port)
        if address in self.network.bound:
            raise OSError(errno.EADDRINUSE, f"{self.ip}:{port} is in use")
        transport = EmulatedTransport(self, address, protocol)
        self.network.bound[address] = transport
        self.endpoints.append(transport)
        return transport

    def _free_port(self) -> int:
        for _ in EPHEMERAL_PORTS:
            port = self._next_port
            self._next_port = port + 1 if port + 1 < EPHEMERAL_PORTS.stop else EPHEMERAL_PORTS.start
            if (self.ip, port) not in self.network.bound:
                return port
        raise OSError(errno.EADDRNOTAVAIL, f"no free port on {self.ip}")

    def line_takes(self, size: int, now: float, rate: float) -> bool:
        """Has this host's uplink, of `rate` bytes/s, room at loop time `now` for a datagram
        of `size` payload bytes? If so, the room is taken (see `EmulatedNetwork`)."""
        full = rate * UPLINK_BUFFER_S
        room = full if self._line_room is None else self._line_room
        self._line_room = min(full, room + (now - self._line_at) * rate)
        self._line_at = now
        cost = size + DATAGRAM_OVERHEAD
        if self._line_room < cost:
            return False
        self._line_room -= cost
        return True

    def crash(self) -> None:
        """Every endpoint of this host vanishes at once: nothing more is sent or delivered, and
        no protocol is told (its process is gone)."""
        for transport in list(self.endpoints):
            transport.vanish()


class EmulatedNetwork:
    """Hosts placed in the regions of `profile`, and the datagrams between them.

    `seed` fixes the placement (the n-th host added is in the same region whatever was sent
    before), the links, and the losses and jitter for a given order of sends. Cut
    links with `cut`/`heal`, take a host off the network with `isolate`/`rejoin`, and read
    what each host sent and received in `Host.traffic`.

    `uplink` (bytes per second, None: no limit) is every host's line out: a token bucket that
    holds `UPLINK_BUFFER_S` of it, each datagram costing its payload plus 28 bytes of headers.
    A datagram sent when the bucket is empty is dropped (`Traffic.overflow`); one that fits
    leaves at once, so traffic under the limit is delivered exactly as without it (same delays,
    same losses for the same seed). A line is not a queue here: it drops, it never delays.
    """

    def __init__(self, profile: Profile, *, seed: int = 0, uplink: float | None = None) -> None:
        if uplink is not None and uplink <= 0:
            raise ValueError("uplink must be positive (or None: no limit)")
        self.profile = profile
        self.seed = seed
        self.uplink = uplink
        self.rng = random.Random(seed)
        self._placement = random.Random(f"{seed}:placement")
        self.hosts: list[Host] = []
        self.by_ip: dict[str, Host] = {}
        self.bound: dict[Address, EmulatedTransport] = {}
        self._cuts: set[frozenset[str]] = set()
        self._isolated: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._regions = [r.name for r in profile.regions]
        self._weights = [r.weight for r in profile.regions]

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop datagrams are delivered on (the first endpoint's)."""
        if self._loop is None:
            raise RuntimeError("no endpoint has been bound on this network yet")
        return self._loop

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on `loop` (the first endpoint's); every endpoint must share it."""
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("an emulated network runs on one event loop")

    # Hosts and links.

    def add_host(self, region: str | None = None, *, nat: bool = False) -> Host:
        """A new host in `region` (None: placed by the profile's weights)."""
        if len(self.hosts) >= MAX_HOSTS:
            raise ValueError(f"at most {MAX_HOSTS} hosts")
        if region is None:
            region = self._placement.choices(self._regions, self._weights)[0]
        elif region not in self._regions:
            raise ValueError(f"profile {self.profile.name} has no region {region!r}")
        number = len(self.hosts) + 1
        ip = str(ipaddress.IPv4Address((10 << 24) | (number << 8) | 1))
        host = Host(self, ip, region, unit_hash(self.seed, ip, "access"), nat=nat)
        self.hosts.append(host)
        self.by_ip[ip] = host
        return host

    def rtt(self, a: Host, b: Host) -> float:
        """The base round trip (seconds) of the link between two hosts, before jitter."""
        low, high = sorted((a.ip, b.ip))
        return self.profile.link_rtt(
            a.region,
            b.region,
            pair=unit_hash(self.seed, low, high),
            access_a=a.access,
            access_b=b.access,
        )

    def median_rtt(self, hosts: Iterable[Host] | None = None) -> float:
        """The median base round trip between distinct hosts of `hosts` (default: all)."""
        chosen = list(self.hosts if hosts is None else hosts)
        if len(chosen) < 2:
            return self.profile.median_rtt(seed=self.seed)
        pairs = len(chosen) * (len(chosen) - 1) // 2
        if pairs <= MEDIAN_PAIRS:
            rtts = [self.rtt(a, b) for i, a in enumerate(chosen) for b in chosen[i + 1 :]]
        else:
            sampler = random.Random(self.seed)
            rtts = [self.rtt(*sampler.sample(chosen, 2)) for _ in range(MEDIAN_PAIRS)]
        return statistics.median(rtts)

    def cut(self, a: Host, b: Host) -> None:
        """Drop everything between `a` and `b`, both ways, from now on."""
        self._cuts.add(frozenset((a.ip, b.ip)))

    def heal(self, a: Host, b: Host) -> None:
        """Undo `cut`."""
        self._cuts.discard(frozenset((a.ip, b.ip)))

    def isolate(self, host: Host) -> None:
        """Cut every link of `host`."""
        self._isolated.add(host.ip)

    def rejoin(self, host: Host) -> None:
        """Undo `isolate`."""
        self._isolated.discard(host.ip)

    def is_cut(self, a: str, b: str) -> bool:
        """Is the link between the hosts at these IPs cut?"""
        if a in self._isolated or b in self._isolated:
            return True
        return bool(self._cuts) and frozenset((a, b)) in self._cuts

    @property
    def traffic(self) -> Traffic:
        """Every host's traffic, summed."""
        total = Traffic()
        for host in self.hosts:
            total = total + host.traffic
        return total

    # Datagrams.

    def unbind(self, transport: EmulatedTransport) -> None:
        """Forget an endpoint that closed."""
        if self.bound.get(transport.address) is transport:
            del self.bound[transport.address]
        if transport in transport.host.endpoints:
            transport.host.endpoints.remove(transport)

    def send(self, transport: EmulatedTransport, data: bytes, addr: Any) -> None:
        """Put one datagram from `transport` on its way to `addr`."""
        host = transport.host
        try:
            target = (str(ipaddress.ip_address(addr[0])), int(addr[1]))
        except (TypeError, ValueError, IndexError):
            host.traffic.undeliverable += 1
            return
        if self.uplink is not None and not host.line_takes(
            len(data), self.loop.time(), self.uplink
        ):
            host.traffic.overflow += 1  # never left: not counted as sent
            return
        host.traffic.sent += 1
        host.traffic.sent_bytes += len(data)
        if host.nat:
            host.allowed.add(target)
        destination = self.by_ip.get(target[0])
        if destination is None:
            host.traffic.undeliverable += 1
            return
        if self.is_cut(host.ip, destination.ip):
            host.traffic.cut += 1
            return
        if self.profile.loss and self.rng.random() < self.profile.loss:
            host.traffic.lost += 1
            return
        delay = self.rtt(host, destination) / 2 * (1 + self.profile.jitter * self.rng.random())
        self.loop.call_later(delay, self._deliver, transport.address, target, data)

    def _deliver(self, source: Address, target: Address, data: bytes) -> None:
        destination = self.by_ip[target[0]]
        sender = self.by_ip[source[0]]
        if self.is_cut(source[0], target[0]):
            sender.traffic.cut += 1
            return
        transport = self.bound.get(target)
        if transport is None:
            sender.traffic.undeliverable += 1
            return
        if destination.nat and not destination.forwarded and source not in destination.allowed:
            destination.traffic.filtered += 1
            return
        destination.traffic.received += 1
        destination.traffic.received_bytes += len(data)
        transport.protocol.datagram_received(data, source)
