"""What the proxy keeps of one call while it runs (`CallCapture`), and its frame on the
writer pipe: references to the bytes as they pass, and when; no parsing, no copies.

The request body, which grows with the conversation (megabytes in a long
session), goes into the pipe as the pieces it arrived in, after the rest of the
capture: the proxy never copies it (marshal would, and so would joining it to
its head). A session's next body mostly repeats its previous one: it goes as
"the first N bytes of this session's previous body, then these bytes" (`DELTA`),
against the previous body the writer has (`LastBodies`)."""

from __future__ import annotations

import marshal
import struct
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field, fields
from itertools import accumulate
from operator import attrgetter
from typing import Any

from ..core.headers import RawHeaders
from .session_lru import SessionLRU

# A frame on the writer pipe: this head, the capture's marshal data without its request body, then that body
# (or, with DELTA, what follows the bytes it shares with the session's previous body).
# The head: length of the marshal data, of the body bytes that follow, sequence number, flags,
# the bytes shared with the previous body and that body's length (both 0 without DELTA).
FRAME_HEAD = struct.Struct("!IIQBQQ")
RESENT = 1  # flag: sent before to a writer that died, so it may be on disk already
DELTA = 2  # flag: the body is the first `shared` bytes of the session's previous body, then the bytes that follow
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
    request_body: bytes | list[bytes] | BodyPieces  # (the proxy's: the pieces as they arrived; the writer's: bytes, then `BodyPieces`)
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

    def body_pieces(self) -> list[bytes]:
        """The request body's pieces, none empty."""
        body = self.request_body
        return [piece for piece in ([body] if isinstance(body, bytes) else body) if piece]

    def frame(self, seq: int = 0, flags: int = 0, shared: int = 0, base: int = 0) -> list[bytes | memoryview]:
        """The frame as the pieces to write in order: the head and marshal
        data, then the request body's pieces (none empty); with `DELTA` in
        `flags`, only what follows its first `shared` bytes, which repeat the
        session's previous body (of `base` bytes)."""
        # marshal: the fastest stdlib serialiser for plain values, and both
        # ends run the same Python (the child is started with sys.executable)
        data = marshal.dumps(_marshalled(self))
        pieces = self.body_pieces()
        if flags & DELTA:
            pieces = _after(pieces, shared)
        else:
            shared = base = 0
        return [FRAME_HEAD.pack(len(data), sum(map(len, pieces)), seq, flags, shared, base) + data, *pieces]

    @classmethod
    def unframe(cls, data: bytes, request_body: bytes) -> CallCapture:
        values = marshal.loads(data)  # (a tuple)
        return cls(*values[:_BODY_AT], request_body, *values[_BODY_AT:])


def resent(frame: list[bytes | memoryview], body: list[bytes]) -> list[bytes | memoryview]:
    """The frame marked as sent before, with its whole `body` (the pieces of
    the capture's body): a writer started anew has no previous body."""
    data, _, seq, *_ = FRAME_HEAD.unpack_from(frame[0])
    return [FRAME_HEAD.pack(data, sum(map(len, body)), seq, RESENT, 0, 0) + frame[0][FRAME_HEAD.size :], *body]


def _after(pieces: list[bytes], start: int) -> list[bytes | memoryview]:
    """The pieces of what follows the first `start` bytes (views, not copies)."""
    for i, piece in enumerate(pieces):
        if start < len(piece):
            return [memoryview(piece)[start:] if start else piece, *pieces[i + 1 :]]
        start -= len(piece)
    return []


def shared_length(a: list[bytes], b: list[bytes]) -> int:
    """The length of the prefix two bodies given as pieces share: compared in
    C a stretch at a time (`startswith` of a view of the other's piece: a
    memcmp, no copy), the stretch that differs bisected the same way."""
    done = i = j = at_a = at_b = 0
    while i < len(a) and j < len(b):
        x, y = a[i], b[j]
        n = min(len(x) - at_a, len(y) - at_b)
        view = memoryview(x)[at_a : at_a + n]
        if not y.startswith(view, at_b):
            lo, hi = 0, n - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if y.startswith(view[lo:mid], at_b + lo):
                    lo = mid
                else:
                    hi = mid - 1
            return done + lo
        done, at_a, at_b = done + n, at_a + n, at_b + n
        if at_a == len(x):
            i, at_a = i + 1, 0
        if at_b == len(y):
            j, at_b = j + 1, 0
    return done


_JOINED = 64 << 10  # new bytes are joined to the last piece while both fit in this (pieces grow with the body, not the turns)


class BodyPieces:
    """A request body kept as pieces, as the writer rebuilds it from a delta:
    the pieces of the session's previous body up to the bytes it shares, then
    the new bytes; nothing of the shared part is copied. The whole body is
    joined only when something asks for it (`bytes()`), once."""

    __slots__ = ("pieces", "_ends", "_whole")

    def __init__(self, pieces: list[bytes | memoryview]) -> None:
        self.pieces = [piece for piece in pieces if len(piece)]
        self._ends = list(accumulate(map(len, self.pieces)))
        self._whole = self.pieces[0] if len(self.pieces) == 1 and isinstance(self.pieces[0], bytes) else None

    @classmethod
    def after(cls, previous: BodyPieces, shared: int, new: bytes) -> BodyPieces:
        """The first `shared` bytes of `previous`, then `new`."""
        i = bisect_left(previous._ends, shared)  # the piece the shared bytes end in
        pieces = previous.pieces[:i]
        if i < len(previous.pieces) and (start := previous._ends[i - 1] if i else 0) < shared:
            pieces.append(memoryview(previous.pieces[i])[: shared - start])
        if pieces and len(pieces[-1]) + len(new) <= _JOINED:
            pieces[-1] = b"".join((pieces[-1], new))  # (lets go of what the cut piece held beyond it)
        else:
            pieces.append(new)
        return cls(pieces)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __bytes__(self) -> bytes:
        if self._whole is None:
            self._whole = b"".join(self.pieces)
        return self._whole

    def at(self, offset: int) -> int:
        """The byte at `offset`."""
        i = bisect_right(self._ends, offset)
        return self.pieces[i][offset - (self._ends[i - 1] if i else 0)]

    def head(self, end: int) -> bytes:
        """The bytes before `end`."""
        if self._whole is not None:
            return self._whole[:end]
        i = bisect_left(self._ends, end)  # the piece `end` is in or at the end of
        if i == len(self.pieces):
            return b"".join(self.pieces)
        return b"".join((*self.pieces[:i], memoryview(self.pieces[i])[: end - (self._ends[i - 1] if i else 0)]))

    def tail(self, start: int) -> bytes:
        """The bytes from `start` on."""
        if self._whole is not None:
            return self._whole[start:]
        i = bisect_right(self._ends, start)
        if i == len(self.pieces):
            return b""
        return b"".join((memoryview(self.pieces[i])[start - (self._ends[i - 1] if i else 0) :], *self.pieces[i + 1 :]))


def as_pieces(body: bytes | BodyPieces) -> BodyPieces:
    return body if isinstance(body, BodyPieces) else BodyPieces([body])


class LastBodies(SessionLRU[Any]):
    """The last request body sent down the writer pipe of each session (the
    proxy's: its pieces; the writer's: `BodyPieces`), for the sessions sent to last
    within a budget of bytes. Both ends keep one each and put every frame's
    body into it in the order the frames go through the pipe, so they hold the
    same bodies: what the proxy sends a delta against, the writer has."""

    def __init__(self, sessions: int = 1024, budget: int = 256 << 20) -> None:
        super().__init__(sessions, budget)

    def swap(self, session: str, body: Any, length: int) -> tuple[Any, int] | None:
        """Keep `body` (of `length` bytes) as the session's last; (the one
        before, its length), if it was kept."""
        previous = self.pop(session)
        self.put(session, body, length)
        return previous

    def last(self, session: str) -> Any:
        """The session's last body, if it is kept."""
        return self.get(session)


_CAPTURE_FIELDS = [f.name for f in fields(CallCapture)]
_BODY_AT = _CAPTURE_FIELDS.index("request_body")
_marshalled = attrgetter(*(name for name in _CAPTURE_FIELDS if name != "request_body"))  # the values, as a tuple
