"""An emulated internet for tests and benchmarks: DHT nodes (ours and the stock library's)
exchange real datagrams over in-memory links with the delays, jitter and loss of a profile.

- `model`    regions, round-trip ranges, jitter and loss; the profiles `lan`, `continent` and
             `world`, each one line from `Profile.describe()` to print with every figure.
- `network`  `EmulatedNetwork` (hosts in regions, links that can be cut, traffic per host) and
             `Host.endpoint`, the datagram endpoint `DHTNode(endpoint=...)` takes. Delivery is a
             `loop.call_later` on the running loop: no socket, nothing leaves the process.
- `stock`    `StockServer`: the stock `kademlia.network.Server` bound on an emulated host.
- `clock`    `VirtualClockLoop` (time jumps to the next event) and `DilatedClockLoop` (real
             time slowed N times), run by `run_virtual` and `run_dilated`: networks bigger
             than one event loop can carry in real time.

It lives in the product package, not under bench/, because tests and benchmarks of several
packages (the DHT, the worker) run on it, and it is type-checked with them; nothing in the
product imports it.
"""

from dht_bridge.netem.model import CONTINENT, LAN, PROFILES, WORLD, Profile, Region, profile
from dht_bridge.netem.network import Address, EmulatedNetwork, EmulatedTransport, Host, Traffic
from dht_bridge.netem.stock import StockServer

__all__ = [
    "CONTINENT",
    "LAN",
    "PROFILES",
    "WORLD",
    "Address",
    "EmulatedNetwork",
    "EmulatedTransport",
    "Host",
    "Profile",
    "Region",
    "StockServer",
    "Traffic",
    "profile",
]
