"""The router's side of the Cloudflare Worker's shared secret (RMA_ORIGIN_SECRET).

The router believes the Worker's X-Forwarded-For and CF-IPCountry only when X-RMA-Origin-Secret
matches; the setting is off by default. tests/test_router.py covers the client address against
spoofing; these cover the country, the default and the configuration path.
"""

from __future__ import annotations

import pytest
from starlette.requests import Request

from edge_router.cloudflare import CLOUDFLARE_RANGES, ORIGIN_SECRET_HEADER, ClientResolver
from edge_router.config import RouterConfig

SECRET = "s3cret-shared-with-worker-0123456789"
STRANGER = ("203.0.113.7", 40000)  # a TCP peer outside every trusted range
CLOUDFLARE = ("162.158.1.1", 443)


def request(peer: tuple[str, int], headers: dict[str, str]) -> Request:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": peer,
    }
    return Request(scope)


def from_worker(secret: str, **headers: str) -> dict[str, str]:
    return {ORIGIN_SECRET_HEADER: secret, **headers}


def test_the_secret_is_off_by_default_and_an_empty_one_stays_off() -> None:
    assert RouterConfig.build(environ={}).origin_secret is None
    assert RouterConfig.build(environ={"RMA_ORIGIN_SECRET": ""}).origin_secret is None
    configured = RouterConfig.build(environ={"RMA_ORIGIN_SECRET": SECRET})
    assert configured.origin_secret == SECRET

    resolver = ClientResolver(CLOUDFLARE_RANGES)  # what the app builds with the default
    for guess in ("", "anything", SECRET):
        claims = from_worker(guess, **{"X-Forwarded-For": "198.51.100.9", "CF-IPCountry": "DE"})
        assert not resolver.from_our_worker(request(STRANGER, claims))
        assert resolver.client_ip(request(STRANGER, claims)) == "203.0.113.7"
        assert resolver.country(request(STRANGER, claims)) is None


def test_country_from_the_worker_only_with_the_right_secret() -> None:
    resolver = ClientResolver(CLOUDFLARE_RANGES, origin_secret=SECRET)
    country = {"CF-IPCountry": "DE"}
    assert resolver.country(request(STRANGER, from_worker(SECRET, **country))) == "de"
    assert resolver.country(request(STRANGER, from_worker("a-guess", **country))) is None
    assert resolver.country(request(STRANGER, from_worker(SECRET[:-1], **country))) is None
    assert resolver.country(request(STRANGER, country)) is None
    # Cloudflare's own ranges are believed without a secret, as before.
    assert resolver.country(request(CLOUDFLARE, country)) == "de"
    # Unknown ("XX") and malformed countries are no country at all.
    for value in ("XX", "DEU", "1", ""):
        claims = from_worker(SECRET, **{"CF-IPCountry": value})
        assert resolver.country(request(STRANGER, claims)) is None


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        ("198.51.100.10", "198.51.100.10"),
        ("2001:db8::7", "2001:db8::7"),
        # The Worker sends exactly one address; if a hop appended its own, the first is the client.
        ("198.51.100.10, 10.0.0.1", "198.51.100.10"),
        # Not an address: the TCP peer, never the text.
        ("unknown", "203.0.113.7"),
        ("", "203.0.113.7"),
    ],
)
def test_client_address_from_the_worker(forwarded: str, expected: str) -> None:
    resolver = ClientResolver(CLOUDFLARE_RANGES, origin_secret=SECRET)
    claims = from_worker(SECRET, **{"X-Forwarded-For": forwarded})
    assert resolver.client_ip(request(STRANGER, claims)) == expected
