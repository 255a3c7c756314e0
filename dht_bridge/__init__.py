"""The core of RMA discovery: signed records, the Kademlia node, the Redis registry, the bridge."""

from __future__ import annotations

__version__ = "0.1.0"
