"""A DHT node's mode, as libp2p's kad-dht has them (see `protocol` for what each means)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["DHTMode"]


class DHTMode(StrEnum):
    """Server: reachable, answers requests, sits in routing tables.
    Client: behind NAT, asks only."""

    SERVER = "server"
    CLIENT = "client"
