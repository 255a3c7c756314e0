"""A volunteer's first start on an emulated internet: how long `rma worker` takes from start to
being listed at the edge, where a start meets the network's round trips, its loss and NAT.

A field of DHT nodes (dht_bridge.netem, `--profile`, 80% of them clients behind NAT) runs in
this process. Its coordinators are bridges, as in production: each files what reaches its node
into one registry (embedded), which a router app reads and whose `/dht/bootstrap` names them.
Then `--starts` fresh `WorkerAgent`s start one after another, each on a new host of the profile
(behind NAT by `--nat`) with no state file: the agent asks the edge for peers, joins,
publishes, then checks whether servers can reach it (client or server mode). Timed from
`start()` to its record in the registry (the edge lists the worker: the publish's copy to two
coordinators, through their bridges), to its first publish's return (every holder of its keys
answered), and to the return of `start()` (after the check, and a second publish for a server).

The edge request goes through a transport that waits what one HTTPS request through Cloudflare
costs: two short legs to the volunteer's nearby Cloudflare PoP (TCP and TLS handshakes,
`--pop-rtt` each) and one round trip of the profile between the volunteer's host and the
router's (the PoP's kept-alive connection to the origin). That is a model, said in the output.

Reference, measured in the same run on hosts like the agents' and timed alike: a bare `DHTNode`
doing what a start must at least do, joining through the coordinators and publishing a record
(no edge request, no reachability check, no seq lookup).

    .venv/bin/python bench/start_bench.py --profile world --nodes 200 --starts 40

Real time by default (200 nodes fit one loop); `--dilate F` slows the clock F times for
larger fields. The virtual clock is not offered: the agent saves its state file in a thread,
and the virtual clock would jump to the next timer while that thread runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from common import HelpFormatter, machine, quantile, text_table, write_json

from dht_bridge.bridge.bridge import Bridge
from dht_bridge.bridge.journal import Journal
from dht_bridge.dht.node import DHTNode
from dht_bridge.identity import Identity
from dht_bridge.netem import PROFILES, EmulatedNetwork, Host, Profile
from dht_bridge.netem.clock import run_dilated
from dht_bridge.records import sign_record
from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from edge_router.app import create_app
from edge_router.config import RATE_OFF, RateSettings, RouterConfig
from tests.support.helpers import POLICY
from tests.support.netem import FIELD_SETTINGS, FIELD_WORKER_SETTINGS, Field, start_field
from worker.agent import Mode, WorkerAgent
from worker.config import WorkerConfig

logger = logging.getLogger("start_bench")

EDGE_URL = "https://edge.example.org"
TARGET = 2.0  # the seed's "bootstrap < 2 s"
POLL = 0.005  # seconds between looks at a starting agent's first record and the registry
LISTED_WAIT = 10.0  # seconds after a start to wait for its record to reach the registry


class CloudflareLeg(httpx.AsyncBaseTransport):
    """An ASGI transport into the router app that first waits what the request would cost
    through Cloudflare from `host` (see the module's docstring)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, delay: Callable[[], float]) -> None:
        self._inner = inner
        self._delay = delay
        self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Wait, then hand the request to the app."""
        self.requests += 1
        await asyncio.sleep(self._delay())
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self._inner.aclose()


@dataclass
class Start:
    """One fresh start: how long it took and how it ended."""

    seconds: float  # to the record in the registry (the edge lists the worker); inf if never
    published: float  # to the first publish's return (every holder answered)
    returned: float  # to start()'s return (after the reachability check)
    nat: bool
    mode: str  # the agent's mode once start() returned: dht, edge
    dht_mode: str  # client or server ("" off the DHT)
    edge_requests: int


@dataclass
class Results:
    """Every start of one kind."""

    starts: list[Start] = field(default_factory=list)

    def rows(self, name: str, rtt: float) -> list[list[Any]]:
        """Two table rows, listed at the edge and the first publish's return: quantiles in
        seconds and in median round trips."""
        on_dht = sum(s.mode == "dht" for s in self.starts)
        returned = f"{quantile([s.returned for s in self.starts], 0.5):.2f}"
        rows = []
        for what, seconds in (
            ("listed at the edge", [s.seconds for s in self.starts]),
            ("first publish returned", [s.published for s in self.starts]),
        ):
            rows.append(
                [
                    f"{name}: {what}",
                    len(seconds),
                    *(f"{quantile(seconds, q):.2f}" for q in (0.5, 0.9, 0.99)),
                    f"{max(seconds, default=0.0):.2f}",
                    f"{quantile(seconds, 0.5) / rtt:.1f} / {quantile(seconds, 0.99) / rtt:.1f}",
                    f"{on_dht}/{len(seconds)}",
                    sum(s.edge_requests for s in self.starts),
                    returned,
                ]
            )
        return rows

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        seconds = [s.seconds for s in self.starts]
        published = [s.published for s in self.starts]
        return {
            "count": len(seconds),
            "p50_s": quantile(seconds, 0.5),
            "p90_s": quantile(seconds, 0.9),
            "p99_s": quantile(seconds, 0.99),
            "max_s": max(seconds, default=0.0),
            "never_listed": sum(s == math.inf for s in seconds),
            "published_p50_s": quantile(published, 0.5),
            "published_p90_s": quantile(published, 0.9),
            "published_p99_s": quantile(published, 0.99),
            "returned_p50_s": quantile([s.returned for s in self.starts], 0.5),
            "returned_p99_s": quantile([s.returned for s in self.starts], 0.99),
            "under_target": sum(s <= TARGET for s in seconds),
            "starts": [vars(s) for s in self.starts],
        }


async def until_listed(
    registry: Registry, identity: Callable[[], Identity | None], began: float
) -> float:
    """Seconds from `began` to the worker's record in the registry (what the edge reads);
    inf when it is not there within LISTED_WAIT of the call."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LISTED_WAIT
    while loop.time() < deadline:
        who = identity()
        if who is not None and await registry.get(who.worker_id) is not None:
            return loop.time() - began
        await asyncio.sleep(POLL)  # polling the in-process registry, not waiting on it
    return math.inf


async def start_agent(
    i: int,
    host: Host,
    app: Any,
    registry: Registry,
    router: Host,
    network: EmulatedNetwork,
    args: argparse.Namespace,
    tmp: Path,
) -> Start:
    """One fresh agent on `host`, started and left running (closed by the caller's stack)."""
    pop: float = args.pop_rtt

    def delay() -> float:
        return 2 * pop + network.rtt(host, router)

    leg = CloudflareLeg(httpx.ASGITransport(app=app, client=(host.ip, 40000)), delay)
    config = WorkerConfig(
        services=("ocr",),
        tunnel_url=f"https://w{i}.trycloudflare.com",
        state_file=tmp / f"w{i}" / "state.json",
        edge_url=EDGE_URL,
        dht=FIELD_WORKER_SETTINGS,
        region=host.region,
    )
    agent = WorkerAgent(config, edge_transport=leg, dht_endpoint=host.endpoint)
    loop = asyncio.get_running_loop()
    began = loop.time()
    starting = loop.create_task(agent.start())
    listing = loop.create_task(until_listed(registry, lambda: agent.identity, began))
    published: float | None = None
    while not starting.done():  # a bench may poll: when the first record is out
        if published is None and agent.record is not None:
            published = loop.time() - began
        await asyncio.wait([starting], timeout=POLL)
    await starting
    seconds = loop.time() - began
    start = Start(
        seconds=await listing,
        published=published if published is not None else seconds,
        returned=seconds,
        nat=host.nat,
        mode="dht" if agent.mode is Mode.DHT else agent.mode.value,
        dht_mode=agent.dht_mode if agent.mode is Mode.DHT else "",
        edge_requests=sum(agent.edge_requests.values()),
    )
    await agent.aclose()
    return start


async def start_bare(i: int, host: Host, built: Field, registry: Registry) -> Start:
    """The reference: a bare node on `host` joins through the coordinators and publishes."""
    identity = Identity.generate()
    node = DHTNode(
        FIELD_WORKER_SETTINGS,
        policy=POLICY,
        client=host.nat,
        endpoint=host.endpoint,
        coordinators=[c.address for c in built.coordinators],
    )
    loop = asyncio.get_running_loop()
    began = loop.time()
    listing = loop.create_task(until_listed(registry, lambda: identity, began))
    await node.listen()
    try:
        await node.bootstrap([c.address for c in built.coordinators])
        record = sign_record(
            identity,
            tunnel_url=f"https://b{i}.trycloudflare.com",
            services=["ocr"],
            seq=1,
            now=time.time(),
            ttl=90.0,
        )
        await node.publish(record)
        seconds = loop.time() - began
        listed = await listing
    finally:
        listing.cancel()
        await node.aclose()
    return Start(listed, seconds, seconds, host.nat, "dht", node.mode, 0)


@contextlib.asynccontextmanager
async def bridges(built: Field, registry: Registry, workdir: Path) -> AsyncIterator[None]:
    """A bridge over each coordinator's node into `registry`, as `rma bridge` runs them."""
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        tasks = []
        for i, node in enumerate(built.coordinators):
            journal = Journal(workdir / f"bridge-{i}.journal")
            journal.open()
            stack.callback(journal.close)
            bridge = Bridge(node, registry, journal, services=("ocr",))
            tasks.append(asyncio.create_task(bridge.run(stop), name=f"bridge-{i}"))
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the field and the edge, then time the starts."""
    profile: Profile = PROFILES[args.profile]
    network = EmulatedNetwork(profile, seed=args.seed)
    rng = random.Random(args.seed)
    servers = max(args.coordinators, round(args.nodes * (1 - args.clients)))
    print(f"{profile.describe()}; building {args.nodes} nodes", file=sys.stderr, flush=True)
    built = await start_field(
        network,
        servers=servers,
        clients=args.nodes - servers,
        coordinators=args.coordinators,
        settings=FIELD_WORKER_SETTINGS,
        coordinator_settings=FIELD_SETTINGS,
        seed=args.seed,
    )
    registry = open_registry(RegistrySettings(redis_url=None), policy=POLICY)
    config = RouterConfig(
        coordinators=tuple(c.address for c in built.coordinators),
        policy=POLICY,
        tunnel_proof="off",
        rates=RateSettings(register=RATE_OFF, route=RATE_OFF, admin=RATE_OFF, topology=RATE_OFF),
    )
    app = create_app(config, registry=registry, listen_events=False)
    router = network.add_host()  # where the origin is, for the edge's round trip
    rtt = network.median_rtt()
    agents, bare = Results(), Results()
    try:
        with tempfile.TemporaryDirectory(prefix="start-bench-") as tmp:
            async with app.router.lifespan_context(app), bridges(built, registry, Path(tmp)):
                for i in range(args.starts):
                    nat = rng.random() < args.nat
                    agents.starts.append(
                        await start_agent(
                            i,
                            network.add_host(nat=nat),
                            app,
                            registry,
                            router,
                            network,
                            args,
                            Path(tmp),
                        )
                    )
                    bare.starts.append(
                        await start_bare(i, network.add_host(nat=nat), built, registry)
                    )
                    if (i + 1) % 10 == 0:
                        print(f"{i + 1} of {args.starts} starts", file=sys.stderr, flush=True)
    finally:
        await built.aclose()
        await registry.aclose()
    return {
        "profile": profile.describe(),
        "median_rtt_s": rtt,
        "edge_model": f"2 x {args.pop_rtt * 1000:g} ms to the PoP + one profile round trip "
        "from the volunteer's host to the router's",
        "agent": agents.as_dict(),
        "bare": bare.as_dict(),
        "rows": [*agents.rows("agent (rma worker)", rtt), *bare.rows("bare node", rtt)],
    }


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    """The table, and the ratio to the reference."""
    table = text_table(
        [
            ("first start", "<40"),
            ("n", ">4"),
            ("p50 s", ">6"),
            ("p90 s", ">6"),
            ("p99 s", ">6"),
            ("max s", ">6"),
            ("RTTs p50/p99", ">13"),
            ("on DHT", ">7"),
            ("edge req", ">8"),
            ("start() p50 s", ">13"),
        ],
        result["rows"],
    )
    agent, bare = result["agent"], result["bare"]
    ratio = agent["p50_s"] / bare["p50_s"] if bare["p50_s"] else float("nan")
    return "\n".join(
        [
            f"First starts on {result['profile']}",
            f"{args.nodes} nodes in the field, median RTT {result['median_rtt_s'] * 1000:.0f} ms; "
            f"fresh hosts {args.nat:.0%} behind NAT; edge request: {result['edge_model']}",
            table,
            f"agent / bare node, p50: {ratio:.2f}x; agent starts within {TARGET:g} s: "
            f"{agent['under_target']} of {agent['count']}",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="world")
    parser.add_argument("--nodes", type=int, default=200, help="the field's nodes")
    parser.add_argument("--clients", type=float, default=0.8, help="share of the field's clients")
    parser.add_argument("--coordinators", type=int, default=3)
    parser.add_argument("--starts", type=int, default=40, help="fresh agents, one at a time")
    parser.add_argument("--nat", type=float, default=0.8, help="share of fresh hosts behind NAT")
    parser.add_argument(
        "--pop-rtt", type=float, default=0.02, help="round trip to the nearby Cloudflare PoP, s"
    )
    parser.add_argument("--dilate", type=float, default=1.0, help="slow the clock this many times")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", help="write the figures as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; 2 on bad options."""
    args = build_parser().parse_args(argv)
    if args.nodes < args.coordinators or args.starts < 1 or args.dilate < 1:
        print("need --nodes >= --coordinators, --starts >= 1, --dilate >= 1", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    began = time.monotonic()
    if args.dilate > 1:
        result = run_dilated(run(args), factor=args.dilate)
    else:
        result = asyncio.run(run(args))
    print(render(result, args))
    print(f"wall time {time.monotonic() - began:.1f}s")
    if args.out:
        write_json(
            Path(args.out),
            {"options": vars(args), "machine": machine("kademlia"), "figures": result},
        )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
