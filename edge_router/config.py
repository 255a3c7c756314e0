"""The router's configuration: one frozen object, built once from options and `RMA_*` variables."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from dht_bridge.errors import ConfigError
from dht_bridge.settings import (
    DHTSettings,
    Env,
    RegistrySettings,
    parse_hostport,
    tunnel_policy_from_env,
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


@dataclass(frozen=True)
class CacheSettings:
    """The hot-lookup cache: fresh for `ttl` seconds, then kept `stale` more for bad days."""

    ttl: float = DEFAULT_CACHE_TTL
    stale: float = DEFAULT_CACHE_STALE
    maxsize: int = DEFAULT_CACHE_SIZE
    # The CDN may serve a stale copy this long while it revalidates in the background.
    stale_while_revalidate: float = 30.0


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
    proxy_connect_timeout: float = 3.0
    proxy_read_timeout: float = 60.0
    topology_limit: int = DEFAULT_TOPOLOGY_LIMIT

    @classmethod
    def build(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> RouterConfig:
        """Options win over variables, variables over defaults."""
        env = Env(environ)
        config = cls(
            host=env.get_str("HOST", cls.host),
            port=env.get_int("PORT", cls.port),
            registry=RegistrySettings.from_env(env),
            dht=DHTSettings.from_env(env),
            dht_bootstrap=_peers(env.get_list("BOOTSTRAP", ()), "RMA_BOOTSTRAP"),
            coordinators=_peers(env.get_list("COORDINATORS", ()), "RMA_COORDINATORS"),
            policy=tunnel_policy_from_env(env),
            admin_token=env.raw("ADMIN_TOKEN"),
            cache=CacheSettings(
                ttl=env.get_float("CACHE_TTL", DEFAULT_CACHE_TTL),
                stale=env.get_float("CACHE_STALE", DEFAULT_CACHE_STALE),
                maxsize=env.get_int("CACHE_SIZE", DEFAULT_CACHE_SIZE),
            ),
            trusted_proxies=_networks(env.get_list("TRUSTED_PROXIES", ())) or CLOUDFLARE_RANGES,
            origin_secret=env.raw("ORIGIN_SECRET"),
            max_body=env.get_int("MAX_BODY", DEFAULT_MAX_BODY),
            daily_budget=env.get_int("DAILY_BUDGET", DEFAULT_DAILY_BUDGET),
            proxy_connect_timeout=env.get_float("PROXY_CONNECT_TIMEOUT", 3.0),
            proxy_read_timeout=env.get_float("PROXY_READ_TIMEOUT", 60.0),
            topology_limit=env.get_int("TOPOLOGY_LIMIT", DEFAULT_TOPOLOGY_LIMIT),
        )
        if args is not None:
            config = config.with_options(args)
        config.check()
        return config

    def with_options(self, args: argparse.Namespace) -> RouterConfig:
        """Apply command-line options that were given."""
        changes: dict[str, object] = {}
        for name in ("host", "port", "admin_token"):
            value = getattr(args, name, None)
            if value is not None:
                changes[name] = value
        if getattr(args, "redis_url", None):
            changes["registry"] = replace(self.registry, redis_url=args.redis_url)
        if getattr(args, "dht_port", None) is not None:
            changes["dht"] = replace(self.dht, port=args.dht_port)
        if getattr(args, "bootstrap", None):
            changes["dht_bootstrap"] = _peers(args.bootstrap, "--bootstrap")
        return replace(self, **changes)  # type: ignore[arg-type]

    def check(self) -> None:
        """Refuse settings that cannot work, naming them."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not 0..65535")
        if self.cache.ttl <= 0 or self.cache.stale < 0 or self.cache.maxsize < 1:
            raise ConfigError("cache ttl must be > 0, stale >= 0, size >= 1")
        if self.topology_limit < 1:
            raise ConfigError("RMA_TOPOLOGY_LIMIT must be at least 1")
        if self.max_body < 1024:
            raise ConfigError("RMA_MAX_BODY must be at least 1024 bytes")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ConfigError("RMA_ADMIN_TOKEN must be at least 16 characters")


def _peers(items: tuple[str, ...] | list[str], where: str) -> tuple[tuple[str, int], ...]:
    try:
        return tuple(parse_hostport(item) for item in items)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _networks(items: tuple[str, ...]) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in items)
    except ValueError as exc:
        raise ConfigError(f"RMA_TRUSTED_PROXIES: {exc}") from None
