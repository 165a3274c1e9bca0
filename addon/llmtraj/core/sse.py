"""Incremental Server-Sent Events parser.

Feeds on raw (content-decoded) bytes as they arrive and yields one `SSEBlock` per
blank-line-terminated block, keeping the block's exact bytes so a recorded stream
can be replayed byte for byte. Follows the WHATWG event-stream rules: CRLF, LF or
CR line ends, multi-line `data:`, comments, a leading BOM.

It works a block at a time: the end of a block is searched for in the new bytes
only (a stream that never sent a CR with `bytes.find`, one that did with a regex
for two line ends), and a block is decoded and split into its fields once, when
it is whole. So the work per `feed` is proportional to the new bytes, even for a
block spread over many chunks, and a chunk holding whole blocks is sliced, not
copied into a buffer first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Two line ends in a row: the end of a block's last line, then the blank line.
# A CR followed by LF is one line end (CRLF), never a CR and then an LF.
_BLOCK_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_TEXT_LINE_END = re.compile(r"\r\n|\r|\n")


def _lf_block_end(data: bytes | bytearray, pos: int) -> int:
    """Where the first two LFs in a row from `pos` on start, or -1: the end of a
    block in a stream without CRs (a function of its own so that tests can count
    the bytes searched)."""
    return data.find(b"\n\n", pos)


_BOM = "\ufeff"
_LF, _CR = 0x0A, 0x0D
_LONGEST_BLOCK_END = 4  # \r\n\r\n


def encode(data: str, event: str | None = None) -> bytes:
    """One event block as llm-traj writes it: `data` on a single line (as compact
    JSON is), after an `event:` line when named."""
    return (f"event: {event}\ndata: {data}\n\n" if event else f"data: {data}\n\n").encode()


@dataclass(slots=True)
class SSEBlock:
    """One block of the stream. `data` is None for blocks without data lines
    (keep-alive comments), which dispatch no event but are part of the bytes.
    `text` is `raw` decoded (UTF-8, invalid bytes replaced), as records keep it."""

    raw: bytes
    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    terminated: bool = True  # False only for a trailing block cut off by end of stream
    text: str = ""


class SSEParser:
    def __init__(self) -> None:
        self._buf = bytearray()  # the bytes of the unfinished block, when a feed ended inside one
        self._scan = 0  # offset in _buf where the search for the block's end resumes
        self._cr = False  # whether the stream sent a CR: then every kind of line end counts
        self._at_stream_start = True

    def feed(self, chunk: bytes) -> list[SSEBlock]:
        if not chunk:
            return []
        if not self._cr:
            if _CR in chunk:
                self._cr = True
            elif not self._buf and chunk.find(b"\n\n") == len(chunk) - 2 > 0 and chunk[0] != _LF:
                return [self._block(chunk)]  # the usual chunk: one whole block
        if self._buf:
            self._buf += chunk
            data = self._buf
        else:
            data = chunk  # no unfinished block: its blocks are sliced from it directly
        blocks: list[SSEBlock] = []
        end = self._split(data, 0 if data is chunk else self._scan, blocks, final=False)
        if data is chunk:
            if end < len(chunk):
                self._buf = bytearray(chunk[end:])
        elif end:
            del self._buf[:end]
        self._scan = self._resume_at(len(self._buf))
        return blocks

    def started(self) -> None:
        """The stream's first blocks were taken without this parser (whole
        blocks without a CR): it goes on as if it had parsed them."""
        self._at_stream_start = False

    def finish(self) -> list[SSEBlock]:
        """End of stream: a trailing CR is a line end, and an unterminated last
        block is returned with `terminated=False` (per the spec it dispatches no
        event, but its bytes were sent)."""
        blocks: list[SSEBlock] = []
        buf = self._buf
        if buf:
            end = self._split(buf, self._scan, blocks, final=True)
            if end < len(buf):
                blocks.append(self._block(bytes(buf[end:]), terminated=False))
            self._buf = bytearray()
            self._scan = 0
        return blocks

    def _resume_at(self, length: int) -> int:
        """Where the search for a block end resumes in an unfinished block of
        `length` bytes: only the first bytes of an end that the next chunk
        completes can already be here."""
        return max(0, length - (_LONGEST_BLOCK_END - 1 if self._cr else 1))

    def _split(self, data: bytes | bytearray, scan: int, blocks: list[SSEBlock], final: bool) -> int:
        """Appends the whole blocks of `data` to `blocks`; returns the offset
        where the unfinished rest begins. `scan`: no block end starts before it
        (other than at offset 0, a blank first line)."""
        start, size = 0, len(data)
        while start < size:
            first = data[start]
            if first == _LF or first == _CR:  # a blank first line: an empty block
                if first == _LF:
                    end = start + 1
                elif start + 1 < size:
                    end = start + 2 if data[start + 1] == _LF else start + 1
                elif final:
                    end = start + 1
                else:
                    break  # a lone CR at the very end may be the first half of a CRLF
            elif not self._cr:
                found = _lf_block_end(data, max(scan, start))
                if found < 0:
                    break
                end = found + 2
            else:
                match = _BLOCK_END.search(data, max(scan, start))
                if match is None:
                    break
                end = match.end()
                if end == size and data[end - 1] == _CR and not final:
                    break  # may be the first half of a CRLF: wait for the next byte
            blocks.append(self._block(bytes(data[start:end])))
            start = end
        return start

    def _block(self, raw: bytes, terminated: bool = True) -> SSEBlock:
        text = raw.decode("utf-8", "replace")
        body = text
        if self._at_stream_start:
            self._at_stream_start = False
            if body.startswith(_BOM):
                body = body[1:]
        plain = not self._cr or "\r" not in body  # LF line ends only
        if plain and terminated:
            # the usual blocks, `data:` alone or after `event:`, each on one line: no splitting
            last = len(body) - 2
            if body.startswith("data: "):
                if body.find("\n", 6) == last:
                    return SSEBlock(raw, body[6:-2], None, None, None, True, text)
            elif body.startswith("event: "):
                line_end = body.find("\n", 7)
                if body.startswith("data: ", line_end + 1) and body.find("\n", line_end + 7) == last:
                    return SSEBlock(raw, body[line_end + 7 : -2], body[7:line_end], None, None, True, text)
        data: list[str] = []
        event = id_ = retry = None
        lines = body.split("\n") if plain else _TEXT_LINE_END.split(body)
        for line in lines:
            if not line or line[0] == ":":  # the blank line ending the block, comments
                continue
            name, sep, value = line.partition(":")
            if sep and value[:1] == " ":
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id":
                if "\0" not in value:
                    id_ = value
            elif name == "retry":
                if value.isascii() and value.isdigit():  # ASCII digits only: int() refuses '²', which isdigit() takes
                    retry = int(value)
        return SSEBlock(raw=raw, data="\n".join(data) if data else None, event=event, id=id_, retry=retry,
                        terminated=terminated, text=text)
