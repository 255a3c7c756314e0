"""Typed, frozen settings for the core, read once from options and `RMA_*` variables."""

from __future__ import annotations

from dataclasses import dataclass

from dht_bridge.errors import ConfigError
from dht_bridge.options import Option, OptionTable, Values
from dht_bridge.tunnels import DEFAULT_ALLOWED_HOSTS, TunnelPolicy

__all__ = [
    "DHT_OPTIONS",
    "REGISTRY_OPTIONS",
    "TUNNEL_OPTIONS",
    "DHTSettings",
    "RegistrySettings",
    "tunnel_policy",
]

DEFAULT_KSIZE = 20
DEFAULT_ALPHA = 3
DEFAULT_RPC_TIMEOUT = 0.5
# A request unanswered this long stops holding a lookup back (it may still answer).
DEFAULT_STALL = 0.1
DEFAULT_STALL_FLOOR = 0.02
DEFAULT_MAX_FAILURES = 3
DEFAULT_REPLICAS = 8
# A bucket nobody searched in for this long is refreshed by a crawl: the paper's hour, as the
# library has it. At 600 s refreshes were a third of a worker's DHT bytes, though every bucket
# a lookup or an answered FIND_NODE passes through counts as fresh.
DEFAULT_REFRESH_INTERVAL = 3600.0
# Shorter than the default 90 s lease, so a holder that joined since is found before a record
# pushed to it could lapse there.
DEFAULT_HOLDER_CACHE_TTL = 60.0
DEFAULT_REDIS_TIMEOUT = 1.0


@dataclass(frozen=True)
class DHTSettings:
    """How our Kademlia node behaves; the defaults suit loopback tests and real networks alike."""

    host: str = "127.0.0.1"
    port: int = 0
    ksize: int = DEFAULT_KSIZE
    alpha: int = DEFAULT_ALPHA
    rpc_timeout: float = DEFAULT_RPC_TIMEOUT
    stall: float = DEFAULT_STALL
    stall_floor: float = DEFAULT_STALL_FLOOR
    max_failures: int = DEFAULT_MAX_FAILURES
    replicas: int = DEFAULT_REPLICAS
    refresh_interval: float = DEFAULT_REFRESH_INTERVAL
    holder_cache_ttl: float = DEFAULT_HOLDER_CACHE_TTL

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"DHT port {self.port} is not 0..65535")
        if self.ksize < 2 or self.alpha < 1 or self.replicas < 1:
            raise ConfigError("ksize must be >= 2, alpha and replicas >= 1")
        if self.replicas > self.ksize:
            raise ConfigError(f"replicas ({self.replicas}) cannot exceed ksize ({self.ksize})")
        if self.rpc_timeout <= 0 or self.max_failures < 1:
            raise ConfigError("rpc_timeout must be > 0 and max_failures >= 1")
        if not 0 < self.stall <= self.rpc_timeout:
            raise ConfigError("stall must be > 0 and at most rpc_timeout")
        if not 0 < self.stall_floor <= self.stall:
            raise ConfigError("stall_floor must be > 0 and at most stall")

    @classmethod
    def from_values(cls, values: Values) -> DHTSettings:
        """The settings `DHT_OPTIONS` resolved to; the tuning internals keep their defaults."""
        rpc_timeout: float = values["dht_rpc_timeout"]
        # The stall rule is an internal: it follows a short RPC timeout down rather than
        # refusing one the operator set.
        stall = min(DEFAULT_STALL, rpc_timeout)
        return cls(
            host=values["dht_host"],
            port=values["dht_port"],
            rpc_timeout=rpc_timeout,
            stall=stall,
            stall_floor=min(DEFAULT_STALL_FLOOR, stall),
        )


@dataclass(frozen=True)
class RegistrySettings:
    """Where the Redis registry lives; no URL means the embedded, non-durable fakeredis."""

    redis_url: str | None = None
    timeout: float = DEFAULT_REDIS_TIMEOUT
    # A redis:// URL names a Cluster seed rather than one server (redis+cluster:// says so too).
    cluster: bool = False

    @classmethod
    def from_values(cls, values: Values) -> RegistrySettings:
        """The settings `REGISTRY_OPTIONS` resolved to; ConfigError for a timeout of 0 or less
        (redis-py would read it as no wait at all, and every command would fail)."""
        if values["redis_timeout"] <= 0:
            raise ConfigError(f"RMA_REDIS_TIMEOUT must be > 0, not {values['redis_timeout']}")
        return cls(
            redis_url=values["redis_url"],
            timeout=values["redis_timeout"],
            cluster=values["redis_cluster"],
        )


def tunnel_policy(values: Values) -> TunnelPolicy:
    """The policy `TUNNEL_OPTIONS` resolved to; it must be the same on every process."""
    return TunnelPolicy(
        allowed_hosts=values["tunnel_allowed_hosts"],
        allow_loopback=values["tunnel_allow_loopback"],
    )


DHT_OPTIONS = OptionTable(
    Option("dht_host", "DHT_HOST", "UDP address of the DHT node", default="127.0.0.1"),
    Option("dht_port", "DHT_PORT", "UDP port of the DHT node, 0 for any free one", "int", 0),
    Option(
        "bootstrap",
        "BOOTSTRAP",
        "a DHT peer to join through; repeatable, comma-separated in the variable; host "
        "names allowed, [v6]:port for IPv6",
        "peers",
        (),
    ),
    Option(
        "dht_rpc_timeout",
        "DHT_RPC_TIMEOUT",
        "seconds before a DHT request counts as missed; raise it on links with round trips near it",
        "float",
        DEFAULT_RPC_TIMEOUT,
    ),
)

REGISTRY_OPTIONS = OptionTable(
    Option(
        "redis_url",
        "REDIS_URL",
        "the registry: redis://, rediss://, unix://, redis+sentinel://, redis+cluster://; "
        "none: the embedded, non-durable in-process registry",
    ),
    Option(
        "redis_timeout",
        "REDIS_TIMEOUT",
        "seconds before Redis counts as unavailable",
        "float",
        DEFAULT_REDIS_TIMEOUT,
    ),
    Option(
        "redis_cluster",
        "REDIS_CLUSTER",
        "a redis:// or rediss:// URL names a Cluster seed rather than one server",
        "bool",
        False,
    ),
)

TUNNEL_OPTIONS = OptionTable(
    Option(
        "tunnel_allowed_hosts",
        "TUNNEL_ALLOWED_HOSTS",
        "tunnel hosts records may name (*.domain: any subdomain); the same on every process",
        "list",
        DEFAULT_ALLOWED_HOSTS,
        metavar="PATTERN",
    ),
    Option(
        "tunnel_allow_loopback",
        "TUNNEL_ALLOW_LOOPBACK",
        "admit http://127.0.0.1 tunnel URLs: demo and tests only, and then on every process",
        "bool",
        False,
    ),
)
