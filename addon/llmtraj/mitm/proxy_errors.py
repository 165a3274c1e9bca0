"""Errors mitmproxy itself sends to the agent (upstream unreachable, upstream
hung up or timed out before answering, ...) as JSON instead of an HTML page, so
SDKs show a useful message: an LLM call's in its API's error shape with the
status llm-traj's own client would give for the same failure (502 unreachable
or disconnected, 504 timed out: `core.record.NO_RESPONSE_STATUS`), the same
over HTTP/1 and HTTP/2; anything else, over HTTP/1, in OpenAI's shape with
mitmproxy's status (over HTTP/2 it keeps mitmproxy's page).

mitmproxy 11 and 12 have no hook for this; the error hook runs before the
agent is answered, and what it leaves for the call is sent instead of
mitmproxy's page. The mitmproxy internals this patches while it is loaded
(`mitmproxy.proxy.layers.http`):
- `_http1.make_error_response(status, message)`, the HTTP/1 error page, is
  swapped; which call the error is for is not among its arguments, so
- `_http1.Http1Server.send` is wrapped to say which request (its `.request`)
  it is answering;
- `_http2.Http2Server._handle_event` is wrapped: a `ResponseProtocolError`
  for a stream still open for it (`is_open_for_us`) whose call has an answer
  is sent as that response's `ResponseHeaders`, `ResponseData` and
  `ResponseEndOfMessage` instead. The stream's call is found through the
  connection's `HttpLayer` (in its `context.layers`):
  `HttpLayer.streams[stream_id].flow`. A hook pauses only its own stream, so
  the error hooks of concurrent streams on one connection may interleave
  with their answers: each answer is kept by its call, not its connection.
What cannot be patched or found (another mitmproxy) is left alone, with a
warning: the agent then gets mitmproxy's own page.
"""

from __future__ import annotations

import json
import logging
import weakref

from mitmproxy import http
from mitmproxy.net.http import http1

from ..apis import no_response_answer
from ..core.record import NO_RESPONSE_STATUS
from .recording import flow_failure
from .routing import llm_call

try:
    from mitmproxy.proxy.layers.http import (
        HttpLayer,
        ResponseData,
        ResponseEndOfMessage,
        ResponseHeaders,
        ResponseProtocolError,
        _http1,
        _http2,
    )
except ImportError:  # another mitmproxy: its own error pages stay
    _http1 = _http2 = None

logger = logging.getLogger("llm_traj")

# The error each failed LLM call gets, by its request, until mitmproxy sends it.
_answers: weakref.WeakKeyDictionary[http.Request, http.Response] = weakref.WeakKeyDictionary()
_answering: http.Request | None = None  # the request of the error being made, while `Http1Server.send` makes it


def json_response(status_code: int, body: object) -> http.Response:
    return http.Response.make(status_code, json.dumps(body), {"content-type": "application/json"})


def http1_error_bytes(response: http.Response) -> bytes:
    response.headers["connection"] = "close"  # mitmproxy closes the connection after an error
    return http1.assemble_response(response)


def openai_error_response(status_code: int, message: str = "") -> bytes:
    if _answering is not None and (answer := _answers.pop(_answering, None)) is not None:
        return http1_error_bytes(answer)
    error = {
        "message": f"llm-traj proxy: {message}" if message else "llm-traj proxy error",
        "type": "proxy_error",
        "param": None,
        "code": f"proxy_{status_code}",
    }
    return http1_error_bytes(json_response(status_code, {"error": error}))


def _saying_which_request(send):
    # Not a generator itself: every other event (each body chunk) gets the
    # original `send`'s generator, with no layer of delegation added.
    def answering_send(self, event):
        if not isinstance(event, ResponseProtocolError):
            return send(self, event)
        return _answering_error(send, self, event)

    return answering_send


def _answering_error(send, server, event):
    global _answering
    _answering = server.request
    try:
        return (yield from send(server, event))
    finally:
        _answering = None


def _answering_streams(handle_event):
    # As `_saying_which_request`: every other event goes straight to the original.
    def answering_handle_event(self, event):
        if isinstance(event, ResponseProtocolError) and (answer := _stream_answer(self, event.stream_id)) is not None:
            return _sending(handle_event, self, event.stream_id, answer)
        return handle_event(self, event)

    return answering_handle_event


def _stream_answer(server, stream_id: int) -> http.Response | None:
    """The answer left for the call of an HTTP/2 stream the agent still reads,
    if any (None, and so mitmproxy's page, if its layers are not as known)."""
    try:
        if not server.is_open_for_us(stream_id):
            return None
        layer = next(layer for layer in reversed(server.context.layers) if isinstance(layer, HttpLayer))
        request = layer.streams[stream_id].flow.request
    except (AttributeError, KeyError, StopIteration):
        return None
    return _answers.pop(request, None)


def _sending(handle_event, server, stream_id: int, answer: http.Response):
    yield from handle_event(server, ResponseHeaders(stream_id, answer))
    yield from handle_event(server, ResponseData(stream_id, answer.raw_content or b""))
    yield from handle_event(server, ResponseEndOfMessage(stream_id))


def _patch_points() -> list[tuple[object, str, object]]:
    """(owner, attribute, its replacement given the original) of each patch."""
    if _http1 is None:
        return []
    return [
        (_http1, "make_error_response", lambda _: openai_error_response),
        (_http1.Http1Server, "send", _saying_which_request),
        (_http2.Http2Server, "_handle_event", _answering_streams),
    ]


class OpenAIShapedProxyErrors:
    def __init__(self) -> None:
        self._originals: list[tuple[object, str, object]] | None = None

    def load(self, loader) -> None:
        if self._originals is not None:
            return
        self._originals = []
        points = _patch_points()
        for owner, name, replacement in points:
            if (original := getattr(owner, name, None)) is None:
                logger.warning(f"llm-traj: this mitmproxy has no {owner.__name__}.{name}: "
                               "some agents get its error pages")  # fmt: skip
                continue
            setattr(owner, name, replacement(original))
            self._originals.append((owner, name, original))
        if not points:
            logger.warning("llm-traj: this mitmproxy's HTTP layers are not as known: agents get its error pages")

    def error(self, flow: http.HTTPFlow) -> None:
        """A call whose upstream failed before answering gets its API's error (the
        error hook runs before mitmproxy answers the agent)."""
        call = llm_call(flow)
        if call is None or flow.response is not None:
            return
        kind, message = flow_failure(flow)
        if kind in NO_RESPONSE_STATUS:
            _answers[flow.request] = json_response(*no_response_answer(call.api, kind, message))

    def done(self) -> None:
        for owner, name, original in self._originals or ():
            setattr(owner, name, original)
        self._originals = None
