"""The bridge: a coordinator's DHT node kept in sync with the Redis registry through
partitions of either side.

- `bridge`       `Bridge`: the supervisor. Owns the task group that runs the parts' rounds,
                 hooks the node's storage, and exposes the figures and the test hooks.
- `state`        `BridgeSettings`, and `BridgeState`: what the parts share (the records each
                 side holds or is owed, whether each side answers, the events that wake rounds).
- `redis_side`   writes into Redis or the journal, Redis health and replay, the change events
                 of records registered through the router, the holds of self-preservation.
- `dht_side`     the node's storage hook, DHT health and rejoins, publishing into the DHT.
- `sync`         the anti-entropy pass: both sides read in full, each one's newer records
                 written to the other.
- `journal`      records learned while Redis is down, appended to disk and replayed later.
- `preservation` self-preservation: hold leases when the DHT side loses too many at once.
- `metrics`      the bridge's counters, and the small HTTP server for /metrics and /healthz.
"""

from __future__ import annotations

from dht_bridge.bridge.bridge import Bridge
from dht_bridge.bridge.dht_side import DHTSide
from dht_bridge.bridge.journal import Journal, JournalEntry, Replay
from dht_bridge.bridge.metrics import BridgeCounters, MetricsServer
from dht_bridge.bridge.preservation import SelfPreservation
from dht_bridge.bridge.redis_side import RedisSide
from dht_bridge.bridge.state import BRIDGE_ORIGIN, BridgeSettings, BridgeState
from dht_bridge.bridge.sync import SyncPass

__all__ = [
    "BRIDGE_ORIGIN",
    "Bridge",
    "BridgeCounters",
    "BridgeSettings",
    "BridgeState",
    "DHTSide",
    "Journal",
    "JournalEntry",
    "MetricsServer",
    "RedisSide",
    "Replay",
    "SelfPreservation",
    "SyncPass",
]
