"""The `rma` command: subcommands, configuration precedence, and `rma node` as a real process."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dht_bridge.errors import ConfigError
from dht_bridge.options import parse_hostport
from rma.cli import build_parser, main
from rma.client import RequestFailed
from rma.commands import flush as flush_command
from rma.commands.lookup import providers_of
from rma.commands.node import NodeConfig, load_state


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("router", "bridge", "worker", "demo", "flush", "node"):
        assert name in out


def test_node_config_options_beat_variables_beat_defaults() -> None:
    parser = build_parser()
    args = parser.parse_args(["node", "--port", "4100", "--bootstrap", "seed.example:4000"])
    env = {"RMA_DHT_PORT": "4200", "RMA_DHT_RPC_TIMEOUT": "0.25", "RMA_BOOTSTRAP": "x:1"}
    config = NodeConfig.build(args, env)
    assert config.dht.port == 4100
    assert config.dht.rpc_timeout == 0.25
    assert config.bootstrap == (("seed.example", 4000),)
    from_env = NodeConfig.build(parser.parse_args(["node"]), env)
    assert from_env.dht.port == 4200
    assert from_env.bootstrap == (("x", 1),)


@pytest.mark.parametrize(
    "env",
    [
        {"RMA_DHT_PORT": "many"},
        {"RMA_DHT_PORT": "70000"},
        {"RMA_BOOTSTRAP": "nohost"},
        {"RMA_TUNNEL_ALLOW_LOOPBACK": "perhaps"},
        {"RMA_DHT_RPC_TIMEOUT": "0"},
    ],
)
def test_bad_configuration_is_a_config_error(env: dict[str, str]) -> None:
    args = build_parser().parse_args(["node"])
    with pytest.raises(ConfigError):
        NodeConfig.build(args, env)


def test_parse_hostport() -> None:
    assert parse_hostport("a.b:1") == ("a.b", 1)
    assert parse_hostport("[::1]:4000") == ("::1", 4000)
    for bad in ("a", ":1", "a:0", "a:x", "a:70000"):
        with pytest.raises(ValueError, match="host:port"):
            parse_hostport(bad)


@pytest.mark.parametrize("writable", [True, False])
def test_rma_node_runs_saves_json_state_and_stops_on_sigterm(
    tmp_path: Path, writable: bool
) -> None:
    if writable:
        state = tmp_path / "node.json"
    else:  # a file where the state file's directory should be: a warning, and it runs on
        (tmp_path / "a-file").write_text("")
        state = tmp_path / "a-file" / "node.json"
    env = {**os.environ, "RMA_DHT_PORT": "0", "RMA_STATE_FILE": str(state)}
    with subprocess.Popen(
        [sys.executable, "-m", "rma", "node"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stderr is not None
            deadline = time.monotonic() + 30
            line = ""
            while "ready on" not in line:
                assert time.monotonic() < deadline, "rma node did not report ready"
                line = proc.stderr.readline()
                assert line or proc.poll() is None, "rma node exited early"
            proc.send_signal(signal.SIGTERM)
            rest = proc.stderr.read()
            assert proc.wait(timeout=15) == 0, rest
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "Traceback" not in rest
    if not writable:
        assert f"cannot save the state file {state}" in rest
        return
    saved = json.loads(state.read_text())
    assert saved["version"] == 1
    assert len(bytes.fromhex(saved["node_id"])) == 20


def test_bad_option_exits_with_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        main(["node", "--port", "not-a-number"])
    assert info.value.code == 2
    assert isinstance(build_parser(), argparse.ArgumentParser)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["flush", "--timeout", "0"], "rma flush: configuration error: --timeout must be > 0"),
        (["lookup", "ocr", "--timeout=-1"], "rma lookup: configuration error: --timeout must be"),
        (["lookup", "ocr", "--router", "garbage"], "'garbage' is not an http(s) URL"),
        (["lookup", "OCR!"], "service 'OCR!' does not match [a-z0-9-]{1,32}"),
    ],
)
def test_client_commands_refuse_what_could_not_reach_a_router_before_trying(
    argv: list[str], said: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RMA_ADMIN_TOKEN", "0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("RMA_ROUTER_URL", "http://127.0.0.1:1")  # nothing is sent anyway
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["demo", "--port=-1"], "--port -1 is not 0..65535"),  # was a traceback from uvicorn
        (["demo", "--port", "70000"], "--port 70000 is not 0..65535"),
        (["demo", "--heartbeat", "0.001"], "--heartbeat must be at least 1 s"),
    ],
)
def test_a_demo_that_could_not_run_is_refused_before_it_starts(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(
    "answer",
    [[1, 2], {"providers": "all"}, {"providers": [1]}, {"providers": [{"load": "high"}]}, None],
)
def test_a_lookup_answer_of_another_shape_is_a_clear_failure(answer: object) -> None:
    # A --router URL that names some other JSON service must not end in a traceback.
    with pytest.raises(RequestFailed, match="answered"):
        providers_of("http://elsewhere/services/ocr", answer)


def test_a_flush_answer_that_is_not_an_object_is_a_clear_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RMA_ADMIN_TOKEN", "0123456789abcdef0123456789abcdef")
    # What a --router URL naming some other JSON service would answer.
    monkeypatch.setattr(flush_command, "request", lambda *args, **kwargs: ["not", "a", "flush"])
    assert main(["flush", "--router", "http://elsewhere"]) == 1
    assert "is not a flush answer" in caplog.text


@pytest.mark.parametrize("text", ["{not json", "[" * 5000 + "]" * 5000, '{"version": 99}'])
def test_a_node_state_file_that_is_not_one_is_a_configuration_error(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"state file {path}"):
        load_state(path)
