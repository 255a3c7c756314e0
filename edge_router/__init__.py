"""The edge router: a Starlette app in front of the registry and the DHT."""

from __future__ import annotations
