"""The record writer's side of a bridged call: the record's `bridge` field
(the translated request and the upstream's final object), its `tokens` (from
the upstream's bytes) and what the call's outcome was upstream."""

from __future__ import annotations

from typing import Any

from ..apis import API_BY_NAME
from ..core.redact import redact_fields
from ..core.sse import SSEParser
from ..recording.builder import RecordFields, parse_json_body
from ..tokens.recording import tokens_of


def _upstream_final(note: dict[str, Any], stream: bool) -> tuple[Any, list[float], list[str]]:
    """(the upstream's final object, when each of its SSE blocks came (seconds
    from its first byte), problems)."""
    chunks = note["chunks"]
    if not stream:
        parsed, raw = parse_json_body(b"".join(chunks))
        return (parsed if raw is None else raw), [], []
    parser, aggregator = SSEParser(), API_BY_NAME["chat.completions"].new_aggregator()
    times: list[float] = []
    start = note["first_byte_at"] or 0.0
    for chunk, at in zip(chunks, note["chunk_times"], strict=True):
        for block in parser.feed(chunk):
            times.append(round(at - start, 6))
            aggregator.add(block)
    for block in parser.finish():
        times.append(round((note["ended_at"] or start) - start, 6))
        aggregator.add(block)
    return aggregator.result(), times, aggregator.problems


def add_bridge(fields: RecordFields, note: dict[str, Any], secrets: set[str]) -> None:
    """Fills a bridged call's record in: `bridge`, `tokens`, `capture`, and the
    call's outcome when the upstream failed (the agent then got the proxy's
    error in its shape: a call the upstream never answered is recorded without
    a response, as one mitmproxy could not forward)."""
    stream = note["stream"] and note["status"] is not None and note["status"] < 400
    final, times, problems = _upstream_final(note, stream) if note["status"] is not None else (None, [], [])
    request, _ = parse_json_body(note["request"])
    fields["bridge"] = {
        "upstream_api": note["upstream_api"], "url": note["url"], "request": redact_fields(request, secrets),
        "status": note["status"], "stream": stream, "response": final, "events": len(times),
        "event_times": times, "first_byte_at": note["first_byte_at"], "ended_at": note["ended_at"], "problems": problems,
    }  # fmt: skip
    capture = note["capture"]
    fields["tokens"] = tokens_of(API_BY_NAME["chat.completions"], final, fields["extra"], capture["engine"] if capture else None)
    fields["capture"] = capture
    error = note["error"]
    if error is None or fields["error"] is not None:
        return
    kind, message = error
    fields["complete"] = False
    fields["error"] = {"kind": kind, "message": message}
    if note["status"] is None:
        fields.update(status=None, response_headers=[], response=None, response_raw=None, events=None, stream=False)
