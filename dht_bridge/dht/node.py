"""Our DHT node: kademlia's Server, extended for signed, merged, sharded, expiring record sets.

Subclasses the library's Server, protocol, routing table and storage; nothing is forked. See
KADEMLIA_NOTES.md for the defects each part fixes. A stock `kademlia.network.Server` can
join a network of these nodes and `get` a key: the wire protocol is unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import json
import logging
import math
import os
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kademlia.network import Server
from kademlia.node import Node

from dht_bridge.backoff import Backoff, ExponentialBackoff
from dht_bridge.dht import reach as dht_reach
from dht_bridge.dht import shards
from dht_bridge.dht.address import sendable
from dht_bridge.dht.admission import DEFAULT_DIVERSITY, DiversityLimits
from dht_bridge.dht.crawl import NEAR_FACTOR, Crawl, CrawlResult, parse_contacts
from dht_bridge.dht.mode import DHTMode
from dht_bridge.dht.protocol import RMAProtocol, is_partial
from dht_bridge.dht.renew import RenewalBook, renewal_args
from dht_bridge.dht.storage import OVERFLOW_MEMORY, RecordStorage, StoreResult
from dht_bridge.dht.values import (
    RecordVerifier,
    backs_mark,
    decode_value,
    encode_value,
    key_digest,
    leaves_no_room,
)
from dht_bridge.errors import BootstrapError, NotListening, PublishError
from dht_bridge.jsontext import loads_bounded
from dht_bridge.records import WorkerRecord, merge_into, validate
from dht_bridge.settings import DHTSettings
from dht_bridge.tunnels import TunnelPolicy

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# A state file nests 3 levels (a list of [service, worker, level]); deeper is not one of ours.
MAX_STATE_DEPTH = 8
# Every this many publishes, a worker placed below the root tries one level up, so that
# shards drain back towards the root when a service shrinks.
RISE_EVERY = 8
# The share of refused rises from level L that also renew the root's depth hint is
# ROOT_MARK_SHARE * 2**(1-L): with C workers a shard, about C/4 * ROOT_MARK_SHARE marks reach
# the root per heartbeat from each full level, where one per OVERFLOW_MEMORY would do.
ROOT_MARK_SHARE = 0.25
RECEIVE_BUFFER = 1 << 20
MAX_CACHED_HOLDER_SETS = 4096
# Cached holders whose time is up are rechecked by asking this many of them for the nodes they
# know near the key, not by a crawl of the whole path.
RECHECK_ASKS = 2
# Seconds between maintenance wake-ups (culling lapsed records, refreshing idle buckets).
MAINTENANCE_TICK = 60.0
SERVER, CLIENT = DHTMode.SERVER, DHTMode.CLIENT
# A `reach` answer needs the server's probe timeout plus two trips: allow this many timeouts.
REACH_WAIT_FACTOR = 2.5
# Reopening a socket that closed under us: the port may take a moment to be free again.
REOPEN_BACKOFF = ExponentialBackoff(base=0.05, cap=5.0)
# Every publish also goes straight to this many coordinators (bridges), whoever is near the key:
# nodes placed next to a key (an eclipse) can hide it from readers, but not from Redis.
COORDINATOR_COPIES = 2
# A shard proved full (a holder's value full of signed records) is believed that long: the
# proof costs one FIND_VALUE answer of up to 8 KB, and a mark is believed as long.
PROOF_MEMORY = OVERFLOW_MEMORY
# Holders that answered `full` asked for their proof: one, then two more, then the rest, each
# batch only if none before showed it. A proof is a whole shard (up to 8 KB in one answer):
# asking three at once tripled the bytes of every proof for an answer a heartbeat can wait for.
PROOF_BATCHES = (1, 2)
# A mark's depth sends a reader at most this many levels below the deepest it has read: the
# depth is a hint nobody signs, and every level read is a crawl.
MAX_PREFETCH = 4
# A value read counts once one of its first few records verifies (or a full shard backs its
# mark); a holder serving only forged records is passed over for the next.
VALUE_CHECKS = 3
# Service reads crawl over this many disjoint paths (S/Kademlia's d), each wanting the values a
# read waits for: fakes placed next to a shard key must answer on both to hide it. It costs
# about 2.3 times the FIND_VALUE traffic of one path (40 nodes, 5 providers: 7.9 requests and
# 14.4 KB per lookup, against 3.3 and 6.3 KB).
DISJOINT_PATHS = 2
# Once a lookup holds the providers it was asked for, the deeper shards still being read may
# take half as long again as it took to get there (at least ENOUGH_GRACE s), then are given
# up. A leaf of a trie path often holds nobody (the few pushed below a full shard sit in one
# child), and proving a key absent asks every close node: on `world` those reads took three to
# five times a read that finds its values, and were the slowest part of the slowest lookups.
# Half rather than twice (`world`, 1000 nodes, 800 lookups): p99 8.11 -> 6.65 round trips,
# and the share of returned providers filed at the root 53.6% -> 58.1%.
ENOUGH_FACTOR = 0.5
ENOUGH_GRACE = 0.25
# A lookup for at most this many providers takes the share of a value that a holder which
# never heard us sends at once (about 15 records of a shard, chosen at random, and a read
# takes two or more holders' shares); one for more asks again for every record, a round
# trip later. A read of every record (the bridge's, a record get) always asks again.
PARTIAL_LIMIT = 10

# Opens the node's UDP endpoint: (protocol factory, local address) -> (transport, protocol).
# The default binds a socket; tests put nodes behind a NAT of their own through it.
Endpoint = Callable[
    [Callable[[], RMAProtocol], tuple[str, int]],
    Awaitable[tuple[asyncio.DatagramTransport, RMAProtocol]],
]


async def udp_endpoint(
    factory: Callable[[], RMAProtocol], local_addr: tuple[str, int]
) -> tuple[asyncio.DatagramTransport, RMAProtocol]:
    """A UDP socket bound to `local_addr` (port 0: the OS picks)."""
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(factory, local_addr=local_addr)


@dataclass
class KeyPublish:
    """How one key of a publish went: other nodes that stored it, how the rest answered,
    and whether this node kept a copy of its own."""

    key: str
    stored: int = 0
    full: int = 0
    refused: int = 0
    unreachable: int = 0
    asked: int = 0
    local: bool = False
    # Holders not asked: their copy outlives the next publish (see dht_renew).
    deferred: int = 0
    # When the first of the copies the holders now hold lapses (inf: none held).
    held_until: float = math.inf
    # Holders that answered `full`; `full` counts only once one of them (or our own copy,
    # `local_full`) proved it, else those answers move to `unproven`.
    full_by: list[Node] = field(default_factory=list)
    local_full: bool = False
    unproven: int = 0

    @property
    def pushed_down(self) -> bool:
        """Should the record go one level down? When holders that had no room outnumber those
        that hold it. Holders fill in different orders, and under churn a holder new to the
        key holds another set. With one `full` enough, 830 of some 2000 heartbeats a minute went
        a level down on `world` (1000 nodes, churn), each to holders it had to crawl for;
        480 with this rule. Readers merge several holders' sets."""
        held = self.stored + self.deferred + int(self.local)
        return self.full > held

    @property
    def landed(self) -> bool:
        """Did the key reach the network? Another node must hold it; our own copy counts only
        when there was no other node to ask (a lone node), never for a node cut off from
        every holder it knows."""
        return self.stored > 0 or self.deferred > 0 or (self.local and self.asked == 0)


@dataclass
class PublishReport:
    """The outcome of `publish`: every key tried, the shard level per service, and per target
    (the worker key, each service) the key it finally landed on."""

    keys: list[KeyPublish] = field(default_factory=list)
    levels: dict[str, int] = field(default_factory=dict)
    final: dict[str, KeyPublish] = field(default_factory=dict)
    # Coordinators that took the worker key straight from us (see COORDINATOR_COPIES).
    coordinators: int = 0

    @property
    def stored(self) -> bool:
        """True when the worker key and every service reached at least one holder.

        A shard that turned the record away before it was filed one level down does not count
        against it: only where each target finally landed does.
        """
        return bool(self.final) and all(k.landed for k in self.final.values())

    @property
    def held_until(self) -> float:
        """When the first copy of the record the network holds lapses, over the worker key and
        every service: the lease as readers see it, which deferred renewals leave shorter
        than the record's own."""
        return min((k.held_until for k in self.final.values()), default=math.inf)

    @property
    def only_deferred(self) -> bool:
        """Nobody was asked, because every holder's copy could wait: no news of the network."""
        return self.asked == 0 and any(k.deferred for k in self.keys)

    @property
    def asked(self) -> int:
        """Requests sent to holders, over every key."""
        return sum(k.asked for k in self.keys)


@dataclass
class LookupReport:
    """What `lookup_report` found, and what it cost."""

    providers: list[WorkerRecord]
    shards_read: int
    hops: int
    seconds: float
    rounds: int = 1  # reads one after the other: 1 when every level needed was known at once


class Enough:
    """When a lookup holds the providers it wants, and how long deeper reads may still take."""

    def __init__(
        self, limit: int, started: float, now: float, confirm: Callable[[WorkerRecord], bool]
    ) -> None:
        self.limit = limit
        self.started = started
        self.now = now  # wall-clock time, for the leases
        # Only records that verify count (the verifier remembers them for `_select`): forged
        # copies served by a holder must not cut a lookup short of its deeper reads.
        self.confirm = confirm
        self.found: set[str] = set()
        self.deadline: float | None = None

    def add(self, records: Iterable[WorkerRecord]) -> None:
        """Count the live workers among `records`; the grace starts when the limit is met."""
        if self.deadline is not None:
            return
        for r in records:
            if r.worker_id in self.found or not r.live or r.is_expired(self.now):
                continue
            if self.confirm(r):
                self.found.add(r.worker_id)
                if len(self.found) >= self.limit:
                    break
        if len(self.found) >= self.limit:
            now = time.monotonic()
            self.deadline = now + max(ENOUGH_FACTOR * (now - self.started), ENOUGH_GRACE)

    def met(self) -> bool:
        """Does the lookup hold `limit` providers already?"""
        return self.deadline is not None

    def left(self) -> float:
        """Seconds the deeper reads still have."""
        return max(0.0, (self.deadline or 0.0) - time.monotonic())


@dataclass
class KeyRead:
    """What the holders of one key gave a reader: the records, whether any marked the key
    overflowed and how deep it said publishers filed below, and the hops of the crawl."""

    records: list[WorkerRecord]
    overflowed: bool = False
    deepest: int = 0
    hops: int = 0


class DHTNode(Server):  # type: ignore[misc]
    """A Kademlia node that stores and serves signed worker records.

    Inject `clock` (wall time, for leases) and `endpoint` (the UDP socket) in tests;
    `settings` holds timeouts and sizes. With `client=True` the node starts in client mode
    (see dht_protocol): it looks up and publishes through server nodes but is nobody's
    contact; `set_mode` switches at run time, `check_reachability` tells which mode fits.
    `diversity` bounds the contacts per IP and subnet (see dht_admission); contacts at a
    `coordinators` address are exempt from it, and every publish also goes straight to a few
    of them (`set_coordinators` changes them at run time).
    """

    protocol_class = RMAProtocol

    def __init__(
        self,
        settings: DHTSettings,
        *,
        policy: TunnelPolicy,
        clock: Callable[[], float] | None = None,
        node_id: bytes | None = None,
        storage: RecordStorage | None = None,
        client: bool = False,
        endpoint: Endpoint = udp_endpoint,
        diversity: DiversityLimits = DEFAULT_DIVERSITY,
        coordinators: Iterable[tuple[str, int]] = (),
    ) -> None:
        super().__init__(
            ksize=settings.ksize,
            alpha=settings.alpha,
            node_id=node_id or os.urandom(20),
        )
        # Read when built, not when imported: a virtual clock patches time.time.
        clock = clock or time.time
        # Not `storage or ...`: an empty RecordStorage is falsy, as the library's test would find.
        if storage is None:
            storage = RecordStorage(policy, clock=clock, verifier=RecordVerifier(policy))
        self.storage = storage
        self.verifier: RecordVerifier = storage.verifier
        self.settings = settings
        self.policy = policy
        self.clock = clock
        self.transport: asyncio.DatagramTransport | None = None
        self.protocol: RMAProtocol | None = None
        self._client = client
        self._endpoint = endpoint
        self.diversity = diversity
        self.coordinators = tuple(coordinators)
        # Shard level and publish count per (service, worker): a bridge publishes for many
        # workers, and each worker's place in the trie is its own.
        self._levels: dict[tuple[str, str], int] = {}
        self._publishes: dict[tuple[str, str], int] = {}
        self._depth_hint: dict[str, int] = {}
        self._maintenance: asyncio.Task[None] | None = None
        # The address bound at `listen`: a socket that closes under us is reopened there.
        self._bound: tuple[str, int] | None = None
        self._reopening: asyncio.Task[None] | None = None
        self.reopened = 0
        # Heartbeats re-store to the holders the last crawl found instead of crawling again.
        self._holder_cache: OrderedDict[bytes, tuple[float, list[Node]]] = OrderedDict()
        # Contacts asked by our crawls, by why we crawled ("holders", "refresh", "read", ...):
        # crawls are most of a node's traffic, and this says which of them to make cheaper.
        self.crawl_queries: dict[str, int] = {}
        # Which holders hold our last record of each (key, worker): they get renewals.
        self._renewals = RenewalBook()
        self.renewals_refused = 0
        # STOREs sent again to a holder that missed the first (see `_store_one`).
        self.store_retries = 0
        # Shards a holder proved full, by digest, until when (monotonic); see `_full_proven`.
        self._proven_full: dict[bytes, float] = {}

    # Life cycle.

    def _create_protocol(self) -> RMAProtocol:
        return RMAProtocol(
            self.node,
            self.storage,
            self.ksize,
            rpc_timeout=self.settings.rpc_timeout,
            max_failures=self.settings.max_failures,
            client=self._client,
            limits=self.diversity,
            pinned=self.coordinators,
        )

    async def listen(self, port: int | None = None, interface: str | None = None) -> None:
        """Bind the UDP socket (port 0: the OS picks) and start maintenance."""
        loop = asyncio.get_running_loop()
        host = interface or self.settings.host
        self.transport, self.protocol = await self._endpoint(
            self._create_protocol, (host, self.settings.port if port is None else port)
        )
        self._widen_receive_buffer()
        self._bound = self.address
        self.protocol.on_lost = self._socket_lost
        self.protocol.endpoint = self._endpoint
        self._maintenance = loop.create_task(self._maintain(), name="dht-maintenance")
        logger.info(
            "DHT node %s listening on %s:%d (%s mode)",
            self.node.id.hex()[:12],
            *self.address,
            self.mode,
        )

    @property
    def listening(self) -> bool:
        """Is the node's socket open? False while a socket that closed is being reopened."""
        return self.protocol is not None and self.protocol.listening

    def _socket_lost(self, exc: Exception | None) -> None:
        if self._reopening is None or self._reopening.done():
            self._reopening = asyncio.get_running_loop().create_task(
                self._reopen(), name="dht-reopen"
            )

    async def _reopen(self) -> None:
        """Bind the address we had again, with the same protocol (routing table, storage and
        pending requests kept): peers know us at that address."""
        protocol, bound = self.protocol, self._bound
        if protocol is None or bound is None:
            return
        backoff = Backoff(REOPEN_BACKOFF)
        while True:
            try:
                self.transport, _ = await self._endpoint(lambda: protocol, bound)
            except OSError as exc:
                delay = backoff.next()
                logger.warning(
                    "cannot reopen the DHT socket on %s:%d (%s); again in %.1fs",
                    *bound,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            self._widen_receive_buffer()
            self.reopened += 1
            logger.warning("DHT socket reopened on %s:%d", *bound)
            return

    def _widen_receive_buffer(self) -> None:
        # Bursts (a lookup storm, a mass rejoin) overflow the default ~200 KB buffer and the
        # kernel drops datagrams, which the sender sees as timeouts; the kernel caps this value.
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            except OSError as exc:
                logger.debug("could not widen the receive buffer: %s", exc)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) this node is bound to."""
        if self.transport is None:
            raise NotListening("the DHT node is not listening")
        sockname = self.transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    @property
    def rpc(self) -> RMAProtocol:
        """The protocol, once listening."""
        if self.protocol is None:
            raise NotListening("the DHT node is not listening")
        return self.protocol

    @property
    def mode(self) -> DHTMode:
        """ "server" or "client"."""
        return CLIENT if self._client else SERVER

    async def set_mode(self, mode: str) -> bool:
        """Switch to `mode` ("server" or "client"); True when it changed.

        A new server crawls towards its own id, untagged, so that the servers closest to it
        add it (and hand it the values it should now hold); a new client pings its contacts,
        tagged, so that they forget it; any other server drops it after a few missed replies.
        """
        if mode not in (SERVER, CLIENT):
            raise ValueError(f"mode must be {SERVER!r} or {CLIENT!r}, not {mode!r}")
        client = mode == CLIENT
        if client == self._client:
            return False
        self._client = client
        if self.protocol is not None:
            self.protocol.client = client
        self._holder_cache.clear()
        logger.info("DHT node %s is now in %s mode", self.node.id.hex()[:12], mode)
        if self.protocol is None or not len(self.rpc.router):
            return True
        if client:
            # A tagged ping makes each contact forget us now: nothing else would tell it
            # before one of its lookups stalls on us (the network sends no keep-alives).
            await asyncio.gather(*(self.rpc.call_ping(n) for n in self.rpc.router.contacts()))
        else:
            await self._crawl(self.node.id, purpose="mode")
        return True

    async def check_reachability(
        self,
        peers: Iterable[tuple[str, int]] = (),
        *,
        port: int = 0,
        want: int = dht_reach.DEFAULT_REACH_PEERS,
    ) -> dht_reach.Reachability:
        """Ask server nodes to contact us back on `port` (0: the port they see us at).

        `peers` first (coordinators), then contacts from the routing table; `reachable` is
        None when none of them answered.
        """
        candidates = [*peers, *self.bootstrappable_neighbors()]
        return await dht_reach.check(
            self.rpc,
            self.node.id,
            [p for p in dict.fromkeys(candidates) if p != self.address],
            port=port,
            wait=self.settings.rpc_timeout * REACH_WAIT_FACTOR,
            want=want,
        )

    def stop(self) -> None:
        """Synchronous close, for the library's callers; prefer `aclose`."""
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self._reopening is not None:
            self._reopening.cancel()
        if self.protocol is not None:
            self.protocol.close()
        elif self.transport is not None:
            self.transport.close()

    async def aclose(self) -> None:
        """Stop maintenance, cancel owned tasks and pending requests, close the socket."""
        if self._reopening is not None:
            self._reopening.cancel()
            await asyncio.gather(self._reopening, return_exceptions=True)
            self._reopening = None
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
            self._maintenance = None
        if self.protocol is not None:
            await self.protocol.aclose()

    async def __aenter__(self) -> DHTNode:
        if self.transport is None:
            await self.listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _maintain(self) -> None:
        # Wake often enough to cull lapsed records and catch each bucket soon after it has
        # been idle for a refresh interval; a wake-up with nothing due sends nothing.
        tick = min(MAINTENANCE_TICK, self.settings.refresh_interval)
        while True:
            await asyncio.sleep(tick * random.uniform(0.8, 1.2))
            try:
                dropped = self.storage.cull()
                if dropped:
                    logger.debug("culled %d expired keys", dropped)
                for node_id in self._refresh_ids():
                    await self._crawl(node_id, purpose="refresh")
            except Exception:
                logger.exception("DHT maintenance round failed")

    def _refresh_ids(self) -> list[bytes]:
        """A random id in each bucket not used for a refresh interval (the library: one hour)."""
        stale = time.monotonic() - self.settings.refresh_interval
        return [
            random.randint(*bucket.range).to_bytes(20, "big")
            for bucket in self.rpc.router.buckets
            if bucket.last_updated < stale
        ]

    # Joining.

    async def bootstrap(self, addrs: Iterable[tuple[str, int]]) -> list[Node]:
        """Join through `addrs` (host names allowed); raises BootstrapError if none answers."""
        wanted = list(addrs)
        resolved = await self._resolve(wanted)
        seeds = await self._answering_seeds(resolved)
        if not seeds:
            tried = ", ".join(f"{h}:{p}" for h, p in wanted) or "(no peers given)"
            raise BootstrapError(
                f"no bootstrap peer answered within {self.settings.rpc_timeout}s: {tried}"
            )
        for seed in seeds:
            self.rpc.welcome_if_new(seed)
        # A client is in nobody's routing table: its join only fills its own, and the closest
        # few answering does that (on `world`, a first start's join 1.00 -> 0.62 s at p50, its
        # publish and lookups after it no slower). A server waits for its k closest, so that
        # they add it; a client that becomes one crawls so then (`set_mode`).
        result = await Crawl(
            self.rpc,
            self.node.id,
            seeds,
            ksize=self.alpha if self._client else self.ksize,
            alpha=self.alpha,
            stall=self._stall,
        ).run()
        self._count_crawl("join", result.queried)
        logger.info(
            "joined through %d of %d peers; %d contacts",
            len(seeds),
            len(wanted),
            len(self.rpc.router),
        )
        return result.closest

    async def _answering_seeds(self, addrs: list[tuple[str, int]]) -> list[Node]:
        """Ping `addrs`; the seeds that answered by a stall after the first answer.

        Waiting for all of them held every join up to the farthest seed's round trip, and a lost
        ping up to the rpc timeout (on `world`, 250 ms and 0.5 s). Later answers are welcomed
        into the table as they come.
        """
        loop = asyncio.get_running_loop()
        pings = {
            loop.create_task(self.rpc.request(addr, "ping", self.node.id), name="seed-ping"): addr
            for addr in addrs
        }
        seeds: list[Node] = []
        pending = set(pings)
        until: float | None = None  # set by the first answer
        while pending:
            wait = None if until is None else max(0.0, until - loop.time())
            done, pending = await asyncio.wait(
                pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            for task in done:
                seed = self._seed_of(task, pings[task])
                if seed is not None:
                    seeds.append(seed)
            if seeds and until is None:
                until = loop.time() + self._stall
        for task in pending:
            task.add_done_callback(functools.partial(self._late_seed, addr=pings[task]))
            self.rpc.adopt(task)
        return seeds

    def _seed_of(self, ping: asyncio.Task[tuple[bool, Any]], addr: tuple[str, int]) -> Node | None:
        if ping.cancelled() or ping.exception() is not None:
            return None
        ok, reply = ping.result()
        if ok and isinstance(reply, bytes) and len(reply) == 20 and reply != self.node.id:
            return Node(reply, addr[0], addr[1])
        return None

    def _late_seed(self, ping: asyncio.Task[tuple[bool, Any]], *, addr: tuple[str, int]) -> None:
        seed = self._seed_of(ping, addr)
        if seed is not None and self.protocol is not None:
            self.rpc.welcome_if_new(seed)

    async def _resolve(self, addrs: list[tuple[str, int]]) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        family = self.transport.get_extra_info("socket").family if self.transport else 0
        out: list[tuple[str, int]] = []
        for host, port in addrs:
            # An IP literal needs no resolver (a thread, which a virtual clock cannot wait for).
            literal = sendable((host, port), family)
            if literal is not None:
                out.append(literal)
                continue
            try:
                infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
            except OSError as exc:
                logger.warning("cannot resolve bootstrap peer %s:%s: %s", host, port, exc)
                continue
            if infos:
                out.append((str(infos[0][4][0]), int(infos[0][4][1])))
        return out

    def bootstrappable_neighbors(self) -> list[tuple[str, int]]:
        """Up to k known contacts, closest to us first, for saving and rejoining."""
        return [(n.ip, n.port) for n in self.rpc.router.find_neighbors(self.node)]

    # Publishing.

    async def publish(
        self, record: WorkerRecord, *, again_within: float | None = None
    ) -> PublishReport:
        """Store `record` under `worker:<id>` and in one shard per service it offers.

        A caller that will publish this worker again within `again_within` seconds lets
        holders whose copy outlives that wait for it (see dht_renew). Raises RecordError if
        the record is invalid, PublishError if no node stored it.
        """
        validate(record, self.policy, now=self.clock())
        report = PublishReport()
        own, per_service, report.coordinators = await asyncio.gather(
            self._store_key(shards.worker_key(record.worker_id), record, again_within),
            asyncio.gather(
                *(self._publish_service(s, record, report, again_within) for s in record.services)
            ),
            self._copy_to_coordinators(record),
        )
        report.keys.append(own)
        report.final["worker"] = own
        for service, outcomes in zip(record.services, per_service, strict=True):
            report.keys.extend(outcomes)
            report.final[service] = outcomes[-1]
        if not any(k.landed for k in report.keys):
            raise PublishError(f"no node stored worker {record.worker_id}: {report.keys}")
        return report

    def set_coordinators(self, addrs: Iterable[tuple[str, int]]) -> None:
        """The coordinators (bridges) to exempt from the diversity limits and copy publishes
        to; a worker learns them from the edge after its node is open."""
        self.coordinators = tuple(dict.fromkeys(addrs))
        if self.protocol is not None:
            self.protocol.router.pinned = frozenset(self.coordinators)

    async def _copy_to_coordinators(self, record: WorkerRecord) -> int:
        """Store the worker key at up to COORDINATOR_COPIES coordinators, at their address,
        wherever they are in id space; returns how many took it.

        A coordinator's storage hands what it merges to the bridge (and so to Redis): this is
        the heartbeat's path to the edge that nodes next to the keys cannot cut. A renewal
        where the coordinator holds our last record: one small datagram per heartbeat each.
        """
        targets = self._coordinator_nodes(record.worker_id)
        if not targets:
            return 0
        key = shards.worker_key(record.worker_id)
        outcome = KeyPublish(key)
        await self._store_on(targets, key_digest(key), encode_value(key, [record]), outcome, record)
        return outcome.stored

    def _coordinator_nodes(self, worker_id: str) -> list[Node]:
        """The coordinators this worker copies to: the same few for a worker (rendezvous
        hashing), spread over them across workers; their contact when our table holds it."""
        own = self.address if self.transport is not None else None
        known = {(c.ip, c.port): c for c in self.rpc.router.contacts()}
        ranked = sorted(
            (a for a in self.coordinators if a != own),
            key=lambda a: key_digest(f"{worker_id} {a[0]}:{a[1]}"),
        )
        # A coordinator not in the table yet gets a stand-in id; its answer to the STORE gets
        # it pinged and taken in under its own.
        return [
            known.get(a) or Node(key_digest(f"coordinator {a[0]}:{a[1]}"), *a)
            for a in ranked[:COORDINATOR_COPIES]
        ]

    async def _publish_service(
        self,
        service: str,
        record: WorkerRecord,
        report: PublishReport,
        again_within: float | None,
    ) -> list[KeyPublish]:
        slot = (service, record.worker_id)
        level = self._levels.get(slot, 0)
        count = self._publishes[slot] = self._publishes.get(slot, 0) + 1
        outcomes: list[KeyPublish] = []
        turned_away: list[int] = []  # levels whose holders had no room for this record
        if level > 0 and count % RISE_EVERY == 0:
            upper_key = self._shard_key(service, record, level - 1)
            upper = await self._settled(
                await self._store_key(upper_key, record, probe=True), record, probe=True
            )
            if upper.unproven and not upper.stored:
                # The one holder asked said full and could not show it: ask them all.
                upper = await self._settled(await self._store_key(upper_key, record), record)
            outcomes.append(upper)
            if upper.landed and not upper.full:
                self._levels[slot] = report.levels[service] = level - 1
                return outcomes
            if upper.full:
                turned_away.append(level - 1)
                if level > 1 and random.random() < ROOT_MARK_SHARE * 2.0 ** (1 - level):
                    # The root's depth hint lapses unless someone deep renews it; the 2^L
                    # workers of level L share that job, so the root hears from about as
                    # many of them per round whatever the depth (each report costs a crawl
                    # to the root: its holders are the busiest nodes of a service).
                    turned_away.append(0)
        while True:
            key = self._shard_key(service, record, level)
            outcome = await self._settled(await self._store_key(key, record, again_within), record)
            outcomes.append(outcome)
            if not outcome.pushed_down or level >= shards.MAX_LEVEL:
                break
            turned_away.append(level)
            level += 1  # most holders had no room: also file it one level down
        self._levels[slot] = report.levels[service] = level
        keys = [self._shard_key(service, record, up) for up in turned_away]
        await asyncio.gather(*(self._mark_overflow(key, level) for key in keys))
        return outcomes

    async def _settled(
        self, outcome: KeyPublish, record: WorkerRecord, *, probe: bool = False
    ) -> KeyPublish:
        """`outcome`, its `full` answers kept only when the shard is proved full; a holder that
        answers `full` with room to spare would push publishers down the trie for nothing.

        Unproved `full` answers still count when every holder refused (a probe asks only
        one): there is no room at this level that we know of, and one level down costs the
        reader one read.
        """
        if not outcome.full or (outcome.stored == 0 and not probe):
            return outcome
        if not await self._full_proven(outcome, record):
            logger.info(
                "%d holders of %s answered full without a full shard to show; staying",
                outcome.full,
                outcome.key,
            )
            outcome.unproven, outcome.full = outcome.full, 0
        return outcome

    async def _full_proven(self, outcome: KeyPublish, record: WorkerRecord) -> bool:
        """Does a holder that answered `full` (or our own copy) hold a value so full of signed,
        live records of the shard that this record would not fit? Asks them in PROOF_BATCHES,
        then the rest: one honest holder's answer may be lost or late."""
        digest = key_digest(outcome.key)
        if self._proven_full.get(digest, 0.0) > time.monotonic():
            return True
        if outcome.local_full and self._fills(digest, self.storage.value(digest), record):
            return self._remember_full(digest)
        asked = outcome.full_by
        ends = [*itertools.accumulate(PROOF_BATCHES), len(asked)]
        for start, end in itertools.pairwise([0, *ends]):
            batch = asked[start:end]
            if not batch:
                continue
            values = await asyncio.gather(*(self._value_of(node, digest) for node in batch))
            if any(self._fills(digest, value, record) for value in values):
                return self._remember_full(digest)
        return False

    async def _value_of(self, node: Node, digest: bytes) -> bytes | None:
        """The value `node` holds under `digest`, or None (no answer, or no value)."""
        for _ in range(2):  # a second time after a cut answer, as a crawl does
            ok, reply = await self.rpc.call_find_value(node, Node(digest))
            if not (ok and (isinstance(reply, list) or is_partial(reply))):
                break
        # A share of the records (the holder never heard our check) proves no fullness.
        value = reply.get("value") if ok and isinstance(reply, dict) else None
        return value if isinstance(value, bytes) and not is_partial(reply) else None

    def _fills(self, digest: bytes, value: object, record: WorkerRecord) -> bool:
        if not isinstance(value, bytes):
            return False
        now = self.clock()
        try:
            decoded = decode_value(value, digest=digest, verifier=self.verifier, now=now)
        except ValueError:
            return False
        return leaves_no_room(decoded, record, now)

    def _remember_full(self, digest: bytes) -> bool:
        self._proven_full[digest] = time.monotonic() + PROOF_MEMORY
        while len(self._proven_full) > MAX_CACHED_HOLDER_SETS:
            self._proven_full.pop(next(iter(self._proven_full)))
        return True

    async def _mark_overflow(self, key: str, deepest: int) -> None:
        """Tell every holder of `key` that it overflowed, and that a publisher filed as deep as
        level `deepest` below it. Every holder, not only the ones that refused: holders fill
        in different orders, and a reader asking an unmarked one would not look below, where
        the refused record went; the depth lets a reader fetch the levels down to it at once."""
        digest = key_digest(key)
        mark = encode_value(key, [], self.clock() + OVERFLOW_MEMORY, deepest)
        holders, _ = await self._holders(digest)
        await asyncio.gather(*(self.rpc.call_store(node, digest, mark) for node in holders))
        if self._stores_locally(digest, holders):
            self.storage.merge(digest, mark)

    def _shard_key(self, service: str, record: WorkerRecord, level: int) -> str:
        return shards.service_key(service, shards.shard_for(record.worker_id, level))

    async def _store_key(
        self,
        key: str,
        record: WorkerRecord,
        again_within: float | None = None,
        *,
        probe: bool = False,
    ) -> KeyPublish:
        """Store `record` under `key` on its holders (and here, if we are one of them).

        With `probe`, one holder is asked first and the rest only if it had room: a rise is
        almost always refused by a full parent, whose holders hold the same set.
        """
        digest = key_digest(key)
        value = encode_value(key, [record])
        outcome = KeyPublish(key)
        holders, cached = await self._holders(digest, outcome)
        due = holders
        if again_within is not None:
            due = self._defer(digest, record, holders, again_within, outcome)
        rest: list[Node] = due
        missed: list[Node] = []
        if probe and len(due) > 1:
            first = random.choice(due)
            missed = await self._store_on([first], digest, value, outcome, record)
            if outcome.full:
                return outcome  # `_settled` asks this one for its proof
            rest = [node for node in due if node is not first]
        missed += await self._store_on(rest, digest, value, outcome, record, retry=True)
        if missed and cached:
            # A cached holder is gone: find the current closest and fill in the ones not held.
            fresh = await self._replace_gone(digest, holders, missed, outcome)
            known = {node.id for node in holders}  # asked, or holding a copy that waits
            fill = [n for n in fresh if n.id not in known]
            await self._store_on(fill, digest, value, outcome, record)
            holders = fresh
        if self._stores_locally(digest, holders):
            local = self.storage.merge(digest, value)
            if local is StoreResult.FULL:
                outcome.full += 1
                outcome.local_full = True
            elif local is not StoreResult.INVALID:
                outcome.local = True
        logger.debug("stored %s: %s", key, outcome)
        return outcome

    def _defer(
        self,
        digest: bytes,
        record: WorkerRecord,
        holders: list[Node],
        again_within: float,
        outcome: KeyPublish,
    ) -> list[Node]:
        """The holders to ask now; the others hold a copy that can wait for the next publish
        (counted in `outcome` as deferred, with their copies' lapse)."""
        held, now = self._renewals.holders(digest, record), self.clock()
        due: list[Node] = []
        for node in holders:
            copy = held.get(node.id)
            if copy is not None and copy.can_wait(record, now, again_within):
                outcome.deferred += 1
                outcome.held_until = min(outcome.held_until, copy.expires_at)
            else:
                due.append(node)
        return due

    async def _store_on(
        self,
        holders: list[Node],
        digest: bytes,
        value: bytes,
        outcome: KeyPublish,
        record: WorkerRecord,
        *,
        retry: bool = False,
    ) -> list[Node]:
        """STORE `record` on each holder (a renewal where it holds the last one), tallying
        answers into `outcome`; returns those that missed. With `retry`, a holder that does
        not answer is asked once more before it counts as missed."""
        outcome.asked += len(holders)
        renewable = self._renewals.holders(digest, record)
        renewal = renewal_args(record) if renewable else None
        replies = await asyncio.gather(
            *(
                self._store_one(
                    node, digest, value, renewal if node.id in renewable else None, retry=retry
                )
                for node in holders
            )
        )
        self._renewals.note(
            digest,
            record,
            [(n.id, answer) for n, (_, answer) in zip(holders, replies, strict=True)],
        )
        missed: list[Node] = []
        for node, (ok, answer) in zip(holders, replies, strict=True):
            if not ok:
                missed.append(node)
                outcome.unreachable += 1
            elif answer == StoreResult.FULL.value:
                outcome.full += 1
                outcome.full_by.append(node)
            elif answer == StoreResult.INVALID.value:
                outcome.refused += 1
            else:
                outcome.stored += 1
                outcome.held_until = min(outcome.held_until, record.expires_at)
        return missed

    async def _store_one(
        self,
        node: Node,
        digest: bytes,
        value: bytes,
        renewal: list[Any] | None,
        *,
        retry: bool = False,
    ) -> tuple[bool, Any]:
        reply = await self._store_once(node, digest, value, renewal)
        if not reply[0] and retry:
            # A holder that misses one STORE has more likely lost a datagram (1% a link on
            # the internet) or answered late than left: a cached one that misses sends us
            # after its replacement (on `world`, re-crawling on every miss made holder crawls
            # a third of every worker's DHT bytes), a freshly found one would go without.
            self.store_retries += 1
            reply = await self._store_once(node, digest, value, renewal)
        return reply

    async def _store_once(
        self, node: Node, digest: bytes, value: bytes, renewal: list[Any] | None
    ) -> tuple[bool, Any]:
        if renewal is not None:
            ok, answer = await self.rpc.call_renew(node, digest, renewal)
            if not ok or answer != StoreResult.UNKNOWN.value:
                return ok, answer
            self.renewals_refused += 1  # lost our copy, or holds other fields: send it whole
        return await self.rpc.call_store(node, digest, value)

    async def _holders(
        self, digest: bytes, outcome: KeyPublish | None = None
    ) -> tuple[list[Node], bool]:
        """The `replicas` closest nodes that answer, and whether they came from the cache.

        When the crawl asked contacts and none answered, they count in `outcome` as asked and
        unreachable: a node cut off from everyone it knows is not a lone node.
        """
        now = time.monotonic()
        cached = self._holder_cache.get(digest)
        if cached is not None and cached[1]:
            if cached[0] > now:
                holders = self._with_newcomers(digest, cached[1])
                if holders is not cached[1]:
                    self._holder_cache[digest] = (cached[0], holders)
                return holders, True
            holders = await self._recheck(digest, cached[1])
            if holders:
                self._cache_holders(digest, holders)
                return holders, True
        # Only the `replicas` closest are wanted: settling on them, not on the k closest,
        # asks about half as many contacts (crawls were half of a worker's bytes).
        crawl = await self._crawl(
            digest,
            purpose="holders",
            width=self.settings.replicas,
            settle=self.settings.rpc_timeout,
        )
        holders = crawl.closest[: self.settings.replicas]
        if not holders and crawl.queried and outcome is not None:
            outcome.asked += crawl.queried
            outcome.unreachable += crawl.failed
        self._cache_holders(digest, holders)
        return holders, False

    async def _replace_gone(
        self, digest: bytes, holders: list[Node], gone: list[Node], outcome: KeyPublish
    ) -> list[Node]:
        """The holders of `digest` now that `gone` (cached holders that missed a STORE twice)
        left: the ones that answered ask two of themselves whom they know near the key, as
        when the cache expires (a crashed holder under churn is the common case: a crawl for
        each cost several times the two questions); a crawl only when none of them answers."""
        gone_ids = {node.id for node in gone}
        answered = [node for node in holders if node.id not in gone_ids]
        if answered:
            known = await self._recheck(digest, answered, exclude=gone_ids)
            if known:
                self._cache_holders(digest, known)
                return known
        self._holder_cache.pop(digest, None)
        fresh, _ = await self._holders(digest, outcome)
        return fresh

    async def _recheck(
        self,
        digest: bytes,
        holders: list[Node],
        exclude: AbstractSet[bytes] = frozenset(),
    ) -> list[Node]:
        """The closest nodes to `digest` that a few of its cached `holders` know, these included;
        empty when none of those answered.

        A newcomer near a key makes itself known to the nodes near it when it joins, so the
        holders know of it: two questions instead of a crawl, whose last hops all go to the
        same few nodes for every publisher of a busy shard. A newcomer that is not there after
        all misses its STOREs and is replaced the same way (`_replace_gone`).
        """
        asked = random.sample(holders, min(RECHECK_ASKS, len(holders)))
        target = Node(digest)
        replies = await asyncio.gather(*(self.rpc.call_find_node(n, target) for n in asked))
        self._count_crawl("recheck", len(asked))
        known = {node.id: node for node in holders}
        answered = False
        for ok, payload in replies:
            answered = answered or ok
            for node in parse_contacts(payload) if ok else []:
                # Those just found silent stay out: their neighbours still list them.
                if node.id != self.node.id and node.id not in exclude:
                    known.setdefault(node.id, node)
        return self._closest(digest, known.values()) if answered else []

    def _closest(self, digest: bytes, nodes: Iterable[Node]) -> list[Node]:
        """The `replicas` nodes closest to `digest` among `nodes`, closest first."""
        target = int.from_bytes(digest, "big")
        return heapq.nsmallest(self.settings.replicas, nodes, key=lambda n: n.long_id ^ target)

    def _cache_holders(self, digest: bytes, holders: list[Node]) -> None:
        # Spread over the last fifth of the TTL: workers that joined together (a mass restart)
        # would otherwise all crawl again in the same second, every TTL.
        ttl = self.settings.holder_cache_ttl * random.uniform(0.8, 1.0)
        self._holder_cache[digest] = (time.monotonic() + ttl, holders)
        self._holder_cache.move_to_end(digest)
        while len(self._holder_cache) > MAX_CACHED_HOLDER_SETS:
            self._holder_cache.popitem(last=False)

    def _with_newcomers(self, digest: bytes, holders: list[Node]) -> list[Node]:
        """The cached holders, with contacts our routing table has learnt since that are closer
        to the key. Readers go to the closest nodes: a node that joined near a key got a copy
        of its value from the holders, and without our heartbeats that copy would lapse while
        the holders we cached still carry the live one. Costs no crawl."""
        known = {node.id for node in holders}
        nearby = self.rpc.router.find_neighbors(Node(digest), k=self.settings.replicas)
        newcomers = [node for node in nearby if node.id not in known]
        if not newcomers:
            return holders
        closest = self._closest(digest, [*holders, *newcomers])
        taken = sum(1 for node in closest if node.id not in known)
        if not taken:
            return holders
        logger.debug("holders of %s: %d newcomers taken in", digest.hex()[:12], taken)
        return closest

    def _stores_locally(self, digest: bytes, holders: list[Node]) -> bool:
        if self._client:
            return False  # nobody reads from a client: a copy here would count as stored
        if len(holders) < self.settings.replicas:
            return True
        target = int.from_bytes(digest, "big")
        ours: int = self.node.long_id ^ target
        furthest: int = holders[-1].long_id ^ target
        return ours < furthest

    # Reading.

    async def lookup(self, service: str, limit: int = 10) -> list[WorkerRecord]:
        """Up to `limit` live providers of `service`, least loaded first."""
        return (await self.lookup_report(service, limit)).providers

    async def lookup_report(self, service: str, limit: int = 10) -> LookupReport:
        """`lookup`, with the number of shards read, hops, and time taken.

        Reads one random root-to-leaf path of the shard trie: a level whose holders marked it
        overflowed sends the reader further down. Levels known or guessed to be needed (from
        the last lookup, our own place in the trie, other services' depths, or the depth the
        overflow marks carry) are read in parallel, so a reader with no history needs two
        rounds however deep the trie is, and one with a right guess one.
        """
        started = time.monotonic()
        leaf = random.getrandbits(shards.MAX_LEVEL)
        path = [
            shards.shard_id(level, leaf & ((1 << level) - 1))
            for level in range(shards.MAX_LEVEL + 1)
        ]
        versions: list[WorkerRecord] = []
        enough = Enough(limit, started, self.clock(), self.verifier.confirm)
        depth = min(self._guess_depth(service), shards.MAX_LEVEL)
        read, hops, level, rounds = 0, 0, 0, 0
        while level <= shards.MAX_LEVEL:
            batch = path[level : depth + 1] or [path[level]]
            results = await self._read_down(service, batch, enough)
            read, rounds = read + len(results), rounds + 1
            for got in results:
                versions.extend(got.records)
                hops = max(hops, got.hops)
            if not results or not results[-1].overflowed:
                self._depth_hint[service] = level + max(len(results) - 1, 0)
                break
            level += len(results)
            reported = max(got.deepest for got in results)
            depth = max(level, min(reported, level + MAX_PREFETCH - 1, shards.MAX_LEVEL))
        chosen = self._select(versions, limit)
        return LookupReport(chosen, read, hops, time.monotonic() - started, rounds)

    def _guess_depth(self, service: str) -> int:
        """The deepest level a lookup of `service` reads in its first round: where the last
        lookup of it ended; else where we file it ourselves; else where lookups of other
        services ended, at most `MAX_PREFETCH` levels; else `MAX_PREFETCH` levels. Guessing
        deep costs the start of a crawl per level too many (cancelled once a shallower level
        turns out not overflowed); guessing short costs a round: on `world` each round is a
        few round trips (2000 nodes: a reader with no history read in 2.06 rounds from the
        root alone; at 1000, reading 4 levels at once took p50 / p99 4.0 / 11.3 round trips
        to 2.84 / 9.46)."""
        hint = self._depth_hint.get(service)
        if hint is not None:
            return hint
        own = [level for (name, _), level in self._levels.items() if name == service]
        if own:
            return max(own)
        return min(max(self._depth_hint.values(), default=MAX_PREFETCH - 1), MAX_PREFETCH - 1)

    async def _read_down(self, service: str, batch: list[int], enough: Enough) -> list[KeyRead]:
        """Read consecutive shards of one path at once, up to the first one not overflowed
        (or the first still unread once `enough`'s grace has run out).

        The depth a mark reports is the deepest anywhere in the trie, so this path may end
        sooner: reads below its end are cancelled, not awaited, since a key nobody holds keeps
        a crawl going until the closest nodes have all said so. A level whose read found no
        mark is passed over all the same when a read below it already brought back records:
        workers file below a level only once it is full, and the two holders a read stops at
        may be ones that came back from a restart with a few records and no mark.
        """
        reads = [
            asyncio.create_task(
                self._read_key(
                    shards.service_key(service, s),
                    lazy=True,
                    partial_ok=enough.limit <= PARTIAL_LIMIT,
                )
            )
            for s in batch
        ]
        needed: list[KeyRead] = []
        try:
            for index, read in enumerate(reads):
                if enough.met():
                    done, _ = await asyncio.wait([read], timeout=enough.left())
                    if not done:
                        break
                needed.append(await read)
                enough.add(needed[-1].records)
                if not needed[-1].overflowed and not self._filled_below(reads[index + 1 :]):
                    break
        finally:
            unneeded = reads[len(needed) :]
            for read in unneeded:
                read.cancel()
            await asyncio.gather(*unneeded, return_exceptions=True)
        return needed

    def _filled_below(self, reads: list[asyncio.Task[KeyRead]]) -> bool:
        """Has one of these reads (of deeper levels) ended with a record that verifies?"""
        return any(
            read.done()
            and not read.cancelled()
            and read.exception() is None
            and any(self.verifier.confirm(r) for r in read.result().records[:VALUE_CHECKS])
            for read in reads
        )

    async def service_records(self, service: str) -> list[WorkerRecord]:
        """Every record (live or tombstone) of a service: walks the shard trie, level by level,
        into the children of overflowed shards only. For the bridge and audits, not lookups."""
        found: dict[str, WorkerRecord] = {}
        frontier = [0]
        while frontier:
            # Completeness over speed: merge what every reachable holder has, not the first two.
            results = await asyncio.gather(
                *(
                    self._read_key(shards.service_key(service, s), want=self.settings.replicas)
                    for s in frontier
                )
            )
            descend: list[int] = []
            for shard, got in zip(frontier, results, strict=True):
                merge_into(found, got.records, now=self.clock())
                if got.overflowed and shards.level_of(shard) < shards.MAX_LEVEL:
                    descend.extend(shards.children(shard))
            frontier = descend
        return sorted(found.values(), key=lambda r: (r.load, r.worker_id))

    async def get_record(self, worker_id: str) -> WorkerRecord | None:
        """The newest record (live or tombstone) of one worker, or None."""
        return (await self.get_record_report(worker_id))[0]

    async def get_record_report(self, worker_id: str) -> tuple[WorkerRecord | None, int]:
        """`get_record`, and the hops its lookup took."""
        got = await self._read_key(shards.worker_key(worker_id))
        return next((r for r in got.records if r.worker_id == worker_id), None), got.hops

    async def get_records(self, key: str) -> list[WorkerRecord]:
        """Every valid record under a key name, merged across the holders that answered."""
        return (await self._read_key(key)).records

    async def _read_key(
        self, key: str, *, lazy: bool = False, want: int = 2, partial_ok: bool = False
    ) -> KeyRead:
        """Records under `key` from the holders, merged, with their overflow marks.

        Verified and merged by the merge rule; with `lazy`, every version as read, unverified
        (pass them to `_select`, which verifies only what it returns). With `partial_ok`, a
        holder's value may be a share of what it holds (a cut answer, see dht_protocol).
        """
        digest = key_digest(key)
        merged: dict[str, WorkerRecord] = {}
        versions: list[WorkerRecord] = []
        now = self.clock()
        got = KeyRead([])
        local = self.storage.value(digest)

        def useful(value: bytes) -> bool:
            # Something a reader can check: a record that verifies, or a mark backed by a
            # full shard. An empty set, forged records or a bare mark send the crawl on.
            try:
                decoded = decode_value(
                    value, digest=digest, verifier=self.verifier, now=now, lazy=True
                )
            except ValueError:
                return False
            return backs_mark(decoded, self.verifier, now) or any(
                self.verifier.confirm(r) for r in decoded.records[:VALUE_CHECKS]
            )

        result = await self._crawl(
            digest,
            purpose="read",
            find_value=True,
            want_values=want,
            accept=useful,
            paths=DISJOINT_PATHS if lazy else 1,
            partial_ok=partial_ok,
        )
        # Replicas usually hold byte-identical values: decode each distinct one once.
        values = {value for _, value in result.values}
        if local is not None:
            values.add(local)
        for value in values:
            try:
                decoded = decode_value(
                    value, digest=digest, verifier=self.verifier, now=now, lazy=lazy
                )
            except ValueError as exc:
                logger.debug("ignored a bad value for %s: %s", key, exc)
                continue
            if backs_mark(decoded, self.verifier, now):
                got.overflowed = True
                got.deepest = max(got.deepest, decoded.deepest)
            if lazy:
                versions.extend(decoded.records)
            else:
                merge_into(merged, decoded.records, now=now)
        got.records, got.hops = (versions if lazy else list(merged.values())), result.hops
        return got

    def _select(self, versions: list[WorkerRecord], limit: int) -> list[WorkerRecord]:
        """The `limit` least loaded live providers among unverified versions, verifying only
        those on the way: a version that fails gives way to that worker's next best one, so a
        forged high-seq copy cannot hide a real record; a valid tombstone removes its worker."""
        now = self.clock()
        by_worker: dict[str, dict[str, WorkerRecord]] = {}
        for record in versions:
            by_worker.setdefault(record.worker_id, {})[record.signature] = record
        ranked = {
            wid: sorted(
                group.values(), key=lambda r: (r.seq, r.tombstone, r.signature), reverse=True
            )
            for wid, group in by_worker.items()
        }
        heap = [(group[0].load, wid, 0) for wid, group in ranked.items()]
        heapq.heapify(heap)
        chosen: list[WorkerRecord] = []
        while heap and len(chosen) < limit:
            _, wid, index = heapq.heappop(heap)
            record = ranked[wid][index]
            if not self.verifier.confirm(record):
                logger.debug("a holder served a forged record of %s; trying an older one", wid)
                if index + 1 < len(ranked[wid]):
                    nxt = ranked[wid][index + 1]
                    heapq.heappush(heap, (nxt.load, wid, index + 1))
                continue
            if record.live and not record.is_expired(now):
                chosen.append(record)
        return chosen

    @property
    def _stall(self) -> float:
        # As long as this node's own replies say a silent contact is likely dead: a few ms on
        # a LAN, the configured ceiling on a slow or unmeasured network.
        return self.rpc.round_trips.stall(self.settings.stall_floor, self.settings.stall)

    async def _crawl(
        self,
        target: bytes,
        *,
        purpose: str,
        width: int | None = None,
        find_value: bool = False,
        want_values: int = 1,
        settle: float = 0.0,
        accept: Callable[[bytes], bool] | None = None,
        paths: int = 1,
        partial_ok: bool = False,
    ) -> CrawlResult:
        """Look up `target` until its `width` (default k) closest live nodes have answered
        (waiting up to `settle` for slow ones among them).

        With `paths` > 1 (value reads only), that many crawls over disjoint sets of nodes,
        seeded round robin from our closest contacts, each wanting `want_values` of its own:
        nodes of one poisoned region answer on one path, not on all (S/Kademlia). Each path
        its own share only (one value each) lost providers: a path kept from the closest
        holders can end on a node holding a partial set (2 of 300 lookups found 1 of 5). A
        path left one value by the holders its sibling asked first stops on it once the
        sibling has all it wanted (on `world`, 500 nodes: p99 service lookup 19.2 -> 13.4 RTTs
        with nodes claimed on asking rather than on learning). With `partial_ok`, a value cut
        to a share of its records (see dht_crawl) counts as one.
        """
        seeds = self.rpc.router.find_neighbors(Node(target), k=self.ksize)
        paths = max(1, min(paths, len(seeds)))
        near = NEAR_FACTOR * self.rpc.router.neighbourhood() if find_value else 0
        claimed: dict[bytes, int] | None = {} if paths > 1 else None
        width = width or self.ksize
        crawls = [
            Crawl(
                self.rpc,
                target,
                seeds[path::paths],
                # Disjoint paths share the k closest out between them: each concluding "absent"
                # only after k closest of its own asked 2k nodes for a key nobody holds (the
                # leaf of a trie path often is), and those reads were the slow tail of lookups.
                ksize=math.ceil(width / paths),
                alpha=self.alpha,
                find_value=find_value,
                want_values=want_values,
                stall=self._stall,
                patience=self.settings.stall,
                settle=settle,
                accept=accept,
                claimed=claimed,
                path=path,
                partial_ok=partial_ok,
                near=near,
            )
            for path in range(paths)
        ]
        for crawl in crawls:
            crawl.siblings = [other for other in crawls if other is not crawl]
        results = await asyncio.gather(*(crawl.run() for crawl in crawls))
        result = results[0] if paths == 1 else _joined(target, results, width)
        self._count_crawl(purpose, result.queried)
        return result

    def _count_crawl(self, purpose: str, queried: int) -> None:
        self.crawl_queries[purpose] = self.crawl_queries.get(purpose, 0) + queried

    # State, as JSON (the library pickles, which runs code on load).

    def state(self) -> dict[str, Any]:
        """What a restart needs: our id, known contacts, shard levels."""
        return {
            "version": STATE_VERSION,
            "node_id": self.node.id.hex(),
            "neighbors": [list(addr) for addr in self.bootstrappable_neighbors()],
            "levels": [[s, w, level] for (s, w), level in self._levels.items()],
        }

    def save_state(
        self, fname: str | os.PathLike[str], extra: Mapping[str, Any] | None = None
    ) -> None:
        """Write `state()` (with `extra`'s keys added) as JSON, atomically, making its
        directory; OSError when it cannot."""
        path = Path(fname)
        tmp = path.with_name(f".{path.name}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**self.state(), **(extra or {})}, indent=2))
        os.replace(tmp, path)

    @staticmethod
    def read_state(fname: str | os.PathLike[str]) -> dict[str, Any]:
        """Read a state file written by `save_state`; ValueError if it is not one."""
        data = loads_bounded(Path(fname).read_text(), max_depth=MAX_STATE_DEPTH)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError(f"{fname} is not a version {STATE_VERSION} DHT state file")
        return data

    def restore_levels(self, levels: Any) -> None:
        """Reuse shard levels saved by `state()` (saves descents on the first publish)."""
        for entry in levels if isinstance(levels, list) else []:
            if not (isinstance(entry, list) and len(entry) == 3):
                continue
            service, worker_id, level = entry
            if isinstance(level, int) and 0 <= level <= shards.MAX_LEVEL:
                self._levels[(str(service), str(worker_id))] = level


def _joined(target: bytes, results: list[CrawlResult], width: int) -> CrawlResult:
    """One result from the crawls of disjoint paths: every value, the closest overall."""
    key = int.from_bytes(target, "big")
    closest = sorted((n for r in results for n in r.closest), key=lambda n: n.long_id ^ key)
    return CrawlResult(
        closest=closest[:width],
        values=[v for r in results for v in r.values],
        queried=sum(r.queried for r in results),
        failed=sum(r.failed for r in results),
        hops=max(r.hops for r in results),
        seconds=max(r.seconds for r in results),
        refused=sum(r.refused for r in results),
        lag=max(r.lag for r in results),
    )
