"""The core of RMA discovery: signed records, the Kademlia node, the Redis registry, the bridge.
Layered bottom-up; each imports only what is above it in this list:

- `errors`    `RMAError` and the project's one exception tree below it.
- `version`, `paths`, `logcontext`, `exposition`  the version, default state paths, log
              fields of the current task, Prometheus exposition of figures.
- `jsontext`  JSON from elsewhere, read with its nesting bounded.
- `closing`   waiting for a closed transport's socket to be closed for real.
- `httpwire`  hop-by-hop header names and capped body reads, for the router's and the
              worker's proxies.
- `options`   options declared once (flag, `RMA_*` variable, type, default, help).
- `backoff`   retry delays: exponential with jitter, or none (for tests).
- `identity`  Ed25519 keys and the worker id derived from them.
- `tunnels`   which tunnel URLs a record may name, in one canonical form.
- `records`   `WorkerRecord`: signing (RFC 8785), validation, the merge rule.
- `tunnel_proof`  the challenge a tunnel URL answers to prove whose it is.
- `settings`  `DHTSettings`, `RegistrySettings` and their option tables.
- `dht/`      the Kademlia node built on the `kademlia` library (`DHTNode`).
- `registry/` the Redis registry the edge reads (`Registry`, `open_registry`).
- `bridge/`   the bridge that keeps Redis and the DHT in sync through partitions (`Bridge`).
- `netem/`    an emulated internet (regions, latency, loss, NAT) for tests and benches only.
"""

from __future__ import annotations

from dht_bridge.errors import (
    BootstrapError,
    ConfigError,
    DHTError,
    IdentityError,
    PublishError,
    RecordError,
    RegistryError,
    RegistryUnavailable,
    RMAError,
)
from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord, sign_record
from dht_bridge.settings import DHTSettings, RegistrySettings
from dht_bridge.tunnels import TunnelPolicy
from dht_bridge.version import __version__

__all__ = [
    "BootstrapError",
    "ConfigError",
    "DHTError",
    "DHTSettings",
    "Identity",
    "IdentityError",
    "PublishError",
    "RMAError",
    "RecordError",
    "RegistryError",
    "RegistrySettings",
    "RegistryUnavailable",
    "TunnelPolicy",
    "WorkerRecord",
    "__version__",
    "sign_record",
]
