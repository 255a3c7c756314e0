"""`rma worker`: configuration from options and `RMA_*` variables, and a real process that
joins through a real router over HTTP and leaves a tombstone on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from starlette.types import Receive, Scope, Send

from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import ConfigError
from dht_bridge.identity import Identity
from dht_bridge.registry.registry import Registry
from rma.cli import build_parser
from rma.commands.worker import serve as serve_worker
from tests.support.helpers import wait_for
from tests.support.upstreams import serve
from tests.support.worker import dht_ids, router_config, running_edge, worker_config
from worker.config import WorkerConfig, default_state_file

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0  # a loaded 2-core machine imports slowly
STOP_SECONDS = 8.0  # the leave is bounded by RMA_LEAVE_TIMEOUT (3 s) plus closing
TUNNEL = "https://w-cli.trycloudflare.com"


def build(argv: list[str], env: dict[str, str]) -> WorkerConfig:
    return WorkerConfig.build(build_parser().parse_args(["worker", *argv]), env)


def test_options_beat_variables_beat_defaults() -> None:
    env = {
        "RMA_SERVICES": "ocr,gpu",
        "RMA_TUNNEL_URL": TUNNEL,
        "RMA_EDGE_URL": "https://edge.example",
        "RMA_HEARTBEAT": "20",
        "RMA_TTL": "60",
        "RMA_DHT_PORT": "4500",
        "RMA_DHT_RPC_TIMEOUT": "0.25",
        "RMA_CAPABILITIES": "gpus=2,model=a100",
        "HOME": "/home/v",
    }
    config = build(["--service", "asr", "--heartbeat", "10", "--region", "eu-west"], env)
    assert config.services == ("asr",)
    assert config.heartbeat == 10
    assert config.ttl == 60
    assert config.region == "eu-west"
    assert config.dht.port == 4500
    assert config.dht.rpc_timeout == 0.25
    assert config.dht.host == "0.0.0.0"  # a worker must reach remote peers
    assert dict(config.capabilities) == {"gpus": 2, "model": "a100"}
    assert config.state_file == Path("/home/v/.local/state/rma/worker.json")
    assert config.key_file is None
    defaults = build([], {"RMA_SERVICES": "ocr", "RMA_TUNNEL_URL": TUNNEL})
    assert (defaults.heartbeat, defaults.ttl, defaults.edge_url) == (30, 90, None)
    assert default_state_file({"XDG_STATE_HOME": "/x"}) == Path("/x/rma/worker.json")


@pytest.mark.parametrize(
    ("argv", "env", "complaint"),
    [
        ([], {"RMA_TUNNEL_URL": TUNNEL}, "at least one --service"),
        (["--service", "OCR"], {"RMA_TUNNEL_URL": TUNNEL}, "does not match"),
        (["--service", "ocr"], {}, "--tunnel-url"),
        (["--service", "ocr", "--tunnel-url", "https://10.0.0.1"], {}, "IP literals"),
        (["--service", "ocr", "--tunnel-url", "http://127.0.0.1:8000"], {}, "https"),
        (["--service", "ocr", "--heartbeat", "70"], {"RMA_TUNNEL_URL": TUNNEL}, "in time"),
        (["--service", "ocr", "--edge-only"], {"RMA_TUNNEL_URL": TUNNEL}, "needs --edge"),
        (["--service", "ocr", "--capability", "x"], {"RMA_TUNNEL_URL": TUNNEL}, "key=value"),
        (["--service", "ocr", "--capability", "BAD=1"], {"RMA_TUNNEL_URL": TUNNEL}, "refused"),
        (["--service", "ocr"], {"RMA_TUNNEL_URL": TUNNEL, "RMA_HEARTBEAT": "soon"}, "number"),
        (["--service", "ocr"], {"RMA_TUNNEL_URL": TUNNEL, "RMA_BOOTSTRAP": "x"}, "host:port"),
        (["--service", "ocr"], {"RMA_TUNNEL_URL": TUNNEL, "RMA_DHT_MODE": "relay"}, "DHT_MODE"),
        (
            ["--service", "ocr", "--dht-mode", "server", "--dht-advertise", "none"],
            {"RMA_TUNNEL_URL": TUNNEL},
            "with --dht-advertise none",
        ),
        (["--service", "ocr", "--reach-interval", "0"], {"RMA_TUNNEL_URL": TUNNEL}, "reach"),
        *(
            (["--service", "ocr", "--cloudflared", "--service-url", bad], {}, "needs --service-url")
            for bad in ("ftp://x", "http://", "127.0.0.1:9000")
        ),
        *(
            (["--service", "ocr", "--dht-advertise", bad], {"RMA_TUNNEL_URL": TUNNEL}, "ADVERTISE")
            for bad in ("host:99999", ":4000", "host:", "bad host", "2001:db8::1", "[::1]:0")
        ),
    ],
)
def test_bad_configuration_is_a_config_error(
    argv: list[str], env: dict[str, str], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        build(argv, env)


def test_dht_mode_from_options_and_variables() -> None:
    env = {"RMA_SERVICES": "ocr", "RMA_TUNNEL_URL": TUNNEL}
    defaults = build([], env)
    assert (defaults.mode, defaults.reach_interval) == ("auto", 300)
    assert defaults.advertises
    from_env = build([], {**env, "RMA_DHT_MODE": "client", "RMA_DHT_REACH_INTERVAL": "60"})
    assert (from_env.mode, from_env.reach_interval) == ("client", 60)
    assert not from_env.advertises
    assert build(["--dht-mode", "server"], {**env, "RMA_DHT_MODE": "client"}).mode == "server"
    # The older spelling of client mode still means it.
    assert build(["--dht-advertise", "none"], env).mode == "client"
    for good in ("203.0.113.5", "203.0.113.5:4000", "[2001:db8::1]:4000", "dht.example.org"):
        assert build(["--dht-advertise", good], env).advertise == good


def test_loopback_tunnels_only_when_the_policy_is_widened() -> None:
    env = {"RMA_SERVICES": "ocr", "RMA_TUNNEL_URL": "http://127.0.0.1:8000"}
    with pytest.raises(ConfigError):
        build([], env)
    assert build([], {**env, "RMA_TUNNEL_ALLOW_LOOPBACK": "1"}).policy.allow_loopback


async def test_rma_worker_process_joins_through_the_router_and_leaves_on_sigterm(
    tmp_path: Path, registry: Registry, network: list[DHTNode]
) -> None:
    identity = Identity.generate()  # known in advance, to look the worker up
    identity.save(tmp_path / "worker.key")
    log_path = tmp_path / "worker.log"
    async with running_edge(registry, router_config(network)) as edge, serve(edge.app) as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RMA_")}
        env.update(
            RMA_SERVICES="ocr",
            RMA_TUNNEL_URL=TUNNEL,
            RMA_EDGE_URL=url,
            RMA_KEY_FILE=str(tmp_path / "worker.key"),
            RMA_STATE_FILE=str(tmp_path / "state.json"),
            RMA_DHT_HOST="127.0.0.1",
            RMA_LOG_LEVEL="info",
        )
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rma",
                "worker",
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:

            async def listed() -> bool:
                assert process.returncode is None, log_path.read_text()
                return identity.worker_id in await dht_ids(network[0])

            await wait_for(listed, timeout=START_TIMEOUT, message="the worker's record")
            process.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            async with asyncio.timeout(STOP_SECONDS):
                code = await process.wait()
            took = time.monotonic() - stopped
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        output = log_path.read_text()
        assert code == 0, output
        assert took < STOP_SECONDS
        assert identity.worker_id not in await dht_ids(network[1])  # at once, no waiting
        record = await network[1].get_record(identity.worker_id)
        assert record is not None
        assert record.tombstone
        assert "edge request GET /dht/bootstrap -> 200 (edge requests: 1 (bootstrap 1))" in output
        assert "left with tombstone" in output
        assert "POST /workers" not in output


async def test_a_stop_during_a_slow_start_is_honoured_at_once(tmp_path: Path) -> None:
    # An edge that takes the request and never answers (overloaded, a captive portal): the
    # start waits out the edge's timeout twice (bootstrap, then the fallback registration),
    # and SIGTERM or Ctrl-C was ignored until then.
    asked = asyncio.Event()

    async def silent_edge(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        asked.set()
        while (await receive())["type"] != "http.disconnect":
            pass

    async with serve(silent_edge) as url:
        config = worker_config(tmp_path, "w-slow", edge_url=url, edge_timeout=60.0)
        stop = asyncio.Event()
        running = asyncio.get_running_loop().create_task(serve_worker(config, stop))
        try:
            await wait_for(
                lambda: asked.is_set() or running.done(),
                timeout=START_TIMEOUT,
                message="the start's first edge request",
            )
            assert not running.done(), running.result()
            stop.set()  # the volunteer presses Ctrl-C
            async with asyncio.timeout(STOP_SECONDS):
                code = await running
        finally:
            running.cancel()
    assert code == 0
