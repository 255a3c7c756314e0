"""Publishing: a record filed under its worker key and in one shard per service it offers.

`Publisher` is the half of a `DHTNode` that writes. It keeps each worker's level in the shard
trie (rising and falling as shards fill and drain), the holders it last found for each key (so
a heartbeat re-stores without a crawl), which of them hold which copy (so most heartbeats are
short renewals), and the shards a holder proved full.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from kademlia.node import Node

from dht_bridge.dht import shards
from dht_bridge.dht.admission import within_limits
from dht_bridge.dht.crawl import parse_contacts
from dht_bridge.dht.host import NodeHost
from dht_bridge.dht.mode import DHTMode
from dht_bridge.dht.protocol import is_partial
from dht_bridge.dht.renew import RenewalBook, renewal_args
from dht_bridge.dht.storage import OVERFLOW_MEMORY, RecordStorage, StoreResult
from dht_bridge.dht.values import decode_value, encode_value, key_digest, leaves_no_room
from dht_bridge.errors import PublishError
from dht_bridge.records import WorkerRecord, validate
from dht_bridge.settings import DHTSettings
from dht_bridge.tunnels import TunnelPolicy

__all__ = ["COORDINATOR_COPIES", "KeyPublish", "PublishReport", "Publisher"]

logger = logging.getLogger(__name__)

# Every this many publishes, a worker placed below the root tries one level up, so that
# shards drain back towards the root when a service shrinks.
RISE_EVERY = 8
# The share of refused rises from level L that also renew the root's depth hint is
# ROOT_MARK_SHARE * 2**(1-L): with C workers a shard, about C/4 * ROOT_MARK_SHARE marks reach
# the root per heartbeat from each full level, where one per OVERFLOW_MEMORY would do.
ROOT_MARK_SHARE = 0.25
MAX_CACHED_HOLDER_SETS = 4096
# (service, worker) places in the trie remembered, at most: forgetting one costs that worker a
# descent from the root on its next publish.
MAX_SLOTS = 65536
# Cached holders whose time is up are rechecked by asking this many of them for the nodes they
# know near the key, not by a crawl of the whole path.
RECHECK_ASKS = 2
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
    # Holders not asked: their copy outlives the next publish (see dht.renew).
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


class Publisher:
    """The publishing half of a `DHTNode`: files records on the holders of their keys, keeps
    each worker's shard level, the holders found for each key and the copies they hold."""

    def __init__(
        self,
        host: NodeHost,
        settings: DHTSettings,
        *,
        policy: TunnelPolicy,
        storage: RecordStorage,
        clock: Callable[[], float],
    ) -> None:
        self.host = host
        self.settings = settings
        self.policy = policy
        self.storage = storage
        self.verifier = storage.verifier
        self.clock = clock
        # Shard level and publish count per (service, worker): a bridge publishes for many
        # workers, and each worker's place in the trie is its own.
        self.levels: dict[tuple[str, str], int] = {}
        self._publishes: dict[tuple[str, str], int] = {}
        # Heartbeats re-store to the holders the last crawl found instead of crawling again.
        self._holder_cache: OrderedDict[bytes, tuple[float, list[Node]]] = OrderedDict()
        # Which holders hold our last record of each (key, worker): they get renewals.
        self._renewals = RenewalBook()
        self.renewals_refused = 0
        # STOREs sent again to a holder that missed the first (see `_store_one`).
        self.store_retries = 0
        # Shards a holder proved full, by digest, until when (monotonic); see `_full_proven`.
        self._proven_full: dict[bytes, float] = {}

    def forget_holders(self) -> None:
        """Drop every cached holder set: after a change of mode the keys' holders are found
        again (a server's own copy counts, a client's does not)."""
        self._holder_cache.clear()

    async def publish(
        self, record: WorkerRecord, *, again_within: float | None = None
    ) -> PublishReport:
        """`DHTNode.publish`: the worker key, each service's shard, and the coordinators' copies
        at once."""
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
        own = self.host.address if self.host.transport is not None else None
        known = {(c.ip, c.port): c for c in self.host.rpc.router.contacts()}
        ranked = sorted(
            (a for a in self.host.coordinators if a != own),
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
        level = self.levels.get(slot, 0)
        count = self._publishes[slot] = self._publishes.get(slot, 0) + 1
        if len(self._publishes) > MAX_SLOTS:
            # A bridge publishes for whoever reaches Redis first: workers come and go for good.
            oldest = next(iter(self._publishes))
            del self._publishes[oldest]
            self.levels.pop(oldest, None)
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
                self.levels[slot] = report.levels[service] = level - 1
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
        self.levels[slot] = report.levels[service] = level
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
            ok, reply = await self.host.rpc.call_find_value(node, Node(digest))
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
            decoded = decode_value(
                value, digest=digest, verifier=self.verifier, now=now, forged_refuses_all=True
            )
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
        await asyncio.gather(*(self.host.rpc.call_store(node, digest, mark) for node in holders))
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
            ok, answer = await self.host.rpc.call_renew(node, digest, renewal)
            if not ok or answer != StoreResult.UNKNOWN.value:
                return ok, answer
            self.renewals_refused += 1  # lost our copy, or holds other fields: send it whole
        return await self.host.rpc.call_store(node, digest, value)

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
        crawl = await self.host.crawl(
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
        same few nodes for every publisher of a busy shard. What a holder names is its word
        alone: the holders keep a bucket's share per IP and subnet (`_closest`), so one socket
        that became a holder and names 20 ids next to the key at its own address takes at most
        two places. (Pinging each named node first cost lookups in the field: 29 of 1000
        service lookups short on `world` at 2000 nodes, seed 2, against none without it.)
        """
        asked = random.sample(holders, min(RECHECK_ASKS, len(holders)))
        target = Node(digest)
        replies = await asyncio.gather(*(self.host.rpc.call_find_node(n, target) for n in asked))
        self.host.count_crawl("recheck", len(asked))
        known = {node.id: node for node in holders}
        learned: dict[bytes, Node] = {}
        answered = False
        for ok, payload in replies:
            answered = answered or ok
            for node in parse_contacts(payload) if ok else []:
                # Those just found silent stay out: their neighbours still list them.
                if node.id not in known and node.id != self.host.node.id and node.id not in exclude:
                    learned.setdefault(node.id, node)
        if not answered:
            return []
        for node_id, node in learned.items():
            known.setdefault(node_id, node)
        return self._closest(digest, known.values())

    def _closest(self, digest: bytes, nodes: Iterable[Node]) -> list[Node]:
        """The `replicas` nodes closest to `digest` among `nodes`, closest first, at most a
        bucket's share per IP and subnet (as a crawl's): fakes one address mints next to the
        key take at most two places."""
        target = int.from_bytes(digest, "big")
        router = self.host.rpc.router
        return within_limits(
            sorted(nodes, key=lambda n: n.long_id ^ target),
            router.limits,
            self.settings.replicas,
            groups=router.groups,
            exempt=lambda n: (n.ip, n.port) in router.pinned,
        )

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
        nearby = self.host.rpc.router.find_neighbors(Node(digest), k=self.settings.replicas)
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
        if self.host.mode is DHTMode.CLIENT:
            return False  # nobody reads from a client: a copy here would count as stored
        if len(holders) < self.settings.replicas:
            return True
        target = int.from_bytes(digest, "big")
        ours: int = self.host.node.long_id ^ target
        furthest: int = holders[-1].long_id ^ target
        return ours < furthest
