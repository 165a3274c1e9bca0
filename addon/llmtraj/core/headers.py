"""Header helpers shared by the recorder, the writer, replay and the upstream client."""

from __future__ import annotations

from .record import Headers


def header(headers: Headers, name: str) -> str | None:
    name = name.lower()
    return next((v for k, v in headers if k.lower() == name), None)


RawHeaders = list[tuple[bytes, bytes]]

# Hop-by-hop headers (RFC 9110, 7.6.1): about one connection, never passed on.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
})  # fmt: skip


def text_headers(headers: RawHeaders) -> list[tuple[str, str]]:
    """Raw header pairs as text (as mitmproxy's `items(multi=True)` gives them, several times faster)."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


def content_length(headers: Headers) -> int | None:
    """The length of a body framed by its Content-Length (not chunked), if valid."""
    value = header(headers, "content-length")
    if value is None or header(headers, "transfer-encoding") is not None or not value.strip().isdigit():
        return None
    return int(value)
