"""Child mode of dht_bench: one process, one event loop, a share of the benchmark's nodes.

The parent writes one JSON command per line on our stdin; we answer with JSON lines on the
original stdout: `{"type": "progress", "done": n}` while a long command runs, then one
`{"type": "reply", ...}`. File descriptor 1 is pointed at stderr once the protocol has its own
copy, so a stray print in a library cannot corrupt the protocol. End of stdin (the parent
died) closes every node and exits, so no child outlives its parent.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import os
import resource
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any, Protocol

from common import read_stdin
from dht_bench_plan import identity_from_secret, raw_value
from kademlia.network import Server
from kademlia.utils import digest

from dht_bridge.dht import shards
from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.publish import KeyPublish, PublishReport
from dht_bridge.dht.values import key_digest
from dht_bridge.errors import BootstrapError, PublishError
from dht_bridge.records import MAX_LEASE, CapabilityValue
from dht_bridge.settings import DHTSettings
from dht_bridge.tunnels import TunnelPolicy
from tests.support.helpers import free_port, make_record

logger = logging.getLogger("dht_bench.child")

HOST = "127.0.0.1"
# Longer than any bounded run, so no record expires mid-benchmark; within the lease cap.
RECORD_TTL = MAX_LEASE - 300
CAPABILITIES: dict[str, CapabilityValue] = {
    "cpu": 8,
    "ram_gb": 32,
    "gpu": "rtx-3060",
    "os": "linux",
}
PROGRESS_EVERY = 0.5
STREAM_LIMIT = 1 << 26

Address = tuple[str, int]
# (the right value came back, hops if the impl says, the reader held the key itself)
Outcome = tuple[bool, int | None, bool]


class BenchNode(Protocol):
    """What the benchmark does to a node, whichever implementation it is."""

    address: Address

    async def start(self) -> None: ...
    async def join(self, peers: list[Address]) -> Outcome: ...
    async def store(self, spec: dict[str, Any]) -> Outcome: ...
    async def get(self, spec: dict[str, Any]) -> Outcome: ...
    async def service(self, spec: dict[str, Any]) -> Outcome: ...
    def kill(self) -> None: ...
    async def close(self) -> None: ...
    def packets_out(self) -> int: ...
    def bytes_out(self) -> int: ...
    def contacts(self) -> int: ...
    def stored_bytes(self) -> int: ...


class OursNode:
    """Our DHTNode with `DHTSettings()` defaults (0.5 s RPC timeout), in server or client mode."""

    def __init__(self, node_id: bytes, *, client: bool = False) -> None:
        self.node = DHTNode(DHTSettings(), policy=TunnelPolicy(), node_id=node_id, client=client)
        self.address: Address = (HOST, 0)
        self.stored_but_reported_not = 0

    async def start(self) -> None:
        await self.node.listen()
        self.address = self.node.address

    async def join(self, peers: list[Address]) -> Outcome:
        try:
            await self.node.bootstrap(peers)
        except BootstrapError:
            return False, None, False
        return True, None, False

    async def store(self, spec: dict[str, Any]) -> Outcome:
        record = make_record(
            identity_from_secret(spec["secret"]),
            services=[spec["service"]],
            seq=spec["seq"],
            ttl=RECORD_TTL,
            capabilities=CAPABILITIES,
            region="eu",
            load=spec["load"],
        )
        try:
            report = await self.node.publish(record)
        except PublishError:
            return False, None, False
        stored = _publish_landed(report)
        if stored and not report.stored:
            self.stored_but_reported_not += 1
        return stored, None, False

    async def get(self, spec: dict[str, Any]) -> Outcome:
        key = shards.worker_key(spec["wid"])
        local = self.node.storage.value(key_digest(key)) is not None
        record, hops = await self.node.get_record_report(spec["wid"])
        ok = record is not None and record.seq == spec["seq"]
        return ok, hops, local

    async def service(self, spec: dict[str, Any]) -> Outcome:
        report = await self.node.lookup_report(spec["service"], spec["limit"])
        ok = len(report.providers) >= spec["expect"] and all(
            spec["service"] in r.services for r in report.providers
        )
        return ok, report.hops, False

    def kill(self) -> None:
        # No goodbye: the synchronous stop cancels maintenance and closes the socket at once.
        self.node.stop()

    async def close(self) -> None:
        await self.node.aclose()

    def packets_out(self) -> int:
        return self.node.rpc.stats.packets_out if self.node.protocol else 0

    def bytes_out(self) -> int:
        return self.node.rpc.stats.bytes_out if self.node.protocol else 0

    def contacts(self) -> int:
        return len(self.node.rpc.router) if self.node.protocol else 0

    def stored_bytes(self) -> int:
        return sum(len(value) for _, value in self.node.storage)


def _publish_landed(report: PublishReport) -> bool:
    """Did every key of the publish reach a holder, judged by where the record ended up?

    `PublishReport.stored` also counts the full shard a record was refused by before it was
    filed one level down, so it says False for records that were stored (see the report).
    Here a service counts as stored when the last shard tried for it stored the record.
    """
    last: dict[str, KeyPublish] = {}
    for outcome in report.keys:
        parsed = shards.parse_service_key(outcome.key)
        last[parsed[0] if parsed else outcome.key] = outcome
    return bool(last) and all(outcome.stored > 0 for outcome in last.values())


class CountingTransport:
    """Counts the datagrams a stock node sends; everything else goes to the real transport."""

    def __init__(self, inner: asyncio.DatagramTransport) -> None:
        self._inner = inner
        self.packets = 0
        self.bytes = 0

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self._inner.is_closing():
            # A killed node is a vanished process: it sends nothing. The stock protocol would
            # keep answering queued requests through the closed transport and crash a task.
            return
        self.packets += 1
        self.bytes += len(data)
        self._inner.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class RawNode:
    """The stock `kademlia.network.Server`, as it ships (k=20, alpha=3, 5 s RPC timeout)."""

    def __init__(self, node_id: bytes) -> None:
        self.server = Server(node_id=node_id)
        self.address: Address = (HOST, 0)
        self._counter: CountingTransport | None = None

    async def start(self) -> None:
        # The library cannot bind port 0 usefully (it never reads the port back), so ask the
        # OS for a free port; another process may grab it in between, hence the retries.
        for attempt in range(20):
            port = free_port(socket.SOCK_DGRAM)
            try:
                await self.server.listen(port, interface=HOST)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or attempt == 19:
                    raise
                continue
            self.address = (HOST, port)
            break
        self._counter = CountingTransport(self.server.protocol.transport)
        self.server.protocol.transport = self._counter

    async def join(self, peers: list[Address]) -> Outcome:
        # The library returns [] (no error) when no bootstrap peer answered.
        found = await self.server.bootstrap(peers)
        return bool(found), None, False

    async def store(self, spec: dict[str, Any]) -> Outcome:
        try:
            ok = await self.server.set(spec["name"], raw_value(spec["vseed"]))
        except ValueError:  # max([]) when every known neighbour is dead (KADEMLIA_NOTES 9)
            return False, None, False
        return bool(ok), None, False

    async def get(self, spec: dict[str, Any]) -> Outcome:
        # The stock get answers from its own storage without asking anyone when it can.
        local = self.server.storage.get(digest(spec["name"])) is not None
        value = await self.server.get(spec["name"])
        return value == raw_value(spec["vseed"]), None, local

    async def service(self, spec: dict[str, Any]) -> Outcome:
        raise NotImplementedError("the raw library has no service lookup")

    def kill(self) -> None:
        self.server.stop()

    async def close(self) -> None:
        self.server.stop()

    def packets_out(self) -> int:
        return self._counter.packets if self._counter else 0

    def bytes_out(self) -> int:
        return self._counter.bytes if self._counter else 0

    def contacts(self) -> int:
        protocol = self.server.protocol
        if protocol is None:
            return 0
        return sum(len(bucket.nodes) for bucket in protocol.router.buckets)

    def stored_bytes(self) -> int:
        return sum(len(value) for _, value in self.server.storage.data.values())


def rss_kb() -> int:
    """This process's resident set size now, in KB (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class RawLogCounter(logging.Filter):
    """Counts, and keeps off stderr, the stock library's log noise.

    rpcudp logs an ERROR for every RPC timeout (normal under churn); when a lookup is
    cancelled at its deadline, rpcudp's timer or late reply later fails on the cancelled
    future (InvalidStateError, logged by asyncio); a killed node's pending tasks keep
    writing to its closed socket (asyncio warns). Counted or dropped instead of printed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.timeouts = 0
        self.cancelled_timers = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("rpcudp") and "Did not receive reply" in str(record.msg):
            self.timeouts += 1
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.InvalidStateError):
            self.cancelled_timers += 1
            return False
        # A killed stock node's pending tasks keep writing to its closed socket.
        return "socket.send() raised exception" not in str(record.msg)


class Host:
    """This process's nodes and the commands the parent sends about them."""

    def __init__(self, impl: str, emit: Callable[[dict[str, Any]], None]) -> None:
        self.impl = impl
        self.emit = emit
        self.nodes: dict[int, BenchNode] = {}
        self.killed: set[int] = set()
        self.client_ids: frozenset[bytes] = frozenset()
        self.log_counter = RawLogCounter()
        gc.collect()
        self.baseline_kb = rss_kb()

    def make_node(self, node_id: bytes, *, client: bool = False) -> BenchNode:
        """A node of this run's implementation (the stock library has no client mode)."""
        return OursNode(node_id, client=client) if self.impl == "ours" else RawNode(node_id)

    async def op_create(
        self, nodes: list[list[Any]], client_ids: list[str] | None = None
    ) -> dict[str, Any]:
        """Create and bind nodes (not joined yet); answer their addresses."""
        addrs = {}
        if self.impl == "ours":
            self.client_ids = frozenset(bytes.fromhex(i) for i in client_ids or ())
        for index, node_id, client in nodes:
            node = self.make_node(bytes.fromhex(node_id), client=client)
            await node.start()
            self.nodes[index] = node
            addrs[str(index)] = list(node.address)
        return {"addrs": addrs}

    async def op_join(
        self, steps: list[list[Any]], parallel: int, deadline: float
    ) -> list[list[Any]]:
        """Bootstrap each node through its peers, `parallel` at a time."""

        async def one(step: list[Any]) -> Outcome:
            index, peers = step
            return await self.nodes[index].join([(h, p) for h, p in peers])

        return await self.run_bounded(steps, one, parallel, deadline)

    async def op_store(
        self, items: list[dict[str, Any]], concurrency: int, deadline: float
    ) -> list[list[Any]]:
        """Store each key from its writer."""

        async def one(item: dict[str, Any]) -> Outcome:
            return await self.nodes[item["node"]].store(item)

        return await self.run_bounded(items, one, concurrency, deadline)

    async def op_lookup(
        self, items: list[dict[str, Any]], concurrency: int, deadline: float
    ) -> list[list[Any]]:
        """Run each lookup from its reader and judge whether the right value came back."""

        async def one(item: dict[str, Any]) -> Outcome:
            node = self.nodes[item["node"]]
            return await (node.get(item) if item["kind"] == "get" else node.service(item))

        return await self.run_bounded(items, one, concurrency, deadline)

    async def op_kill(self, indices: list[int]) -> int:
        """Close these nodes' sockets at once: no goodbye, their peers find out by timeouts."""
        for index in indices:
            self.nodes[index].kill()
            self.killed.add(index)
        return len(indices)

    async def op_stats(self) -> dict[str, Any]:
        """Memory, traffic and routing-table figures of this process."""
        gc.collect()
        alive = [n for i, n in self.nodes.items() if i not in self.killed]
        return {
            "rss_kb": rss_kb(),
            "baseline_kb": self.baseline_kb,
            "nodes": len(self.nodes),
            "alive": len(alive),
            "packets_out": sum(n.packets_out() for n in self.nodes.values()),
            "bytes_out": sum(n.bytes_out() for n in self.nodes.values()),
            "rpc_timeouts": self._rpc_timeouts(),
            "contacts_mean": sum(n.contacts() for n in alive) / len(alive) if alive else 0.0,
            "stored_bytes": [n.stored_bytes() for n in alive],
            "cancelled_timers": self.log_counter.cancelled_timers,
            "stored_but_reported_not": sum(
                n.stored_but_reported_not for n in self.nodes.values() if isinstance(n, OursNode)
            ),
            **self._mixed_figures(alive),
        }

    def _mixed_figures(self, alive: list[BenchNode]) -> dict[str, int]:
        """Clients held in our servers' routing tables (replacement lists too), and requests
        that reached our clients: in a mixed network both must stay 0."""
        held = ignored = 0
        for bench_node in alive:
            if not isinstance(bench_node, OursNode) or bench_node.node.protocol is None:
                continue
            protocol = bench_node.node.rpc
            if protocol.client:
                ignored += protocol.stats.ignored
                continue
            for bucket in protocol.router.buckets:
                ids = [*bucket.nodes, *bucket.replacement_nodes]
                held += sum(1 for node_id in ids if node_id in self.client_ids)
        return {"clients_in_tables": held, "requests_to_clients": ignored}

    def _rpc_timeouts(self) -> int:
        if self.impl == "raw":
            return self.log_counter.timeouts
        return sum(
            n.node.rpc.stats.timeouts
            for n in self.nodes.values()
            if isinstance(n, OursNode) and n.node.protocol is not None
        )

    async def op_hello(self) -> dict[str, Any]:
        """Answer the pid and the baseline RSS with zero nodes."""
        return {"pid": os.getpid(), "baseline_kb": self.baseline_kb}

    async def close(self) -> None:
        """Close every node (killed ones too: their pending tasks are cancelled)."""
        await asyncio.gather(*(n.close() for n in self.nodes.values()), return_exceptions=True)

    async def run_bounded(
        self,
        items: list[Any],
        work: Callable[[Any], Awaitable[Outcome]],
        concurrency: int,
        deadline: float,
    ) -> list[list[Any]]:
        """Run `work` on every item, `concurrency` at a time, each bounded by `deadline` s.

        Each result is `[ok, seconds, hops, status, local]`, status one of
        ok/miss/timeout/error; a timed-out item counts `deadline` seconds.
        """
        gate = asyncio.Semaphore(concurrency)
        results: list[list[Any]] = [[] for _ in items]
        done = 0
        last_emit = time.monotonic()

        async def one(position: int, item: Any) -> None:
            nonlocal done, last_emit
            async with gate:
                started = time.perf_counter()
                ok, hops, local, status = False, None, False, "error"
                try:
                    async with asyncio.timeout(deadline):
                        ok, hops, local = await work(item)
                    status = "ok" if ok else "miss"
                except TimeoutError:
                    status = "timeout"
                except Exception:
                    logger.warning("benchmark step failed: %r", item, exc_info=True)
                elapsed = deadline if status == "timeout" else time.perf_counter() - started
                results[position] = [ok, elapsed, hops, status, local]
            done += 1
            if time.monotonic() - last_emit >= PROGRESS_EVERY:
                last_emit = time.monotonic()
                self.emit({"type": "progress", "done": done})

        await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
        return results


async def serve(host: Host, reader: asyncio.StreamReader) -> None:
    """Answer commands until `shutdown` or end of input."""
    handlers: dict[str, Callable[..., Awaitable[Any]]] = {
        "hello": host.op_hello,
        "create": host.op_create,
        "join": host.op_join,
        "store": host.op_store,
        "lookup": host.op_lookup,
        "kill": host.op_kill,
        "stats": host.op_stats,
    }
    try:
        while line := await reader.readline():
            message = json.loads(line)
            op = message["op"]
            if op == "shutdown":
                break
            try:
                result = await handlers[op](**message.get("args", {}))
            except Exception as exc:
                logger.exception("command %s failed", op)
                host.emit({"type": "reply", "ok": False, "error": repr(exc)})
            else:
                host.emit({"type": "reply", "ok": True, "result": result})
    finally:
        await host.close()
    host.emit({"type": "reply", "ok": True, "result": "bye"})


def _writer(out: IO[bytes]) -> Callable[[dict[str, Any]], None]:
    def emit(message: dict[str, Any]) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    return emit


def _raise_fd_limit() -> None:
    # Each node holds a socket; a process with hundreds of nodes can pass a soft limit of 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _configure_logging(proc: int, impl: str, level: str, counter: logging.Filter) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s child {proc} ({impl}) %(levelname)s %(name)s: %(message)s",
    )
    # The stock library logs every RPC at INFO and every dropped contact at WARNING; under
    # churn that is thousands of lines. Timeouts are counted by the filter instead.
    logging.getLogger("kademlia").setLevel(logging.ERROR)
    logging.getLogger("rpcudp").setLevel(logging.ERROR)
    if impl == "raw":
        # A logger's filters see only records logged on that very logger, not its children.
        for name in ("rpcudp.protocol", "asyncio"):
            logging.getLogger(name).addFilter(counter)


async def _amain(impl: str, proc: int, level: str, out: IO[bytes]) -> None:
    host = Host(impl, _writer(out))
    _configure_logging(proc, impl, level, host.log_counter)
    reader = await read_stdin(STREAM_LIMIT)
    await serve(host, reader)


def child_main(impl: str, proc: int, level: str = "WARNING") -> int:
    """Entry point of a child process; returns the exit code."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _raise_fd_limit()
    asyncio.run(_amain(impl, proc, level, out))
    return 0
