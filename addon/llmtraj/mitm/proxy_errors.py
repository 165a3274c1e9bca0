"""Errors mitmproxy itself sends to the agent (upstream unreachable, upstream
hung up or timed out before answering, ...) as JSON instead of an HTML page, so
SDKs show a useful message: an LLM call's in its API's error shape with the
status llm-traj's own client would give for the same failure (502 unreachable
or disconnected, 504 timed out: `core.record.NO_RESPONSE_STATUS`), anything
else in OpenAI's shape with mitmproxy's status.

mitmproxy 11 has no hook for this: its HTTP/1 layer calls the module function
`make_error_response(status, message)`, which this addon swaps while it is
loaded. Which call the error is for is not among its arguments, so the HTTP/1
server's `send` is wrapped to say which request it is answering. (HTTP/2
clients still get mitmproxy's HTML body and status.)
"""

from __future__ import annotations

import json
import weakref

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import ResponseProtocolError, _http1

from ..apis import no_response_answer
from ..core.record import NO_RESPONSE_STATUS
from .recording import flow_failure
from .routing import llm_call

# The error each failed LLM call gets, by its request, until mitmproxy sends it.
_answers: weakref.WeakKeyDictionary[http.Request, bytes] = weakref.WeakKeyDictionary()
_answering: http.Request | None = None  # the request of the error being made, while `Http1Server.send` makes it


def json_error_response(status_code: int, body: object) -> bytes:
    response = http.Response.make(status_code, json.dumps(body), {"content-type": "application/json", "connection": "close"})
    return http1.assemble_response(response)


def openai_error_response(status_code: int, message: str = "") -> bytes:
    if _answering is not None and (answer := _answers.pop(_answering, None)) is not None:
        return answer
    error = {
        "message": f"llm-traj proxy: {message}" if message else "llm-traj proxy error",
        "type": "proxy_error",
        "param": None,
        "code": f"proxy_{status_code}",
    }
    return json_error_response(status_code, {"error": error})


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


class OpenAIShapedProxyErrors:
    def __init__(self) -> None:
        self._original = None

    def load(self, loader) -> None:
        if self._original is None:
            self._original = _http1.make_error_response, _http1.Http1Server.send
            _http1.make_error_response = openai_error_response
            _http1.Http1Server.send = _saying_which_request(_http1.Http1Server.send)

    def error(self, flow: http.HTTPFlow) -> None:
        """A call whose upstream failed before answering gets its API's error (the
        error hook runs before mitmproxy answers the agent)."""
        call = llm_call(flow)
        if call is None or flow.response is not None:
            return
        kind, message = flow_failure(flow)
        if kind in NO_RESPONSE_STATUS:
            _answers[flow.request] = json_error_response(*no_response_answer(call.api, kind, message))

    def done(self) -> None:
        if self._original is not None:
            _http1.make_error_response, _http1.Http1Server.send = self._original
            self._original = None
