"""The anti-call control API: JSON over HTTP/1.1 (on 127.0.0.1 unless told) for drivers
(the Python client, the `llm-traj anti-call` command, curl).

Served by tornado (which comes with mitmproxy, for mitmweb) on the proxy's
event loop, beside the broker: tornado's TCP server and HTTP/1.1 connections
parse and frame the HTTP, this module decides and routes. It is tornado's
HTTPServer minus its `HTTPServerRequest` per request (and its per-request
timers), which is measurably cheaper on the anti-call round trip, and a
request is refused from its head before its body is read: 431 (head over
64 KiB), 400 (a head tornado cannot parse, a bad Content-Length), 411 (a body
without Content-Length), 413 (body over 64 MiB), 401 (token), 503 (over
1,000 connections), each with the error body of every other refusal and the
connection closed after it. Every request needs `Authorization: Bearer
<token>`; the address and token are in the control file, readable only by its
owner. The routes below are also the source of the OpenAPI description served
at `GET /openapi.json`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters, HTTP1ServerConnection
from tornado.httputil import (
    HTTPHeaders,
    HTTPInputError,
    HTTPMessageDelegate,
    HTTPServerConnectionDelegate,
    RequestStartLine,
    ResponseStartLine,
    parse_request_start_line,
    responses,
)
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpserver import TCPServer

from ..core.session import InvalidSession, validate_session
from .broker import Broker, BrokerError, CallConflict, Delta, Failure, Finish
from .models import (
    DEFAULT_POLL,
    MAX_POLL,
    ApiError,
    CallInfo,
    DeltaPush,
    EndSession,
    ErrorPush,
    Event,
    FinishPush,
    PushResult,
    ResponsePush,
    SessionInfo,
)

MAX_BODY = 64 << 20
MAX_HEAD = 64 << 10
# tornado drops a connection whose head outgrows its limit without an answer:
# its limit is this, ours MAX_HEAD, so a head in between gets a 431.
HEAD_CEILING = 1 << 20
MAX_CONNECTIONS = 1000  # drivers keep one or a few each; past this, a 503
_HEAD_REFUSALS = (400, 401, 431, 503)  # any request may get these, and with a body also:
_BODY_REFUSALS = (411, 413)


class ControlError(Exception):
    """A request the control API refuses: its status, and the message (str) and code of the error body."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


Query = dict[str, str]  # the last value of each query parameter given a value
Reply = tuple[int, Any]  # status and a model, a list of models, a dict, or None (no body)


@dataclass(frozen=True)
class ApiRoute:
    method: str
    template: str
    handler: Callable[..., Reply | Awaitable[Reply]]  # a coroutine function for long polls
    summary: str
    body: type[BaseModel] | None
    returns: type[BaseModel] | None
    many: bool  # returns a list of `returns`
    query: tuple[tuple[str, str, str], ...]  # name, JSON type, description
    errors: tuple[int, ...]
    long_poll: bool

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template) + "$")


ROUTES: list[ApiRoute] = []
_POLL_QUERY = ("timeout", "number", f"seconds to wait (default {DEFAULT_POLL:g}, at most {MAX_POLL:g})")


def route(method: str, template: str, summary: str, *, body=None, returns=None, many=False, query=(), errors=(), long_poll=False):
    def register(handler):
        ROUTES.append(ApiRoute(method, template, handler, summary, body, returns, many, tuple(query), tuple(errors), long_poll))
        return handler

    return register


class ControlServer(HTTPServerConnectionDelegate):
    def __init__(self, broker: Broker, token: str | None = None) -> None:
        self.broker = broker
        self.token = token or secrets.token_urlsafe(32)
        self.port: int | None = None
        self.host = "127.0.0.1"
        self._sock: socket.socket | None = None
        self._listener: _Listener | None = None
        self._connections: set[HTTP1ServerConnection] = set()
        self._routes = [(r, r.pattern) for r in ROUTES]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def bind(self, port: int = 0, host: str = "127.0.0.1") -> None:
        """Listen on `host` (OSError if the port is taken or the address is not
        this machine's); the server answers once `start` ran in the event loop."""
        self.host = host
        self._sock = socket.create_server((host, port))
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]

    async def start(self) -> None:
        self._listener = _Listener(self)
        self._listener.add_sockets([self._sock])

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            for connection in list(self._connections):  # long polls included
                asyncio.ensure_future(connection.close())
        elif self._sock is not None:
            self._sock.close()
        self._listener = self._sock = None

    # --- HTTP (tornado parses and frames it) -----------------------------------------

    def serve(self, stream: IOStream) -> None:
        connection = HTTP1ServerConnection(stream, _CONNECTION)
        self._connections.add(connection)
        connection.start_serving(self)

    def start_request(self, server_conn: object, request_conn: HTTP1Connection) -> _Exchange:
        return _Exchange(self, request_conn)

    def on_close(self, server_conn: object) -> None:
        self._connections.discard(server_conn)

    def refusal(self, headers: HTTPHeaders) -> ControlError | None:
        """Why a request is refused from its head alone (before its body is read), or None."""
        if len(self._connections) > MAX_CONNECTIONS:
            return ControlError(503, f"too many connections to the control API (at most {MAX_CONNECTIONS}); "
                                     "reuse a keep-alive connection", "too_many_connections")  # fmt: skip
        length = headers.get("Content-Length")
        if "Transfer-Encoding" in headers:
            return ControlError(411, "send the body with a Content-Length (no Transfer-Encoding)", "length_required")
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                return ControlError(400, f"bad Content-Length {length!r}", "bad_request")
            if int(length) > MAX_BODY:
                return ControlError(413, f"body larger than {MAX_BODY >> 20} MiB", "body_too_large")
        if not authorized(headers.get("Authorization", ""), self.token):
            return ControlError(401, "missing or wrong token: send Authorization: Bearer <token> (see the control file)",
                                "unauthorized")  # fmt: skip
        return None

    def answer(self, exchange: _Exchange, body: bytes) -> None:
        # Answered within this call, except long polls: a task each, cancelled
        # if the driver hangs up first, so no event is taken for a driver that is gone.
        try:
            reply = self._dispatch(exchange.method, exchange.path, exchange.query, body)
            if not isinstance(reply, tuple):
                poll = asyncio.ensure_future(self._long_poll(exchange, reply))
                exchange.conn.set_close_callback(poll.cancel)
                return
        except (ControlError, BrokerError) as exc:
            reply = exc.status, _error(str(exc), exc.code)
        exchange.write(*reply)

    async def _long_poll(self, exchange: _Exchange, work: Awaitable[Reply]) -> None:
        try:
            reply = await work
        except asyncio.CancelledError:
            return
        except (ControlError, BrokerError) as exc:
            reply = exc.status, _error(str(exc), exc.code)
        exchange.conn.set_close_callback(None)
        exchange.write(*reply)

    def _dispatch(self, method: str, path: str, query: Query, body: bytes) -> Reply | Awaitable[Reply]:
        allowed = []
        for r, pattern in self._routes:
            m = pattern.match(path)
            if m is None:
                continue
            if r.method != method:
                allowed.append(r.method)
                continue
            params = {k: unquote(v) for k, v in m.groupdict().items()}
            if r.body is not None:
                return r.handler(self, query, _parse_body(r.body, body), **params)
            return r.handler(self, query, **params)
        if allowed:
            return 405, _error(f"{method} is not allowed here; use {', '.join(allowed)}", "method_not_allowed")
        return 404, _error(f"no route {method} {path}; see GET /openapi.json", "not_found")

    # --- routes ------------------------------------------------------------------

    @route("GET", "/openapi.json", "This description (OpenAPI 3.1).")
    def openapi(self, query: Query) -> Reply:
        return 200, openapi_description()

    @route(
        "GET", "/v1/requests/next",
        "Long-poll for the next event: a new held call (type request), a call released before it was answered "
        "(cancelled), or the end of a session (session_end). 204 when nothing came in time.",
        returns=Event, long_poll=True,
        query=[("session", "string", "only this session (default: any)"), _POLL_QUERY],
    )  # fmt: skip
    async def next_request(self, query: Query) -> Reply:
        session = query.get("session") or None
        if session is not None:
            _session_id(session)
        return _event(await self.broker.next_event(session, _poll_timeout(query)))

    @route(
        "GET", "/v1/sessions/{session}/calls/{index}",
        "Long-poll for call `index` (from 1) of a session, ROCK style: the call once the agent made it, or "
        "session_end if the session ends first. 204 when nothing came in time; 410 if the call is already over.",
        returns=Event, long_poll=True, query=[_POLL_QUERY], errors=[410],
    )  # fmt: skip
    async def wait_call(self, query: Query, session: str, index: str) -> Reply:
        _session_id(session)
        if not index.isdigit() or int(index) < 1:
            raise ControlError(400, f"call index {index!r} is not a number >= 1", "bad_index")
        return _event(await self.broker.wait_call(session, int(index), _poll_timeout(query)))

    @route("GET", "/v1/calls", "The held calls (without their request bodies).", returns=CallInfo, many=True,
           query=[("session", "string", "only this session")])  # fmt: skip
    def calls(self, query: Query) -> Reply:
        return 200, self.broker.held(query.get("session") or None)

    @route("GET", "/v1/calls/{id}", "A held call with the agent's request.", returns=Event, errors=[404, 409, 410])
    def call(self, query: Query, id: str) -> Reply:
        return 200, self.broker.call(id).event()

    @route(
        "POST", "/v1/calls/{id}/response",
        "Answer a call: a full response object, or text (and tool calls) to make one from. Pushing again to an "
        "answered call is ignored (duplicate: true).",
        body=ResponsePush, returns=PushResult, errors=[400, 404, 409, 410],
    )  # fmt: skip
    def respond(self, query: Query, push: ResponsePush, id: str) -> Reply:
        try:
            call = self.broker.call(id)
        except CallConflict:
            return 200, PushResult(id=id, duplicate=True)
        response = push.response
        if response is None:
            try:
                response = call.api.completion_from_text(
                    call.request, push.text, tool_calls=push.tool_calls, finish_reason=push.finish_reason, usage=push.usage
                )
            except ValueError as exc:
                raise ControlError(400, str(exc), "bad_push") from None
        return 200, PushResult(id=id, duplicate=not self.broker.respond(id, response, push.extra))

    @route("POST", "/v1/calls/{id}/delta", "Stream one delta to the agent (the call becomes streaming).",
           body=DeltaPush, returns=PushResult, errors=[400, 404, 409, 410])  # fmt: skip
    def delta(self, query: Query, push: DeltaPush, id: str) -> Reply:
        self.broker.delta(id, Delta(push.as_delta(), push.index, push.finish_reason, push.logprobs), push.extra)
        return 200, PushResult(id=id)

    @route("POST", "/v1/calls/{id}/finish", "End a streamed answer. Again on a finished call: ignored (duplicate: true).",
           body=FinishPush, returns=PushResult, errors=[400, 404, 410])  # fmt: skip
    def finish(self, query: Query, push: FinishPush, id: str) -> Reply:
        duplicate = not self.broker.finish(id, Finish(push.finish_reason, push.usage), push.extra)
        return 200, PushResult(id=id, duplicate=duplicate)

    @route("POST", "/v1/calls/{id}/error",
           "Answer a call with an error: that status and an error body in the API's shape (mid-stream: an error "
           "event). Again on an answered call: ignored (duplicate: true).",
           body=ErrorPush, returns=PushResult, errors=[400, 404, 410])  # fmt: skip
    def error(self, query: Query, push: ErrorPush, id: str) -> Reply:
        failure = Failure(push.status, push.message, push.type, push.code)
        return 200, PushResult(id=id, duplicate=not self.broker.fail(id, failure, push.extra))

    @route("GET", "/v1/sessions", "Every session seen since the proxy started.", returns=SessionInfo, many=True)
    def sessions(self, query: Query) -> Reply:
        return 200, self.broker.sessions()

    @route(
        "POST", "/v1/sessions/{session}/end",
        "End a session (the agent exited): its held calls get a 410, drivers get session_end, its later calls "
        "are refused. Idempotent.",
        body=EndSession, returns=SessionInfo, errors=[400],
    )  # fmt: skip
    def end_session(self, query: Query, push: EndSession, session: str) -> Reply:
        return 200, self.broker.end_session(_session_id(session), push.reason)



# --- HTTP -------------------------------------------------------------------------

# No timers: an idle keep-alive connection stays (a driver's, between polls;
# MAX_CONNECTIONS bounds them), and a per-request timer costs the round trip.
_CONNECTION = HTTP1ConnectionParameters(max_header_size=HEAD_CEILING, max_body_size=MAX_BODY)
_LINGER = 2.0  # seconds a refused request's body is read and dropped, so the client reads the refusal
_PLACEHOLDER_HEAD = ("GET / HTTP/1.1", HTTPHeaders())  # for a head refused before tornado could read it


class _Listener(TCPServer):
    """Accepts connections and serves each with tornado's HTTP/1.1 connection,
    the control server deciding every request."""

    def __init__(self, server: ControlServer) -> None:
        super().__init__()
        self._server = server

    def handle_stream(self, stream: IOStream, address: Any) -> None:
        self._server.serve(stream)


class _Exchange(HTTPMessageDelegate):
    """One request and its answer, fed by tornado's connection as it reads."""


    def __init__(self, server: ControlServer, conn: HTTP1Connection) -> None:
        self.server, self.conn = server, conn
        self.chunks: list[bytes] = []
        self.refused: ControlError | None = None
        # tornado answers a head it cannot parse with a bare 400 of its own (and
        # drops one over its limit unanswered): its parser is wrapped, so that
        # such a head is refused here, in the error shape of every other refusal.
        self._parse_head = conn._parse_headers
        conn._parse_headers = self._checked_head

    def _checked_head(self, data: bytes) -> tuple[str, HTTPHeaders]:
        if len(data) > MAX_HEAD:
            self.refused = ControlError(431, f"request head larger than {MAX_HEAD >> 10} KiB", "head_too_large")
            return _PLACEHOLDER_HEAD
        try:
            start_line, headers = self._parse_head(data)
            parse_request_start_line(start_line)
        except HTTPInputError as exc:
            self.refused = ControlError(400, f"malformed request head: {exc}", "bad_request")
            return _PLACEHOLDER_HEAD
        return start_line, headers

    def headers_received(self, start_line: RequestStartLine, headers: HTTPHeaders) -> Awaitable[None] | None:
        refused = self.refused or self.server.refusal(headers)
        if refused is not None:
            return self._refuse(refused)
        self.method = start_line.method
        self.path, _, query = start_line.path.partition("?")
        self.query = dict(parse_qsl(query)) if query else {}
        return None

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def finish(self) -> None:
        chunks = self.chunks
        self.server.answer(self, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def write(self, status: int, payload: Any) -> None:
        body = b"" if payload is None or self.method == "HEAD" else _encode(payload)
        headers = HTTPHeaders()
        if status != 204:
            headers["Content-Length"] = str(len(body))
        if body:
            headers["Content-Type"] = "application/json"
        self.conn.write_headers(ResponseStartLine("HTTP/1.1", status, responses.get(status, "Unknown")), headers, body)
        self.conn.finish()

    async def _refuse(self, error: ControlError) -> None:
        """Answer from the head and close, the body unread: the stream is taken
        from tornado (which would read the body, or answer a bad framing itself).
        What the client still sends is read and dropped for a while before the
        close, so that the close does not reset the connection under the answer."""
        body = _encode(_error(str(error), error.code))
        head = [f"HTTP/1.1 {error.status} {responses.get(error.status, 'Unknown')}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Connection: close"]  # fmt: skip
        if error.status == 401:
            head.append("WWW-Authenticate: Bearer")
        elif error.status == 503:
            head.append("Retry-After: 1")
        stream = self.conn.detach()
        try:
            await stream.write("\r\n".join(head).encode() + b"\r\n\r\n" + body)
            stream.socket.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(_LINGER):
                while True:
                    await stream.read_bytes(1 << 16, partial=True)
        except (StreamClosedError, OSError, TimeoutError):
            pass
        finally:
            stream.close()


# --- helpers -----------------------------------------------------------------------


def authorized(header: str, token: str) -> bool:
    """Whether an Authorization header is `Bearer <token>` (compared in constant time)."""
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def _parse_body(model: type[BaseModel], body: bytes) -> BaseModel:
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ControlError(400, f"{where}: {first['msg']}", "bad_push") from None


def _session_id(session: str) -> str:
    try:
        return validate_session(session)
    except InvalidSession as exc:
        raise ControlError(400, str(exc), "invalid_session") from None


def _poll_timeout(query: Query) -> float:
    raw = query.get("timeout", str(DEFAULT_POLL))
    try:
        timeout = float(raw)
    except ValueError:
        raise ControlError(400, f"timeout={raw!r} is not a number of seconds", "bad_timeout") from None
    if not 0 <= timeout <= MAX_POLL:
        raise ControlError(400, f"timeout must be between 0 and {MAX_POLL:g} seconds", "bad_timeout")
    return timeout


def _event(event: Event | None) -> Reply:
    return (204, None) if event is None else (200, event)


def _error(message: str, code: str) -> ApiError:
    return ApiError.model_validate({"error": {"message": message, "type": "control_error", "code": code}})


def _encode(payload: Any) -> bytes:
    if isinstance(payload, BaseModel):
        return payload.model_dump_json(exclude_none=True).encode()
    if isinstance(payload, list):
        return b"[" + b",".join(_encode(item) for item in payload) + b"]"
    return json.dumps(payload).encode()


def openapi_description() -> dict[str, Any]:
    models = [Event, CallInfo, ResponsePush, DeltaPush, FinishPush, ErrorPush, PushResult, EndSession, SessionInfo, ApiError]
    _, schemas = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    errors = {"description": "an error", "content": {"application/json": {"schema": ref(ApiError)}}}
    paths: dict[str, Any] = {}
    for r in ROUTES:
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in re.findall(r"\{(\w+)\}", r.template)]  # fmt: skip
        params += [{"name": n, "in": "query", "schema": {"type": t}, "description": d} for n, t, d in r.query]
        schema = {"type": "array", "items": ref(r.returns)} if r.many else ref(r.returns) if r.returns else {"type": "object"}
        responses: dict[str, Any] = {"200": {"description": "OK", "content": {"application/json": {"schema": schema}}}}
        if r.long_poll:
            responses["204"] = {"description": "nothing came before the timeout"}
        for status in sorted({*r.errors, *_HEAD_REFUSALS, *(_BODY_REFUSALS if r.body is not None else ())}):
            responses[str(status)] = errors
        operation: dict[str, Any] = {"summary": r.summary, "operationId": r.handler.__name__, "responses": responses}
        if params:
            operation["parameters"] = params
        if r.body is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(r.body)}}}
        paths.setdefault(r.template, {})[r.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "llm-traj anti-call control API", "version": "1"},
        "components": {"schemas": schemas["$defs"], "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
        "security": [{"token": []}],
        "paths": paths,
    }


