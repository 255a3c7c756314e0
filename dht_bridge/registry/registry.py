"""The Redis registry: the fast, authoritative view of live workers for the edge router.

Keys (DESIGN.md, "In Redis"): `rma:worker:<id>` holds the record JSON with the lease as key TTL;
`rma:svc:<service>` is a sorted set of worker ids scored by load; changes are announced on the
channel `rma:events`. Every update applies the merge rule inside Redis, in one Lua script, so
concurrent writers (routers, bridges) cannot lose or reorder records.

Self-preservation (the bridge's, as Eureka does): when a bridge has lost the DHT side and many
leases are about to lapse at once, it `hold`s those records: their keys outlive the lease and
their service-set score moves above every load (`STALE_SCORE` + load), so lookups list them after
every fresh provider. A newer record or a tombstone replaces a held one at once (the upsert script
rescores or removes it); `release` ends the holds once the DHT is back.

It runs unchanged on one Redis, a Sentinel-managed primary and a Redis Cluster
(`redis_topology`). On Cluster every key and the channel carry the hash tag `{rma}` instead of the
plain `rma:` prefix (`{rma}:worker:<id>`, `{rma}:svc:<service>`, `{rma}:held`, `{rma}:events`): an
upsert touches a worker's key and every service set it joins or leaves, and a service set is
shared by all its workers, so only one slot for the whole registry keeps each script atomic and
each MGET in one slot. The registry is small (kilobytes per worker), so one primary (and its
replicas) holds it. Events use sharded pub/sub there (SPUBLISH from the scripts, SSUBSCRIBE on
the slot's primary), which Cluster keeps within that shard instead of broadcasting to all nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import fakeredis
from cachetools import LRUCache
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from dht_bridge import records
from dht_bridge.errors import (
    ConfigError,
    RecordError,
    RecordExpired,
    RecordInvalid,
    RegistryError,
    RegistryUnavailable,
)
from dht_bridge.identity import WORKER_ID_RE
from dht_bridge.records import SERVICE_RE, WorkerRecord
from dht_bridge.registry.batch import ReadBatcher
from dht_bridge.registry.events import (
    UNAVAILABLE,
    Event,
    EventSubscription,
    PlainPubSubOpener,
    ShardPubSubOpener,
    describe,
    leaked_transport_error,
)
from dht_bridge.registry.topology import (
    Closer,
    RedisClient,
    initialize_cluster,
    open_client,
    parse_redis_url,
)
from dht_bridge.settings import DEFAULT_REDIS_TIMEOUT, RegistrySettings
from dht_bridge.tunnels import TunnelPolicy

log = logging.getLogger(__name__)

KEY_PREFIX = "rma:"
# On Cluster: one hash tag for every key, so that every script and MGET stays in one slot.
CLUSTER_KEY_PREFIX = "{rma}:"
DEFAULT_LOOKUP_LIMIT = 10
DEFAULT_RECORDS_LIMIT = 1000
# A region lookup ranks this many live providers (at least) by region before cutting to `limit`.
REGION_WINDOW_MIN = 64
REGION_WINDOW_FACTOR = 4
# Records per pipeline in upsert_many: each chunk is one round trip bounded by the timeout.
UPSERT_CHUNK = 256
# Distinct pages read in one batched lookup script (batch.py): bounds a batch's Redis time and
# its reply's size (a page of 64 records is about 40 KB).
LOOKUP_BATCH = 64
SCAN_COUNT = 500


LUA_DIR = Path(__file__).with_name("lua")


def _lua(name: str) -> str:
    """A registry script, after the helpers the scripts share (lua/services.lua)."""
    shared = (LUA_DIR / "services.lua").read_text("utf-8")
    return shared + (LUA_DIR / name).read_text("utf-8")


_UPSERT_SCRIPT = _lua("upsert.lua")
_HOLD_SCRIPT = _lua("hold.lua")
_RELEASE_SCRIPT = _lua("release.lua")
_LOOKUP_SCRIPT = (LUA_DIR / "lookup.lua").read_text("utf-8")
# Parsed records kept by their stored JSON: a lookup parses a record once per version (a
# heartbeat writes a new one), not once per read.
PARSED_RECORDS = 4096

# Service-set score of a held (stale) provider: above every load (0.0-1.0), so that a lookup,
# which reads the set in score order, lists every fresh provider before any stale one.
STALE_SCORE = 2.0

# Removes ids whose worker key is gone, or whose record no longer offers the service: a
# worker whose key lapsed and that came back offering other services was never taken out of
# the old sets (the upsert could not see what the lapsed record offered). Checked and removed
# in one step: a worker that re-registers between a lookup's read and its prune must not be
# dropped from the set. KEYS[1] the service set, KEYS[2..n] the worker keys of the candidates;
# ARGV[1] the service, ARGV[2..n] the candidates' ids.
_PRUNE_SCRIPT = """
local function offers(raw, service)
  local ok, record = pcall(cjson.decode, raw)
  if not ok or type(record) ~= "table" or record.tombstone == true then
    return false
  end
  if type(record.services) ~= "table" then
    return false
  end
  for _, name in ipairs(record.services) do
    if name == service then
      return true
    end
  end
  return false
end

local removed = 0
for i = 2, #KEYS do
  local raw = redis.call("GET", KEYS[i])
  if not raw or not offers(raw, ARGV[1]) then
    removed = removed + redis.call("ZREM", KEYS[1], ARGV[i])
  end
end
return removed
"""


# One page of a service set: its key and the first and last rank read.
_Page = tuple[str, int, int]


@dataclass(frozen=True)
class Provider:
    """A provider from a lookup; `stale` when the record is only held by self-preservation."""

    record: WorkerRecord
    stale: bool = False


class _PageReply:
    """One page of a service set as the lookup script returned it (ids and scores, each id's
    record or None), parsed once for every lookup that shares it: concurrent lookups of a
    service read its first page once (batch.py), and each parsing it again cost a router's miss
    about a tenth of its own work."""

    __slots__ = ("gone", "ids", "pruning", "scores", "usable", "values")

    def __init__(self, scored: Sequence[bytes | str], values: Sequence[Any]) -> None:
        self.ids = [_text(member) for member in scored[::2]]
        self.scores = [float(score) for score in scored[1::2]]
        self.values = values
        self.gone = [wid for wid, raw in zip(self.ids, values, strict=True) if raw is None]
        # The usable providers, by whether stale ones were asked for (a page is one service's).
        self.usable: dict[bool, list[Provider]] = {}
        # The one pruning of `gone`, whose count every sharer pages on by: a second prune of
        # the same ids removes none, and a sharer counting 0 would skip that many records.
        self.pruning: asyncio.Future[int] | None = None


class Registry:
    """Worker records in Redis under the merge rule; every Redis failure is a RegistryError.

    The client is injected (a real Redis, a Sentinel-managed one, a Cluster, or fakeredis);
    `clock` is the wall clock used to check leases, since `expires_at` is unix time. Each
    operation is bounded by `timeout` seconds. The key prefix defaults to `rma:`, or `{rma}:` on
    a Cluster; `closers` run after the client is closed (the Sentinel connections). Lookups
    running at once read Redis together, up to `lookup_batch` pages in one round trip.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        policy: TunnelPolicy,
        clock: Callable[[], float] = time.time,
        timeout: float = DEFAULT_REDIS_TIMEOUT,
        prefix: str | None = None,
        owns_client: bool = False,
        closers: Sequence[Closer] = (),
        lookup_batch: int = LOOKUP_BATCH,
    ) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        if prefix is None:
            prefix = CLUSTER_KEY_PREFIX if self._cluster else KEY_PREFIX
        if self._cluster and not re.match(r"[^{]*\{[^}]+\}", prefix):
            raise ConfigError(f"on Redis Cluster the key prefix needs a hash tag, not {prefix!r}")
        self._policy = policy
        self._clock = clock
        self._timeout = timeout
        self._prefix = prefix
        self._owns_client = owns_client
        self._closers = list(closers)
        # Cluster keeps shard channels within the slot's shard; SPUBLISH from a script is fine
        # there because the channel carries the same hash tag as the keys.
        self._publish_command = "SPUBLISH" if self._cluster else "PUBLISH"
        self._upsert_script = client.register_script(_UPSERT_SCRIPT)
        self._prune_script = client.register_script(_PRUNE_SCRIPT)
        self._hold_script = client.register_script(_HOLD_SCRIPT)
        self._release_script = client.register_script(_RELEASE_SCRIPT)
        self._lookup_script = client.register_script(_LOOKUP_SCRIPT)
        self._pages = ReadBatcher[_Page, _PageReply](
            self._read_pages, max_reads=lookup_batch, timeout=timeout
        )
        self._parsed: LRUCache[bytes | str, WorkerRecord] = LRUCache(PARSED_RECORDS)

    @property
    def client(self) -> RedisClient:
        """The Redis client underneath (for diagnostics and tests)."""
        return self._client

    @property
    def cluster(self) -> bool:
        """True on Redis Cluster (hash-tagged keys, sharded pub/sub)."""
        return self._cluster

    @property
    def channel(self) -> str:
        """The pub/sub channel that carries record changes and operator events."""
        return f"{self._prefix}events"

    def worker_key(self, worker_id: str) -> str:
        """The key holding one worker's record."""
        return f"{self._prefix}worker:{worker_id}"

    def service_key(self, service: str) -> str:
        """The sorted set of the workers offering `service`."""
        return f"{self._prefix}svc:{service}"

    @property
    def held_key(self) -> str:
        """The sorted set of workers held by self-preservation, scored by hold end (unix ms)."""
        return f"{self._prefix}held"

    async def aclose(self) -> None:
        """Close the client if this registry opened it."""
        if self._owns_client:
            await self._client.aclose()
            for close in self._closers:
                await close()

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def drop_idle_connections(self) -> None:
        """Close the pooled connections not in use. After Redis restarts, every connection
        opened before is dead and, with no retries, would fail its next command: a caller that
        has just seen Redis come back calls this so that none of them is handed out."""
        with contextlib.suppress(RedisError, OSError):
            if isinstance(self._client, RedisCluster):
                # Each node has its own pool; the slot map is reloaded after a failed command.
                for node in self._client.get_nodes():
                    await node.disconnect_free_connections()
            else:
                await self._client.connection_pool.disconnect(inuse_connections=False)

    async def ping(self) -> None:
        """Raise RegistryUnavailable unless Redis answers within the timeout."""
        async with self._guard("PING"):
            if self._cluster:
                # The node that matters is the primary of our slot: a keyed read goes there
                # (PING would go to a random node, or to every one).
                await self._client.exists(self.held_key)
            else:
                await self._client.ping()

    # -- writes ----------------------------------------------------------------------------

    async def upsert(self, record: WorkerRecord, *, origin: str | None = None) -> bool:
        """Validate and store `record`; False when an equal or newer record is already there.

        `origin`, when given, is carried in the change event (a bridge marks its own writes so
        that no bridge copies them back into the DHT). Raises the RecordError of
        `records.validate` unchanged, before anything is written.
        """
        records.validate(record, self._policy, now=self._clock())
        keys, args = self._upsert_call(record, origin)
        async with self._guard(f"upsert of {record.worker_id}"):
            applied = await self._upsert_script(keys=keys, args=args)
        return bool(applied)

    async def leave(self, tombstone: WorkerRecord) -> bool:
        """The graceful leave: store a signed tombstone, which drops the worker from lookups."""
        if not tombstone.tombstone:
            raise RecordInvalid("tombstone", "a leave needs a record with tombstone set")
        return await self.upsert(tombstone)

    async def upsert_many(
        self, batch: Iterable[WorkerRecord], *, origin: str | None = None
    ) -> list[bool]:
        """Upsert a batch in pipelined round trips; one bool per record, in order.

        A record whose lease has ended is dropped (False), as the merge rule drops expired
        records; any other RecordError is raised before anything of the batch is written.
        """
        pending = list(batch)
        now = self._clock()
        valid = [self._check_for_batch(record, now) for record in pending]
        results = [False] * len(pending)
        todo = [i for i, ok in enumerate(valid) if ok]
        for start in range(0, len(todo), UPSERT_CHUNK):
            chunk = todo[start : start + UPSERT_CHUNK]
            applied = await self._upsert_chunk([pending[i] for i in chunk], origin)
            for i, flag in zip(chunk, applied, strict=True):
                results[i] = flag
        return results

    def _check_for_batch(self, record: WorkerRecord, now: float) -> bool:
        try:
            records.validate(record, self._policy, now=now)
        except RecordExpired:
            log.debug("dropping expired record of %s from a batch", record.worker_id)
            return False
        return True

    async def _upsert_chunk(self, chunk: Sequence[WorkerRecord], origin: str | None) -> list[bool]:
        async with self._guard(f"upsert of {len(chunk)} records"):
            try:
                replies = await self._pipelined_upserts(chunk, origin)
            except NoScriptError:
                # A replica promoted by a failover has never loaded the script (scripts are
                # replicated as their effects), and a Cluster pipeline does not load it first
                # as a plain one does. Nothing of the chunk ran: load it and send it again.
                await self._client.script_load(_UPSERT_SCRIPT)
                replies = await self._pipelined_upserts(chunk, origin)
        return [bool(reply) for reply in replies]

    async def _pipelined_upserts(
        self, chunk: Sequence[WorkerRecord], origin: str | None
    ) -> list[Any]:
        # `async with` resets the pipeline whatever happens: when Redis dies while the script
        # is being loaded (before `execute` has its own cleanup), the pipeline would otherwise
        # keep its connection and warn when collected.
        async with self._client.pipeline(transaction=False) as pipe:
            for record in chunk:
                keys, args = self._upsert_call(record, origin)
                if self._cluster:
                    # A Cluster pipeline refuses its `evalsha` method, not the command: every
                    # key is in one slot, so the pipeline is one round trip to one node.
                    sha = self._upsert_script.sha
                    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
                else:
                    # redis-py types `client` as a client; queuing on a pipeline is its use.
                    await self._upsert_script(keys=keys, args=args, client=pipe)  # type: ignore[arg-type]
            return list(await pipe.execute())

    def _upsert_call(
        self, record: WorkerRecord, origin: str | None = None
    ) -> tuple[list[str], list[str | int | float]]:
        keys = [self.worker_key(record.worker_id)]
        keys.extend(self.service_key(name) for name in record.services)
        args: list[str | int | float] = [
            record.to_json(),
            str(record.seq),
            "1" if record.tombstone else "0",
            record.signature,
            str(round(record.expires_at * 1000)),
            repr(record.load),
            record.worker_id,
            self.service_key(""),
            self.channel,
            _event_head(record, origin),
            self._publish_command,
        ]
        return keys, args

    # -- reads -----------------------------------------------------------------------------

    async def get(self, worker_id: str) -> WorkerRecord | None:
        """The stored record of a worker (a tombstone included), or None."""
        async with self._guard(f"get of {worker_id}"):
            raw = await self._client.get(self.worker_key(worker_id))
        return None if raw is None else self._parse(raw, worker_id)

    async def lookup(
        self,
        service: str,
        *,
        limit: int = DEFAULT_LOOKUP_LIMIT,
        region: str | None = None,
        stale: bool = True,
    ) -> list[WorkerRecord]:
        """Up to `limit` live providers of `service`, least loaded first.

        With `region`, providers in that region come first (each group least loaded first),
        ranked within a bounded window of the least loaded providers. Providers held by
        self-preservation come after every fresh one (`stale=False` leaves them out). Ids whose
        lease has ended are pruned from the service set on the way.
        """
        found = await self.lookup_marked(service, limit=limit, region=region, stale=stale)
        return [provider.record for provider in found]

    async def lookup_marked(
        self,
        service: str,
        *,
        limit: int = DEFAULT_LOOKUP_LIMIT,
        region: str | None = None,
        stale: bool = True,
    ) -> list[Provider]:
        """`lookup`, telling which providers are stale (held while their lease has ended or is
        about to, because the bridge lost the DHT side)."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        if not SERVICE_RE.fullmatch(service):
            return []  # no valid record can offer it, and no odd key name is touched
        want = limit if not region else max(REGION_WINDOW_FACTOR * limit, REGION_WINDOW_MIN)
        async with self._guard(f"lookup of {service}"):
            found = await self._live_providers(service, want, stale)
        if region:
            # sorted() is stable, so each group keeps its load order; stale ones stay last.
            found.sort(key=lambda provider: (provider.stale, provider.record.region != region))
        return found[:limit]

    async def _live_providers(self, service: str, want: int, stale: bool) -> list[Provider]:
        key = self.service_key(service)
        page = max(want, 16)
        found: list[Provider] = []
        start = 0
        while len(found) < want:
            # The set's page and its records, in one round trip shared with the lookups running
            # at the same time.
            reply = await self._pages.read((key, start, start + page - 1))
            if not reply.ids:
                break
            usable = reply.usable.get(stale)
            if usable is None:
                usable = reply.usable[stale] = self._usable(service, reply, stale)
            found.extend(usable[: want - len(found)])
            pruned = 0
            if reply.gone:
                if reply.pruning is None:
                    task = asyncio.get_running_loop().create_task(
                        self._prune_ids(service, reply.gone)
                    )
                    # Its error is every sharer's; read here too, in case all of them gave up.
                    task.add_done_callback(lambda done: done.cancelled() or done.exception())
                    reply.pruning = task
                # Shielded: one sharer giving up must not cancel the others' pruning.
                pruned = await asyncio.shield(reply.pruning)
            start += len(reply.ids) - pruned
            if len(reply.ids) < page or (not stale and reply.scores[-1] >= STALE_SCORE):
                break
        return found

    async def _read_pages(self, pages: Sequence[_Page]) -> list[_PageReply | Exception]:
        """A batch of pages in one script call: for each, its page or its own error."""
        args: list[str | int] = [self.worker_key("")]
        for _, first, last in pages:
            args += [first, last]
        reply = await self._lookup_script(keys=[key for key, _, _ in pages], args=args)
        return [each if isinstance(each, Exception) else _PageReply(*each) for each in reply]

    def _usable(self, service: str, page: _PageReply, stale: bool) -> list[Provider]:
        now = self._clock()
        usable: list[Provider] = []
        for wid, score, raw in zip(page.ids, page.scores, page.values, strict=True):
            if raw is None:
                continue
            held = score >= STALE_SCORE
            if held and not stale:
                continue
            record = self._parse_kept(raw, wid)
            if record is None or record.tombstone or service not in record.services:
                if wid not in page.gone:
                    page.gone.append(wid)  # filed under a service it no longer offers
                continue
            # A held record outlives its lease on purpose; any other expired one is on its way
            # out (its key's TTL and the record's lease end together).
            if record.is_expired(now) and not held:
                continue
            usable.append(Provider(record, held))
        return usable

    async def _prune_ids(self, service: str, ids: Sequence[str]) -> int:
        keys = [self.service_key(service), *(self.worker_key(wid) for wid in ids)]
        removed = await self._prune_script(keys=keys, args=[service, *ids])
        if removed:
            log.debug("pruned %d ids from the set of %s", removed, service)
        return int(removed)

    async def prune(self, service: str) -> int:
        """Remove from the set of `service` every id whose record is gone or no longer offers
        it; returns how many."""
        key = self.service_key(service)
        removed = 0
        start = 0
        async with self._guard(f"prune of {service}"):
            while True:
                ids = _texts(await self._client.zrange(key, start, start + 499))
                if not ids:
                    return removed
                pruned = await self._prune_ids(service, ids)
                removed += pruned
                start += len(ids) - pruned

    async def services(self) -> list[str]:
        """Names of the services that have a set in Redis (some providers may have expired)."""
        pattern = self.service_key("*")
        names: set[str] = set()
        async with self._guard("scan of services"):
            async for raw in self._client.scan_iter(match=pattern, count=SCAN_COUNT):
                names.add(_text(raw)[len(pattern) - 1 :])
        return sorted(names)

    async def count(self, service: str) -> int:
        """Ids in the set of `service`, including any whose lease ended since the last prune."""
        async with self._guard(f"count of {service}"):
            return int(await self._client.zcard(self.service_key(service)))

    async def counts(self, services: Sequence[str]) -> list[int]:
        """`count` of each service, in one round trip."""
        if not services:
            return []
        async with self._guard("count of services"):
            pipe = self._client.pipeline(transaction=False)
            for service in services:
                pipe.zcard(self.service_key(service))
            return [int(n) for n in await pipe.execute()]

    def bridge_key(self, bridge_id: str) -> str:
        """The key of one bridge's latest figures."""
        return f"{self._prefix}bridge:{bridge_id}"

    async def report_bridge(self, bridge_id: str, figures: Mapping[str, float], ttl: float) -> None:
        """Leave a bridge's figures (lag, journal) for the routers, for `ttl` seconds: a bridge
        in a process of its own has no other way to show them on the topology page."""
        body = json.dumps({"bridge": bridge_id, "at": self._clock(), "figures": dict(figures)})
        async with self._guard("bridge report"):
            await self._client.set(self.bridge_key(bridge_id), body, px=max(1, int(ttl * 1000)))

    async def bridge_reports(self, *, limit: int = 64) -> list[dict[str, Any]]:
        """The figures every bridge left within its report's lifetime."""
        async with self._guard("bridge reports"):
            keys = await self._scan_keys(self.bridge_key("*"), limit)
            values = await self._client.mget(keys) if keys else []
        reports = []
        for raw in values:
            try:
                report = json.loads(raw) if raw is not None else None
            except ValueError:
                continue
            if isinstance(report, dict) and isinstance(report.get("figures"), dict):
                reports.append(report)
        return reports

    async def records(self, *, limit: int = DEFAULT_RECORDS_LIMIT) -> list[WorkerRecord]:
        """Up to `limit` stored records, tombstones included, in no particular order (SCAN)."""
        async with self._guard("scan of records"):
            keys = await self._scan_keys(self.worker_key("*"), limit)
            values = await self._client.mget(keys) if keys else []
        found: list[WorkerRecord] = []
        for key, raw in zip(keys, values, strict=True):
            record = None if raw is None else self._parse(raw, key)
            if record is not None:
                found.append(record)
        return found

    async def _scan_keys(self, pattern: str, limit: int) -> list[str]:
        keys: dict[str, None] = {}  # SCAN may return a key twice; the first sight keeps order
        # scan_iter walks every primary on Cluster; `aclosing` ends the walk when we stop early.
        found = self._client.scan_iter(match=pattern, count=SCAN_COUNT)
        async with contextlib.aclosing(cast(AsyncGenerator[Any, None], found)) as scan:
            async for raw in scan:
                keys[_text(raw)] = None
                if len(keys) >= limit:
                    break
        return list(keys)

    def _parse(self, raw: bytes | str, where: str) -> WorkerRecord | None:
        try:
            return WorkerRecord.from_json(raw)
        except RecordError as exc:
            log.warning("ignoring a corrupt record in Redis (%s): %s", where, exc)
            return None

    def _parse_kept(self, raw: bytes | str, where: str) -> WorkerRecord | None:
        """`_parse` for lookups, through the memo of parsed records (scans do not use it: a
        5,000-record topology read would push the providers of every hot service out)."""
        record = self._parsed.get(raw)
        if record is None:
            record = self._parse(raw, where)
            if record is not None:
                self._parsed[raw] = record
        return record

    # -- self-preservation -----------------------------------------------------------------

    async def hold(self, worker_ids: Iterable[str], *, lapse_before: float, until: float) -> int:
        """Keep the records of `worker_ids` whose lease ends before `lapse_before` (unix time)
        in Redis until `until`, marked stale; returns how many are held.

        Tombstones and records with a later lease are left alone, so a hold never outranks a
        fresh heartbeat that arrived meanwhile. Holding again extends the hold. A hold ends at
        `until` by itself (the key's TTL) unless renewed: a bridge that dies does not pin
        records for ever.
        """
        ids = [wid for wid in dict.fromkeys(worker_ids) if WORKER_ID_RE.fullmatch(wid)]
        if not ids:
            return 0
        held = 0
        now_ms = round(self._clock() * 1000)
        async with self._guard(f"hold of {len(ids)} records"):
            for start in range(0, len(ids), UPSERT_CHUNK):
                chunk = ids[start : start + UPSERT_CHUNK]
                keys = [self.held_key, *(self.worker_key(wid) for wid in chunk)]
                args: list[str | int | float] = [
                    round(lapse_before * 1000),
                    round(until * 1000),
                    now_ms,
                    self.service_key(""),
                    repr(STALE_SCORE),
                    *chunk,
                ]
                held += int(await self._hold_script(keys=keys, args=args))
        return held

    async def release(self) -> tuple[int, int]:
        """End every hold: a record whose lease has ended is removed (with a change event, so
        routers drop it), one still within its lease is fresh again. Returns (removed, restored).
        """
        now_ms = round(self._clock() * 1000)
        async with self._guard("release of held records"):
            reply = await self._release_script(
                keys=[self.held_key],
                args=[
                    now_ms,
                    self.worker_key(""),
                    self.service_key(""),
                    self.channel,
                    self._publish_command,
                ],
            )
        removed, restored = (int(value) for value in reply)
        if removed or restored:
            log.info("released held records: %d removed, %d fresh again", removed, restored)
        return removed, restored

    async def held_count(self) -> int:
        """Workers currently held by self-preservation."""
        async with self._guard("count of held records"):
            return int(await self._client.zcard(self.held_key))

    # -- events ----------------------------------------------------------------------------

    async def publish_event(self, event: Event) -> None:
        """Publish a JSON event on the events channel (for example an operator cache flush)."""
        payload = json.dumps(event, separators=(",", ":"), sort_keys=True)
        async with self._guard("publish"):
            if self._cluster:
                await self._client.spublish(self.channel, payload)
            else:
                await self._client.publish(self.channel, payload)

    def subscribe_events(self) -> EventSubscription:
        """A subscription to the events channel: `async with` it, then `async for` events."""
        opener = (
            ShardPubSubOpener(self._client, self.channel)
            if isinstance(self._client, RedisCluster)
            else PlainPubSubOpener(self._client)
        )
        return EventSubscription(opener, self.channel, timeout=self._timeout)

    # -- plumbing --------------------------------------------------------------------------

    @asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        """Bound an operation by the timeout and translate redis-py's errors at the boundary."""
        try:
            async with asyncio.timeout(self._timeout):
                if isinstance(self._client, RedisCluster):
                    await initialize_cluster(self._client)
                yield
        except UNAVAILABLE as exc:
            reason = describe(exc, self._timeout)
            raise RegistryUnavailable(f"Redis unavailable during {what}: {reason}") from exc
        except RedisError as exc:
            raise RegistryError(f"Redis failed during {what}: {exc}") from exc
        except (AttributeError, TypeError) as exc:
            if not leaked_transport_error(exc):
                raise
            log.debug("redis-py leaked %r for a lost connection", exc)
            raise RegistryUnavailable(f"Redis connection lost during {what}: {exc!r}") from exc


EMBEDDED_MAX_CONNECTIONS = 1 << 16


def open_registry(
    settings: RegistrySettings, *, policy: TunnelPolicy, clock: Callable[[], float] = time.time
) -> Registry:
    """A Registry on `settings.redis_url` (one Redis, Sentinel or Cluster: `redis_topology`),
    or on an embedded in-process fakeredis without one."""
    closers: list[Closer] = []
    if settings.redis_url is None:
        log.warning(
            "registry: no RMA_REDIS_URL, using the embedded in-process fakeredis: single process, "
            "NOT durable (everything is lost on exit)"
        )
        # In-process "connections" cost nothing; redis-py's default cap of 100 turned 200
        # workers leaving at once into 503s ("Too many connections").
        client: RedisClient = fakeredis.FakeAsyncRedis(
            server=fakeredis.FakeServer(), max_connections=EMBEDDED_MAX_CONNECTIONS
        )
    else:
        target = parse_redis_url(settings.redis_url, cluster=settings.cluster)
        log.info("registry: %s", target.describe())
        client, closers = open_client(target, settings.timeout)
    return Registry(
        client,
        policy=policy,
        clock=clock,
        timeout=settings.timeout,
        owns_client=True,
        closers=closers,
    )


def _event_head(record: WorkerRecord, origin: str | None = None) -> str:
    """The record event as JSON without its closing brace; the script appends `removed`."""
    event: dict[str, Any] = {
        "type": "record",
        "worker_id": record.worker_id,
        "seq": record.seq,
        "tombstone": record.tombstone,
        "services": list(record.services),
    }
    if origin is not None:
        event["origin"] = origin
    return json.dumps(event, separators=(",", ":"))[:-1]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _texts(reply: Any) -> list[str]:
    return [_text(item) for item in reply]


__all__ = ["STALE_SCORE", "EventSubscription", "Provider", "Registry", "open_registry"]
