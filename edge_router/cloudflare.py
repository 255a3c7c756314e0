"""Who is asking: the client address and country, trusted only from peers we know are proxies."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence

from starlette.requests import Request

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloudflare's published ranges (cloudflare.com/ips), shipped as the default trusted proxies.
# Behind a Cloudflare Tunnel the peer is the local cloudflared instead: configure
# RMA_TRUSTED_PROXIES=127.0.0.1/32 there.
CLOUDFLARE_RANGES: tuple[Network, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "173.245.48.0/20", "103.21.244.0/22", "103.22.200.0/22", "103.31.4.0/22",
        "141.101.64.0/18", "108.162.192.0/18", "190.93.240.0/20", "188.114.96.0/20",
        "197.234.240.0/22", "198.41.128.0/17", "162.158.0.0/15", "104.16.0.0/13",
        "104.24.0.0/14", "172.64.0.0/13", "131.0.72.0/22",
        "2400:cb00::/32", "2606:4700::/32", "2803:f800::/32", "2405:b500::/32",
        "2405:8100::/32", "2a06:98c0::/29", "2c0f:f248::/32",
    )
)  # fmt: skip

ORIGIN_SECRET_HEADER = "x-rma-origin-secret"
# Peer addresses whose verdict (trusted proxy or not) is remembered, at most.
MAX_REMEMBERED_PEERS = 4096


class ClientResolver:
    """Reads the client address and country from headers only when the peer may set them."""

    def __init__(self, trusted: Sequence[Network], *, origin_secret: str | None = None) -> None:
        self._trusted = tuple(trusted)
        self._secret = origin_secret.encode() if origin_secret else None
        # Verdicts per peer address: parsing it and walking the ranges cost a cache hit about
        # 6% of its CPU, and the peers of a router are few (Cloudflare's edges, or cloudflared).
        self._verdicts: dict[str, bool] = {}

    def peer_trusted(self, request: Request) -> bool:
        """Is the TCP peer a trusted proxy (Cloudflare, or our cloudflared)?"""
        client = request.scope.get("client")
        host = client[0] if client else None
        if not host:
            return False
        verdict = self._verdicts.get(host)
        if verdict is None:
            verdict = self._trusted_address(host)
            if len(self._verdicts) >= MAX_REMEMBERED_PEERS:
                self._verdicts.clear()  # many distinct peers: direct clients, not proxies
            self._verdicts[host] = verdict
        return verdict

    def _trusted_address(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def from_our_worker(self, request: Request) -> bool:
        """Does the request carry the shared secret of our Cloudflare Worker?"""
        given = request.headers.get(ORIGIN_SECRET_HEADER)
        return bool(self._secret and given and hmac.compare_digest(given.encode(), self._secret))

    def client_ip(self, request: Request) -> str | None:
        """The end client's address: CF-Connecting-IP from Cloudflare, the first X-Forwarded-For
        hop from our Worker, otherwise the TCP peer; spoofed headers from others are ignored."""
        peer = request.client.host if request.client else None
        if self.from_our_worker(request):
            forwarded = request.headers.get("x-forwarded-for", "")
            first = forwarded.split(",")[0].strip()
            if _is_ip(first):
                return first
        if self.peer_trusted(request):
            connecting = request.headers.get("cf-connecting-ip", "").strip()
            if _is_ip(connecting):
                return connecting
        return peer

    def cf_ray(self, request: Request) -> str | None:
        """The CF-Ray header when the peer may set it (Cloudflare, or our Worker), else None."""
        if not (self.peer_trusted(request) or self.from_our_worker(request)):
            return None
        return request.headers.get("cf-ray")

    def country(self, request: Request) -> str | None:
        """CF-IPCountry (lower-cased) when the peer may set it, else None."""
        if not (self.peer_trusted(request) or self.from_our_worker(request)):
            return None
        value = request.headers.get("cf-ipcountry", "").strip().lower()
        # XX: unknown, T1: Tor, per Cloudflare's documentation.
        if len(value) == 2 and value.isalpha() and value not in ("xx",):
            return value
        return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
