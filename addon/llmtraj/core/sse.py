"""Incremental Server-Sent Events parser.

Feeds on raw (content-decoded) bytes as they arrive and yields one `SSEBlock` per
blank-line-terminated block, keeping the block's exact bytes so a recorded stream
can be replayed byte for byte. Follows the WHATWG event-stream rules: CRLF, LF or
CR line ends, multi-line `data:`, comments, a leading BOM. Work per `feed` is
proportional to the new bytes only, even for a block spread over many chunks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = "\ufeff"


def encode(data: str, event: str | None = None) -> bytes:
    """One event block as llm-traj writes it: `data` on a single line (as compact
    JSON is), after an `event:` line when named."""
    return (f"event: {event}\ndata: {data}\n\n" if event else f"data: {data}\n\n").encode()


@dataclass(slots=True)
class SSEBlock:
    """One block of the stream. `data` is None for blocks without data lines
    (keep-alive comments), which dispatch no event but are part of the bytes."""

    raw: bytes
    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    terminated: bool = True  # False only for a trailing block cut off by end of stream


class SSEParser:
    def __init__(self) -> None:
        self._buf = bytearray()  # bytes of the current unfinished block onwards
        self._line_start = 0  # offset in _buf of the current line
        self._scan = 0  # offset in _buf where the search for a line end resumes
        self._at_stream_start = True
        self._reset_fields()

    def _reset_fields(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEBlock]:
        self._buf += chunk
        return self._consume(final=False)

    def finish(self) -> list[SSEBlock]:
        """End of stream: a trailing CR is a line end, and an unterminated last
        block is returned with `terminated=False` (per the spec it dispatches no
        event, but its bytes were sent)."""
        blocks = self._consume(final=True)
        if self._buf:
            if self._line_start < len(self._buf):
                self._field(bytes(self._buf[self._line_start :]))
            tail = self._dispatch(bytes(self._buf))
            tail.terminated = False
            blocks.append(tail)
            self._buf.clear()
            self._line_start = self._scan = 0
        return blocks

    def _consume(self, final: bool) -> list[SSEBlock]:
        buf = self._buf
        blocks: list[SSEBlock] = []
        block_start = 0
        while True:
            m = _LINE_END.search(buf, self._scan)
            if m is None:
                self._scan = len(buf)
                break
            if not final and m.end() == len(buf) and buf[m.end() - 1] == 0x0D:
                # a lone CR at the very end may be the first half of a CRLF
                self._scan = m.start()
                break
            line = bytes(buf[self._line_start : m.start()])
            self._line_start = self._scan = m.end()
            if line:
                self._field(line)
            else:
                blocks.append(self._dispatch(bytes(buf[block_start : m.end()])))
                block_start = m.end()
        if block_start:
            del buf[:block_start]
            self._line_start -= block_start
            self._scan -= block_start
        return blocks

    def _field(self, line: bytes) -> None:
        text = line.decode("utf-8", errors="replace")
        if self._at_stream_start:
            self._at_stream_start = False
            if text.startswith(_BOM):
                text = text[1:]
        if text.startswith(":"):
            return
        name, sep, value = text.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            if value.isdigit():
                self._retry = int(value)

    def _dispatch(self, raw: bytes) -> SSEBlock:
        self._at_stream_start = False
        block = SSEBlock(
            raw=raw,
            data="\n".join(self._data) if self._data else None,
            event=self._event,
            id=self._id,
            retry=self._retry,
        )
        self._reset_fields()
        return block
