"""The tunnel URL policy: which URLs a record may advertise, so the router is no SSRF vector.

Every tunnel URL has one canonical spelling (`canonical_tunnel_url`), chosen so that Python
(`urllib`, httpx) and a WHATWG parser (browsers, Node, the Cloudflare Worker) read the same
scheme, host, port and path from it. Whatever the two could read differently is refused rather
than guessed at: backslashes, percent escapes, user info, whitespace and control characters,
hosts that end in a number (WHATWG reads `127.1` or `0x7f.1` as IPv4 addresses).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

from dht_bridge.errors import RecordInvalid

DEFAULT_ALLOWED_HOSTS: tuple[str, ...] = ("*.trycloudflare.com",)
MAX_URL_LENGTH = 256
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters WHATWG reads differently from Python, or that only a query, fragment or user
# part would need; refused anywhere in the URL.
_REFUSED = (
    ("\\", "a backslash (WHATWG parsers read it as '/')"),
    ("%", "a percent escape (WHATWG parsers decode it in the host)"),
    ("@", "an '@' (user info)"),
    ("?", "a query"),
    ("#", "a fragment"),
)
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# WHATWG's "ends in a number": such a host is parsed as an IPv4 address, in any base.
_NUMBER = re.compile(r"[0-9]+|0x[0-9a-f]*")
_HIDDEN_ASCII = re.compile(r"[^!-~]")  # anything but visible ASCII
_PORT = re.compile(r"[0-9]{1,5}")
_PATH = re.compile(r"(?:/[A-Za-z0-9._~!$&'()*+,;=:-]*)*")
# The shape nearly every record has, already canonical: a name whose last label starts with a
# letter (no number, so no IPv4 reading), path segments neither empty nor starting with a dot.
# One match instead of the walk below on every parse; anything else takes the walk.
_COMMON = re.compile(
    r"(https?)://((?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?)"
    r"(?::([1-9][0-9]{0,4}))?((?:/[A-Za-z0-9_~!$&'()*+,;=:-][A-Za-z0-9._~!$&'()*+,;=:-]*)*)"
)


@dataclass(frozen=True, slots=True)
class _Parts:
    scheme: str
    host: str  # lower-case ASCII: IDNA-encoded name, dotted-quad IPv4 or [IPv6]
    port: int | None  # None for the scheme's default
    path: str  # "" for the root, else "/" and segments

    @property
    def url(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}{self.path}"

    @property
    def is_ip(self) -> bool:
        return self.host.startswith("[") or _is_dotted_quad(self.host)


def canonical_tunnel_url(text: str) -> str:
    """The one spelling of tunnel URL `text`; raises RecordInvalid naming what cannot be made so.

    Lower-cases the scheme and host, IDNA-encodes an international host, drops the default port
    and a root path's "/"; refuses everything else that is not already canonical.
    """
    return _parse(text).url


def _parse(text: str) -> _Parts:
    match = _COMMON.fullmatch(text) if isinstance(text, str) else None
    if match is not None and len(text) <= MAX_URL_LENGTH:
        scheme, host, port, path = match.groups()
        number = None if port is None else int(port)
        if (
            len(host) <= 253
            and "xn--" not in host
            and (number is None or (number <= 65535 and number != _DEFAULT_PORTS[scheme]))
        ):
            return _Parts(scheme=scheme, host=host, port=number, path=path)
    return _walk(text)


def _walk(text: str) -> _Parts:
    """Every check, one by one, each with its own reason."""
    if not isinstance(text, str) or not text:
        raise _invalid("must be a non-empty string")
    if len(text) > MAX_URL_LENGTH:
        raise _invalid(f"longer than {MAX_URL_LENGTH} characters")
    # WHATWG strips leading and trailing spaces and controls and drops tabs and newlines
    # anywhere; Python keeps them. Neither reading is safe, so neither is guessed.
    hidden = _hidden(text)
    if hidden is not None:
        raise _invalid(f"holds whitespace or a control character ({text[hidden]!r} at {hidden})")
    for char, what in _REFUSED:
        if char in text:
            raise _invalid(f"must not hold {what}")
    scheme, separator, rest = text.partition("://")
    scheme = scheme.lower()
    if not separator or not scheme.isascii() or scheme not in _DEFAULT_PORTS:
        raise _invalid("must start with https:// (http:// only on loopback)")
    authority, slash, path = rest.partition("/")
    host, port = _split_port(authority)
    path = slash + path
    if not _PATH.fullmatch(path):
        raise _invalid("the path may hold only ASCII letters, digits and -._~!$&'()*+,;=:/")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise _invalid("the path must not hold '.' or '..' segments")
    parts = _Parts(
        scheme=scheme,
        host=_canonical_host(host),
        port=_canonical_port(port, scheme),
        # "" and "/" are one URL to WHATWG; "/a" and "/a/" are two, as they are to a server.
        path="" if path == "/" else path,
    )
    if len(parts.url) > MAX_URL_LENGTH:
        raise _invalid(f"longer than {MAX_URL_LENGTH} characters once canonical")
    return parts


def _hidden(text: str) -> int | None:
    """The index of the first whitespace or control (or other invisible) character."""
    if text.isascii():
        match = _HIDDEN_ASCII.search(text)
        return None if match is None else match.start()
    for index, char in enumerate(text):
        if char.isspace() or not char.isprintable():
            return index
    return None


def _split_port(authority: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        host, bracket, after = authority.partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise _invalid("malformed IPv6 literal")
        return host + bracket, after[1:] if after else None
    if authority.count(":") > 1:
        raise _invalid("a host may hold no ':' but the one before the port")
    host, colon, port = authority.partition(":")
    return host, port if colon else None


def _canonical_host(host: str) -> str:
    if not host:
        raise _invalid("has no host")
    if host.startswith("["):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise _invalid(f"malformed IPv6 literal ({exc})") from None
        if "." in address.compressed:
            raise _invalid("IPv6 literals with an embedded IPv4 address are not accepted")
        return f"[{address.compressed}]"
    if not host.isascii():
        try:
            # UTS 46 non-transitional mapping, as WHATWG's domain-to-ASCII does.
            host = idna.encode(host, uts46=True, transitional=False).decode("ascii")
        except UnicodeError as exc:
            raise _invalid(f"host is not a valid international domain name ({exc})") from None
    host = host.lower()
    if host.endswith("."):
        raise _invalid("the host must not end with a dot")
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise _invalid("the host must be labels of letters, digits and inner hyphens")
    if _NUMBER.fullmatch(labels[-1]):
        if _is_dotted_quad(host):
            return host
        raise _invalid("the host ends in a number, which WHATWG parsers read as an IP literal")
    for label in labels:
        if label.startswith("xn--"):
            _check_a_label(label)
    return host


def _check_a_label(label: str) -> None:
    """An `xn--` label must decode to a valid name that encodes back to the same label."""
    try:
        again = idna.encode(idna.decode(label), uts46=True, transitional=False).decode("ascii")
    except UnicodeError as exc:
        raise _invalid(f"host label {label!r} is not valid punycode ({exc})") from None
    if again != label:
        raise _invalid(f"host label {label!r} is not in canonical punycode ({again!r})")


def _canonical_port(port: str | None, scheme: str) -> int | None:
    if port is None:
        return None
    if not _PORT.fullmatch(port):
        raise _invalid("the port must be 1 to 65535")
    number = int(port)
    if not 0 < number <= 65535:
        raise _invalid("the port must be 1 to 65535")
    return None if number == _DEFAULT_PORTS[scheme] else number


def _is_dotted_quad(host: str) -> bool:
    try:
        return str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        return False


def _invalid(reason: str) -> RecordInvalid:
    return RecordInvalid("tunnel_url", reason)


@dataclass(frozen=True, slots=True)
class TunnelPolicy:
    """Which tunnel URLs are acceptable.

    `allowed_hosts` holds exact host names or `*.domain` patterns (any subdomain of domain).
    `allow_loopback` is for the demo and tests only: it admits http(s) URLs on 127.0.0.0/8,
    ::1 and localhost, and nothing else that the allow-list would not admit anyway.
    """

    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    allow_loopback: bool = False

    def check(self, url: str) -> str:
        """The canonical form of `url` when the policy admits it; raises RecordInvalid naming
        the problem otherwise. A record must hold the canonical form itself (`records`)."""
        parts = _parse(url)
        if self.allow_loopback and _is_loopback(parts.host):
            return parts.url
        if parts.scheme != "https":
            raise _invalid("must use https")
        if parts.is_ip:
            raise _invalid("IP literals are not allowed; use the tunnel host")
        if parts.host in _LOOPBACK_NAMES:
            raise _invalid("localhost is not allowed")
        if not self.host_allowed(parts.host):
            allowed = ", ".join(self.allowed_hosts) or "(none)"
            raise _invalid(f"host {parts.host!r} is not on the allow-list ({allowed})")
        return parts.url

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


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = [
    "DEFAULT_ALLOWED_HOSTS",
    "MAX_URL_LENGTH",
    "TunnelPolicy",
    "canonical_tunnel_url",
]
