"""`rma bridge`: configuration from options and RMA_* variables, and a clean SIGTERM exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dht_bridge.errors import ConfigError
from rma.cli import build_parser
from rma.commands.bridge import DEFAULT_METRICS_PORT, BridgeConfig

ROOT = Path(__file__).resolve().parents[2]


def test_bridge_options_beat_variables_beat_defaults() -> None:
    parser = build_parser()
    env = {
        "RMA_REDIS_URL": "redis://env:6379/0",
        "RMA_DHT_PORT": "4300",
        "RMA_BOOTSTRAP": "a:1,b:2",
        "RMA_JOURNAL_PATH": "/tmp/env.jsonl",
        "RMA_JOURNAL_MAX_BYTES": "65536",
        "RMA_SYNC_INTERVAL": "7",
        "RMA_STALE_SHARE": "0.3",
        "RMA_BRIDGE_SERVICES": "ocr,gpu",
        "RMA_BRIDGE_METRICS_PORT": "-1",
    }
    from_env = BridgeConfig.build(parser.parse_args(["bridge"]), env)
    assert from_env.registry.redis_url == "redis://env:6379/0"
    assert from_env.dht.port == 4300
    assert from_env.bootstrap == (("a", 1), ("b", 2))
    assert from_env.journal == Path("/tmp/env.jsonl")
    assert from_env.journal_max_bytes == 65536
    assert (from_env.sync_interval, from_env.stale_share) == (7.0, 0.3)
    assert from_env.services == ("ocr", "gpu")
    assert from_env.metrics_port is None
    args = parser.parse_args(
        [
            *("bridge", "--redis-url", "redis://opt:1/0", "--dht-port", "4400"),
            *("--bootstrap", "c:3", "--journal", "j.jsonl", "--sync-interval", "2"),
            *("--stale-share", "0.5", "--service", "asr", "--metrics-port", "0"),
        ]
    )
    config = BridgeConfig.build(args, env)
    assert config.registry.redis_url == "redis://opt:1/0"
    assert config.dht.port == 4400
    assert config.bootstrap == (("c", 3),)
    assert config.journal == Path("j.jsonl")
    assert (config.sync_interval, config.stale_share) == (2.0, 0.5)
    assert config.services == ("asr",)
    assert config.metrics_port == 0
    defaults = BridgeConfig.build(parser.parse_args(["bridge"]), {})
    assert defaults.metrics_port == DEFAULT_METRICS_PORT
    assert defaults.settings().stale_share == 0.15


@pytest.mark.parametrize(
    "env",
    [
        {"RMA_STALE_SHARE": "1.5"},
        {"RMA_SYNC_INTERVAL": "0"},
        {"RMA_JOURNAL_MAX_BYTES": "10"},
        {"RMA_BRIDGE_SERVICES": "Bad_Name"},
        {"RMA_BOOTSTRAP": "nohost"},
        {"RMA_BRIDGE_METRICS_PORT": "70000"},
    ],
)
def test_bad_bridge_configuration_is_a_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        BridgeConfig.build(build_parser().parse_args(["bridge"]), env)


def test_python_m_dht_bridge_runs_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    # Embedded registry, no peers: it starts, says it is ready, and stops on SIGTERM with 0.
    state = tmp_path / "state.json"
    command = [
        *(sys.executable, "-m", "rma", "bridge", "--metrics-port", "0"),
        *("--journal", str(tmp_path / "j.jsonl"), "--state-file", str(state), "--service", "ocr"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMA_")}
    with subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) as process:
        assert process.stderr is not None
        for line in process.stderr:
            if "bridge ready" in line:
                break
        first_id = json.loads(state.read_text())["node_id"]  # saved at the start already
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(timeout=30) == 0, rest
    assert "bridge exited cleanly" in rest
    saved = json.loads(state.read_text())
    assert saved["services"] == ["ocr"]
    assert saved["node_id"] == first_id
    assert len(saved["node_id"]) == 40


def test_a_state_file_the_bridge_cannot_write_is_said_at_the_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"  # a file where the state file's directory should be
    blocker.write_text("")
    # Metrics on a port the OS picks: a bridge already running on this machine with the
    # default (9464) must not fail the test.
    command = [
        *(sys.executable, "-m", "rma", "bridge", "--metrics-port", "0"),
        *("--journal", str(tmp_path / "j.jsonl")),
        *("--state-file", str(blocker / "state.json")),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMA_")}
    with subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) as process:
        assert process.stderr is not None
        before_ready = []
        for line in process.stderr:
            if "bridge ready" in line:
                break
            before_ready.append(line)
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(timeout=30) == 0, rest
    warned = [line for line in before_ready if "cannot save the state file" in line]
    assert warned, before_ready
    assert "will not survive a restart" in warned[0]
