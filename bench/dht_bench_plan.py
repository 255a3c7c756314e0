"""The plan of one benchmark run: every random choice, drawn once from the seed.

Both implementations run the same plan (same node ids, same join order and bootstrap peers,
same writers, keys, readers, lookups and victims), so their figures differ only by the code
under test, not by luck of the draw.

A mixed network (`servers` < 1) puts that share of the nodes in server mode (node 0, the seed,
always) and the rest in client mode, as workers behind NAT are; nodes join through servers
only, since nobody can reach a client. The server set comes from its own random stream, so the
rest of the plan is the same draw as the all-server one's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dht_bridge.identity import Identity

PHASES = ("before", "after")
SERVICES = ("ocr", "gpu", "asr", "llm", "tts", "embed")
RAW_VALUE_BYTES = 1024
SERVICE_LIMIT = 10


@dataclass(frozen=True)
class PlanOptions:
    """What the command line decides about the plan."""

    nodes: int
    procs: int
    keys: int
    lookups: int
    service_lookups: int
    services: int
    readers: int
    kill: float
    join_parallel: int
    seed: int
    servers: float = 1.0  # share of the nodes in server mode (ours; the stock library has none)


@dataclass(frozen=True)
class KeySpec:
    """One stored key: a signed record for ours, a 1 KB value under the same name for raw."""

    index: int
    writer: int
    worker_id: str
    secret: str  # hex of the Ed25519 private key, so the writer's process can sign
    service: str
    load: float
    value_seed: int  # the raw library's value is `raw_value(value_seed)`

    @property
    def name(self) -> str:
        """The key name; the raw library stores under the same name (and so the same digest)."""
        return f"worker:{self.worker_id}"

    def wire(self) -> dict[str, Any]:
        """What a child needs to store or check this key."""
        return {
            "name": self.name,
            "wid": self.worker_id,
            "secret": self.secret,
            "service": self.service,
            "load": self.load,
            "vseed": self.value_seed,
            "seq": 1,
        }


@dataclass(frozen=True)
class Lookup:
    """One timed read from `reader`: a get of a stored key, or a service lookup (ours only)."""

    reader: int
    kind: str  # "get" or "service"
    key: int = -1
    service: str = ""
    expect: int = 0  # service lookups: how many providers count as success

    def wire(self, keys: list[KeySpec]) -> dict[str, Any]:
        """What the reader's process needs to run and judge this lookup."""
        if self.kind == "get":
            return {"node": self.reader, "kind": "get", **keys[self.key].wire()}
        return {
            "node": self.reader,
            "kind": "service",
            "service": self.service,
            "limit": SERVICE_LIMIT,
            "expect": self.expect,
        }


@dataclass
class Plan:
    """Everything drawn from the seed for one run."""

    options: PlanOptions
    node_ids: list[bytes]
    rounds: list[list[tuple[int, tuple[int, ...]]]]  # join rounds of (node, bootstrap peers)
    keys: list[KeySpec]
    readers: list[int]
    victims: list[int]
    servers: frozenset[int] = frozenset()
    gets: dict[str, list[Lookup]] = field(default_factory=dict)
    service_gets: dict[str, list[Lookup]] = field(default_factory=dict)

    def proc_of(self, index: int) -> int:
        """Nodes are dealt round-robin, so every join round spreads over every process."""
        return index % self.options.procs

    def nodes_per_proc(self) -> list[int]:
        """How many nodes each child process hosts."""
        counts = [0] * self.options.procs
        for index in range(self.options.nodes):
            counts[self.proc_of(index)] += 1
        return counts


def raw_value(value_seed: int) -> bytes:
    """The raw library's 1 KB value for a key, rebuilt identically in every process."""
    return random.Random(value_seed).randbytes(RAW_VALUE_BYTES)


def identity_from_secret(secret: str) -> Identity:
    """The worker identity a key's secret stands for."""
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret)))


def build_plan(options: PlanOptions) -> Plan:
    """Draw the whole plan from `options.seed`."""
    rng = random.Random(options.seed)
    n = options.nodes
    servers = _servers(random.Random(options.seed + 1), options)
    node_ids = [rng.randbytes(20) for _ in range(n)]
    rounds = _join_rounds(rng, n, options.procs * options.join_parallel, servers)
    keys = _keys(rng, options)
    readers = _readers(rng, options)
    victims = _victims(rng, options, set(readers))
    plan = Plan(options, node_ids, rounds, keys, readers, victims, servers)
    services = SERVICES[: options.services]
    offered = {s: sum(1 for k in keys if k.service == s) for s in services}
    for phase in PHASES:
        plan.gets[phase] = [
            Lookup(rng.choice(readers), "get", key=rng.randrange(len(keys)))
            for _ in range(options.lookups)
        ]
        picks = [rng.choice(services) for _ in range(options.service_lookups)]
        plan.service_gets[phase] = [
            Lookup(rng.choice(readers), "service", service=s, expect=min(SERVICE_LIMIT, offered[s]))
            for s in picks
        ]
    return plan


def _servers(rng: random.Random, options: PlanOptions) -> frozenset[int]:
    """The nodes in server mode: the seed and a random share of the others."""
    count = max(1, round(options.servers * options.nodes))
    return frozenset([0, *rng.sample(range(1, options.nodes), count - 1)])


def _join_rounds(
    rng: random.Random, n: int, width: int, servers: frozenset[int]
) -> list[list[tuple[int, tuple[int, ...]]]]:
    """Node 0 is the seed; the others join `width` at a time, each through the seed plus one
    or two random servers that joined in an earlier round."""
    rounds: list[list[tuple[int, tuple[int, ...]]]] = []
    for start in range(1, n, width):
        earlier = [i for i in range(1, start) if i in servers]
        steps = []
        for index in range(start, min(start + width, n)):
            extra = rng.sample(earlier, min(len(earlier), rng.choice((1, 2))))
            steps.append((index, (0, *extra)))
        rounds.append(steps)
    return rounds


def _keys(rng: random.Random, options: PlanOptions) -> list[KeySpec]:
    services = SERVICES[: options.services]
    keys = []
    for index in range(options.keys):
        secret = rng.randbytes(32).hex()
        keys.append(
            KeySpec(
                index=index,
                writer=rng.randrange(options.nodes),
                worker_id=identity_from_secret(secret).worker_id,
                secret=secret,
                service=services[index % len(services)],
                load=round(rng.random(), 3),
                value_seed=rng.getrandbits(64),
            )
        )
    return keys


def _readers(rng: random.Random, options: PlanOptions) -> list[int]:
    """Readers are never the seed (it knows everyone) and are never killed."""
    return sorted(rng.sample(range(1, options.nodes), min(options.readers, options.nodes - 1)))


def _victims(rng: random.Random, options: PlanOptions, readers: set[int]) -> list[int]:
    """Nodes killed without warning: a share of all nodes, never the seed or a reader."""
    candidates = [i for i in range(1, options.nodes) if i not in readers]
    count = min(len(candidates), round(options.kill * options.nodes))
    return sorted(rng.sample(candidates, count))
