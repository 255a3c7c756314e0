"""The router's configuration: one frozen object, built once from options and `RMA_*` variables."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from limits import parse_many

from dht_bridge.errors import ConfigError
from dht_bridge.options import Option, OptionTable
from dht_bridge.settings import (
    DHT_OPTIONS,
    REGISTRY_OPTIONS,
    TUNNEL_OPTIONS,
    DHTSettings,
    RegistrySettings,
    tunnel_policy,
)
from dht_bridge.tunnels import TunnelPolicy
from edge_router.cloudflare import CLOUDFLARE_RANGES

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_HTTP_PORT = 8080
DEFAULT_CACHE_TTL = 5.0
DEFAULT_CACHE_STALE = 300.0
DEFAULT_CACHE_SIZE = 4096
DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_DAILY_BUDGET = 100_000  # Cloudflare's free tier: requests a day
DEFAULT_BOOTSTRAP_PEERS = 8
DEFAULT_BOOTSTRAP_TTL = 300
# /topology and /metrics read at most this many records from the registry per request.
DEFAULT_TOPOLOGY_LIMIT = 5000
# ... and share one such read for this long (the page polls every 2 s).
TOPOLOGY_CACHE_SECONDS = 2.0


DEFAULT_DRAIN_SECONDS = 2.0
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
DEFAULT_PROXY_CONNECT_TIMEOUT = 3.0
DEFAULT_PROXY_READ_TIMEOUT = 60.0
# Connections to tunnels held at once, every one kept alive between requests (a request beyond
# them waits up to the pool timeout, 3 s, for one to come free).
DEFAULT_PROXY_MAX_CONNECTIONS = 512
# Requests per client address, in the `limits` package's syntax ("N/second|minute|hour|day",
# several joined by ";"). Each is far above what an honest client sends: a worker's fallback
# heartbeat is one POST /workers per 180 s (60/minute leaves room for 180 workers behind one
# NAT), the topology page polls every 2 s and Prometheus scrapes every 15 s (34/minute).
DEFAULT_RATE_REGISTER = "60/minute"
DEFAULT_RATE_ROUTE = "600/minute"
DEFAULT_RATE_ADMIN = "30/minute"
DEFAULT_RATE_TOPOLOGY = "120/minute"
# What turns a class's limit off.
RATE_OFF = "none"
# RMA_TUNNEL_PROOF (edge_router.upstream.proof): not checked; proved first; proved only.
PROOF_OFF = "off"
PROOF_PREFER = "prefer"
PROOF_REQUIRE = "require"
PROOF_MODES = (PROOF_OFF, PROOF_PREFER, PROOF_REQUIRE)

__all__ = [
    "ADMIN_TOKEN",
    "HTTP_PORT",
    "PROOF_MODES",
    "PROOF_OFF",
    "PROOF_PREFER",
    "PROOF_REQUIRE",
    "RATE_OFF",
    "ROUTER_OPTIONS",
    "TOPOLOGY_CACHE_SECONDS",
    "CacheSettings",
    "RateSettings",
    "RouterConfig",
]

# Shared with `rma flush` and `rma demo`: declared here, once.
ADMIN_TOKEN = Option(
    "admin_token",
    "ADMIN_TOKEN",
    "bearer token for /admin/*, at least 16 characters; none: the admin API is off "
    "(prefer the variable: a flag shows in the process list)",
)
HTTP_PORT = Option("port", "PORT", "the router's HTTP port", "int", DEFAULT_HTTP_PORT)

ROUTER_OPTIONS = OptionTable(
    Option("host", "HOST", "the router's HTTP address", default="127.0.0.1"),
    HTTP_PORT,
    ADMIN_TOKEN,
    Option(
        "coordinators",
        "COORDINATORS",
        "a coordinator (bridge) DHT node: joined at start and handed out first by "
        "/dht/bootstrap; repeatable",
        "peers",
        (),
    ),
    Option(
        "cache_ttl", "CACHE_TTL", "seconds a cached lookup is fresh", "float", DEFAULT_CACHE_TTL
    ),
    Option(
        "cache_stale",
        "CACHE_STALE",
        "seconds more a cached lookup is served while Redis and the DHT both fail",
        "float",
        DEFAULT_CACHE_STALE,
    ),
    Option(
        "cache_size",
        "CACHE_SIZE",
        "cached lookups kept (the least recently asked go first)",
        "int",
        DEFAULT_CACHE_SIZE,
    ),
    Option(
        "trusted_proxies",
        "TRUSTED_PROXIES",
        "CIDRs whose CF-Connecting-IP and CF-IPCountry are believed (behind cloudflared: "
        "127.0.0.1/32); repeatable",
        "list",
        (),
        metavar="CIDR",
        shown="Cloudflare's published ranges",
    ),
    Option(
        "origin_secret",
        "ORIGIN_SECRET",
        "the secret our Cloudflare Worker sends in X-RMA-Origin-Secret, at least 16 characters; "
        "none: not checked",
    ),
    Option("max_body", "MAX_BODY", "largest JSON body accepted, bytes", "int", DEFAULT_MAX_BODY),
    Option(
        "daily_budget",
        "DAILY_BUDGET",
        "edge requests a day that /metrics compares the count with",
        "int",
        DEFAULT_DAILY_BUDGET,
    ),
    Option(
        "proxy_connect_timeout",
        "PROXY_CONNECT_TIMEOUT",
        "seconds to connect to a worker's tunnel",
        "float",
        DEFAULT_PROXY_CONNECT_TIMEOUT,
    ),
    Option(
        "proxy_read_timeout",
        "PROXY_READ_TIMEOUT",
        "seconds a routed request may wait for the worker's answer",
        "float",
        DEFAULT_PROXY_READ_TIMEOUT,
    ),
    Option(
        "proxy_max_connections",
        "PROXY_MAX_CONNECTIONS",
        "connections to workers' tunnels held open at once, all kept alive between requests; "
        "one tunnel holds at most an eighth of them (at least 8)",
        "int",
        DEFAULT_PROXY_MAX_CONNECTIONS,
    ),
    Option(
        "access_log",
        "ACCESS_LOG",
        "log every request at info (uvicorn's access log); off: only failures are logged",
        "bool",
        False,
    ),
    Option(
        "topology_limit",
        "TOPOLOGY_LIMIT",
        "records /topology and /metrics read per request (beyond: marked truncated)",
        "int",
        DEFAULT_TOPOLOGY_LIMIT,
    ),
    Option(
        "drain_seconds",
        "DRAIN_SECONDS",
        "on SIGTERM, seconds /readyz says 503 (draining) while requests are still served, so "
        "that a load balancer moves traffic first",
        "float",
        DEFAULT_DRAIN_SECONDS,
    ),
    Option(
        "shutdown_timeout",
        "SHUTDOWN_TIMEOUT",
        "then seconds open requests (a long stream) may take before they are cut",
        "float",
        DEFAULT_SHUTDOWN_TIMEOUT,
    ),
    Option(
        "rate_register",
        "RATE_REGISTER",
        "POST and DELETE /workers per client address, shared by the replicas through Redis "
        f"(e.g. 60/minute; {RATE_OFF}: unlimited)",
        default=DEFAULT_RATE_REGISTER,
        metavar="RATE",
    ),
    Option(
        "rate_route",
        "RATE_ROUTE",
        f"/route/* requests per client address, counted by each replica alone ({RATE_OFF}: "
        "unlimited)",
        default=DEFAULT_RATE_ROUTE,
        metavar="RATE",
    ),
    Option(
        "rate_admin",
        "RATE_ADMIN",
        f"/admin/* requests per client address, shared through Redis ({RATE_OFF}: unlimited)",
        default=DEFAULT_RATE_ADMIN,
        metavar="RATE",
    ),
    Option(
        "rate_topology",
        "RATE_TOPOLOGY",
        f"/topology and /metrics reads per client address, shared through Redis ({RATE_OFF}: "
        "unlimited)",
        default=DEFAULT_RATE_TOPOLOGY,
        metavar="RATE",
    ),
    Option(
        "tunnel_proof",
        "TUNNEL_PROOF",
        "route only to workers whose tunnel URL answered a signed challenge with their record's "
        "key: off; prefer (proved first, unproved while no proved one is healthy); require",
        default=PROOF_PREFER,
        choices=PROOF_MODES,
    ),
    DHT_OPTIONS,
    REGISTRY_OPTIONS,
    TUNNEL_OPTIONS,
)


@dataclass(frozen=True)
class CacheSettings:
    """The hot-lookup cache: fresh for `ttl` seconds, then kept `stale` more for bad days."""

    ttl: float = DEFAULT_CACHE_TTL
    stale: float = DEFAULT_CACHE_STALE
    maxsize: int = DEFAULT_CACHE_SIZE
    # The CDN may serve a stale copy this long while it revalidates in the background.
    stale_while_revalidate: float = 30.0


@dataclass(frozen=True)
class RateSettings:
    """Requests per client address and class, in `limits`' syntax; RATE_OFF: unlimited."""

    register: str = DEFAULT_RATE_REGISTER
    route: str = DEFAULT_RATE_ROUTE
    admin: str = DEFAULT_RATE_ADMIN
    topology: str = DEFAULT_RATE_TOPOLOGY

    def check(self) -> None:
        """Refuse a rate `limits` cannot read, naming its variable."""
        for name in ("register", "route", "admin", "topology"):
            text = getattr(self, name)
            if text.strip().lower() == RATE_OFF:
                continue
            try:
                items = parse_many(text)
            except ValueError:
                raise ConfigError(
                    f"RMA_RATE_{name.upper()}: {text!r} is not a rate like 60/minute"
                ) from None
            if any(item.amount < 1 for item in items):
                raise ConfigError(
                    f"RMA_RATE_{name.upper()}: {text!r} would refuse every request; "
                    f"{RATE_OFF} turns the limit off"
                )


@dataclass(frozen=True)
class RouterConfig:
    """Everything `rma router` needs."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_HTTP_PORT
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    dht: DHTSettings = field(default_factory=DHTSettings)
    dht_bootstrap: tuple[tuple[str, int], ...] = ()
    coordinators: tuple[tuple[str, int], ...] = ()
    policy: TunnelPolicy = field(default_factory=TunnelPolicy)
    admin_token: str | None = None
    cache: CacheSettings = field(default_factory=CacheSettings)
    trusted_proxies: tuple[Network, ...] = CLOUDFLARE_RANGES
    origin_secret: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    daily_budget: int = DEFAULT_DAILY_BUDGET
    bootstrap_peers: int = DEFAULT_BOOTSTRAP_PEERS
    bootstrap_ttl: int = DEFAULT_BOOTSTRAP_TTL
    default_limit: int = 10
    max_limit: int = 100
    proxy_connect_timeout: float = DEFAULT_PROXY_CONNECT_TIMEOUT
    proxy_read_timeout: float = DEFAULT_PROXY_READ_TIMEOUT
    proxy_max_connections: int = DEFAULT_PROXY_MAX_CONNECTIONS
    access_log: bool = False
    topology_limit: int = DEFAULT_TOPOLOGY_LIMIT
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    rates: RateSettings = field(default_factory=RateSettings)
    # off | prefer | require: see edge_router.upstream.proof.
    tunnel_proof: str = PROOF_PREFER

    @classmethod
    def build(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> RouterConfig:
        """Options win over variables, variables over defaults (see `ROUTER_OPTIONS`)."""
        values = ROUTER_OPTIONS.resolve(args, environ)
        config = cls(
            host=values["host"],
            port=values["port"],
            registry=RegistrySettings.from_values(values),
            dht=DHTSettings.from_values(values),
            dht_bootstrap=values["bootstrap"],
            coordinators=values["coordinators"],
            policy=tunnel_policy(values),
            admin_token=values["admin_token"],
            cache=CacheSettings(
                ttl=values["cache_ttl"], stale=values["cache_stale"], maxsize=values["cache_size"]
            ),
            trusted_proxies=_networks(values["trusted_proxies"]) or CLOUDFLARE_RANGES,
            origin_secret=values["origin_secret"],
            max_body=values["max_body"],
            daily_budget=values["daily_budget"],
            proxy_connect_timeout=values["proxy_connect_timeout"],
            proxy_read_timeout=values["proxy_read_timeout"],
            proxy_max_connections=values["proxy_max_connections"],
            access_log=values["access_log"],
            topology_limit=values["topology_limit"],
            drain_seconds=values["drain_seconds"],
            shutdown_timeout=values["shutdown_timeout"],
            rates=RateSettings(
                register=values["rate_register"],
                route=values["rate_route"],
                admin=values["rate_admin"],
                topology=values["rate_topology"],
            ),
            tunnel_proof=values["tunnel_proof"],
        )
        config.check()
        return config

    def check(self) -> None:
        """Refuse settings that cannot work, naming them."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not 0..65535")
        if self.cache.ttl <= 0 or self.cache.stale < 0 or self.cache.maxsize < 1:
            raise ConfigError("cache ttl must be > 0, stale >= 0, size >= 1")
        if self.topology_limit < 1:
            raise ConfigError("RMA_TOPOLOGY_LIMIT must be at least 1")
        if self.drain_seconds < 0 or self.shutdown_timeout <= 0:
            raise ConfigError("RMA_DRAIN_SECONDS must be >= 0 and RMA_SHUTDOWN_TIMEOUT > 0")
        if self.max_body < 1024:
            raise ConfigError("RMA_MAX_BODY must be at least 1024 bytes")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ConfigError("RMA_ADMIN_TOKEN must be at least 16 characters")
        if self.origin_secret is not None and len(self.origin_secret) < 16:
            raise ConfigError("RMA_ORIGIN_SECRET must be at least 16 characters")
        if self.proxy_connect_timeout <= 0 or self.proxy_read_timeout <= 0:
            raise ConfigError("RMA_PROXY_CONNECT_TIMEOUT and RMA_PROXY_READ_TIMEOUT must be > 0")
        if self.proxy_max_connections < 1:
            raise ConfigError("RMA_PROXY_MAX_CONNECTIONS must be at least 1")
        self.rates.check()
        if self.tunnel_proof not in PROOF_MODES:
            raise ConfigError(f"RMA_TUNNEL_PROOF must be one of {', '.join(PROOF_MODES)}")


def _networks(items: tuple[str, ...]) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in items)
    except ValueError as exc:
        raise ConfigError(f"RMA_TRUSTED_PROXIES: {exc}") from None
