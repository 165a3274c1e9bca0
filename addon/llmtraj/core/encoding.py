"""Incremental decoders for content-encoded response bodies (record side only:
the client always gets the bytes as the upstream sent them)."""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli
import zstandard


class Decoder(Protocol):
    def decode(self, chunk: bytes) -> bytes: ...
    def flush(self) -> bytes: ...

    @property
    def ended(self) -> bool:
        """Whether the encoded data reached its end marker (False: the body was cut short)."""
        ...


class IdentityDecoder:
    ended = True  # (no end marker: the framing alone says where the body ends)

    def decode(self, chunk: bytes) -> bytes:
        return chunk

    def flush(self) -> bytes:
        return b""


class _Zlib:
    def __init__(self, wbits: int) -> None:
        self._wbits = wbits
        self._d = zlib.decompressobj(wbits)

    def decode(self, chunk: bytes) -> bytes:
        out = self._d.decompress(chunk)
        if self._wbits & 16 and self._d.eof and self._d.unused_data:  # another gzip member follows (RFC 1952 2.2)
            rest, self._d = self._d.unused_data, zlib.decompressobj(self._wbits)
            out += self.decode(rest)
        return out

    def flush(self) -> bytes:
        return self._d.flush()

    @property
    def ended(self) -> bool:
        return self._d.eof


class _Brotli:
    def __init__(self) -> None:
        self._d = brotli.Decompressor()

    def decode(self, chunk: bytes) -> bytes:
        return self._d.process(chunk)

    def flush(self) -> bytes:
        return b""

    @property
    def ended(self) -> bool:
        return self._d.is_finished()


class _Zstd:
    def __init__(self) -> None:
        self._d = zstandard.ZstdDecompressor().decompressobj()

    def decode(self, chunk: bytes) -> bytes:
        if self._d.eof and chunk:  # another zstd frame follows (RFC 8878 3); an ended decompressobj takes no more
            self._d = zstandard.ZstdDecompressor().decompressobj()
        out = self._d.decompress(chunk)
        if self._d.eof and self._d.unused_data:
            out += self.decode(self._d.unused_data)
        return out

    def flush(self) -> bytes:
        return b""

    @property
    def ended(self) -> bool:
        return self._d.eof


class UnsupportedEncoding(ValueError):
    pass


def decoder_for(content_encoding: str | None) -> Decoder:
    """A decoder for a Content-Encoding header value."""
    names = [n.strip().lower() for n in (content_encoding or "").split(",") if n.strip()]
    names = [n for n in names if n != "identity"]
    if not names:
        return IdentityDecoder()
    if len(names) > 1:
        raise UnsupportedEncoding(f"stacked content-encodings {content_encoding!r}")
    name = names[0]
    if name in ("gzip", "x-gzip"):
        return _Zlib(16 + zlib.MAX_WBITS)
    if name == "deflate":
        return _Zlib(zlib.MAX_WBITS | 32)  # zlib or gzip header, auto-detected
    if name == "br":
        return _Brotli()
    if name == "zstd":
        return _Zstd()
    raise UnsupportedEncoding(f"unsupported content-encoding {name!r}")
