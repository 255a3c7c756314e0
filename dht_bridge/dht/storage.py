"""Storage for our DHT node: merged, expiring record sets instead of last-writer-wins blobs."""

from __future__ import annotations

import enum
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from kademlia.storage import IStorage

from dht_bridge.dht import shards
from dht_bridge.dht.admission import Groups, TokenBuckets
from dht_bridge.dht.renew import Renewal
from dht_bridge.dht.values import (
    MAX_RECORDS_BYTES,
    MAX_VALUE_BYTES,
    DecodedValue,
    RecordVerifier,
    checks_due,
    cut_value,
    decode_value,
    encode_value,
    mark_bytes,
)
from dht_bridge.errors import RecordError
from dht_bridge.records import WorkerRecord, merge_into, supersedes, validate_parsed
from dht_bridge.tunnels import TunnelPolicy

logger = logging.getLogger(__name__)

DEFAULT_MAX_KEYS = 50_000
# How long a shard stays marked overflowed after turning a newcomer away. Workers filed below
# retry one level up every few heartbeats (and renew the mark when refused again), so this is
# several of those rounds: readers keep looking below for as long as anyone may be there.
OVERFLOW_MEMORY = 600.0
# A full storage refuses every new key: said at most once this often, with the count since.
FULL_LOG_EVERY = 60.0
# A full storage looks for lapsed keys to make room at most once this often: the walk visits
# every key (50,000), and done for each refused STORE a flood of them was a flood of walks
# (60,000 STOREs of fresh identities into a full node took 82 s, now 19).
FULL_CULL_EVERY = 1.0
# Once this share of the keys is taken, a sender may add new keys only while the keys it added
# (still held) stay under a quota: QUOTA_PER_IP of `max_keys` for its IP group (an IPv4
# address, an IPv6 /64) and QUOTA_PER_SUBNET for its subnet group (a /24, a /48). Signed
# records cost an attacker nothing (identities are free): without quotas one host could take
# every key and shut new workers out (a coordinator so filled hands none to Redis). With them
# the last half is shared: 1,000 keys an address, 5,000 a subnet, of 50,000. Legitimate
# senders stay far below: a worker adds its own keys, a neighbour pushing a newcomer its share
# adds a few, a NAT with hundreds of volunteers behind it fits. A sender whose address has not
# answered us (a STORE's source can be forged) counts in one pool, as one subnet.
QUOTA_FROM = 0.5
QUOTA_PER_IP = 0.02
QUOTA_PER_SUBNET = 0.1
UNPROVEN: Groups = ("", "unproven")


class StoreResult(enum.Enum):
    """What a STORE did; the value is what our node answers on the wire."""

    OK = "ok"  # merged: at least one record was new or newer
    STALE = "stale"  # valid, but every record was already held at an equal or higher seq
    FULL = "full"  # a new worker did not fit in the value's size limit: publish one level down
    INVALID = "invalid"  # not an rma1 value, wrong key, or no record passed validation
    UNKNOWN = "unknown"  # a renewal of a record not held here (or held with other fields)


@dataclass
class _Entry:
    key: str
    records: dict[str, WorkerRecord] = field(default_factory=dict)
    encoded: bytes | None = None
    changed_at: float = 0.0
    overflow_until: float = 0.0
    deepest: int = 0
    deepest_until: float = 0.0
    # Who added the key (its IP and subnet groups), counted against their quota while held.
    source: Groups | None = None


class RecordStorage(IStorage):  # type: ignore[misc]
    """Record sets by key digest, merged by the merge rule, each record expiring with its lease.

    `clock` is wall-clock time (leases are unix times); `monotonic` orders changes.
    `quotas=False` lets any sender take every key (measurements only: the attack bench's
    reference).
    """

    def __init__(
        self,
        policy: TunnelPolicy,
        *,
        clock: Callable[[], float] = time.time,
        max_keys: int = DEFAULT_MAX_KEYS,
        verifier: RecordVerifier | None = None,
        on_merge: Callable[[str, list[WorkerRecord]], None] | None = None,
        quotas: bool = True,
    ) -> None:
        self.policy = policy
        self.quotas = quotas
        # Told of every record that changed what this node holds (the bridge listens here).
        self.on_merge = on_merge
        self.verifier = verifier or RecordVerifier(policy)
        self.clock = clock
        self.max_keys = max_keys
        self._data: dict[bytes, _Entry] = {}
        self.refused_full = 0  # new keys refused because every key was taken
        self.refused_quota = 0  # new keys refused because their sender was over its quota
        self._full_said: tuple[float, int] | None = None  # when, and the count then
        self._added: Counter[str] = Counter()  # keys held, by the groups of who added them
        self._culled_at = -math.inf
        # Signature checks per sender's IP group (see `_within_checks`).
        self.checks = TokenBuckets()
        self.refused_checks = 0  # STOREs refused for their sender's budget of checks
        self._checks_said = -math.inf

    def merge(
        self, digest: bytes, value: object, *, source: Groups | None = None, metered: bool = True
    ) -> StoreResult:
        """Validate `value` and merge its records into what is held under `digest`. A new key
        from `source` (the sender's groups; None: our own) counts against its quota; the
        signature checks it costs against its budget, unless not `metered` (a coordinator)."""
        now = self.clock()
        entry = self._data.get(digest)
        # What the records' checks may cost is paid before any of them is parsed.
        charged = checks_due(value, self.verifier, held=_signatures(entry, now))
        if charged and metered and not self._within_checks(source, charged):
            return StoreResult.INVALID
        try:
            decoded = decode_value(value, digest=digest, verifier=self.verifier, now=now, lazy=True)
        except ValueError as exc:
            logger.debug("refused STORE under %s: %s", digest.hex(), exc)
            return StoreResult.INVALID
        if decoded.refused:
            logger.debug(
                "refused %d records under %s: %s",
                decoded.refused,
                decoded.key,
                "; ".join(decoded.reasons[:3]),
            )
        if not decoded.records and not decoded.overflowed(now):
            return StoreResult.INVALID
        if not decoded.records and not self._may_mark(decoded.key, entry, source):
            logger.debug("refused a bare overflow mark for %s from %s", decoded.key, source)
            return StoreResult.INVALID
        if entry is None:
            if len(self._data) >= self.max_keys:
                if time.monotonic() - self._culled_at >= FULL_CULL_EVERY:
                    self.cull()
                if len(self._data) >= self.max_keys:
                    self._refuse_full(decoded.key)
                    return StoreResult.FULL
            if source is not None and self.quotas and self._over_quota(source):
                self.refused_quota += 1
                logger.debug("%s is over its quota of new keys; refusing %s", source, decoded.key)
                return StoreResult.FULL
            entry = _Entry(key=decoded.key, source=source)
        checked = self._checked(decoded, entry, source, now, charged)
        if checked is None:
            return StoreResult.INVALID
        return self._merge_entry(digest, entry, checked, now)

    def _checked(
        self, decoded: DecodedValue, entry: _Entry, source: Groups | None, now: float, paid: int
    ) -> DecodedValue | None:
        """`decoded` with its signatures checked; None when one is forged (the whole value is
        refused at it: an honest node only sends what it checked) or the sender's IP group has
        no checks left this second (see CHECK_RATE) for those beyond the `paid` ones.

        A record the verifier knows, or that cannot replace the live copy held (the same one
        again, an older one), costs no check: the second is passed over, as the merge would.
        """
        due: list[WorkerRecord] = []
        kept: list[WorkerRecord] = []
        for record in decoded.records:
            held = entry.records.get(record.worker_id)
            if held is not None and not held.is_expired(now) and not supersedes(record, held):
                continue
            kept.append(record)
            if record.signature in decoded.unverified:
                due.append(record)
        if len(due) > paid and not self._within_checks(source, len(due) - paid):
            return None  # a held record's signature on other fields: checked all the same
        for count, record in enumerate(due, 1):
            if not self.verifier.confirm(record):
                logger.debug(
                    "refused STORE under %s at its forged record %d of %d",
                    decoded.key,
                    count,
                    len(due),
                )
                return None
        return replace(decoded, records=kept, unverified=set())

    def _within_checks(self, source: Groups | None, count: int) -> bool:
        """May `source` cost us `count` signature checks now? Our own merges always; senders
        whose address never answered us share one budget."""
        if source is None:
            return True
        if self.checks.take(source[0] or source[1], count):
            return True
        self.refused_checks += 1
        now = time.monotonic()
        if now - self._checks_said >= FULL_LOG_EVERY:
            self._checks_said = now
            logger.warning(
                "refusing STOREs from %s: over %g signature checks a second (%d refused so far)",
                source[0] or "senders that never answered us",
                self.checks.rate,
                self.refused_checks,
            )
        return False

    @staticmethod
    def _may_mark(key: str, entry: _Entry | None, source: Groups | None) -> bool:
        """May a value carrying a mark and no record land under `key`? Only a shard that can
        overflow, and a new key only from us or a sender whose address answered us: nothing
        in a mark is signed, and a bare one made a key of any name (up to 8 KB, kept and
        pushed to newcomers for OVERFLOW_MEMORY) from any forged source."""
        if not shards.can_overflow(key):
            return False
        return entry is not None or source != UNPROVEN

    def _over_quota(self, source: Groups) -> bool:
        if len(self._data) < QUOTA_FROM * self.max_keys:
            return False
        ip, subnet = source
        return (bool(ip) and self._added[ip] >= QUOTA_PER_IP * self.max_keys) or (
            self._added[subnet] >= QUOTA_PER_SUBNET * self.max_keys
        )

    def _count(self, source: Groups | None, step: int) -> None:
        for group in dict.fromkeys(source or ()):  # loopback: both groups are ip:port
            if group:
                self._added[group] += step
                if self._added[group] <= 0:
                    del self._added[group]

    def _refuse_full(self, key: str) -> None:
        self.refused_full += 1
        now = time.monotonic()
        if self._full_said is not None and now - self._full_said[0] < FULL_LOG_EVERY:
            return
        since = self.refused_full - (self._full_said[1] if self._full_said else 0)
        self._full_said = (now, self.refused_full)
        logger.warning(
            "storage full (%d keys): refusing new keys (%d since last said, the last %s)",
            self.max_keys,
            since,
            key,
        )

    def renew(self, digest: bytes, args: list[Any]) -> StoreResult:
        """Apply a renewal (`dht.renew`) to the record held for its worker under `digest`."""
        now = self.clock()
        try:
            renewal = Renewal.from_args(args)
        except ValueError as exc:
            logger.debug("refused a renewal under %s: %s", digest.hex(), exc)
            return StoreResult.INVALID
        entry = self._live_entry(digest)
        held = entry.records.get(renewal.worker_id) if entry is not None else None
        if entry is None or held is None:
            return StoreResult.UNKNOWN
        record = renewal.applied_to(held)
        if not supersedes(record, held):
            return StoreResult.STALE
        # A signature that fails over the rebuilt record most likely means the publisher's
        # other fields changed since our copy: it sends the whole record when told so.
        if not self.verifier.confirm(record):
            return StoreResult.UNKNOWN
        try:
            validate_parsed(record, self.policy, now=now, verified=True, url_checked=True)
        except RecordError as exc:
            logger.debug("refused a renewal under %s: %s", entry.key, exc)
            return StoreResult.INVALID
        return self._merge_entry(digest, entry, DecodedValue(key=entry.key, records=[record]), now)

    def _merge_entry(
        self, digest: bytes, entry: _Entry, decoded: DecodedValue, now: float
    ) -> StoreResult:
        # A peer's mark is believed for at most OVERFLOW_MEMORY: no one can pin it for long.
        incoming_mark = min(decoded.overflow_until, now + OVERFLOW_MEMORY)
        overflow = max(entry.overflow_until, incoming_mark)
        depth = _depth_after(entry, decoded.deepest, incoming_mark, now)
        renewed = depth != (entry.deepest, entry.deepest_until)
        marked = incoming_mark > entry.overflow_until or renewed
        candidate = dict(entry.records)
        changed = merge_into(candidate, decoded.records, now=now)
        if not changed and not marked:
            return StoreResult.STALE
        encoded = encode_value(entry.key, candidate.values(), overflow, depth[0])
        result = StoreResult.OK if changed else StoreResult.STALE
        if len(encoded) - mark_bytes(overflow, depth[0]) > MAX_RECORDS_BYTES:
            # Keep updates of workers already held; refuse newcomers, and mark the value so
            # that readers look one level down, where the refused publisher goes next.
            overflow = max(overflow, now + OVERFLOW_MEMORY)
            candidate = dict(entry.records)
            updates = [r for r in changed if r.worker_id in candidate]
            merge_into(candidate, updates, now=now)
            encoded = encode_value(entry.key, candidate.values(), overflow, depth[0])
            result = StoreResult.FULL
            if len(encoded) > MAX_VALUE_BYTES:
                return StoreResult.FULL
        entry.records, entry.encoded, entry.changed_at = candidate, encoded, time.monotonic()
        entry.overflow_until = overflow
        entry.deepest, entry.deepest_until = depth
        if digest not in self._data:
            self._count(entry.source, 1)
        self._data[digest] = entry
        applied = [r for r in changed if candidate.get(r.worker_id) is r]
        if applied and self.on_merge is not None:
            try:
                self.on_merge(entry.key, applied)
            except Exception:
                logger.exception("on_merge hook failed for %s", entry.key)
        return result

    def records(self, digest: bytes) -> list[WorkerRecord]:
        """The live and tombstone records held under `digest`, expired ones dropped."""
        entry = self._live_entry(digest)
        return list(entry.records.values()) if entry else []

    def key_name(self, digest: bytes) -> str | None:
        """The key name a digest was stored with, if held."""
        entry = self._data.get(digest)
        return entry.key if entry else None

    def _live_entry(self, digest: bytes) -> _Entry | None:
        entry = self._data.get(digest)
        if entry is None:
            return None
        now = self.clock()
        if any(r.is_expired(now) for r in entry.records.values()):
            entry.records = {k: r for k, r in entry.records.items() if not r.is_expired(now)}
            entry.encoded = None
        if entry.overflow_until and entry.overflow_until <= now:
            entry.overflow_until = 0.0
            entry.encoded = None
        if entry.deepest and (entry.deepest_until <= now or not entry.overflow_until):
            entry.deepest, entry.deepest_until = 0, 0.0
            entry.encoded = None
        if not entry.records and not entry.overflow_until:
            del self._data[digest]
            self._count(entry.source, -1)
            return None
        return entry

    def cull(self) -> int:
        """Drop every expired record and empty key; returns how many keys went."""
        self._culled_at = time.monotonic()
        before = len(self._data)
        for digest in list(self._data):
            self._live_entry(digest)
        return before - len(self._data)

    # IStorage: what kademlia's own code paths call.

    def __setitem__(self, key: bytes, value: object) -> None:
        self.merge(key, value)

    def value(self, digest: bytes) -> bytes | None:
        """The encoded record set held under `digest`, or None."""
        entry = self._live_entry(digest)
        if entry is None:
            return None
        if entry.encoded is None:
            entry.encoded = encode_value(
                entry.key, entry.records.values(), entry.overflow_until, entry.deepest
            )
        return entry.encoded

    def share(self, digest: bytes, room: int) -> bytes | None:
        """A random share of the record set held under `digest` that encodes within `room`
        bytes, its mark kept (see `cut_value`); None when nothing is held or nothing fits."""
        entry = self._live_entry(digest)
        if entry is None:
            return None
        return cut_value(
            entry.key,
            entry.records.values(),
            room,
            self.clock(),
            entry.overflow_until,
            entry.deepest,
        )

    def get(self, key: bytes, default: object = None) -> object:
        value = self.value(key)
        return default if value is None else value

    def __getitem__(self, key: bytes) -> object:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, object]]:
        # Publishers re-store their own records every heartbeat, so holders never republish
        # on age; replication to newcomers happens in `welcome_if_new`.
        return []

    def digests(self) -> list[bytes]:
        """The digests held, live or not yet culled; `value` says which still hold anything."""
        return list(self._data)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        for digest in list(self._data):
            value = self.value(digest)
            if value is not None:
                yield digest, value

    def __len__(self) -> int:
        return len(self._data)


def _signatures(entry: _Entry | None, now: float) -> set[bytes]:
    """The signatures of the live records held in `entry`: the same record again costs no
    check."""
    if entry is None:
        return set()
    return {bytes.fromhex(r.signature) for r in entry.records.values() if not r.is_expired(now)}


def _depth_after(entry: _Entry, reported: int, until: float, now: float) -> tuple[int, float]:
    """The depth hint held after a mark reporting `reported` (0: none), valid until `until`.

    A report as deep or deeper renews the hint; a shallower one replaces it only once the held
    hint has lapsed, so a service that shrank stops sending readers to empty levels within
    OVERFLOW_MEMORY of its last deep report, and no single report can pin a depth for longer.
    """
    held = entry.deepest if entry.deepest_until > now else 0
    if reported <= 0 or until <= now or reported < held:
        return (held, entry.deepest_until) if held else (0, 0.0)
    if reported == held:
        return held, max(until, entry.deepest_until)
    return reported, until
