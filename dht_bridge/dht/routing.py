"""Our routing table: a correct k-closest search, patience with contacts that miss a reply,
and at most a few contacts per network (see dht.admission)."""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from kademlia.node import Node
from kademlia.routing import KBucket, RoutingTable

from dht_bridge.dht.admission import DEFAULT_DIVERSITY, DiversityLimits, Groups

logger = logging.getLogger(__name__)

# Addresses whose groups are memoised at most (the memo is dropped when it is full).
MAX_MEMO = 4096


class RMARoutingTable(RoutingTable):  # type: ignore[misc]
    """kademlia's table, with the defects that matter at 2000 nodes fixed.

    - `find_neighbors` returns the true k closest contacts; the library's traversal stops
      early and returns a wrong set for most keys.
    - a contact is dropped only after `max_failures` consecutive missed replies, so one lost
      packet does not shrink the table.
    - replacement-list contacts count as known, which ends the library's STORE storm.
    - a bucket (replacement list included) and the whole table hold at most a few contacts
      per IP and per subnet (`limits`); a newcomer over a limit is refused, never an old
      contact evicted for it. Contacts at a `pinned` address (coordinators) are exempt.
    - a contact keeps its address: the same id claimed from elsewhere is refused while the
      contact is held (it is dropped after missed replies if it really moved).
    """

    def __init__(
        self,
        protocol: Any,
        ksize: int,
        node: Node,
        *,
        max_failures: int,
        limits: DiversityLimits = DEFAULT_DIVERSITY,
        pinned: Iterable[tuple[str, int]] = (),
    ) -> None:
        self.limits = limits
        self.pinned = frozenset(pinned)
        self._groups: dict[tuple[str, int], Groups] = {}
        # Per-group counts over the whole table, recounted after the table changed.
        self._mutations = 0
        self._counted = -1
        self._ip_counts: Counter[str] = Counter()
        self._subnet_counts: Counter[str] = Counter()
        # Newcomers turned away by the diversity limits or for claiming a held id.
        self.refused = 0
        super().__init__(protocol, ksize, node)
        self.max_failures = max_failures
        self._failures: dict[bytes, int] = {}
        self._pinging: set[bytes] = set()
        # Bumped whenever the buckets' contacts change (not their order, not the replacement
        # lists): answers derived from the table stay valid while it stands still.
        self.version = 0

    def contacts(self) -> list[Node]:
        """Every contact in the buckets (not the replacement lists)."""
        return [node for bucket in self.buckets for node in bucket.nodes.values()]

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self.buckets)

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Node]:
        """The k contacts closest to `node` by XOR distance, never `node` itself.

        Visits buckets nearest first and stops at the first bucket none of whose possible ids
        could beat the k-th contact found: a few buckets of a table holding hundreds of
        contacts. Every answered FIND_NODE and every stored key checked for a newcomer asks
        this, so a scan of the whole table was most of a busy node's CPU.
        """
        # A bucket searched in counts as used, so maintenance does not refresh it (as the
        # library's traverser did; without this every bucket was crawled every interval).
        self.buckets[self.get_bucket_for(node)].touch_last_updated()
        return self._nearest(node, k or self.ksize, exclude)

    def _nearest(self, node: Node, k: int, exclude: Node | None = None) -> list[Node]:
        target = node.long_id
        order = sorted((_floor(bucket.range, target), i) for i, bucket in enumerate(self.buckets))
        best: list[tuple[int, bytes, Node]] = []  # a max-heap on distance: (-distance, id, node)
        for floor, index in order:
            if len(best) >= k and floor > -best[0][0]:
                break
            for contact in self.buckets[index].nodes.values():
                if contact.id == node.id or (exclude is not None and contact.same_home_as(exclude)):
                    continue
                entry = (-(contact.long_id ^ target), contact.id, contact)
                if len(best) < k:
                    heapq.heappush(best, entry)
                elif entry > best[0]:
                    heapq.heapreplace(best, entry)
        return [contact for _, _, contact in sorted(best, reverse=True)]

    def neighbourhood(self) -> int:
        """The XOR distance from us to our k-th closest contact: about how far any key's k
        closest nodes (its holders) lie from it, as the table sees the network's density.
        The widest distance when we hold fewer than k contacts (a small network)."""
        # Not a search: our own bucket is not marked used, so its refresh still runs.
        closest = self._nearest(self.node, self.ksize)
        if len(closest) < self.ksize:
            return (1 << 160) - 1
        return int(closest[-1].long_id ^ self.node.long_id)

    def knows(self, node: Node) -> bool:
        """Is this contact in a bucket or waiting in a replacement list?"""
        bucket = self.buckets[self.get_bucket_for(node)]
        return node.id in bucket.nodes or node.id in bucket.replacement_nodes

    def flush(self) -> None:
        """Empty the table (the library's), noting that it changed."""
        self._mutations += 1
        super().flush()

    def groups(self, node: Node) -> Groups:
        """The (IP, subnet) groups a contact counts against, memoised per address."""
        return self.groups_at(node.ip, node.port)

    def groups_at(self, ip: str, port: int) -> Groups:
        """`groups` of an address: a request's sender, before it is anyone's contact."""
        home = (ip, port)
        groups = self._groups.get(home)
        if groups is None:
            if len(self._groups) >= MAX_MEMO:
                self._groups.clear()
            groups = self._groups[home] = self.limits.groups(ip, port)
        return groups

    def admissible(self, node: Node) -> bool:
        """May `node` be added? A held contact may at its own address only; a newcomer if
        its IP and subnet are under their limits in its bucket and in the table."""
        held = self.held(node)
        if held is not None:
            return bool((held.ip, held.port) == (node.ip, node.port))
        bucket = self.buckets[self.get_bucket_for(node)]
        if not self.limits.enabled or (node.ip, node.port) in self.pinned:
            return True
        ip, subnet = self.groups(node)
        limits = self.limits
        ip_table, subnet_table = self._table_counts()
        if ip_table[ip] >= limits.per_ip_table or subnet_table[subnet] >= limits.per_subnet_table:
            return False
        same_ip = same_subnet = 0
        for contact in self._counted_in(bucket):
            other_ip, other_subnet = self.groups(contact)
            same_ip += other_ip == ip
            same_subnet += other_subnet == subnet
        return same_ip < limits.per_ip_bucket and same_subnet < limits.per_subnet_bucket

    def _counted_in(self, bucket: KBucket) -> Iterator[Node]:
        for contact in (*bucket.nodes.values(), *bucket.replacement_nodes.values()):
            if (contact.ip, contact.port) not in self.pinned:
                yield contact

    def _table_counts(self) -> tuple[Counter[str], Counter[str]]:
        if self._counted != self._mutations:
            self._ip_counts.clear()
            self._subnet_counts.clear()
            for bucket in self.buckets:
                for contact in self._counted_in(bucket):
                    ip, subnet = self.groups(contact)
                    self._ip_counts[ip] += 1
                    self._subnet_counts[subnet] += 1
            self._counted = self._mutations
        return self._ip_counts, self._subnet_counts

    def add_contact(self, node: Node) -> None:
        """Add or refresh a contact (within the diversity limits); a full bucket pings its
        oldest contact, once at a time, and keeps it if it answers."""
        if not self.admissible(node):
            self.refused += 1
            return
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        known = node.id in bucket.nodes
        if not known and node.id not in bucket.replacement_nodes:
            self._mutations += 1  # a refresh moves a contact; only a newcomer changes counts
        if bucket.add_node(node):
            if not known:
                self.version += 1
            return
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
            return
        head = bucket.head()
        if head.id not in self._pinging:
            self._pinging.add(head.id)
            self.protocol.spawn(self._ping_head(head), name="ping-head")

    def split_bucket(self, index: int) -> None:
        """Split a bucket in two (the library's), noting that the table changed."""
        self.version += 1
        self._mutations += 1
        super().split_bucket(index)

    def remove_contact(self, node: Node) -> None:
        """Remove a contact (a replacement may take its place), noting that the table changed."""
        self.version += 1
        self._mutations += 1
        self._failures.pop(node.id, None)
        super().remove_contact(node)

    async def _ping_head(self, head: Node) -> None:
        try:
            await self.protocol.call_ping(head)
        finally:
            self._pinging.discard(head.id)

    def misses(self, node_id: bytes) -> int:
        """Consecutive replies this contact has missed (0 once it answers or is dropped)."""
        return self._failures.get(node_id, 0)

    def record_success(self, node: Node) -> None:
        """A reply arrived: forget past misses."""
        self._failures.pop(node.id, None)

    def held(self, node: Node) -> Node | None:
        """The contact held under `node`'s id (in its bucket or replacement list), if any."""
        bucket = self.buckets[self.get_bucket_for(node)]
        held: Node | None = bucket.nodes.get(node.id) or bucket.replacement_nodes.get(node.id)
        return held

    def record_failure(self, node: Node) -> bool:
        """A reply was missed; returns True when the contact was dropped for it. Only a held
        contact's misses count: one at another address than the one held (a forged contact
        in someone's answer) is not the held contact's."""
        held = self.held(node)
        if held is None or (held.ip, held.port) != (node.ip, node.port):
            # Not ours to count: ids named in answers that never answer would each leave an
            # entry here for good.
            return False
        misses = self._failures.get(node.id, 0) + 1
        if misses < self.max_failures:
            self._failures[node.id] = misses
            return False
        self._failures.pop(node.id, None)
        self.remove_contact(node)
        logger.debug("dropped contact %s after %d missed replies", node, misses)
        return True


def _floor(id_range: tuple[int, int], target: int) -> int:
    """The least XOR distance from `target` to any id in `id_range` (inclusive): ids between
    two bounds share the bounds' common prefix, and the bits below it can all cancel out."""
    low, high = id_range
    free = (low ^ high).bit_length()
    return ((low ^ target) >> free) << free
