"""`python -m edge_router`: the same as `rma router`."""

from __future__ import annotations

import sys

from dht_bridge.cli import main

raise SystemExit(main(["router", *sys.argv[1:]]))
