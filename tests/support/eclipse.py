"""An eclipse for tests: fake nodes minted next to some keys, one socket (one address) each,
that swallow every STORE and answer every read with each other, never with a value."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.values import key_digest
from tests.support.helpers import wait_for
from tests.support.raw_peer import RawPeer, open_raw_peer

__all__ = ["FAKES_PER_KEY", "Eclipse", "eclipse_around", "introduce_ids"]

Address = tuple[str, int]
FAKES_PER_KEY = 12


class Eclipse:
    """The fakes: PING answered with the fake's id, FIND_NODE / FIND_VALUE with every fake
    (never a value), STORE and RENEW with ok. `stores` counts what they swallowed."""

    def __init__(self) -> None:
        self.contacts: list[tuple[bytes, str, int]] = []
        self.peers: list[RawPeer] = []
        self.stores = 0

    def answerer(self, node_id: bytes) -> Any:
        """The answers of the fake `node_id`."""

        def answer(_sender: Address, name: str, _args: list[Any]) -> Any:
            if name == "ping":
                return node_id
            if name in ("find_node", "find_value"):
                return self.contacts[:20]
            if name in ("store", "renew"):
                self.stores += 1
                return "ok"
            return None

        return answer

    async def introduce(self, nodes: list[DHTNode]) -> None:
        """Each fake pings each node (and answers its check), until every table holds some."""
        ids = {fake[0] for fake in self.contacts}
        for node in nodes:
            for peer, (fake_id, _, _) in zip(self.peers, self.contacts, strict=True):
                peer.request(node.address, "ping", fake_id)
        await wait_for(
            lambda: all(sum(c.id in ids for c in n.rpc.router.contacts()) >= 4 for n in nodes),
            timeout=10,
            message="the fakes to be admitted",
        )


@contextlib.asynccontextmanager
async def eclipse_around(keys: list[str], per_key: int = FAKES_PER_KEY) -> AsyncIterator[Eclipse]:
    """`per_key` fakes next to each key name, each on a socket of its own, closed on exit."""
    eclipse = Eclipse()
    transports: list[asyncio.DatagramTransport] = []
    try:
        for key in keys:
            digest = key_digest(key)
            for _ in range(per_key):
                fake_id = digest[:16] + os.urandom(4)
                transport, peer = await open_raw_peer(eclipse.answerer(fake_id))
                transports.append(transport)
                eclipse.peers.append(peer)
                eclipse.contacts.append((fake_id, *peer.address))
        yield eclipse
    finally:
        for transport in transports:
            transport.close()


async def introduce_ids(
    peer: RawPeer, last_id: dict[Address, bytes], nodes: list[DHTNode], ids: list[bytes]
) -> None:
    """Each id to one node by a PING and a FIND_NODE from `peer`, every node's share in turn;
    `last_id` tells the peer's PING answers which id to claim to that node (each answer is
    awaited before the next id, so the node's check meets the id it tests)."""

    async def against(node: DHTNode, mine: list[bytes]) -> None:
        for fake in mine:
            last_id[node.address] = fake
            with contextlib.suppress(TimeoutError):
                await peer.ask(node.address, "ping", fake, timeout=1.0)
                await peer.ask(node.address, "find_node", fake, os.urandom(20), timeout=1.0)

    await asyncio.gather(*(against(n, ids[i :: len(nodes)]) for i, n in enumerate(nodes)))
