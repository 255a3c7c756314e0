"""The signed worker record: canonical encoding, signing, validation, and the merge rule.

A record is self-certifying: `worker_id` is derived from `public_key`, and `signature` is an
Ed25519 signature over the RFC 8785 (JCS) form of every other field, so a signer in any language
can produce it. Any node can check a record without asking anyone, so one volunteer cannot
forge, overwrite, or erase another's record.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import rfc8785

from dht_bridge.errors import (
    RecordError,
    RecordExpired,
    RecordInvalid,
    RecordSignatureError,
    RecordTooLarge,
)
from dht_bridge.identity import Identity, verify_signature, worker_id_for
from dht_bridge.jsontext import loads_bounded
from dht_bridge.tunnels import TunnelPolicy, canonical_tunnel_url

DEFAULT_TTL = 90.0
# A record may not claim a lease longer than this; it bounds how long a record outlives its
# worker and how far a fast clock can push a lease.
MAX_LEASE = 3600.0
MAX_RECORD_BYTES = 1024
MAX_RECORD_DEPTH = 8  # a record's JSON nests 3 levels (record, capabilities or services)
MAX_SERVICES = 16
MAX_CAPABILITIES = 16
MAX_CAPABILITY_VALUE = 64
MAX_SEQ = 2**53 - 1  # the largest integer every JSON reader keeps exactly
# What the signature covers, by the record's `v`: 2 is RFC 8785 (JCS) of every field but the
# signature, `v` included. 1 (records of 0.1, which have no `v`) is Python's JSON; it is still
# verified so that a network can upgrade node by node (docs/design.md says until when).
RECORD_VERSION = 2
LEGACY_VERSION = 1

SERVICE_RE = re.compile(r"[a-z0-9-]{1,32}")
REGION_RE = re.compile(r"[a-z0-9-]{0,32}")
CAPABILITY_KEY_RE = re.compile(r"[a-z0-9_.-]{1,32}")
HOST_RE = re.compile(r"[A-Za-z0-9.:_-]{0,253}")
_HEX = re.compile(r"[0-9a-f]*")
_SURROGATE = re.compile(r"[\ud800-\udfff]")

CapabilityValue = str | int | float | bool

FIELDS = (
    "worker_id",
    "public_key",
    "tunnel_url",
    "dht_host",
    "dht_port",
    "services",
    "capabilities",
    "region",
    "load",
    "seq",
    "expires_at",
    "tombstone",
    "signature",
)
# Fields a record may lack: a record without `v` is version 1.
OPTIONAL_FIELDS = ("v",)
# The wire form's items after the key and signature, in order; version 2 appends `v`.
_WIRE_FIELDS = FIELDS[2:12]
_WIRE_ITEMS = 2 + len(_WIRE_FIELDS)  # 12, then 13 with `v`


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """One worker's signed advertisement. Build it with `sign_record`, check it with `verify`."""

    worker_id: str
    public_key: str
    tunnel_url: str
    dht_host: str
    dht_port: int
    services: tuple[str, ...]
    capabilities: Mapping[str, CapabilityValue] = field(hash=False)
    region: str
    load: float
    seq: int
    expires_at: float
    tombstone: bool
    signature: str
    v: int = RECORD_VERSION

    def signed_fields(self) -> dict[str, Any]:
        """Every field but the signature, as plain JSON types (`v` absent in version 1)."""
        fields: dict[str, Any] = {
            "worker_id": self.worker_id,
            "public_key": self.public_key,
            "tunnel_url": self.tunnel_url,
            "dht_host": self.dht_host,
            "dht_port": self.dht_port,
            "services": list(self.services),
            "capabilities": dict(self.capabilities),
            "region": self.region,
            "load": self.load,
            "seq": self.seq,
            "expires_at": self.expires_at,
            "tombstone": self.tombstone,
        }
        if self.v != LEGACY_VERSION:
            fields["v"] = self.v
        return fields

    def canonical_bytes(self) -> bytes:
        """The exact bytes that are signed: RFC 8785 (JCS) of `signed_fields`, or for a
        version 1 record the sorted-key compact ASCII JSON that 0.1 signed."""
        if self.v == LEGACY_VERSION:
            return canonical_json(self.signed_fields())
        return jcs_bytes(self.signed_fields())

    def to_dict(self) -> dict[str, Any]:
        """The record as the JSON object of DESIGN.md (Redis values, HTTP bodies)."""
        out = self.signed_fields()
        out["signature"] = self.signature
        return out

    def to_json(self) -> str:
        """Compact JSON of `to_dict`, keys sorted."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> WorkerRecord:
        """Parse the JSON object form; raises RecordInvalid on any missing or mistyped field."""
        if not isinstance(data, Mapping):
            raise RecordInvalid("record", "must be a JSON object")
        unknown = set(data) - set(FIELDS) - set(OPTIONAL_FIELDS)
        if unknown:
            raise RecordInvalid("record", f"unknown fields: {', '.join(sorted(unknown))}")
        missing = [name for name in FIELDS if name not in data]
        if missing:
            raise RecordInvalid("record", f"missing fields: {', '.join(missing)}")
        services = data["services"]
        if not isinstance(services, list | tuple):
            raise RecordInvalid("services", "must be a list of names")
        capabilities = data["capabilities"]
        if not isinstance(capabilities, Mapping):
            raise RecordInvalid("capabilities", "must be an object")
        record = cls(
            worker_id=_typed(data, "worker_id", str),
            public_key=_typed(data, "public_key", str),
            tunnel_url=_typed(data, "tunnel_url", str),
            dht_host=_typed(data, "dht_host", str),
            dht_port=_int(data, "dht_port"),
            services=tuple(services),
            capabilities={key: _json_number(value) for key, value in capabilities.items()},
            region=_typed(data, "region", str),
            load=_number(data, "load"),
            seq=_int(data, "seq"),
            expires_at=_number(data, "expires_at"),
            tombstone=_typed(data, "tombstone", bool),
            signature=_typed(data, "signature", str),
            v=_version(data["v"]) if "v" in data else LEGACY_VERSION,
        )
        check_shape(record)
        # Here, not only in `validate`: a record read back from Redis is parsed, not validated.
        check_canonical_url(record.tunnel_url)
        return record

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerRecord:
        """Parse `to_json` output; raises RecordInvalid on bad JSON or fields."""
        if len(text) > 4 * MAX_RECORD_BYTES:
            raise RecordTooLarge("record", f"larger than {4 * MAX_RECORD_BYTES} bytes")
        try:
            data = loads_bounded(text, max_depth=MAX_RECORD_DEPTH)
        except ValueError as exc:  # UnicodeDecodeError and JSONTooDeep are ValueErrors
            raise RecordInvalid("record", f"not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def to_wire(self) -> list[Any]:
        """The compact positional form carried in DHT values (binary key and signature);
        `v` is a 13th item, absent in version 1 (as 0.1 nodes expect those)."""
        wire = [
            bytes.fromhex(self.public_key),
            bytes.fromhex(self.signature),
            self.tunnel_url,
            self.dht_host,
            self.dht_port,
            list(self.services),
            dict(self.capabilities),
            self.region,
            self.load,
            self.seq,
            self.expires_at,
            self.tombstone,
        ]
        if self.v != LEGACY_VERSION:
            wire.append(self.v)
        return wire

    @classmethod
    def from_wire(cls, item: Any) -> WorkerRecord:
        """Parse `to_wire` output; the worker id is derived from the key, not trusted."""
        if not isinstance(item, list | tuple) or len(item) not in (_WIRE_ITEMS, _WIRE_ITEMS + 1):
            raise RecordInvalid("record", f"wire form must be a {_WIRE_ITEMS}- or 13-item array")
        public_key, signature = item[0], item[1]
        if not isinstance(public_key, bytes) or not isinstance(signature, bytes):
            raise RecordInvalid("record", "wire key and signature must be bytes")
        data = dict(zip(_WIRE_FIELDS, item[2:_WIRE_ITEMS], strict=True))
        if len(item) > _WIRE_ITEMS:
            data["v"] = item[_WIRE_ITEMS]
        data["worker_id"] = worker_id_for(public_key)
        data["public_key"] = public_key.hex()
        data["signature"] = signature.hex()
        return cls.from_dict(data)

    def is_expired(self, now: float) -> bool:
        """True once the lease has ended."""
        return self.expires_at <= now

    @property
    def live(self) -> bool:
        """A record that advertises a working provider (not a tombstone)."""
        return not self.tombstone


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """Sorted-key, compact, ASCII-only JSON: the signed form of version 1 records only."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def jcs_bytes(value: Mapping[str, Any]) -> bytes:
    """RFC 8785 (JCS) of `value`: what JSON.stringify with sorted keys writes, as UTF-8."""
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        raise RecordInvalid("record", f"has no RFC 8785 form: {exc}") from exc


def sign_record(
    identity: Identity,
    *,
    tunnel_url: str,
    services: Iterable[str],
    seq: int,
    now: float,
    ttl: float = DEFAULT_TTL,
    dht_host: str = "",
    dht_port: int = 0,
    capabilities: Mapping[str, CapabilityValue] | None = None,
    region: str = "",
    load: float = 0.0,
    tombstone: bool = False,
) -> WorkerRecord:
    """Build and sign a record for `identity`, with a lease of `ttl` seconds from `now`.

    It is always a record of the current version (`RECORD_VERSION`)."""
    unsigned = WorkerRecord(
        worker_id=identity.worker_id,
        public_key=identity.public_key.hex(),
        tunnel_url=tunnel_url,
        dht_host=dht_host,
        dht_port=dht_port,
        services=tuple(sorted(set(services))),
        capabilities=dict(capabilities or {}),
        region=region,
        load=round(float(load), 4),
        seq=seq,
        # Millisecond precision keeps the JSON short and the value exact through every codec.
        expires_at=round(now + ttl, 3),
        tombstone=tombstone,
        signature="",
    )
    check_shape(unsigned)
    return replace(unsigned, signature=identity.sign(unsigned.canonical_bytes()).hex())


def tombstone_for(identity: Identity, latest: WorkerRecord, *, now: float) -> WorkerRecord:
    """A signed tombstone superseding `latest`: same worker, next seq, services kept."""
    return sign_record(
        identity,
        tunnel_url=latest.tunnel_url,
        services=latest.services,
        seq=latest.seq + 1,
        now=now,
        ttl=max(latest.expires_at - now, DEFAULT_TTL),
        region=latest.region,
        tombstone=True,
    )


def check_shape(record: WorkerRecord) -> None:
    """Check every field's type and range (not the signature, not the URL policy)."""
    if record.v not in (LEGACY_VERSION, RECORD_VERSION):
        raise RecordInvalid("v", f"unknown record version {record.v!r}")
    _check_hex(record.worker_id, "worker_id", 40)
    _check_hex(record.public_key, "public_key", 64)
    if record.signature:
        _check_hex(record.signature, "signature", 128)
    if not HOST_RE.fullmatch(record.dht_host):
        raise RecordInvalid("dht_host", "must be an IP address or host name")
    if not 0 <= record.dht_port <= 65535:
        raise RecordInvalid("dht_port", "must be 0..65535")
    if bool(record.dht_host) != bool(record.dht_port):
        raise RecordInvalid("dht_port", "dht_host and dht_port are set together or both empty")
    _check_services(record.services)
    _check_capabilities(record.capabilities)
    if not REGION_RE.fullmatch(record.region):
        raise RecordInvalid("region", "must match [a-z0-9-]{0,32}")
    if not (math.isfinite(record.load) and 0.0 <= record.load <= 1.0):
        raise RecordInvalid("load", "must be a number from 0.0 to 1.0")
    if not 1 <= record.seq <= MAX_SEQ:
        raise RecordInvalid("seq", f"must be an integer from 1 to {MAX_SEQ}")
    if not math.isfinite(record.expires_at) or record.expires_at <= 0:
        raise RecordInvalid("expires_at", "must be a positive unix time")
    if _size_bound(record) > MAX_RECORD_BYTES:
        # The bound is loose: only a record near the limit pays for the exact encoding.
        size = len(record.canonical_bytes()) + len(record.signature) + 16
        if size > MAX_RECORD_BYTES:
            raise RecordTooLarge("record", f"{size} bytes encoded, limit {MAX_RECORD_BYTES}")


# The JSON of a record without its text fields: names, punctuation, `v`, key, id, signature,
# and the numbers at their longest (seq 16 digits, times and load with 17 significant digits).
_FIXED_JSON = 500


def _json_len(text: str) -> int:
    """At least the length of `text` as an ASCII JSON string (escapes, \\uXXXX pairs)."""
    return 2 * len(text) + 2 if text.isascii() else 12 * len(text) + 2


def _size_bound(record: WorkerRecord) -> int:
    """An upper bound on the encoded size, cheap to compute (no JSON)."""
    size = _FIXED_JSON + _json_len(record.tunnel_url) + _json_len(record.dht_host)
    size += _json_len(record.region) + sum(_json_len(name) + 1 for name in record.services)
    for key, value in record.capabilities.items():
        size += _json_len(key) + 1 + (_json_len(value) if isinstance(value, str) else 26)
    return size


def verify(record: WorkerRecord) -> None:
    """Raise RecordSignatureError unless the id matches the key and the signature verifies."""
    public_key = bytes.fromhex(record.public_key)
    if worker_id_for(public_key) != record.worker_id:
        raise RecordSignatureError("worker_id does not match public_key")
    if not verify_signature(public_key, bytes.fromhex(record.signature), record.canonical_bytes()):
        raise RecordSignatureError(f"signature does not verify for worker {record.worker_id}")


def validate(record: WorkerRecord, policy: TunnelPolicy, *, now: float) -> None:
    """Everything a node checks before storing a record: shape, URL policy, lease, signature."""
    check_shape(record)
    validate_parsed(record, policy, now=now)


def validate_parsed(
    record: WorkerRecord,
    policy: TunnelPolicy,
    *,
    now: float,
    verified: bool = False,
    url_checked: bool = False,
) -> None:
    """`validate` for a record whose shape was checked when it was built (`from_dict`,
    `from_wire`, `sign_record` do); `verified` skips the signature and `url_checked` the
    tunnel policy, for a record that already passed them."""
    if not record.signature:
        raise RecordSignatureError("record is not signed")
    if not url_checked:
        check_canonical_url(record.tunnel_url, policy.check(record.tunnel_url))
    if record.is_expired(now):
        raise RecordExpired(f"lease of worker {record.worker_id} ended at {record.expires_at}")
    if record.expires_at > now + MAX_LEASE:
        raise RecordInvalid("expires_at", f"lease longer than {MAX_LEASE:.0f} s from now")
    if not verified:
        verify(record)


def check_canonical_url(url: str, canonical: str | None = None) -> None:
    """Raise RecordInvalid unless `url` is its own canonical form (`canonical`, when the caller
    has it already): what is signed is exactly what every reader, Python or WHATWG, reads."""
    if canonical is None:
        canonical = canonical_tunnel_url(url)
    if url != canonical:
        raise RecordInvalid("tunnel_url", f"not in canonical form (that is {canonical!r})")


def supersedes(new: WorkerRecord, old: WorkerRecord) -> bool:
    """The merge rule between two records of one worker: does `new` replace `old`?

    Higher seq wins. At equal seq (a worker that signed two records with one seq) the order is
    still total, so every replica keeps the same one: a tombstone first, then the larger signature.
    """
    if new.seq != old.seq:
        return new.seq > old.seq
    if new.tombstone != old.tombstone:
        return new.tombstone
    return new.signature > old.signature


def merge_into(
    current: dict[str, WorkerRecord], incoming: Iterable[WorkerRecord], *, now: float
) -> list[WorkerRecord]:
    """Apply the merge rule in place; returns the incoming records that changed `current`.

    Incoming records must already be validated. Expired records, old or new, are dropped.
    """
    for worker_id in [wid for wid, rec in current.items() if rec.is_expired(now)]:
        del current[worker_id]
    changed: list[WorkerRecord] = []
    for record in incoming:
        if record.is_expired(now):
            continue
        old = current.get(record.worker_id)
        if old is None or supersedes(record, old):
            current[record.worker_id] = record
            changed.append(record)
    return changed


def parse_and_validate(data: Any, policy: TunnelPolicy, *, now: float) -> WorkerRecord:
    """Parse the JSON object form and validate it; the one entry point for untrusted input."""
    record = WorkerRecord.from_dict(data)
    validate(record, policy, now=now)
    return record


def _typed(data: Mapping[str, Any], name: str, kind: type) -> Any:
    value = data[name]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise RecordInvalid(name, f"must be a {kind.__name__}")
    return value


def _int(data: Mapping[str, Any], name: str) -> int:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordInvalid(name, "must be an integer")
    return value


def _version(value: Any) -> int:
    # A version 1 record has no `v` at all: an explicit 1 would be a field nobody signed.
    if isinstance(value, bool) or not isinstance(value, int) or value != RECORD_VERSION:
        raise RecordInvalid("v", f"must be {RECORD_VERSION} (a record without v is version 1)")
    return RECORD_VERSION


def _json_number(value: Any) -> Any:
    """A capability value as JCS reads it: JSON numbers are doubles (RFC 7493), so an integer
    literal beyond 2**53 - 1 (JavaScript writes 1.2e21 as 1200000000000000000000) is the
    double it denotes."""
    if isinstance(value, int) and not isinstance(value, bool) and not -MAX_SEQ <= value <= MAX_SEQ:
        try:
            return float(value)
        except OverflowError:
            raise RecordInvalid("capabilities", "a number beyond the range of a double") from None
    return value


def _number(data: Mapping[str, Any], name: str) -> float:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordInvalid(name, "must be a number")
    return float(value)


def _check_hex(value: str, name: str, length: int) -> None:
    if len(value) != length or not _HEX.fullmatch(value):
        raise RecordInvalid(name, f"must be {length} lower-case hex digits")


def _check_services(services: tuple[str, ...]) -> None:
    if not services:
        raise RecordInvalid("services", "at least one service is required")
    if len(services) > MAX_SERVICES:
        raise RecordInvalid("services", f"at most {MAX_SERVICES} services")
    for name in services:
        if not isinstance(name, str) or not SERVICE_RE.fullmatch(name):
            raise RecordInvalid("services", f"{name!r} does not match [a-z0-9-]{{1,32}}")
    if len(set(services)) != len(services):
        raise RecordInvalid("services", "names must be unique")


def _check_capabilities(capabilities: Mapping[str, Any]) -> None:
    if len(capabilities) > MAX_CAPABILITIES:
        raise RecordInvalid("capabilities", f"at most {MAX_CAPABILITIES} entries")
    for key, value in capabilities.items():
        if not isinstance(key, str) or not CAPABILITY_KEY_RE.fullmatch(key):
            raise RecordInvalid("capabilities", f"key {key!r} does not match [a-z0-9_.-]{{1,32}}")
        if isinstance(value, str):
            if len(value) > MAX_CAPABILITY_VALUE:
                raise RecordInvalid("capabilities", f"value of {key!r} is too long")
            if not value.isascii() and _SURROGATE.search(value):
                # A lone surrogate has no UTF-8 form: neither JCS nor another language signs it.
                raise RecordInvalid("capabilities", f"value of {key!r} is not Unicode text")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise RecordInvalid("capabilities", f"value of {key!r} is not finite")
        elif isinstance(value, int) and not isinstance(value, bool):
            if not -MAX_SEQ <= value <= MAX_SEQ:
                # Not exact in a double, which is what other languages read; a signer that
                # means a double beyond that range passes a float (a reader makes it one).
                raise RecordInvalid("capabilities", f"value of {key!r} is beyond +-(2**53 - 1)")
        elif not isinstance(value, bool):
            raise RecordInvalid(
                "capabilities", f"value of {key!r} must be a string, number or bool"
            )


__all__ = [
    "DEFAULT_TTL",
    "LEGACY_VERSION",
    "MAX_RECORD_BYTES",
    "RECORD_VERSION",
    "RecordError",
    "WorkerRecord",
    "canonical_json",
    "check_canonical_url",
    "check_shape",
    "jcs_bytes",
    "merge_into",
    "parse_and_validate",
    "sign_record",
    "supersedes",
    "tombstone_for",
    "validate",
    "validate_parsed",
    "verify",
]
