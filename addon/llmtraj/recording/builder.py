"""Builds one call's record in the writer process: fed the captured bytes in
order, it keeps the exact SSE blocks, aggregates them into the final object and
makes the `CallRecord`'s fields. Knows nothing of mitmproxy."""

from __future__ import annotations

import base64
import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from functools import partial
from itertools import accumulate, repeat
from operator import methodcaller, sub
from typing import Any

from pydantic_core import from_json

from ..apis import API_BY_NAME, ApiShape, StreamAggregator
from ..core.encoding import Decoder, IdentityDecoder, UnsupportedEncoding, decoder_for
from ..core.headers import header
from ..core.record import SCHEMA_VERSION, Headers
from ..core.redact import may_have_secret_fields, redact_fields, redact_headers
from ..core.sse import SSEBlock, SSEParser
from .body_parse import RequestBodies
from .capture import BodyPieces
from .event_template import EventTemplate
from .secret_scan import SecretFieldScan


def parse_json_body(body: bytes | BodyPieces, parse: Callable[[Any], Any] = from_json) -> tuple[Any, str | None]:
    """(JSON value, None), or (None, the body as text) when it is not JSON."""
    if not len(body):
        return None, None
    try:
        return parse(body), None
    except ValueError:
        return None, bytes(body).decode("utf-8", errors="replace")


def base64_unless_utf8(data: bytes) -> str | None:
    """The bytes in base64 when they are not UTF-8 text (kept exactly beside
    their text with replacement characters), else None."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii")
    return None


# A block as nearly every server sends it: an optional `event:` line, one `data:` line (groups: the block, its
# `event:` line, its data; `.` is any byte but LF). In a body of these blocks alone, without a CR, every two LFs
# in a row end one, as they end a block in `SSEParser`.
_USUAL_BLOCK = re.compile(rb"((event: .*\n)?data: (.*)\n\n)")
_ENDS_BLOCK = methodcaller("endswith", b"\n\n")  # (chunks may be bytes or bytearrays)

# A stream whose blocks this many templates matched none of (each block's other fields change too), or that
# this many of its text blocks could not be made templates of (texts written with escapes: `\u4f60`), makes
# no more: each try costs about a parse.
_UNMATCHED_TEMPLATES = 4


def usual_blocks(
    body: bytes,
) -> tuple[tuple[bytes, ...], list[str], tuple[bytes, ...], tuple[bytes, ...]] | None:
    """(the blocks, their text, their `event:` lines (b"" for none), their data)
    of a stream body made of usual blocks alone (UTF-8, LF line ends); None for
    any other body. Each block is decoded alone (as the parser does: the
    narrowest string, and no cost for a wide character in one block on all that
    follow; a character never spans two blocks: they end in LFs)."""
    if b"\r" in body:
        return None
    found = _USUAL_BLOCK.findall(body)
    if not found:
        return None
    blocks, names, datas = zip(*found)
    if sum(map(len, blocks)) != len(body):  # blocks of another shape between or after them
        return None
    try:
        raws = list(map(bytes.decode, blocks))
    except UnicodeDecodeError:
        return None
    return blocks, raws, names, datas


def fold_usual_blocks(
    aggregator: StreamAggregator, names: tuple[bytes, ...], datas: tuple[bytes, ...], raws: list[str],
    events: list[dict[str, Any]] | None = None,
) -> None:
    """Folds a body's usual blocks (`usual_blocks`; `raws` their text) into `aggregator` as their blocks from
    the SSE parser would be: the blocks that follow one of a template (`EventTemplate`) as the texts they add,
    any other parsed and folded in whole (and made the template of the next ones, if it can be). Their
    events in `events` (if given, as `raws`) get what the record stores of them: a template's event its
    `slots`, each event that follows it its values (`v`)."""
    event_names = {line: line[7:-1].decode() if line else None for line in set(names)}
    named = list(map(event_names.__getitem__, names))
    unmatched = 0  # text blocks that were made no template, or one that matched no block
    index = 0
    while index < len(raws):
        name, data, raw = named[index], datas[index], raws[index]
        index += 1
        try:
            value = from_json(data)
        except ValueError:  # not JSON (an OpenAI stream's last `[DONE]`): the aggregator says what it is
            aggregator.add(SSEBlock(b"", data.decode(), name))
            continue
        aggregator.add_parsed(name, data.decode(), value)
        if unmatched < _UNMATCHED_TEMPLATES and (slot := aggregator.text_slot(name, value)) is not None:
            start = index
            if (template := EventTemplate.of(raw, value, *slot)) is not None:
                index = template.take(raws, index, events)
                if events is not None and index > start:
                    events[start - 1]["slots"] = template.slots
            unmatched += index == start


def mark_templates(api: str, events: list[dict[str, Any]]) -> None:
    """Marks a stream's events (a record's, read back) as the recorder marks a stream it takes at once, for
    the store (`core.chain.encode_events`): a template's event its `slots`, each event that follows it its
    values (`v`). Events of any other shape, or of an API this llm-traj does not know, are left as they are."""
    shape = API_BY_NAME.get(api)
    if shape is None or any(event.get("raw_base64") for event in events):
        return
    found = usual_blocks("".join(event["raw"] for event in events).encode())
    if found is None or found[1] != [event["raw"] for event in events]:
        return
    _, raws, names, datas = found
    fold_usual_blocks(shape.new_aggregator(), names, datas, raws, events)


RecordFields = dict[str, Any]  # a CallRecord's fields as plain JSON-able values


class RecordBuilder:
    """The record of one call in the making, fed the call's bytes in order (in
    the record writer, `recording.writer`). Its fields stay plain values and
    `finish`/`fail` hand them over as a dict with `CallRecord`'s fields, written
    without a second validation (the reader, and the tests, validate what was
    written against `CallRecord`)."""

    def __init__(
        self,
        *,
        api: ApiShape,
        session: str,
        index: int,
        mode: str,
        method: str,
        url: str,
        request_headers: Headers,
        request_body: bytes | BodyPieces,  # (pieces: joined only where the whole body is needed)
        started_at: float | None = None,
        secret_scan: SecretFieldScan | None = None,
        request_bodies: RequestBodies | None = None,
        repeats: tuple[BodyPieces, int] | None = None,  # the session's previous body, the bytes this one repeats of it
    ) -> None:
        self.api = api
        headers, self.secrets = redact_headers(request_headers)
        request, request_raw = parse_json_body(
            request_body,
            partial(request_bodies.parse, session, repeats=repeats) if request_bodies is not None
            else lambda body: from_json(bytes(body)),  # fmt: skip
        )
        # The body for the writer to write as received, when it is valid JSON
        # (just parsed) and has nothing to redact (the store writes it if it
        # fits on one line): serialising a long conversation again on every
        # call costs more than parsing it did. (Pieces are joined by the store
        # only if it writes them.)
        self.request_json: bytes | BodyPieces | None = None
        if request is not None:
            if (secret_scan.may_have_secret_fields(session, request_body, repeats) if secret_scan is not None
                    else may_have_secret_fields(bytes(request_body))):  # fmt: skip
                request = redact_fields(request, self.secrets)
            else:
                self.request_json = request_body
        self.started_at = started_at or time.time()
        self.fields: RecordFields = {
            "schema_version": SCHEMA_VERSION,
            "session": session,
            "index": index,
            "api": api.name,
            "mode": mode,
            "method": method,
            "url": url,
            "request_headers": headers,
            "request": request,
            "request_raw": request_raw,
            "request_raw_base64": base64_unless_utf8(bytes(request_body)) if request_raw is not None else None,
            "status": None,
            "response_headers": [],
            "stream": False,
            "response": None,
            "response_raw": None,
            "response_raw_base64": None,
            "events": None,
            "complete": True,
            "error": None,
            "problems": [],
            "timings": None,  # set at the end
            "upstream": None,
            "prompt": None,  # tagged by the writer (llmtraj.prompts.tagging)
            "extra": {},
            "tokens": None,
            "capture": None,
            "bridge": None,
            "weight_version": None,  # set by the writer from the capture (the trainer's policy version)
        }
        self.response_headers_at: float | None = None
        self.first_byte_at: float | None = None
        self._decoder: Decoder | None = None
        self._encoded = False  # whether the body has a content-encoding to undo
        self._parser: SSEParser | None = None
        self._aggregator = None
        self._events: list[dict[str, Any]] = []
        self._body: list[bytes] = []
        self._undecodable = False  # a corrupt compressed stream is still forwarded, not parsed
        self._received = False  # whether any body bytes came
        self._data_seen = False  # whether the event stream had a data event

    def response_started(self, status: int, headers: Headers, now: float | None = None) -> None:
        fields = self.fields
        fields["status"] = status
        fields["response_headers"] = redact_headers(headers)[0]
        self.response_headers_at = now or time.time()
        try:
            self._decoder = decoder_for(header(headers, "content-encoding"))
        except UnsupportedEncoding as exc:
            fields["problems"].append(f"{exc}: body recorded undecoded")
            self._decoder = decoder_for(None)
        self._encoded = not isinstance(self._decoder, IdentityDecoder)
        content_type = (header(headers, "content-type") or "").lower()
        if content_type.startswith("text/event-stream"):
            fields["stream"] = True
            self._parser = SSEParser()
            self._aggregator = self.api.new_aggregator()

    def chunk(self, data: bytes, now: float | None = None) -> None:
        """Feed body bytes as received (still content-encoded)."""
        self.chunks((data,), (now,))

    def chunks(self, chunks: Iterable[bytes], times: Iterable[float | None]) -> None:
        """Feed body chunks as received (still content-encoded), each with the time it came."""
        parser = self._parser
        if parser is not None and not self._encoded and self.first_byte_at is None:
            chunks, times = list(chunks), list(times)
            if self._whole_stream(chunks, times):
                return
        for data, now in zip(chunks, times):
            if not data:
                continue
            if self.first_byte_at is None:
                self._received = True
                self.first_byte_at = now or time.time()
            if parser is None:
                self._body.append(data)  # decoded once at the end: cheaper than per chunk
                continue
            if self._undecodable:
                return
            if self._encoded:
                try:
                    data = self._decoder.decode(data)
                except Exception as exc:  # corrupt compressed stream: keep forwarding, note it
                    self._bad_stream(f"cannot decode body: {exc}")
                    return
            if blocks := parser.feed(data):
                self._take(blocks, now)

    def _whole_stream(self, chunks: list[bytes], times: list[float | None]) -> bool:
        """Takes a stream's body at once when it is all of the usual shape (UTF-8,
        LF line ends, each block one `data:` line after an optional `event:`
        line): a few calls over the whole body instead of a parse per chunk,
        each block decoded alone (as the parser does: the narrowest string, and
        no cost for a wide character in one block on all that follow). False,
        having taken nothing, for any other body (the general path, chunk by
        chunk, takes it). The events and the aggregate are the general path's."""
        times = times[: len(chunks)]
        if len(times) < len(chunks) or not all(times) or not chunks:  # (a time of None or 0 is "now")
            return False
        if not all(chunks):  # empty chunks carry no bytes and no time
            kept = [(data, now) for data, now in zip(chunks, times) if data]
            chunks, times = [data for data, _ in kept], [now for _, now in kept]
        body = b"".join(chunks)
        found = usual_blocks(body)
        if found is None:
            return False
        blocks, raws, names, datas = found
        del found, body
        self.first_byte_at = times[0]
        if len(chunks) != len(blocks) or not all(map(_ENDS_BLOCK, chunks)):
            # each block's time is that of the chunk its end came in
            ends = list(accumulate(map(len, chunks)))
            times = [times[bisect_left(ends, end)] for end in accumulate(map(len, blocks))]
        del blocks
        started = self.started_at
        self._received = self._data_seen = True
        # each `round(now - started, 6)`, in one call: formatting to 6 decimals rounds the same way, correctly
        seconds = map(float, ("%.6f " * len(times) % tuple(map(sub, times, repeat(started)))).split())
        events = [{"t": t, "raw": raw} for t, raw in zip(seconds, raws)]
        self._events.extend(events)
        self._parser.started()
        fold_usual_blocks(self._aggregator, names, datas, raws, events)
        return True

    def _take(self, blocks: list[SSEBlock], now: float | None) -> None:
        if not blocks:
            return
        t = round((now or time.time()) - self.started_at, 6)
        events, add = self._events, self._aggregator.add
        for block in blocks:
            text = block.text
            if "\ufffd" in text and text.encode() != block.raw:  # not UTF-8: kept exactly
                events.append({"t": t, "raw": text, "raw_base64": base64.b64encode(block.raw).decode("ascii")})
            else:  # (replay sends the bytes the agent got)
                events.append({"t": t, "raw": text})
            add(block)
        if not self._data_seen:
            self._data_seen = any(block.data is not None for block in blocks)

    def finish(self, now: float | None = None) -> RecordFields:
        """The upstream ended the response normally."""
        if self._parser is not None:
            if not self._undecodable:
                try:
                    self._take(self._parser.feed(self._decoder.flush()), now)
                except Exception as exc:
                    self._bad_stream(f"cannot decode body: {exc}")
            self._take(self._parser.finish(), now)
        elif self._decoder is not None:
            self._finish_body()
        if (broken := self._cut_short()) is not None:
            self.fields["complete"] = False
            self.fields["error"] = {"kind": broken[0], "message": broken[1]}
        return self._close(now)

    def _cut_short(self) -> tuple[str, str] | None:
        """(error kind, message) when a response the upstream ended normally is
        not whole: compressed data without its end, or an event stream without
        a single data event (the agent got these very bytes, and its SDK fails
        on them or sees an empty answer)."""
        if self._encoded and self._received and not self._undecodable and not self._decoder.ended:
            encoding = header(self.fields["response_headers"], "content-encoding")
            return "bad_stream", f"the {encoding} body ended before its compressed data did (truncated)"
        if self._parser is not None and not self._undecodable and not self._data_seen:
            return "bad_stream", "the event stream ended without a data event"
        return None

    def fail(self, kind: str, message: str, now: float | None = None) -> RecordFields:
        """The call ended without a complete response: keep what arrived and why."""
        if self._parser is not None:
            self._take(self._parser.finish(), now)
        elif self._body:
            self._finish_body()
        if kind == "client_disconnected" and self._aggregator is not None and self._aggregator.done:
            # SDKs stop reading at the stream's end marker and close the connection,
            # sometimes before the HTTP body's own end reached the proxy: the agent
            # had the whole answer.
            self.fields["problems"].append("the client closed the connection after the end of the stream")
            return self._close(now)
        self.fields["complete"] = False
        self.fields["error"] = {"kind": kind, "message": message}
        return self._close(now)

    def _finish_body(self) -> None:
        body = b"".join(self._body)
        try:
            body = self._decoder.decode(body) + self._decoder.flush()
        except Exception as exc:
            self.fields["problems"].append(f"cannot decode body: {exc}: recorded undecoded")
        self.fields["response"], self.fields["response_raw"] = parse_json_body(body)
        if self.fields["response_raw"] is not None:
            self.fields["response_raw_base64"] = base64_unless_utf8(body)

    def _bad_stream(self, message: str) -> None:
        self.fields["problems"].append(message)
        self._undecodable = True

    def _close(self, now: float | None) -> RecordFields:
        fields = self.fields
        fields["timings"] = {
            "started_at": self.started_at,
            "response_headers_at": self.response_headers_at,
            "first_byte_at": self.first_byte_at,
            "ended_at": now or time.time(),
        }
        if self._parser is not None or self._events:
            fields["events"] = self._events
            fields["response"] = self._aggregator.result()
            fields["problems"].extend(self._aggregator.problems)
        return fields
