"""The worker's state file and key: seq strictly increasing across restarts, and a corrupt or
missing file handled with a clear log line (a new identity only when the key itself is gone)."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import stat
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest

from dht_bridge.dht.node import SERVER, DHTNode
from dht_bridge.errors import IdentityError
from dht_bridge.identity import Identity
from rma.commands.worker import serve
from rma.exits import Exit
from tests.support.helpers import wait_for
from tests.support.worker import Edge, reach_checked, worker_config
from worker.agent import Mode, WorkerAgent
from worker.config import WorkerConfig
from worker.errors import StartError, StateInUse
from worker.state import LoadStatus, StateFile, WorkerState


async def run_once(edge: Edge, config: WorkerConfig, mode: Mode = Mode.DHT) -> tuple[str, int]:
    """Start a worker, let it publish (in `mode`), stop it; its id and the last seq it used."""
    async with edge.agent(config) as agent:
        assert agent.mode is mode
        worker_id = agent.worker_id
    return worker_id, agent.state.seq


def starting_records(agent: WorkerAgent) -> int:
    """Records a start signs: one, and one more when the reachability check that follows the
    first publish made the worker a server (its record then hands out its address)."""
    return 2 if agent.dht_mode == SERVER else 1


def saved(config: WorkerConfig) -> dict[str, object]:
    data: dict[str, object] = json.loads(config.state_file.read_text())
    return data


async def test_seq_is_saved_before_use_and_grows_across_restarts(
    tmp_path: Path, edge: Edge, network: list[DHTNode]
) -> None:
    config = worker_config(tmp_path, "w-seq")
    worker_id, first = await run_once(edge, config)
    assert saved(config)["seq"] == first
    assert stat.S_IMODE(config.state_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.state_file.with_suffix(".key").stat().st_mode) == 0o600
    _, second = await run_once(edge, config)
    assert second > first
    record = await network[0].get_record(worker_id)
    assert record is not None
    assert record.tombstone
    assert record.seq == second


async def test_a_crash_never_reuses_a_seq_although_a_heartbeat_does_not_save(
    tmp_path: Path, edge: Edge, network: list[DHTNode]
) -> None:
    config = worker_config(tmp_path, "w-crash")
    async with edge.agent(config) as agent:
        start = agent.heartbeats
        await wait_for(lambda: agent.heartbeats >= start + 3, timeout=10, message="heartbeats")
        image = config.state_file.read_bytes()  # what a crash now would leave on disk
        assert json.loads(image)["seq"] >= agent.state.seq + 1  # a ceiling: beats do not save
        used = agent.state.seq
    assert (
        cast(int, saved(config)["seq"]) > used
    )  # the clean stop saved the exact seq of its tombstone
    config.state_file.write_bytes(image)  # as if it had crashed instead
    async with edge.agent(config) as again:
        assert again.record is not None
        assert again.record.seq > saved_seq(image) >= used
        listed = await network[0].get_record(again.worker_id)
        assert listed is not None
        assert listed.live
        assert listed.seq == again.record.seq


async def test_a_crash_soon_after_a_first_start_restarts_through_its_saved_peers(
    tmp_path: Path, edge: Edge, network: list[DHTNode]
) -> None:
    config = worker_config(tmp_path, "w-first-crash")
    async with edge.agent(config) as agent:
        assert agent.mode is Mode.DHT
        assert agent.edge_requests == {"bootstrap": 1}
        image = config.state_file.read_bytes()  # what a crash now would leave on disk
    assert json.loads(image)["peers"]
    config.state_file.write_bytes(image)  # as if it had crashed instead of stopping
    async with edge.agent(config) as again:
        assert again.mode is Mode.DHT
        assert again.edge_requests == {}


async def test_a_restart_binds_the_dht_port_of_the_last_run_when_it_is_free(
    tmp_path: Path, edge: Edge, network: list[DHTNode], caplog: pytest.LogCaptureFixture
) -> None:
    """Peers' routing tables and the edge's bootstrap list name the address a worker had: a
    restart on a new random port would leave them pointing at nothing."""
    config = worker_config(tmp_path, "w-port")
    assert config.dht.port == 0  # any port: the OS picks the first
    async with edge.agent(config) as agent:
        assert agent.node is not None
        host, port = agent.node.address
    assert saved(config)["dht_port"] == port
    async with edge.agent(config) as again:
        assert again.node is not None
        assert again.node.address == (host, port)
        await reach_checked(again)
        assert again.record is not None
        assert (again.record.dht_host, again.record.dht_port) == (host, port)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((host, port))  # another program took it meanwhile
        with caplog.at_level(logging.INFO, logger="worker.agent"):
            async with edge.agent(config) as elsewhere:
                assert elsewhere.node is not None
                assert elsewhere.node.address[1] != port
                assert elsewhere.mode is Mode.DHT
    assert f"DHT port {port} of the last run is taken" in caplog.text
    assert saved(config)["dht_port"] == elsewhere.node.address[1]


def saved_seq(image: bytes) -> int:
    seq: int = json.loads(image)["seq"]
    return seq


def test_a_late_save_never_rolls_the_ceiling_back(tmp_path: Path) -> None:
    store = StateFile(tmp_path / "s.json")
    assert store.save(WorkerState(seq=128))
    assert not store.save(WorkerState(seq=64))  # a slow save of an older block, finishing late
    assert store.load()[0].seq == 128
    assert store.save(WorkerState(seq=100), final=True)  # the closing save: the exact last seq
    assert store.load()[0].seq == 100


@pytest.mark.parametrize(
    "text",
    ['{"version": 1, "seq": "many"', "[" * 5000 + "]" * 5000, '{"a": ' * 20 + "1" + "}" * 20],
)
def test_a_state_file_that_is_not_a_state_is_moved_aside(tmp_path: Path, text: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(text)
    state, status = StateFile(path).load()
    assert status is LoadStatus.CORRUPT
    assert state.seq == 0
    assert path.with_name("s.json.corrupt").read_text() == text


async def test_corrupt_state_file_is_logged_moved_aside_and_seq_recovered_from_the_dht(
    tmp_path: Path, edge: Edge, network: list[DHTNode], caplog: pytest.LogCaptureFixture
) -> None:
    config = worker_config(tmp_path, "w-corrupt")
    worker_id, last = await run_once(edge, config)
    config.state_file.write_text('{"version": 1, "seq": "many"')  # cut off mid-write
    caplog.clear()

    with caplog.at_level(logging.WARNING, logger="worker"):
        async with edge.agent(config) as agent:
            assert agent.state_status is LoadStatus.CORRUPT
            assert agent.worker_id == worker_id  # the key is still there: same identity
            assert agent.record is not None
            assert agent.record.seq > last
            assert agent.edge_requests == {"bootstrap": 1}  # no saved peers any more
            listed = await network[1].get_record(worker_id)
            assert listed is not None
            assert listed.live
            assert listed.seq == agent.record.seq
    assert f"worker state file {config.state_file} is corrupt" in caplog.text
    assert "seq is recovered from the DHT" in caplog.text
    assert config.state_file.with_name("state.json.corrupt").exists()
    assert "new identity" not in caplog.text


async def test_missing_state_file_keeps_the_identity_and_recovers_seq(
    tmp_path: Path, edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    config = worker_config(tmp_path, "w-lost")
    worker_id, last = await run_once(edge, config)
    config.state_file.unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="worker"):
        async with edge.agent(config) as agent:
            assert agent.state_status is LoadStatus.MISSING
            assert agent.worker_id == worker_id
            await reach_checked(agent)
            assert agent.record is not None
            assert agent.record.seq == last + starting_records(agent)
    assert f"no worker state file at {config.state_file}" in caplog.text
    assert f"the DHT holds seq {last} of this worker" in caplog.text


async def test_a_new_identity_only_when_the_key_file_is_gone(
    tmp_path: Path, edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    config = worker_config(tmp_path, "w-key")
    worker_id, _ = await run_once(edge, config)
    key = config.state_file.with_suffix(".key")
    key.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="worker"):
        async with edge.agent(config) as agent:
            assert agent.worker_id != worker_id
            await reach_checked(agent)
            assert agent.record is not None
            assert agent.record.seq == starting_records(agent)  # from 1: nothing to recover
    assert f"no key file at {key}: created a new identity" in caplog.text
    assert f"belongs to worker {worker_id}" in caplog.text


async def test_a_relative_key_file_is_found_again_from_another_directory(
    tmp_path: Path, edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `rma worker --key-file keys/w.key` run once from home; later started (by systemd, say)
    # elsewhere with no --key-file: the state file's key path was stored as typed.
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    config = worker_config(tmp_path, "w-rel", edge_only=True)
    monkeypatch.chdir(home)
    worker_id, _ = await run_once(edge, replace(config, key_file=Path("keys/w.key")), Mode.EDGE)
    assert saved(config)["key_file"] == str(home / "keys" / "w.key")
    monkeypatch.chdir(elsewhere)
    again, _ = await run_once(edge, config, Mode.EDGE)
    assert again == worker_id
    assert list(elsewhere.iterdir()) == []  # no new key made here


async def test_an_unusable_key_file_stops_the_start_instead_of_replacing_it(
    tmp_path: Path, edge: Edge
) -> None:
    config = worker_config(tmp_path, "w-badkey")
    key = config.state_file.with_suffix(".key")
    key.parent.mkdir(parents=True)
    key.write_bytes(b"not a key")
    key.chmod(0o600)
    agent = edge.agent(config)
    with pytest.raises(IdentityError, match="not a PEM private key"):
        await agent.start()
    assert key.read_bytes() == b"not a key"


async def test_a_state_or_key_file_that_cannot_be_written_stops_the_start_saying_which(
    tmp_path: Path,
) -> None:
    # A regular file where a directory should be: refused even for root, unlike a chmod.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable_state = worker_config(tmp_path, "w-nostate", state_file=blocker / "state.json")
    with pytest.raises(
        StartError, match=rf"cannot use state file {blocker}/state.json: .*--state-file"
    ):
        await WorkerAgent(unwritable_state).start()
    unwritable_key = worker_config(tmp_path, "w-nokey", key_file=blocker / "worker.key")
    with pytest.raises(IdentityError, match=rf"cannot write key file {blocker}/worker.key"):
        await WorkerAgent(unwritable_key).start()
    # The refused start let go of its state: the next one may take it.
    again = StateFile(unwritable_key.state_file)
    again.acquire()
    again.release()


async def test_a_state_file_that_cannot_be_written_at_start_is_a_start_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A full disk: `rma worker` ended in an OSError traceback (exit 1) from the first
    # signature instead of "worker failed to start" (exit 3).
    config = worker_config(tmp_path, "w-full", edge_only=True)
    Identity.generate().save(config.state_file.with_suffix(".key"))  # a worker that ran before

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)  # what the state file's save calls last
    stop = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="rma"):
        assert await serve(config, stop) == Exit.START_FAILED
    assert f"cannot write state file {config.state_file}: No space left on device" in caplog.text
    monkeypatch.undo()
    again = StateFile(config.state_file)  # the refused start let go of its state
    again.acquire()
    again.release()


def test_state_round_trip_and_refusals(tmp_path: Path) -> None:
    store = StateFile(tmp_path / "s.json")
    state = WorkerState(
        "ab" * 20, "/k.key", 7, [("127.0.0.1", 4000)], [["ocr", "ab", 1]], 5.5, dht_port=4001
    )
    store.save(state)
    assert store.load() == (state, LoadStatus.LOADED)
    older = {"version": 1, "seq": 3}  # a file from before dht_port was saved
    (tmp_path / "s.json").write_text(json.dumps(older))
    assert store.load() == (WorkerState(seq=3), LoadStatus.LOADED)
    for bad in (
        '{"version": 2, "seq": 1}',
        '{"version": 1, "seq": -1}',
        "[]",
        "\xff",
        '{"version": 1, "seq": 1, "dht_port": 70000}',
    ):
        (tmp_path / "s.json").write_text(bad)
        assert store.load() == (WorkerState(), LoadStatus.CORRUPT)
    peers = {"version": 1, "seq": 1, "peers": [["h", 0]]}
    (tmp_path / "s.json").write_text(json.dumps(peers))
    assert store.load()[1] is LoadStatus.CORRUPT


async def test_a_first_start_creates_its_identity_without_a_warning(
    tmp_path: Path, edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="worker"):
        await run_once(edge, worker_config(tmp_path, "w-first"))
    created = [r for r in caplog.records if "created a new identity" in r.getMessage()]
    assert [r.levelno for r in created] == [logging.INFO]


async def test_a_first_start_publishes_first_and_reads_no_seq_for_a_key_it_just_made(
    tmp_path: Path, edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    """A volunteer's first start is listed before its reachability check (in the field the check
    costs a probe's wait behind a NAT), returns without waiting for it, and does not look up
    a record of a key made this start (nobody can hold one); a restart with the same key does."""
    config = worker_config(tmp_path, "w-fresh")
    with caplog.at_level(logging.INFO, logger="worker.agent"):
        async with edge.agent(config) as agent:
            # Nothing has yielded to the loop since start() returned: the check is still to run.
            assert agent.reachability is None
            assert agent.record is not None
            assert agent.record.seq == 1
            assert agent.node is not None
            assert "read" not in agent.node.crawl_queries
            await reach_checked(agent)
            assert agent.dht_mode == SERVER  # loopback: the check found servers reach it
            assert agent.record is not None
            assert (agent.record.dht_host, agent.record.dht_port) == agent.node.address
    said = [r.getMessage() for r in caplog.records]
    listed = next(i for i, m in enumerate(said) if "is on the DHT (seq 1)" in m)
    checked = next(i for i, m in enumerate(said) if "servers reached us" in m)
    assert listed < checked
    async with edge.agent(config) as again:
        assert again.node is not None
        assert again.node.crawl_queries.get("read", 0) > 0


async def test_a_second_agent_on_the_same_state_file_refuses_to_start(
    tmp_path: Path, edge: Edge
) -> None:
    config = worker_config(tmp_path, "w-twice")
    async with edge.agent(config) as first:
        second = edge.agent(config)
        with pytest.raises(StateInUse, match="--state-file"):
            await second.start()
        assert first.mode is Mode.DHT
        # The refused agent touched nothing: the first's record is the one published.
        assert first.record is not None
        assert first.record.tunnel_url == config.tunnel_url
    # Once the first has stopped, the state is free again.
    worker_id, _ = await run_once(edge, config)
    assert worker_id == first.worker_id


async def test_an_agent_with_nowhere_to_join_says_so_instead_of_retrying(
    tmp_path: Path,
) -> None:
    config = worker_config(tmp_path, "w-alone", edge_url=None)
    agent = WorkerAgent(config)
    with pytest.raises(StartError, match="nowhere to join"):
        await agent.start()
    # Its lock is released: a configured retry can start at once.
    again = StateFile(config.state_file)
    again.acquire()
    again.release()
