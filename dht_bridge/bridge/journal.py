"""The bridge's local journal: what Redis must learn while it is unreachable.

An append-only JSON Lines file. Every append is written and fsynced before it returns, so a
record that reached the journal survives the bridge being killed. The file is bounded: when an
append would pass `max_bytes` the journal first compacts itself (newest record per worker, expired
ones dropped), and when that is not enough it refuses the rest with one clear log line per
episode. A crash can leave a torn last line; opening the journal cuts it off, and reading skips any
line that does not parse. When Redis is back the bridge replays the journal (merged by the merge
rule) and truncates what it replayed; entries appended meanwhile are kept.

The methods block on disk I/O: the bridge calls them through `asyncio.to_thread`, one at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dht_bridge.errors import RecordError
from dht_bridge.jsontext import loads_bounded
from dht_bridge.records import WorkerRecord, merge_into, supersedes

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
# Compacting again before the file has grown by this share of the limit would rewrite a nearly
# full file on every append: past that point the journal is simply full.
RECOMPACT_GROWTH = 0.25
MIN_MAX_BYTES = 4096
# A line nests 3 levels (entry, record, capabilities); deeper is not one of ours (torn or
# damaged), and json.loads would raise RecursionError rather than ValueError on a deep one.
MAX_LINE_DEPTH = 8


@dataclass(frozen=True)
class JournalEntry:
    """One journaled record and when it was journaled (unix time)."""

    record: WorkerRecord
    at: float


@dataclass(frozen=True)
class Replay:
    """What `Journal.replay` read: the newest live entry per worker, and where reading stopped.

    Pass `end` to `Journal.truncate` once the records are safely elsewhere.
    """

    entries: list[JournalEntry]
    end: int
    lines: int
    skipped: int

    @property
    def records(self) -> list[WorkerRecord]:
        """The records of `entries`."""
        return [entry.record for entry in self.entries]


class Journal:
    """An fsynced, size-bounded JSON Lines journal of worker records.

    `clock` is the wall clock that decides which leases have ended (they are unix times).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"journal max_bytes must be at least {MIN_MAX_BYTES}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._clock = clock
        self._file: IO[bytes] | None = None
        self._size = 0
        self._depth = 0
        self._oldest: float | None = None
        self._compacted_at: int | None = None
        # When enough of what the last compaction kept will have lapsed to make it worth
        # compacting again, however little the file grew since (see `_may_compact`).
        self._roomy_at = math.inf
        self._full_logged = False
        self.dropped = 0
        self.torn = 0

    # -- life cycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Create or reopen the file, cut off a torn last line, and count what it holds."""
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._file = _open_append(self.path)
        self._size = self._file.tell()
        self._recount()
        if self._depth:
            logger.info(
                "journal %s holds %d records (%d bytes) from an earlier run",
                self.path,
                self._depth,
                self._size,
            )

    def close(self) -> None:
        """Close the file (everything appended is already on disk)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Journal:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- figures ---------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Entries in the file (several may be versions of one worker)."""
        return self._depth

    @property
    def size(self) -> int:
        """Bytes in the file."""
        return self._size

    @property
    def oldest(self) -> float | None:
        """When the oldest entry still in the file was journaled, or None when it is empty."""
        return self._oldest

    # -- writing ---------------------------------------------------------------------------

    def append(self, records: Iterable[WorkerRecord]) -> list[WorkerRecord]:
        """Write and fsync `records`; returns those journaled.

        Expired records are skipped (Redis would drop them too). When the limit is reached
        the journal compacts itself once; what still does not fit is dropped and logged.
        Raises OSError when the write fails (a full disk): the file is then as it was.
        """
        now = self._clock()
        live = [r for r in records if not r.is_expired(now)]
        if not live:
            return []
        lines = [_encode(r, now) for r in live]
        file = self._require_open()
        needed = sum(len(line) for line in lines)
        if self._size + needed > self.max_bytes and self._may_compact(now):
            self._compact(now)
            file = self._require_open()
        room = self.max_bytes - self._size
        accepted: list[bytes] = []
        for line in lines:
            if len(line) > room:
                break
            accepted.append(line)
            room -= len(line)
        refused = len(lines) - len(accepted)
        if accepted:
            data = b"".join(accepted)
            try:
                _write_all(file, data)
                os.fsync(file.fileno())
            except OSError:
                # A part may be on disk: cut it, or the journal's size would fall behind the
                # file and a later truncate after replay would drop what was journaled since.
                os.ftruncate(file.fileno(), self._size)
                raise
            self._size += len(data)
            self._depth += len(accepted)
            if self._oldest is None:
                self._oldest = now
        if refused:
            self._refuse(refused)
        return live[: len(accepted)]

    def _refuse(self, count: int) -> None:
        self.dropped += count
        if not self._full_logged:
            self._full_logged = True
            logger.error(
                "journal %s is FULL (%d of %d bytes, %d entries after compaction): %d records "
                "not journaled; Redis will learn live ones from the DHT when it returns, but "
                "a worker's record that expires in the DHT meanwhile is lost. Raise "
                "RMA_JOURNAL_MAX_BYTES or bring Redis back.",
                self.path,
                self._size,
                self.max_bytes,
                self._depth,
                count,
            )
        else:
            logger.debug("journal full: %d more records not journaled", count)

    def _may_compact(self, now: float) -> bool:
        if self._compacted_at is None or now >= self._roomy_at:
            return True
        return self._size - self._compacted_at >= RECOMPACT_GROWTH * self.max_bytes

    def _compact(self, now: float) -> None:
        """Rewrite the file with the newest live entry per worker."""
        before_size, before_depth = self._size, self._depth
        entries = _newest(self._read()[0], now)
        lines = [_encode(e.record, e.at) for e in entries]
        self._rewrite(b"".join(lines))
        self._depth = len(entries)
        self._oldest = min((e.at for e in entries), default=None)
        self._compacted_at = self._size
        self._roomy_at = _lapsed_enough(
            sorted(zip((e.record.expires_at for e in entries), map(len, lines), strict=True)),
            RECOMPACT_GROWTH * self.max_bytes,
        )
        logger.info(
            "journal %s compacted: %d entries (%d bytes) -> %d entries (%d bytes)",
            self.path,
            before_depth,
            before_size,
            self._depth,
            self._size,
        )

    # -- replay ----------------------------------------------------------------------------

    def replay(self) -> Replay:
        """The newest live entry per worker of the whole file, merged by the merge rule."""
        self._require_open()
        end = self._size
        read, skipped = self._read(end=end)
        return Replay(_newest(read, self._clock()), end, len(read), skipped)

    def truncate(self, end: int) -> None:
        """Drop the first `end` bytes (a replayed prefix); later entries stay."""
        self._require_open()
        if end >= self._size:
            file = self._require_open()
            file.truncate(0)
            file.flush()
            os.fsync(file.fileno())
            self._size = 0
            self._depth, self._oldest = 0, None
        else:
            with self.path.open("rb") as source:
                source.seek(end)
                rest = source.read()
            self._rewrite(rest)
            self._recount()
        self._compacted_at = None
        self._roomy_at = math.inf
        self._full_logged = False

    # -- plumbing --------------------------------------------------------------------------

    def _read(self, *, end: int | None = None) -> tuple[list[JournalEntry], int]:
        """Parsed entries up to byte `end`, and how many lines did not parse (skipped)."""
        entries: list[JournalEntry] = []
        skipped = 0
        if not self.path.exists():
            return entries, skipped
        with self.path.open("rb") as source:
            offset = 0
            for line in source:
                if end is not None and offset >= end:
                    break
                offset += len(line)
                entry = _decode(line)
                if entry is None:
                    skipped += 1
                    logger.warning(
                        "journal %s: skipped an unreadable line at byte %d (%d bytes)",
                        self.path,
                        offset - len(line),
                        len(line),
                    )
                    continue
                entries.append(entry)
        return entries, skipped

    def _recount(self) -> None:
        self._depth, self._oldest = 0, None
        for entry in self._read()[0]:
            self._count(entry)

    def _count(self, entry: JournalEntry) -> None:
        self._depth += 1
        if self._oldest is None or entry.at < self._oldest:
            self._oldest = entry.at

    def _repair_tail(self) -> None:
        """Cut a last line without its newline: the write a crash interrupted."""
        if not self.path.exists():
            return
        with self.path.open("r+b") as file:
            size = file.seek(0, os.SEEK_END)
            if size == 0:
                return
            file.seek(size - 1)
            if file.read(1) == b"\n":
                return
            # Walk back to the last complete line; the file is bounded, so this is too.
            chunk = min(size, 64 * 1024)
            cut = 0
            position = size
            while position > 0:
                start = max(0, position - chunk)
                file.seek(start)
                data = file.read(position - start)
                newline = data.rfind(b"\n")
                if newline >= 0:
                    cut = start + newline + 1
                    break
                position = start
            file.truncate(cut)
            file.flush()
            os.fsync(file.fileno())
        self.torn += 1
        logger.warning(
            "journal %s: cut off a torn last line of %d bytes (a write interrupted by a crash)",
            self.path,
            size - cut,
        )

    def _rewrite(self, data: bytes) -> None:
        """Replace the file's content atomically (temporary file, fsync, rename, fsync dir)."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        self.close()
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._file = _open_append(self.path)
        self._size = len(data)

    def _require_open(self) -> IO[bytes]:
        if self._file is None:
            raise RuntimeError(f"journal {self.path} is not open")
        return self._file


def _encode(record: WorkerRecord, at: float) -> bytes:
    line = json.dumps(
        {"at": round(at, 3), "record": record.to_dict()}, sort_keys=True, separators=(",", ":")
    )
    return line.encode("utf-8") + b"\n"


def _decode(line: bytes) -> JournalEntry | None:
    if not line.endswith(b"\n"):
        return None  # torn: a line is only complete with its newline
    try:
        data = loads_bounded(line, max_depth=MAX_LINE_DEPTH)
        if not isinstance(data, dict):
            return None
        at = data.get("at")
        if isinstance(at, bool) or not isinstance(at, int | float):
            return None
        return JournalEntry(WorkerRecord.from_dict(data.get("record")), float(at))
    except (ValueError, OverflowError, UnicodeDecodeError, RecordError):
        return None


def _newest(entries: Iterable[JournalEntry], now: float) -> list[JournalEntry]:
    """The newest live entry per worker by the merge rule; each keeps its earliest time."""
    best: dict[str, WorkerRecord] = {}
    first_at: dict[str, float] = {}
    for entry in entries:
        wid = entry.record.worker_id
        first_at[wid] = min(first_at.get(wid, entry.at), entry.at)
        held = best.get(wid)
        if held is None or supersedes(entry.record, held):
            best[wid] = entry.record
    live: dict[str, WorkerRecord] = {}
    merge_into(live, best.values(), now=now)
    return [JournalEntry(record, first_at[wid]) for wid, record in live.items()]


def _lapsed_enough(lapses: list[tuple[float, int]], share: float) -> float:
    """When entries of `share` bytes will have lapsed, from (expires_at, bytes) in order."""
    freed = 0
    for expires_at, size in lapses:
        freed += size
        if freed >= share:
            return expires_at
    return math.inf


def _open_append(path: Path) -> IO[bytes]:
    # Unbuffered: bytes a failed write leaves in a buffer would reach the file with the next.
    return path.open("ab", buffering=0)


def _write_all(file: IO[bytes], data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = file.write(view)
        view = view[written or 0 :]


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is; not every platform allows it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["DEFAULT_MAX_BYTES", "Journal", "JournalEntry", "Replay"]
