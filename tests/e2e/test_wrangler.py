"""The Cloudflare Worker (wrangler/) in front of a real `rma router`, both on loopback.

`wrangler dev --local` runs the Worker in workerd (Cloudflare's runtime, offline) with
ORIGIN_URL pointing at a `python -m rma router` process that shares its RMA_ORIGIN_SECRET.
A bootstrap request through the Worker reaches the router once and its repeats come from the
edge cache; the client address the Worker forwards is what the router hands to a provider;
a flush through the Worker empties the edge copy.

Needs `npm ci` in wrangler/ (scripts/test runs it first); skipped without it, unless
RMA_REQUIRE_WRANGLER=1 (scripts/test sets it) turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.helpers import free_port, make_record
from tests.support.router import ADMIN_TOKEN
from tests.support.upstreams import Upstream, header, header_names

ROOT = Path(__file__).resolve().parents[2]
WRANGLER_DIR = ROOT / "wrangler"
WRANGLER = WRANGLER_DIR / "node_modules" / ".bin" / "wrangler"
SECRET = "e2e-origin-secret-0123456789abcdef"
START_TIMEOUT = 60.0  # wrangler dev starts workerd; a loaded 2-core machine is slow at it
STOP_TIMEOUT = 15.0
COORDINATOR = "127.0.0.1:4000"  # what /dht/bootstrap hands out (nothing needs to listen there)
CLIENT = "203.0.113.7"  # the address Cloudflare's edge would put in CF-Connecting-IP
SPOOFED = "198.51.100.9"  # what a client claims in X-Forwarded-For


def _wrangler_available() -> None:
    if WRANGLER.exists() and shutil.which("node"):
        return
    why = f"{WRANGLER} or node is missing: run `npm ci` in wrangler/ (scripts/test does)"
    if os.environ.get("RMA_REQUIRE_WRANGLER") == "1":
        pytest.fail(why)
    pytest.skip(why)


@dataclass
class Process:
    """A child process in its own process group, with its output in a file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-40:])

    def stop(self) -> None:
        """SIGTERM to the group (wrangler's workerd child too), SIGKILL past the deadline."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT)
        # workerd may outlive wrangler in the group: never leave it behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def _launch(name: str, args: list[str], *, cwd: Path, env: dict[str, str], logs: Path) -> Process:
    log_path = logs / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process(name, process, log_path)


def _wait_until(ready: Callable[[], bool], process: Process, what: str) -> None:
    """Poll `ready` until it holds; fail with the process's log when it exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if process.process.poll() is not None:
            raise AssertionError(f"{what} exited ({process.process.returncode}):\n{process.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {START_TIMEOUT:.0f}s:\n{process.log()}")
        time.sleep(0.1)


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(url, timeout=2.0, trust_env=False).status_code == 200
    return False


@dataclass
class Edge:
    """The router's and the Worker's base URLs."""

    router: str
    worker: str


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """`python -m rma router` and `wrangler dev --local` in front of it, for this module."""
    _wrangler_available()
    work = tmp_path_factory.mktemp("wrangler-e2e")
    router_port, worker_port, inspector_port = free_port(), free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RMA_")}
    router_env = {
        **base_env,
        "RMA_HOST": "127.0.0.1",
        "RMA_PORT": str(router_port),
        "RMA_DHT_PORT": "0",
        "RMA_COORDINATORS": COORDINATOR,
        "RMA_ORIGIN_SECRET": SECRET,
        "RMA_ADMIN_TOKEN": ADMIN_TOKEN,
        "RMA_TUNNEL_ALLOW_LOOPBACK": "true",  # the provider below is a loopback upstream
        "RMA_LOG_LEVEL": "info",
    }
    worker_env = {
        **base_env,
        "WRANGLER_SEND_METRICS": "false",
        "WRANGLER_HIDE_BANNER": "true",
        "CLOUDFLARE_CF_FETCH_ENABLED": "false",
        "XDG_CONFIG_HOME": str(work / "xdg"),
        "NO_COLOR": "1",
    }
    router = _launch(
        "router", [sys.executable, "-m", "rma", "router"], cwd=ROOT, env=router_env, logs=work
    )
    worker: Process | None = None
    try:
        router_url = f"http://127.0.0.1:{router_port}"
        _wait_until(lambda: _answers(router_url + "/healthz"), router, "rma router")
        worker = _launch(
            "wrangler",
            [
                str(WRANGLER),
                "dev",
                "--local",
                "--ip",
                "127.0.0.1",
                "--port",
                str(worker_port),
                "--inspector-port",
                str(inspector_port),
                "--persist-to",
                str(work / "state"),
                "--show-interactive-dev-session=false",
                "--var",
                f"ORIGIN_URL:{router_url}",
                "--var",
                f"ORIGIN_SECRET:{SECRET}",
            ],
            cwd=WRANGLER_DIR,
            env=worker_env,
            logs=work,
        )
        worker_url = f"http://127.0.0.1:{worker_port}"
        # /healthz is passed through: an answer means the Worker and its origin are both up.
        _wait_until(lambda: _answers(worker_url + "/healthz"), worker, "wrangler dev")
        yield Edge(router=router_url, worker=worker_url)
    finally:
        if worker is not None:
            worker.stop()
        router.stop()


def requests_of(router: str, kind: str) -> float:
    """The router's count of requests of one class (all statuses), from /metrics."""
    text = httpx.get(router + "/metrics", trust_env=False).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f'rma_requests_total{{class="{kind}",'):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_bootstrap_through_the_worker_reaches_the_router_once(edge: Edge) -> None:
    path = "/dht/bootstrap?region=e2e-once"  # a key of its own in the module's edge cache
    async with httpx.AsyncClient(base_url=edge.worker, trust_env=False, timeout=10) as client:
        before = requests_of(edge.router, "bootstrap")
        first = await client.get(path)
        assert first.status_code == 200, first.text
        assert first.headers["x-edge-cache"] == "MISS"
        assert first.json()["peers"][0]["port"] == 4000
        assert requests_of(edge.router, "bootstrap") == before + 1

        # The copy is stored in ctx.waitUntil, after the answer: a repeat racing the store
        # may still miss, and then it reaches the router too. Wait for the first hit.
        misses = 0
        deadline = time.monotonic() + 10
        while (repeat := await client.get(path)).headers["x-edge-cache"] != "HIT":
            misses += 1
            assert time.monotonic() < deadline, "the edge never served a stored copy"
        assert repeat.json() == first.json()
        reached = requests_of(edge.router, "bootstrap")
        assert reached == before + 1 + misses
        for _ in range(5):
            again = await client.get(path)
            assert again.headers["x-edge-cache"] == "HIT"
        assert requests_of(edge.router, "bootstrap") == reached  # the counter does not move


async def test_router_believes_the_client_address_only_from_the_worker(edge: Edge) -> None:
    async with AsyncExitStack() as stack:
        upstream = Upstream("provider")
        record = make_record(
            services=["e2e-who"], tunnel_url=await stack.enter_async_context(upstream.running())
        )
        client = await stack.enter_async_context(httpx.AsyncClient(trust_env=False, timeout=10))
        # Registration is passed through the Worker (POST /workers) like any other request.
        registered = await client.post(edge.worker + "/workers", json=record.to_dict())
        assert registered.status_code == 200, registered.text
        assert registered.headers["x-edge-cache"] == "BYPASS"

        # Locally nothing stands in front of wrangler dev: the test sends what Cloudflare's
        # edge would (CF-Connecting-IP, CF-Ray) next to a spoofed X-Forwarded-For and secret.
        claims = {
            "CF-Connecting-IP": CLIENT,
            "CF-Ray": "8f1d2c3b4a5e6f70-AMS",
            "X-Forwarded-For": SPOOFED,
            "X-RMA-Origin-Secret": "a-guess",
        }
        via_worker = await client.get(edge.worker + "/route/e2e-who/who", headers=claims)
        direct = await client.get(edge.router + "/route/e2e-who/who", headers=claims)

    assert via_worker.status_code == direct.status_code == 200, (via_worker.text, direct.text)
    through_worker, around_worker = upstream.seen
    # Through the Worker: its X-Forwarded-For (the client, not the spoof) is believed.
    assert header(through_worker, "x-forwarded-for") == CLIENT
    assert header(through_worker, "cf-ray") == "8f1d2c3b4a5e6f70-AMS"
    # Around it, with a guessed secret: the router believes only the TCP peer.
    assert header(around_worker, "x-forwarded-for") == "127.0.0.1"
    for seen in (through_worker, around_worker):
        names = header_names(seen)
        assert "x-rma-origin-secret" not in names  # never handed to a volunteer
        assert not [name for name in names if name.startswith("mf-")]


async def test_flush_through_the_worker_empties_the_edge_copy(edge: Edge) -> None:
    path = "/dht/bootstrap?region=e2e-flush"
    async with httpx.AsyncClient(base_url=edge.worker, trust_env=False, timeout=10) as client:
        await client.get(path)
        deadline = time.monotonic() + 10
        while (await client.get(path)).headers["x-edge-cache"] != "HIT":
            assert time.monotonic() < deadline, "the edge never served a stored copy"

        refused = await client.post(
            "/admin/cache/flush", json={}, headers={"Authorization": "Bearer wrong-token-000000"}
        )
        assert refused.status_code == 403, refused.text
        assert (await client.get(path)).headers["x-edge-cache"] == "HIT"

        before = requests_of(edge.router, "bootstrap")
        flushed = await client.post(
            "/admin/cache/flush", json={}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert flushed.status_code == 200, flushed.text
        assert flushed.json()["service"] is None
        assert flushed.headers["x-edge-flushed"] == "all"
        after = await client.get(path)
        assert after.status_code == 200
        assert after.headers["x-edge-cache"] == "MISS"
        assert requests_of(edge.router, "bootstrap") == before + 1
