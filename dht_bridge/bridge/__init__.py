"""The bridge: a coordinator's DHT node kept in sync with the Redis registry through
partitions of either side.

- `journal`      records learned while Redis is down, appended to disk and replayed later.
- `metrics`      the bridge's counters, and the small HTTP server for /metrics and /healthz.
- `preservation` self-preservation: hold leases when the DHT side loses too many at once.
- `bridge`       `Bridge`: the rounds (Redis health, DHT health, sync, publish) that use them.
"""

from __future__ import annotations

from dht_bridge.bridge.bridge import BRIDGE_ORIGIN, Bridge, BridgeSettings
from dht_bridge.bridge.journal import Journal, JournalEntry, Replay
from dht_bridge.bridge.metrics import BridgeCounters, MetricsServer
from dht_bridge.bridge.preservation import SelfPreservation

__all__ = [
    "BRIDGE_ORIGIN",
    "Bridge",
    "BridgeCounters",
    "BridgeSettings",
    "Journal",
    "JournalEntry",
    "MetricsServer",
    "Replay",
    "SelfPreservation",
]
