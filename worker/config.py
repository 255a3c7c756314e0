"""The worker's configuration: one frozen object, built once from options and `RMA_*` variables."""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from dht_bridge.backoff import ExponentialBackoff
from dht_bridge.dht.mode import DHTMode
from dht_bridge.errors import ConfigError, RecordError
from dht_bridge.identity import Identity
from dht_bridge.options import Option, OptionTable, parse_hostport
from dht_bridge.paths import STATE_DIR_TEXT, state_dir
from dht_bridge.records import (
    HOST_RE,
    MAX_LEASE,
    REGION_RE,
    SERVICE_RE,
    CapabilityValue,
    sign_record,
)
from dht_bridge.settings import DHT_OPTIONS, TUNNEL_OPTIONS, DHTSettings, tunnel_policy
from dht_bridge.tunnels import TunnelPolicy

DEFAULT_HEARTBEAT = 30.0
DEFAULT_TTL = 90.0
DEFAULT_JITTER = 0.1
DEFAULT_DISCOVERY_DEADLINE = 0.3
# Off the DHT every heartbeat is an edge request: a longer lease and a slower pace keep that
# path to a few hundred requests a day per worker, and it only lasts until the DHT is back.
DEFAULT_FALLBACK_HEARTBEAT = 180.0
DEFAULT_FALLBACK_TTL = 300.0
DEFAULT_RETRY_BASE = 5.0
DEFAULT_RETRY_CAP = 300.0
DEFAULT_LEAVE_TIMEOUT = 3.0
DEFAULT_EDGE_TIMEOUT = 10.0
DEFAULT_SAVED_PEERS = 16
# A worker must reach remote peers: bind every interface unless told otherwise (the core's
# 127.0.0.1 default suits nodes on one host, not volunteers).
DEFAULT_DHT_HOST = "0.0.0.0"
# Heartbeats re-store to the holders found last for this long, then ask two of them whom they
# know near the key. Chosen when each expiry meant a crawl: the core's 60 s meant one every
# other heartbeat, three quarters of a worker's DHT bytes (bench/worker_bench.py: 1.06 KB/s
# per worker at 60 s, 0.42 KB/s at 300 s). Holders that vanish are noticed at once (a missed
# STORE re-crawls), and newcomers closer to a key are handed its values by its holders.
DEFAULT_WORKER_HOLDER_CACHE_TTL = 300.0


def worker_dht_settings() -> DHTSettings:
    """The core's DHT settings with the worker's own bind address and holder cache."""
    return DHTSettings(host=DEFAULT_DHT_HOST, holder_cache_ttl=DEFAULT_WORKER_HOLDER_CACHE_TTL)


ADVERTISE_AUTO = "auto"
ADVERTISE_NONE = "none"
# DHT mode: auto lets the reachability check decide (starting as a client, as libp2p does:
# nobody is handed an address before it is known to answer); server and client force it.
MODE_AUTO, MODE_SERVER, MODE_CLIENT = "auto", DHTMode.SERVER, DHTMode.CLIENT
DHT_MODES = (MODE_AUTO, MODE_SERVER, MODE_CLIENT)
# How often an auto-mode worker asks again whether it is reachable: a laptop changes networks,
# a router's port forwarding is switched on. Every check costs each asked server one probe.
DEFAULT_REACH_INTERVAL = 300.0


def default_state_file(environ: Mapping[str, str]) -> Path:
    """`worker.json` in the state directory (see `dht_bridge.paths.state_dir`)."""
    return state_dir(environ) / "worker.json"


WORKER_OPTIONS = OptionTable(
    Option(
        "service",
        "SERVICES",
        "a service this worker offers, [a-z0-9-]{1,32}; repeatable (required)",
        "list",
        (),
    ),
    Option(
        "tunnel_url",
        "TUNNEL_URL",
        "this worker's Cloudflare Tunnel URL (required, unless --cloudflared gets one)",
        default="",
        metavar="URL",
    ),
    Option(
        "cloudflared",
        "CLOUDFLARED",
        "start a quick tunnel (cloudflared tunnel --url SERVICE_URL) and publish the URL it "
        "gets; restarted and republished when it dies",
        "bool",
        False,
    ),
    Option(
        "service_url",
        "SERVICE_URL",
        "where this worker's own service listens, for --cloudflared",
        default="",
        metavar="URL",
    ),
    Option(
        "cloudflared_bin",
        "CLOUDFLARED_BIN",
        "the cloudflared program",
        default="cloudflared",
        metavar="PATH",
    ),
    Option(
        "edge",
        "EDGE_URL",
        "the edge router's base URL: bootstrap peers, and the fallback when the DHT is out "
        "of reach",
        metavar="URL",
    ),
    Option("region", "REGION", "region label, [a-z0-9-]{0,32}", default=""),
    Option(
        "capability",
        "CAPABILITIES",
        "a capability; repeatable; numbers and true/false are typed",
        "list",
        (),
        metavar="KEY=VALUE",
    ),
    Option(
        "key_file",
        "KEY_FILE",
        "the Ed25519 key, created (0600) only if absent",
        shown="the one the state file names, else beside it",
        metavar="PATH",
    ),
    Option(
        "state_file",
        "STATE_FILE",
        "JSON state (key path, seq, peers); one per worker: a second worker needs its own",
        shown=f"worker.json in {STATE_DIR_TEXT}",
        metavar="PATH",
    ),
    Option(
        "dht_advertise",
        "DHT_ADVERTISE",
        "the DHT address the record hands out in server mode (auto: the address servers see "
        "us at); none: always client mode",
        default=ADVERTISE_AUTO,
        metavar="auto|none|HOST[:PORT]",
    ),
    Option(
        "dht_mode",
        "DHT_MODE",
        "server: a DHT node others contact; client: behind NAT, looks up and publishes "
        "through servers only; auto: a reachability check decides, again every "
        "--reach-interval",
        default=MODE_AUTO,
        choices=DHT_MODES,
    ),
    Option(
        "reach_interval",
        "DHT_REACH_INTERVAL",
        "seconds between reachability checks in auto mode",
        "float",
        DEFAULT_REACH_INTERVAL,
    ),
    Option("heartbeat", "HEARTBEAT", "seconds between heartbeats", "float", DEFAULT_HEARTBEAT),
    Option(
        "ttl",
        "TTL",
        "record lease, seconds: at least 1.5 heartbeats, jitter included",
        "float",
        DEFAULT_TTL,
    ),
    Option("load", "LOAD", "fixed load 0..1, when there is no --load-url", "float", 0.0),
    Option(
        "load_url",
        "LOAD_URL",
        'our own service\'s URL answering {"load": x} or {"in_flight": n}; while it does '
        "not answer, the load is 1 (full)",
        metavar="URL",
    ),
    Option("capacity", "CAPACITY", "in-flight requests that mean full load", "int", 1),
    Option(
        "edge_only",
        "EDGE_ONLY",
        "never use the DHT: register and heartbeat through the edge",
        "bool",
        False,
    ),
    DHT_OPTIONS.replacing(
        DHT_OPTIONS["dht_host"].with_default(DEFAULT_DHT_HOST),
        DHT_OPTIONS["bootstrap"].with_help("a DHT peer to try before asking the edge; repeatable"),
    ),
    TUNNEL_OPTIONS,
)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker agent needs; see `configure` for the options and variables."""

    services: tuple[str, ...]
    tunnel_url: str
    state_file: Path
    edge_url: str | None = None
    key_file: Path | None = None  # None: the one the state file names, else beside it
    region: str = ""
    capabilities: Mapping[str, CapabilityValue] = field(default_factory=dict)
    dht: DHTSettings = field(default_factory=worker_dht_settings)
    advertise: str = ADVERTISE_AUTO
    dht_mode: str = MODE_AUTO
    reach_interval: float = DEFAULT_REACH_INTERVAL
    bootstrap: tuple[tuple[str, int], ...] = ()
    policy: TunnelPolicy = field(default_factory=TunnelPolicy)
    heartbeat: float = DEFAULT_HEARTBEAT
    ttl: float = DEFAULT_TTL
    jitter: float = DEFAULT_JITTER
    discovery_deadline: float = DEFAULT_DISCOVERY_DEADLINE
    fallback_heartbeat: float = DEFAULT_FALLBACK_HEARTBEAT
    fallback_ttl: float = DEFAULT_FALLBACK_TTL
    retry: ExponentialBackoff = field(default_factory=ExponentialBackoff)
    leave_timeout: float = DEFAULT_LEAVE_TIMEOUT
    edge_timeout: float = DEFAULT_EDGE_TIMEOUT
    load: float = 0.0
    load_url: str | None = None
    capacity: int = 1
    edge_only: bool = False
    saved_peers: int = DEFAULT_SAVED_PEERS
    cloudflared: bool = False
    service_url: str = ""
    cloudflared_bin: str = "cloudflared"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse settings that cannot work, naming them."""
        if not self.services:
            raise ConfigError("at least one --service (RMA_SERVICES) is required")
        for name in self.services:
            check_service(name)
        if self.cloudflared:
            parts = urlsplit(self.service_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(
                    "--cloudflared needs --service-url (RMA_SERVICE_URL), the http(s) URL "
                    "of this worker's own service"
                )
            if self.tunnel_url:
                raise ConfigError("--cloudflared gets the tunnel URL: not with --tunnel-url")
        else:
            try:
                self.policy.check(self.tunnel_url)
            except RecordError as exc:
                raise ConfigError(f"--tunnel-url (RMA_TUNNEL_URL): {exc}") from None
        if not REGION_RE.fullmatch(self.region):
            raise ConfigError(f"region {self.region!r} does not match [a-z0-9-]{{0,32}}")
        if self.edge_url is not None and not self.edge_url.startswith(("http://", "https://")):
            raise ConfigError(f"--edge (RMA_EDGE_URL) {self.edge_url!r} is not an http(s) URL")
        if self.edge_only and self.edge_url is None:
            raise ConfigError("--edge-only needs --edge (RMA_EDGE_URL)")
        _lease("heartbeat", self.heartbeat, self.ttl, self.jitter)
        _lease("fallback heartbeat", self.fallback_heartbeat, self.fallback_ttl, self.jitter)
        if not 0 <= self.jitter < 0.5:
            raise ConfigError("heartbeat jitter must be from 0 to 0.5")
        if self.dht_mode not in DHT_MODES:
            raise ConfigError(f"--dht-mode (RMA_DHT_MODE) must be one of {', '.join(DHT_MODES)}")
        if self.advertise not in (ADVERTISE_AUTO, ADVERTISE_NONE):
            advertised_address(self.advertise)
        if self.dht_mode == MODE_SERVER and self.advertise == ADVERTISE_NONE:
            raise ConfigError(
                "--dht-mode server hands out an address: not with --dht-advertise none"
            )
        for name in ("discovery_deadline", "leave_timeout", "edge_timeout", "reach_interval"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if not (math.isfinite(self.load) and 0 <= self.load <= 1):
            raise ConfigError("load must be from 0.0 to 1.0")
        if self.capacity < 1 or self.saved_peers < 1:
            raise ConfigError("capacity and saved peers must be >= 1")
        # Whatever a record refuses (capability shapes, overall size) fails here, at start;
        # a quick tunnel's URL is known later, so a long one stands in for it.
        trial_url = self.tunnel_url or "https://" + "x" * 40 + ".trycloudflare.com"
        try:
            sign_record(
                Identity.generate(),
                tunnel_url=trial_url,
                services=self.services,
                seq=1,
                now=time.time(),
                capabilities=self.capabilities,
                region=self.region,
            )
        except RecordError as exc:
            raise ConfigError(f"the worker record would be refused: {exc}") from None

    @property
    def advertises(self) -> bool:
        """False when always in client mode: the record's dht_host/dht_port stay empty."""
        return self.mode != MODE_CLIENT

    @property
    def mode(self) -> str:
        """The DHT mode asked for; `--dht-advertise none` (the older spelling) means client."""
        return MODE_CLIENT if self.advertise == ADVERTISE_NONE else self.dht_mode

    @classmethod
    def build(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> WorkerConfig:
        """Options win over variables, variables over defaults (see `WORKER_OPTIONS`)."""
        environ = os.environ if environ is None else environ
        values = WORKER_OPTIONS.resolve(args, environ)
        dht = replace(
            worker_dht_settings(),
            host=values["dht_host"],
            port=values["dht_port"],
            rpc_timeout=values["dht_rpc_timeout"],
        )
        key_file = values["key_file"]
        try:
            return cls(
                services=tuple(dict.fromkeys(values["service"])),
                tunnel_url=values["tunnel_url"],
                state_file=Path(values["state_file"] or default_state_file(environ)),
                edge_url=values["edge"],
                key_file=Path(key_file) if key_file else None,
                region=values["region"],
                capabilities=parse_capabilities(values["capability"]),
                dht=dht,
                advertise=values["dht_advertise"],
                dht_mode=values["dht_mode"],
                reach_interval=values["reach_interval"],
                bootstrap=values["bootstrap"],
                policy=tunnel_policy(values),
                heartbeat=values["heartbeat"],
                ttl=values["ttl"],
                load=values["load"],
                load_url=values["load_url"],
                capacity=values["capacity"],
                edge_only=values["edge_only"],
                cloudflared=values["cloudflared"],
                service_url=values["service_url"],
                cloudflared_bin=values["cloudflared_bin"],
                retry=ExponentialBackoff(base=DEFAULT_RETRY_BASE, cap=DEFAULT_RETRY_CAP),
            )
        except ValueError as exc:  # DHTSettings
            raise ConfigError(str(exc)) from None


def check_service(name: str) -> None:
    """ConfigError unless `name` is a service name a record can carry."""
    if not SERVICE_RE.fullmatch(name):
        raise ConfigError(f"service {name!r} does not match [a-z0-9-]{{1,32}}")


def advertised_address(text: str) -> tuple[str, int]:
    """`--dht-advertise HOST[:PORT]` as host and port (0: none given). A colon means
    HOST:PORT, an IPv6 address in brackets; ConfigError when no record could carry it."""
    host, port = text, 0
    if text.count(":") > 1 and not text.startswith("["):
        host = ""  # a bare IPv6 address: its last group would be read as the port
    elif ":" in text:
        try:
            host, port = parse_hostport(text)
        except ValueError:
            host = ""
    if not host or not HOST_RE.fullmatch(host):
        raise ConfigError(
            f"--dht-advertise (RMA_DHT_ADVERTISE) {text!r}: must be auto, none, HOST or "
            "HOST:PORT with a port from 1 to 65535 ([v6]:PORT for IPv6)"
        )
    return host, port


def _lease(name: str, interval: float, ttl: float, jitter: float) -> None:
    if not 0 < ttl <= MAX_LEASE:
        raise ConfigError(f"{name}: lease must be > 0 and at most {MAX_LEASE:.0f} s")
    # The latest a jittered heartbeat can come must still leave a third of the lease.
    if not 0 < interval * (1 + jitter) <= ttl * 2 / 3:
        raise ConfigError(
            f"{name} every {interval:g} s (jitter {jitter:g}) does not renew a {ttl:g} s lease "
            "in time: the interval, jitter included, must be at most two thirds of the lease"
        )


def parse_capabilities(items: Sequence[str]) -> dict[str, CapabilityValue]:
    """`key=value` items; values that read as a bool or a number become one."""
    out: dict[str, CapabilityValue] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"capability {item!r} is not key=value")
        out[key.strip()] = _scalar(text.strip())
    return out


def _scalar(text: str) -> CapabilityValue:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text
