"""Real local Redis topologies for tests: a Cluster, and a primary + replica + 3 Sentinels.

Every process is a redis-server from the binary on loopback ports the OS handed out (never 6379),
with its own directory; `stop()` kills every one of them, and is safe to call twice. Waits poll
a condition against a deadline; the timings (node timeout, down-after) are short so a failover
takes seconds, and the deadlines generous so a loaded 2-core machine still makes it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from dht_bridge.settings import RegistrySettings
from tests.support.helpers import free_port
from tests.support.redis_server import TEST_REDIS_TIMEOUT, RedisServer, RedisServerError

# A Cluster replica starts its failover about 2 node timeouts after its primary dies.
CLUSTER_NODE_TIMEOUT_MS = 1000
SENTINEL_DOWN_AFTER_MS = 1000
SENTINEL_FAILOVER_TIMEOUT_MS = 10_000
SERVICE_NAME = "rma-test"
READY_TIMEOUT = 60.0
POLL = 0.05


def _ask(port: int, *args: str) -> object:
    """One command to one server, its raw reply (no redis-py parsing), None on any failure."""
    # redis-py's Connection is untyped; a raw connection is what the topology checks need.
    connection = redis.Connection(  # type: ignore[no-untyped-call]
        host="127.0.0.1", port=port, socket_timeout=2.0, socket_connect_timeout=2.0
    )
    try:
        connection.send_command(*args)  # type: ignore[no-untyped-call]
        return connection.read_response()
    except (redis.RedisError, OSError):
        return None
    finally:
        connection.disconnect()  # type: ignore[no-untyped-call]


def wait_until(condition: Callable[[], bool], *, timeout: float, message: str) -> None:
    """Poll `condition` (synchronous) until true; RedisServerError naming `message` if late."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise RedisServerError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(POLL)  # polling interval of a deadline wait, not synchronisation


class ClusterNodeServer(RedisServer):
    """A redis-server in cluster mode, with its cluster bus on a port of its own."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.bus_port = 0

    def arguments(self) -> list[str]:
        """Cluster options on top of the plain ones."""
        self.bus_port = free_port()
        return [
            *super().arguments(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.workdir / "nodes.conf"),
            "--cluster-port",
            str(self.bus_port),
            "--cluster-node-timeout",
            str(CLUSTER_NODE_TIMEOUT_MS),
            # A replica that lost its primary a while ago may still take over: we kill primaries.
            "--cluster-replica-validity-factor",
            "0",
        ]


class SentinelServer(RedisServer):
    """A Sentinel watching the primary at `master_port`."""

    def __init__(self, workdir: Path, master_port: int) -> None:
        super().__init__(workdir)
        self.master_port = master_port

    def arguments(self) -> list[str]:
        """A config file (Sentinel rewrites it) and Sentinel mode."""
        config = self.workdir / "sentinel.conf"
        config.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    f"dir {self.workdir}",
                    f"sentinel monitor {SERVICE_NAME} 127.0.0.1 {self.master_port} 2",
                    f"sentinel down-after-milliseconds {SERVICE_NAME} {SENTINEL_DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {SERVICE_NAME} {SENTINEL_FAILOVER_TIMEOUT_MS}",
                    f"sentinel parallel-syncs {SERVICE_NAME} 1",
                    "",
                ]
            )
        )
        return [str(config), "--sentinel"]


class ClusterTopology:
    """`masters` primaries, each with `replicas` replicas, covering every slot."""

    def __init__(self, workdir: Path, *, masters: int = 3, replicas: int = 1) -> None:
        self.workdir = workdir
        self.masters = masters
        self.replicas = replicas
        self.nodes: list[ClusterNodeServer] = []

    @property
    def url(self) -> str:
        """A redis+cluster:// URL naming every node as a seed."""
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis+cluster://{seeds}"

    def settings(self, timeout: float = TEST_REDIS_TIMEOUT) -> RegistrySettings:
        """Registry settings for this cluster."""
        return RegistrySettings(redis_url=self.url, timeout=timeout)

    def start(self) -> None:
        """Start the nodes, join them into one cluster, wait until every node says ok."""
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RedisServerError("redis-cli is not on PATH (it comes with redis-server)")
        try:
            for i in range(self.masters * (1 + self.replicas)):
                node = ClusterNodeServer(self.workdir / f"node-{i}")
                self.nodes.append(node)
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=READY_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def wait_healthy(self, timeout: float = READY_TIMEOUT) -> None:
        """Every live node reports cluster_state:ok with all slots, and every replica is synced."""
        wait_until(self._healthy, timeout=timeout, message="the cluster to be ok")

    def _healthy(self) -> bool:
        live = [node for node in self.nodes if node.running]
        for node in live:
            info = _ask(node.port, "CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
                return False
            replication = _ask(node.port, "INFO", "replication")
            text = replication.decode() if isinstance(replication, bytes) else str(replication)
            if "role:slave" in text and "master_link_status:up" not in text:
                return False
        return True

    def master_for(self, key: str) -> ClusterNodeServer:
        """The live node that is primary for `key`'s slot now."""
        slot = int(str(_ask(self.nodes[0].port, "CLUSTER", "KEYSLOT", key)))
        for node in self.nodes:
            if not node.running:
                continue
            reply = _ask(node.port, "CLUSTER", "SLOTS")
            if not isinstance(reply, list):
                continue
            for start, end, primary, *_ in reply:
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise RedisServerError(f"no live node knows the primary of slot {slot}")

    def flushall(self) -> None:
        """Empty every primary (replicas follow)."""
        for node in self.nodes:
            role = _ask(node.port, "ROLE")
            if isinstance(role, list) and role and role[0] == b"master":
                _ask(node.port, "FLUSHALL")

    def stop(self) -> None:
        """Kill every node."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.kill()


class SentinelTopology:
    """A primary, one replica and 3 Sentinels watching them (quorum 2)."""

    def __init__(self, workdir: Path, *, sentinels: int = 3) -> None:
        self.workdir = workdir
        self.data: list[RedisServer] = []
        self.sentinels: list[SentinelServer] = []
        self.sentinel_count = sentinels

    @property
    def url(self) -> str:
        """A redis+sentinel:// URL naming every Sentinel."""
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE_NAME}/0"

    def settings(self, timeout: float = TEST_REDIS_TIMEOUT) -> RegistrySettings:
        """Registry settings for this deployment."""
        return RegistrySettings(redis_url=self.url, timeout=timeout)

    def start(self) -> None:
        """Start primary, replica and Sentinels; wait until the Sentinels could fail over."""
        try:
            primary = RedisServer(self.workdir / "primary")
            self.data.append(primary)
            primary.start()
            replica = _ReplicaServer(self.workdir / "replica", primary.port)
            self.data.append(replica)
            replica.start()
            for i in range(self.sentinel_count):
                sentinel = SentinelServer(self.workdir / f"sentinel-{i}", primary.port)
                self.sentinels.append(sentinel)
                sentinel.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Replica synced; every Sentinel knows the replica and the other Sentinels."""
        wait_until(self._ready, timeout=timeout, message="Sentinels ready to fail over")

    def _ready(self) -> bool:
        primary = self.primary()
        if primary is None:
            return False
        replication = _ask(primary.port, "INFO", "replication")
        text = replication.decode() if isinstance(replication, bytes) else ""
        if "connected_slaves:0" in text or "state=online" not in text:
            return False
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            if _ask(sentinel.port, "SENTINEL", "CKQUORUM", SERVICE_NAME) is None:
                return False
            replicas = _ask(sentinel.port, "SENTINEL", "REPLICAS", SERVICE_NAME)
            others = _ask(sentinel.port, "SENTINEL", "SENTINELS", SERVICE_NAME)
            if not isinstance(replicas, list) or not replicas:
                return False
            if not isinstance(others, list) or len(others) < self.sentinel_count - 1:
                return False
        return True

    def primary(self) -> RedisServer | None:
        """The live data server that every live Sentinel names as primary, if they agree."""
        named: set[int] = set()
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            reply = _ask(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE_NAME)
            if not isinstance(reply, list) or len(reply) != 2:
                return None
            named.add(int(reply[1]))
        if len(named) != 1:
            return None
        port = named.pop()
        server = next((s for s in self.data if s.port == port and s.running), None)
        if server is None:
            return None
        role = _ask(server.port, "ROLE")
        return server if isinstance(role, list) and role and role[0] == b"master" else None

    def flushall(self) -> None:
        """Empty the primary (the replica follows)."""
        primary = self.primary()
        if primary is None:
            raise RedisServerError("no primary to flush")
        primary.flushall()

    def stop(self) -> None:
        """Kill every process."""
        for server in [*self.sentinels, *self.data]:
            with contextlib.suppress(Exception):
                server.kill()


class _ReplicaServer(RedisServer):
    """A replica of the server on `master_port`."""

    def __init__(self, workdir: Path, master_port: int) -> None:
        super().__init__(workdir)
        self.master_port = master_port

    def arguments(self) -> list[str]:
        """Plain options plus replicaof."""
        return [*super().arguments(), "--replicaof", "127.0.0.1", str(self.master_port)]
