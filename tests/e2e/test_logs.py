"""`RMA_LOG_FORMAT=json`: every line one JSON object, with the worker id where known."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from dht_bridge.logcontext import log_fields_bound
from rma.logs import JsonFormatter

WORKER_ID_HEX = 40


def test_a_json_line_carries_the_context_fields_and_the_exception() -> None:
    record = logging.LogRecord("rma.test", logging.ERROR, __file__, 1, "failed: %s", ("x",), None)
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    with log_fields_bound(cf_ray="8f1a2b3c4d5e6f70-AMS"):
        line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["message"] == "failed: x"
    assert entry["level"] == "error"
    assert entry["cf_ray"] == "8f1a2b3c4d5e6f70-AMS"
    assert "ValueError: boom" in entry["exception"]
    assert "cf_ray" not in json.loads(JsonFormatter().format(record))  # bound to the block only


def test_rma_worker_logs_json_lines_with_its_worker_id(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMA_")}
    env["RMA_LOG_FORMAT"] = "json"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "rma", "worker", "--service", "ocr"),
            *("--tunnel-url", "https://w.trycloudflare.com"),
            *("--state-file", str(tmp_path / "w.json")),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3, result.stderr  # nowhere to join: a failed start
    entries = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    failed = [e for e in entries if e["level"] == "error"]
    assert failed, result.stderr
    assert "nowhere to join" in failed[-1]["message"]
    assert len(failed[-1]["worker"]) == WORKER_ID_HEX
