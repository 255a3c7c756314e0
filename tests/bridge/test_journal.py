"""The bridge's journal on a real file: fsynced appends, replay by the merge rule, a torn last
line after a crash, the size bound, and truncation that keeps later appends."""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dht_bridge.bridge.journal import Journal
from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord, tombstone_for
from tests.support.helpers import ManualClock, make_record


def _beat(identity: Identity, seq: int, clock: ManualClock, ttl: float = 90.0) -> WorkerRecord:
    return make_record(identity, seq=seq, now=clock.now, ttl=ttl)


def test_replay_merges_the_newest_live_record_per_worker(tmp_path: Path) -> None:
    clock = ManualClock()
    steady, leaving, lapsing = Identity.generate(), Identity.generate(), Identity.generate()
    last = _beat(leaving, 2, clock)
    with Journal(tmp_path / "j.jsonl", clock=clock) as journal:
        assert len(journal.append([_beat(steady, 1, clock), _beat(steady, 3, clock)])) == 2
        journal.append([_beat(steady, 2, clock), last, _beat(lapsing, 1, clock, ttl=5.0)])
        journal.append([tombstone_for(leaving, last, now=clock.now)])
        assert journal.depth == 6
        clock.advance(10.0)  # the lapsing worker's lease ends
        replay = journal.replay()
    newest = {r.worker_id: r for r in replay.records}
    assert set(newest) == {steady.worker_id, leaving.worker_id}
    assert newest[steady.worker_id].seq == 3
    assert newest[leaving.worker_id].tombstone
    assert newest[leaving.worker_id].seq == 3
    assert (replay.lines, replay.skipped) == (6, 0)
    assert replay.end == (tmp_path / "j.jsonl").stat().st_size


def test_appends_survive_a_reopen(tmp_path: Path) -> None:
    clock = ManualClock()
    record = _beat(Identity.generate(), 7, clock)
    with Journal(tmp_path / "sub" / "j.jsonl", clock=clock) as journal:
        journal.append([record])
        at = journal.oldest
    with Journal(tmp_path / "sub" / "j.jsonl", clock=clock) as again:
        assert again.depth == 1
        assert again.oldest == at
        assert again.replay().records == [record]


def test_expired_records_are_not_journaled(tmp_path: Path) -> None:
    clock = ManualClock()
    with Journal(tmp_path / "j.jsonl", clock=clock) as journal:
        assert journal.append([_beat(Identity.generate(), 1, clock, ttl=-1.0)]) == []
        assert journal.depth == 0
        assert journal.size == 0


def test_a_torn_last_line_is_cut_off_and_appends_continue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    path = tmp_path / "j.jsonl"
    first, second = _beat(Identity.generate(), 1, clock), _beat(Identity.generate(), 1, clock)
    with Journal(path, clock=clock) as journal:
        journal.append([first, second])
    whole = path.read_bytes()
    # A crash in the middle of writing the second line.
    path.write_bytes(whole[: len(whole) - 40])
    third = _beat(Identity.generate(), 1, clock)
    with caplog.at_level(logging.WARNING), Journal(path, clock=clock) as journal:
        assert journal.torn == 1
        assert journal.depth == 1
        journal.append([third])
        records = journal.replay().records
    assert "torn last line" in caplog.text
    assert {r.worker_id for r in records} == {first.worker_id, third.worker_id}


def test_an_unreadable_line_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    path = tmp_path / "j.jsonl"
    record = _beat(Identity.generate(), 1, clock)
    with Journal(path, clock=clock) as journal:
        journal.append([record])
    with path.open("ab") as file:
        file.write(b'{"at": 1, "record": {"worker_id": "nope"}}\n[1, 2]\n')
        file.write(b"[" * 5000 + b"]" * 5000 + b"\n")  # json.loads: RecursionError
        file.write(b'{"at": 1' + b"0" * 400 + b', "record": {}}\n')  # float(): OverflowError
    with caplog.at_level(logging.WARNING), Journal(path, clock=clock) as journal:
        replay = journal.replay()
    assert replay.records == [record]
    assert replay.skipped == 4
    assert "unreadable line" in caplog.text


def test_heartbeats_of_few_workers_compact_instead_of_filling(tmp_path: Path) -> None:
    clock = ManualClock()
    workers = [Identity.generate() for _ in range(4)]
    with Journal(tmp_path / "j.jsonl", max_bytes=16 * 1024, clock=clock) as journal:
        for seq in range(1, 101):
            for identity in workers:
                assert len(journal.append([_beat(identity, seq, clock)])) == 1
        assert journal.size <= journal.max_bytes
        assert journal.dropped == 0
        newest = {r.worker_id: r.seq for r in journal.replay().records}
    assert newest == {identity.worker_id: 100 for identity in workers}


def test_a_full_journal_refuses_with_one_clear_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    batch = [_beat(Identity.generate(), 1, clock) for _ in range(60)]
    with (
        caplog.at_level(logging.ERROR),
        Journal(tmp_path / "j.jsonl", max_bytes=8 * 1024, clock=clock) as journal,
    ):
        written = len(journal.append(batch[:30]))
        written += len(journal.append(batch[30:]))
        assert 0 < written < 60
        assert journal.dropped == 60 - written
        assert journal.size <= journal.max_bytes
        kept = {r.worker_id for r in journal.replay().records}
    assert kept == {r.worker_id for r in batch[:written]}
    full_lines = [r for r in caplog.records if "is FULL" in r.getMessage()]
    assert len(full_lines) == 1


def test_a_journal_full_of_lapsed_entries_compacts_again(tmp_path: Path) -> None:
    clock = ManualClock()
    workers = [Identity.generate() for _ in range(16)]
    with Journal(tmp_path / "j.jsonl", max_bytes=8 * 1024, clock=clock) as journal:
        # 16 workers heartbeat while Redis is down; a compaction leaves the file nearly full.
        for seq in range(1, 4):
            for identity in workers:
                journal.append([_beat(identity, seq, clock)])
            clock.advance(1.0)
        assert journal.size > 0.75 * journal.max_bytes
        clock.advance(200.0)  # every lease in the file ends
        fresh = [_beat(identity, 4, clock) for identity in workers[:4]]
        fresh.append(_beat(Identity.generate(), 1, clock))
        assert journal.append(fresh) == fresh
        assert {r.worker_id for r in journal.replay().records} == {r.worker_id for r in fresh}


def test_a_failed_write_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    clock = ManualClock()
    path = tmp_path / "j.jsonl"
    first, second, third = (_beat(Identity.generate(), 1, clock) for _ in range(3))
    with Journal(path, clock=clock) as journal:
        journal.append([first])
        size = path.stat().st_size
        # The disk fills 200 bytes on: the write fails with part of the line written.
        with _file_size_limit(size + 200), pytest.raises(OSError, match="too large"):
            journal.append([second])
        assert path.stat().st_size == journal.size == size
        assert journal.append([third]) == [third]
        replay = journal.replay()
        assert (replay.records, replay.skipped) == ([first, third], 0)
        journal.truncate(replay.end)
        assert path.stat().st_size == 0


@contextlib.contextmanager
def _file_size_limit(size: int) -> Iterator[None]:
    """RLIMIT_FSIZE for this process, with SIGXFSZ ignored: writes past `size` fail (EFBIG)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_truncate_drops_the_replayed_prefix_and_keeps_later_appends(tmp_path: Path) -> None:
    clock = ManualClock()
    path = tmp_path / "j.jsonl"
    early, late = _beat(Identity.generate(), 1, clock), _beat(Identity.generate(), 1, clock)
    with Journal(path, clock=clock) as journal:
        journal.append([early])
        replay = journal.replay()
        journal.append([late])  # arrived while the replay was being written to Redis
        journal.truncate(replay.end)
        assert journal.depth == 1
        assert journal.replay().records == [late]
        journal.truncate(journal.replay().end)
        assert (journal.depth, journal.size, journal.oldest) == (0, 0, None)
        journal.append([early])
    with Journal(path, clock=clock) as again:
        assert again.replay().records == [early]


def test_a_closed_journal_refuses_appends(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.jsonl")
    with pytest.raises(RuntimeError, match="not open"):
        journal.append([make_record()])
    with pytest.raises(ValueError, match="max_bytes"):
        Journal(tmp_path / "x", max_bytes=10)
