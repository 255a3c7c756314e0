"""Concurrent reads of the registry sent to Redis together: one round trip for a loop pass's worth.

A lookup's Redis read cost the router more in redis-py's per-command machinery (its retry
wrapper, the connection pool, timers, the script wrapper) than in the read itself; under load
many lookups wait on their own round trips at once (bench/README.md, `router_bench.py`). A
`ReadBatcher` collects the reads asked for while the event loop runs its ready callbacks and
sends them as one call when the loop next turns: no timer, no added wait beyond that turn. A read
asked for again in the same batch (two lookups of one page) is sent once and answered to both.

Each read gets its own answer or its own error: `send` returns one result per read, an exception
instance for a read that failed alone; an exception raised by `send` itself (Redis down, the
timeout) goes to every read of the batch. A caller giving up (cancelled) takes nothing from the
others. Batches are bounded by `max_reads` distinct reads: a burst beyond it opens another batch,
sent in the same turn on its own connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

__all__ = ["ReadBatcher"]

R = TypeVar("R", bound=Hashable)
A = TypeVar("A")


class ReadBatcher(Generic[R, A]):
    """Reads of type R answered by `send` in batches of at most `max_reads` distinct reads.

    `send(reads)` returns one answer or exception per read, in order; it is bounded by
    `timeout` seconds here, whatever its own bounds.
    """

    def __init__(
        self,
        send: Callable[[Sequence[R]], Awaitable[Sequence[A | Exception]]],
        *,
        max_reads: int,
        timeout: float,
    ) -> None:
        if max_reads < 1:
            raise ValueError(f"max_reads must be at least 1, not {max_reads}")
        self._send = send
        self._max_reads = max_reads
        self._timeout = timeout
        # The batch still taking reads: each distinct read with the futures of its callers.
        self._open: dict[R, list[asyncio.Future[A]]] | None = None
        # Batches being sent, kept referenced until they end (the loop holds tasks weakly).
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0  # batches sent (for tests and diagnostics)
        self.reads = 0  # distinct reads sent

    async def read(self, read: R) -> A:
        """The answer to `read`, sent with every other read asked for in this loop turn."""
        batch = self._open
        if batch is None or (read not in batch and len(batch) >= self._max_reads):
            batch = self._open = {}
            # The task's first step runs at the loop's next turn, after every callback ready
            # now: the reads they ask for join this batch.
            task = asyncio.get_running_loop().create_task(self._flush(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        future: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        batch.setdefault(read, []).append(future)
        return await future

    async def _flush(self, batch: dict[R, list[asyncio.Future[A]]]) -> None:
        if self._open is batch:
            self._open = None
        reads = list(batch)
        self.batches += 1
        self.reads += len(reads)
        try:
            async with asyncio.timeout(self._timeout):
                answers = await self._send(reads)
            if len(answers) != len(reads):
                raise RuntimeError(f"{len(answers)} answers to {len(reads)} reads")
        except asyncio.CancelledError:
            for futures in batch.values():
                for future in futures:
                    future.cancel()
            raise
        except Exception as exc:
            answers = [exc] * len(reads)
        for read, answer in zip(reads, answers, strict=True):
            for future in batch[read]:
                if future.done():
                    continue  # its caller gave up
                if isinstance(answer, Exception):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
