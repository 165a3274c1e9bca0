"""Errors mitmproxy itself sends to the agent (upstream unreachable, upstream
hung up before answering, ...) in the OpenAI error shape instead of an HTML page,
so SDKs show a useful message. The status stays mitmproxy's (502 and so on).

mitmproxy 11 has no hook for this: its HTTP/1 layer calls the module function
`make_error_response`, which this addon swaps while it is loaded. (HTTP/2 clients
still get mitmproxy's HTML body; the status is the same.)
"""

from __future__ import annotations

import json

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1


def openai_error_response(status_code: int, message: str = "") -> bytes:
    error = {
        "message": f"llm-traj proxy: {message}" if message else "llm-traj proxy error",
        "type": "proxy_error",
        "param": None,
        "code": f"proxy_{status_code}",
    }
    response = http.Response.make(
        status_code,
        json.dumps({"error": error}),
        {"content-type": "application/json", "connection": "close"},
    )
    return http1.assemble_response(response)


class OpenAIShapedProxyErrors:
    def __init__(self) -> None:
        self._original = None

    def load(self, loader) -> None:
        if self._original is None:
            self._original = _http1.make_error_response
            _http1.make_error_response = openai_error_response

    def done(self) -> None:
        if self._original is not None:
            _http1.make_error_response = self._original
            self._original = None
