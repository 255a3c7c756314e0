"""The link model: regions, round trips between them, jitter and loss, as named profiles.

A profile places hosts in regions (by weight) and gives every pair of regions a range of round
trips. A link's round trip is fixed for the pair of hosts: it sits in its regions' range at a
point drawn half from the pair and half from the two hosts' own "access" quality (a host on a
slow line is slow towards everyone), so the round trips of a network are heterogeneous but
stay in their ranges. Each datagram then takes half the link's round trip, lengthened by up to
`jitter` of it (datagrams can overtake each other, as on the internet), and is lost with
probability `loss`, each direction on its own.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from dht_bridge.errors import ConfigError

__all__ = [
    "CONTINENT",
    "DEFAULT_LOSS",
    "LAN",
    "PROFILES",
    "WORLD",
    "Profile",
    "Region",
    "profile",
    "unit_hash",
]

# Loss on every link unless a profile says otherwise (the "1% unless stated").
DEFAULT_LOSS = 0.01
MS = 0.001


def unit_hash(*parts: object) -> float:
    """A number in [0, 1) fixed by `parts`: the same pair of hosts always gets the same link."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True)
class Region:
    """A place hosts live in; `weight` is its share of the hosts placed by the profile."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class Profile:
    """A named network: its regions, the round-trip range (seconds) within a region and between
    each pair of regions, the jitter (a fraction of the one-way delay) and the loss rate."""

    name: str
    regions: tuple[Region, ...]
    intra_rtt: tuple[float, float]
    inter_rtt: Mapping[frozenset[str], tuple[float, float]] = field(default_factory=dict)
    jitter: float = 0.1
    loss: float = DEFAULT_LOSS

    def __post_init__(self) -> None:
        names = {r.name for r in self.regions}
        if not names or len(names) != len(self.regions):
            raise ConfigError(f"profile {self.name}: regions must be named, once each")
        if not 0 <= self.loss < 1 or self.jitter < 0:
            raise ConfigError(f"profile {self.name}: loss must be in [0, 1), jitter >= 0")
        for a in names:
            for b in names - {a}:
                lo, hi = self.rtt_range(a, b)
                if not 0 < lo <= hi:
                    raise ConfigError(f"profile {self.name}: bad round trips {a}-{b}")

    def rtt_range(self, a: str, b: str) -> tuple[float, float]:
        """The round-trip range (seconds) of a link between regions `a` and `b`."""
        if a == b:
            return self.intra_rtt
        try:
            return self.inter_rtt[frozenset((a, b))]
        except KeyError:
            raise ConfigError(f"profile {self.name} has no round trip for {a}-{b}") from None

    def link_rtt(self, a: str, b: str, *, pair: float, access_a: float, access_b: float) -> float:
        """The base round trip of one link: `pair` and the two hosts' `access` in [0, 1)."""
        lo, hi = self.rtt_range(a, b)
        return lo + (hi - lo) * (0.5 * pair + 0.25 * (access_a + access_b))

    def median_rtt(self, samples: int = 4000, seed: int = 0) -> float:
        """The median round trip between two hosts placed by the profile (seconds, no jitter)."""
        names = [r.name for r in self.regions]
        weights = [r.weight for r in self.regions]
        total = sum(weights)

        def place(x: float) -> str:
            acc = 0.0
            for name, weight in zip(names, weights, strict=True):
                acc += weight / total
                if x < acc:
                    return name
            return names[-1]

        rtts = [
            self.link_rtt(
                place(unit_hash(seed, i, "a")),
                place(unit_hash(seed, i, "b")),
                pair=unit_hash(seed, i, "pair"),
                access_a=unit_hash(seed, i, "access-a"),
                access_b=unit_hash(seed, i, "access-b"),
            )
            for i in range(samples)
        ]
        return statistics.median(rtts)

    def describe(self) -> str:
        """One line that says what the figures were measured on."""
        regions = ", ".join(r.name for r in self.regions)
        lo, hi = self.intra_rtt
        text = f"{self.name}: {len(self.regions)} region(s) ({regions}); RTT within a region "
        text += f"{lo / MS:g}-{hi / MS:g} ms"
        if self.inter_rtt:
            los, his = zip(*self.inter_rtt.values(), strict=True)
            text += f", between regions {min(los) / MS:g}-{max(his) / MS:g} ms"
        text += f"; jitter up to {self.jitter:.0%} of the one-way delay; loss {self.loss:.1%}"
        text += f"; median RTT {self.median_rtt() / MS:.0f} ms"
        return text

    def as_dict(self) -> dict[str, object]:
        """The profile for a JSON report."""
        return {
            "name": self.name,
            "regions": {r.name: r.weight for r in self.regions},
            "intra_rtt_ms": [x / MS for x in self.intra_rtt],
            "inter_rtt_ms": {
                "-".join(sorted(pair)): [x / MS for x in rtt]
                for pair, rtt in sorted(self.inter_rtt.items(), key=lambda kv: sorted(kv[0]))
            },
            "jitter": self.jitter,
            "loss": self.loss,
            "median_rtt_ms": round(self.median_rtt() / MS, 1),
        }


def _pairs(
    table: Iterable[tuple[str, str, float, float]],
) -> dict[frozenset[str], tuple[float, float]]:
    return {frozenset((a, b)): (lo * MS, hi * MS) for a, b, lo, hi in table}


# One building: sub-millisecond round trips, nothing lost.
LAN = Profile("lan", (Region("lan"),), intra_rtt=(0.2 * MS, 1 * MS), jitter=0.1, loss=0.0)

# One continent, three regions of it (say western, central and northern Europe).
CONTINENT = Profile(
    "continent",
    (Region("west", 0.4), Region("central", 0.4), Region("north", 0.2)),
    intra_rtt=(10 * MS, 40 * MS),
    inter_rtt=_pairs(
        [
            ("west", "central", 20, 50),
            ("west", "north", 30, 60),
            ("central", "north", 25, 55),
        ]
    ),
)

# Five continents, weighted roughly as volunteer computing's hosts are; inter-continent round
# trips of real magnitude (70 ms across the Atlantic to 250 ms to the far side of the world).
WORLD = Profile(
    "world",
    (
        Region("europe", 0.35),
        Region("north-america", 0.30),
        Region("asia", 0.20),
        Region("south-america", 0.08),
        Region("oceania", 0.07),
    ),
    intra_rtt=(10 * MS, 40 * MS),
    inter_rtt=_pairs(
        [
            ("europe", "north-america", 70, 130),
            ("europe", "asia", 150, 250),
            ("europe", "south-america", 180, 240),
            ("europe", "oceania", 220, 250),
            ("north-america", "asia", 120, 200),
            ("north-america", "south-america", 110, 170),
            ("north-america", "oceania", 140, 200),
            ("asia", "south-america", 220, 250),
            ("asia", "oceania", 90, 150),
            ("south-america", "oceania", 200, 250),
        ]
    ),
)

PROFILES: Mapping[str, Profile] = MappingProxyType({p.name: p for p in (LAN, CONTINENT, WORLD)})


def profile(name: str) -> Profile:
    """The profile called `name` (`lan`, `continent` or `world`)."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"no network profile {name!r}; there are {sorted(PROFILES)}") from None
