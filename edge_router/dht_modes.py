"""Which workers are DHT servers and which are clients, as their records tell.

A worker in server mode hands out its DHT address in its record; one in client mode (behind
NAT, reachable only through its tunnel) leaves `dht_host`/`dht_port` empty.
"""

from __future__ import annotations

from collections.abc import Iterable

from dht_bridge.dht.mode import DHTMode
from dht_bridge.records import WorkerRecord


def mode_of(record: WorkerRecord) -> DHTMode:
    """ "server" when the record hands out a DHT address, else "client"."""
    return DHTMode.SERVER if record.dht_host and record.dht_port else DHTMode.CLIENT


def mode_counts(records: Iterable[WorkerRecord], now: float) -> dict[str, int]:
    """Live, unexpired workers per mode: `{"dht_servers": n, "dht_clients": m}`."""
    counts = {DHTMode.SERVER: 0, DHTMode.CLIENT: 0}
    for record in records:
        if record.live and not record.is_expired(now):
            counts[mode_of(record)] += 1
    return {"dht_servers": counts[DHTMode.SERVER], "dht_clients": counts[DHTMode.CLIENT]}
