"""What answers a replayed call: a recorded call made ready at load (`Step`), the
`Reply` it gives (as recorded, or converted between stream and non-stream), and the
body as written at the recorded pace."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from ..apis import ApiShape, no_response_answer
from ..core.headers import HOP_BY_HOP
from ..core.jsontext import compact_json
from ..core.record import NO_RESPONSE_STATUS, CallRecord
from ..core.redact import REDACTED
from .matching import Canonical, canonical

MATCH_HEADER = b"x-llm-traj-match"
STEP_HEADER = b"x-llm-traj-step"

# Not replayed: framing the proxy redoes (the recording is content-decoded, the
# length may change with a stream/non-stream conversion).
_DROPPED_HEADERS = HOP_BY_HOP | {"content-length", "content-encoding"}
_SSE = b"text/event-stream"
_JSON = b"application/json"


# -------------------------------------------------------------- responses


def key_digest(key: str) -> bytes:
    """What a tape keeps of a canonical request: a long conversation's key is
    as long as the conversation, its digest 16 bytes."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class Reply:
    """What the agent gets. Headers are ready for the wire; `events` are the
    recorded stream's blocks with their delay after the first one (empty when
    there is no pace to keep); `body` is always the whole body."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    events: tuple[tuple[float, bytes], ...] = ()
    cut: bool = False  # the recorded call ended early: cut the connection after the body


def _headers(
    recorded: Iterable[tuple[str, str]], step: bytes, content_type: bytes | None = None
) -> tuple[tuple[bytes, bytes], ...]:
    out = []
    for name, value in recorded:
        lower = name.lower()
        if (
            lower in _DROPPED_HEADERS
            or lower.startswith("x-llm-traj-")  # ours, in a recording made during a replay
            or value == REDACTED  # a set-cookie and the like: the value is gone
            or (content_type is not None and lower == "content-type")
        ):
            continue
        out.append((name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape")))
    if content_type is not None:
        out.append((b"content-type", content_type))
    out.append((STEP_HEADER, step))
    return tuple(out)


RecordSource = Callable[[bool], CallRecord]  # the call's record; with False its request may be left out


class Step:
    """One recorded call, ready to be served. It keeps what matching needs (its
    place, the digest of its canonical request); the record is read from its
    source when the call is served or a difference is described."""

    __slots__ = ("session", "index", "key", "_api", "_ignore", "_source")

    def __init__(
        self,
        record: CallRecord,
        api: ApiShape,
        ignore: frozenset[str],
        source: RecordSource | None = None,
        request: Canonical | None = None,  # its canonical form, when the caller made it already
    ) -> None:
        self.session, self.index = record.session, record.index
        self.key = key_digest((request or canonical(api, record.request, record.request_raw, ignore)).key)
        self._api, self._ignore = api, ignore
        self._source = source or (lambda whole: record)

    @property
    def request(self) -> Canonical:
        """The recorded request as matching sees it."""
        record = self._source(True)
        return canonical(self._api, record.request, record.request_raw, self._ignore)

    def reply(self, wants_stream: bool) -> Reply:
        """As recorded; a complete success is converted, when asked, to the
        other delivery (stream or not)."""
        record = self._source(False)
        if wants_stream == record.stream or not record.complete or not 200 <= record.status < 300:
            return self._as_recorded(record)
        if not isinstance(record.response, dict):
            return self._as_recorded(record)
        return self._convert(record)

    def _step_header(self) -> bytes:
        return f"{self.session}#{self.index}".encode()

    def _as_recorded(self, record: CallRecord) -> Reply:
        if record.status is None:
            # No answer came: the agent got the proxy's error (502, or 504 for a
            # timeout), as mitm/proxy_errors.py and the upstream client make it.
            error = record.error
            kind = error.kind if error is not None and error.kind in NO_RESPONSE_STATUS else "upstream_unreachable"
            status, body = no_response_answer(self._api, kind, error.message if error is not None else "no response")
            return Reply(status, _headers((), self._step_header(), _JSON), json.dumps(body).encode())
        headers = _headers(record.response_headers, self._step_header())
        if record.events is not None:
            first = record.events[0].t if record.events else 0.0
            events = tuple((e.t - first, e.data()) for e in record.events)
            body = b"".join(raw for _, raw in events)
        else:
            events = ()
            body = (
                base64.b64decode(record.response_raw_base64) if record.response_raw_base64 is not None
                else record.response_raw.encode() if record.response_raw is not None
                else compact_json(record.response).encode() if record.response is not None
                else b""
            )  # fmt: skip
        return Reply(record.status, headers, body, events, cut=not record.complete)

    def _convert(self, record: CallRecord) -> Reply:
        if record.stream:  # the aggregate the recorder built from the stream
            headers = _headers(record.response_headers, self._step_header(), _JSON)
            return Reply(record.status, headers, compact_json(record.response).encode())
        headers = _headers(record.response_headers, self._step_header(), _SSE)
        return Reply(record.status, headers, b"".join(self._api.chunks_from_final(record.response)))


async def reply_body(reply: Reply, speed: float) -> AsyncIterator[bytes]:
    """The body as it is written: a recorded stream at its pace divided by
    `speed` (0: all at once), and for a call that ended early, the cut
    (ConnectionResetError) after it."""
    if speed > 0 and reply.events:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for delay, raw in reply.events:
            wait = start + delay / speed - loop.time()  # from the start, so sleeps do not add up drift
            if wait > 0:
                await asyncio.sleep(wait)
            yield raw
    else:
        yield reply.body
    if reply.cut:
        raise ConnectionResetError("the recorded call ended here")
