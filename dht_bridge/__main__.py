"""`python -m dht_bridge`: the same as `rma bridge`."""

from __future__ import annotations

import sys

from dht_bridge.cli import main

raise SystemExit(main(["bridge", *sys.argv[1:]]))
