"""Strict request framing (RFC 9112) in front of h11, so that the router and whatever sits before
or behind it can never read one request's bytes differently.

h11 is lenient where a proxy must not be: it takes a bare LF as a line end (one header line
becomes two), unfolds obsolete line folding, and lets Transfer-Encoding win over a
Content-Length sent with it. `StrictConnection` refuses all of these, and the server answers
400 and closes the connection.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import h11

# Where h11 ends a request head (it accepts "\n\n" too, which is exactly what is refused here).
_HEAD_END = re.compile(rb"\n\r?\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
# RFC 9112 section 5.2: a line that starts with a space or tab continues the one before.
_OBS_FOLD = re.compile(rb"\n[ \t]")
# RFC 9110 section 5.6.2 (token) and 5.5 (field-value, without obs-text folding).
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VCHAR = rb"[\x21-\x7e\x80-\xff]"
_FIELD_VALUE = re.compile(rb"(?:%s(?:[ \t\x21-\x7e\x80-\xff]*%s)?)?" % (_VCHAR, _VCHAR))


def head_problem(head: bytes) -> str | None:
    """Why a complete request head (request line to blank line) must be refused, or None."""
    if _BARE_LF.search(head):
        return "bare LF in the request head (lines must end with CRLF)"
    if _BARE_CR.search(head):
        return "bare CR in the request head"
    if _OBS_FOLD.search(head):
        return "obsolete line folding in a header field"
    return None


def header_problem(headers: Iterable[tuple[bytes, bytes]], http_version: bytes) -> str | None:
    """Why parsed request headers frame the body ambiguously or are malformed, or None.

    `headers` are (name, value) pairs with lower-case names, as h11 and ASGI give them.
    """
    lengths: set[bytes] = set()
    encodings = hosts = 0
    for name, value in headers:
        if not _FIELD_NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            return f"malformed header field {name[:40]!r}"
        if name == b"content-length":
            lengths.update(part.strip() for part in value.split(b","))
        elif name == b"transfer-encoding":
            encodings += 1
        elif name == b"host":
            hosts += 1
    if encodings and lengths:
        return "both Content-Length and Transfer-Encoding (RFC 9112 section 6.3)"
    if encodings and http_version == b"1.0":
        return "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 section 6.1)"
    if encodings > 1:
        return "more than one Transfer-Encoding header"
    if len(lengths) > 1:
        return "conflicting Content-Length values"
    if hosts > 1:
        return "more than one Host header (RFC 9112 section 3.2)"
    return None


class StrictConnection(h11.Connection):
    """An h11 server connection that refuses ambiguous framing before h11 reads it leniently.

    The refusal is raised as h11.RemoteProtocolError, which uvicorn answers with 400 and a
    closed connection; `refused` keeps the reason for that answer.
    """

    def __init__(self, max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self.max_head = max_incomplete_event_size
        self.refused: str | None = None
        self.refused_status = 400  # 431 for a head over `max_head`
        self._searched = 0  # how far the head now buffered was searched for its end

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """h11's next event, after checking the raw head it is about to parse."""
        if self.refused is None and self.their_state is h11.IDLE:
            self.refused = self._raw_head_problem()
        if self.refused is not None:
            raise h11.RemoteProtocolError(self.refused, error_status_hint=self.refused_status)
        event = super().next_event()
        if isinstance(event, h11.Request):
            self._searched = 0
            self.refused = header_problem(event.headers, event.http_version)
            if self.refused is not None:
                raise h11.RemoteProtocolError(self.refused, error_status_hint=400)
        return event

    def _raw_head_problem(self) -> str | None:
        # While the client is IDLE the buffer starts with the next head: h11 consumed the rest.
        buffered, _ = self.trailing_data
        end = _HEAD_END.search(buffered, max(0, self._searched - 2))
        # h11 bounds only a head still incomplete: one that arrives whole in a read (up to
        # 256 KiB on loopback) would pass, and be forwarded to a provider.
        if (len(buffered) if end is None else end.end()) > self.max_head:
            self.refused_status = 431
            return f"request head over {self.max_head} bytes (RFC 6585 section 5)"
        if end is None:
            # A head dribbled in byte by byte is searched once, not once per byte.
            self._searched = len(buffered)
            return None
        return head_problem(buffered[: end.end()])


__all__ = ["StrictConnection", "head_problem", "header_problem"]
