"""The router end to end, through real servers and processes on loopback.

Part one serves `create_app(...)` with uvicorn on an OS port, in front of real uvicorn upstream
"workers", with a real Registry on the test redis-server; everything goes over TCP, so the
client address, streaming and connection failures are the real ones. The tunnel policy is
widened to loopback explicitly, in both the router's configuration and the registry.

Part two runs `rma router` as real processes sharing that Redis, with `rma flush` as a real
process against one of them, and stops them with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from dht_bridge.tunnels import TunnelPolicy
from edge_router.app import create_app
from edge_router.config import RouterConfig
from rma.exits import Exit
from tests.support.helpers import free_port, make_record, wait_for
from tests.support.redis_server import TEST_REDIS_TIMEOUT
from tests.support.router import ADMIN_TOKEN
from tests.support.streaming import StreamingUpstream
from tests.support.upstreams import Upstream, header, header_names, refusing_port, serve, url_of

ROOT = Path(__file__).resolve().parents[2]
# The tests, and only they, let tunnel URLs point at loopback.
LOOPBACK = TunnelPolicy(allow_loopback=True)
IDLE, BUSY = 0.0, 0.9  # with two providers, the less loaded is always tried first
SPOOFED = "198.51.100.9"  # a documentation address a client claims to be


# -- part one: the app under uvicorn -------------------------------------------------------


@pytest.fixture
async def loopback_registry(redis_url: str) -> AsyncIterator[Registry]:
    """A Registry on the (empty) session server that admits loopback tunnel URLs."""
    settings = RegistrySettings(redis_url=redis_url, timeout=TEST_REDIS_TIMEOUT)
    registry = open_registry(settings, policy=LOOPBACK)
    try:
        yield registry
    finally:
        await registry.aclose()


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    """Servers, sockets and clients a test opens, closed when it ends (last opened first)."""
    async with AsyncExitStack() as stack:
        yield stack


def loopback_config(**changes: Any) -> RouterConfig:
    """The router's configuration with the tunnel policy widened to loopback."""
    return RouterConfig(admin_token=ADMIN_TOKEN, policy=LOOPBACK, **changes)


async def start_router(
    stack: AsyncExitStack, registry: Registry, config: RouterConfig
) -> tuple[Starlette, httpx.AsyncClient]:
    """The router app under uvicorn on an OS port, and a client talking to it over TCP."""
    app = create_app(config, registry=registry, listen_events=False)
    await stack.enter_async_context(app.router.lifespan_context(app))
    url = await stack.enter_async_context(serve(app))
    client = httpx.AsyncClient(base_url=url, trust_env=False, timeout=GATE * 2)
    await stack.enter_async_context(client)
    return app, client


async def register(client: httpx.AsyncClient, record: WorkerRecord) -> None:
    """POST /workers over HTTP, as a worker off the DHT does."""
    answer = await client.post("/workers", json=record.to_dict())
    assert answer.status_code == 200, answer.text
    assert answer.json()["stored_in"] == "redis"


async def test_route_retries_on_the_provider_that_is_up(
    stack: AsyncExitStack, loopback_registry: Registry
) -> None:
    up = Upstream("alive")
    alive = make_record(tunnel_url=await stack.enter_async_context(up.running()), load=BUSY)
    # Bound, never listening: connections to it are refused, as to a worker that went away.
    dead = make_record(tunnel_url=url_of(stack.enter_context(refusing_port())), load=IDLE)
    app, client = await start_router(stack, loopback_registry, loopback_config())
    for record in (dead, alive):
        await register(client, record)

    got = await client.get("/route/ocr/jobs/1", params={"q": "x"})
    posted = await client.post("/route/ocr/jobs", content=b"payload")

    assert got.status_code == 200, got.text
    assert got.headers["x-rma-worker"] == alive.worker_id
    assert got.json()["upstream"] == "alive"
    assert posted.status_code == 200, posted.text
    assert posted.headers["x-rma-worker"] == alive.worker_id
    assert [(s["method"], s["raw_path"], s["query"], s["body"]) for s in up.seen] == [
        ("GET", "/jobs/1", "q=x", ""),
        ("POST", "/jobs", "", "payload"),
    ]
    health = app.state.rma.proxy.health
    assert health.failures(dead.worker_id) == 2  # the less loaded one was tried first, twice
    assert health.failures(alive.worker_id) == 0


async def test_forwarded_for_is_the_tcp_peer_and_spoofed_cf_connecting_ip_is_ignored(
    stack: AsyncExitStack, loopback_registry: Registry
) -> None:
    up = Upstream("a")
    record = make_record(tunnel_url=await stack.enter_async_context(up.running()))
    _, client = await start_router(stack, loopback_registry, loopback_config())
    # The same router behind a cloudflared on this host: there the loopback peer is trusted.
    behind_tunnel = loopback_config(trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
    _, trusting = await start_router(stack, loopback_registry, behind_tunnel)
    await register(client, record)
    claims = {"CF-Connecting-IP": SPOOFED, "CF-Ray": "8f00aa11bb22-LHR"}

    spoofed = await client.get("/route/ocr/who", headers=claims)
    believed = await trusting.get("/route/ocr/who", headers=claims)

    assert spoofed.status_code == believed.status_code == 200
    from_stranger, from_tunnel = up.seen
    assert header(from_stranger, "x-forwarded-for") == "127.0.0.1"
    assert header(from_stranger, "cf-ray") is None  # a stranger's CF-Ray is a claim too
    assert header(from_tunnel, "x-forwarded-for") == SPOOFED  # the check is not vacuous
    assert header(from_tunnel, "cf-ray") == "8f00aa11bb22-LHR"
    for seen in (from_stranger, from_tunnel):
        assert "cf-connecting-ip" not in header_names(seen)


TOTAL = 32 * 1024 * 1024
GATE = 10.0  # seconds a side waits for the other before the test fails as "buffered"


async def test_32_mib_streams_through_the_router_both_ways_without_buffering(
    stack: AsyncExitStack, loopback_registry: Registry
) -> None:
    worker = StreamingUpstream(TOTAL, GATE)
    record = make_record(tunnel_url=await stack.enter_async_context(serve(worker.app)))
    _, client = await start_router(stack, loopback_registry, loopback_config())
    await register(client, record)

    tracemalloc.start()
    try:
        posted = await client.post("/route/ocr/sink", content=worker.upload())
        streamed, received, crc = await worker.download(client, "/route/ocr/source")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    expected = worker.expected_crc()
    assert posted.status_code == 200, posted.text
    assert posted.json() == {"size": TOTAL, "crc": expected}
    assert streamed.status_code == 200
    assert streamed.headers["x-rma-worker"] == record.worker_id
    assert (received, crc) == (TOTAL, expected)
    # Client, router and worker share this process: all of them together held far less.
    assert peak < TOTAL // 4, f"peak traced memory {peak / 2**20:.1f} MiB"


# -- part two: `rma router` and `rma flush` as processes -----------------------------------

START_TIMEOUT = 30.0  # a loaded 2-core machine imports slowly
STOP_TIMEOUT = 15.0  # the events listener notices the stop flag within about a second
EVENT_TIMEOUT = 10.0
START_ATTEMPTS = 3  # another process may take the port free_port() handed out


def router_env(redis_url: str, port: int, **extra: str) -> dict[str, str]:
    """This process's environment without any RMA_* setting, plus the router's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMA_")}
    env.update(
        RMA_PORT=str(port),
        RMA_REDIS_URL=redis_url,
        RMA_ADMIN_TOKEN=ADMIN_TOKEN,
        RMA_DHT_PORT="0",
        RMA_LOG_LEVEL="info",
        **extra,
    )
    return env


class RouterProcess:
    """`python -m rma router` on a free port, its log in a file."""

    def __init__(
        self, name: str, redis_url: str, workdir: Path, extra_env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.redis_url = redis_url
        self.extra_env = extra_env or {}
        self.log_path = workdir / f"router-{name}.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        """Start the process (it is not serving yet: see `ready`)."""
        self.port = free_port()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rma", "router"],
                cwd=ROOT,
                env=router_env(self.redis_url, self.port, **self.extra_env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def ready(self, client: httpx.AsyncClient) -> None:
        """Wait until /healthz answers 200; relaunch when the port was taken meanwhile."""
        for _ in range(START_ATTEMPTS):
            await wait_for(
                lambda: self._up_or_exited(client),
                timeout=START_TIMEOUT,
                message=f"router {self.name} /healthz",
            )
            assert self.process is not None
            if self.process.poll() is None:
                return
            assert self.process.returncode == Exit.START_FAILED, self.log()
            self.launch()
        raise AssertionError(f"router {self.name} did not start: {self.log()}")

    async def _up_or_exited(self, client: httpx.AsyncClient) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            return True
        with contextlib.suppress(httpx.TransportError):
            return (await client.get(self.url + "/healthz")).status_code == 200
        return False

    def terminate(self) -> int:
        """SIGTERM, then the exit code within the deadline (the test fails past it)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"router {self.name} still running {STOP_TIMEOUT:.0f}s after SIGTERM"
            ) from None

    def kill(self) -> None:
        """Make sure the process is gone (after a failed test)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)

    def log(self) -> str:
        """The tail of the process's log, for failure messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-30:])


@contextlib.contextmanager
def routers(
    redis_url: str, workdir: Path, *names: str, extra_env: dict[str, str] | None = None
) -> Iterator[list[RouterProcess]]:
    """Launch one router process per name (`extra_env`: more RMA_* settings); kill whatever
    still runs at the end."""
    processes = [RouterProcess(name, redis_url, workdir, extra_env) for name in names]
    try:
        for process in processes:
            process.launch()
        yield processes
    finally:
        for process in processes:
            process.kill()


async def metrics_of(client: httpx.AsyncClient, router: RouterProcess) -> dict[str, float]:
    """The gauges and counters of /metrics by name (labelled series under their full name)."""
    answer = await client.get(router.url + "/metrics")
    assert answer.status_code == 200
    figures: dict[str, float] = {}
    for line in answer.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            figures[name] = float(value)
    return figures


async def rma_client(router: RouterProcess, token: str, *args: str) -> tuple[int, str]:
    """`rma flush|lookup ... --router URL` as a process; its exit code and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMA_")}
    env["RMA_ADMIN_TOKEN"] = token
    process = await asyncio.create_subprocess_exec(
        # The router first: a later --router in `args` wins, as argparse has it.
        *(sys.executable, "-m", "rma", args[0], "--router", router.url, *args[1:]),
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(START_TIMEOUT):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def lookup(client: httpx.AsyncClient, router: RouterProcess) -> httpx.Response:
    """GET /services/ocr on one router."""
    answer = await client.get(router.url + "/services/ocr")
    assert answer.status_code == 200, answer.text
    return answer


async def test_rma_router_processes_share_a_flush_and_stop_on_sigterm(
    redis_url: str, tmp_path: Path
) -> None:
    record = make_record(services=["ocr"])  # a trycloudflare URL: the default policy holds
    async with httpx.AsyncClient(trust_env=False, timeout=EVENT_TIMEOUT) as client:
        with routers(redis_url, tmp_path, "one", "two") as (one, two):
            for router in (one, two):
                await router.ready(client)

            async def subscribed() -> bool:
                for router in (one, two):
                    if (await metrics_of(client, router))["rma_events_connected"] != 1:
                        return False
                return True

            # A flush is a pub/sub message: a router not yet subscribed would never hear it.
            await wait_for(subscribed, timeout=EVENT_TIMEOUT, message="both routers subscribed")

            stored = await client.post(one.url + "/workers", json=record.to_dict())
            assert stored.status_code == 200, stored.text
            first = await lookup(client, one)
            assert first.headers["x-cache"] == "MISS"
            assert first.json()["source"] == "redis"
            assert [p["worker_id"] for p in first.json()["providers"]] == [record.worker_id]
            assert (await lookup(client, one)).headers["x-cache"] == "HIT"
            assert (await lookup(client, two)).headers["x-cache"] == "MISS"
            assert (await lookup(client, two)).headers["x-cache"] == "HIT"
            assert (await metrics_of(client, two))["rma_cache_entries"] == 1

            code, output = await rma_client(one, ADMIN_TOKEN, "lookup", "ocr")
            assert code == 0, output
            assert record.worker_id[:12] in output
            assert record.tunnel_url in output  # the last column, once cut off
            assert "1 provider(s) of 'ocr'" in output
            code, output = await rma_client(one, ADMIN_TOKEN, "lookup", "asr")
            assert code == 1, output
            assert "no live providers of 'asr'" in output

            code, output = await rma_client(
                one, "wrong-token-0123456789", "flush", "--service", "ocr"
            )
            assert code == 1, output
            assert "403" in output
            code, output = await rma_client(
                one, ADMIN_TOKEN, "flush", "--service", "ocr", "--router", "not-a-url"
            )
            assert code == 2, output
            assert "not an http(s) URL" in output

            code, output = await rma_client(one, ADMIN_TOKEN, "flush", "--service", "ocr")
            assert code == 0, output
            assert "flushed 1 cached lookups (service ocr)" in output
            assert "other routers told: yes" in output
            assert "HTTP Request" not in output

            async def second_emptied() -> bool:
                return (await metrics_of(client, two))["rma_cache_entries"] == 0

            await wait_for(second_emptied, timeout=EVENT_TIMEOUT, message="the flush on two")
            assert (await metrics_of(client, two))["rma_events_received_total"] >= 1
            assert (await lookup(client, two)).headers["x-cache"] == "MISS"
            assert (await lookup(client, one)).headers["x-cache"] == "MISS"

            for router in (one, two):
                stopping = time.monotonic()
                code = router.terminate()
                log = router.log()
                assert code == 0, f"router {router.name} exited {code}:\n{log}"
                assert time.monotonic() - stopping < STOP_TIMEOUT
                assert "Application shutdown complete" in log, log
                assert "Traceback" not in log, log
