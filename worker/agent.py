"""The worker agent: join the DHT (asking the edge only when no saved peer answers), heartbeat
there, register through the edge when the DHT is out of reach, and leave with a tombstone.

Behind NAT a worker is a DHT client (see dht_bridge.dht.protocol): in auto mode it starts as
one, asks servers whether they can reach it back, and becomes a server only when they can; it
asks again every `reach_interval` and republishes its record at once when its mode changes."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from dht_bridge.backoff import Backoff, ExponentialBackoff, jittered
from dht_bridge.dht.node import CLIENT, SERVER, DHTNode, Endpoint, PublishReport, udp_endpoint
from dht_bridge.dht.reach import Reachability
from dht_bridge.errors import (
    BootstrapError,
    ConfigError,
    DHTError,
    PublishError,
    RecordError,
    RecordInvalid,
    RMAError,
)
from dht_bridge.identity import Identity
from dht_bridge.logcontext import add_log_fields
from dht_bridge.options import format_hostport
from dht_bridge.records import CapabilityValue, WorkerRecord, sign_record
from dht_bridge.tunnels import canonical_tunnel_url
from worker.cloudflared import QuickTunnel
from worker.config import (
    ADVERTISE_AUTO,
    ADVERTISE_NONE,
    MODE_AUTO,
    MODE_CLIENT,
    MODE_SERVER,
    WorkerConfig,
    advertised_address,
)
from worker.discovery import Discovery, DiscoveryCache, check_ask, discover
from worker.edge import BootstrapPeers, EdgeClient, Registered
from worker.errors import EdgeError, EdgeRefused, EdgeUnavailable, StartError, TunnelError
from worker.load import HttpLoad, LoadSource, StaticLoad, clamp
from worker.proof import ProofProxy
from worker.state import LoadStatus, StateFile, WorkerState

logger = logging.getLogger(__name__)

WILDCARDS = frozenset({"0.0.0.0", "::", ""})
# When the edge says our seq is stale and does not list our record, jump this far ahead:
# more heartbeats than a worker sends in a year at the default pace.
STALE_SEQ_JUMP = 1 << 20
# Seqs reserved on disk at a time: one fsync per this many heartbeats (about half an hour at the
# default pace), and a restart after a crash skips at most this many.
SEQ_BLOCK = 64
EDGE_PEERS_AT_MOST = 4
SERVICES_LOOKUP_LIMIT = 100
SEQ_LOOKUP_TIMEOUT = 2.0
LEAVE_ATTEMPTS = 3
LEAVE_RETRY = ExponentialBackoff(base=0.2, cap=1.0)


class Mode(enum.Enum):
    """Where the worker's record currently lives."""

    STARTING = "starting"
    DHT = "dht"  # published and heartbeating in the DHT
    EDGE = "edge"  # registered through the edge's POST /workers; the DHT is retried
    OFFLINE = "offline"  # neither side took it yet; both are retried
    STOPPED = "stopped"


class WorkerAgent:
    """One worker: identity, record, heartbeats, discovery, leave.

    Use `async with WorkerAgent(config) as agent:` (or `start()` then `aclose()`), once: a
    new run takes a new agent. Inject the edge's httpx `edge_transport`, the DHT node's UDP
    `dht_endpoint` (a NAT, in tests), the wall `clock`, the `load` source and `rng` in tests;
    the DHT settings and every interval come from `config`.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        edge_transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        load: LoadSource | None = None,
        rng: random.Random | None = None,
        dht_endpoint: Endpoint = udp_endpoint,
    ) -> None:
        self.config = config
        self._dht_endpoint = dht_endpoint
        # The last reachability verdict, and the address servers saw our requests come from.
        self.reachability: Reachability | None = None
        self._next_reach = 0.0
        self.clock = clock
        self.rng = rng or random.Random()
        self.mode = Mode.STARTING
        self.state = WorkerState()
        self.state_status = LoadStatus.MISSING
        self.identity: Identity | None = None
        # The key was made by this start: no record of it can be anywhere, so its seq is ours.
        self._fresh_key = False
        self.node: DHTNode | None = None
        self.record: WorkerRecord | None = None
        # The record being published or registered: it may be out there before the call
        # returns, and a stop that cancels the call must still leave with a tombstone.
        self._in_flight: WorkerRecord | None = None
        # When the earliest copy of our record in the DHT lapses: a holder whose renewal waits
        # for the next beat keeps an older copy than `record` (see dht.renew).
        self.dht_lease_until = 0.0
        self.heartbeats = 0
        self.edge: EdgeClient | None = None
        if config.edge_url is not None:
            self.edge = EdgeClient(
                config.edge_url,
                policy=config.policy,
                transport=edge_transport,
                timeout=config.edge_timeout,
                clock=clock,
            )
        self.load: LoadSource = load or _default_load(config)
        self._state_file = StateFile(config.state_file)
        self._seq_reserved = -1  # the ceiling saved in this run; none yet
        self._peers_on_disk = False  # does the state file name peers to rejoin through?
        self._dht_retry = Backoff(config.retry, self.rng)
        self._edge_retry = Backoff(config.retry, self.rng)
        self._edge_peers: BootstrapPeers | None = None
        self._edge_peers_until = 0.0
        self._next_beat = 0.0
        self._next_dht_try = 0.0
        # Bumped by every change to what the record says (`update`, a moved tunnel); a beat
        # signed before the latest one is followed by another at once (`_beat_in`).
        self._changes = 0
        self._signed_changes = 0
        self._task: asyncio.Task[None] | None = None
        # A start closes the clients made here when it fails, and aclose() does at the end.
        self._started = False
        self.discovery = DiscoveryCache(self._discover_now, max_age=config.heartbeat)
        # Set by `update`: the loop wakes and republishes at once.
        self._wake = asyncio.Event()
        # The URL our record names: the configured one, or the quick tunnel's latest.
        self.tunnel_url = config.tunnel_url
        self.tunnel: QuickTunnel | None = None
        # Between cloudflared and the service: answers the router's tunnel proof.
        self.proof_proxy: ProofProxy | None = None
        if config.cloudflared:
            self.proof_proxy = ProofProxy(config.service_url, self)
            self.tunnel = QuickTunnel(
                config.service_url,
                binary=config.cloudflared_bin,
                on_url=self._tunnel_moved,
                backoff=config.retry,
                rng=self.rng,
            )

    # Life cycle.

    @property
    def worker_id(self) -> str:
        """This worker's id (after `start`)."""
        if self.identity is None:
            raise RuntimeError("the agent has not started")
        return self.identity.worker_id

    @property
    def dht_mode(self) -> str:
        """The DHT node's mode now: "server" or "client" (what the config asks at start)."""
        if self.node is not None:
            return self.node.mode
        return SERVER if self.config.mode == MODE_SERVER else CLIENT

    @property
    def edge_requests(self) -> dict[str, int]:
        """Requests sent to the edge so far, by kind."""
        return dict(self.edge.counts) if self.edge is not None else {}

    async def __aenter__(self) -> WorkerAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Load state and identity, join the DHT (or register at the edge), start heartbeats.

        Raises StartError when the DHT socket cannot be bound, another agent holds the state
        file (StateInUse) or there is nowhere to join, and IdentityError when the key file
        exists but cannot be used; nothing else stops a start: whatever side is out of reach
        is retried in the background. An agent starts once: StartError for a second start.
        """
        if self._started:
            raise StartError(
                "this agent was started already (a stopped or failed agent cannot start "
                "again): make a new WorkerAgent"
            )
        self._started = True
        self._state_file.acquire()
        try:
            self.state, self.state_status = self._state_file.load()
            self._peers_on_disk = bool(self.state.peers)
            self.identity = self._load_identity()
            add_log_fields(worker=self.identity.worker_id)
            self._check_somewhere_to_go()
        except BaseException:
            self._state_file.release()
            raise
        try:
            await self._first_reserve()
            if self.tunnel is not None:
                await self._start_proof_proxy()
                self.tunnel_url = self._checked_tunnel_url(await self.tunnel.start())
            if not self.config.edge_only:
                await self._open_node()
                if await self._join(allow_edge=True):
                    try:
                        await self._publish_joined()
                    except (DHTError, RecordError) as exc:
                        logger.warning("joined the DHT but could not publish: %s", exc)
            if self.mode is Mode.DHT:
                # Workers often start together (a host boots, an outage ends): spread their
                # first renewal over half an interval so that their pulses never line up.
                spread = self.rng.uniform(0.5, 1.0)
                self._beat_in(self.config.heartbeat * spread)
            else:
                why = "edge-only mode" if self.config.edge_only else "could not join the DHT"
                await self._fall_back(why)
        except BaseException:
            # Failed or cancelled (a stop during the start) after a first publish: that record
            # must not stay listed until its lease ends.
            await self._leave_bounded()
            await self._close_resources()
            raise
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="worker-loop")

    async def run(self, stop: asyncio.Event) -> None:
        """Start, work until `stop` is set, then leave and close. A `stop` during the start
        cancels it: a join or an edge request can take a timeout or more, and a volunteer's
        Ctrl-C must not wait for them."""
        loop = asyncio.get_running_loop()
        starting = loop.create_task(self.start(), name="worker-start")
        stopping = loop.create_task(stop.wait(), name="worker-stop")
        try:
            await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not starting.done():
                starting.cancel()
                # The start leaves and closes what it opened on its way out.
                await asyncio.gather(starting, return_exceptions=True)
                logger.info("stopped during the start")
        if self.identity is not None:
            # The start ran in a task of its own, with a copy of our log context.
            add_log_fields(worker=self.identity.worker_id)
        if starting.cancelled():
            return
        starting.result()  # the start's error, if it failed
        try:
            await stop.wait()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Leave (a tombstone to the DHT, and to the edge if that path is in use), then close.

        Bounded by `leave_timeout`: a worker told to stop exits within a few seconds.
        """
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.mode is not Mode.STOPPED and self.identity is not None:
            await self._leave_bounded()
        self.mode = Mode.STOPPED
        await self._close_resources()

    async def _leave_bounded(self) -> None:
        """`_leave` within `leave_timeout`; a failure is logged, not raised."""
        try:
            async with asyncio.timeout(self.config.leave_timeout):
                await self._leave()
        except TimeoutError:
            logger.warning("leave did not finish within %gs", self.config.leave_timeout)
        except (RMAError, OSError) as exc:
            logger.warning("leave failed: %s", exc)

    async def _close_resources(self) -> None:
        if self.tunnel is not None:
            # After the leave: the tombstone names the URL that is going away.
            await self.tunnel.aclose()
        if self.proof_proxy is not None:
            await self.proof_proxy.aclose()
        if self.node is not None:
            self._remember_dht()
            await self.node.aclose()
        if self.identity is not None:
            with contextlib.suppress(OSError):
                self._save()
        if self.edge is not None:
            await self.edge.aclose()
        await self.load.aclose()
        await self.discovery.aclose()
        self._state_file.release()

    def _check_somewhere_to_go(self) -> None:
        """Refuse to start with no edge, no bootstrap peer and no saved peer: such an agent
        would retry for ever, alone."""
        if self.edge is None and not self.config.bootstrap and not self.state.peers:
            raise StartError(
                "nowhere to join: give the edge router's URL (--edge, RMA_EDGE_URL) or a DHT "
                "peer (--bootstrap, RMA_BOOTSTRAP); the state file has no saved peers"
            )

    # The quick tunnel.

    async def _start_proof_proxy(self) -> None:
        """cloudflared forwards to the proof proxy, which forwards to the service."""
        assert self.tunnel is not None
        assert self.proof_proxy is not None
        try:
            self.tunnel.service_url = await self.proof_proxy.start()
        except OSError as exc:
            raise TunnelError(f"cannot start the tunnel proof proxy: {exc}") from exc

    def _checked_tunnel_url(self, url: str) -> str:
        try:
            self.config.policy.check(url)
        except RecordError as exc:
            raise TunnelError(f"cloudflared gave a URL the tunnel policy refuses: {exc}") from exc
        return canonical_tunnel_url(url)

    async def _tunnel_moved(self, url: str) -> None:
        """cloudflared came back with another URL: the next record names it, at once."""
        try:
            checked = self._checked_tunnel_url(url)
        except TunnelError as exc:
            logger.error("%s", exc)
            return
        logger.warning("the quick tunnel moved from %s to %s: republishing", self.tunnel_url, url)
        self.tunnel_url = checked
        self._changed()

    # Live changes.

    async def update(
        self,
        *,
        services: Sequence[str] | None = None,
        capabilities: Mapping[str, CapabilityValue] | None = None,
        load: float | None = None,
    ) -> None:
        """Change what this worker offers while it runs; the record is republished at once.

        `services` and `capabilities` are checked as at start (ConfigError names what is
        wrong, and nothing changes). `load` sets a fixed load; it needs the fixed-load source
        (not an in-flight counter or a polled URL, which measure it themselves). A worker
        that leaves a service stays in that service's DHT answers until its last copy there
        lapses (one lease at most); the registry drops it at once.
        """
        changes: dict[str, Any] = {}
        if services is not None:
            changes["services"] = tuple(dict.fromkeys(services))
        if capabilities is not None:
            changes["capabilities"] = dict(capabilities)
        config = replace(self.config, **changes) if changes else self.config
        if load is not None:
            if not isinstance(self.load, StaticLoad):
                raise ConfigError(
                    f"load comes from {type(self.load).__name__}: it cannot be set by hand"
                )
            self.load.value = clamp(load)
        self.config = config
        self._changed()

    def _changed(self) -> None:
        """What the record says changed: republish at once (after a beat in flight, which
        may have signed the old values, by `_beat_in`)."""
        self._changes += 1
        if self.mode in (Mode.DHT, Mode.EDGE, Mode.OFFLINE):
            self._next_beat = _now()
            self._wake.set()

    def _beat_in(self, delay: float) -> None:
        """The next beat after `delay`, or at once when the record just sent predates a
        change: an update that landed while the beat was in flight must not wait a whole
        interval."""
        stale = self._signed_changes != self._changes
        self._next_beat = _now() + (0.0 if stale else delay)

    # Discovery.

    async def discover(self, service: str, limit: int = 10, *, fresh: bool = False) -> Discovery:
        """Up to `limit` providers of `service`: from the DHT within the discovery deadline,
        else from the edge; `source` says which side answered.

        Answers are cached and refreshed in the background (never older than one heartbeat;
        a tombstone this node stores takes its worker out at once): a warm discovery costs no
        round trip. `fresh=True` asks the network now. ConfigError for a malformed service
        name or a limit outside 1..100.
        """
        if fresh:
            check_ask(service, limit)
            return await self._discover_now(service, limit)
        return await self.discovery.discover(service, limit)

    async def _discover_now(self, service: str, limit: int) -> Discovery:
        return await discover(
            service,
            limit=limit,
            node=self.node,
            edge=self.edge,
            deadline=self.config.discovery_deadline,
            region=self.config.region,
        )

    # Identity and state.

    def _load_identity(self) -> Identity:
        path = self.config.key_file
        if path is None:
            named = self.state.key_file
            path = Path(named) if named else self.config.state_file.with_suffix(".key")
        if path.exists():
            identity = Identity.load(path)  # a key that is there but unusable stops the start
        else:
            identity = Identity.generate()
            identity.save(path)
            self._fresh_key = True
            # Expected on a first start; a state file of some worker with no key is not.
            log = logger.warning if self.state.worker_id else logger.info
            log("no key file at %s: created a new identity, worker %s", path, identity.worker_id)
        if self.state.worker_id and self.state.worker_id != identity.worker_id:
            logger.warning(
                "state file %s belongs to worker %s, not %s: its seq is dropped, its peers kept",
                self.config.state_file,
                self.state.worker_id,
                identity.worker_id,
            )
            self.state = WorkerState(peers=self.state.peers)
        self.state.worker_id = identity.worker_id
        # Absolute: a later start (systemd, another shell) may run in another directory, and a
        # relative path read there names no key, so a new identity would be made.
        self.state.key_file = str(path.absolute())
        logger.info(
            "worker %s (state %s: %s, seq %d, %d saved peers)",
            identity.worker_id,
            self.config.state_file,
            self.state_status.value,
            self.state.seq,
            len(self.state.peers),
        )
        return identity

    def _save(self) -> None:
        """The closing save: the exact last seq, as nothing is signed after it."""
        self._state_file.save(self.state, final=True)

    async def _reserve(self) -> None:
        """Put a new seq ceiling on disk, off the event loop: an fsync can take a second on a
        busy disk, and every lease in this process would wait for it."""
        ceiling = self.state.seq + SEQ_BLOCK - 1
        snapshot = replace(
            self.state,
            seq=ceiling,
            peers=list(self.state.peers),
            levels=list(self.state.levels),
        )
        # Shielded: a heartbeat cancelled mid-save still finishes writing its ceiling.
        await asyncio.shield(asyncio.to_thread(self._state_file.save, snapshot))
        self._seq_reserved = ceiling  # only once it is on disk
        self._peers_on_disk = bool(snapshot.peers)

    async def _first_reserve(self) -> None:
        """Reserve the first seqs before anything is sent: a state file that cannot be written
        (a full disk) stops the start saying so, not with an OSError from the first signature."""
        try:
            await self._reserve()
        except OSError as exc:
            raise StartError(
                f"cannot write state file {self.config.state_file}: {exc.strerror or exc}; free "
                "space there or give a --state-file (RMA_STATE_FILE) this user may write"
            ) from exc

    def _remember_dht(self) -> None:
        """Copy what a restart needs from the node into the state (saved with the next seq
        ceiling, and at close)."""
        if self.node is None or self.node.protocol is None:
            return
        peers: list[tuple[str, int]] = []
        if self._edge_peers is not None:
            peers.extend(self._edge_peers.peers[:EDGE_PEERS_AT_MOST])
        peers.extend(self.config.bootstrap)
        peers.extend(self.node.bootstrappable_neighbors())
        if len(self.node.rpc.router) == 0:
            peers.extend(self.state.peers)  # out of touch: keep what we knew
        unique = list(dict.fromkeys(p for p in peers if p != self.node.address))
        if unique:
            self.state.peers = unique[: self.config.saved_peers]
        self.state.levels = self.node.state()["levels"]

    # Joining the DHT.

    async def _open_node(self) -> None:
        node = DHTNode(
            self.config.dht,
            policy=self.config.policy,
            clock=self.clock,
            # The edge hands out workers with their worker id as node id: keep them one.
            node_id=bytes.fromhex(self.worker_id),
            # Auto starts as a client: its address is handed out only once it is known to work.
            client=self.config.mode != MODE_SERVER,
            endpoint=self._dht_endpoint,
            coordinators=self._edge_peers.coordinators if self._edge_peers else (),
        )
        # Any port was asked for: the last run's first, as peers know us there.
        last = self.state.dht_port if self.config.dht.port == 0 else 0
        try:
            if last:
                try:
                    await node.listen(port=last)
                except OSError as exc:
                    logger.info("DHT port %d of the last run is taken (%s): another", last, exc)
                    await node.listen()
            else:
                await node.listen()
        except OSError as exc:
            await node.aclose()
            host, port = self.config.dht.host, self.config.dht.port
            where = format_hostport(host, port)
            raise StartError(f"cannot bind the DHT socket to {where}: {exc}") from exc
        self.state.dht_port = node.address[1]
        node.restore_levels(self.state.levels)
        self.node = node
        self.discovery.watch(node.storage)

    async def _join(self, *, allow_edge: bool) -> bool:
        """Join through saved and configured peers; ask the edge only when none answers (and
        its last answer is older than the TTL it gave)."""
        known = list(dict.fromkeys([*self.config.bootstrap, *self.state.peers]))
        if self._edge_peers is not None:
            known.extend(p for p in self._edge_peers.peers if p not in known)
        if known and await self._bootstrap(known, "saved and configured peers"):
            return True
        if not allow_edge or self.edge is None or _now() < self._edge_peers_until:
            return False
        try:
            answer = await self.edge.bootstrap(region=self.config.region)
        except EdgeError as exc:
            logger.warning("cannot get DHT peers from the edge: %s", exc)
            return False
        self._edge_peers = answer
        self._edge_peers_until = _now() + answer.ttl
        if self.node is not None:
            # Every heartbeat also goes to one or two of them: Redis hears of us even when
            # nodes placed next to our keys swallow what the DHT holders should get.
            self.node.set_coordinators(answer.coordinators)
        fresh = [p for p in answer.peers if p not in known]
        return bool(fresh) and await self._bootstrap(fresh, "peers from the edge")

    async def _bootstrap(self, peers: list[tuple[str, int]], what: str) -> bool:
        assert self.node is not None
        try:
            # The crawl towards our own id runs on beside the publish that follows.
            await self.node.bootstrap(peers, wait=False)
        except BootstrapError as exc:
            logger.info("joining through %s failed: %s", what, exc)
            return False
        return len(self.node.rpc.router) > 0

    async def _publish_joined(self) -> None:
        """Publish after a join; the check whether servers can reach us is then due at once,
        in the heartbeat loop, which publishes again when it changed the mode (a server's
        record hands out its address). Raises DHTError or RecordError when the publish found
        no holder.

        The check is not awaited here: in the field it costs several round trips (behind a NAT,
        a probe's whole wait, then a server's crawl towards its own id), and a start, which an
        embedding service awaits, is done once the worker is listed (`world`, 200 nodes:
        start() returned at 2.26 s p50 / 5.66 s p99 with the check, against 1.39 / 2.55 s for
        the first publish).
        """
        if not self._fresh_key:
            await self._recover_seq()
        await self._enter_dht()
        self._next_reach = _now()

    # Reachability.

    def _checks_reach(self) -> bool:
        """Whether the loop runs reachability checks: always in auto mode (they choose the
        mode), in server mode until one has answered (it only says how servers see us)."""
        if self.config.mode == MODE_AUTO:
            return True
        return self.config.mode == MODE_SERVER and self.reachability is None

    async def _check_reach(self) -> bool:
        """Ask servers whether they can reach us; in auto mode, switch to the mode that fits.
        Returns True when the mode changed (the record must be republished)."""
        assert self.node is not None
        try:
            return await self._reach_verdict(self.node)
        finally:
            # From the end of this check: one slower than the interval must not starve beats.
            self._next_reach = _now() + jittered(self.config.reach_interval, 0.1, self.rng)

    async def _reach_verdict(self, node: DHTNode) -> bool:
        if self.config.mode == MODE_CLIENT:
            return False
        peers = [*self.config.bootstrap]
        if self._edge_peers is not None:
            peers.extend(self._edge_peers.peers)  # coordinators come first in that list
        port = self._advertised_port()
        try:
            verdict = await node.check_reachability(peers, port=port)
        except (OSError, ValueError) as exc:
            logger.warning("reachability check failed: %s", exc)
            return False
        if verdict.reachable is None:
            logger.info("no server answered the reachability check; staying a %s", self.dht_mode)
            return False
        self.reachability = verdict
        if self.config.mode != MODE_AUTO:
            return False
        mode = SERVER if verdict.reachable else CLIENT
        changed = await node.set_mode(mode)
        if changed:
            logger.info(
                "worker %s: %s at %s (%d of %d servers reached us): DHT %s mode",
                self.worker_id,
                "reachable" if verdict.reachable else "not reachable",
                format_hostport(*verdict.observed) if verdict.observed else "?",
                verdict.confirmed,
                verdict.answers,
                mode,
            )
        return changed

    def _advertised_port(self) -> int:
        """The port servers should probe: the configured one, else 0 (where they see us)."""
        advertise = self.config.advertise
        if advertise in (ADVERTISE_AUTO, ADVERTISE_NONE):
            return 0
        return advertised_address(advertise)[1]

    async def _recover_seq(self) -> None:
        """Continue after the newest seq the DHT holds for us: the state file may be lost,
        or older than a record this worker published from another copy of its key."""
        assert self.node is not None
        try:
            async with asyncio.timeout(SEQ_LOOKUP_TIMEOUT):
                found = await self.node.get_record(self.worker_id)
        except (TimeoutError, DHTError) as exc:
            logger.info("could not read our own record from the DHT: %s", exc)
            return
        if found is not None and found.seq > self.state.seq:
            logger.info(
                "the DHT holds seq %d of this worker, beyond the saved %d: continuing from it",
                found.seq,
                self.state.seq,
            )
            self.state.seq = found.seq

    # Records.

    async def _sign_next(
        self, *, ttl: float, advertise: bool, tombstone: bool = False
    ) -> WorkerRecord:
        """The next record, its seq covered by the ceiling on disk before it can leave."""
        assert self.identity is not None
        self.state.seq += 1
        if self.state.seq > self._seq_reserved:
            await self._reserve()
        load = 0.0 if tombstone else await self.load()
        # From here to the signature nothing awaits: the record holds every change made so far.
        self._signed_changes = self._changes
        host, port = self._advertised() if advertise else ("", 0)
        try:
            return self._sign(ttl=ttl, host=host, port=port, load=load, tombstone=tombstone)
        except RecordInvalid as exc:
            observed = self.reachability.observed if self.reachability else None
            if exc.field not in ("dht_host", "dht_port") or (host, port) != observed:
                raise
            # A server's word put it there: were it kept, every beat would fail on it and the
            # worker would stay off the DHT for good. Ask again (in server mode too: no verdict
            # makes a check due); meanwhile advertise without it.
            logger.warning(
                "servers saw us at %s, which no record can hand out (%s): checking again",
                format_hostport(host, port),
                exc,
            )
            self.reachability = None
            self._next_reach = _now()
            host, port = self._advertised()
            return self._sign(ttl=ttl, host=host, port=port, load=load, tombstone=tombstone)

    def _sign(
        self, *, ttl: float, host: str, port: int, load: float, tombstone: bool
    ) -> WorkerRecord:
        assert self.identity is not None
        return sign_record(
            self.identity,
            # What the user typed may be any spelling; what is signed is the one all read alike.
            tunnel_url=canonical_tunnel_url(self.tunnel_url),
            services=self.config.services,
            seq=self.state.seq,
            now=self.clock(),
            ttl=ttl,
            dht_host=host,
            dht_port=port,
            capabilities=self.config.capabilities,
            region=self.config.region,
            load=load,
            tombstone=tombstone,
        )

    def _advertised(self) -> tuple[str, int]:
        """The DHT address our record hands out; empty in client mode."""
        if self.node is None or self.node.mode == CLIENT:
            return "", 0
        host, port = self.node.address
        if self.config.advertise == ADVERTISE_AUTO:
            observed = self.reachability.observed if self.reachability else None
            if observed is not None:
                return observed  # where servers reached us: the NAT's public side, if any
            return ("", 0) if host in WILDCARDS else (host, port)
        given_host, given_port = advertised_address(self.config.advertise)
        return given_host, given_port or port

    # Heartbeats.

    async def _enter_dht(self) -> None:
        """Publish into the DHT; raises DHTError or RecordError when nobody stored it."""
        assert self.node is not None
        record = await self._sign_next(ttl=self.config.ttl, advertise=True)
        # The next beat comes within the interval and its jitter (or sooner, after a check).
        again_within = self.config.heartbeat * (1 + self.config.jitter)
        self._in_flight = record
        report = await self._publish_out(record, again_within=again_within)
        self.dht_lease_until = min(record.expires_at, report.held_until)
        if self.mode is not Mode.DHT:
            logger.info("worker %s is on the DHT (seq %d)", self.worker_id, record.seq)
        self.record = record
        self.mode = Mode.DHT
        self.heartbeats += 1
        self._remember_dht()
        if not self._peers_on_disk and self.state.peers:
            # A first start's peers would reach the disk only with the next seq ceiling (half
            # an hour) or a clean stop: a crash before that would cost a restart an edge request.
            await self._reserve()
        self._dht_retry.reset()
        self._beat_in(jittered(self.config.heartbeat, self.config.jitter, self.rng))

    async def _publish_out(
        self, record: WorkerRecord, *, again_within: float | None = None
    ) -> PublishReport:
        """Publish `record`; PublishError when no other DHT node answered."""
        assert self.node is not None
        before = _replies(self.node)
        report = await self.node.publish(record, again_within=again_within)
        if _replies(self.node) == before and not report.only_deferred:
            # publish() counts our own storage as a holder: cut off from every peer it still
            # "succeeds", and the record would live nowhere but here.
            raise PublishError(f"no other DHT node answered the publish of seq {record.seq}")
        return report

    async def _loop(self) -> None:
        while True:
            wake = self._next_beat
            if self.mode is not Mode.DHT and not self.config.edge_only:
                wake = min(wake, self._next_dht_try)
            elif self.mode is Mode.DHT and self._checks_reach():
                wake = min(wake, self._next_reach)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, wake - _now()))
            self._wake.clear()
            try:
                if self.mode is Mode.DHT:
                    reach_due = self._checks_reach() and _now() >= self._next_reach
                    # The lease comes first; a check that changed the mode republishes now.
                    if _now() >= self._next_beat or (reach_due and await self._check_reach()):
                        await self._dht_beat()
                    continue
                due = not self.config.edge_only and _now() >= self._next_dht_try
                if due and await self._retry_dht():
                    continue
                if _now() >= self._next_beat:
                    await self._edge_beat()
            except Exception:  # the loop is the worker's lease: it must outlive any one bug
                logger.exception("worker heartbeat round failed")
                self._next_beat = _now() + self._dht_retry.next()

    async def _dht_beat(self) -> None:
        assert self.node is not None
        try:
            await self._enter_dht()
            return
        except (DHTError, RecordError) as exc:
            logger.warning("heartbeat over the DHT failed: %s", exc)
        if await self._join(allow_edge=False):
            with contextlib.suppress(DHTError, RecordError):
                await self._enter_dht()
                return
        left = self.dht_lease_until - self.clock()
        # The DHT gets most of the lease to recover (a stall, a lost burst of datagrams): an
        # edge request is spent only when half a heartbeat interval of the lease is left.
        margin = self.config.heartbeat / 2
        if left <= margin:
            # Retrying the DHT longer would let the lease lapse: use the edge meanwhile.
            await self._fall_back(f"the DHT has not taken a heartbeat, lease ends in {left:.1f}s")
            return
        delay = min(self._dht_retry.next(), max(left - margin, 0.0))
        logger.info("retrying the DHT in %.1fs (lease ends in %.1fs)", delay, left)
        self._next_beat = _now() + delay

    async def _fall_back(self, why: str) -> None:
        """Off the DHT: register through the edge now, and retry the DHT with backoff."""
        if self.edge is None:
            logger.warning("%s and no edge is configured; retrying the DHT", why)
        elif self.config.edge_only:
            logger.info("%s: registering through the edge", why)
        else:
            logger.warning("%s; registering through the edge", why)
        self.mode = Mode.OFFLINE
        self._next_beat = _now()
        self._next_dht_try = _now() + self._dht_retry.next()
        if self.edge is not None:
            await self._edge_beat()

    async def _retry_dht(self) -> bool:
        """One attempt to get back on the DHT; True when the record is there again."""
        if self.node is None:
            return False
        if await self._join(allow_edge=True):
            try:
                await self._publish_joined()
                logger.info("back on the DHT; heartbeats through the edge stop")
                return True
            except (DHTError, RecordError) as exc:
                logger.info("joined the DHT but could not publish: %s", exc)
        self._next_dht_try = _now() + self._dht_retry.next()
        return False

    async def _edge_beat(self) -> None:
        if self.edge is None:
            self._next_beat = _now() + self._edge_retry.next()
            return
        for _ in range(2):  # a second try only after the edge said our seq was stale
            record = await self._sign_next(ttl=self.config.fallback_ttl, advertise=False)
            self._in_flight = record
            try:
                outcome = await self.edge.register(record)
            except EdgeRefused as exc:
                logger.error("the edge refused our record: %s", exc)
                break
            except EdgeError as exc:
                logger.warning("registration through the edge failed: %s", exc)
                break
            if outcome is Registered.STALE:
                await self._recover_seq_from_edge()
                continue
            self.record = record
            self.mode = Mode.EDGE
            self.state.edge_lease_until = record.expires_at
            self._edge_retry.reset()
            self._beat_in(jittered(self.config.fallback_heartbeat, self.config.jitter, self.rng))
            return
        self._next_beat = _now() + self._edge_retry.next()

    async def _recover_seq_from_edge(self) -> None:
        """The edge holds a newer record of ours (the state file was lost): find its seq."""
        assert self.edge is not None
        seq = 0
        try:
            found = await self.edge.services(
                self.config.services[0], limit=SERVICES_LOOKUP_LIMIT, region=self.config.region
            )
            seq = max((r.seq for r in found if r.worker_id == self.worker_id), default=0)
        except EdgeError as exc:
            logger.info("could not look our record up at the edge: %s", exc)
        if seq > self.state.seq:
            self.state.seq = seq
        else:
            self.state.seq += STALE_SEQ_JUMP
        logger.warning("the edge holds a newer record of this worker; seq now %d", self.state.seq)

    # Leaving.

    async def _leave(self) -> None:
        # What we last sent counts, answered or not: a stop may have cut its publish short.
        sent = [r for r in (self.record, self._in_flight) if r is not None]
        if not sent:
            return
        now = self.clock()
        # The tombstone must outlive every live copy: the DHT lease and the edge's.
        lease = max(r.expires_at for r in sent)
        ttl = max(lease - now, self.state.edge_lease_until - now, self.config.ttl)
        tombstone = await self._sign_next(ttl=ttl, advertise=False, tombstone=True)
        jobs = []
        to_edge = self.edge is not None and (
            self.mode is not Mode.DHT or self.state.edge_lease_until > now
        )
        if self.node is not None and self.node.protocol is not None and len(self.node.rpc.router):
            jobs.append(self._leave_dht(tombstone, then_edge=self.edge is not None and not to_edge))
        elif self.edge is not None:
            to_edge = True  # no DHT contact left: the edge is the only way out
        if to_edge:
            jobs.append(self._leave_edge(tombstone))
        await asyncio.gather(*jobs)
        self.record = tombstone
        logger.info("worker %s left with tombstone seq %d", self.worker_id, tombstone.seq)

    async def _leave_dht(self, tombstone: WorkerRecord, *, then_edge: bool) -> None:
        """The tombstone into the DHT; to the edge (`then_edge`) when no other node took it:
        else our live record stays listed until its lease ends."""
        try:
            await self._publish_out(tombstone)
            return
        except (DHTError, RecordError) as exc:
            logger.warning("tombstone not stored in the DHT: %s", exc)
        if then_edge:
            logger.info("handing the tombstone to the edge instead")
            await self._leave_edge(tombstone)

    async def _leave_edge(self, tombstone: WorkerRecord) -> None:
        assert self.edge is not None
        backoff = Backoff(LEAVE_RETRY, self.rng)
        failure = ""
        for attempt in range(LEAVE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(backoff.next())
            try:
                await self.edge.leave(tombstone)
                self.state.edge_lease_until = 0.0
                return
            except EdgeUnavailable as exc:
                # Many workers stopping at once (a host shutting down) can overload the edge
                # for a moment; the whole leave stays bounded by leave_timeout.
                failure = str(exc)
            except EdgeError as exc:
                failure = str(exc)
                break
        logger.warning("tombstone not delivered to the edge: %s", failure)


def _replies(node: DHTNode) -> int:
    """Replies to our requests received so far (every datagram in that is not a request)."""
    stats = node.rpc.stats
    return stats.packets_in - stats.requests_in - stats.malformed


def _now() -> float:
    return asyncio.get_running_loop().time()


def _default_load(config: WorkerConfig) -> LoadSource:
    if config.load_url:
        return HttpLoad(config.load_url, capacity=config.capacity)
    return StaticLoad(config.load)
