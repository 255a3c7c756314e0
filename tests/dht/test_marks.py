"""Overflow marks and the depth they carry: the codec, how holders keep and drop a depth, and
readers with no history reaching every level of a deep service in two rounds of reads."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time

import msgpack
import pytest
from kademlia.node import Node

from dht_bridge.dht import lookup as reading
from dht_bridge.dht import publish as publishing
from dht_bridge.dht import shards
from dht_bridge.dht.admission import Groups
from dht_bridge.dht.storage import OVERFLOW_MEMORY, UNPROVEN, RecordStorage, StoreResult
from dht_bridge.dht.values import (
    RecordVerifier,
    backs_mark,
    cut_value,
    decode_value,
    encode_value,
    key_digest,
)
from dht_bridge.identity import Identity
from tests.support.dht import (
    ManualClock,
    NetworkFactory,
    publish_all,
    start_network,
    start_node,
    stop_all,
)
from tests.support.helpers import POLICY, make_record
from tests.support.raw_peer import open_raw_peer

ROOT = shards.service_key("ocr", 0)
DIGEST = key_digest(ROOT)


def held_depth(storage: RecordStorage, now: float, key: str = ROOT) -> tuple[bool, int]:
    """(overflowed, deepest) of the value a holder serves for `key` (the root shard)."""
    value = storage.value(key_digest(key))
    if value is None:
        return False, 0
    decoded = decode_value(value, digest=key_digest(key), verifier=RecordVerifier(POLICY), now=now)
    return decoded.overflowed(now), decoded.deepest


def test_a_mark_carries_its_depth_and_an_old_style_mark_still_decodes() -> None:
    verifier = RecordVerifier(POLICY)
    marked = decode_value(
        encode_value(ROOT, [], 2000.0, 3), digest=DIGEST, verifier=verifier, now=1000.0
    )
    assert (marked.overflowed(1000.0), marked.deepest) == (True, 3)
    plain = decode_value(
        encode_value(ROOT, [], 2000.0), digest=DIGEST, verifier=verifier, now=1000.0
    )
    assert (plain.overflowed(1000.0), plain.deepest) == (True, 0)
    assert len(msgpack.unpackb(encode_value(ROOT, [], 0.0, 3))) == 3  # no mark: no depth either


def test_a_value_cut_to_fit_keeps_a_random_share_of_its_live_records_and_its_mark() -> None:
    verifier = RecordVerifier(POLICY)
    now = time.time()
    live = [make_record(services=["ocr"], now=now) for _ in range(30)]
    lapsed = [make_record(services=["ocr"], now=now - 200, ttl=90) for _ in range(5)]
    held = [*live, *lapsed]
    room = 3600
    cuts = [cut_value(ROOT, held, room, now, now + 60, 2) for _ in range(20)]
    seen: set[str] = set()
    for cut in cuts:
        assert cut is not None
        assert len(cut) <= room
        decoded = decode_value(cut, digest=DIGEST, verifier=verifier, now=now)
        assert decoded.refused == 0  # no lapsed record, nothing mangled
        assert (decoded.overflowed(now), decoded.deepest) == (True, 2)
        assert backs_mark(decoded, verifier, now)
        assert 0 < len(decoded.records) < len(live)
        seen.update(r.worker_id for r in decoded.records)
    # Each cut a different share: together they show more of the shard than any one.
    assert len(seen) > max(len(msgpack.unpackb(cut)[2]) for cut in cuts if cut)
    # Too little room to back the mark: no cut (the reader is asked to come back instead).
    assert cut_value(ROOT, held, 2000, now, now + 60, 2) is None
    # Unmarked, any share will do; no record fits (or none is live), no cut.
    assert cut_value(ROOT, live, 2000, now) is not None
    assert cut_value(ROOT, live, 100, now) is None
    assert cut_value(ROOT, lapsed, 2000, now) is None


@pytest.mark.parametrize("depth", [True, -1, shards.MAX_LEVEL + 1, "3", 2.5])
def test_a_malformed_depth_is_refused(depth: object) -> None:
    value = msgpack.packb(["rma1", ROOT, [], 2000.0, depth])
    with pytest.raises(ValueError, match="depth"):
        decode_value(value, digest=DIGEST, verifier=RecordVerifier(POLICY), now=1000.0)


def test_a_holder_keeps_the_deepest_report_until_it_lapses() -> None:
    clock = ManualClock()
    storage = RecordStorage(POLICY, clock=clock)

    def mark(deepest: int) -> StoreResult:
        return storage.merge(DIGEST, encode_value(ROOT, [], clock() + OVERFLOW_MEMORY, deepest))

    mark(2)
    assert held_depth(storage, clock()) == (True, 2)
    mark(3)
    assert held_depth(storage, clock()) == (True, 3)
    clock.advance(OVERFLOW_MEMORY / 2)
    mark(1)  # a shallower report does not hide publishers filed deeper
    assert held_depth(storage, clock()) == (True, 3)
    clock.advance(OVERFLOW_MEMORY / 2 + 1)
    # The level-3 hint was last renewed a memory ago: it lapses, the overflow mark stays.
    assert held_depth(storage, clock()) == (True, 0)
    mark(1)
    assert held_depth(storage, clock()) == (True, 1)
    clock.advance(OVERFLOW_MEMORY + 1)
    assert held_depth(storage, clock()) == (False, 0)
    assert len(storage) == 0


def test_a_peer_cannot_pin_a_depth_beyond_the_memory() -> None:
    clock = ManualClock()
    storage = RecordStorage(POLICY, clock=clock)
    storage.merge(DIGEST, encode_value(ROOT, [], clock() + 100 * OVERFLOW_MEMORY, shards.MAX_LEVEL))
    clock.advance(OVERFLOW_MEMORY + 1)
    assert held_depth(storage, clock()) == (False, 0)


def test_a_full_shard_keeps_its_depth_while_it_turns_newcomers_away() -> None:
    clock = ManualClock()
    storage = RecordStorage(POLICY, clock=clock)
    storage.merge(DIGEST, encode_value(ROOT, [], clock() + OVERFLOW_MEMORY, 2))
    results = [
        storage.merge(DIGEST, encode_value(ROOT, [make_record(now=clock(), ttl=3000)]))
        for _ in range(60)
    ]
    assert StoreResult.FULL in results
    assert held_depth(storage, clock()) == (True, 2)


async def test_a_cold_reader_reads_a_deep_service_at_once_and_rises_renew_the_depth(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = ManualClock()
    nodes = await start_network(24, clock=clock)
    readers = []
    try:
        identities = [Identity.generate() for _ in range(200)]
        first = [
            make_record(i, now=clock(), ttl=3000, load=(n % 50) / 50)
            for n, i in enumerate(identities)
        ]
        reports = await publish_all(nodes, first)
        assert all(report.stored for report in reports)
        assert max(report.levels["ocr"] for report in reports) >= 2

        async def cold_read(hint: int | None = None) -> reading.LookupReport:
            reader = await start_node(clock=clock, seeds=[nodes[0].address])
            readers.append(reader)
            if hint is not None:
                reader.reader.depth_hints["ocr"] = hint
            return await reader.lookup_report("ocr", limit=10)

        depth = max(report.levels["ocr"] for report in reports)
        top = await cold_read()
        # A reader with no history reads MAX_PREFETCH levels at once: one round when the trie
        # is no deeper; else the root's holders said how deep publishers filed, and every
        # level below is read in a second round.
        assert (top.rounds, len(top.providers)) == (1 if depth < reading.MAX_PREFETCH else 2, 10)
        assert top.shards_read >= 3

        # Ten minutes on, every mark has lapsed. Workers placed below the root heartbeat and
        # try one level up (every publish here, not every 8th); those turned away renew the
        # marks, and the deep ones the root's depth (always here, by chance in production).
        clock.advance(OVERFLOW_MEMORY + 1)
        monkeypatch.setattr(publishing, "RISE_EVERY", 1)
        monkeypatch.setattr(random, "random", lambda: 0.0)
        second = [
            make_record(i, now=clock(), seq=2, ttl=3000, load=(n % 50) / 50)
            for n, i in enumerate(identities)
        ]
        again = await publish_all(nodes, second)
        assert all(report.stored for report in again)
        # A reader whose last lookup ended at the root reads it first: the renewed depth
        # sends it down every level at once in the second round. The root still holds seq 1
        # copies of workers that filed seq 2 deeper: a lookup that gave up its deeper reads
        # once it held 10 (the grace, tested on its own below) could return those, and on a
        # loaded machine did. A worker whose seq 2 lies off the reader's random path is
        # returned at seq 1, as it should be; none whose seq 2 lies on it.
        monkeypatch.setattr(reading, "ENOUGH_GRACE", 60.0)
        leaves: list[int] = []
        getrandbits = random.getrandbits

        def noted(bits: int) -> int:
            leaves.append(getrandbits(bits))
            return leaves[-1]

        monkeypatch.setattr(random, "getrandbits", noted)
        renewed = await cold_read(hint=0)
        monkeypatch.setattr(random, "getrandbits", getrandbits)
        assert (renewed.rounds, len(renewed.providers)) == (2, 10)
        assert renewed.shards_read >= 3
        path = [
            key_digest(
                shards.service_key("ocr", shards.shard_id(level, leaves[-1] & ((1 << level) - 1)))
            )
            for level in range(shards.MAX_LEVEL + 1)
        ]
        on_path = {
            r.worker_id
            for n in nodes
            for digest in path
            for r in n.storage.records(digest)
            if r.seq == 2
        }
        assert on_path
        assert not [r for r in renewed.providers if r.seq == 1 and r.worker_id in on_path]

        # A reader whose hint is far too deep reads every level at once, but waits only for
        # those down to where its path ends: the reads of keys nobody holds are cancelled.
        stale = await start_node(clock=clock, seeds=[nodes[0].address])
        readers.append(stale)
        stale.reader.depth_hints["ocr"] = shards.MAX_LEVEL
        deep = await stale.lookup_report("ocr", limit=10)
        assert (deep.rounds, len(deep.providers)) == (1, 10)
        assert deep.shards_read <= max(report.levels["ocr"] for report in again) + 1
        assert not [t for t in asyncio.all_tasks() if "_read_key" in repr(t.get_coro())]
        assert stale.reader.depth_hints["ocr"] == deep.shards_read - 1

        # A reader new to `ocr` guesses its depth: where it files ocr itself, else how deep
        # its lookups of other services went. A guess deep enough reads it in one round.
        depth = max(report.levels["ocr"] for report in again)
        filer = await start_node(clock=clock, seeds=[nodes[0].address])
        readers.append(filer)
        filer.publisher.levels[("ocr", identities[0].worker_id)] = depth
        guessed = await filer.lookup_report("ocr", limit=10)
        assert (guessed.rounds, len(guessed.providers)) == (1, 10)
        other = await start_node(clock=clock, seeds=[nodes[0].address])
        readers.append(other)
        other.reader.depth_hints["gpu"] = depth
        borrowed = await other.lookup_report("ocr", limit=10)
        # Borrowed from other services, a guess reads at most MAX_PREFETCH levels at once.
        assert borrowed.rounds == (1 if depth < reading.MAX_PREFETCH else 2)
        assert len(borrowed.providers) == 10
    finally:
        await stop_all([*nodes, *readers])


@pytest.mark.parametrize("region_len", range(33))
def test_a_shard_filled_to_the_brim_still_takes_its_overflow_mark(region_len: int) -> None:
    # Records of one size fill a shard to within a few bytes of the datagram limit for some
    # sizes; the mark (a float and a level) must still fit, or readers never look below.
    clock = ManualClock()
    storage = RecordStorage(POLICY, clock=clock)
    region = "r" * region_len
    result = StoreResult.OK
    while result is not StoreResult.FULL:
        record = make_record(now=clock(), ttl=3000, region=region)
        result = storage.merge(DIGEST, encode_value(ROOT, [record]))
        assert result is not StoreResult.INVALID
    assert held_depth(storage, clock()) == (True, 0)
    storage.merge(DIGEST, encode_value(ROOT, [], clock() + OVERFLOW_MEMORY, shards.MAX_LEVEL))
    assert held_depth(storage, clock()) == (True, shards.MAX_LEVEL)


async def test_a_rise_refused_by_a_full_parent_sends_the_record_to_one_holder_only(
    monkeypatch: pytest.MonkeyPatch, network_factory: NetworkFactory
) -> None:
    # A parent's holders hold the same set, so one "full" answer says the rest would refuse
    # too: the record goes to them only when the first had room. The marks still go to all.
    nodes = await network_factory(16)
    # One publisher, so that every record goes to the same holders: all fill up alike, and
    # a newcomer files below.
    newcomer, publisher = Identity.generate(), nodes[0]
    for _ in range(60):
        await publisher.publish(make_record())
    first = await publisher.publish(make_record(newcomer))
    assert first.levels["ocr"] == 1
    sent: list[tuple[bytes, bytes]] = []
    store = publisher.rpc.call_store

    async def counted(node: Node, key: bytes, value: bytes) -> tuple[bool, object]:
        sent.append((node.id, value))
        return await store(node, key, value)

    monkeypatch.setattr(publisher.rpc, "call_store", counted)
    monkeypatch.setattr(publishing, "RISE_EVERY", 1)
    again = await publisher.publish(make_record(newcomer, seq=2))
    assert again.levels["ocr"] == 1
    upper = again.keys[1]
    assert (upper.key, upper.asked, upper.full) == (ROOT, 1, 1)
    now = publisher.clock()
    decoded = [
        decode_value(v, digest=DIGEST, verifier=RecordVerifier(POLICY), now=now)
        for _, v in sent
        if _is_root(v)
    ]
    assert sum(1 for d in decoded if d.records) == 1
    marks = [d for d in decoded if not d.records]
    holders, _ = await publisher.publisher._holders(DIGEST)
    assert len(marks) == len(holders)


def _is_root(value: bytes) -> bool:
    return bool(msgpack.unpackb(value)[1] == ROOT)


@pytest.mark.parametrize(("root_holds", "forged"), [(12, 0), (4, 0), (12, 8)])
async def test_a_lookup_holding_enough_providers_gives_up_a_slow_deeper_read(
    root_holds: int, forged: int
) -> None:
    # The root is full and marked; the shard below on the reader's path never answers (a key
    # nobody holds keeps its crawl going). With the providers asked for in hand, the lookup
    # answers from the root after its grace; short of them (forged copies do not count), it
    # waits for the deeper read.
    reader = await start_node()
    below = asyncio.Event()
    deeper: list[str] = []
    root = [make_record(load=n / 100) for n in range(root_holds)]
    root[:forged] = [dataclasses.replace(r, load=0.99) for r in root[:forged]]
    genuine = root_holds - forged
    late = [make_record(load=0.5) for _ in range(3)]

    async def read_key(
        key: str, *, lazy: bool = False, want: int = 2, partial_ok: bool = False
    ) -> reading.KeyRead:
        if key == ROOT:
            return reading.KeyRead(list(root), overflowed=True, deepest=1)
        deeper.append(key)
        await below.wait()
        return reading.KeyRead(list(late))

    reader.reader._read_key = read_key  # type: ignore[method-assign]
    try:
        lookup = asyncio.create_task(reader.lookup_report("ocr", limit=10))
        if genuine >= 10:
            report = await asyncio.wait_for(lookup, timeout=10)
            assert [r.worker_id for r in report.providers] == [r.worker_id for r in root[:10]]
            assert deeper
            assert not below.is_set()
            assert not [t for t in asyncio.all_tasks() if "read_key" in repr(t.get_coro())]
        else:
            done, _ = await asyncio.wait([lookup], timeout=1.0)
            assert not done
            assert deeper
            below.set()
            report = await asyncio.wait_for(lookup, timeout=10)
            assert len(report.providers) == genuine + len(late)
    finally:
        await stop_all([reader])


async def test_a_lookup_passes_over_a_level_without_mark_when_the_level_below_holds_records() -> (
    None
):
    # The root's two holders the read stopped at came back from a restart: a few records, no
    # mark. The level below, read at once, holds the workers that filed there because the
    # root was full: the lookup takes them rather than ending at the root.
    reader = await start_node()
    root_read = asyncio.Event()
    partial = [make_record(load=0.9) for _ in range(3)]
    below = [make_record(load=n / 100) for n in range(12)]

    async def read_key(
        key: str, *, lazy: bool = False, want: int = 2, partial_ok: bool = False
    ) -> reading.KeyRead:
        if key == ROOT:
            await root_read.wait()
            return reading.KeyRead(list(partial))
        if shards.level_of(int(key.rsplit(":", 1)[1])) == 1:
            root_read.set()  # the root's answer comes after this one
            return reading.KeyRead(list(below))
        return reading.KeyRead([])

    reader.reader._read_key = read_key  # type: ignore[method-assign]
    try:
        report = await asyncio.wait_for(reader.lookup_report("ocr", limit=10), timeout=10)
        assert [r.worker_id for r in report.providers] == [r.worker_id for r in below[:10]]
    finally:
        await stop_all([reader])


def test_a_bare_mark_makes_a_key_only_for_a_shard_and_from_a_sender_that_proved_itself() -> None:
    clock = ManualClock()
    held = RecordStorage(POLICY, clock=clock)
    proved = ("198.51.100.7", "198.51.100.0/24")

    def mark(key: str, source: Groups | None) -> StoreResult:
        return held.merge(
            key_digest(key), encode_value(key, [], clock() + OVERFLOW_MEMORY, 3), source=source
        )

    # Nothing in a mark is signed: a name that is no shard never becomes a key, whoever sends it.
    for junk in ("junk-" + "x" * 2000, shards.worker_key("ab" * 20)):
        assert [mark(junk, s) for s in (UNPROVEN, proved, None)] == [StoreResult.INVALID] * 3
    deepest = shards.service_key("ocr", shards.shard_id(shards.MAX_LEVEL, 0))
    assert mark(deepest, proved) is StoreResult.INVALID  # nothing below it to send readers to
    # A new shard key from a forged source: refused; from a proved one or our own: kept.
    assert mark(ROOT, UNPROVEN) is StoreResult.INVALID
    assert len(held) == 0
    assert mark(ROOT, proved) is StoreResult.STALE
    assert mark(shards.service_key("ocr", 1), None) is StoreResult.STALE
    # Onto a held shard, a mark lands from anyone, as before.
    other = shards.service_key("asr", 0)
    record = make_record(services=("asr",), now=clock(), ttl=3000)
    assert held.merge(key_digest(other), encode_value(other, [record])) is StoreResult.OK
    assert mark(other, UNPROVEN) is StoreResult.STALE
    assert held_depth(held, clock(), other) == (True, 3)
    assert len(held) == 3


async def test_bare_marks_from_an_address_that_never_answered_make_no_key_on_the_wire() -> None:
    victim = await start_node()
    peer_id = os.urandom(20)
    answering = False

    def answer(sender: tuple[str, int], name: str, args: list[object]) -> object:
        return peer_id if name == "ping" and answering else None

    transport, peer = await open_raw_peer(answer)
    try:

        async def store(key: str) -> object:
            mark = encode_value(key, [], time.time() + 1e9, shards.MAX_LEVEL)
            return await peer.ask(victim.address, "store", peer_id, key_digest(key), mark)

        names = [f"junk-{i}-" + "x" * 2000 for i in range(20)]
        assert [await store(name) for name in names] == ["invalid"] * 20
        assert await store(ROOT) == "invalid"  # a shard, but the sender never answered us
        assert victim.storage.digests() == []
        answering = True
        ok, _ = await victim.rpc.call_ping(Node(peer_id, *peer.address))
        assert ok  # the peer's address now answers us
        assert await store(ROOT) == "stale"
        assert await store(names[0]) == "invalid"
        assert [victim.storage.key_name(d) for d in victim.storage.digests()] == [ROOT]
    finally:
        transport.close()
        await victim.aclose()
