"""Our Kademlia protocol: the library's wire format, with safe parsing, short timeouts,
honest failure accounting, merged stores, and replication that reaches the right nodes.

Server and client mode, as libp2p's kad-dht has them: a node in client mode (behind NAT, so
nobody can start a conversation with it) marks every request it sends with `CLIENT_TAG` at the
start of the message id, answers nothing but `stun` (the reachability probe), and is never
added to a routing table: a server that sees the tag answers the request and forgets the
sender. The message id is opaque to the stock library, which echoes it back unread, so the wire
format stays the library's.

Admission and reflection (see dht.admission): a node that sends us a request is not taken as
a contact; we ping it (a client: `stun`) and take whoever answers from that address with the
id it answered, within the routing table's diversity limits. Until the caller's address has
answered one of our requests, what we send it stays within `AMPLIFICATION` times its request,
the check included. Our nodes pad their FIND_NODE / FIND_VALUE requests to an address that
has not heard them answer lately (`padded_size`), as QUIC pads its first packet: three times
the padded request pays for the check and a full contact list, so the answer comes at once.
A bigger answer (a value) is cut to fit for our nodes, listing the caller itself (no full
answer does), and they ask again once they have answered the check; each request then lives
one round trip. Anyone else (a stock node) gets the full answer when it has answered the
check; if it does not, what fits. The stock library reads one msgpack object from a datagram
and ignores the padding after it, so the wire format stays the library's.

A FIND_VALUE to a node that is likely to hold the value (near the key: see the crawl) is
padded further, to `VALUE_PADDED`, QUIC's datagram size: three times that pays for a value cut
to fit (`RecordStorage.share`: a random share of the records, its overflow mark kept and
backed), marked `partial` in the answer, so the first read from a holder costs one round trip
too. A reader that wants every record asks again for the rest; a lookup that wants a few
providers does not.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

try:  # FIONREAD: is a reply waiting in our own socket (see `_expire`)
    import fcntl
    import termios
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

import msgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from rpcudp.protocol import RPCProtocol

from dht_bridge.closing import wait_closed
from dht_bridge.dht import reach as dht_reach
from dht_bridge.dht.address import dual_stack, from_wire, sendable, to_wire
from dht_bridge.dht.admission import (
    AMPLIFICATION,
    DEFAULT_DIVERSITY,
    VALIDATION_TTL,
    DiversityLimits,
    RequestBudget,
    ValidatedAddresses,
)
from dht_bridge.dht.renew import RENEW_RPC
from dht_bridge.dht.routing import RMARoutingTable
from dht_bridge.dht.rtt import RoundTrips
from dht_bridge.dht.storage import UNPROVEN, RecordStorage
from dht_bridge.dht.values import MAX_DATAGRAM_BODY
from dht_bridge.options import format_hostport

logger = logging.getLogger(__name__)

REQUEST, RESPONSE = b"\x00", b"\x01"
MSG_ID_BYTES = 20
NODE_ID_BYTES = 20
RPC_NAMES = frozenset(
    {"ping", "stun", "store", "find_node", "find_value", dht_reach.REACH_RPC, RENEW_RPC}
)
MAX_PUSH_TASKS = 64
# A contact that full buckets cannot keep is "new" at every request it sends; it is pushed the
# values it should hold once per this many seconds, not at each of its heartbeat STOREs.
WELCOME_MEMORY = 600.0
# Newcomers pushed values, per IP group: a burst of a routing table's share of one address,
# then one a minute. Finding what a newcomer should hold walks every stored key (0.1 s at
# 20,000 keys, after a change of the table), and one host minting ids, each let in and then
# dropped, could make every welcome such a walk. Over it, a newcomer is taken in unpushed:
# the owners' next heartbeats reach it all the same.
WELCOME_RATE = 1 / 60
WELCOME_BURST = 4
MAX_WELCOMED = 8192
# A contact that joins again (see `_rejoining`) is pushed its values at most once this often:
# anyone can send a join in a contact's name, and the check only shows the contact is there,
# so this bounds what a spoofer draws towards it as WELCOME_MEMORY does for a newcomer's id.
REJOIN_MEMORY = WELCOME_MEMORY
# A seed welcomes a joiner on its first ping, so the joiner's own-id lookup comes after that
# welcome; elsewhere the lookup comes first. Either way the two belong to one join when they
# are this many rpc timeouts apart or less (one check's exchange, with room for a slow loop).
JOIN_SPAN = 2.0
_UNKNOWN: Any = object()
# Requests of a node in client mode start their message id with this; a server's with
# SERVER_TAG. Four bytes: a stock node's random id carries either by chance once in 2 billion
# requests. The other 16 bytes stay random: nobody off the path can guess a reply's id.
CLIENT_TAG = b"RMAc"
SERVER_TAG = b"RMAs"
OUR_TAGS = (CLIENT_TAG, SERVER_TAG)
# What a node in client mode still answers: the probe that tells it whether it is reachable.
CLIENT_ANSWERS = frozenset({"stun"})
# Reachability probes a server runs at once; more wait for none (the asker tries elsewhere).
MAX_PROBES = 16
# A timeout that fires this share of the RPC timeout late says more about our own event loop
# than about the peer: the request gets one more RPC timeout (see `_expire`).
LATE_SHARE = 0.5
# Address checks (a ping, or `stun` to a client) in flight at most; more callers wait for a
# later request. One at a time per address. A check costs a timer and a few hundred bytes;
# while they are all taken, new callers get cut answers, so spoofed requests must not fill
# them cheaply (at this many, an attacker sends this many spoofed requests per RPC timeout).
MAX_CHECKS = 512
# An address that left a check unanswered is not checked again for this long: a spoofed
# source gets at most one check per this many seconds, whatever ids are claimed in its name
# (and answers cut to its budget, which pays for the check anyway). Short, because an honest
# node whose check was lost (or answered late by a busy loop) is not admitted meanwhile.
CHECK_COOLDOWN = 10.0
MAX_UNANSWERED = 4096
# Answers that can outgrow an unproved caller's budget: held for its check, or cut to fit.
BOUNDED_RPCS = frozenset({"find_node", "find_value"})
# Answers held per address while its check is under way; more are cut to fit at once.
MAX_HELD = 8
# What a FIND_VALUE to a likely holder is padded to: QUIC's 1200 bytes and DNS's 1232 (a
# datagram no path cuts into fragments), so three times it pays for a value of about 3.5 KB.
VALUE_PADDED = 1232
# No node of ours sends a bigger datagram: a request body is at most MAX_DATAGRAM_BODY (as
# rpcudp's), a reply carries a value that was once such a body. Bigger ones are dropped before
# parsing (64 KB of empty msgpack arrays cost the loop 5 to 17 ms).
MAX_DATAGRAM = 1 + MSG_ID_BYTES + MAX_DATAGRAM_BODY + 256
# The key of a FIND_VALUE answer that carries a cut value (`RecordStorage.share`); the stock
# library reads only "value" and ignores it.
PARTIAL = "partial"
# An address that got an answer of ours counts as proved there for VALIDATION_TTL; we count
# on it for half that (it may have restarted, or forgotten us among many), then pad again.
HEARD_TTL = VALIDATION_TTL / 2
# A flood is logged once per this many seconds (with the count so far), never per request.
BUDGET_WARNING_EVERY = 60.0

Address = tuple[str, int]
Reply = tuple[bool, Any]


@dataclass(slots=True)
class Pending:
    """A request awaiting its reply."""

    future: asyncio.Future[Reply]
    timer: asyncio.TimerHandle
    address: Address
    name: str
    reprieved: bool = False


@dataclass
class TrafficStats:
    """Datagrams and bytes through this node's socket, and what went wrong."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    requests_in: int = 0
    timeouts: int = 0
    # Timeouts that fired while our own loop ran late, and were given one more timeout.
    reprieves: int = 0
    malformed: int = 0
    # Requests dropped unread: their IP group was over its budget (see RequestBudget).
    over_budget: int = 0
    # Datagrams not sent: their address is no contact's (see dht.address), or the socket
    # refused them. Either way one peer's problem, never the socket's.
    unsendable: int = 0
    stores_pushed: int = 0
    # Newcomers taken in without the values they should hold: their IP group was over its
    # welcomes (see WELCOME_RATE).
    unpushed: int = 0
    # Requests left unanswered in client mode: a server that treats us as a contact.
    ignored: int = 0
    # Requests from client-mode nodes answered (they never enter the routing table).
    client_requests: int = 0
    probes: int = 0
    # Address checks sent (see dht.admission) and those left unanswered.
    checks: int = 0
    checks_failed: int = 0
    # Answers held until the caller's address answered our check, and those cut to fit its
    # budget instead (the check went unanswered, or none could be sent).
    held_answers: int = 0
    bounded_answers: int = 0
    # Of those, values cut to fit (a share of the records, see `RecordStorage.share`).
    cut_values: int = 0
    # Bytes in and out by RPC, requests and their replies together (e.g. "store": what
    # heartbeats cost, "find_node": what crawls cost), plus "malformed", "over_budget" and
    # "unmatched" (a reply after its request timed out): where a node's traffic goes,
    # summing to bytes in+out.
    rpc_bytes: dict[str, int] = field(default_factory=dict)

    def count_rpc(self, name: str, size: int) -> None:
        """Add `size` bytes to `name`'s tally."""
        self.rpc_bytes[name] = self.rpc_bytes.get(name, 0) + size


class RMAProtocol(KademliaProtocol):  # type: ignore[misc]
    """The library's protocol, with what our network needs and nothing fire-and-forget."""

    def __init__(
        self,
        source_node: Node,
        storage: RecordStorage,
        ksize: int,
        *,
        rpc_timeout: float,
        max_failures: int,
        client: bool = False,
        limits: DiversityLimits = DEFAULT_DIVERSITY,
        pinned: tuple[Address, ...] = (),
    ) -> None:
        RPCProtocol.__init__(self, wait_timeout=rpc_timeout)
        self.transport: asyncio.DatagramTransport | None = None
        # Client mode: see the module docstring. Switched at run time by the node.
        self.client = client
        # Set while answering a request from a client-mode node: its sender is not a contact.
        self._from_client = False
        self._probing = 0
        # Held contacts that said they are clients now, being pinged before they are dropped.
        self._leaving: set[bytes] = set()
        self.router = RMARoutingTable(
            self, ksize, source_node, max_failures=max_failures, limits=limits, pinned=pinned
        )
        # Requests per IP group; None meters nobody (a reference in the attack bench). The
        # table's memo of groups by address: parsing the address was most of what a dropped
        # request cost.
        self.budget: RequestBudget | None = RequestBudget(self.router.groups_at)
        self._welcomes = RequestBudget(
            self.router.groups_at, rate=WELCOME_RATE, burst=WELCOME_BURST
        )
        self._budget_warned = -math.inf
        # Addresses that answered one of our requests: they get full answers.
        self.validated = ValidatedAddresses()
        # Addresses we answered lately: they count us proved, so our requests go unpadded.
        self.heard_us = ValidatedAddresses(ttl=HEARD_TTL)
        self._checking: set[Address] = set()
        self._unanswered: OrderedDict[Address, float] = OrderedDict()
        # Per address under check: full answers and, should the check fail, what fits instead.
        self._held: dict[Address, list[tuple[str, bytes, Callable[[], bytes]]]] = {}
        # Bytes sent in checks while answering the current request (its budget pays for them).
        self._spent = 0
        self.storage = storage
        self.source_node = source_node
        self.stats = TrafficStats()
        self.round_trips = RoundTrips()
        self._outstanding: dict[bytes, Pending] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._welcomed: OrderedDict[bytes, float] = OrderedDict()
        self._rejoined: OrderedDict[bytes, float] = OrderedDict()
        # A join's two halves, to tell its own lookup from a restart's (see `_rejoining`):
        # when its own-id lookup reached us, and when we welcomed it before that lookup came.
        self._joined: OrderedDict[bytes, float] = OrderedDict()
        self._lookup_due: OrderedDict[bytes, float] = OrderedDict()
        self._bounds: dict[bytes, int | None] = {}
        self._bounds_version = -1
        self._family = socket.AF_INET
        self._fileno: int | None = None  # the socket's, to look for unread datagrams
        self.dual_stack = False  # an IPv6 socket on `::` that reaches IPv4 contacts too
        self._closing = False
        self._lost: asyncio.Future[None] | None = None  # done when the transport has closed
        # Called when the transport closes without `aclose` (the node reopens it).
        self.on_lost: Callable[[Exception | None], None] | None = None
        # Opens the probes' sockets (None: UDP); the node sets it to its own endpoint.
        self.endpoint: dht_reach.ProbeEndpoint | None = None

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:
        """Take a (new) transport; remember its family to check addresses against."""
        self.transport = transport
        sock = transport.get_extra_info("socket")
        self._family = sock.family if sock is not None else socket.AF_INET
        # The emulated network's transports stand in a socket's facts, with no descriptor.
        fileno = getattr(sock, "fileno", None)
        self._fileno = fileno() if callable(fileno) else None
        self.dual_stack = dual_stack(sock)
        self._lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket closed: on purpose after `aclose`, otherwise tell the node."""
        self._fileno = None  # its number may be given to the next file opened
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if self._closing:
            return
        logger.warning("DHT socket closed unexpectedly: %r", exc)
        if self.on_lost is not None:
            self.on_lost(exc)

    @property
    def _join_span(self) -> float:
        """Seconds within which a welcome and an own-id lookup belong to one join."""
        return JOIN_SPAN * float(self._wait_timeout)

    @property
    def listening(self) -> bool:
        """Is the socket open?"""
        return self.transport is not None and not self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        # The library turns any unknown attribute into a remote call; a typo should be an error.
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # Tasks: every background coroutine is owned here and cancelled on close.

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any] | None:
        """Run `coro` as a task this protocol owns; errors are logged, never lost."""
        if self.transport is None or self.transport.is_closing():
            coro.close()
            return None
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def adopt(self, task: asyncio.Task[Any]) -> None:
        """Take ownership of a running task (a request its caller no longer waits for)."""
        if task.done():
            return
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("background task %s failed", task.get_name(), exc_info=task.exception())

    async def aclose(self) -> None:
        """Cancel owned tasks and pending requests, then close the socket."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pending in self._outstanding.values():
            pending.timer.cancel()
            if not pending.future.done():
                pending.future.set_result((False, None))
        self._outstanding.clear()
        transport, lost = self.transport, self._lost
        open_before = transport is not None and not transport.is_closing()
        self.close()
        if transport is None or lost is None or not open_before:
            return
        # Else an agent restarted in the same process could not bind the port again; an abort
        # drops datagrams still queued for a socket that cannot send.
        await wait_closed(transport, lost)

    def close(self) -> None:
        """Close the socket on purpose (the node does not reopen it)."""
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    # Inbound datagrams, parsed defensively: a malformed packet is counted and dropped.

    def datagram_received(self, data: bytes, addr: Address) -> None:
        """Parse and answer a datagram inline; requests are handled synchronously."""
        self.stats.packets_in += 1
        self.stats.bytes_in += len(data)
        try:
            self._dispatch(data, from_wire(addr))
        except Exception as exc:  # anything a hostile packet can provoke
            self.stats.malformed += 1
            self.stats.count_rpc("malformed", len(data))
            logger.debug("dropped malformed datagram from %s: %r", addr, exc)

    def error_received(self, exc: Exception) -> None:
        """ICMP errors (port unreachable) show up here; the request timeout handles them."""
        logger.debug("socket error: %s", exc)

    def _dispatch(self, data: bytes, addr: Address) -> None:
        if not 1 + MSG_ID_BYTES + 1 <= len(data) <= MAX_DATAGRAM:
            raise ValueError(f"a datagram of {len(data)} bytes")
        kind, msg_id = data[:1], data[1 : 1 + MSG_ID_BYTES]
        if kind == REQUEST and not self._within_budget(addr, len(data)):
            return
        if kind == RESPONSE and not self._awaited(msg_id, addr, len(data)):
            return  # parsed only when it answers a request of ours, from where we sent it
        try:
            payload = msgpack.unpackb(data[1 + MSG_ID_BYTES :])
        except msgpack.ExtraData as extra:
            if kind != REQUEST:
                raise
            payload = extra.unpacked  # a padded request (see `padded_size`)
        if kind == REQUEST:
            self._answer(msg_id, payload, addr, len(data))
        elif kind == RESPONSE:
            self._accept_reply(msg_id, payload, addr, len(data))
        else:
            raise ValueError(f"unknown message kind {kind!r}")

    def _within_budget(self, addr: Address, size: int) -> bool:
        """Whether a request from `addr` is read: coordinators always (a bridge republishing
        Redis sends the most), others while their IP group has budget left."""
        budget = self.budget
        if budget is None or addr in self.router.pinned or budget.allow(addr, size):
            return True
        self.stats.over_budget += 1
        self.stats.count_rpc("over_budget", size)
        now = time.monotonic()
        if now - self._budget_warned >= BUDGET_WARNING_EVERY:
            self._budget_warned = now
            logger.warning(
                "dropping requests from %s: over %g a second (%d dropped so far)",
                format_hostport(*addr),
                budget.rate,
                self.stats.over_budget,
            )
        return False

    def _answer(self, msg_id: bytes, payload: Any, addr: Address, size: int) -> None:
        if not (isinstance(payload, list) and len(payload) == 2 and isinstance(payload[1], list)):
            raise ValueError("request is not [name, args]")
        name, args = payload
        if name not in RPC_NAMES:
            raise ValueError(f"unknown rpc {name!r}")
        self.stats.requests_in += 1
        if self.client and name not in CLIENT_ANSWERS:
            # Not a contact: stay silent, so a stock node that took us for one drops us.
            self.stats.ignored += 1
            self.stats.count_rpc(name, size)
            return
        if name == dht_reach.REACH_RPC:
            self._start_probe(msg_id, addr, args)
            self.stats.count_rpc(name, size)
            return
        self._from_client = msg_id.startswith(CLIENT_TAG)
        self._spent = 0
        try:
            if self._from_client:
                self.stats.client_requests += 1
            response = getattr(self, f"rpc_{name}")(addr, *args)
        finally:
            self._from_client = False
        # Counted once answered: a request with bad arguments is counted as malformed.
        self.stats.count_rpc(name, size)
        datagram = RESPONSE + msg_id + msgpack.packb(response)
        budget = AMPLIFICATION * size - self._spent
        if len(datagram) > budget and name in BOUNDED_RPCS and addr not in self.validated:
            ours = msg_id.startswith(OUR_TAGS)
            cut = functools.partial(
                self._bounded_answer,
                msg_id,
                addr,
                args,
                budget,
                echo=ours,
                value=isinstance(response, dict),
            )
            held = None if ours else self._held.get(addr)
            if held is not None and len(held) < MAX_HELD:
                # Sent when the caller answers our check (see `_finish_check`).
                self.stats.held_answers += 1
                held.append((name, datagram, cut))
                return
            datagram = cut()
        if self._send(datagram, addr, name):
            self.heard_us.prove(addr)

    def _bounded_answer(
        self,
        msg_id: bytes,
        addr: Address,
        args: list[Any],
        budget: int,
        *,
        echo: bool,
        value: bool = False,
    ) -> bytes:
        """A FIND_NODE / FIND_VALUE answer within `budget` bytes for a caller that did not
        prove its address: for our nodes, when the full answer was a `value`, a share of it
        that fits where one can (marked partial); else the closest contacts that fit (a stock
        client reads a short list), after the caller itself when `echo` (our nodes read that
        as "ask again")."""
        self.stats.bounded_answers += 1
        header = len(RESPONSE + msg_id)
        if echo and value:
            room = budget - header - len(msgpack.packb({"value": b"", PARTIAL: True})) - 2
            cut = self.storage.share(_node_id(args[1]), room)
            if cut is not None:
                self.stats.cut_values += 1
                answer: bytes = msgpack.packb({"value": cut, PARTIAL: True})
                return RESPONSE + msg_id + answer
        caller = Node(args[0], addr[0], addr[1])
        neighbors = self.router.find_neighbors(Node(args[1]), exclude=caller)
        entries: list[tuple[bytes, str, int]] = []
        # A list header is 1 byte up to 15 entries and 3 beyond.
        used = header + 3
        for node in (caller, *neighbors) if echo else neighbors:
            entry = (node.id, node.ip, node.port)
            cost = len(msgpack.packb(entry))
            if used + cost > budget:
                break
            entries.append(entry)
            used += cost
        body: bytes = msgpack.packb(entries)
        return RESPONSE + msg_id + body

    def _awaited(self, msg_id: bytes, addr: Address, size: int) -> bool:
        """Does a reply answer a request of ours, from the address it went to?"""
        pending = self._outstanding.get(msg_id)
        if pending is None:
            logger.debug("reply from %s to no outstanding request", addr)
            self.stats.count_rpc("unmatched", size)  # late, after its request timed out
            return False
        if addr != pending.address:
            # Someone else answered in the callee's name; ignore it and keep waiting.
            raise ValueError(f"reply for {pending.address} came from {addr}")
        return True

    def _accept_reply(self, msg_id: bytes, payload: Any, addr: Address, size: int) -> None:
        pending = self._outstanding.get(msg_id)
        if pending is None:
            return  # answered meanwhile (a duplicate of the reply in the same pass)
        del self._outstanding[msg_id]
        pending.timer.cancel()
        # It answered our random message id: the address receives what we send it.
        self.validated.prove(addr)
        self.stats.count_rpc(pending.name, size)
        if not pending.future.done():
            pending.future.set_result((True, payload))

    def _send(self, datagram: bytes, addr: Address, name: str) -> bool:
        """Send one datagram; False when it was not sent (no socket, or no address)."""
        if self.transport is None or self.transport.is_closing():
            return False
        target = sendable(addr, self._family, dual=self.dual_stack)
        if target is None:
            # asyncio closes the transport on any non-OSError from sendto: never pass it one.
            self.stats.unsendable += 1
            logger.debug("not sending %s to %r: no contact address", name, addr)
            return False
        try:
            self.transport.sendto(datagram, to_wire(target, self._family))
        except Exception as exc:  # a transport (a test's, a wrapper) that raises
            self.stats.unsendable += 1
            logger.debug("sending %s to %s failed: %r", name, target, exc)
            return False
        self.stats.packets_out += 1
        self.stats.bytes_out += len(datagram)
        self.stats.count_rpc(name, len(datagram))
        return True

    # Outbound requests.

    async def request(
        self, address: Address, name: str, *args: Any, wait: float | None = None, pad: int = 0
    ) -> Reply:
        """Send one RPC; `(True, reply)` or `(False, None)` after the timeout, never raises.
        A FIND_NODE / FIND_VALUE to an address that has not heard us lately is padded to
        `padded_size`, or to `pad` bytes if more."""
        sent = self._send_request(address, name, args, wait, pad)
        if sent is None:
            return False, None
        return await self._reply_to(*sent)

    def _send_request(
        self, address: Address, name: str, args: Any, wait: float | None, pad: int = 0
    ) -> tuple[bytes, asyncio.Future[Reply], float] | None:
        """Put a request on the wire now; (message id, reply future, time sent) or None."""
        body = msgpack.packb([name, list(args)])
        if len(body) > MAX_DATAGRAM_BODY:
            raise ValueError(f"{name} request of {len(body)} bytes exceeds {MAX_DATAGRAM_BODY}")
        target = sendable(address, self._family, dual=self.dual_stack)
        if target is None:
            # Not an address a reply could come from; no timeout to wait for.
            self.stats.unsendable += 1
            return None
        if name in BOUNDED_RPCS and target not in self.heard_us:
            padded = max(pad, padded_size(self.router.ksize, self._family))
            body += bytes(max(0, padded - len(REQUEST) - MSG_ID_BYTES - len(body)))
        loop = asyncio.get_running_loop()
        msg_id = self._new_msg_id()
        future: asyncio.Future[Reply] = loop.create_future()
        timeout = wait or self._wait_timeout
        timer = loop.call_later(timeout, self._expire, msg_id, loop.time() + timeout)
        # The canonical form: replies are matched against the address the kernel reports.
        self._outstanding[msg_id] = Pending(future, timer, target, name)
        if not self._send(REQUEST + msg_id + body, target, name):
            del self._outstanding[msg_id]
            timer.cancel()
            return None
        return msg_id, future, loop.time()

    async def _reply_to(self, msg_id: bytes, future: asyncio.Future[Reply], sent: float) -> Reply:
        loop = asyncio.get_running_loop()
        try:
            reply = await future
            if reply[0]:
                self.round_trips.observe(loop.time() - sent)
            return reply
        finally:
            if msg_id in self._outstanding and future.cancelled():
                self._outstanding.pop(msg_id).timer.cancel()

    def _new_msg_id(self) -> bytes:
        tag = CLIENT_TAG if self.client else SERVER_TAG
        return tag + os.urandom(MSG_ID_BYTES - len(tag))

    def _expire(self, msg_id: bytes, deadline: float) -> None:
        pending = self._outstanding.get(msg_id)
        if pending is None:
            return
        loop = asyncio.get_running_loop()
        late = loop.time() - deadline > LATE_SHARE * self._wait_timeout
        if not pending.reprieved and (late or _unread(self._fileno)):
            # Our loop was busy past the deadline, or datagrams wait unread in our socket
            # (asyncio reads one per loop pass, and a busy node's replies queue behind the
            # requests it is sent): the reply may be among them. Blaming the peer (three
            # misses drop a contact) after every stall of a busy process empties routing
            # tables, and the re-crawls that follow keep the loop busy.
            pending.reprieved = True
            self.stats.reprieves += 1
            until = loop.time() + self._wait_timeout
            pending.timer = loop.call_later(self._wait_timeout, self._expire, msg_id, until)
            return
        del self._outstanding[msg_id]
        self.stats.timeouts += 1
        logger.debug("no reply from %s:%s within %.2fs", *pending.address, self._wait_timeout)
        if not pending.future.done():
            pending.future.set_result((False, None))

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> Reply:
        """FIND_NODE on a contact, with failure accounting."""
        result = await self.request(
            (node_to_ask.ip, node_to_ask.port), "find_node", self.source_node.id, node_to_find.id
        )
        return self.handle_call_response(result, node_to_ask)

    async def call_find_value(
        self, node_to_ask: Node, node_to_find: Node, *, near: bool = False
    ) -> Reply:
        """FIND_VALUE on a contact, with failure accounting; `near`: the contact is likely to
        hold the value, so a first request pays for a cut of it (`VALUE_PADDED`)."""
        result = await self.request(
            (node_to_ask.ip, node_to_ask.port),
            "find_value",
            self.source_node.id,
            node_to_find.id,
            pad=VALUE_PADDED if near else 0,
        )
        return self.handle_call_response(result, node_to_ask)

    async def call_ping(self, node_to_ask: Node) -> Reply:
        """PING a contact, with failure accounting: an answer with another id than the
        contact's is a miss for the contact (another node lives at its address now)."""
        ok, reply = await self.request(
            (node_to_ask.ip, node_to_ask.port), "ping", self.source_node.id
        )
        if ok and reply != node_to_ask.id:
            self._missed(node_to_ask)
            self._admit_answer((node_to_ask.ip, node_to_ask.port), reply)
            return False, None
        if ok:
            self.router.record_success(node_to_ask)
            self.welcome_if_new(node_to_ask)
            return ok, reply
        return self.handle_call_response((ok, reply), node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: bytes) -> Reply:
        """STORE on a contact, with failure accounting."""
        result = await self.request(
            (node_to_ask.ip, node_to_ask.port), "store", self.source_node.id, key, value
        )
        return self.handle_call_response(result, node_to_ask)

    async def call_renew(self, node_to_ask: Node, key: bytes, renewal: list[Any]) -> Reply:
        """RENEW (see dht.renew) on a contact that holds our record, with failure accounting."""
        result = await self.request(
            (node_to_ask.ip, node_to_ask.port), RENEW_RPC, self.source_node.id, key, *renewal
        )
        return self.handle_call_response(result, node_to_ask)

    def handle_call_response(self, result: Reply, node: Node) -> Reply:
        """Count a missed reply (dropping the contact after several), or note the answer: a
        held contact is refreshed; a new one is pinged first, since the id we asked it under
        came from someone else's answer and only a ping answer states its own."""
        if not result[0]:
            self._missed(node)
            return result
        self.router.record_success(node)
        self._consider(node, client=False)
        return result

    def _missed(self, node: Node) -> None:
        """Count a missed reply. A contact dropped for its misses is forgotten as welcomed
        too: if it comes back, it may have restarted with empty storage, and is pushed what
        it should hold like any newcomer."""
        if self.router.record_failure(node):
            self._welcomed.pop(node.id, None)

    # Admission: a caller or a contact someone named is pinged before it enters the table.

    def _consider(self, node: Node, *, client: bool) -> None:
        """Refresh `node` if held at its address; otherwise check its address (and for a
        server its id) when that could prove the address or admit a contact."""
        held = self.router.held(node)
        home = (node.ip, node.port)
        at_home = held is not None and (held.ip, held.port) == home
        if at_home and node.id in self.router.buckets[self.router.get_bucket_for(node)].nodes:
            self.router.add_contact(node)  # refresh its place in the LRU order
        wanted = not client and held is None and self.router.admissible(node)
        if wanted or home not in self.validated:
            self._check(node, client=client)

    def _check(self, node: Node, *, client: bool) -> None:
        """Ping `node` (a client: `stun`) now, before our answer to it leaves; admit whoever
        answers from that address (see `_admit_answer`). At most one check per address."""
        home = (node.ip, node.port)
        if home in self._checking or len(self._checking) >= MAX_CHECKS:
            return
        failed = self._unanswered.get(home)
        if failed is not None and time.monotonic() - failed < CHECK_COOLDOWN:
            return
        name, args = ("stun", ()) if client else ("ping", (self.source_node.id,))
        before = self.stats.bytes_out
        sent = self._send_request(home, name, args, None)
        if sent is None:
            return
        self._spent += self.stats.bytes_out - before
        self.stats.checks += 1
        self._checking.add(home)
        self._held[home] = []
        if self.spawn(self._finish_check(home, client, sent), name=f"check-{node.port}") is None:
            self._checking.discard(home)
            self._held.pop(home, None)

    async def _finish_check(
        self, home: Address, client: bool, sent: tuple[bytes, asyncio.Future[Reply], float]
    ) -> None:
        try:
            ok, reply = await self._reply_to(*sent)
        finally:
            self._checking.discard(home)
            held = self._held.pop(home, [])
        for name, full, cut in held:
            if self._send(full if ok else cut(), home, name):
                self.heard_us.prove(home)
        if not ok:
            self.stats.checks_failed += 1
            self._unanswered[home] = time.monotonic()
            self._unanswered.move_to_end(home)
            while len(self._unanswered) > MAX_UNANSWERED:
                self._unanswered.popitem(last=False)
            return
        self._unanswered.pop(home, None)
        if not client:
            self._admit_answer(home, reply)

    def _admit_answer(self, home: Address, reply: Any) -> None:
        """A ping answered from `home` with `reply`: the contact is that id at that address."""
        if isinstance(reply, bytes) and len(reply) == NODE_ID_BYTES:
            self.welcome_if_new(Node(reply, home[0], home[1]))

    # Inbound RPCs. Arguments come from the network: check them before use.

    def _caller(self, nodeid: Any, sender: Address) -> Node:
        """The caller: a server is checked before it becomes a contact (see `_consider`);
        a client is forgotten (a server that turned client must leave every table it told)
        once it no longer answers as a server, its address checked with `stun` so that it
        gets full answers."""
        node = Node(_node_id(nodeid), sender[0], sender[1])
        if not self._from_client:
            self._consider(node, client=False)
            return node
        # Only from the address we know it at: anyone can claim an id, not its address. And
        # not on the tag alone: a source address can be forged, one datagram per contact.
        known = self.router.buckets[self.router.get_bucket_for(node)].nodes.get(node.id)
        if known is not None and (known.ip, known.port) == sender and known.id not in self._leaving:
            self._leaving.add(known.id)
            self.spawn(self._drop_if_client(known), name="client-check")
        self._consider(node, client=True)
        return node

    async def _drop_if_client(self, contact: Node) -> None:
        """Drop a held contact that said it is a client now, once a ping shows it: a client
        answers only `stun`, a server whose address was forged answers and stays."""
        try:
            ok, _ = await self.request((contact.ip, contact.port), "ping", self.source_node.id)
        finally:
            self._leaving.discard(contact.id)
        held = self.router.held(contact)
        if not ok and held is not None and (held.ip, held.port) == (contact.ip, contact.port):
            self.router.remove_contact(contact)

    def _start_probe(self, msg_id: bytes, addr: Address, args: list[Any]) -> None:
        """`reach(nodeid, port)`: probe the caller's IP on `port` (0: the port it wrote from)
        from a fresh socket, then answer. Runs as a task; the reply is sent when it ends."""
        if len(args) != 2 or not isinstance(args[1], int) or not 0 <= args[1] <= 65535:
            raise ValueError("reach takes a node id and a port")
        _node_id(args[0])
        if self._probing >= MAX_PROBES:
            logger.debug("too many reachability probes at once; %s gets no answer", addr)
            return
        self._probing += 1
        self.stats.probes += 1
        self.spawn(self._probe(msg_id, addr, args[1] or addr[1]), name=f"probe-{addr[1]}")

    async def _probe(self, msg_id: bytes, addr: Address, port: int) -> None:
        try:
            host = self.transport.get_extra_info("sockname")[0] if self.transport else ""
            reachable = await dht_reach.probe(
                (addr[0], port), bind_host=host, wait=self._wait_timeout, endpoint=self.endpoint
            )
        except OSError as exc:
            logger.debug("reachability probe of %s failed: %s", addr, exc)
            reachable = False
        finally:
            self._probing -= 1
        answer = {"reachable": reachable, "host": addr[0], "port": addr[1]}
        self._send(RESPONSE + msg_id + msgpack.packb(answer), addr, dht_reach.REACH_RPC)

    def rpc_stun(self, sender: Address) -> Address:
        """The caller's address as we see it."""
        return sender

    def rpc_ping(self, sender: Address, nodeid: Any) -> bytes:
        """Answer with our id and learn the caller."""
        self._caller(nodeid, sender)
        node_id: bytes = self.source_node.id
        return node_id

    def rpc_store(self, sender: Address, nodeid: Any, key: Any, value: Any) -> str:
        """Merge a record set; answers ok / stale / full / invalid (stock clients ignore it)."""
        caller = self._caller(nodeid, sender)
        # The sender's groups count against its quota of new keys (see dht.storage), all
        # unproved senders as one: a STORE's source address can be forged.
        source = self.router.groups(caller) if sender in self.validated else UNPROVEN
        # Coordinators' STOREs cost no budget of checks: a bridge republishing Redis sends
        # the most.
        metered = sender not in self.router.pinned
        return self.storage.merge(_node_id(key), value, source=source, metered=metered).value

    def rpc_renew(self, sender: Address, nodeid: Any, key: Any, *renewal: Any) -> str:
        """Renew a held record (dht.renew); answers ok / stale / unknown / invalid / full."""
        self._caller(nodeid, sender)
        return self.storage.renew(_node_id(key), list(renewal)).value

    def rpc_find_node(self, sender: Address, nodeid: Any, key: Any) -> list[tuple[bytes, str, int]]:
        """The k contacts we know closest to `key`, never the caller."""
        if key == nodeid and not self._from_client:
            self._rejoining(Node(_node_id(nodeid), sender[0], sender[1]))
        source = self._caller(nodeid, sender)
        return self._neighbors(source, key)

    def _rejoining(self, node: Node) -> None:
        """A server that looks up its own id is joining, its storage empty: a restart from its
        state file, or a client turned server. A newcomer is pushed what it should hold once
        its check comes back, but not one welcomed in the last WELCOME_MEMORY, nor one we
        still hold at that address (nothing told us it crashed): such a node kept serving
        the few records heartbeats had stored since, with no overflow mark. So its welcome is
        forgotten and, if we hold it there, it leaves the table: its check admits it again as
        a newcomer. At most once per REJOIN_MEMORY per id.

        The lookup of a joiner we welcomed moments before (as a seed does, on its first
        ping) is that same join's, not a restart: counting it would spend the allowance a
        real crash and restart minutes later needs."""
        home = (node.ip, node.port)
        held = self.router.held(node)
        at_home = held is not None and (held.ip, held.port) == home
        if not at_home and node.id not in self._welcomed:
            _note(self._joined, node.id)
            return  # a newcomer: welcomed once its check comes back
        due = self._lookup_due.pop(node.id, None)
        if due is not None and time.monotonic() - due < self._join_span:
            return
        if _noted_lately(self._rejoined, node.id, REJOIN_MEMORY):
            return
        self._welcomed.pop(node.id, None)
        # A check it left unanswered while it was down would hold its new one back.
        self._unanswered.pop(home, None)
        if at_home:
            self.router.remove_contact(node)

    def rpc_find_value(self, sender: Address, nodeid: Any, key: Any) -> Any:
        """The merged record set under `key`, or the closest contacts when we hold none."""
        source = self._caller(nodeid, sender)
        value = self.storage.value(_node_id(key))
        if value is None:
            return self._neighbors(source, key)
        return {"value": value}

    def _neighbors(self, source: Node, key: Any) -> list[tuple[bytes, str, int]]:
        neighbors = self.router.find_neighbors(Node(_node_id(key)), exclude=source)
        return [(n.id, n.ip, n.port) for n in neighbors]

    # Replication: a newcomer gets the values it is now among the closest holders of.

    def welcome_if_new(self, node: Node) -> None:
        """Add a contact that answered us from its address (within the diversity limits);
        if it is new, push it the values it should hold (once)."""
        if node.id == self.source_node.id:
            return
        if self.router.knows(node):
            if node.id in self.router.buckets[self.router.get_bucket_for(node)].nodes:
                self.router.add_contact(node)  # refresh its place in the LRU order
            return
        if not self.router.admissible(node):
            self.router.refused += 1
            return
        if self._welcomed_lately(node.id):
            self.router.add_contact(node)
            return
        looked_up = self._joined.pop(node.id, None)
        if looked_up is None or time.monotonic() - looked_up >= self._join_span:
            _note(self._lookup_due, node.id)
        if (node.ip, node.port) not in self.router.pinned and not self._welcomes.allow(
            (node.ip, node.port)
        ):
            self.stats.unpushed += 1
            self.router.add_contact(node)
            return
        due = self._values_for(node)
        self.router.add_contact(node)
        if due and len(self._tasks) - len(self._checking) < MAX_PUSH_TASKS:
            self.spawn(self._push(node, due), name=f"push-{node.port}")

    def _welcomed_lately(self, node_id: bytes) -> bool:
        """Was this contact welcomed within WELCOME_MEMORY? Notes it as welcomed now if not."""
        return _noted_lately(self._welcomed, node_id, WELCOME_MEMORY)

    def _values_for(self, node: Node) -> list[tuple[bytes, bytes]]:
        """Values the newcomer should hold that we are the one to push: those of keys where
        no contact is closer than us and the newcomer would be among the k closest."""
        if self._bounds_version != self.router.version or len(self._bounds) > 2 * len(self.storage):
            self._bounds.clear()
            self._bounds_version = self.router.version
        due = []
        for digest in self.storage.digests():
            bound = self._bounds.get(digest, _UNKNOWN)
            if bound is _UNKNOWN:
                bound = self._bounds[digest] = self._push_bound(digest)
            if bound is None or node.long_id ^ int.from_bytes(digest, "big") >= bound:
                continue
            value = self.storage.value(digest)
            if value is not None:
                due.append((digest, value))
        return due

    def _push_bound(self, digest: bytes) -> int | None:
        """For one stored key: None when a contact is closer to it than we are (another node
        pushes it), else the distance a newcomer must be under to be among its k closest.
        Kept until the table changes: every newcomer is checked against every stored key."""
        # Storage keys are already digests; the library hashed them again (defect 6).
        keynode = Node(digest)
        nearest = self.router.find_neighbors(keynode, k=1)
        if nearest and nearest[0].distance_to(keynode) < self.source_node.distance_to(keynode):
            return None
        neighbors = self.router.find_neighbors(keynode)
        return neighbors[-1].distance_to(keynode) if neighbors else 1 << 161

    async def _push(self, node: Node, values: list[tuple[bytes, bytes]]) -> None:
        for digest, value in values:
            ok, _ = await self.call_store(node, digest, value)
            if not ok:
                return
            self.stats.stores_pushed += 1


def _noted_lately(memory: OrderedDict[bytes, float], key: bytes, seconds: float) -> bool:
    """Was `key` noted in `memory` within `seconds`? Notes it now if not (the oldest notes
    beyond MAX_WELCOMED are forgotten)."""
    seen = memory.get(key)
    if seen is not None and time.monotonic() - seen < seconds:
        return True
    _note(memory, key)
    return False


def _note(memory: OrderedDict[bytes, float], key: bytes) -> None:
    """Note `key` in `memory` now, forgetting the oldest notes beyond MAX_WELCOMED."""
    memory[key] = time.monotonic()
    memory.move_to_end(key)
    while len(memory) > MAX_WELCOMED:
        memory.popitem(last=False)


def is_partial(reply: Any) -> bool:
    """Is this FIND_VALUE answer a value cut to fit an unproved caller (`RecordStorage.share`)?"""
    return isinstance(reply, dict) and reply.get(PARTIAL) is True


@functools.cache
def padded_size(ksize: int, family: int) -> int:
    """The bytes a FIND_NODE / FIND_VALUE request is padded to: with AMPLIFICATION times
    that, a callee that has not proved our address can pay for its check (a ping) and a
    full answer of `ksize` contacts of `family`, each of the longest form."""
    host = "ffff:" * 7 + "ffff" if family == socket.AF_INET6 else "255.255.255.255"
    entry = len(msgpack.packb((bytes(NODE_ID_BYTES), host, 65535)))
    answer = len(RESPONSE) + MSG_ID_BYTES + 3 + ksize * entry
    check = len(REQUEST) + MSG_ID_BYTES + len(msgpack.packb(["ping", [bytes(NODE_ID_BYTES)]]))
    return -(-(answer + check) // AMPLIFICATION)


def _unread(fileno: int | None) -> bool:
    """Whether datagrams wait unread in the socket `fileno` (False where that cannot be
    asked: no socket, as on the emulated network, or no FIONREAD, as on Windows)."""
    if fileno is None or fcntl is None:
        return False
    try:
        pending = fcntl.ioctl(fileno, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return pending != b"\0\0\0\0"


def _node_id(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != NODE_ID_BYTES:
        raise ValueError("node ids and keys are 20 bytes")
    return value
