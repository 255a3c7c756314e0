"""Our DHT node: kademlia's Server, extended for signed, merged, sharded, expiring record sets.

Subclasses the library's Server, protocol, routing table and storage; nothing is forked. See
KADEMLIA_NOTES.md for the defects each part fixes. A stock `kademlia.network.Server` can
join a network of these nodes and `get` a key: the wire protocol is unchanged.

The node itself joins, keeps its socket and routing table, crawls and saves its state; its
two halves publish (`dht.publish.Publisher`) and read (`dht.lookup.Reader`) through it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from kademlia.network import Server
from kademlia.node import Node

from dht_bridge.backoff import Backoff, ExponentialBackoff
from dht_bridge.dht import reach as dht_reach
from dht_bridge.dht import shards
from dht_bridge.dht.address import contact_address, sendable
from dht_bridge.dht.admission import DEFAULT_DIVERSITY, DiversityLimits
from dht_bridge.dht.crawl import NEAR_FACTOR, Crawl, CrawlResult
from dht_bridge.dht.lookup import LookupReport, Reader
from dht_bridge.dht.mode import DHTMode
from dht_bridge.dht.protocol import RMAProtocol
from dht_bridge.dht.publish import Publisher, PublishReport
from dht_bridge.dht.storage import RecordStorage
from dht_bridge.dht.values import (
    RecordVerifier,
)
from dht_bridge.errors import BootstrapError, NotListening
from dht_bridge.jsontext import loads_bounded
from dht_bridge.options import format_hostport
from dht_bridge.records import WorkerRecord
from dht_bridge.settings import DHTSettings
from dht_bridge.tunnels import TunnelPolicy

__all__ = [
    "CLIENT",
    "SERVER",
    "DHTNode",
    "Endpoint",
    "LookupReport",
    "PublishReport",
    "udp_endpoint",
]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# A state file nests 3 levels (a list of [service, worker, level]); deeper is not one of ours.
MAX_STATE_DEPTH = 8
RECEIVE_BUFFER = 1 << 20
# Seconds between maintenance wake-ups (culling lapsed records, refreshing idle buckets).
MAINTENANCE_TICK = 60.0
SERVER, CLIENT = DHTMode.SERVER, DHTMode.CLIENT
# A `reach` answer needs the server's probe timeout plus two trips: allow this many timeouts.
REACH_WAIT_FACTOR = 2.5
# Reopening a socket that closed under us: the port may take a moment to be free again.
REOPEN_BACKOFF = ExponentialBackoff(base=0.05, cap=5.0)

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


class DHTNode(Server):  # type: ignore[misc]
    """A Kademlia node that stores and serves signed worker records.

    Inject `clock` (wall time, for leases) and `endpoint` (the UDP socket) in tests;
    `settings` holds timeouts and sizes. With `client=True` the node starts in client mode
    (see dht.protocol): it looks up and publishes through server nodes but is nobody's
    contact; `set_mode` switches at run time, `check_reachability` tells which mode fits.
    `diversity` bounds the contacts per IP and subnet (see dht.admission); contacts at a
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
        self._maintenance: asyncio.Task[None] | None = None
        # The address bound at `listen`: a socket that closes under us is reopened there.
        self._bound: tuple[str, int] | None = None
        self._reopening: asyncio.Task[None] | None = None
        self.reopened = 0
        # Contacts asked by our crawls, by why we crawled ("holders", "refresh", "read", ...):
        # crawls are most of a node's traffic, and this says which of them to make cheaper.
        self.crawl_queries: dict[str, int] = {}
        self.publisher = Publisher(self, settings, policy=policy, storage=storage, clock=clock)
        self.reader = Reader(
            self, settings, storage=storage, clock=clock, levels=self.publisher.levels
        )

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
            "DHT node %s listening on %s (%s mode)",
            self.node.id.hex()[:12],
            format_hostport(*self.address),
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
                    "cannot reopen the DHT socket on %s (%s); again in %.1fs",
                    format_hostport(*bound),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            self._widen_receive_buffer()
            self.reopened += 1
            logger.warning("DHT socket reopened on %s", format_hostport(*bound))
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
        self.publisher.forget_holders()
        logger.info("DHT node %s is now in %s mode", self.node.id.hex()[:12], mode)
        if self.protocol is None or not len(self.rpc.router):
            return True
        if client:
            # A tagged ping makes each contact forget us now: nothing else would tell it
            # before one of its lookups stalls on us (the network sends no keep-alives).
            await asyncio.gather(*(self.rpc.call_ping(n) for n in self.rpc.router.contacts()))
        else:
            await self.crawl(self.node.id, purpose="mode")
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
                    await self.crawl(node_id, purpose="refresh")
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

    async def bootstrap(self, addrs: Iterable[tuple[str, int]], *, wait: bool = True) -> list[Node]:
        """Join through `addrs` (host names allowed); raises BootstrapError if none answers.

        Returns the closest nodes the join's crawl found; without `wait`, the seeds that
        answered, while that crawl runs on (see `_join_crawl` for why a start wants that).
        """
        wanted = list(addrs)
        resolved = await self._resolve(wanted)
        seeds = await self._answering_seeds(resolved)
        if not seeds:
            tried = ", ".join(format_hostport(h, p) for h, p in wanted) or "(no peers given)"
            if wanted and not resolved:
                raise BootstrapError(f"no usable bootstrap peer (see above): {tried}")
            raise BootstrapError(
                f"no bootstrap peer answered within {self.settings.rpc_timeout}s: {tried}"
            )
        for seed in seeds:
            self.rpc.welcome_if_new(seed)
        if wait:
            return await self._join_crawl(seeds, len(wanted))
        # Owned by the protocol, as the requests it sends: closing the node cancels it.
        self.rpc.adopt(
            asyncio.get_running_loop().create_task(
                self._join_crawl(seeds, len(wanted)), name="dht-join"
            )
        )
        return seeds

    async def _join_crawl(self, seeds: list[Node], wanted: int) -> list[Node]:
        """The join's crawl towards our own id, from `seeds`; its closest answering nodes.

        Nothing a start publishes waits on it: a key's holders are found by a crawl of their
        own from whatever the table holds, the seeds included, and the coordinators' copies go
        to their addresses. Run beside the publish (`bootstrap(wait=False)`), a fresh worker on
        `world` is listed and holds its keys about one join sooner.
        """
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
            stall=self.stall,
        ).run()
        self.count_crawl("join", result.queried)
        logger.info(
            "joined through %d of %d peers; %d contacts", len(seeds), wanted, len(self.rpc.router)
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
                until = loop.time() + self.stall
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
        """The peers' addresses this node's socket can send to; the others are said why not."""
        loop = asyncio.get_running_loop()
        sock = self.transport.get_extra_info("socket") if self.transport else None
        family = sock.family if sock is not None else socket.AF_INET
        dual = self.protocol is not None and self.protocol.dual_stack
        out: list[tuple[str, int]] = []
        for host, port in addrs:
            # An IP literal needs no resolver (a thread, which a virtual clock cannot wait for).
            literal = contact_address(host, port)
            if literal is not None:
                usable = sendable(literal, family, dual=dual)
                if usable is not None:
                    out.append(usable)
                    continue
                ours, theirs = ("IPv6", "IPv4") if family == socket.AF_INET6 else ("IPv4", "IPv6")
                logger.warning(
                    "bootstrap peer %s is %s and this node's DHT socket (%s) is %s only: "
                    "skipped (bind the DHT to :: on a dual-stack host to reach both)",
                    format_hostport(host, port),
                    theirs,
                    format_hostport(*self.address),
                    ours,
                )
                continue
            try:
                infos = await loop.getaddrinfo(
                    host, port, family=0 if dual else family, type=socket.SOCK_DGRAM
                )
            except (OSError, ValueError) as exc:
                # ValueError (UnicodeError): a name the IDNA codec refuses, say a label over
                # 63 characters; one such peer must not cost the join through the others.
                logger.warning(
                    "cannot resolve bootstrap peer %s: %s", format_hostport(host, port), exc
                )
                continue
            found = (sendable(info[4][:2], family, dual=dual) for info in infos)
            first = next((addr for addr in found if addr is not None), None)
            if first is not None:
                out.append(first)
        return out

    def bootstrappable_neighbors(self) -> list[tuple[str, int]]:
        """Up to k known contacts, closest to us first, for saving and rejoining."""
        return [(n.ip, n.port) for n in self.rpc.router.find_neighbors(self.node)]

    # Publishing and reading, by the two halves of the node.

    async def publish(
        self, record: WorkerRecord, *, again_within: float | None = None
    ) -> PublishReport:
        """Store `record` under `worker:<id>` and in one shard per service it offers.

        A caller that will publish this worker again within `again_within` seconds lets
        holders whose copy outlives that wait for it (see dht.renew). Raises RecordError if
        the record is invalid, PublishError if no node stored it.
        """
        return await self.publisher.publish(record, again_within=again_within)

    def set_coordinators(self, addrs: Iterable[tuple[str, int]]) -> None:
        """The coordinators (bridges) to exempt from the diversity limits and copy publishes
        to; a worker learns them from the edge after its node is open."""
        self.coordinators = tuple(dict.fromkeys(addrs))
        if self.protocol is not None:
            self.protocol.router.pinned = frozenset(self.coordinators)

    async def lookup(self, service: str, limit: int = 10) -> list[WorkerRecord]:
        """Up to `limit` live providers of `service`, least loaded first."""
        return (await self.reader.lookup_report(service, limit)).providers

    async def lookup_report(self, service: str, limit: int = 10) -> LookupReport:
        """`lookup`, with the number of shards read, hops, and time taken (see dht.lookup)."""
        return await self.reader.lookup_report(service, limit)

    async def service_records(self, service: str) -> list[WorkerRecord]:
        """Every record (live or tombstone) of a service, from every level of its trie that
        overflowed. For the bridge and audits, not lookups."""
        return await self.reader.service_records(service)

    async def get_record(self, worker_id: str) -> WorkerRecord | None:
        """The newest record (live or tombstone) of one worker, or None."""
        return (await self.reader.get_record_report(worker_id))[0]

    async def get_record_report(self, worker_id: str) -> tuple[WorkerRecord | None, int]:
        """`get_record`, and the hops its lookup took."""
        return await self.reader.get_record_report(worker_id)

    async def get_records(self, key: str) -> list[WorkerRecord]:
        """Every valid record under a key name, merged across the holders that answered."""
        return await self.reader.get_records(key)

    # Crawls, for both halves.

    @property
    def stall(self) -> float:
        """Seconds after which a contact that has not answered is passed over for the next."""
        # As long as this node's own replies say a silent contact is likely dead: a few ms on
        # a LAN, the configured ceiling on a slow or unmeasured network.
        return self.rpc.round_trips.stall(self.settings.stall_floor, self.settings.stall)

    async def crawl(
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
        to a share of its records (see dht.crawl) counts as one.
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
                stall=self.stall,
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
        self.count_crawl(purpose, result.queried)
        return result

    def count_crawl(self, purpose: str, queried: int) -> None:
        """Add `queried` contacts to the crawls made for `purpose`."""
        self.crawl_queries[purpose] = self.crawl_queries.get(purpose, 0) + queried

    # State, as JSON (the library pickles, which runs code on load).

    def state(self) -> dict[str, Any]:
        """What a restart needs: our id, known contacts, shard levels."""
        return {
            "version": STATE_VERSION,
            "node_id": self.node.id.hex(),
            "neighbors": [list(addr) for addr in self.bootstrappable_neighbors()],
            "levels": [[s, w, level] for (s, w), level in self.publisher.levels.items()],
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
                self.publisher.levels[(str(service), str(worker_id))] = level


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
