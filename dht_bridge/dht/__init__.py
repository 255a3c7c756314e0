"""The Kademlia DHT: the PyPI `kademlia` library, extended by subclassing, for signed worker
records. Layered bottom-up; each module imports only those above it in this list:

- `address`  which (ip, port) a contact may have; checked before anything is sent.
- `rtt`      round-trip estimates that set how long a lookup waits for a slow node.
- `admission` who may enter a routing table (per-IP and per-subnet limits) and which
             addresses have proved they receive (what bounds our answers to the others).
- `routing`  the routing table: buckets, failure counts, the k closest contacts.
- `shards`   where a service's providers are filed: a trie of shard keys that splits as it fills.
- `values`   the wire form of record sets (size-bounded) and the cached signature check.
- `renew`    short renewals of a record a holder already has, and who holds which copy.
- `storage`  what a node holds: merged record sets under leases, overflow marks.
- `reach`    reachability probes: is a node behind NAT (client mode) or a server?
- `protocol` the RPCs on the wire, safe parsing, timeouts, replication to newcomers.
- `crawl`    iterative lookups: for the nodes closest to a key, or for its value.
- `host`     what the node's two halves below use of it (a Protocol, so they never import it).
- `publish`  `Publisher`, the node's writing half: shard levels, holders, renewals, proofs.
- `lookup`   `Reader`, the node's reading half: service lookups over the trie, record gets.
- `node`     `DHTNode`: join, crawl, publish, look up; the only class most callers need.
"""

from __future__ import annotations

from dht_bridge.dht.address import contact_address
from dht_bridge.dht.admission import DiversityLimits
from dht_bridge.dht.lookup import LookupReport
from dht_bridge.dht.mode import DHTMode
from dht_bridge.dht.node import CLIENT, SERVER, DHTNode, udp_endpoint
from dht_bridge.dht.protocol import RMAProtocol, TrafficStats
from dht_bridge.dht.publish import KeyPublish, PublishReport
from dht_bridge.dht.values import RecordVerifier, key_digest

__all__ = [
    "CLIENT",
    "SERVER",
    "DHTMode",
    "DHTNode",
    "DiversityLimits",
    "KeyPublish",
    "LookupReport",
    "PublishReport",
    "RMAProtocol",
    "RecordVerifier",
    "TrafficStats",
    "contact_address",
    "key_digest",
    "udp_endpoint",
]
