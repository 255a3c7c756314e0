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


class RenewalBook:
    """Which holders hold our current record of a worker under a key (publisher side)."""

    def __init__(self, maxsize: int = MAX_REMEMBERED) -> None:
        self.maxsize = maxsize
        self._held: OrderedDict[tuple[bytes, str], tuple[Static, set[bytes]]] = OrderedDict()

    def holders(self, digest: bytes, record: WorkerRecord) -> set[bytes]:
        """Ids of holders that can be sent a renewal of `record` under `digest`."""
        entry = self._held.get((digest, record.worker_id))
        if entry is None or entry[0] != static_part(record):
            return set()
        return entry[1]

    def note(
        self, digest: bytes, record: WorkerRecord, answers: Iterable[tuple[bytes, Any]]
    ) -> None:
        """Record what holders answered to a STORE or renewal of `record` under `digest`."""
        slot = (digest, record.worker_id)
        static = static_part(record)
        entry = self._held.get(slot)
        held = entry[1] if entry is not None and entry[0] == static else set()
        for node_id, answer in answers:
            if isinstance(answer, str) and answer in HELD_ANSWERS:
                held.add(node_id)
            else:
                held.discard(node_id)
        self._held[slot] = (static, held)
        self._held.move_to_end(slot)
        while len(self._held) > self.maxsize:
            self._held.popitem(last=False)
