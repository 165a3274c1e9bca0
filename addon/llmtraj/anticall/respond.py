"""Turns what drivers push for a held call into the HTTP answer the agent
gets, in the call's API shape: JSON for an agent that did not ask for a
stream, SSE for one that did (each delta as it is pushed, or the chunks of a
full response), and errors with their status."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..apis import ApiShape
from ..apis.base import StreamBuilder
from .broker import Broker, Call, Delta, Failure, Final, Finish, Piece

JSON_HEADERS = [("content-type", "application/json")]
SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes | AsyncIterator[bytes]


def error_answer(api: ApiShape, failure: Failure) -> Answer:
    body = api.error_body(failure.message, failure.type, failure.code)
    return Answer(failure.status, JSON_HEADERS, _json(body))


async def answer(broker: Broker, call: Call) -> Answer:
    """Waits for the first piece a driver pushes, then answers with it."""
    api = call.api
    piece = await broker.next_piece(call)
    if isinstance(piece, Failure):
        return error_answer(api, piece)
    if isinstance(piece, Final):
        if not call.stream:
            return Answer(200, JSON_HEADERS, _json(piece.response))
        try:
            return Answer(200, SSE_HEADERS, b"".join(api.chunks_from_final(piece.response)))
        except (AttributeError, TypeError, ValueError) as exc:  # not shaped like the API's response
            return error_answer(api, Failure(502, f"llm-traj: the driver's response cannot be streamed: {exc}", "proxy_error", "bad_driver_response"))
    stream = call.builder or api.new_stream(call.request)  # made by the deltas pushed, if any
    if call.stream:
        return Answer(200, SSE_HEADERS, _events(broker, call, stream, piece))
    while True:  # deltas for an agent that wants JSON: gather them
        if isinstance(piece, Failure):
            return error_answer(api, piece)
        if _encode(api, stream, piece)[1]:
            return Answer(200, JSON_HEADERS, _json(stream.completion()))
        piece = await broker.next_piece(call)


async def _events(broker: Broker, call: Call, stream: StreamBuilder, piece: Piece) -> AsyncIterator[bytes]:
    while True:
        data, last = _encode(call.api, stream, piece)
        yield data
        if last:
            return
        piece = await broker.next_piece(call)


def _encode(api: ApiShape, stream: StreamBuilder, piece: Piece) -> tuple[bytes, bool]:
    """The stream bytes of a piece after the first, and whether it ends the
    stream (the broker refuses a full response once deltas were pushed)."""
    if isinstance(piece, Delta):
        return piece.data, False  # made when it was pushed
    if isinstance(piece, Finish):
        return stream.finish(finish_reason=piece.finish_reason, usage=piece.usage), True
    assert isinstance(piece, Failure)  # the headers are out: an error event, which the SDKs raise
    return stream.error(api.error_body(piece.message, piece.type, piece.code)), True


def _json(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()
