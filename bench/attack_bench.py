"""Benchmark of a DHT under attack (issue 20): a Sybil flood and an eclipse of a service's keys
against a real network on 127.0.0.1, with a bridge, an embedded registry and a router.

In one process, on 127.0.0.1:

  build     --nodes DHT nodes; a bridge on its own node (the coordinator every node copies its
            publishes to), the embedded registry, and the router app (`create_app`, as the
            tests run it) on a node of its own; --providers workers offering `ocr` heartbeat
            every --interval seconds with a --ttl lease
  baseline  --lookups lookups of `ocr` from random nodes; GET /services/ocr
  attack    a Sybil flood: --sybils node ids from one socket, each introduced to a node by a
            PING and a FIND_NODE; an eclipse: --eclipse ids minted next to the service's top
            shard keys (on --eclipse-sockets sockets), introduced to every node, swallowing
            every STORE and answering every read with more of themselves
  measure   --lookups lookups again while the attackers keep answering: the share that found
            every live provider (target: at least 99%); then, after a lease and a heartbeat
            (records the registry got only from the DHT's shards would have lapsed), GET
            /services/ocr --router-checks times: does it keep every live provider?
  fill      --fill records of fresh identities (free to make) STOREd from one socket that
            answers checks, into the bridge's node and into a reference node without storage
            quotas, both holding at most --fill-keys keys: what each kept, whether a worker
            that starts next is listed at the edge, and whether the reference still takes
            a worker's new keys (both nodes' budgets of requests and of signature checks
            are off meanwhile: the one socket stands for many addresses)

    .venv/bin/python bench/attack_bench.py --nodes 100 --out bench/results/attack.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import ROOT, HelpFormatter, machine, text_table, write_json
from kademlia.node import Node

from dht_bridge.dht import shards
from dht_bridge.dht.admission import TokenBuckets
from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.storage import RecordStorage
from dht_bridge.dht.values import encode_value, key_digest
from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import open_registry
from dht_bridge.settings import RegistrySettings
from edge_router.app import create_app
from edge_router.config import CacheSettings, RouterConfig
from tests.support.bridge import Swarm, running_bridge
from tests.support.dht import TEST_SETTINGS, start_network, stop_all
from tests.support.eclipse import introduce_ids
from tests.support.helpers import POLICY, make_record
from tests.support.raw_peer import RawPeer, open_raw_peer
from tests.support.router import ADMIN_TOKEN, client_for

logger = logging.getLogger("attack_bench")

DEFAULT_OUT = ROOT / "bench" / "results" / "attack.json"
SERVICE = "ocr"
# The shard keys the eclipse sits next to: the root and level 1, where a small service lives.
ECLIPSED_SHARDS = (0, 1, 2)
LOOKUP_CONCURRENCY = 8
Address = tuple[str, int]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=100, help="honest DHT nodes")
    parser.add_argument("--providers", type=int, default=5, help="workers offering ocr")
    parser.add_argument("--sybils", type=int, default=2400, help="flood ids, from one socket")
    parser.add_argument("--eclipse", type=int, default=50, help="ids next to the shard keys")
    parser.add_argument("--eclipse-sockets", type=int, default=1, help="sockets they use")
    parser.add_argument("--lookups", type=int, default=200, help="lookups per phase")
    parser.add_argument("--interval", type=float, default=2.0, help="heartbeat seconds")
    parser.add_argument("--ttl", type=float, default=8.0, help="lease seconds")
    parser.add_argument("--router-checks", type=int, default=5, help="GET /services/ocr")
    parser.add_argument("--fill", type=int, default=6000, help="storage fill records (0: none)")
    parser.add_argument("--fill-keys", type=int, default=4000, help="keys the filled nodes hold")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds, all in")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


@dataclass
class Attacker:
    """Answers for ids it introduced, from one socket: PING with the id last introduced to the
    asker, FIND_NODE / FIND_VALUE with fakes of its own next to the target (never a value),
    STORE and RENEW with ok (and keeps nothing)."""

    ids: list[bytes]
    home: Address = ("127.0.0.1", 0)
    last_id: dict[Address, bytes] = field(default_factory=dict)
    asked: int = 0
    swallowed: int = 0

    def __call__(self, sender: Address, name: str, args: list[Any]) -> Any:
        if name == "ping":
            return self.last_id.get(sender, self.ids[0])
        if name in ("find_node", "find_value"):
            self.asked += 1
            key = args[1]
            near = sorted(
                self.ids, key=lambda i: int.from_bytes(i, "big") ^ int.from_bytes(key, "big")
            )
            return [(i, *self.home) for i in near[:20]]
        if name in ("store", "renew"):
            self.swallowed += 1
            return "ok"
        return None


async def lookups(nodes: list[DHTNode], live: set[str], count: int) -> dict[str, Any]:
    """`count` lookups from random nodes: how many found every live provider, and how fast."""
    gate = asyncio.Semaphore(LOOKUP_CONCURRENCY)
    complete, seconds, found_counts = 0, [], []

    async def one() -> None:
        nonlocal complete
        async with gate:
            started = time.monotonic()
            found = {r.worker_id for r in await random.choice(nodes).lookup(SERVICE, limit=50)}
            seconds.append(time.monotonic() - started)
            found_counts.append(len(found & live))
            complete += live <= found

    await asyncio.gather(*(one() for _ in range(count)))
    seconds.sort()
    return {
        "lookups": count,
        "complete": complete,
        "complete_pct": round(100.0 * complete / max(count, 1), 2),
        "min_found": min(found_counts, default=0),
        "p50_ms": round(1000 * seconds[len(seconds) // 2], 1) if seconds else 0.0,
    }


def answers_checks(sender: Address, name: str, args: list[Any]) -> Any:
    """A flooder that answers our checks: its address is proved, as a real host's would be."""
    return os.urandom(20) if name == "ping" else list(sender) if name == "stun" else None


def store_args(record: WorkerRecord) -> tuple[bytes, bytes]:
    """A STORE of `record` under its worker key: (digest, value)."""
    key = shards.worker_key(record.worker_id)
    return key_digest(key), encode_value(key, [record])


async def flood_store(peer: RawPeer, target: Address, values: list[tuple[bytes, bytes]]) -> int:
    """STORE every value at `target`, a window at a time; how many it kept."""
    kept = 0
    for start in range(0, len(values), LOOKUP_CONCURRENCY * 8):
        window = values[start : start + LOOKUP_CONCURRENCY * 8]
        replies = await asyncio.gather(
            *(peer.ask(target, "store", os.urandom(20), *value, timeout=5) for value in window),
            return_exceptions=True,
        )
        kept += sum(reply == "ok" for reply in replies)
    return kept


async def fill(
    args: argparse.Namespace, nodes: list[DHTNode], bridge_node: DHTNode, client: Any, swarm: Swarm
) -> dict[str, Any]:
    """The storage fill stage (see the module's docstring)."""
    reference = DHTNode(
        TEST_SETTINGS,
        policy=POLICY,
        storage=RecordStorage(POLICY, max_keys=args.fill_keys, quotas=False),
    )
    await reference.listen()
    transport, peer = await open_raw_peer(answers_checks)
    try:
        await reference.bootstrap([nodes[0].address])
        # One socket stands for a fill from many addresses here, as the quotas are measured:
        # from one, both nodes would drop most of it unread (`RequestBudget`), or refuse it
        # unchecked (the storage's budget of signature checks).
        budgets = bridge_node.rpc.budget, reference.rpc.budget
        checks = bridge_node.storage.checks, reference.storage.checks
        bridge_node.rpc.budget = reference.rpc.budget = None
        bridge_node.storage.checks = TokenBuckets(rate=1e12, burst=1e12)
        reference.storage.checks = TokenBuckets(rate=1e12, burst=1e12)
        values = [store_args(make_record(services=("fill",))) for _ in range(args.fill)]
        started = time.monotonic()
        kept = await flood_store(peer, bridge_node.address, values)
        kept_by_reference = await flood_store(peer, reference.address, values)
        flood_s = time.monotonic() - started
        bridge_node.rpc.budget, reference.rpc.budget = budgets
        bridge_node.storage.checks, reference.storage.checks = checks

        newcomer = swarm.add(nodes[len(nodes) // 2], (SERVICE,))
        began = time.monotonic()
        await newcomer.beat()
        deadline, listed_s = began + 3 * args.interval, None
        while listed_s is None and time.monotonic() < deadline:
            if newcomer.worker_id in await router_providers(client):
                listed_s = round(time.monotonic() - began, 2)
            else:
                await asyncio.sleep(0.05)  # polling the edge, as a client would
        sender = nodes[len(nodes) // 3]
        contact = next(
            (c for c in sender.rpc.router.contacts() if c.port == reference.address[1]), None
        ) or Node(reference.node.id, *reference.address)
        replies = [
            (await sender.rpc.call_store(contact, *store_args(make_record())))[1] for _ in range(4)
        ]
        return {
            "sent": args.fill,
            "max_keys": args.fill_keys,
            "flood_s": round(flood_s, 1),
            "bridge_kept": kept,
            "bridge_refused_quota": bridge_node.storage.refused_quota,
            "newcomer_listed_s": listed_s,
            "reference_kept": kept_by_reference,
            "reference_took_of_4": replies.count("ok"),
        }
    finally:
        transport.close()
        await reference.aclose()


async def router_providers(client: Any) -> set[str]:
    """The worker ids GET /services/ocr lists."""
    response = await client.get(f"/services/{SERVICE}", params={"limit": 100})
    response.raise_for_status()
    return {item["worker_id"] for item in response.json().get("providers", [])}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, attack, measure; the figures."""
    started = time.monotonic()
    nodes = await start_network(args.nodes)
    bridge_node = DHTNode(
        TEST_SETTINGS, policy=POLICY, storage=RecordStorage(POLICY, max_keys=args.fill_keys)
    )
    await bridge_node.listen()
    await bridge_node.bootstrap([nodes[0].address])
    coordinators = [bridge_node.address]
    router_node = DHTNode(TEST_SETTINGS, policy=POLICY, coordinators=coordinators)
    await router_node.listen()
    await router_node.bootstrap([nodes[1].address])
    for node in nodes:
        node.set_coordinators(coordinators)  # as workers learn them from /dht/bootstrap
    built = time.monotonic() - started
    registry = open_registry(RegistrySettings(), policy=POLICY)
    swarm = Swarm(interval=args.interval, ttl=args.ttl)
    transports: list[asyncio.DatagramTransport] = []
    result: dict[str, Any] = {"build_s": round(built, 1)}
    try:
        with tempfile.TemporaryDirectory() as workdir:
            async with running_bridge(
                bridge_node, registry, Path(workdir) / "journal", bootstrap=[nodes[0].address]
            ):
                # Each check reads the registry: the cache would serve leases of seconds past
                # their end (real leases last many cache lifetimes).
                config = RouterConfig(
                    admin_token=ADMIN_TOKEN,
                    policy=POLICY,
                    coordinators=tuple(coordinators),
                    cache=CacheSettings(ttl=0.1),
                )
                app = create_app(config, registry=registry, dht=router_node)
                async with client_for(app) as client:
                    step = max(1, len(nodes) // args.providers)
                    workers = [
                        swarm.add(nodes[i * step % len(nodes)], (SERVICE,))
                        for i in range(args.providers)
                    ]
                    await swarm.first_beats(workers)
                    swarm.start()
                    live = {w.worker_id for w in workers}
                    result["baseline"] = await lookups(nodes, live, args.lookups)
                    result["baseline"]["router"] = len(await router_providers(client) & live)

                    # The attack: a flood from one socket, then an eclipse of the top shards.
                    sybil = Attacker([os.urandom(20) for _ in range(args.sybils)])
                    transport, peer = await open_raw_peer(sybil)
                    transports.append(transport)
                    sybil.home = peer.address
                    await introduce_ids(peer, sybil.last_id, nodes, sybil.ids)
                    eclipsers: list[Attacker] = []
                    per_socket = max(1, args.eclipse // max(args.eclipse_sockets, 1))
                    digests = [key_digest(shards.service_key(SERVICE, s)) for s in ECLIPSED_SHARDS]
                    for index in range(max(args.eclipse_sockets, 1)):
                        ids = [
                            digests[(index * per_socket + j) % len(digests)][:16] + os.urandom(4)
                            for j in range(per_socket)
                        ]
                        attacker = Attacker(ids)
                        transport, peer = await open_raw_peer(attacker)
                        transports.append(transport)
                        attacker.home = peer.address
                        eclipsers.append(attacker)
                        # Every id to every node: wherever a table has room for this address.
                        for node in nodes:
                            await introduce_ids(peer, attacker.last_id, [node], ids)
                    result["attack_s"] = round(time.monotonic() - started - built, 1)

                    result["attacked"] = await lookups(nodes, live, args.lookups)
                    # A lease and a heartbeat later: what only the shards fed has lapsed.
                    await asyncio.sleep(args.ttl + args.interval)  # the attack's span, not sync
                    seen: list[int] = []
                    for _ in range(args.router_checks):
                        seen.append(len(await router_providers(client) & live))
                        await asyncio.sleep(args.interval / 2)  # spacing of the checks
                    result["attacked"]["router_min"] = min(seen)
                    result["attacked"]["router_all"] = all(n == len(live) for n in seen)
                    result["flood_asked"] = sybil.asked
                    result["eclipse_asked"] = sum(a.asked for a in eclipsers)
                    result["eclipse_swallowed"] = sum(a.swallowed for a in eclipsers)
                    result["live"] = len(live)
                    if args.fill:
                        result["fill"] = await fill(args, nodes, bridge_node, client, swarm)
                    await swarm.aclose()
    finally:
        for transport in transports:
            transport.close()
        await registry.aclose()
        await stop_all([*nodes, bridge_node, router_node])
    return result


def main(argv: list[str] | None = None) -> int:
    """Run and report; exit 1 if the targets were missed."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s %(message)s")
    result = asyncio.run(asyncio.wait_for(run(args), args.time_limit))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "log_level")}
    write_json(args.out, {"machine": machine("kademlia"), "settings": settings, "result": result})
    rows = [
        (phase, result[phase]["complete_pct"], result[phase]["min_found"], result[phase]["p50_ms"])
        for phase in ("baseline", "attacked")
    ]
    columns = [("phase", "<10"), ("complete %", ">10"), ("min found", ">9"), ("p50 ms", ">8")]
    print(text_table(columns, rows))
    print(
        f"router keeps {result['attacked']['router_min']} of {result['live']} live providers "
        f"(every check: {result['attacked']['router_all']}); the flood was asked "
        f"{result['flood_asked']} times, the eclipse {result['eclipse_asked']} and swallowed "
        f"{result['eclipse_swallowed']} stores"
    )
    ok = result["attacked"]["complete_pct"] >= 99.0 and result["attacked"]["router_all"]
    if "fill" in result:
        f = result["fill"]
        print(
            f"storage fill, {f['sent']} fresh identities from one socket into nodes of "
            f"{f['max_keys']} keys: the coordinator (quotas) kept {f['bridge_kept']} and "
            f"listed a worker that started next in {f['newcomer_listed_s']} s; the reference "
            f"(no quotas) kept {f['reference_kept']} and took {f['reference_took_of_4']} of a "
            f"worker's 4 new keys"
        )
        ok = ok and f["newcomer_listed_s"] is not None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
