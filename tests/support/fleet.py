"""Signed records of a large network for the topology page's tests and screenshots.

Deterministic: the same count gives the same services, regions, loads, DHT modes and leavers
(identities are fresh each time). One cell (ocr in eu-west) holds 30% of the network, so that at
2,000 workers it holds more than a cell can draw and the page aggregates it; the rest spread over
six regions and seven service sets.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord, tombstone_for
from dht_bridge.registry.registry import Registry
from tests.support.helpers import make_record

__all__ = ["BIG_CELL", "REGIONS", "SERVICE_SETS", "Fleet", "fleet", "store"]

REGIONS = ("ap-south", "eu-central", "eu-west", "sa-east", "us-east", "us-west")
SERVICE_SETS: tuple[tuple[str, ...], ...] = (
    ("ocr",),
    ("gpu",),
    ("embed",),
    ("asr",),
    ("tts",),
    ("gpu", "llm"),
    ("embed", "ocr"),
)
BIG_CELL = (("ocr",), "eu-west")
BIG_SHARE = 0.3
LEAVE_EVERY = 50  # one worker in 50 has left (a tombstone)
SERVER_EVERY = 5  # one in 5 is a reachable DHT server, the rest are clients
TTL = 900.0  # long enough that no record lapses while a slow machine runs the test
STORE_BATCH = 200


@dataclass
class Fleet:
    """The records (tombstones in place of the leavers' last records), and what they add up to."""

    records: list[WorkerRecord] = field(default_factory=list)
    live: int = 0
    left: int = 0
    servers: int = 0
    services: Counter[str] = field(default_factory=Counter)
    cells: Counter[tuple[str, str]] = field(default_factory=Counter)


def fleet(count: int) -> Fleet:
    """`count` workers: services, regions, loads and modes from the index, never at random."""
    out = Fleet()
    big = int(count * BIG_SHARE)
    now = time.time()
    for i in range(count):
        services: tuple[str, ...]
        if i < big:
            services, region = BIG_CELL
        else:
            services = SERVICE_SETS[i % len(SERVICE_SETS)]
            region = REGIONS[(i // len(SERVICE_SETS)) % len(REGIONS)]
        server = i % SERVER_EVERY == 0
        identity = Identity.generate()
        dht: dict[str, Any] = {"dht_host": "127.0.0.1", "dht_port": 10000 + i} if server else {}
        record = make_record(
            identity,
            services=services,
            region=region,
            load=round((i * 37 % 101) / 100, 2),
            seq=5 + i % 40,
            now=now,
            ttl=TTL,
            **dht,
        )
        if i % LEAVE_EVERY == LEAVE_EVERY - 1:
            out.records.append(tombstone_for(identity, record, now=now))
            out.left += 1
        else:
            out.records.append(record)
            out.live += 1
            out.servers += server
            out.services.update(services)
        out.cells[("+".join(sorted(services)), region)] += 1
    return out


async def store(registry: Registry, records: list[WorkerRecord]) -> None:
    """Write `records` into the registry, a batch at a time."""
    for start in range(0, len(records), STORE_BATCH):
        batch = records[start : start + STORE_BATCH]
        stored = await asyncio.gather(*(registry.upsert(r) for r in batch))
        if not all(stored):
            raise AssertionError("the registry refused a record of the fleet")
