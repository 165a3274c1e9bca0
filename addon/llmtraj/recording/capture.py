"""What the proxy keeps of one call while it runs (`CallCapture`), and its frame on the
writer pipe: references to the bytes as they pass, and when; no parsing, no copies."""

from __future__ import annotations

import marshal
import struct
from dataclasses import dataclass, field, fields
from typing import Any

from ..core.headers import RawHeaders

# A frame on the writer pipe: this head, then the capture's marshal data.
FRAME_HEAD = struct.Struct("!IQB")  # length of the data, sequence number, flags
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
    request_body: bytes
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
    bridge: dict[str, Any] | None = None  # the upstream side of a bridged call: `bridge.BridgedCall.note`

    def frame(self, seq: int = 0, flags: int = 0) -> bytes:
        # marshal: the fastest stdlib serialiser for plain values, and both
        # ends run the same Python (the child is started with sys.executable)
        data = marshal.dumps([getattr(self, name) for name in _CAPTURE_FIELDS])
        return FRAME_HEAD.pack(len(data), seq, flags) + data

    @classmethod
    def unframe(cls, data: bytes) -> CallCapture:
        return cls(*marshal.loads(data))


_CAPTURE_FIELDS = [f.name for f in fields(CallCapture)]
