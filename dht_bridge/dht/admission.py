"""Who may enter a routing table and how much a node may send to an address that has not
shown it receives: the answers to a Sybil flood and to reflection.

Node ids are free: one socket can claim thousands. Addresses are not. So the routing table
(and each lookup's shortlist) counts contacts per network group and admits at most a few per
IP and per /24 (IPv6: per /64 and per /48), as libp2p's kad-dht and libtorrent do. And an
address counts as proved only once it answered a request of ours (a reply carries our random
20-byte message id, which an off-path spoofer never sees), as QUIC's address validation and
BEP 5's tokens do: until then our answers to it stay within `AMPLIFICATION` times what it
sent. Last, each IP group's requests are metered (`RequestBudget`), as libtorrent's DHT does:
one host's flood is dropped before it is parsed, not answered at the cost of our loop.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from dht_bridge.errors import ConfigError

__all__ = [
    "AMPLIFICATION",
    "DEFAULT_DIVERSITY",
    "VALIDATION_TTL",
    "DiversityLimits",
    "Groups",
    "RequestBudget",
    "TokenBuckets",
    "ValidatedAddresses",
    "within_limits",
]

# Bytes we send an unproved address, at most, per byte it sent us (QUIC's limit is 3).
AMPLIFICATION = 3
# How long an address that answered one of our requests counts as proved (BEP 5 tokens live
# 10 minutes). Contacts in use answer our lookups far more often than that.
VALIDATION_TTL = 600.0
# Proved addresses remembered at most (oldest forgotten first).
MAX_VALIDATED = 16384
# Requests one IP group may send a node a second, and at once. An answered FIND_NODE costs
# about 170 µs of our loop on a slow machine, a dropped request about 10: one host sending
# 20,000 a second took more than the whole loop, and now takes under a third of it. Honest
# traffic from one address to one node is a few requests per crawl through it; a bridge
# republishing thousands of records into a small network sends the most (coordinators are
# not metered at all: see RMAProtocol).
REQUEST_RATE = 500.0
REQUEST_BURST = 2000.0
# A request costs one token per this many bytes more: parsing is what a request costs before
# it can be refused, about 0.7 ms for 8 KB of empty msgpack arrays against a few µs for a
# PING, so a host sending the biggest datagrams gets a ninth as many read.
BYTES_PER_TOKEN = 1024
# IP groups metered at once; the one idle longest is forgotten first (its bucket was full).
MAX_METERED = 16384
# Signature checks the records one IP group STOREs may cost a node a second, and at once. A
# check costs about 0.2 to 0.35 ms: one host replaying some 4,200 records of its own (more than
# the verifier remembers) made every record of every 8 KB STORE a check, 7.5 to 11 ms each, so
# 90 to 130 STOREs a second took a whole core. Honest senders store one record a STORE, or push
# a newcomer the values it should hold (the burst); coordinators are not metered.
CHECK_RATE = 200.0
CHECK_BURST = 1000.0

# (IP group, subnet group) of an address; equal keys count against the same limit.
Groups = tuple[str, str]


@dataclass(frozen=True)
class DiversityLimits:
    """At most this many contacts per IP group and per subnet group, per bucket (and per
    lookup's shortlist) and per routing table.

    The IP group is the IPv4 address or the IPv6 /64 (what one subscriber gets); the subnet
    group the IPv4 /24 or the IPv6 /48. With k = 20, 2 per IP per bucket leaves 18 of any
    bucket to others; 4 per IP per table (k/5) bounds what one address puts in any FIND_NODE
    answer, which draws on the one or two buckets nearest the key. Loopback addresses
    (127.0.0.0/8, ::1) are grouped by ip:port when `loopback_by_port` is set: a test
    network or the demo runs hundreds of nodes on 127.0.0.1, and only processes of this
    machine can send from there. `enabled=False` switches the limits off (measurements only).
    """

    per_ip_bucket: int = 2
    per_ip_table: int = 4
    per_subnet_bucket: int = 3
    per_subnet_table: int = 8
    loopback_by_port: bool = True
    enabled: bool = True

    def __post_init__(self) -> None:
        if min(self.per_ip_bucket, self.per_ip_table) < 1:
            raise ConfigError("diversity limits must be at least 1")
        if self.per_subnet_bucket < self.per_ip_bucket or self.per_subnet_table < self.per_ip_table:
            raise ConfigError("a subnet's limits cannot be below an IP's")

    def groups(self, ip: str, port: int) -> Groups:
        """The IP group and subnet group that `ip:port` counts against."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return ip, ip  # never a contact (see dht.address), but never a crash either
        if addr.is_loopback and self.loopback_by_port:
            home = f"{addr}:{port}"
            return home, home
        if isinstance(addr, ipaddress.IPv4Address):
            return str(addr), str(ipaddress.ip_network(f"{addr}/24", strict=False))
        return (
            str(ipaddress.ip_network(f"{addr}/64", strict=False)),
            str(ipaddress.ip_network(f"{addr}/48", strict=False)),
        )


DEFAULT_DIVERSITY = DiversityLimits()

T = TypeVar("T")


def within_limits(
    ordered: Iterable[T],
    limits: DiversityLimits,
    count: int,
    *,
    groups: Callable[[T], Groups],
    exempt: Callable[[T], bool] | None = None,
) -> list[T]:
    """The first `count` of `ordered` with at most a bucket's share (`per_ip_bucket`,
    `per_subnet_bucket`) per IP and subnet group; `exempt` ones (coordinators) count for none."""
    if not limits.enabled:
        return list(ordered)[:count]
    per_ip: Counter[str] = Counter()
    per_subnet: Counter[str] = Counter()
    kept: list[T] = []
    for item in ordered:
        if len(kept) >= count:
            break
        if exempt is None or not exempt(item):
            ip, subnet = groups(item)
            if per_ip[ip] >= limits.per_ip_bucket or per_subnet[subnet] >= limits.per_subnet_bucket:
                continue
            per_ip[ip] += 1
            per_subnet[subnet] += 1
        kept.append(item)
    return kept


class ValidatedAddresses:
    """Addresses that answered one of our requests lately: they receive what we send them."""

    def __init__(
        self,
        *,
        ttl: float = VALIDATION_TTL,
        capacity: int = MAX_VALIDATED,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.ttl = ttl
        self.capacity = capacity
        # Read when built, not when imported: a virtual clock patches time.monotonic.
        self.clock = clock or time.monotonic
        self._seen: OrderedDict[tuple[str, int], float] = OrderedDict()

    def prove(self, addr: tuple[str, int]) -> None:
        """`addr` answered a request of ours just now."""
        self._seen[addr] = self.clock()
        self._seen.move_to_end(addr)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def __contains__(self, addr: object) -> bool:
        seen = self._seen.get(addr)  # type: ignore[call-overload]
        return seen is not None and self.clock() - seen < self.ttl

    def __len__(self) -> int:
        return len(self._seen)


class TokenBuckets:
    """A token bucket per key (an IP group): `rate` tokens a second, `burst` at most; past
    `capacity` keys the one idle longest is forgotten (its bucket was full)."""

    def __init__(
        self,
        *,
        rate: float = CHECK_RATE,
        burst: float = CHECK_BURST,
        capacity: int = MAX_METERED,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if rate <= 0 or burst < 1 or capacity < 1:
            raise ConfigError("token buckets need rate > 0, burst >= 1 and capacity >= 1")
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        self.clock = clock or time.monotonic
        # key -> (tokens left, when counted); least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, tokens: float = 1.0) -> bool:
        """Take `tokens` from `key`'s bucket; False (and nothing taken) when it has fewer."""
        now = self.clock()
        held = self._buckets.pop(key, None)
        if held is None:
            left = self.burst
            if len(self._buckets) >= self.capacity:
                self._buckets.popitem(last=False)
        else:
            left = min(self.burst, held[0] + (now - held[1]) * self.rate)
        allowed = left >= tokens
        self._buckets[key] = (left - tokens if allowed else left, now)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


class RequestBudget:
    """A token bucket per sender's IP group (the first of `groups(ip, port)`, as
    `DiversityLimits.groups` or the routing table's memo of it): `rate` requests a second,
    `burst` at once (a request costs more tokens the bigger it is: `cost`); requests beyond
    it are to be dropped unanswered."""

    def __init__(
        self,
        groups: Callable[[str, int], Groups],
        *,
        rate: float = REQUEST_RATE,
        burst: float = REQUEST_BURST,
        capacity: int = MAX_METERED,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.groups = groups
        self.rate = rate
        self._buckets = TokenBuckets(rate=rate, burst=burst, capacity=capacity, clock=clock)

    def allow(self, addr: tuple[str, int], size: int = 0) -> bool:
        """Take a request of `size` bytes from `addr`'s group; False when the group has not
        enough tokens left."""
        return self._buckets.take(self.groups(*addr)[0], cost_of(size))

    def __len__(self) -> int:
        return len(self._buckets)


def cost_of(size: int) -> float:
    """The tokens a request of `size` bytes takes from its sender's budget."""
    return 1.0 + size / BYTES_PER_TOKEN
