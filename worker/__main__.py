"""`python -m worker`: the same as `rma worker`."""

from __future__ import annotations

import sys

from dht_bridge.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["worker", *sys.argv[1:]]))
