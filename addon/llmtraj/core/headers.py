"""Header helpers shared by the recorder, the writer, replay and the upstream client."""

from __future__ import annotations

from .record import Headers


RawHeaders = list[tuple[bytes, bytes]]


def header(headers: Headers | RawHeaders, name: str | bytes) -> str | bytes | None:
    """A header's value: text pairs by a text name, raw pairs (as captured) by a bytes name."""
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


# Hop-by-hop headers (RFC 9110, 7.6.1): about one connection, never passed on.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
})  # fmt: skip


def text_headers(headers: RawHeaders) -> list[tuple[str, str]]:
    """Raw header pairs as text (as mitmproxy's `items(multi=True)` gives them, several times faster)."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


def content_length(headers: RawHeaders) -> int | None:
    """The length of a body framed by its Content-Length (not chunked), if valid, from raw pairs."""
    value = header(headers, b"content-length")
    if value is None or header(headers, b"transfer-encoding") is not None or not value.strip().isdigit():
        return None
    return int(value)
