"""Signed worker records: encoding, signatures, validation, the merge rule, identities."""

from __future__ import annotations

import dataclasses
import itertools
import os
import stat
import time

import pytest

from dht_bridge.errors import (
    IdentityError,
    RecordExpired,
    RecordInvalid,
    RecordSignatureError,
    RecordTooLarge,
)
from dht_bridge.identity import Identity
from dht_bridge.records import (
    MAX_LEASE,
    WorkerRecord,
    merge_into,
    parse_and_validate,
    sign_record,
    supersedes,
    tombstone_for,
    validate,
)
from dht_bridge.tunnels import TunnelPolicy
from tests.support.helpers import POLICY, make_record

NOW = 1_800_000_000.0


def test_round_trips_through_json_and_wire() -> None:
    record = make_record(capabilities={"gpu": "a100", "vram_gb": 80}, region="eu", load=0.25)
    assert WorkerRecord.from_json(record.to_json()) == record
    assert WorkerRecord.from_wire(record.to_wire()) == record
    validate(WorkerRecord.from_json(record.to_json()), POLICY, now=time.time())


def test_worker_id_is_derived_from_the_key() -> None:
    identity = Identity.generate()
    record = make_record(identity)
    assert record.worker_id == identity.worker_id
    assert len(record.worker_id) == 40


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tunnel_url", "https://evil.trycloudflare.com"),
        ("services", ("ocr", "gpu")),
        ("load", 0.99),
        ("seq", 99),
        ("expires_at", NOW + 3000),
        ("tombstone", True),
        ("region", "us"),
        ("dht_port", 4001),
        ("capabilities", {"gpu": "h100"}),
    ],
)
def test_any_tampered_field_breaks_the_signature(field: str, value: object) -> None:
    record = make_record(now=NOW, dht_host="127.0.0.1", dht_port=4000)
    tampered = dataclasses.replace(record, **{field: value})  # type: ignore[arg-type]
    with pytest.raises(RecordSignatureError):
        validate(tampered, POLICY, now=NOW)


def test_forgery_with_another_workers_id_is_refused() -> None:
    victim = make_record(now=NOW)
    forger = make_record(now=NOW, seq=victim.seq + 10)
    # The forger signs with its own key but claims the victim's id.
    forged = dataclasses.replace(forger, worker_id=victim.worker_id)
    with pytest.raises(RecordSignatureError, match="does not match"):
        validate(forged, POLICY, now=NOW)
    # Or keeps the victim's key and id and signs with its own key.
    stolen = dataclasses.replace(forger, worker_id=victim.worker_id, public_key=victim.public_key)
    with pytest.raises(RecordSignatureError, match="does not verify"):
        validate(stolen, POLICY, now=NOW)


def test_unsigned_record_is_refused() -> None:
    record = dataclasses.replace(make_record(now=NOW), signature="")
    with pytest.raises(RecordSignatureError):
        validate(record, POLICY, now=NOW)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://a.trycloudflare.com", "https"),
        ("https://10.0.0.5", "IP literal"),
        ("https://127.0.0.1:8443", "IP literal"),
        ("https://[::1]/", "IP literal"),
        ("https://169.254.169.254", "IP literal"),
        ("https://2130706433", "IP literal"),
        ("https://localhost", "localhost"),
        ("https://example.com", "allow-list"),
        ("https://trycloudflare.com", "allow-list"),
        ("https://a.trycloudflare.com.evil.com", "allow-list"),
        ("https://user:pw@a.trycloudflare.com", "user"),
        ("https://a.trycloudflare.com/?x=1", "query"),
        ("ftp://a.trycloudflare.com", "https"),
        ("https://", "no host"),
        ("", "non-empty"),
        ("https://a.trycloudflare.com:99999", "port"),
        ("https://" + "a" * 300 + ".trycloudflare.com", "longer"),
    ],
)
def test_tunnel_url_policy_refuses(url: str, reason: str) -> None:
    with pytest.raises(RecordInvalid, match=reason) as info:
        POLICY.check(url)
    assert info.value.field == "tunnel_url"


@pytest.mark.parametrize(
    "url",
    [
        "https://blue-fox-12.trycloudflare.com",
        "https://a.b.trycloudflare.com/prefix",
        "https://X.TRYCLOUDFLARE.COM",
    ],
)
def test_tunnel_url_policy_accepts(url: str) -> None:
    POLICY.check(url)


def test_loopback_is_only_for_an_explicitly_widened_policy() -> None:
    demo = TunnelPolicy(allow_loopback=True)
    demo.check("http://127.0.0.1:8081")
    demo.check("http://localhost:9000")
    with pytest.raises(RecordInvalid):
        demo.check("http://10.0.0.1:80")
    with pytest.raises(RecordInvalid):
        POLICY.check("http://127.0.0.1:8081")
    custom = TunnelPolicy(allowed_hosts=("tunnels.example.org", "*.example.net"))
    custom.check("https://tunnels.example.org")
    custom.check("https://w1.example.net")
    with pytest.raises(RecordInvalid):
        custom.check("https://x.tunnels.example.org")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"services": []}, "services"),
        ({"services": ["OCR"]}, "services"),
        ({"services": ["a" * 33]}, "services"),
        ({"services": ["ocr_v2"]}, "services"),
        ({"services": [f"s{i}" for i in range(17)]}, "services"),
        ({"load": 1.5}, "load"),
        ({"load": -0.1}, "load"),
        ({"load": float("nan")}, "load"),
        ({"seq": 0}, "seq"),
        ({"seq": 2**53}, "seq"),
        ({"region": "Europe West"}, "region"),
        ({"capabilities": {"Bad Key": 1}}, "capabilities"),
        ({"capabilities": {"k": "v" * 65}}, "capabilities"),
        ({"capabilities": {"k": [1, 2]}}, "capabilities"),
        ({"capabilities": {f"k{i}": i for i in range(17)}}, "capabilities"),
        ({"capabilities": {"k": 2**53}}, "capabilities"),
        ({"capabilities": {"k": -(2**53)}}, "capabilities"),
        ({"capabilities": {"k": "lone \ud800"}}, "capabilities"),
        ({"dht_host": "127.0.0.1"}, "dht_port"),
        ({"dht_host": "bad host!", "dht_port": 1}, "dht_host"),
    ],
)
def test_bad_fields_are_refused_with_the_field_named(fields: dict[str, object], field: str) -> None:
    with pytest.raises(RecordInvalid) as info:
        make_record(**fields)  # type: ignore[arg-type]
    assert info.value.field == field


def test_size_limit() -> None:
    caps = {f"k{i:02d}": "v" * 64 for i in range(16)}
    with pytest.raises(RecordTooLarge):
        make_record(capabilities=caps)


def test_expired_and_overlong_leases_are_refused() -> None:
    record = make_record(now=NOW, ttl=90)
    with pytest.raises(RecordExpired):
        validate(record, POLICY, now=NOW + 91)
    greedy = make_record(now=NOW, ttl=MAX_LEASE * 2)
    with pytest.raises(RecordInvalid, match="lease"):
        validate(greedy, POLICY, now=NOW)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"worker_id": "x"}', "missing fields"),
        ("[" * 2000 + "]" * 2000, "nests deeper than 8"),
    ],
)
def test_malformed_json_is_refused_with_a_reason(data: str, message: str) -> None:
    with pytest.raises(RecordInvalid, match=message):
        WorkerRecord.from_json(data)


def test_wrong_types_and_unknown_fields_are_refused() -> None:
    good = make_record(now=NOW).to_dict()
    with pytest.raises(RecordInvalid, match="unknown fields"):
        parse_and_validate({**good, "admin": True}, POLICY, now=NOW)
    with pytest.raises(RecordInvalid, match="seq"):
        parse_and_validate({**good, "seq": "5"}, POLICY, now=NOW)
    with pytest.raises(RecordInvalid, match="tombstone"):
        parse_and_validate({**good, "tombstone": 1}, POLICY, now=NOW)
    with pytest.raises(RecordInvalid, match="dht_port"):
        parse_and_validate({**good, "dht_port": True}, POLICY, now=NOW)
    with pytest.raises(RecordInvalid, match="wire"):
        WorkerRecord.from_wire([b"x"] * 3)


def test_merge_rule_highest_seq_wins_and_expired_are_dropped() -> None:
    identity = Identity.generate()
    old, new = (make_record(identity, seq=s, now=NOW) for s in (3, 7))
    other = make_record(now=NOW - 200, ttl=90)  # expired at NOW
    held: dict[str, WorkerRecord] = {}
    assert merge_into(held, [new, old, other], now=NOW) == [new]
    assert held == {identity.worker_id: new}
    assert merge_into(held, [old], now=NOW) == []


def test_tombstone_wins_over_lower_and_equal_seq_and_expires() -> None:
    identity = Identity.generate()
    live = make_record(identity, seq=4, now=NOW)
    gone = tombstone_for(identity, live, now=NOW)
    assert gone.seq == 5
    assert gone.tombstone
    assert gone.expires_at >= live.expires_at
    assert supersedes(gone, live)
    assert not supersedes(live, gone)
    same_seq_live = make_record(identity, seq=5, now=NOW)
    assert supersedes(gone, same_seq_live)
    assert not supersedes(same_seq_live, gone)
    held: dict[str, WorkerRecord] = {}
    merge_into(held, [live, gone], now=NOW)
    assert held[identity.worker_id] is gone
    merge_into(held, [], now=gone.expires_at + 1)
    assert held == {}


def test_merge_is_order_independent() -> None:
    identities = [Identity.generate() for _ in range(3)]
    records = [make_record(i, seq=s, now=NOW, load=s / 10) for i in identities for s in (1, 2, 3)]
    # Two records with the same seq but different content: the tie-break must still agree.
    records.append(make_record(identities[0], seq=3, now=NOW, load=0.9))
    outcomes = set()
    for order in itertools.islice(itertools.permutations(records), 0, 5000, 97):
        held: dict[str, WorkerRecord] = {}
        for record in order:
            merge_into(held, [record], now=NOW)
        outcomes.add(tuple(sorted((k, v.signature) for k, v in held.items())))
    assert len(outcomes) == 1


def test_identity_save_load_permissions(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "keys", "worker.key")
    identity = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = Identity.load_or_create(path)
    assert again.worker_id == identity.worker_id
    record = sign_record(
        again, tunnel_url="https://a.trycloudflare.com", services=["ocr"], seq=1, now=NOW
    )
    validate(record, POLICY, now=NOW)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)


def test_identity_refuses_garbage(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "bad.key")
    with open(path, "w") as fh:
        fh.write("not a key")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="not a PEM"):
        Identity.load(path)
    with pytest.raises(IdentityError, match="cannot read"):
        Identity.load(os.path.join(tmp_path, "missing.key"))
