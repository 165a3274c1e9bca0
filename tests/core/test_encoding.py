"""Content decoders on bodies of several members: a gzip body may hold more
than one member (RFC 1952), a zstd body more than one frame (RFC 8878); the
record holds all of it, in any chunking, and a body cut inside a later member
is not taken for whole."""

from __future__ import annotations

import gzip

import pytest
import zstandard

from llmtraj.core.encoding import decoder_for

PARTS = [b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\n' * 50, b"data: [DONE]\n\n"]


def members(encoding: str) -> bytes:
    compress = gzip.compress if encoding == "gzip" else zstandard.ZstdCompressor().compress
    return b"".join(compress(part) for part in PARTS)


def decode(encoding: str, body: bytes, size: int):
    decoder = decoder_for(encoding)
    out = b"".join(decoder.decode(body[i : i + size]) for i in range(0, len(body), size)) + decoder.flush()
    return out, decoder.ended


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
@pytest.mark.parametrize("size", [1, 7, 64, 1 << 20])
def test_every_member_is_decoded_in_any_chunking(encoding, size):
    assert decode(encoding, members(encoding), size) == (b"".join(PARTS), True)


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_a_body_cut_inside_a_later_member_has_not_ended(encoding):
    body = members(encoding)
    out, ended = decode(encoding, body[:-5], 16)
    assert not ended and out.startswith(PARTS[0] + PARTS[1][:16])
