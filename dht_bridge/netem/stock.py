"""The stock `kademlia.network.Server` on an emulated host, for comparisons on equal terms.

The library's `listen` binds a real socket through `loop.create_datagram_endpoint`; this
subclass binds the same protocol on an emulated host instead and changes nothing else.
"""

from __future__ import annotations

from typing import Any

from kademlia.network import Server

from dht_bridge.netem.network import Address, Host

__all__ = ["StockServer"]


class StockServer(Server):  # type: ignore[misc]
    """`kademlia.network.Server` as it ships (k=20, alpha=3, 5 s RPC timeout), on `host`."""

    def __init__(self, host: Host, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host = host

    async def listen(self, port: int = 0, interface: str | None = None) -> None:
        """Bind on the emulated host (port 0: a free one), then refresh as the library does."""
        self.transport, self.protocol = await self.host.endpoint(
            self._create_protocol, (self.host.ip, port)
        )
        self.refresh_table()

    @property
    def address(self) -> Address:
        """The emulated (ip, port) this server is bound at."""
        sockname: Address = self.transport.get_extra_info("sockname")
        return sockname
