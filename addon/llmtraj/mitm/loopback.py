"""Lets the addon answer a call with a response it produces itself, streamed.

A response built in a hook with `Response.make` goes out in one piece, so a
replayed stream or a driver's deltas could not be paced. Instead the flow is
pointed at this small HTTP/1.1 server on 127.0.0.1, which runs in mitmproxy's
own event loop and writes the produced response chunk by chunk; mitmproxy then
streams it to the agent like any upstream response (and hooks such as the
recorder's tee see it like one).

    loopback.serve(flow, produce)   # in a `request` hook; `produce` is awaited
                                    # only when mitmproxy connects to us
    loopback.at_stop(callback)      # when the proxy stops: make waiting producers answer

When the proxy stops, the answers being produced get a moment (`DRAIN_SECONDS`)
to reach their agents, before the addons after this one (the recorder) close.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from mitmproxy import http

logger = logging.getLogger("llm_traj")

PATH_PREFIX = "/__llm_traj__/"
DRAIN_SECONDS = 2.0
ORIGINAL_URL_KEY = "llm_traj_original_url"  # flow.metadata: where the agent meant to go


@dataclass
class ProducedResponse:
    status: int
    headers: list[tuple[str, str]]
    # Either the whole body, or chunks to write as they come (chunked encoding).
    body: bytes | AsyncIterator[bytes] = b""
    # Called once the response is fully written (True) or the peer went away (False).
    on_done: Callable[[bool], None] | None = field(default=None, repr=False)


Producer = Callable[[], Awaitable[ProducedResponse]]


class Loopback:
    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._sock: socket.socket | None = None
        self._task: asyncio.Future | None = None
        self._producers: dict[str, Producer] = {}
        self._stop_callbacks: list[Callable[[], None]] = []
        self._serving: set[str] = set()  # ids of the flows served and not finished yet
        self._writers: set[asyncio.StreamWriter] = set()
        self.port: int | None = None

    def running(self) -> None:
        # Bound synchronously so the port is known at once (script addons cannot
        # have async `running` hooks); connections queue in the backlog until the
        # accept loop starts a moment later.
        if self._sock is None:
            self._sock = socket.create_server(("127.0.0.1", 0))
            self.port = self._sock.getsockname()[1]
            self._task = asyncio.ensure_future(self._serve(self._sock))

    async def _serve(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._handle, sock=sock)

    def at_stop(self, callback: Callable[[], None]) -> None:
        """Have `callback` called when the proxy stops (before the drain)."""
        self._stop_callbacks.append(callback)

    def done(self) -> asyncio.Future | None:
        for callback in self._stop_callbacks:
            callback()
        if self._task is not None:
            self._task.cancel()  # stopped before the accept loop started: it must not take the closed socket
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            self._sock.close()
        self._server = self._sock = self._task = None
        self._producers.clear()
        # mitmproxy awaits an awaitable a hook returns (a script reload calls
        # this synchronously: then the drain goes on in the background).
        if self._serving:
            return asyncio.ensure_future(self._drain())
        self._close_connections()
        return None

    async def _drain(self) -> None:
        deadline = asyncio.get_running_loop().time() + DRAIN_SECONDS
        while self._serving and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        self._close_connections()

    def _close_connections(self) -> None:
        for writer in list(self._writers):
            writer.close()

    def response(self, flow: http.HTTPFlow) -> None:
        self._serving.discard(flow.id)

    def error(self, flow: http.HTTPFlow) -> None:
        self.forget(flow)
        self._serving.discard(flow.id)

    def serve(self, flow: http.HTTPFlow, produce: Producer) -> None:
        """Point `flow` at the loopback server, which will answer with `produce()`."""
        assert self.port is not None, "loopback server not started"
        token = secrets.token_urlsafe(12)
        self._producers[token] = produce
        self._serving.add(flow.id)
        flow.metadata[ORIGINAL_URL_KEY] = flow.request.url
        request = flow.request
        request.scheme, request.host, request.port = "http", "127.0.0.1", self.port
        request.path = PATH_PREFIX + token
        request.headers["host"] = f"127.0.0.1:{self.port}"

    def forget(self, flow: http.HTTPFlow) -> None:
        """Drop the producer of a flow that ended before mitmproxy connected to us."""
        path = flow.request.path
        if path.startswith(PATH_PREFIX):
            self._producers.pop(path[len(PATH_PREFIX) :], None)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio disables Nagle only for sockets made with proto=IPPROTO_TCP, not
        # for those of socket.create_server: without this, a body written after
        # its head waits for the delayed ACK (40 ms).
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writers.add(writer)
        try:
            while True:  # keep-alive: mitmproxy reuses the connection
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, _, rest = head.partition(b"\r\n")
                path = request_line.split(b" ")[1].decode("latin-1")
                length = _content_length(rest)
                if length:
                    await reader.readexactly(length)
                produce = self._producers.pop(path[len(PATH_PREFIX) :], None) if path.startswith(PATH_PREFIX) else None
                if produce is None:
                    await _write_response(writer, _gone())
                    continue
                await _write_response(writer, await produce())
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _gone() -> ProducedResponse:
    body = b'{"error": {"message": "llm-traj: this call was already answered or abandoned", "type": "proxy_error", "param": null, "code": "gone"}}'
    return ProducedResponse(410, [("content-type", "application/json")], body)


async def _write_response(writer: asyncio.StreamWriter, response: ProducedResponse) -> None:
    reason = HTTPStatus(response.status).phrase if response.status in HTTPStatus._value2member_map_ else ""
    headers = [(k, v) for k, v in response.headers if k.lower() not in ("content-length", "transfer-encoding", "connection")]
    streamed = not isinstance(response.body, bytes)
    headers.append(("transfer-encoding", "chunked") if streamed else ("content-length", str(len(response.body))))
    head = f"HTTP/1.1 {response.status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    completed = False
    try:
        writer.write(head.encode("latin-1"))
        if not streamed:
            writer.write(response.body)
        else:
            async for chunk in response.body:
                if chunk:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        completed = True
    finally:
        if streamed and hasattr(response.body, "aclose"):
            await response.body.aclose()
        if response.on_done is not None:
            response.on_done(completed)
