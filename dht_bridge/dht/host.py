"""What a node's two halves (`publish.Publisher`, `lookup.Reader`) use of the node: its wire,
its own id and mode, and its crawls. `DHTNode` provides it; the halves never import the node."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from kademlia.node import Node

from dht_bridge.dht.crawl import CrawlResult
from dht_bridge.dht.mode import DHTMode
from dht_bridge.dht.protocol import RMAProtocol

__all__ = ["NodeHost"]


class NodeHost(Protocol):
    """A listening Kademlia node that crawls on its halves' behalf."""

    node: Node
    coordinators: tuple[tuple[str, int], ...]
    transport: asyncio.DatagramTransport | None

    @property
    def rpc(self) -> RMAProtocol:
        """The node's protocol (raises NotListening before `listen`)."""

    @property
    def mode(self) -> DHTMode:
        """Server or client mode: a client keeps no copies of what it publishes."""

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the node is bound to."""

    async def crawl(
        self,
        target: bytes,
        *,
        purpose: str,
        width: int | None = None,
        find_value: bool = False,
        want_values: int = 1,
        settle: float = 0.0,
        accept: Callable[[bytes], bool] | None = None,
        paths: int = 1,
        partial_ok: bool = False,
    ) -> CrawlResult:
        """An iterative lookup of `target` from the node's own contacts (see `DHTNode.crawl`)."""

    def count_crawl(self, purpose: str, queried: int) -> None:
        """Add `queried` contacts to the crawls made for `purpose`."""
