"""Which addresses a DHT contact may have: an IP literal and a port in range, nothing else.

A contact's address arrives in other nodes' FIND_NODE answers, so it is hostile input. asyncio
treats anything but an OSError from `sendto` as fatal and closes the whole UDP transport: a
host with a NUL byte in it (a TypeError) silenced every node that learned it. A host name
would also make `sendto` resolve it, blocking the event loop on DNS. So an address is checked
here before it enters a routing table, a reply or a datagram.
"""

from __future__ import annotations

import functools
import ipaddress
import socket

__all__ = ["Address", "contact_address", "sendable"]

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
    if ip.is_unspecified or ip.is_multicast:
        return None
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        return None
    return str(ip)


def sendable(addr: object, family: int) -> Address | None:
    """`addr` as a contact address that a socket of `family` can send to, or None."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        return None
    checked = contact_address(addr[0], addr[1])
    if checked is None:
        return None
    wanted = socket.AF_INET6 if ":" in checked[0] else socket.AF_INET
    return checked if family == wanted else None
