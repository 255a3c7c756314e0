"""Benchmark of the router's lookup, `GET /services/{service}`, against the ceiling of its stack.

In one run, each case under the same load (N keep-alive clients in a separate process, each
sending its next request as soon as the previous one is answered):

  bare      a bare Starlette endpoint returning the router's cache-hit JSON, byte for byte
            (same uvicorn, same routing: the most any handler on this stack can do)
  hit       the router, every request a fresh cache hit
  redis     the router, every request a miss read from Redis
  dht       the router, every request a miss read from the DHT (Redis unreachable: its URL
            points at a port that refuses connections; the router's DHT node has joined a
            small DHT network this script runs)
  direct    no HTTP at all: `Registry.lookup` of the same providers straight from Redis

Every server runs in its own process under uvicorn; this script hosts the DHT network and
starts its own redis-server on a free port. Prints p50/p99 latency and throughput with ratios
to the bare baseline; writes the figures as JSON.

    .venv/bin/python bench/router_bench.py --seconds 5 --clients 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from common import ROOT, BenchError, HelpFormatter, machine, markdown_table, quantile, write_json
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dht_bridge.dht.node import DHTNode
from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import DHTSettings, RegistrySettings
from dht_bridge.tunnels import TunnelPolicy
from edge_router.app import create_app
from edge_router.config import RouterConfig
from tests.support.dht import start_network
from tests.support.helpers import make_record
from tests.support.redis_server import RedisServer
from tests.support.upstreams import refusing_port

logger = logging.getLogger("router_bench")

SCRIPT = Path(__file__).resolve()
DEFAULT_OUT = ROOT / "bench" / "results" / "router.json"
SERVICE = "ocr"
# The router reads up to this many providers per backend read and slices `?limit=` from them.
READ_LIMIT = RouterConfig.max_limit
LEASE = 1800.0  # seconds: the records outlive any run
POLICY = TunnelPolicy()
LOOPBACK = DHTSettings(host="127.0.0.1", port=0)
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
REQUEST_TIMEOUT = 30.0

CASES: dict[str, str] = {
    "bare": "bare Starlette, same JSON",
    "hit": "router: cache hit",
    "redis": "router: miss from Redis",
    "dht": "router: miss from DHT",
    "direct": "Registry.lookup, no HTTP",
}
BASELINE = "bare"
# What each router case must show in X-Cache and in the body's "source".
EXPECT: dict[str, tuple[str, str]] = {
    "bare": ("", "cache"),
    "hit": ("HIT", "cache"),
    "redis": ("MISS", "redis"),
    "dht": ("MISS", "dht"),
}


# -- the data ------------------------------------------------------------------------------


def make_records(count: int) -> list[WorkerRecord]:
    """`count` providers of SERVICE with distinct loads (so every source orders them alike)."""
    now = time.time()
    return [
        make_record(
            services=[SERVICE],
            now=now,
            ttl=LEASE,
            load=round((i + 1) / (count + 1), 4),
            capabilities={"gpu": i % 2 == 0, "mem_gb": 8 + i},
        )
        for i in range(count)
    ]


# -- a server process (`--serve KIND`) -------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn that stops on SIGTERM/SIGINT and returns, instead of re-raising the signal."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)


def bare_app(body: bytes) -> Starlette:
    """One route, the router's path, answering fixed JSON bytes."""

    async def lookup(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route("/services/{service}", lookup, methods=["GET"])])


async def serve_child(args: argparse.Namespace) -> int:
    """Build the app of `args.serve`, serve it on an OS port, print `READY <port>`."""
    closers: list[Callable[[], Any]] = []
    if args.serve == "bare":
        app: Starlette = bare_app(args.body)
    else:
        registry = open_registry(RegistrySettings(redis_url=args.redis_url), policy=POLICY)
        closers.append(registry.aclose)
        dht = None
        seeds = tuple(_hostport(s) for s in args.seed)
        if seeds:
            dht = DHTNode(LOOPBACK, policy=POLICY)
            await dht.listen()
            closers.append(dht.aclose)
            await dht.bootstrap(list(seeds))
        config = RouterConfig(
            registry=RegistrySettings(redis_url=args.redis_url), dht_bootstrap=seeds
        )
        app = create_app(config, registry=registry, dht=dht)
    server = _Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            access_log=False,  # `rma router` logs each request at info; no case here does
            proxy_headers=False,
            server_header=False,
            lifespan="off" if args.serve == "bare" else "on",
        )
    )
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if task.done() or time.monotonic() > deadline:
                raise BenchError(f"uvicorn did not start ({args.serve})")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"READY {port}", flush=True)
        await task
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        for close in reversed(closers):
            await close()
    return 0


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# -- the load process (`--load MODE`) -----------------------------------------------------------


@dataclass
class Tally:
    """What one load run saw: latencies inside the window, outcomes, X-Cache values."""

    window_start: float
    window_end: float
    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    bad: int = 0
    total: int = 0  # every answer, warm-up and tail included (for backend reads per request)
    cache: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)

    def add(self, started: float, ended: float, good: bool) -> None:
        self.total += 1
        if self.window_start <= ended <= self.window_end:
            self.latencies.append(ended - started)
            if good:
                self.ok += 1
            else:
                self.bad += 1

    def result(self) -> dict[str, Any]:
        seconds = self.window_end - self.window_start
        answered = self.ok + self.bad
        return {
            "requests": answered,
            "ok_pct": round(100.0 * self.ok / answered, 2) if answered else 0.0,
            "p50_ms": quantile(self.latencies, 0.50) * 1000,
            "p99_ms": quantile(self.latencies, 0.99) * 1000,
            "mean_ms": (statistics.fmean(self.latencies) * 1000) if self.latencies else 0.0,
            "rps": self.ok / seconds if seconds > 0 else 0.0,
            "total": self.total,
            "x_cache": dict(self.cache),
            "statuses": {str(k): v for k, v in self.statuses.items()},
        }


def _header(head: bytes, name: bytes) -> bytes | None:
    start = head.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    return head[start : head.index(b"\r\n", start)].strip()


async def http_client(
    index: int, args: argparse.Namespace, expected: bytes, tally: Tally, unique: bool
) -> None:
    """One keep-alive connection sending requests back to back until the window ends.

    A minimal HTTP/1.1 client: the answers are small and known, and a full client library
    would spend more CPU per request than the server under test, on the same two cores.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    want_cache = EXPECT[args.case][0]
    try:
        sent = 0
        while time.perf_counter() < tally.window_end:
            path = f"/services/{SERVICE}"
            if unique:
                # A region nobody is in: the same answer, under a cache key no request shared.
                path += f"?region=c{index}-{sent:x}"
            sent += 1
            started = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n".encode())
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
                length = int(_header(head, b"content-length") or b"0")
                body = await reader.readexactly(length)
            ended = time.perf_counter()
            status = int(head[9:12])
            cache = (_header(head, b"x-cache") or b"").decode().upper()
            tally.statuses[status] += 1
            tally.cache[cache or "-"] += 1
            good = status == 200 and body == expected and cache == want_cache
            tally.add(started, ended, good)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def redis_client(registry: Registry, expected: int, tally: Tally) -> None:
    """One task reading the providers straight from Redis until the window ends."""
    while time.perf_counter() < tally.window_end:
        started = time.perf_counter()
        found = await registry.lookup(SERVICE, limit=READ_LIMIT)
        tally.add(started, time.perf_counter(), len(found) == expected)


async def load_child(args: argparse.Namespace) -> int:
    """Run one case's load and print its tally as one JSON line."""
    start = time.perf_counter() + args.warmup
    tally = Tally(window_start=start, window_end=start + args.seconds)
    if args.case == "direct":
        registry = open_registry(RegistrySettings(redis_url=args.redis_url), policy=POLICY)
        try:
            await asyncio.gather(
                *(redis_client(registry, args.providers, tally) for _ in range(args.clients))
            )
        finally:
            await registry.aclose()
    else:
        expected: bytes = args.body
        unique = args.case in ("redis", "dht")
        await asyncio.gather(
            *(http_client(i, args, expected, tally, unique) for i in range(args.clients))
        )
    print(json.dumps(tally.result()), flush=True)
    return 0


# -- the parent: processes, phases, report -----------------------------------------------------


class ServerProcess:
    """One `--serve KIND` child; its log goes to a file of the run's directory."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.log_path = workdir / f"server-{kind}.log"
        self.process: asyncio.subprocess.Process | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *options: str) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *(sys.executable, str(SCRIPT), "--serve", self.kind, *options),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b""
        if not line.startswith(b"READY "):
            await self.stop()
            raise BenchError(f"{self.kind} server did not start: {self.log_tail()}")
        self.port = int(line.split()[1])

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            logger.warning("%s server ignored SIGTERM; killing it", self.kind)
            process.kill()
            await process.wait()

    def log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return " | ".join(text.splitlines()[-8:]) or "(empty log)"


@contextlib.asynccontextmanager
async def server(kind: str, workdir: Path, *options: str) -> AsyncIterator[ServerProcess]:
    """A server process for the duration of the block."""
    process = ServerProcess(kind, workdir)
    try:
        await process.start(*options)
        yield process
    finally:
        await process.stop()


async def run_load(case: str, args: argparse.Namespace, *options: str) -> dict[str, Any]:
    """One `--load` child for `case`; its tally."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, str(SCRIPT), "--load", "--case", case),
        *("--clients", str(args.clients), "--seconds", str(args.seconds)),
        *("--warmup", str(args.warmup), "--providers", str(args.providers), *options),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(
            process.communicate(), START_TIMEOUT + args.warmup + args.seconds + REQUEST_TIMEOUT
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise BenchError(f"the load of {case} did not finish in time") from None
    if process.returncode != 0:
        raise BenchError(f"the load of {case} failed: {err.decode(errors='replace')[-2000:]}")
    tally: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    if not tally["requests"] or not tally["ok_pct"]:
        raise BenchError(f"{case}: no good answer ({tally})")
    return tally


async def figures(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """The router's /metrics as name -> value."""
    answer = await client.get(url + "/metrics")
    answer.raise_for_status()
    out: dict[str, float] = {}
    for line in answer.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def measure_router(
    case: str,
    args: argparse.Namespace,
    client: httpx.AsyncClient,
    router: ServerProcess,
    body: Path,
) -> dict[str, Any]:
    """One router case, with the backend reads it caused per answered request."""
    before = await figures(client, router.url)
    tally = await run_load(case, args, "--port", str(router.port), "--body-file", str(body))
    after = await figures(client, router.url)
    answered = max(1, tally["total"])
    tally["backend_reads_per_req"] = (after["rma_backend_reads"] - before["rma_backend_reads"]) / (
        answered
    )
    tally["dht_reads_per_req"] = (after["rma_dht_reads"] - before["rma_dht_reads"]) / answered
    return tally


def expected_body(hit_body: bytes, source: str) -> bytes:
    """The router's answer for `source`: the cache-hit answer with another "source"."""
    marker = b'"source":"cache"'
    if hit_body.count(marker) != 1:
        raise BenchError(f"unexpected lookup body: {hit_body[:200]!r}")
    return hit_body.replace(marker, f'"source":"{source}"'.encode())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every case in one run; the results as a JSON-ready dict."""
    started = time.monotonic()
    records = make_records(args.providers)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis")
        redis.start()
        nodes: list[DHTNode] = []
        try:
            async with open_registry(
                RegistrySettings(redis_url=redis.url), policy=POLICY
            ) as registry:
                for record in records:
                    if not await registry.upsert(record):
                        raise BenchError("a record was refused by Redis")
            nodes = await start_network(args.dht_nodes, settings=LOOPBACK)
            for i, record in enumerate(records):
                await nodes[i % len(nodes)].publish(record)
            found = await nodes[-1].lookup(SERVICE, limit=READ_LIMIT)
            if len(found) != len(records):
                raise BenchError(f"the DHT holds {len(found)} of {len(records)} records")
            logger.info("%d records in Redis and a %d-node DHT", len(records), len(nodes))
            seed = "{}:{}".format(*nodes[0].address)
            async with httpx.AsyncClient(trust_env=False, timeout=REQUEST_TIMEOUT) as client:
                rows.update(await _redis_side(args, client, workdir, redis.url))
                with refusing_port() as dead:
                    dead_url = "redis://{}:{}/0".format(*dead.getsockname())
                    rows["dht"] = await _dht_side(args, client, workdir, dead_url, seed)
        finally:
            for node in nodes:
                await node.aclose()
            redis.stop()
    return {
        "params": {
            "clients": args.clients,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "providers": args.providers,
            "dht_nodes": args.dht_nodes,
            "body_bytes": rows["hit"].pop("body_bytes"),
            "miss_method": "every request asks for ?region=<unique per request>: the region is "
            "part of the cache key and no provider has one, so each request misses, makes its "
            "own backend read (no single-flight sharing) and gets the same providers; "
            "backend_reads_per_req, from the router's /metrics, shows it",
            "latency_method": "closed loop: each client sends its next request when the last "
            "is answered; figures are answers completed inside the window after the warm-up",
        },
        "machine": machine(
            *("uvicorn", "starlette", "httpx", "redis", "h11"),
            http_impl="httptools" if _has("httptools") else "h11",
            loop="uvloop" if _has("uvloop") else "asyncio",
        ),
        "rows": [{"case": case, "label": CASES[case], **rows[case]} for case in CASES],
        "ratios": ratios(rows),
        "wall_s": time.monotonic() - started,
    }


async def _redis_side(
    args: argparse.Namespace, client: httpx.AsyncClient, workdir: Path, redis_url: str
) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    bodies = {}
    async with server("router", workdir, "--redis-url", redis_url) as router:
        first = await client.get(f"{router.url}/services/{SERVICE}")
        hit = await client.get(f"{router.url}/services/{SERVICE}")
        if (first.headers.get("x-cache"), hit.headers.get("x-cache")) != ("MISS", "HIT"):
            raise BenchError(f"the router did not cache: {first.text[:300]}")
        for case in ("hit", "redis", "dht"):
            bodies[case] = workdir / f"{case}.json"
            bodies[case].write_bytes(expected_body(hit.content, EXPECT[case][1]))
        bodies["bare"] = bodies["hit"]
        for case in ("hit", "redis"):
            logger.info("measuring %s", CASES[case])
            rows[case] = await measure_router(case, args, client, router, bodies[case])
        rows["hit"]["body_bytes"] = len(hit.content)
    async with server("bare", workdir, "--body-file", str(bodies["bare"])) as bare:
        logger.info("measuring %s", CASES["bare"])
        rows["bare"] = await run_load(
            "bare", args, "--port", str(bare.port), "--body-file", str(bodies["bare"])
        )
    logger.info("measuring %s", CASES["direct"])
    rows["direct"] = await run_load("direct", args, "--redis-url", redis_url)
    return rows


async def _dht_side(
    args: argparse.Namespace, client: httpx.AsyncClient, workdir: Path, dead_url: str, seed: str
) -> dict[str, Any]:
    body = workdir / "dht.json"
    async with server("router-dht", workdir, "--redis-url", dead_url, "--seed", seed) as router:
        probe = await client.get(f"{router.url}/services/{SERVICE}?region=probe")
        if probe.status_code != 200 or probe.json().get("source") != "dht":
            raise BenchError(f"the router did not answer from the DHT: {probe.text[:300]}")
        logger.info("measuring %s", CASES["dht"])
        return await measure_router("dht", args, client, router, body)


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each case against the bare baseline: latency multiples (above 1 is slower) and the
    share of the baseline's throughput."""
    base = rows[BASELINE]
    out = {}
    for case, row in rows.items():
        if case == BASELINE:
            continue
        out[case] = {
            "p50_x": _div(row["p50_ms"], base["p50_ms"]),
            "p99_x": _div(row["p99_ms"], base["p99_ms"]),
            "rps_share": _div(row["rps"], base["rps"]),
        }
    return out


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


TABLE_HEADER = (
    *("case", "p50 ms", "p99 ms", "req/s", "ok %", "backend reads/req"),
    *("p50 x bare", "p99 x bare", "req/s / bare"),
)


def format_table(results: dict[str, Any]) -> str:
    """The rows and their ratios to the baseline as a Markdown table."""
    lines = []
    for row in results["rows"]:
        ratio = results["ratios"].get(row["case"])
        reads = row.get("backend_reads_per_req")
        lines.append(
            [
                row["label"],
                f"{row['p50_ms']:.2f}",
                f"{row['p99_ms']:.2f}",
                f"{row['rps']:.0f}",
                f"{row['ok_pct']:.1f}",
                "-" if reads is None else f"{reads:.2f}",
                *(
                    ["1 (baseline)", "1", "1"]
                    if ratio is None
                    else [f"{ratio[k]:.2f}" for k in ("p50_x", "p99_x", "rps_share")]
                ),
            ]
        )
    return markdown_table(TABLE_HEADER, lines)


def print_results(results: dict[str, Any]) -> None:
    params = results["params"]
    print(
        f"\nRouter lookup benchmark: GET /services/{SERVICE}, {params['providers']} providers "
        f"({params['body_bytes']} bytes of JSON), {params['clients']} keep-alive clients in "
        f"another process, {params['seconds']:g}s per case after {params['warmup']:g}s warm-up, "
        f"{results['machine']['cpu_count']} cores, uvicorn on {results['machine']['http_impl']}"
    )
    print(format_table(results))
    print(f"wall time {results['wall_s']:.1f}s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--clients", type=int, default=64, help="concurrent keep-alive clients")
    add("--seconds", type=float, default=5.0, help="measured seconds per case")
    add("--warmup", type=float, default=1.0, help="seconds of load before each measurement")
    add("--providers", type=int, default=10, help="providers of the service (the JSON's size)")
    add("--dht-nodes", type=int, default=12, help="nodes of the local DHT network")
    add("--out", type=Path, default=DEFAULT_OUT, help="write the figures as JSON here")
    add("--log-level", default="INFO", help="progress logs on stderr")
    # The child processes' own options.
    add("--serve", choices=("bare", "router", "router-dht"), help=argparse.SUPPRESS)
    add("--load", action="store_true", help=argparse.SUPPRESS)
    add("--case", choices=tuple(CASES), help=argparse.SUPPRESS)
    add("--port", type=int, help=argparse.SUPPRESS)
    add("--body-file", help=argparse.SUPPRESS)
    add("--redis-url", help=argparse.SUPPRESS)
    add("--seed", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--clients must be >= 1, --seconds > 0, --warmup >= 0")
    if not 1 <= args.providers <= READ_LIMIT or args.dht_nodes < 2:
        parser.error(f"--providers must be 1..{READ_LIMIT}, --dht-nodes >= 2")
    args.body = Path(args.body_file).read_bytes() if args.body_file else b""
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level="WARNING" if args.serve or args.load else args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "dht_bridge"):  # a line per request, a line per node
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.serve:
        return asyncio.run(serve_child(args))
    if args.load:
        return asyncio.run(load_child(args))
    try:
        results = asyncio.run(run(args))
    except BenchError as exc:
        logger.error("benchmark failed: %s", exc)
        return 1
    print_results(results)
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
