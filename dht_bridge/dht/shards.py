"""Where records live in the DHT: `worker:<id>` and sharded service sets `svc:<service>:<shard>`.

Service shards form a binary trie over the low bits of worker ids. At level L there are 2**L
shards and a worker belongs to the one picked by the low L bits of its id; shards are numbered
level by level (shard 0 is the root, level 1 holds 1 and 2, level 2 holds 3 to 6, ...). The
children of the shard at (L, i) are (L+1, i) and (L+1, i + 2**L): one more bit of the id.
A worker publishes at the shallowest level whose shard has room: a service with 20 workers
lives in shard 0 alone (one read per lookup), and only a shard that fills pushes newcomers one
level down; the holders of a full shard mark it overflowed, and readers follow the mark.
Every shard value stays under the size that fits one UDP datagram, however many workers offer
the service.
"""

from __future__ import annotations

import re

MAX_LEVEL = 16
_SVC_KEY = re.compile(r"svc:([a-z0-9-]{1,32}):(\d{1,6})")
_WORKER_KEY = re.compile(r"worker:([0-9a-f]{40})")


def shard_id(level: int, index: int) -> int:
    """The number of the shard at `level` with position `index`."""
    return (1 << level) - 1 + index


def level_of(shard: int) -> int:
    """The trie level of a numbered shard."""
    return (shard + 1).bit_length() - 1


def index_of(shard: int) -> int:
    """The position of a shard within its level."""
    return shard + 1 - (1 << level_of(shard))


def shard_for(worker_id: str, level: int) -> int:
    """The shard a worker belongs to at `level`: the low `level` bits of its id pick it."""
    return shard_id(level, int(worker_id, 16) & ((1 << level) - 1))


def children(shard: int) -> tuple[int, int]:
    """The two shards one level below: those that also agree on the next bit of the id."""
    level, index = level_of(shard), index_of(shard)
    return shard_id(level + 1, index), shard_id(level + 1, index + (1 << level))


def service_key(service: str, shard: int) -> str:
    """The DHT key of one service shard."""
    return f"svc:{service}:{shard}"


def worker_key(worker_id: str) -> str:
    """The DHT key holding one worker's full record."""
    return f"worker:{worker_id}"


def belongs(key: str, worker_id: str, services: tuple[str, ...]) -> bool:
    """May a record of this worker be stored under `key`? Refuses records filed elsewhere."""
    match = _WORKER_KEY.fullmatch(key)
    if match:
        return match.group(1) == worker_id
    match = _SVC_KEY.fullmatch(key)
    if not match or match.group(1) not in services:
        return False
    shard = int(match.group(2))
    level = level_of(shard)
    return level <= MAX_LEVEL and shard_for(worker_id, level) == shard


def parse_service_key(key: str) -> tuple[str, int] | None:
    """(service, shard) of a service key, or None for any other key."""
    match = _SVC_KEY.fullmatch(key)
    return (match.group(1), int(match.group(2))) if match else None


def can_overflow(key: str) -> bool:
    """Is `key` a service shard with a level below it, so one an overflow mark may be for?"""
    parsed = parse_service_key(key)
    return parsed is not None and level_of(parsed[1]) < MAX_LEVEL
