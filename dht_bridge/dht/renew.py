"""Renewals: a heartbeat to a holder that already has the worker's record sends only what a
heartbeat changes.

A heartbeat re-signs the same record with a new `seq`, `expires_at` and `load`. A full STORE
carries the whole record (key, URL, capabilities, host: about 300 bytes on the wire); a
`renew(nodeid, key, worker_id, seq, expires_at, load, signature)` carries those three fields
and the new signature (about 180). The holder rebuilds the record from the one it holds and
checks the signature over the rebuilt record, so it trusts exactly what a STORE would have
given it. A holder that does not hold that worker under the key, or holds a copy whose other
fields differ, answers "unknown" and gets the full STORE.

Only holders that answered one of our STOREs the way our nodes do ("ok", "stale") are sent
renewals: a stock kademlia node answers STORE with True and would never answer a renew.

A renewal can also wait. A publisher that says when it will publish again (a worker knows its
heartbeat) skips the holders whose copy will outlive that next publish by half an interval
and whose load is close to the current one: with the default lease of three heartbeats, each
holder is renewed every other heartbeat, which halves the renewals that full shards' holders
receive (the busiest nodes of a large network).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from dht_bridge.records import WorkerRecord

RENEW_RPC = "renew"
# Answers after which the holder holds our record (what a renewal builds on).
HELD_ANSWERS = frozenset({"ok", "stale"})
MAX_REMEMBERED = 8192
# A held copy may wait for the next publish only if it outlives it by this share of the
# interval (a late heartbeat, a slow publish), and its load is within LOAD_STEP of the
# current one (a jump in load reaches every holder at once, for readers picking the least
# loaded).
WAIT_MARGIN = 0.5
LOAD_STEP = 0.25

Static = tuple[Any, ...]


def static_part(record: WorkerRecord) -> Static:
    """Every field a renewal does not carry: equal parts mean a renewal can rebuild it."""
    return (
        record.worker_id,
        record.public_key,
        record.tunnel_url,
        record.dht_host,
        record.dht_port,
        record.services,
        tuple(sorted(record.capabilities.items())),
        record.region,
        record.tombstone,
    )


def renewal_args(record: WorkerRecord) -> list[Any]:
    """The wire arguments of a renewal of `record`, after the node id and key."""
    return [
        bytes.fromhex(record.worker_id),
        record.seq,
        record.expires_at,
        record.load,
        bytes.fromhex(record.signature),
    ]


@dataclass(frozen=True, slots=True)
class Renewal:
    """What a renewal carries: the worker, and the fields a heartbeat changes."""

    worker_id: str
    seq: int
    expires_at: float
    load: float
    signature: str

    @classmethod
    def from_args(cls, args: list[Any]) -> Renewal:
        """Parse the wire arguments; ValueError when they are not a renewal."""
        if len(args) != 5:
            raise ValueError("a renewal is worker id, seq, expires_at, load, signature")
        worker_id, seq, expires_at, load, signature = args
        if not (isinstance(worker_id, bytes) and len(worker_id) == 20):
            raise ValueError("renewal worker id must be 20 bytes")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError("renewal seq must be a non-negative integer")
        for number in (expires_at, load):
            if isinstance(number, bool) or not isinstance(number, int | float):
                raise ValueError("renewal expires_at and load must be numbers")
        if not (isinstance(signature, bytes) and len(signature) == 64):
            raise ValueError("renewal signature must be 64 bytes")
        return cls(worker_id.hex(), seq, float(expires_at), float(load), signature.hex())

    def applied_to(self, held: WorkerRecord) -> WorkerRecord:
        """`held` with this renewal's fields: unverified, the caller checks the signature."""
        return replace(
            held,
            seq=self.seq,
            expires_at=self.expires_at,
            load=self.load,
            signature=self.signature,
        )


@dataclass(frozen=True, slots=True)
class HeldCopy:
    """What one holder holds of our record: when its lease ends, and the load it shows."""

    expires_at: float
    load: float

    def can_wait(self, record: WorkerRecord, now: float, again_within: float) -> bool:
        """May this holder's renewal to `record` wait for a publish due within `again_within`
        seconds? Only if the copy outlives that publish with room, and its load is close."""
        outlives = self.expires_at - now > again_within * (1.0 + WAIT_MARGIN)
        return outlives and abs(self.load - record.load) < LOAD_STEP


class RenewalBook:
    """Which holders hold our current record of a worker under a key (publisher side)."""

    def __init__(self, maxsize: int = MAX_REMEMBERED) -> None:
        self.maxsize = maxsize
        self._held: OrderedDict[tuple[bytes, str], tuple[Static, dict[bytes, HeldCopy]]] = (
            OrderedDict()
        )

    def holders(self, digest: bytes, record: WorkerRecord) -> dict[bytes, HeldCopy]:
        """The holders that can be sent a renewal of `record` under `digest`, by id, with
        what each holds."""
        entry = self._held.get((digest, record.worker_id))
        if entry is None or entry[0] != static_part(record):
            return {}
        return entry[1]

    def note(
        self, digest: bytes, record: WorkerRecord, answers: Iterable[tuple[bytes, Any]]
    ) -> None:
        """Record what holders answered to a STORE or renewal of `record` under `digest`."""
        slot = (digest, record.worker_id)
        static = static_part(record)
        entry = self._held.get(slot)
        held = entry[1] if entry is not None and entry[0] == static else {}
        copy = HeldCopy(record.expires_at, record.load)
        for node_id, answer in answers:
            if isinstance(answer, str) and answer in HELD_ANSWERS:
                # "stale": it holds a newer one of ours, which lasts at least as long.
                held[node_id] = copy
            else:
                held.pop(node_id, None)
        self._held[slot] = (static, held)
        self._held.move_to_end(slot)
        while len(self._held) > self.maxsize:
            self._held.popitem(last=False)
