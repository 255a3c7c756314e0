"""Tunnel URLs have one canonical form that Python and WHATWG parsers read alike (issue 20.5).

The cases live in tunnel_urls.json beside this file; wrangler/test/tunnel-url.test.js feeds the
same file to `new URL()` inside workerd and checks each `whatwg_host` there.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from dht_bridge import tunnels
from dht_bridge.dht import shards
from dht_bridge.dht.storage import RecordStorage, StoreResult
from dht_bridge.dht.values import encode_value, key_digest
from dht_bridge.errors import RecordInvalid
from dht_bridge.records import WorkerRecord, parse_and_validate, validate
from dht_bridge.registry.registry import open_registry
from dht_bridge.settings import RegistrySettings
from dht_bridge.tunnels import TunnelPolicy, canonical_tunnel_url
from tests.support.helpers import POLICY, make_record

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "tunnel_urls.json").read_text(encoding="ascii")
)
# Loopback admitted, so that what is refused below is refused for its spelling alone.
LOOPBACK = TunnelPolicy(allow_loopback=True)
CANONICAL = [case["canonical"] for case in CASES if case["canonical"] is not None]
NOT_CANONICAL = [case["url"] for case in CASES if case["url"] != case["canonical"]]


def _id(case: dict[str, Any]) -> str:
    return str(case["why"])


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_canonical_form_or_a_reason(case: dict[str, Any]) -> None:
    if case["canonical"] is None:
        with pytest.raises(RecordInvalid) as info:
            canonical_tunnel_url(case["url"])
        assert info.value.field == "tunnel_url"
    else:
        assert canonical_tunnel_url(case["url"]) == case["canonical"]


@pytest.mark.parametrize("url", CANONICAL)
def test_python_and_httpx_read_the_canonical_form_as_written(url: str) -> None:
    """The parts a reader takes from a canonical URL are the substrings it was built from
    (the workerd test checks the same of WHATWG), and canonicalizing again changes nothing."""
    assert canonical_tunnel_url(url) == url
    scheme, _, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == (scheme, authority, slash + path)
    read = httpx.URL(url)
    assert read.netloc.decode("ascii") == authority
    assert read.raw_path.decode("ascii") == (slash + path or "/")


def _outcome(parse: Callable[[str], object], url: str) -> object:
    try:
        return parse(url)
    except RecordInvalid:
        return "refused"


def test_the_one_regex_for_common_urls_agrees_with_the_full_walk() -> None:
    labels = ["w", "W", "a-b", "-a", "a-", "xn--bcher-kva", "xn--zz", "0x7f", "127", "1", "0", "z9"]
    hosts = [".".join(parts) for n in (1, 2, 3, 4) for parts in itertools.product(labels, repeat=n)]
    ports = ["", ":443", ":80", ":0", ":8443", ":65535", ":65536", ":08443", ":"]
    paths = ["", "/", "/a", "/a/", "/.", "/..", "/.a", "/a.", "//", "/a//b", "/a:b", "/~x"]
    schemes = ["https", "http", "HTTPS", "ftp"]
    rng = random.Random(20)
    for _ in range(5000):
        url = f"{rng.choice(schemes)}://{rng.choice(hosts)}{rng.choice(ports)}{rng.choice(paths)}"
        assert _outcome(tunnels._parse, url) == _outcome(tunnels._walk, url), url


@pytest.mark.parametrize("url", NOT_CANONICAL)
def test_a_record_not_in_canonical_form_is_invalid_everywhere(url: str) -> None:
    record = make_record(tunnel_url=url)  # signing itself does not judge the URL
    now = time.time()
    with pytest.raises(RecordInvalid) as info:
        validate(record, LOOPBACK, now=now)
    assert info.value.field == "tunnel_url"
    # What the router's POST /workers runs, what a Redis read parses, what a DHT value holds.
    parses: list[Callable[[], WorkerRecord]] = [
        lambda: parse_and_validate(record.to_dict(), LOOPBACK, now=now),
        lambda: WorkerRecord.from_json(record.to_json()),
        lambda: WorkerRecord.from_wire(record.to_wire()),
    ]
    for parse in parses:
        with pytest.raises(RecordInvalid, match="tunnel_url"):
            parse()
    key = shards.worker_key(record.worker_id)
    storage = RecordStorage(LOOPBACK)
    assert storage.merge(key_digest(key), encode_value(key, [record])) is StoreResult.INVALID
    assert storage.get(key_digest(key)) is None


def test_the_issue_url_is_refused_with_the_reason() -> None:
    record = make_record(tunnel_url="https://127.0.0.1\\.trycloudflare.com/")
    with pytest.raises(RecordInvalid, match="backslash"):
        validate(record, POLICY, now=time.time())


def test_a_canonicalizable_url_names_its_canonical_form() -> None:
    record = make_record(tunnel_url="https://W.TryCloudflare.com/")
    with pytest.raises(RecordInvalid, match=r"canonical form .*'https://w\.trycloudflare\.com'"):
        validate(record, POLICY, now=time.time())
    # The policy judges the canonical form and hands it back, for a signer to use.
    assert POLICY.check("https://W.TryCloudflare.com/") == "https://w.trycloudflare.com"
    validate(make_record(tunnel_url="https://w.trycloudflare.com"), POLICY, now=time.time())


def test_the_policy_judges_the_host_as_canonicalized() -> None:
    # An ideographic full stop is a dot to UTS 46: the host is on the allow-list.
    assert POLICY.check("https://W\u3002TryCloudflare.com") == "https://w.trycloudflare.com"
    # Full-width digits are digits to UTS 46: an IP literal, not a name off the allow-list.
    with pytest.raises(RecordInvalid, match="IP literal"):
        POLICY.check("https://\uff11\uff12\uff17.0.0.1")


async def test_the_registry_stores_none_and_ignores_one_written_behind_its_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = open_registry(RegistrySettings(), policy=POLICY)
    try:
        record = make_record(tunnel_url="https://127.0.0.1\\.trycloudflare.com/")
        with pytest.raises(RecordInvalid, match="tunnel_url"):
            await registry.upsert(record)
        assert await registry.get(record.worker_id) is None
        # A value some older writer left in Redis is parsed on every read: never served.
        await registry.client.set(registry.worker_key(record.worker_id), record.to_json())
        await registry.client.zadd(registry.service_key("ocr"), {record.worker_id: 0.0})
        with caplog.at_level(logging.WARNING, logger="dht_bridge.registry.registry"):
            assert await registry.get(record.worker_id) is None
            assert await registry.lookup("ocr") == []
        assert "tunnel_url" in caplog.text
    finally:
        await registry.aclose()
