"""The value codec of our DHT: a key name, a set of signed records, and an overflow mark.

`["rma1", key_name, [wire record, ...]]`, or with a fourth item `overflow_until` (unix time)
once a holder has turned a newcomer away for lack of room, and a fifth, `deepest`, once a
publisher turned away has said at which trie level it filed. Carrying the key name lets every
node check that the value belongs to the digest it is stored under and each record to the key;
the overflow mark tells readers that some providers of a service live one shard level down, and
`deepest` how far down, so that a reader with no history reads those levels in parallel.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import OrderedDict
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import msgpack

from dht_bridge.dht.shards import MAX_LEVEL, belongs
from dht_bridge.errors import RecordError, RecordSignatureError
from dht_bridge.records import WorkerRecord, validate_parsed, verify
from dht_bridge.tunnels import TunnelPolicy

logger = logging.getLogger(__name__)

MAGIC = "rma1"
# rpcudp refuses a request whose msgpack body exceeds 8192 bytes; a STORE carries the node id,
# the key digest and the value, so a value must leave room for that envelope.
MAX_DATAGRAM_BODY = 8192
STORE_ENVELOPE = 96
MAX_VALUE_BYTES = MAX_DATAGRAM_BODY - STORE_ENVELOPE
# What an overflow mark adds to a value at most: a float64 (9 bytes) and a level (1 byte).
# Records are admitted only while this much room is left, so a full shard can always be marked.
MARK_ROOM = 12
MAX_RECORDS_BYTES = MAX_VALUE_BYTES - MARK_ROOM
DEFAULT_VERIFIED_CACHE = 4096
# An overflow mark sends readers one level down only when the value carrying it is at least
# this full of signed records: a shard overflows only once it is full, and anyone can send an
# empty mark. Well short of all: a full shard that loses providers keeps sending readers down
# while the ones filed below rise back (every few heartbeats); and a value cut to what a
# reader's first request pays for (see `cut_value`, about 3.5 KB) must still back its mark.
MARK_PROOF_SHARE = 0.4


def key_digest(key: str) -> bytes:
    """The 160-bit DHT key for a key name (SHA-1, as kademlia's `digest`)."""
    return hashlib.sha1(key.encode("utf-8")).digest()


def encode_value(
    key: str, records: Iterable[WorkerRecord], overflow_until: float = 0.0, deepest: int = 0
) -> bytes:
    """Encode a record set for `key`, with the overflow mark (and its depth) when set."""
    envelope: list[Any] = [MAGIC, key, [record.to_wire() for record in records]]
    if overflow_until > 0:
        envelope.append(round(overflow_until, 3))
        if deepest > 0:
            envelope.append(deepest)
    return bytes(msgpack.packb(envelope))


def mark_bytes(overflow_until: float, deepest: int) -> int:
    """What the overflow mark adds to an encoded value (msgpack float64; level < 128)."""
    if overflow_until <= 0:
        return 0
    return 9 + (1 if deepest > 0 else 0)


@dataclass
class DecodedValue:
    """A decoded value: key name, records that passed validation, how many did not, the mark."""

    key: str
    records: list[WorkerRecord] = field(default_factory=list)
    refused: int = 0
    reasons: list[str] = field(default_factory=list)
    overflow_until: float = 0.0
    deepest: int = 0  # the deepest trie level a publisher turned away from here filed at
    unverified: set[str] = field(default_factory=set)

    def overflowed(self, now: float) -> bool:
        """Has a holder turned a newcomer away recently (so readers must look one level down)?"""
        return self.overflow_until > now


def backs_mark(decoded: DecodedValue, verifier: RecordVerifier, now: float) -> bool:
    """Is the value's overflow mark backed by signed, live records that fill at least
    MARK_PROOF_SHARE of a shard? Signatures are checked only when the size says yes."""
    if not decoded.overflowed(now):
        return False
    live = [r for r in decoded.records if not r.is_expired(now)]
    if not fills_proof_share(decoded.key, live):
        return False
    live = [r for r in live if r.signature not in decoded.unverified or verifier.confirm(r)]
    return fills_proof_share(decoded.key, live)


def fills_proof_share(key: str, records: Iterable[WorkerRecord]) -> bool:
    """Do `records` fill at least MARK_PROOF_SHARE of a shard: as full as one that may have
    turned newcomers away (and so as one whose overflow mark is believed)?"""
    return len(encode_value(key, records)) >= MARK_PROOF_SHARE * MAX_RECORDS_BYTES


def leaves_no_room(decoded: DecodedValue, record: WorkerRecord, now: float) -> bool:
    """Would `record` overflow the value, as a holder's merge would find? (The `full` answer's
    proof: the records are verified by `decode_value` unless it was lazy.)"""
    held = [r for r in decoded.records if r.worker_id != record.worker_id and not r.is_expired(now)]
    return len(encode_value(decoded.key, [*held, record])) > MAX_RECORDS_BYTES


def cut_value(
    key: str,
    records: Iterable[WorkerRecord],
    room: int,
    now: float,
    overflow_until: float = 0.0,
    deepest: int = 0,
) -> bytes | None:
    """`key`'s value holding as many of the live `records` as fit in `room` bytes, with the
    mark; None when none fit, or the value is marked and what fits could not back the mark.

    Picked at random, not least loaded first: readers of one shard each see a different share
    of its providers (so they do not all pick the same few), and a reader that takes cuts
    from two or more holders sees most of the shard.
    """
    live = [r for r in records if not r.is_expired(now)]
    random.shuffle(live)
    # The records' array header is 1 byte up to 15 entries, 3 up to 65535.
    used = len(encode_value(key, [], overflow_until, deepest)) + 2
    kept: list[WorkerRecord] = []
    for record in live:
        cost = len(msgpack.packb(record.to_wire()))
        if used + cost <= room:
            kept.append(record)
            used += cost
    # Measured as `backs_mark` measures it: the records alone.
    proof = len(encode_value(key, kept))
    if not kept or (overflow_until > now and proof < MARK_PROOF_SHARE * MAX_RECORDS_BYTES):
        return None
    return encode_value(key, kept, overflow_until, deepest)


@dataclass
class _Known:
    item: list[Any]
    record: WorkerRecord
    verified: bool


class RecordVerifier:
    """Validates wire records, remembering what it already parsed and verified.

    The same record reaches a node many times (one STORE per heartbeat and key, every replica
    of every lookup). Parsing, the URL policy and above all the Ed25519 check give the same
    answer every time, so they run once per distinct record; only the checks that depend on
    the clock (lease) and on the key it is filed under run again.
    """

    def __init__(self, policy: TunnelPolicy, *, maxsize: int = DEFAULT_VERIFIED_CACHE) -> None:
        self.policy = policy
        self.maxsize = maxsize
        self._known: OrderedDict[tuple[bytes, bytes], _Known] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def record(self, item: Any, *, key: str, now: float) -> WorkerRecord:
        """The record of a wire item filed under `key`; raises RecordError when it is refused."""
        known = self._known_for(item, key=key, now=now)
        if not known.verified:
            self.misses += 1
            verify(known.record)
            known.verified = True
        else:
            self.hits += 1
        return known.record

    def parse(self, item: Any, *, key: str, now: float) -> tuple[WorkerRecord, bool]:
        """Parse and check everything but the signature; True when it is known to verify.

        For readers that will verify only the few records they return (see `confirm`).
        """
        known = self._known_for(item, key=key, now=now)
        return known.record, known.verified

    def confirm(self, record: WorkerRecord) -> bool:
        """Does the record's signature verify? Remembered once it does."""
        ident = (bytes.fromhex(record.public_key), bytes.fromhex(record.signature))
        known = self._known.get(ident)
        if known is not None and known.record == record and known.verified:
            self.hits += 1
            return True
        self.misses += 1
        try:
            verify(record)
        except RecordError:
            return False
        if known is not None and known.record == record:
            known.verified = True
        else:
            self._remember(ident, _Known(record.to_wire(), record, True))
        return True

    def knows(self, item: Any) -> bool:
        """Is this wire item one whose signature verified here already (no check due)?"""
        ident = _ident(item)
        known = self._known.get(ident) if ident is not None else None
        return known is not None and known.verified and known.item == item

    def _known_for(self, item: Any, *, key: str, now: float) -> _Known:
        ident = _ident(item)
        known = self._known.get(ident) if ident is not None else None
        if known is not None and known.item == item:
            self._known.move_to_end(ident)  # type: ignore[arg-type]
            validate_parsed(known.record, self.policy, now=now, verified=True, url_checked=True)
        else:
            record = WorkerRecord.from_wire(item)
            validate_parsed(record, self.policy, now=now, verified=True)
            known = _Known(item, record, verified=False)
            if ident is not None:
                self._remember(ident, known)
        if not belongs(key, known.record.worker_id, known.record.services):
            raise RecordError(f"worker {known.record.worker_id} does not belong under {key}")
        return known

    def _remember(self, ident: tuple[bytes, bytes], known: _Known) -> None:
        self._known[ident] = known
        while len(self._known) > self.maxsize:
            self._known.popitem(last=False)


def _ident(item: Any) -> tuple[bytes, bytes] | None:
    if isinstance(item, list) and len(item) >= 2:
        key, signature = item[0], item[1]
        if isinstance(key, bytes) and isinstance(signature, bytes):
            return key, signature
    return None


def checks_due(value: object, verifier: RecordVerifier, *, held: AbstractSet[bytes]) -> int:
    """How many signature checks decoding `value` may cost at most: its records, less those
    the verifier knows and those whose signature is in `held` (the copies already held).
    Reads the envelope only, so a STORE over its sender's budget is refused before any record
    is parsed (35 records took about 3 ms to parse); 0 for a value `decode_value` refuses."""
    if not isinstance(value, bytes) or len(value) > MAX_DATAGRAM_BODY:
        return 0
    try:
        envelope = msgpack.unpackb(value)
    except (ValueError, TypeError, msgpack.ExtraData):
        return 0
    if not (isinstance(envelope, list) and len(envelope) >= 3 and isinstance(envelope[2], list)):
        return 0
    return sum(1 for item in envelope[2] if not (_signature(item) in held or verifier.knows(item)))


def _signature(item: Any) -> bytes | None:
    ident = _ident(item)
    return ident[1] if ident is not None else None


def decode_value(
    value: object,
    *,
    digest: bytes | None,
    verifier: RecordVerifier,
    now: float,
    lazy: bool = False,
    forged_refuses_all: bool = False,
) -> DecodedValue:
    """Decode and validate a value; raises ValueError when the envelope itself is bad.

    Records that fail validation (forged, expired, filed under the wrong key) are counted in
    `refused`, not returned; the rest of the set survives. With `lazy`, signatures are not
    checked: `unverified` lists the records the caller must `confirm` before trusting them.
    With `forged_refuses_all`, the first record whose signature fails refuses the whole value
    (ValueError), unchecked records with it: what a STORE brings was merged by an honest node
    from checked records, and a value of 8 KB holds some 45 records, each check costing about
    0.35 ms (one datagram, 16 ms of CPU).
    """
    if not isinstance(value, bytes) or len(value) > MAX_DATAGRAM_BODY:
        raise ValueError("value must be bytes of at most 8 KB")
    try:
        envelope = msgpack.unpackb(value)
    except (ValueError, TypeError, msgpack.ExtraData) as exc:
        raise ValueError(f"value is not msgpack: {exc}") from exc
    if not (isinstance(envelope, list) and 3 <= len(envelope) <= 5 and envelope[0] == MAGIC):
        raise ValueError("value is not an rma1 record set")
    key, items = envelope[1], envelope[2]
    overflow = envelope[3] if len(envelope) >= 4 else 0.0
    deepest = envelope[4] if len(envelope) == 5 else 0
    if not isinstance(key, str) or not isinstance(items, list):
        raise ValueError("malformed rma1 envelope")
    if isinstance(overflow, bool) or not isinstance(overflow, int | float):
        raise ValueError("malformed overflow mark")
    if isinstance(deepest, bool) or not isinstance(deepest, int) or not 0 <= deepest <= MAX_LEVEL:
        raise ValueError("malformed overflow depth")
    if digest is not None and key_digest(key) != digest:
        raise ValueError(f"value names key {key!r}, which is not the digest it was stored under")
    decoded = DecodedValue(key=key, overflow_until=float(overflow), deepest=deepest)
    for item in items:
        try:
            if lazy:
                record, trusted = verifier.parse(item, key=key, now=now)
                if not trusted:
                    decoded.unverified.add(record.signature)
            else:
                record = verifier.record(item, key=key, now=now)
        except RecordSignatureError as exc:
            if forged_refuses_all:
                raise ValueError(f"a forged record refuses the whole value: {exc}") from exc
            decoded.refused += 1
            decoded.reasons.append(str(exc))
            continue
        except RecordError as exc:
            decoded.refused += 1
            decoded.reasons.append(str(exc))
            continue
        decoded.records.append(record)
    return decoded
