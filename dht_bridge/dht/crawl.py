"""The iterative Kademlia lookup, done so that dead contacts do not set its pace.

The library's crawl sends alpha requests and waits for all of them, so one dead contact costs
a full timeout per round. Here up to alpha requests are in flight at any time; a new one goes
out as soon as any answers, and a request unanswered after `stall` seconds stops counting
against alpha (it may still answer), so the lookup moves on without waiting for it. A value
lookup that has found nothing yet is slower to conclude "absent": it waits up to `patience`
(at least `stall`) for a close contact that may still answer, since a missed value costs more
than a few milliseconds. A lookup for the nodes that are to hold a value likewise waits up to
`settle` for a slow contact that would be among them: a busy node answers late, and a value
stored past it is missed by readers, who ask the closest first.

One address cannot crowd a lookup: its shortlist (and the closest nodes it returns) holds at
most a few candidates per IP and per subnet (the routing table's `DiversityLimits`, per
bucket), so fakes minted next to the target at one address cannot hide the real holders. Nor
can it hold a lookup open: over the whole crawl an IP (a subnet) is asked at most as many
times as it may have contacts in a routing table, and a crawl asks at most
`MAX_QUERIES_FACTOR` times k contacts.
A node that has not yet proved our address answers with a cut list naming us (see
dht.protocol); it is asked once more, by which time it has our answer to its check. A value
too big for what we paid comes back cut to a share of its records (`partial`): a crawl with
`partial_ok` takes it as it is, others ask once more for all of it. FIND_VALUE requests to
candidates within `near` of the key (see `NEAR_FACTOR`) pay for that cut.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kademlia.node import Node

from dht_bridge.dht.address import contact_address
from dht_bridge.dht.admission import Groups, within_limits
from dht_bridge.dht.protocol import RMAProtocol, is_partial

logger = logging.getLogger(__name__)

# How many times our own loop's lateness a silence is allowed on top of the stall: once for
# the timer that woke us late, once for the replies queued behind it (asyncio reads a socket
# one datagram per pass, so a late timer can overtake replies that came before it was due).
LAG_FACTOR = 2.0
# A candidate this many times our k-th closest contact's distance from us, or nearer, to the
# key is likely to hold its value (the distances of the k closest to a point vary about
# twofold from point to point): its FIND_VALUE is padded to pay for a cut value at once.
NEAR_FACTOR = 4
# A crawl asks at most this many times k contacts in all. An honest lookup asks a few dozen; a
# host answering every request with a fresh id of its own a little nearer the key kept one
# running for as long as it liked (and a node's refresh crawls, one after another, with it).
MAX_QUERIES_FACTOR = 8


class _State(Enum):
    WAITING = 0
    ASKED = 1
    ANSWERED = 2
    FAILED = 3


@dataclass
class CrawlResult:
    """What a lookup found: the closest responsive nodes, and any values with their holders."""

    closest: list[Node] = field(default_factory=list)
    values: list[tuple[Node, bytes]] = field(default_factory=list)
    queried: int = 0
    failed: int = 0
    hops: int = 0
    seconds: float = 0.0
    # Values that `accept` refused (empty, forged, a mark nothing backs): the crawl went on.
    refused: int = 0
    # How late our own busy loop woke the crawl at worst (seconds; see `Crawl._note_lag`).
    lag: float = 0.0


@dataclass
class _Candidate:
    node: Node
    hop: int
    groups: Groups
    state: _State = _State.WAITING
    asked_at: float = 0.0
    # Asked again once already, after a cut answer.
    retried: bool = False


class Crawl:
    """One lookup of `target`: FIND_NODE, or FIND_VALUE stopping once `want_values` answered."""

    def __init__(
        self,
        protocol: RMAProtocol,
        target: bytes,
        seeds: list[Node],
        *,
        ksize: int,
        alpha: int,
        find_value: bool = False,
        want_values: int = 1,
        stall: float = 0.1,
        patience: float = 0.0,
        settle: float = 0.0,
        accept: Callable[[bytes], bool] | None = None,
        claimed: dict[bytes, int] | None = None,
        path: int = 0,
        partial_ok: bool = False,
        near: int = 0,
    ) -> None:
        self.protocol = protocol
        self.partial_ok = partial_ok
        # Candidates this near the target (XOR distance) get value requests padded for a cut.
        self.near = near
        # Disjoint paths (S/Kademlia): crawls sharing `claimed` never ask the same node (node id
        # -> the `path` that asked it). A node is claimed when asked, not when learnt: the
        # first answer near the key names every holder, and claiming on learning gave them all
        # to the faster path, leaving the other to crawl to exhaustion for a value.
        self.claimed = claimed
        self.path = path
        # The other paths of the same read (set by whoever builds them).
        self.siblings: list[Crawl] = []
        # A value `accept` refuses does not count towards `want_values`: the crawl asks on,
        # so a holder that lies (an empty set, a bare mark) cannot end a read alone.
        self.accept = accept
        self.target = Node(target)
        self.ksize = ksize
        self.alpha = alpha
        self.find_value = find_value
        self.want_values = want_values
        self.stall = stall
        self.patience = max(stall, patience)
        self.settle = settle
        self._me = protocol.source_node.id
        self._candidates: dict[bytes, _Candidate] = {}
        self._pending: dict[asyncio.Task[Any], _Candidate] = {}
        # Contacts asked per IP group and per subnet group, over the whole crawl.
        self._asked_ip: Counter[str] = Counter()
        self._asked_subnet: Counter[str] = Counter()
        self._max_queries = MAX_QUERIES_FACTOR * ksize
        self.result = CrawlResult()
        for seed in seeds:
            self._learn(seed, hop=1)

    def _learn(self, node: Node, hop: int) -> None:
        if node.id != self._me and node.id not in self._candidates:
            groups = self.protocol.router.groups(node)
            self._candidates[node.id] = _Candidate(node, hop, groups)

    def _shortlist(self, now: float | None = None) -> list[_Candidate]:
        """The k closest candidates that have not failed (nor stalled, when `now` is given),
        at most a few per IP and subnet."""
        alive = [
            c
            for c in self._candidates.values()
            if c.state is not _State.FAILED
            and (now is None or not self._stalled(c, now))
            and not self._others(c)
            and (c.state is not _State.WAITING or self._askable(c))
        ]
        alive.sort(key=lambda c: c.node.long_id ^ self.target.long_id)
        return self._diverse(alive)

    def _diverse(self, ordered: list[_Candidate]) -> list[_Candidate]:
        """The first k of `ordered` within the per-bucket diversity limits."""
        router = self.protocol.router
        pinned = router.pinned
        return within_limits(
            ordered,
            router.limits,
            self.ksize,
            groups=_GROUPS,
            exempt=(lambda c: (c.node.ip, c.node.port) in pinned) if pinned else None,
        )

    def _askable(self, candidate: _Candidate) -> bool:
        """May this candidate still be asked: its IP and subnet under their share of the
        crawl, and the crawl under its query cap? (Retries of a cut answer are never refused.)"""
        if candidate.retried:
            return True
        if self.result.queried >= self._max_queries:
            return False
        limits = self.protocol.router.limits
        if not limits.enabled or (candidate.node.ip, candidate.node.port) in (
            self.protocol.router.pinned
        ):
            return True
        ip, subnet = candidate.groups
        return (
            self._asked_ip[ip] < limits.per_ip_table
            and self._asked_subnet[subnet] < limits.per_subnet_table
        )

    def _others(self, candidate: _Candidate) -> bool:
        """Has another path asked this node (so it is not ours to ask or count)?"""
        claimed = self.claimed
        return claimed is not None and claimed.get(candidate.node.id, self.path) != self.path

    def _active(self, now: float) -> int:
        return sum(1 for c in self._pending.values() if not self._stalled(c, now))

    async def run(self) -> CrawlResult:
        """Crawl until the k closest live nodes have answered (or enough values are in)."""
        started = time.monotonic()
        try:
            while not self._done():
                now = time.monotonic()
                for candidate in self._shortlist(now):
                    if self._active(now) >= self.alpha:
                        break
                    if candidate.state is _State.WAITING:
                        self._ask(candidate, now)
                if not self._pending:
                    break
                waited = time.monotonic()
                done, _ = await asyncio.wait(
                    self._pending, timeout=self.stall, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    self._note_lag(time.monotonic() - waited)
                for task in done:
                    self._handle(self._pending.pop(task), task.result())
        finally:
            # Unanswered requests run on to their timeout under the protocol, so that a dead
            # contact is still counted as a miss (and dropped after several) once we are done.
            for task in self._pending:
                self.protocol.adopt(task)
        # The k closest that answered: a silent contact among the k closest overall must not
        # cost the result a place (a narrow lookup would come back one holder short).
        answered = [c for c in self._candidates.values() if c.state is _State.ANSWERED]
        answered.sort(key=lambda c: c.node.long_id ^ self.target.long_id)
        closest = self._diverse(answered)
        self.result.closest = [c.node for c in closest]
        self.result.seconds = time.monotonic() - started
        if not self.result.hops:
            self.result.hops = max((c.hop for c in closest), default=0)
        return self.result

    def _note_lag(self, waited: float) -> None:
        """A wait of `stall` for replies that took longer measured our own loop (a GC, a CPU
        bound task beside us, many nodes in one process): replies that came meanwhile may
        still sit unread in the socket, which asyncio reads one datagram per pass. Each
        silence the crawl judges from then on is allowed `LAG_FACTOR` times that lateness
        more, or a busy reader takes slow holders for absent ones and concludes that a key
        has no value. A loop on time (or the virtual clock) adds nothing."""
        self.result.lag = max(self.result.lag, waited - self.stall)

    def _allowed(self, silence: float) -> float:
        return silence + LAG_FACTOR * self.result.lag

    def _done(self) -> bool:
        if self.find_value and self._enough_values():
            return True
        # A contact silent for `stall` seconds no longer holds the lookup open: on loopback or
        # a LAN that is a dead node, and waiting for its timeout is what made the library slow.
        now = time.monotonic()
        settled = self._shortlist(now)
        if not (settled and all(c.state is _State.ANSWERED for c in settled)):
            return False
        wait = self.patience if self.find_value and not self.result.values else self.settle
        return not any(
            c.state is _State.ASKED and now - c.asked_at < self._allowed(wait)
            for c in self._shortlist()
        )

    def _enough_values(self) -> bool:
        """`want_values` of our own; or one, once every other path has all it wanted: the
        holders are shared out between the paths, and the one left with fewer would otherwise
        crawl on to exhaustion for a value the read as a whole already has."""
        have = len(self.result.values)
        if have >= self.want_values:
            return True
        return bool(have and self.siblings) and all(
            len(other.result.values) >= other.want_values for other in self.siblings
        )

    def _stalled(self, candidate: _Candidate, now: float) -> bool:
        return candidate.state is _State.ASKED and now - candidate.asked_at >= self._allowed(
            self.stall
        )

    def _ask(self, candidate: _Candidate, now: float) -> None:
        if self.claimed is not None:
            self.claimed[candidate.node.id] = self.path
        if not candidate.retried:
            ip, subnet = candidate.groups
            self._asked_ip[ip] += 1
            self._asked_subnet[subnet] += 1
        candidate.state = _State.ASKED
        candidate.asked_at = now
        self.result.queried += 1
        if self.find_value:
            near = candidate.node.long_id ^ self.target.long_id <= self.near
            call = self.protocol.call_find_value(candidate.node, self.target, near=near)
        else:
            call = self.protocol.call_find_node(candidate.node, self.target)
        task = asyncio.get_running_loop().create_task(call)
        self._pending[task] = candidate

    def _handle(self, candidate: _Candidate, reply: tuple[bool, Any]) -> None:
        ok, payload = reply
        if not ok:
            candidate.state = _State.FAILED
            self.result.failed += 1
            return
        if not candidate.retried and (
            _names(payload, self._me) or (is_partial(payload) and not self.partial_ok)
        ):
            # A cut answer for a caller it has not proved yet: ask again. Its check of our
            # address left before the answer, and we answered the check on arrival. (A cut
            # value names nobody: parse_contacts finds none in it.)
            candidate.retried = True
            candidate.state = _State.WAITING
            for node in parse_contacts(payload):
                self._learn(node, candidate.hop + 1)
            return
        candidate.state = _State.ANSWERED
        if isinstance(payload, dict):
            value = payload.get("value")
            if isinstance(value, bytes) and self.accept is not None and not self.accept(value):
                self.result.refused += 1
            elif isinstance(value, bytes):
                self.result.values.append((candidate.node, value))
                self.result.hops = max(self.result.hops, candidate.hop)
            return
        for node in parse_contacts(payload):
            self._learn(node, candidate.hop + 1)


_GROUPS = operator.attrgetter("groups")


def _names(payload: Any, node_id: bytes) -> bool:
    """Does a contact list name `node_id` (the asker: the mark of a cut answer)?"""
    return isinstance(payload, list) and any(
        isinstance(item, list | tuple) and len(item) == 3 and item[0] == node_id
        for item in payload[:64]
    )


def parse_contacts(payload: Any) -> list[Node]:
    """Contacts from a FIND_NODE reply; entries not shaped (20-byte id, IP literal, port) are
    skipped, so a hostile answer cannot hand us an address (see dht.address)."""
    nodes: list[Node] = []
    if not isinstance(payload, list):
        return nodes
    for item in payload[:64]:
        if not (
            isinstance(item, list | tuple)
            and len(item) == 3
            and isinstance(item[0], bytes)
            and len(item[0]) == 20
        ):
            continue
        address = contact_address(item[1], item[2])
        if address is not None:
            nodes.append(Node(item[0], *address))
    return nodes
