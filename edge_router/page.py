"""The topology page at `GET /` and its assets under `/static/`, served by the router itself.

The page is plain HTML, CSS and a small script written for it (no CDN, no library): the script
polls `GET /topology` and draws the network in SVG. The files live beside this module, in
`static/`, so they are found from a source checkout and from an installed wheel alike (the wheel
needs them in the package data).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "INDEX",
    "PAGE_HEADERS",
    "STATIC_DIR",
    "PagePollFilter",
    "index",
    "quiet_page_polls",
    "routes",
]

STATIC_DIR = Path(__file__).parent / "static"
INDEX = "topology.html"

# The page loads nothing from anywhere but this router: the browser enforces what the tests check.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    # The page is tiny and changes with the router's version: always revalidate.
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@functools.cache
def _index_html() -> str:
    return (STATIC_DIR / INDEX).read_text(encoding="utf-8")


async def index(request: Request) -> Response:
    """GET /: the topology page (it fetches `/topology` itself and redraws every few seconds)."""
    return HTMLResponse(_index_html(), headers=PAGE_HEADERS)


def routes() -> list[BaseRoute]:
    """The page's routes, for the app factory: `/` and the files under `/static/`."""
    return [
        Route("/", index, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]


class PagePollFilter(logging.Filter):
    """Drops uvicorn's access lines for the page's own successful requests (`/`, `/static/`,
    `/topology`): an open page polls every few seconds and would bury every other line.

    Failed page requests (status 400 and up) and every other path are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a page request that succeeded; uvicorn logs (client, method, path+query,
        HTTP version, status) as the record's arguments."""
        args = record.args
        if not isinstance(args, tuple) or len(args) != 5:
            return True
        _, method, target, _, status = args
        if method not in ("GET", "HEAD") or not isinstance(status, int) or status >= 400:
            return True
        path = str(target).split("?", 1)[0]
        return not (path in ("/", "/topology") or path.startswith("/static/"))


@contextlib.contextmanager
def quiet_page_polls(logger_name: str = "uvicorn.access") -> Iterator[None]:
    """Install `PagePollFilter` on uvicorn's access logger while the server runs."""
    target = logging.getLogger(logger_name)
    quiet = PagePollFilter()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)
