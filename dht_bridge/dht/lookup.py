"""Reading: a service's providers from the shard trie, and a worker's own record.

`Reader` is the half of a `DHTNode` that reads. A lookup reads one random root-to-leaf path of
the trie over disjoint crawl paths, as many levels at once as it expects to need, and verifies
only the records it returns.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from dht_bridge.dht import shards
from dht_bridge.dht.host import NodeHost
from dht_bridge.dht.storage import RecordStorage
from dht_bridge.dht.values import backs_mark, decode_value, fills_proof_share, key_digest
from dht_bridge.records import WorkerRecord, merge_into
from dht_bridge.settings import DHTSettings

__all__ = ["PARTIAL_LIMIT", "KeyRead", "LookupReport", "Reader"]

logger = logging.getLogger(__name__)

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
# Services whose depth is remembered, at most: a router looks up whatever names its clients
# ask for, and made-up ones must not grow its memory. The least recently read go first.
MAX_DEPTH_HINTS = 4096


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


class Reader:
    """The reading half of a `DHTNode`: service lookups over the shard trie, record gets, and
    how deep each service's trie was when last read."""

    def __init__(
        self,
        host: NodeHost,
        settings: DHTSettings,
        *,
        storage: RecordStorage,
        clock: Callable[[], float],
        levels: Mapping[tuple[str, str], int],
    ) -> None:
        self.host = host
        self.settings = settings
        self.storage = storage
        self.verifier = storage.verifier
        self.clock = clock
        # The publisher's shard level per (service, worker): where we file is a first guess
        # of how deep a service's trie is.
        self.levels = levels
        # Where the last lookup of each service ended: the next one reads down to it at once.
        self.depth_hints: dict[str, int] = {}

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
                self._hint(service, level + max(len(results) - 1, 0))
                break
            level += len(results)
            reported = max(got.deepest for got in results)
            depth = max(level, min(reported, level + MAX_PREFETCH - 1, shards.MAX_LEVEL))
        chosen = self._select(versions, limit)
        return LookupReport(chosen, read, hops, time.monotonic() - started, rounds)

    def _hint(self, service: str, depth: int) -> None:
        hints = self.depth_hints
        hints.pop(service, None)  # to the end: the services read lately stay
        hints[service] = depth
        if len(hints) > MAX_DEPTH_HINTS:
            del hints[next(iter(hints))]

    def _guess_depth(self, service: str) -> int:
        """The deepest level a lookup of `service` reads in its first round: where the last
        lookup of it ended; else where we file it ourselves; else where lookups of other
        services ended, at most `MAX_PREFETCH` levels; else `MAX_PREFETCH` levels. Guessing
        deep costs the start of a crawl per level too many (cancelled once a shallower level
        turns out not overflowed); guessing short costs a round: on `world` each round is a
        few round trips (2000 nodes: a reader with no history read in 2.06 rounds from the
        root alone; at 1000, reading 4 levels at once took p50 / p99 4.0 / 11.3 round trips
        to 2.84 / 9.46)."""
        hint = self.depth_hints.get(service)
        if hint is not None:
            return hint
        own = [level for (name, _), level in self.levels.items() if name == service]
        if own:
            return max(own)
        return min(max(self.depth_hints.values(), default=MAX_PREFETCH - 1), MAX_PREFETCH - 1)

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
            now = self.clock()
            for shard, got in zip(frontier, results, strict=True):
                merge_into(found, got.records, now=now)
                # A shard full enough to have turned newcomers away is read below even with no
                # mark: holders whose copy predates the mark serve it bare, and a worker the
                # walk misses reaches no bridge unless it copies to this one.
                key = shards.service_key(service, shard)
                live = [r for r in got.records if not r.is_expired(now)]
                full = got.overflowed or fills_proof_share(key, live)
                if full and shards.level_of(shard) < shards.MAX_LEVEL:
                    descend.extend(shards.children(shard))
            frontier = descend
        return sorted(found.values(), key=lambda r: (r.load, r.worker_id))

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
        holder's value may be a share of what it holds (a cut answer, see dht.protocol).
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

        result = await self.host.crawl(
            digest,
            purpose="read",
            find_value=True,
            want_values=want,
            accept=useful,
            paths=DISJOINT_PATHS if lazy else 1,
            partial_ok=partial_ok,
        )
        # Replicas usually hold byte-identical values: decode each distinct one once. A value
        # checked record by record (not `lazy`) is dropped at its first forged one: an honest
        # holder serves only records it checked, and each check costs about 0.35 ms.
        values = {value for _, value in result.values}
        if local is not None:
            values.add(local)
        for value in values:
            try:
                decoded = decode_value(
                    value,
                    digest=digest,
                    verifier=self.verifier,
                    now=now,
                    lazy=lazy,
                    forged_refuses_all=not lazy,
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
