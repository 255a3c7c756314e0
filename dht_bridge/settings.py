"""Typed, frozen settings for the core, read once from options and `RMA_*` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from dht_bridge.errors import ConfigError
from dht_bridge.tunnels import DEFAULT_ALLOWED_HOSTS, TunnelPolicy

ENV_PREFIX = "RMA_"

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


class Env:
    """Typed access to `RMA_*` variables from a mapping that tests can replace."""

    def __init__(self, environ: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX) -> None:
        self._environ = os.environ if environ is None else environ
        self._prefix = prefix

    def raw(self, name: str) -> str | None:
        """The variable's text, or None when it is unset or empty."""
        value = self._environ.get(self._prefix + name)
        return value if value not in (None, "") else None

    def get_str(self, name: str, default: str) -> str:
        """A text setting."""
        value = self.raw(name)
        return default if value is None else value

    def get_int(self, name: str, default: int) -> int:
        """An integer setting; ConfigError names the variable when it is not one."""
        value = self.raw(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{self._prefix}{name}={value!r} is not an integer") from None

    def get_float(self, name: str, default: float) -> float:
        """A number setting."""
        value = self.raw(name)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{self._prefix}{name}={value!r} is not a number") from None

    def get_bool(self, name: str, default: bool) -> bool:
        """A flag: 1/true/yes/on or 0/false/no/off."""
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{self._prefix}{name}={value!r} is not a boolean")

    def get_list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A comma-separated list."""
        value = self.raw(name)
        if value is None:
            return default
        return tuple(item.strip() for item in value.split(",") if item.strip())


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
    def from_env(cls, env: Env) -> DHTSettings:
        """Read `RMA_DHT_*` variables."""
        return cls(
            host=env.get_str("DHT_HOST", cls.host),
            port=env.get_int("DHT_PORT", cls.port),
            ksize=env.get_int("DHT_KSIZE", cls.ksize),
            alpha=env.get_int("DHT_ALPHA", cls.alpha),
            rpc_timeout=env.get_float("DHT_RPC_TIMEOUT", cls.rpc_timeout),
            stall=env.get_float("DHT_STALL", cls.stall),
            stall_floor=env.get_float("DHT_STALL_FLOOR", cls.stall_floor),
            max_failures=env.get_int("DHT_MAX_FAILURES", cls.max_failures),
            replicas=env.get_int("DHT_REPLICAS", cls.replicas),
            refresh_interval=env.get_float("DHT_REFRESH_INTERVAL", cls.refresh_interval),
            holder_cache_ttl=env.get_float("DHT_HOLDER_CACHE_TTL", cls.holder_cache_ttl),
        )


@dataclass(frozen=True)
class RegistrySettings:
    """Where the Redis registry lives; no URL means the embedded, non-durable fakeredis."""

    redis_url: str | None = None
    timeout: float = DEFAULT_REDIS_TIMEOUT
    # A redis:// URL names a Cluster seed rather than one server (redis+cluster:// says so too).
    cluster: bool = False

    @classmethod
    def from_env(cls, env: Env) -> RegistrySettings:
        """Read `RMA_REDIS_URL`, `RMA_REDIS_TIMEOUT` and `RMA_REDIS_CLUSTER`."""
        return cls(
            redis_url=env.raw("REDIS_URL"),
            timeout=env.get_float("REDIS_TIMEOUT", cls.timeout),
            cluster=env.get_bool("REDIS_CLUSTER", cls.cluster),
        )


def tunnel_policy_from_env(env: Env) -> TunnelPolicy:
    """`RMA_TUNNEL_ALLOWED_HOSTS` (comma list) and `RMA_TUNNEL_ALLOW_LOOPBACK` (demo/tests only)."""
    return TunnelPolicy(
        allowed_hosts=env.get_list("TUNNEL_ALLOWED_HOSTS", DEFAULT_ALLOWED_HOSTS),
        allow_loopback=env.get_bool("TUNNEL_ALLOW_LOOPBACK", False),
    )


def parse_hostport(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` to a tuple; ValueError names the bad input."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)
