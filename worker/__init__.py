"""The worker agent: identity, join, heartbeat over the DHT, discovery with fallback."""

from __future__ import annotations
