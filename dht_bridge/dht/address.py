"""Which addresses a DHT contact may have: an IP literal and a port in range, nothing else.

A contact's address arrives in other nodes' FIND_NODE answers, so it is hostile input. asyncio
treats anything but an OSError from `sendto` as fatal and closes the whole UDP transport: a
host with a NUL byte in it (a TypeError) silenced every node that learned it. A host name
would also make `sendto` resolve it, blocking the event loop on DNS. So an address is checked
here before it enters a routing table, a reply or a datagram.

A node bound to `::` on a dual-stack host (the Linux default) speaks to IPv4 contacts too: the
kernel shows their datagrams as coming from v4-mapped addresses (`::ffff:a.b.c.d`). Contacts
are kept in their plain IPv4 form, the one every other node can use, and mapped back only on
the way to the kernel (`to_wire`, `from_wire`).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import Any

__all__ = [
    "Address",
    "contact_address",
    "dual_stack",
    "from_wire",
    "sendable",
    "to_wire",
]

Address = tuple[str, int]
# Host strings whose parse is remembered.
HOST_MEMO = 16384


def contact_address(host: object, port: object) -> Address | None:
    """The canonical (ip, port) of a contact, or None when it cannot be one: the host must be
    an IP literal that names one machine (not unspecified, multicast or broadcast), the port
    an int in 1..65535."""
    if not isinstance(host, str) or type(port) is not int or not 0 < port < 65536:
        return None
    ip = _canonical_host(host)
    return None if ip is None else (ip, port)


# Every FIND_NODE answer names up to 20 contacts, mostly ones seen before: parsing each with
# `ipaddress` again was a fifth of a node's CPU in the field bench (500 nodes). Bounded, so
# hostile answers full of new hosts only evict.
@functools.lru_cache(maxsize=HOST_MEMO)
def _canonical_host(host: str) -> str | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # one contact, one spelling: what an IPv4-only node can send to
    if ip.is_unspecified or ip.is_multicast:
        return None
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        return None
    return str(ip)


def sendable(addr: object, family: int, *, dual: bool = False) -> Address | None:
    """`addr` as a contact address that a socket of `family` can send to, or None. A
    `dual`-stack IPv6 socket can send to IPv4 contacts as well (through `to_wire`)."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        return None
    checked = contact_address(addr[0], addr[1])
    if checked is None:
        return None
    if ":" in checked[0]:
        return checked if family == socket.AF_INET6 else None
    return checked if family == socket.AF_INET or dual else None


def to_wire(addr: Address, family: int) -> Address:
    """How the kernel wants `addr` from a socket of `family`: an IPv4 contact v4-mapped for an
    IPv6 socket."""
    if family == socket.AF_INET6 and ":" not in addr[0]:
        return f"::ffff:{addr[0]}", addr[1]
    return addr


def from_wire(addr: tuple[Any, ...]) -> Address:
    """The contact form of an address the kernel reports: (host, port), v4-mapped made IPv4."""
    host: str = addr[0]
    if host.startswith("::ffff:") and "." in host:
        return host[7:], addr[1]
    return host, addr[1]


def dual_stack(sock: socket.socket | None) -> bool:
    """Is `sock` an IPv6 socket bound to every address that also receives IPv4 (IPV6_V6ONLY
    off, as Linux has it by default)?"""
    if sock is None or sock.family != socket.AF_INET6:
        return False
    try:
        wildcard = ipaddress.ip_address(sock.getsockname()[0]).is_unspecified
        v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except (OSError, ValueError):
        return False
    return wildcard and not v6only
