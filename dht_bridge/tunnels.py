"""The tunnel URL policy: which URLs a record may advertise, so the router is no SSRF vector."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from dht_bridge.errors import RecordInvalid

DEFAULT_ALLOWED_HOSTS: tuple[str, ...] = ("*.trycloudflare.com",)
MAX_URL_LENGTH = 256
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


@dataclass(frozen=True, slots=True)
class TunnelPolicy:
    """Which tunnel URLs are acceptable.

    `allowed_hosts` holds exact host names or `*.domain` patterns (any subdomain of domain).
    `allow_loopback` is for the demo and tests only: it admits http(s) URLs on 127.0.0.0/8,
    ::1 and localhost, and nothing else that the allow-list would not admit anyway.
    """

    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    allow_loopback: bool = False

    def check(self, url: str) -> None:
        """Raise RecordInvalid naming the problem when `url` is not an acceptable tunnel URL."""
        if not isinstance(url, str) or not url:
            raise RecordInvalid("tunnel_url", "must be a non-empty string")
        if len(url) > MAX_URL_LENGTH:
            raise RecordInvalid("tunnel_url", f"longer than {MAX_URL_LENGTH} characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise RecordInvalid("tunnel_url", f"not a valid URL ({exc})") from exc
        host = (parts.hostname or "").rstrip(".")
        if parts.username is not None or parts.password is not None:
            raise RecordInvalid("tunnel_url", "must not carry user or password")
        if parts.query or parts.fragment:
            raise RecordInvalid("tunnel_url", "must not carry a query or fragment")
        if not host:
            raise RecordInvalid("tunnel_url", "has no host")
        if port == 0:
            raise RecordInvalid("tunnel_url", "port 0 is not a port")
        if self.allow_loopback and _is_loopback(host):
            if parts.scheme not in ("http", "https"):
                raise RecordInvalid("tunnel_url", "scheme must be http or https")
            return
        if parts.scheme != "https":
            raise RecordInvalid("tunnel_url", "must use https")
        if _is_ip_literal(host):
            raise RecordInvalid("tunnel_url", "IP literals are not allowed; use the tunnel host")
        if host.lower() in _LOOPBACK_NAMES:
            raise RecordInvalid("tunnel_url", "localhost is not allowed")
        if not self.host_allowed(host):
            allowed = ", ".join(self.allowed_hosts) or "(none)"
            raise RecordInvalid("tunnel_url", f"host {host!r} is not on the allow-list ({allowed})")

    def host_allowed(self, host: str) -> bool:
        """True when `host` matches an entry of the allow-list."""
        host = host.lower().rstrip(".")
        for pattern in self.allowed_hosts:
            pattern = pattern.lower().rstrip(".")
            if pattern.startswith("*."):
                suffix = pattern[1:]
                if host.endswith(suffix) and len(host) > len(suffix):
                    return True
            elif host == pattern:
                return True
        return False


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        # Dotted-decimal look-alikes such as "0x7f.1" or "2130706433" resolve to IPs in some
        # resolvers; a host made only of digits, dots and hex markers is treated as a literal.
        return all(c in "0123456789abcdefx." for c in host.lower()) and any(
            c.isdigit() for c in host
        )
    return True


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
