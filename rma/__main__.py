"""`python -m rma`: the same as the `rma` command."""

from __future__ import annotations

from rma.cli import main

raise SystemExit(main())
