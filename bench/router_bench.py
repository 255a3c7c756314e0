"""Benchmark of the router's three hot paths against the ceiling of its stack, in one run.

Each case under the same load (`--clients` keep-alive connections from wrk, one thread, in its
own process; an in-process asyncio client when wrk is not installed):

  bare      a bare Starlette route answering the router's cache-hit JSON, byte for byte, on the
            router's server stack (uvicorn with the router's own h11 protocol class)
  hit       the router's `GET /services/ocr`, every request a fresh cache hit
  redis     the router's `GET /services/ocr?region=<unique>`, every request a miss read from Redis
  direct    no HTTP at all: `Registry.lookup` of the same providers straight from Redis
  dht       (with --dht) the router, every request a miss read from the DHT
  nginx     nginx as a reverse proxy (keep-alive upstream pool) to the upstream: a second nginx
            answering 1 KB from memory
  route     the router's `GET /route/ocr/x`, proxied to the same upstream

then, with one connection, bare, hit, redis, nginx and route again: the router's added latency
over its reference on each path (hit and redis over bare, route over nginx), in microseconds.
For /route it counts the upstream's new connections per 1,000 requests (nginx's stub_status).
nginx (Debian's `nginx`) is optional: without it the upstream is a uvicorn app and the nginx rows
say that nginx is missing. `--loop` picks the event loop of every server process and of the
`Registry.lookup` load (asyncio's or uvloop), so that the router and its references share it.

    .venv/bin/python bench/router_bench.py --seconds 5 --clients 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import shutil
import signal
import statistics
import subprocess
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
from edge_router.config import PROOF_OFF, RATE_OFF, RateSettings, RouterConfig
from edge_router.server import server_config
from tests.support.dht import start_network
from tests.support.helpers import free_port, make_record
from tests.support.redis_server import RedisServer
from tests.support.upstreams import refusing_port

logger = logging.getLogger("router_bench")

SCRIPT = Path(__file__).resolve()
DEFAULT_OUT = ROOT / "bench" / "results" / "router.json"
SERVICE = "ocr"
ROUTE_PATH = f"/route/{SERVICE}/x"
UPSTREAM_PATH = "/x"
UPSTREAM_BYTES = 1024
# The router reads up to this many providers per backend read and slices `?limit=` from them.
READ_LIMIT = RouterConfig.max_limit
LEASE = 1800.0  # seconds: the records outlive any run
# The providers' tunnel URLs are on loopback (the bench's upstream).
POLICY = TunnelPolicy(allow_loopback=True)
LOOPBACK = DHTSettings(host="127.0.0.1", port=0)
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
REQUEST_TIMEOUT = 30.0
NO_NGINX = "nginx is not installed (apt-get install -y nginx): no nginx reference"

CASES: dict[str, str] = {
    "bare": "bare Starlette, same JSON",
    "hit": "router: cache hit",
    "redis": "router: miss from Redis",
    "direct": "Registry.lookup, no HTTP",
    "dht": "router: miss from DHT",
    "nginx": "nginx reverse proxy, 1 KB",
    "route": "router: /route, 1 KB",
}
# The router's paths (--paths): a cache hit, a miss from Redis, a routed request.
PATHS = ("hit", "miss", "route")
# Each case's reference: its ratios are taken against it.
REFERENCE = {"hit": "bare", "redis": "bare", "direct": "bare", "dht": "bare", "route": "nginx"}
# The cases measured again with one connection, for the latency the router adds.
SINGLE = ("bare", "hit", "redis", "nginx", "route")
# What each lookup case must show in X-Cache and in the body's "source" (checked before the load).
EXPECT: dict[str, tuple[str, str]] = {
    "hit": ("HIT", "cache"),
    "redis": ("MISS", "redis"),
    "dht": ("MISS", "dht"),
}
# wrk's Lua: `done` prints the figures as one JSON line; with UNIQUE, each request a new region.
WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,'
    .. '"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""
WRK_UNIQUE = """
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, wrk.path .. "?region=%s-" .. n)
end
"""


# -- the data ------------------------------------------------------------------------------


def make_records(count: int, upstream: str) -> list[WorkerRecord]:
    """`count` providers of SERVICE with distinct loads, all served by `upstream`."""
    now = time.time()
    return [
        make_record(
            services=[SERVICE],
            now=now,
            ttl=LEASE,
            load=round((i + 1) / (count + 1), 4),
            capabilities={"gpu": i % 2 == 0, "mem_gb": 8 + i},
            tunnel_url=upstream,
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
    """One route, the router's lookup path, answering fixed JSON bytes; and the 1 KB upstream
    answer on every other path (the upstream when nginx is missing)."""

    async def lookup(request: Request) -> Response:
        return Response(body, media_type="application/json")

    async def upstream(request: Request) -> Response:
        return Response(b"u" * UPSTREAM_BYTES, media_type="application/octet-stream")

    return Starlette(
        routes=[
            Route("/services/{service}", lookup, methods=["GET"]),
            Route("/{path:path}", upstream, methods=["GET"]),
        ]
    )


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
            registry=RegistrySettings(redis_url=args.redis_url),
            dht_bootstrap=seeds,
            policy=POLICY,
            # The bench's upstream answers no tunnel challenge, and its clients are loopback.
            tunnel_proof=PROOF_OFF,
            rates=RateSettings(register=RATE_OFF, route=RATE_OFF, admin=RATE_OFF),
        )
        app = create_app(config, registry=registry, dht=dht)
    server = _Server(
        # The router's server stack (as `rma router` serves it) for every case; --http
        # httptools: uvicorn's httptools protocol instead, to compare.
        server_config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off" if args.serve == "bare" else "on",
            **({} if args.http == "router" else {"http": args.http}),
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


def loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """`--loop`'s event loop for `asyncio.Runner(loop_factory=...)`; None: asyncio's own."""
    if loop == "asyncio":
        return None
    import uvloop  # only when asked for: not a runtime dependency (the test extra has it)

    return uvloop.new_event_loop


def stack_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The options that give a server process (or the `Registry.lookup` load) the run's stack:
    its HTTP protocol and its event loop."""
    return ("--http", args.http, "--loop", args.loop)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# -- the fallback load process (`--load`), when wrk is missing ---------------------------------


@dataclass
class Tally:
    """What one load run saw: latencies inside the window and outcomes."""

    window_start: float
    window_end: float
    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    bad: int = 0
    statuses: Counter[int] = field(default_factory=Counter)

    def add(self, started: float, ended: float, good: bool) -> None:
        if self.window_start <= ended <= self.window_end:
            self.latencies.append(ended - started)
            if good:
                self.ok += 1
            else:
                self.bad += 1

    def result(self) -> dict[str, Any]:
        seconds = self.window_end - self.window_start
        return _row(
            requests=self.ok + self.bad,
            failed=self.bad,
            seconds=seconds,
            p50_s=quantile(self.latencies, 0.50),
            p99_s=quantile(self.latencies, 0.99),
            mean_s=statistics.fmean(self.latencies) if self.latencies else 0.0,
        )


def _header(head: bytes, name: bytes) -> bytes | None:
    start = head.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    return head[start : head.index(b"\r\n", start)].strip()


async def http_client(index: int, args: argparse.Namespace, tally: Tally) -> None:
    """One keep-alive connection sending requests back to back until the window ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    try:
        sent = 0
        while time.perf_counter() < tally.window_end:
            path = args.path + (f"?region=c{index}-{sent:x}" if args.unique else "")
            sent += 1
            started = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n".encode())
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(_header(head.lower(), b"content-length") or b"0")
                await reader.readexactly(length)
            status = int(head[9:12])
            tally.statuses[status] += 1
            tally.add(started, time.perf_counter(), status == 200)
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
    """Run one load (`direct`, or HTTP without wrk) and print its figures as one JSON line."""
    start = time.perf_counter() + args.warmup
    tally = Tally(window_start=start, window_end=start + args.seconds)
    if args.redis_url:
        registry = open_registry(RegistrySettings(redis_url=args.redis_url), policy=POLICY)
        try:
            await asyncio.gather(
                *(redis_client(registry, args.providers, tally) for _ in range(args.clients))
            )
        finally:
            await registry.aclose()
    else:
        await asyncio.gather(*(http_client(i, args, tally) for i in range(args.clients)))
    print(json.dumps(tally.result()), flush=True)
    return 0


def _row(
    *, requests: int, failed: int, seconds: float, p50_s: float, p99_s: float, mean_s: float
) -> dict[str, Any]:
    return {
        "requests": requests,
        "failed": failed,
        "ok_pct": round(100.0 * (requests - failed) / requests, 2) if requests else 0.0,
        "p50_ms": p50_s * 1000,
        "p99_ms": p99_s * 1000,
        "mean_ms": mean_s * 1000,
        "rps": (requests - failed) / seconds if seconds > 0 else 0.0,
    }


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


class Nginx:
    """An nginx of the bench's own (its config, pid and logs in the run's directory), in the
    foreground: `upstream` answers 1 KB from memory and reports stub_status; `proxy` passes
    everything to `upstream_port` over a keep-alive pool."""

    def __init__(self, binary: str, name: str, workdir: Path) -> None:
        self.binary = binary
        self.name = name
        self.dir = workdir / f"nginx-{name}"
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self, upstream_port: int | None) -> str:
        temp = "\n".join(
            f"  {kind}_temp_path {self.dir}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        if upstream_port is None:
            body = "u" * UPSTREAM_BYTES
            site = (
                "  location = /nginx_status { stub_status; }\n"
                f'  location / {{ default_type application/octet-stream; return 200 "{body}"; }}'
            )
            pool = ""
        else:
            site = (
                "  location / { proxy_pass http://up; proxy_http_version 1.1;\n"
                '    proxy_set_header Connection ""; }'
            )
            pool = f"upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}"
        return f"""
worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
{temp}
  {pool}
  server {{
  listen 127.0.0.1:{self.port};
{site}
  }}
}}
"""

    async def start(self, upstream_port: int | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config(upstream_port))
        with (self.dir / "stderr.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *(self.binary, "-p", str(self.dir), "-c", str(conf)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if self.process.returncode is not None or time.monotonic() > deadline:
                    raise BenchError(f"nginx {self.name} did not start: see {self.dir}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGQUIT)  # graceful: the worker finishes, then exits
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()


def find_nginx() -> str | None:
    """nginx's binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("nginx")
    if found is None and Path("/usr/sbin/nginx").exists():
        return "/usr/sbin/nginx"
    return found


async def upstream_counts(client: httpx.AsyncClient, url: str) -> tuple[int, int] | None:
    """nginx's (accepted connections, requests) so far; None when the upstream is no nginx."""
    answer = await client.get(url + "/nginx_status")
    if answer.status_code != 200 or "server accepts" not in answer.text:
        return None
    accepts, _, requests = answer.text.splitlines()[2].split()
    return int(accepts), int(requests)


async def run_wrk(
    wrk: str, url: str, args: argparse.Namespace, clients: int, workdir: Path, *, unique: bool
) -> dict[str, Any]:
    """wrk warm-up, then `--seconds` measured; the figures of the measured run."""
    script = workdir / ("wrk-unique.lua" if unique else "wrk.lua")
    out: dict[str, Any] = {}
    for run, seconds in enumerate((args.warmup, args.seconds)):
        if seconds <= 0:
            continue
        # Each run its own regions: the measured run must not hit what the warm-up cached.
        tag = f"w{time.monotonic_ns() % 10**9:x}{run}"
        script.write_text((WRK_UNIQUE % tag if unique else "") + WRK_DONE)
        # wrk counts whole seconds.
        whole = max(1, round(seconds))
        process = await asyncio.create_subprocess_exec(
            *(wrk, "-t1", f"-c{clients}", f"-d{whole}s", f"--timeout={REQUEST_TIMEOUT:g}s"),
            *("-s", str(script), url),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(
            process.communicate(), seconds + START_TIMEOUT + REQUEST_TIMEOUT
        )
        if process.returncode != 0:
            raise BenchError(f"wrk failed on {url}: {stderr.decode(errors='replace')[-500:]}")
        out = json.loads(stdout.decode().strip().splitlines()[-1])
    failed = sum(out[k] for k in ("connect", "read", "write", "status", "timeout"))
    return _row(
        requests=out["requests"],
        failed=min(failed, out["requests"]),
        seconds=out["duration_us"] / 1e6,
        p50_s=out["p50_us"] / 1e6,
        p99_s=out["p99_us"] / 1e6,
        mean_s=out["mean_us"] / 1e6,
    )


async def run_python_load(args: argparse.Namespace, clients: int, *options: str) -> dict[str, Any]:
    """One `--load` child (the in-process client, or `Registry.lookup`); its figures."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, str(SCRIPT), "--load", "--clients", str(clients)),
        *("--seconds", str(args.seconds), "--warmup", str(args.warmup)),
        *("--providers", str(args.providers), *options),
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
        raise BenchError("a load process did not finish in time") from None
    if process.returncode != 0:
        raise BenchError(f"a load process failed: {err.decode(errors='replace')[-2000:]}")
    row: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return row


class Bench:
    """The run's shared parts: options, the load generator, the work directory, an httpx client
    for probes and /metrics, and py-spy when profiling."""

    def __init__(self, args: argparse.Namespace, workdir: Path, client: httpx.AsyncClient) -> None:
        self.args = args
        self.workdir = workdir
        self.client = client
        self.wrk = None if args.no_wrk else shutil.which("wrk")

    async def load(
        self, case: str, url: str, path: str, clients: int, *, pid: int | None = None
    ) -> dict[str, Any]:
        """The figures of `clients` connections on `url + path` (unique regions for misses)."""
        unique = case in ("redis", "dht")
        logger.info("measuring %s, %d connection(s)", CASES[case], clients)
        with self.profiled(f"{case}-c{clients}", pid):
            if self.wrk is not None:
                return await run_wrk(
                    self.wrk, url + path, self.args, clients, self.workdir, unique=unique
                )
            port = url.rsplit(":", 1)[1]
            return await run_python_load(
                self.args, clients, "--port", port, "--path", path, *(["--unique"] * unique)
            )

    @contextlib.contextmanager
    def profiled(self, name: str, pid: int | None) -> Iterator[None]:
        """py-spy samples `pid` for the block, into `--profile`/<name>.txt (collapsed stacks)."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if self.args.profile is None or pid is None or not Path(spy).exists():
            yield
            return
        self.args.profile.mkdir(parents=True, exist_ok=True)
        out = self.args.profile / f"{name}.txt"
        seconds = str(int(self.args.warmup + self.args.seconds + 1))
        command = [spy, "record", "--format", "raw", "-r", "250", "-d", seconds]
        with subprocess.Popen(
            [*command, "-p", str(pid), "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as spy_process:
            try:
                yield
            finally:
                spy_process.wait(STOP_TIMEOUT + float(seconds))


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
    bench: Bench, case: str, router: ServerProcess, path: str, clients: int
) -> dict[str, Any]:
    """One router case, with the backend reads it caused per answered request."""
    before = await figures(bench.client, router.url)
    assert router.process is not None
    row = await bench.load(case, router.url, path, clients, pid=router.process.pid)
    after = await figures(bench.client, router.url)
    served = ("rma_cache_hits_total", "rma_cache_misses_total")
    answered = max(1.0, sum(after[name] - before[name] for name in served))
    reads = after["rma_backend_reads_total"] - before["rma_backend_reads_total"]
    row["backend_reads_per_req"] = reads / answered
    return row


async def check_lookup(client: httpx.AsyncClient, url: str, case: str, expected: bytes) -> None:
    """One request of `case` answers 200 with the expected X-Cache and body."""
    region = "?region=probe-" + case if case in ("redis", "dht") else ""
    answer = await client.get(f"{url}/services/{SERVICE}{region}")
    want_cache, source = EXPECT[case]
    body = expected_body(expected, source)
    if answer.headers.get("x-cache") != want_cache or answer.content != body:
        raise BenchError(f"{case}: unexpected answer {answer.status_code} {answer.text[:300]}")


async def check_route(client: httpx.AsyncClient, url: str) -> None:
    """One routed request answers 200 with the upstream's 1 KB."""
    answer = await client.get(url + ROUTE_PATH)
    if answer.status_code != 200 or len(answer.content) != UPSTREAM_BYTES:
        raise BenchError(f"/route: unexpected answer {answer.status_code} {answer.text[:300]}")


def expected_body(hit_body: bytes, source: str) -> bytes:
    """The router's answer for `source`: the cache-hit answer with another "source"."""
    marker = b'"source":"cache"'
    if hit_body.count(marker) != 1:
        raise BenchError(f"unexpected lookup body: {hit_body[:200]!r}")
    return hit_body.replace(marker, f'"source":"{source}"'.encode())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every case in one run; the results as a JSON-ready dict."""
    started = time.monotonic()
    rows: dict[str, dict[str, Any]] = {}
    single: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    nginx_binary = find_nginx()
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis")
        redis.start()
        nodes: list[DHTNode] = []
        stack = contextlib.AsyncExitStack()
        try:
            async with stack, httpx.AsyncClient(trust_env=False, timeout=REQUEST_TIMEOUT) as client:
                bench = Bench(args, workdir, client)
                if bench.wrk is None:
                    notes.append(
                        "wrk is not installed (apt-get install -y wrk): load from an asyncio client"
                    )
                upstream_nginx = proxy = None
                if nginx_binary is None:
                    notes.append(NO_NGINX)
                    logger.warning(NO_NGINX)
                    fallback = await stack.enter_async_context(
                        server(
                            "upstream", workdir, "--body-file", "/dev/null", *stack_options(args)
                        )
                    )
                    upstream_url = fallback.url
                else:
                    upstream_nginx = Nginx(nginx_binary, "upstream", workdir)
                    proxy = Nginx(nginx_binary, "proxy", workdir)
                    stack.push_async_callback(upstream_nginx.stop)
                    stack.push_async_callback(proxy.stop)
                    await upstream_nginx.start()
                    await proxy.start(upstream_nginx.port)
                    upstream_url = upstream_nginx.url
                records = make_records(args.providers, upstream_url)
                async with open_registry(
                    RegistrySettings(redis_url=redis.url), policy=POLICY
                ) as registry:
                    for record in records:
                        if not await registry.upsert(record):
                            raise BenchError("a record was refused by Redis")
                hit_body = await _router_side(bench, rows, single, redis.url, upstream_url)
                if proxy is not None and "route" in args.paths:
                    rows["nginx"] = await bench.load(
                        "nginx", proxy.url, UPSTREAM_PATH, args.clients
                    )
                    single["nginx"] = await bench.load("nginx", proxy.url, UPSTREAM_PATH, 1)
                    counts = await _upstream_counts_of(bench, proxy.url, upstream_url)
                    if counts is not None:
                        rows["nginx"]["upstream_conns_per_1k"] = counts
                body_file = workdir / "hit.json"
                body_file.write_bytes(hit_body)
                if {"hit", "miss"} & set(args.paths):
                    async with server(
                        "bare", workdir, "--body-file", str(body_file), *stack_options(args)
                    ) as bare:
                        assert bare.process is not None
                        for clients, into in ((args.clients, rows), (1, single)):
                            into["bare"] = await bench.load(
                                "bare",
                                bare.url,
                                f"/services/{SERVICE}",
                                clients,
                                pid=bare.process.pid,
                            )
                if "miss" in args.paths:
                    logger.info("measuring %s", CASES["direct"])
                    rows["direct"] = await run_python_load(
                        args, args.clients, "--redis-url", redis.url, "--loop", args.loop
                    )
                if args.dht:
                    nodes = await start_network(args.dht_nodes, settings=LOOPBACK)
                    for i, record in enumerate(records):
                        await nodes[i % len(nodes)].publish(record)
                    with refusing_port() as dead:
                        dead_url = "redis://{}:{}/0".format(*dead.getsockname())
                        rows["dht"] = await _dht_side(bench, workdir, dead_url, nodes, hit_body)
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
            "body_bytes": len(hit_body),
            "upstream_bytes": UPSTREAM_BYTES,
            "load": "wrk -t1" if bench.wrk else "asyncio client",
            "upstream": "nginx" if nginx_binary else "uvicorn (nginx missing)",
            "notes": notes,
            "miss_method": "every request asks for ?region=<unique per request>: the region is "
            "part of the cache key and no provider has one, so each request misses, makes its "
            "own backend read and gets the same providers; backend_reads_per_req, from the "
            "router's /metrics, shows it",
            "latency_method": "closed loop: each connection sends its next request when the "
            "last is answered; figures are of the measured run after a warm-up run",
        },
        "machine": machine(
            *("uvicorn", "starlette", "httpx", "httpcore", "redis", "h11", "h2", "uvloop"),
            http_impl="router protocol class (h11)" if args.http == "router" else args.http,
            loop=args.loop,
            nginx=nginx_binary,
        ),
        "rows": [
            {"case": case, "label": CASES[case], **rows[case]} for case in CASES if case in rows
        ],
        "ratios": ratios(rows),
        "single": [
            {"case": case, "label": CASES[case], **single[case]}
            for case in SINGLE
            if case in single
        ],
        "added_us": added_latency(single),
        "wall_s": time.monotonic() - started,
    }


async def _router_side(
    bench: Bench,
    rows: dict[str, dict[str, Any]],
    single: dict[str, dict[str, Any]],
    redis_url: str,
    upstream_url: str,
) -> bytes:
    args = bench.args
    client = bench.client
    async with server(
        "router", bench.workdir, "--redis-url", redis_url, *stack_options(args)
    ) as router:
        first = await client.get(f"{router.url}/services/{SERVICE}")
        hit = await client.get(f"{router.url}/services/{SERVICE}")
        if (first.headers.get("x-cache"), hit.headers.get("x-cache")) != ("MISS", "HIT"):
            raise BenchError(f"the router did not cache: {first.text[:300]}")
        for case in ("hit", "redis"):
            await check_lookup(client, router.url, case, hit.content)
        await check_route(client, router.url)
        lookup = f"/services/{SERVICE}"
        for clients, into in ((args.clients, rows), (1, single)):
            if "hit" in args.paths:
                into["hit"] = await measure_router(bench, "hit", router, lookup, clients)
            if "miss" in args.paths:
                into["redis"] = await measure_router(bench, "redis", router, lookup, clients)
            if "route" not in args.paths:
                continue
            into["route"] = await measure_router(bench, "route", router, ROUTE_PATH, clients)
            if clients == args.clients:
                counts = await _upstream_counts_of(
                    bench, router.url + "/route/" + SERVICE, upstream_url
                )
                if counts is not None:
                    rows["route"]["upstream_conns_per_1k"] = counts
    return hit.content


async def _upstream_counts_of(bench: Bench, front: str, upstream_url: str) -> float | None:
    """New upstream connections per 1,000 requests through `front` on a short extra load (a
    warm pool first: the count is of the steady state)."""
    before = await upstream_counts(bench.client, upstream_url)
    if before is None:
        return None
    saved = bench.args.warmup
    bench.args.warmup = 0
    try:
        await bench.load("route", front, UPSTREAM_PATH, bench.args.clients)
    finally:
        bench.args.warmup = saved
    after = await upstream_counts(bench.client, upstream_url)
    assert after is not None
    # The status reads themselves: one connection and one request each.
    accepts = after[0] - before[0] - 1
    requests = max(1, after[1] - before[1] - 1)
    return round(1000 * accepts / requests, 2)


async def _dht_side(
    bench: Bench, workdir: Path, dead_url: str, nodes: Sequence[DHTNode], hit_body: bytes
) -> dict[str, Any]:
    seed = "{}:{}".format(*nodes[0].address)
    options = ("--redis-url", dead_url, "--seed", seed, *stack_options(bench.args))
    async with server("router-dht", workdir, *options) as router:
        await check_lookup(bench.client, router.url, "dht", hit_body)
        return await measure_router(
            bench, "dht", router, f"/services/{SERVICE}", bench.args.clients
        )


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each case against its reference: latency multiples (above 1 is slower) and the share of
    the reference's throughput."""
    out = {}
    for case, reference in REFERENCE.items():
        row, base = rows.get(case), rows.get(reference)
        if row is None or base is None:
            continue
        out[case] = {
            "p50_x": _div(row["p50_ms"], base["p50_ms"]),
            "p99_x": _div(row["p99_ms"], base["p99_ms"]),
            "rps_share": _div(row["rps"], base["rps"]),
            "p50_added_ms": row["p50_ms"] - base["p50_ms"],
        }
    return out


def added_latency(single: dict[str, dict[str, Any]]) -> dict[str, float]:
    """With one connection: the router's p50 minus its reference's, in microseconds."""
    return {
        case: round((single[case]["p50_ms"] - single[ref]["p50_ms"]) * 1000, 1)
        for case, ref in REFERENCE.items()
        if case in single and ref in single
    }


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


TABLE_HEADER = (
    *("case", "p50 ms", "p99 ms", "req/s", "failed", "backend reads/req", "upstream conns/1k"),
    *("reference", "p50 x ref", "p99 x ref", "req/s / ref"),
)


def format_table(results: dict[str, Any]) -> str:
    """The rows and their ratios to their references as a Markdown table."""
    lines = []
    for row in results["rows"]:
        ratio = results["ratios"].get(row["case"])
        reads = row.get("backend_reads_per_req")
        conns = row.get("upstream_conns_per_1k")
        lines.append(
            [
                row["label"],
                f"{row['p50_ms']:.2f}",
                f"{row['p99_ms']:.2f}",
                f"{row['rps']:.0f}",
                str(row["failed"]),
                "-" if reads is None else f"{reads:.2f}",
                "-" if conns is None else f"{conns:.2f}",
                *(
                    ["-", "1", "1", "1"]
                    if ratio is None
                    else [REFERENCE[row["case"]]]
                    + [f"{ratio[k]:.2f}" for k in ("p50_x", "p99_x", "rps_share")]
                ),
            ]
        )
    return markdown_table(TABLE_HEADER, lines)


def format_single(results: dict[str, Any]) -> str:
    """One connection: p50, p99 and the router's added p50 over its reference, in µs."""
    added = results["added_us"]
    lines = [
        [
            row["label"],
            f"{row['p50_ms'] * 1000:.0f}",
            f"{row['p99_ms'] * 1000:.0f}",
            f"{row['rps']:.0f}",
            "-"
            if row["case"] not in added
            else f"{added[row['case']]:+.0f} over {REFERENCE[row['case']]}",
        ]
        for row in results["single"]
    ]
    return markdown_table(
        ("case (1 connection)", "p50 µs", "p99 µs", "req/s", "added p50 µs"), lines
    )


def print_results(results: dict[str, Any]) -> None:
    params = results["params"]
    print(
        f"\nRouter benchmark: GET /services/{SERVICE} ({params['providers']} providers, "
        f"{params['body_bytes']} bytes of JSON) and GET {ROUTE_PATH} ({params['upstream_bytes']} "
        f"bytes from {params['upstream']}); load: {params['load']}, {params['clients']} "
        f"keep-alive connections, {params['seconds']:g}s per case after {params['warmup']:g}s "
        f"warm-up, {results['machine']['cpu_count']} cores, {results['machine']['loop']} loop"
    )
    for note in params["notes"]:
        print(f"NOTE: {note}")
    print(format_table(results))
    print()
    print(format_single(results))
    print(f"wall time {results['wall_s']:.1f}s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--clients", type=int, default=64, help="concurrent keep-alive connections")
    add("--seconds", type=float, default=5.0, help="measured seconds per case")
    add("--warmup", type=float, default=1.0, help="seconds of load before each measurement")
    add("--providers", type=int, default=10, help="providers of the service (the JSON's size)")
    add(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=list(PATHS),
        help="the router's paths to measure (each with its references)",
    )
    add("--dht", action="store_true", help="also measure a miss read from the DHT")
    add("--dht-nodes", type=int, default=12, help="nodes of the local DHT network (--dht)")
    add(
        "--http",
        choices=("router", "httptools"),
        default="router",
        help="the servers' HTTP protocol: the router's h11 class, or httptools (to compare)",
    )
    add(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the event loop of every server process and of the Registry.lookup load "
        "(uvloop: pip install uvloop)",
    )
    add("--no-wrk", action="store_true", help="load from the asyncio client even if wrk is here")
    add("--profile", type=Path, help="py-spy each server under load into this directory")
    add("--out", type=Path, default=DEFAULT_OUT, help="write the figures as JSON here")
    add("--log-level", default="INFO", help="progress logs on stderr")
    # The child processes' own options.
    add("--serve", choices=("bare", "router", "router-dht", "upstream"), help=argparse.SUPPRESS)
    add("--load", action="store_true", help=argparse.SUPPRESS)
    add("--port", type=int, help=argparse.SUPPRESS)
    add("--path", help=argparse.SUPPRESS)
    add("--unique", action="store_true", help=argparse.SUPPRESS)
    add("--body-file", help=argparse.SUPPRESS)
    add("--redis-url", help=argparse.SUPPRESS)
    add("--seed", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--clients must be >= 1, --seconds > 0, --warmup >= 0")
    if not 1 <= args.providers <= READ_LIMIT or args.dht_nodes < 2:
        parser.error(f"--providers must be 1..{READ_LIMIT}, --dht-nodes >= 2")
    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        parser.error("--loop uvloop: uvloop is not installed (.venv/bin/pip install uvloop)")
    if args.serve == "upstream":
        args.serve = "bare"
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
    if args.serve or args.load:
        # The HTTP load without wrk stays on asyncio's loop whatever --loop says: the load is
        # not what is measured.
        chosen = args.loop if args.serve or args.redis_url else "asyncio"
        with asyncio.Runner(loop_factory=loop_factory(chosen)) as runner:
            return runner.run(serve_child(args) if args.serve else load_child(args))
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
