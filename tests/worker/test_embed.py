"""BackgroundAgent, the agent for programs that are not async: its calls after a failed start
and a start again after a stop or a failure (an edge in memory; the agent's loop in its thread)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support.worker import worker_config
from worker.agent import Mode
from worker.embed import BackgroundAgent
from worker.errors import StartError, StateInUse
from worker.state import StateFile


def edge() -> httpx.MockTransport:
    """An edge that takes every registration and leave."""
    return httpx.MockTransport(lambda _: httpx.Response(200, json={"status": "applied"}))


def test_calls_after_a_failed_start_say_it_is_not_running(tmp_path: Path) -> None:
    # Else they were sent to the failed start's closed loop: "Event loop is closed".
    background = BackgroundAgent(worker_config(tmp_path, "w-none", edge_url=None))
    with pytest.raises(StartError, match="nowhere to join"):
        background.start()
    with pytest.raises(StartError, match="not running"):
        background.update(load=0.5)
    with pytest.raises(StartError, match="not running"):
        background.discover("ocr")


def test_a_failed_start_can_be_tried_again(tmp_path: Path) -> None:
    config = worker_config(tmp_path, "w-retry", edge_only=True)
    background = BackgroundAgent(config, edge_transport=edge())
    other = StateFile(config.state_file)
    other.acquire()  # another agent still runs on this state file
    try:
        with pytest.raises(StateInUse):
            background.start()
    finally:
        other.release()
    with background:  # was "started already"
        assert background.mode is Mode.EDGE
        background.update(load=0.5)


def test_a_stopped_agent_starts_again(tmp_path: Path) -> None:
    background = BackgroundAgent(
        worker_config(tmp_path, "w-again", edge_only=True), edge_transport=edge()
    )
    with background:
        first = background.agent
        assert background.mode is Mode.EDGE
    assert first.mode is Mode.STOPPED
    with background:
        second = background.agent
        assert second is not first
        assert background.mode is Mode.EDGE
        assert second.worker_id == first.worker_id
    assert second.mode is Mode.STOPPED
