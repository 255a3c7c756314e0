"""`rma demo` as a user runs it: a real subprocess, ready, looked up, routed through, stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from dht_bridge.registry.registry import open_registry
from dht_bridge.settings import RegistrySettings
from rma.demo import until_registered
from tests.support.browser import chromium, require_browser
from tests.support.helpers import POLICY, free_port, wait_for
from tests.support.redis_server import TEST_REDIS_TIMEOUT, RedisServer

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
READY_DEADLINE = 90.0
STOP_DEADLINE = 30.0
LOUD = re.compile(r" (WARNING|ERROR|CRITICAL) ")
PROVED = re.compile(r"tunnel proof of worker ([0-9a-f]{40}) at \S+: proved \(")


@contextlib.asynccontextmanager
async def demo(workers: int, log: list[str] | None = None) -> AsyncIterator[str]:
    """Run `rma demo` until the test is done; yields the router's URL once it says ready.

    Its log lines (stderr) go to `log` as they come, when given.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RMA_REDIS_URL"}  # the embedded default
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rma",
        "demo",
        "--workers",
        str(workers),
        "--port",
        str(port),
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stderr is not None
    log = [] if log is None else log
    try:
        deadline = time.monotonic() + READY_DEADLINE
        while not any("demo ready" in line for line in log):
            remaining = deadline - time.monotonic()
            assert remaining > 0, "rma demo never said ready:\n" + "".join(log[-20:])
            line = await asyncio.wait_for(proc.stderr.readline(), remaining)
            assert line, "rma demo exited early:\n" + "".join(log[-20:])
            log.append(line.decode(errors="replace"))
        assert any("widened to loopback" in line for line in log)
        assert any("NOT durable" in line for line in log)
        drain = asyncio.ensure_future(_drain(proc.stderr, log))
        yield f"http://127.0.0.1:{port}"
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), STOP_DEADLINE)
        await drain
        assert code == 0, "rma demo did not exit cleanly:\n" + "".join(log[-20:])
        assert any("stopped cleanly" in line for line in log)
        # A clean stop says nothing alarming: every part leaves in order.
        stopping = next(i for i, line in enumerate(log) if "demo: stopping" in line)
        loud = [line for line in log[stopping:] if LOUD.search(line)]
        assert not loud, "the demo's stop logged:\n" + "".join(loud)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _drain(stream: asyncio.StreamReader, log: list[str]) -> None:
    while line := await stream.readline():
        log.append(line.decode(errors="replace"))


async def test_demo_with_twenty_workers_looks_up_routes_and_stops_on_sigint() -> None:
    async with demo(20) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def ocr_count() -> int:
            answer = await client.get("/services/ocr?limit=50")
            return len(answer.json()["providers"]) if answer.status_code == 200 else 0

        await wait_for(lambda: _ge(ocr_count(), 10), timeout=30, message="10 ocr providers")
        # A loopback client's own X-Forwarded-For is not believed: the demo serves as
        # `rma router` does (edge_router.server.server_config).
        routed = await client.post(
            "/route/gpu/hello", content=b"some work", headers={"X-Forwarded-For": "198.51.100.7"}
        )
        assert routed.status_code == 200
        assert routed.json()["service"] == "gpu"
        assert routed.json()["received_bytes"] == 9
        assert routed.json()["forwarded_for"] == "127.0.0.1"
        assert routed.headers["x-rma-worker"]
        # "ready" waited for the registry, and /readyz says so.
        assert (await client.get("/readyz")).json()["status"] == "ready"
        topology = (await client.get("/topology")).json()
        assert sum(1 for w in topology["workers"] if w["state"] == "live") == 20
        assert topology["services"] == {"ocr": 10, "gpu": 10}


async def _ge(count: object, want: int) -> bool:
    return int(await count) >= want  # type: ignore[misc]


async def test_the_router_proves_the_tunnel_of_every_demo_worker() -> None:
    # Each stand-in service answers the proof with its agent's key (worker.ProofMiddleware);
    # before, the router's fetch got the stand-in's echo: "failed (the answer has no hex
    # Ed25519 signature)".
    log: list[str] = []
    async with demo(4, log) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        # A route queues every provider of its service for proof.
        for service in ("ocr", "gpu"):
            assert (await client.post(f"/route/{service}/hello", content=b"x")).status_code == 200

        def all_proved() -> bool:
            verdicts = [line for line in log if "tunnel proof of worker" in line]
            not_proved = [line for line in verdicts if not PROVED.search(line)]
            assert not not_proved, "".join(not_proved)
            return len({m[1] for line in verdicts if (m := PROVED.search(line))}) == 4

        await wait_for(all_proved, timeout=30, message="the router to prove all 4 workers")


async def test_the_page_of_a_running_demo_draws_its_workers(tmp_path: Path) -> None:
    binaries = require_browser()
    async with demo(20) as url, chromium(binaries, tmp_path / "chromium") as browser:
        await browser.get(f"{url}/?refresh=0.5")
        drawn: dict[str, object] = {}

        async def all_drawn() -> bool:
            drawn.update(
                await browser.run(
                    "return {workers: document.querySelectorAll('circle.worker').length,"
                    " text: document.body.innerText};"
                )
            )
            return drawn.get("workers") == 20

        await wait_for(all_drawn, timeout=30, message="the page to draw 20 workers")
        text = str(drawn["text"]).lower()
        for figure in ("workers", "services", "cache hit", "edge requests", "bridge lag"):
            assert figure in text, figure
        ARTIFACTS.mkdir(exist_ok=True)
        await browser.screenshot(ARTIFACTS / "demo-topology.png")
    if not (ARTIFACTS / "demo-topology.png").stat().st_size:
        pytest.fail("empty screenshot")


async def test_the_demo_start_up_wait_survives_a_registry_outage(
    make_redis_server: Callable[[], RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = make_redis_server()
    settings = RegistrySettings(redis_url=server.url, timeout=TEST_REDIS_TIMEOUT)
    registry = open_registry(settings, policy=POLICY)
    try:
        server.kill()
        # Once it died of RegistryUnavailable; now it waits out its deadline and says why.
        await until_registered(registry, {"a" * 40}, within=1.0)
    finally:
        await registry.aclose()
    assert "the registry is out of reach while starting" in caplog.text


async def test_a_demo_on_a_taken_port_says_so_in_the_log_format_and_exits() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RMA_REDIS_URL"}
    try:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "rma", "demo", "--workers", "1", "--port", str(port)),
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), READY_DEADLINE)
    finally:
        taken.close()
    log = stderr.decode(errors="replace")
    assert proc.returncode != 0, log
    # One line, in the format of every other line (uvicorn's own would start "ERROR:").
    assert re.search(rf" ERROR +uvicorn\.error: .*'127\.0\.0\.1', {port}\).*in use", log), log
    assert not re.search(r"^ERROR:", log, re.M), log
