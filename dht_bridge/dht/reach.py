"""Reachability: can other nodes start a conversation with us over UDP?

A node behind NAT gets replies to its own requests (the NAT opened a hole towards each peer it
wrote to) but nobody else can reach it. To find out, a node sends `reach` to a server node; the
server sends a `stun` request to the caller's address from a fresh socket, one the caller's NAT
has never seen, and answers whether the probe got a reply, and the address it saw the caller
at. Only the caller's own IP address is probed, never one it names: a node cannot turn servers
into a reflector against a third party.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from dht_bridge.dht.address import contact_address, from_wire, to_wire
from dht_bridge.records import HOST_RE

logger = logging.getLogger(__name__)

REQUEST, RESPONSE = b"\x00", b"\x01"
MSG_ID_BYTES = 20
REACH_RPC = "reach"
# A worker asks a few servers; one answer from an honest server decides, several guard against
# a server that is wrong about itself (behind a firewall of its own) or lying.
DEFAULT_REACH_PEERS = 3

Address = tuple[str, int]
# Opens a datagram endpoint, as `loop.create_datagram_endpoint` (the node's `endpoint`).
ProbeEndpoint = Callable[
    [Callable[[], Any], Address], Awaitable[tuple[asyncio.DatagramTransport, Any]]
]


@dataclass(frozen=True)
class Reachability:
    """The verdict of a reachability check.

    `reachable` is None when no server answered. `observed` is the address servers saw our
    requests come from (the NAT's public side), the address to advertise in server mode.
    """

    reachable: bool | None
    observed: Address | None = None
    answers: int = 0
    confirmed: int = 0


class Requester(Protocol):
    """The part of RMAProtocol a check needs (kept abstract so this module imports no node)."""

    async def request(
        self, address: Address, name: str, *args: Any, wait: float | None = None
    ) -> tuple[bool, Any]:
        """Send one RPC and wait for its reply."""


def parse_answer(reply: Any) -> tuple[bool, Address] | None:
    """A server's answer to `reach`: (reachable, observed address), or None if malformed; so
    is an observed address our record could not hand out (not an IP address, a port outside
    1..65535, an IPv6 scope)."""
    if not isinstance(reply, dict):
        return None
    reachable = reply.get("reachable")
    observed = contact_address(reply.get("host"), reply.get("port"))
    if not isinstance(reachable, bool) or observed is None or not HOST_RE.fullmatch(observed[0]):
        return None
    return reachable, observed


async def check(
    protocol: Requester,
    node_id: bytes,
    peers: Iterable[Address],
    *,
    port: int = 0,
    wait: float,
    want: int = DEFAULT_REACH_PEERS,
) -> Reachability:
    """Ask up to `want` of `peers` at once whether they could reach us (on `port`, or on the
    port they see our requests come from when 0). Reachable when most answers say so."""
    asked = list(dict.fromkeys(peers))[:want]
    replies = await asyncio.gather(
        *(protocol.request(peer, REACH_RPC, node_id, port, wait=wait) for peer in asked)
    )
    answers = [a for ok, reply in replies if ok and (a := parse_answer(reply)) is not None]
    if not answers:
        logger.info("no server answered the reachability check (asked %d)", len(asked))
        return Reachability(None)
    confirmed = sum(1 for reachable, _ in answers if reachable)
    verdict = confirmed * 2 > len(answers)
    # The address most servers saw, among those that reached us when any did: one server's
    # word (a liar's, or one behind a NAT of its own) must not choose what our record hands out.
    seen = [addr for reachable, addr in answers if reachable == (confirmed > 0)]
    observed = Counter(seen).most_common(1)[0][0]
    logger.debug("reachability: %d of %d say reachable at %s", confirmed, len(answers), observed)
    return Reachability(verdict, observed, len(answers), confirmed)


class _Probe(asyncio.DatagramProtocol):
    """One `stun` request from a fresh socket, waiting for its reply from the target only."""

    def __init__(self, target: Address, msg_id: bytes, done: asyncio.Future[bool]) -> None:
        self.target = target
        self.msg_id = msg_id
        self.done = done

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if (
            from_wire(addr) == self.target
            and data[:1] == RESPONSE
            and data[1 : 1 + MSG_ID_BYTES] == self.msg_id
            and not self.done.done()
        ):
            self.done.set_result(True)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: nobody listens there; the timeout gives the same answer.
        logger.debug("reachability probe to %s: %s", self.target, exc)


async def probe(
    target: Address, *, bind_host: str, wait: float, endpoint: ProbeEndpoint | None = None
) -> bool:
    """Does `target` answer a `stun` request sent from a socket it never wrote to? The socket
    is opened by `endpoint` (default: a UDP socket), as the node's own."""
    loop = asyncio.get_running_loop()
    msg_id = os.urandom(MSG_ID_BYTES)
    done: asyncio.Future[bool] = loop.create_future()
    transport, _ = await (endpoint or _udp_endpoint)(
        lambda: _Probe(target, msg_id, done), (bind_host, 0)
    )
    try:
        sock = transport.get_extra_info("socket")
        family = sock.family if sock is not None else socket.AF_INET
        request = REQUEST + msg_id + msgpack.packb(["stun", []])
        transport.sendto(request, to_wire(target, family))
        async with asyncio.timeout(wait):
            return await done
    except TimeoutError:
        return False
    finally:
        transport.close()


async def _udp_endpoint(
    factory: Callable[[], Any], local_addr: Address
) -> tuple[asyncio.DatagramTransport, Any]:
    return await asyncio.get_running_loop().create_datagram_endpoint(factory, local_addr=local_addr)
