"""What the proxy keeps of one call while it runs (`CallCapture`), and its frame on the
writer pipe: references to the bytes as they pass, and when; no parsing, no copies.

The request body, which grows with the conversation (megabytes in a long
session), goes into the pipe as the pieces it arrived in, after the rest of the
capture: the proxy never copies it (marshal would, and so would joining it to
its head)."""

from __future__ import annotations

import marshal
import struct
from dataclasses import dataclass, field, fields
from typing import Any

from ..core.headers import RawHeaders

# A frame on the writer pipe: this head, the capture's marshal data without its request body, then that body.
FRAME_HEAD = struct.Struct("!IIQB")  # length of the marshal data, of the body, sequence number, flags
RESENT = 1  # flag: sent before to a writer that died, so it may be on disk already
ACK = struct.Struct("!Q")  # the writer's acknowledgement: a frame's sequence number, its line written


@dataclass(slots=True)
class CallCapture:
    """What the proxy keeps of one call while it runs: no parsing, no copies."""

    api: str
    session: str
    index: int
    mode: str
    method: str
    url: str
    request_headers: RawHeaders
    request_body: bytes | list[bytes]  # (the proxy's: the pieces as they arrived; the writer's: bytes)
    started_at: float
    status: int | None = None
    response_headers: RawHeaders = field(default_factory=list)
    response_headers_at: float | None = None
    chunks: list[bytes] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    ended_at: float | None = None
    error: tuple[str, str] | None = None  # (kind, message) when the call did not finish
    extra: dict[str, Any] = field(default_factory=dict)
    upstream: dict[str, Any] | None = None  # route, url, attempts: see `core.record.Upstream`
    prompt: dict[str, Any] | None = None  # an override's reference and the agent's prompt hash: see `core.record.PromptTag`
    token_capture: dict[str, Any] | None = None  # the plan of token capture: `tokens.capture.CapturePlan.note`
    weight_version: str | int | None = None  # the trainer's policy version when the call came in
    bridge: dict[str, Any] | None = None  # the upstream side of a bridged call: `bridge.BridgedCall.note`

    def frame(self, seq: int = 0, flags: int = 0) -> list[bytes]:
        """The frame as the pieces to write in order: the head and marshal
        data, then the request body's pieces (none empty)."""
        # marshal: the fastest stdlib serialiser for plain values, and both
        # ends run the same Python (the child is started with sys.executable)
        data = marshal.dumps([getattr(self, name) for name in _MARSHALLED])
        body = self.request_body
        pieces = [piece for piece in ([body] if isinstance(body, bytes) else body) if piece]
        return [FRAME_HEAD.pack(len(data), sum(map(len, pieces)), seq, flags) + data, *pieces]

    @classmethod
    def unframe(cls, data: bytes, request_body: bytes) -> CallCapture:
        values = marshal.loads(data)
        values.insert(_BODY_AT, request_body)
        return cls(*values)


def resent(frame: list[bytes]) -> list[bytes]:
    """The frame marked as sent before (its pieces but the first shared)."""
    data, body, seq, _ = FRAME_HEAD.unpack_from(frame[0])
    return [FRAME_HEAD.pack(data, body, seq, RESENT) + frame[0][FRAME_HEAD.size :], *frame[1:]]


_CAPTURE_FIELDS = [f.name for f in fields(CallCapture)]
_BODY_AT = _CAPTURE_FIELDS.index("request_body")
_MARSHALLED = [name for name in _CAPTURE_FIELDS if name != "request_body"]
