"""The worker's JSON state file: key path, last seq, known DHT peers, shard levels.

It is what lets a restarted worker rejoin with no request to the edge, and keeps seq strictly
increasing across restarts: the saved `seq` is a ceiling, reserved on disk before any record
carrying a seq up to it leaves the process (one fsync per block of seqs, not per heartbeat).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dht_bridge.jsontext import loads_bounded
from worker.errors import StartError, StateInUse

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# The state nests 3 levels (peers in a list of pairs); a deeper file is corrupt, and json.loads
# would raise RecursionError on a deep enough one instead of a ValueError.
MAX_STATE_DEPTH = 8


class LoadStatus(enum.Enum):
    """How loading the state file went."""

    LOADED = "loaded"
    MISSING = "missing"
    CORRUPT = "corrupt"


@dataclass
class WorkerState:
    """What survives a restart."""

    worker_id: str = ""
    key_file: str = ""
    seq: int = 0
    peers: list[tuple[str, int]] = field(default_factory=list)
    levels: list[list[Any]] = field(default_factory=list)
    # Until when a record this worker registered through the edge stays live there: a leave
    # within that time also sends the tombstone to the edge.
    edge_lease_until: float = 0.0
    # The UDP port the DHT node had: a restart binds it again when it is free, so that the
    # routing tables and bootstrap lists that name this worker's address still reach it.
    dht_port: int = 0

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object."""
        return {
            "version": STATE_VERSION,
            "worker_id": self.worker_id,
            "key_file": self.key_file,
            "seq": self.seq,
            "peers": [[host, port] for host, port in self.peers],
            "levels": self.levels,
            "edge_lease_until": self.edge_lease_until,
            "dht_port": self.dht_port,
        }

    @classmethod
    def from_json(cls, data: Any) -> WorkerState:
        """Parse the file's object; ValueError names what is wrong."""
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError(f"not a version {STATE_VERSION} worker state object")
        seq = data.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError("seq must be a non-negative integer")
        peers = data.get("peers", [])
        if not isinstance(peers, list):
            raise ValueError("peers must be a list")
        parsed: list[tuple[str, int]] = []
        for item in peers:
            if not (
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], int)
                and 0 < item[1] < 65536
            ):
                raise ValueError(f"peer {item!r} is not [host, port]")
            parsed.append((item[0], item[1]))
        worker_id, key_file = data.get("worker_id", ""), data.get("key_file", "")
        lease = data.get("edge_lease_until", 0.0)
        levels = data.get("levels", [])
        if not (isinstance(worker_id, str) and isinstance(key_file, str)):
            raise ValueError("worker_id and key_file must be strings")
        if isinstance(lease, bool) or not isinstance(lease, int | float):
            raise ValueError("edge_lease_until must be a number")
        if not isinstance(levels, list):
            raise ValueError("levels must be a list")
        dht_port = data.get("dht_port", 0)  # absent in files written before it was kept
        if isinstance(dht_port, bool) or not isinstance(dht_port, int) or not 0 <= dht_port < 65536:
            raise ValueError("dht_port must be a port number (0: none)")
        return cls(worker_id, key_file, seq, parsed, levels, float(lease), dht_port)


class StateFile:
    """Loads and atomically saves a `WorkerState` at `path` (owner-only permissions)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Saves may run in worker threads: one at a time, and never an older seq over a newer.
        self._lock = threading.Lock()
        self._written_seq = -1
        self._held: int | None = None

    @property
    def lock_path(self) -> Path:
        """The file whose lock says an agent runs on this state."""
        return self.path.with_name(self.path.name + ".lock")

    def acquire(self) -> None:
        """Hold this state for the running agent, or raise StateInUse (StartError when its
        directory cannot be made or written).

        Two agents on one state file sign with one key: the second's tunnel URL would replace
        the first's and either one's stop would tombstone both. The lock is the kernel's
        (flock), so it goes with the process, however it ends.
        """
        if self._held is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StartError(
                f"cannot use state file {self.path}: {exc.strerror or exc}; give a --state-file "
                "(RMA_STATE_FILE) in a directory this user may write"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StateInUse(
                f"state file {self.path} is in use by another worker agent (pid {holder}); "
                "give each worker its own --state-file (RMA_STATE_FILE)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._held = fd

    def release(self) -> None:
        """Let another agent use this state (closing the descriptor drops the lock)."""
        if self._held is not None:
            with contextlib.suppress(OSError):
                os.close(self._held)
            self._held = None

    def load(self) -> tuple[WorkerState, LoadStatus]:
        """The saved state, or an empty one with a clear log line saying why."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            logger.info("no worker state file at %s: first start, no saved peers or seq", self.path)
            return WorkerState(), LoadStatus.MISSING
        except OSError as exc:
            return self._corrupt(f"cannot read it: {exc}")
        try:
            data = loads_bounded(text, max_depth=MAX_STATE_DEPTH)
            return WorkerState.from_json(data), LoadStatus.LOADED
        except ValueError as exc:  # not JSON, or nested past any state of ours
            return self._corrupt(str(exc))

    def _corrupt(self, reason: str) -> tuple[WorkerState, LoadStatus]:
        aside = self.path.with_name(self.path.name + ".corrupt")
        try:
            os.replace(self.path, aside)
            kept = f"moved it to {aside}"
        except OSError as exc:
            kept = f"could not move it aside ({exc}); it will be overwritten"
        logger.warning(
            "worker state file %s is corrupt (%s); %s. Starting without saved peers; "
            "seq is recovered from the DHT",
            self.path,
            reason,
            kept,
        )
        return WorkerState(), LoadStatus.CORRUPT

    def save(self, state: WorkerState, *, final: bool = False) -> bool:
        """Write `state` atomically and durably: a seq must survive a crash right after.

        Thread-safe. A state whose seq is below one already written is skipped (False): a slow
        save finishing late must not roll the reserved ceiling back. A `final` save (the
        process signs nothing after it) may lower the ceiling to the last seq really used.
        """
        data = json.dumps(state.to_json(), indent=2).encode()
        with self._lock:
            if state.seq < self._written_seq and not final:
                return False
            self._write(data)
            self._written_seq = state.seq
            return True

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:  # mkstemp creates it 0600
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            raise
