"""docs/worker-record.schema.json describes the record the code signs and the shapes it refuses.

Every record the code signs validates against the schema; every shape the parser refuses, the
schema refuses too, except the few checks JSON Schema cannot say, which the schema's
`$comment` lists and `test_what_the_schema_cannot_say` pins.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from dht_bridge import records, tunnels
from dht_bridge.errors import RecordError, RecordInvalid, RecordSignatureError, RecordTooLarge
from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord, sign_record

HERE = Path(__file__).parent
SCHEMA: dict[str, Any] = json.loads(
    (HERE.parents[1] / "docs" / "worker-record.schema.json").read_text(encoding="utf-8")
)
VALIDATOR = Draft202012Validator(SCHEMA)
URL_CASES: list[dict[str, Any]] = json.loads((HERE / "tunnel_urls.json").read_text("ascii"))
CANONICAL_URLS = sorted({case["canonical"] for case in URL_CASES if case["canonical"]})
NOT_CANONICAL_URLS = [case["url"] for case in URL_CASES if case["url"] != case["canonical"]]
# Refused by the code for what a pattern cannot check (see test_what_the_schema_cannot_say).
PUNYCODE = "https://xn--zz.trycloudflare.com"
FIXTURES = ("signed_by_python.json", "signed_by_js.json", "signed_v1.json")
NOW = 1_800_000_000.0
INTEGER_FIELDS = ("dht_port", "seq")


def _code_refuses(data: Any) -> RecordError | None:
    """What the code says of `data` before the signature, lease and URL policy are checked."""
    try:
        record = WorkerRecord.from_dict(data)
    except RecordInvalid as exc:
        return exc
    if not record.signature:  # the parser reads unsigned records; `validate` refuses them
        return RecordSignatureError("record is not signed")
    return None


GOOD = sign_record(
    Identity.generate(),
    tunnel_url="https://blue-fox-12.trycloudflare.com",
    services=["ocr"],
    seq=5,
    now=NOW,
    dht_host="192.0.2.7",
    dht_port=4000,
    capabilities={"gpu": "a100", "vram_gb": 80},
)


def _good(**changes: Any) -> dict[str, Any]:
    """A valid record's JSON object with `changes` (a fresh copy every time)."""
    return {**GOOD.to_dict(), **changes}


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_the_schema_states_the_codes_limits() -> None:
    props = SCHEMA["properties"]
    assert SCHEMA["required"] == list(records.FIELDS)
    assert set(props) == set(records.FIELDS) | set(records.OPTIONAL_FIELDS)
    assert props["v"]["const"] == records.RECORD_VERSION
    assert props["services"]["maxItems"] == records.MAX_SERVICES
    assert props["capabilities"]["maxProperties"] == records.MAX_CAPABILITIES
    strings = props["capabilities"]["additionalProperties"]["anyOf"][0]
    assert strings["maxLength"] == records.MAX_CAPABILITY_VALUE
    assert props["seq"]["maximum"] == records.MAX_SEQ
    assert props["tunnel_url"]["maxLength"] == tunnels.MAX_URL_LENGTH


@pytest.mark.parametrize("name", FIXTURES)
def test_the_committed_records_validate(name: str) -> None:
    content = json.loads((HERE / name).read_text(encoding="utf-8"))
    items = content.get("records") or content["cases"]
    for item in items:
        VALIDATOR.validate(item["record"])


def _random_text(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _random_records(count: int, seed: int) -> Iterator[WorkerRecord]:
    """Records as sign_record makes them, over the whole range of every field."""
    rng = random.Random(seed)
    names = string.ascii_lowercase + string.digits + "-"
    identities = [Identity.generate() for _ in range(4)]
    text = string.printable + "\u00e9\u20ac\u201c\U0001f600\ufb33\u0080"
    for _ in range(count):
        capabilities: dict[str, str | int | float | bool] = {}
        for _ in range(rng.randint(0, 6)):
            values: list[str | int | float | bool] = [
                _random_text(rng, text, 0, 16),
                rng.randint(-records.MAX_SEQ, records.MAX_SEQ),
                rng.uniform(-1e6, 1e6),
                rng.choice([0.0, 16.0, 1e-7, 1e21, 5e-324]),
                rng.random() < 0.5,
            ]
            capabilities[_random_text(rng, names + "_.", 1, 32)] = rng.choice(values)
        server = rng.random() < 0.5
        yield sign_record(
            rng.choice(identities),
            tunnel_url=rng.choice(CANONICAL_URLS),
            services=[_random_text(rng, names, 1, 32) for _ in range(rng.randint(1, 5))],
            seq=rng.randint(1, records.MAX_SEQ),
            now=rng.uniform(1.0, 4e9),
            ttl=rng.choice([1.0, 90.0, 3600.0, rng.uniform(0.001, 3600)]),
            dht_host=rng.choice(["203.0.113.5", "node-1.example", "::1"]) if server else "",
            dht_port=rng.randint(1, 65535) if server else 0,
            capabilities=capabilities,
            region=_random_text(rng, names, 0, 32),
            load=rng.choice([0.0, 1.0, rng.random()]),
            tombstone=rng.random() < 0.2,
        )


def test_every_record_the_code_signs_validates() -> None:
    for record in _random_records(300, seed=21):
        VALIDATOR.validate(record.to_dict())
        VALIDATOR.validate(json.loads(record.to_json()))


@pytest.mark.parametrize("url", CANONICAL_URLS)
def test_every_canonical_tunnel_url_validates(url: str) -> None:
    VALIDATOR.validate(_good(tunnel_url=url))


@pytest.mark.parametrize("url", NOT_CANONICAL_URLS)
def test_tunnel_urls_not_in_canonical_form_are_refused_by_both(url: str) -> None:
    data = _good(tunnel_url=url)
    assert _code_refuses(data) is not None
    assert VALIDATOR.is_valid(data) == (url == PUNYCODE)


def _without(name: str) -> dict[str, Any]:
    data = _good()
    del data[name]
    return data


REFUSED: list[tuple[str, dict[str, Any]]] = [
    *[(f"no {name}", _without(name)) for name in records.FIELDS],
    ("an unknown member", _good(admin=True)),
    ("v 1 written out", _good(v=1)),
    ("v 3", _good(v=3)),
    ("v as text", _good(v="2")),
    ("upper-case hex id", _good(worker_id="A" * 40)),
    ("short key", _good(public_key="ab" * 31)),
    ("signature with a newline", _good(signature="ab" * 64 + "\n")),
    ("no signature", _good(signature="")),
    ("id with a newline", _good(worker_id="ab" * 20 + "\n")),
    ("tunnel URL not a string", _good(tunnel_url=7)),
    ("tunnel URL with a newline", _good(tunnel_url="https://a.trycloudflare.com\n")),
    ("tunnel URL with a default port", _good(tunnel_url="https://a.trycloudflare.com:443")),
    ("tunnel URL with a root slash", _good(tunnel_url="https://a.trycloudflare.com/")),
    ("tunnel URL with a dot segment", _good(tunnel_url="https://a.trycloudflare.com/x/..")),
    ("tunnel URL ending in a number", _good(tunnel_url="https://a.1")),
    ("tunnel URL over 256 characters", _good(tunnel_url="https://a.b/" + "c" * 250)),
    ("dht_host with a space", _good(dht_host="bad host")),
    ("dht_host without dht_port", _good(dht_port=0)),
    ("dht_port without dht_host", _good(dht_host="")),
    ("dht_port over 65535", _good(dht_port=70000)),
    ("dht_port negative", _good(dht_port=-1)),
    ("dht_port a bool", _good(dht_port=True)),
    ("dht_port with a fraction", _good(dht_port=4000.5)),
    ("no services", _good(services=[])),
    ("17 services", _good(services=[f"s{i}" for i in range(17)])),
    ("a repeated service", _good(services=["ocr", "ocr"])),
    ("an upper-case service", _good(services=["OCR"])),
    ("a 33-character service", _good(services=["a" * 33])),
    ("a service that is not a string", _good(services=[7])),
    ("a service with a newline", _good(services=["ocr\n"])),
    ("services as an object", _good(services={"ocr": 1})),
    ("capabilities as a list", _good(capabilities=["gpu"])),
    ("17 capabilities", _good(capabilities={f"k{i}": i for i in range(17)})),
    ("a capability key with a space", _good(capabilities={"Bad Key": 1})),
    ("a capability key with a newline", _good(capabilities={"gpu\n": 1})),
    ("a 65-character capability", _good(capabilities={"k": "v" * 65})),
    ("a list as a capability", _good(capabilities={"k": [1, 2]})),
    ("null as a capability", _good(capabilities={"k": None})),
    ("an object as a capability", _good(capabilities={"k": {}})),
    ("an upper-case region", _good(region="Europe")),
    ("a region with a newline", _good(region="eu\n")),
    ("a 33-character region", _good(region="a" * 33)),
    ("load over 1", _good(load=1.5)),
    ("negative load", _good(load=-0.1)),
    ("load as text", _good(load="0.5")),
    ("load a bool", _good(load=True)),
    ("seq 0", _good(seq=0)),
    ("seq 2**53", _good(seq=2**53)),
    ("seq with a fraction", _good(seq=5.5)),
    ("seq as text", _good(seq="5")),
    ("expires_at 0", _good(expires_at=0)),
    ("negative expires_at", _good(expires_at=-5.0)),
    ("expires_at as text", _good(expires_at="soon")),
    ("tombstone 1", _good(tombstone=1)),
    ("tombstone null", _good(tombstone=None)),
]


@pytest.mark.parametrize(("why", "data"), REFUSED, ids=[why for why, _ in REFUSED])
def test_shapes_the_code_refuses_the_schema_refuses(why: str, data: dict[str, Any]) -> None:
    assert _code_refuses(data) is not None, why
    assert not VALIDATOR.is_valid(data), why


def test_what_the_schema_cannot_say() -> None:
    """The code refuses these and the schema admits them, as its `$comment` says."""
    beyond = [
        _good(dht_port=4000.0),  # an integer member written with a fraction
        _good(seq=5.0),
        _good(capabilities={"k": 10**400}),  # beyond the range of a double
        _good(capabilities={"k": "\ud800"}),  # a lone surrogate: no UTF-8, no JCS
        _good(tunnel_url=PUNYCODE),  # punycode that does not decode
        _good(capabilities={f"k{i:02d}": "v" * 64 for i in range(16)}),  # over 1 KB
    ]
    for data in beyond:
        assert _code_refuses(data) is not None
        assert VALIDATOR.is_valid(data)
    assert isinstance(_code_refuses(beyond[-1]), RecordTooLarge)


# What random mutations draw from: every JSON type, values at and past each field's limits.
_POOL: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    65535,
    65536,
    records.MAX_SEQ,
    0.5,
    1.0000001,
    -0.5,
    1e300,
    "",
    "ocr",
    "a" * 33,
    "OCR",
    "eu\n",
    "203.0.113.5",
    "a" * 40,
    "A" * 40,
    "ab" * 32,
    "https://x.trycloudflare.com",
    "https://x.trycloudflare.com/",
    [],
    ["ocr"],
    ["ocr", "ocr"],
    ["ocr", 1],
    {},
    {"gpu": "a100"},
    {"gpu": [1]},
    {"Bad": 1},
]


def test_random_mutations_get_the_same_verdict_from_code_and_schema() -> None:
    rng = random.Random(2112)
    fields = [*records.FIELDS, *records.OPTIONAL_FIELDS]
    checked = 0
    for _ in range(3000):
        data = _good()
        for _ in range(rng.randint(1, 2)):
            name = rng.choice(fields)
            if rng.random() < 0.1:
                data.pop(name, None)
            else:
                data[name] = rng.choice(_POOL)
        if any(isinstance(data.get(name), float) for name in INTEGER_FIELDS):
            continue  # 1e300 is an integer to JSON Schema; documented above
        refused = _code_refuses(data)
        assert (refused is None) == VALIDATOR.is_valid(data), (data, refused)
        checked += 1
    assert checked > 2500
