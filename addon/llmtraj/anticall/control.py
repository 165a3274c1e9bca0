"""The anti-call control API: JSON over HTTP/1.1 on 127.0.0.1 for drivers
(the Python client, the `llm-traj anti-call` command, curl).

A tornado application (tornado comes with mitmproxy, for mitmweb) on the
proxy's event loop, beside the broker. Every request needs
`Authorization: Bearer <token>`; the address and token are in the control
file, readable only by its owner. The routes below are also the source of the
OpenAPI description served at `GET /openapi.json`.
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

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from tornado.httpserver import HTTPServer
from tornado.httputil import responses
from tornado.web import Application, HTTPError, RequestHandler

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


class ControlError(HTTPError):
    """A request the control API refuses: its status, and the message and code of the error body."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(status)  # no log_message: tornado logs nothing for it
        self.message, self.code = message, code


Query = dict[str, str]  # the last value of each query parameter given a value
Reply = tuple[int, Any]  # status and a model, a list of models, a dict, or None (no body)


@dataclass(frozen=True)
class ApiRoute:
    method: str
    template: str
    handler: Callable[..., Awaitable[Reply]]
    summary: str
    body: type[BaseModel] | None
    returns: type[BaseModel] | None
    many: bool  # returns a list of `returns`
    query: tuple[tuple[str, str, str], ...]  # name, JSON type, description
    errors: tuple[int, ...]
    long_poll: bool


ROUTES: list[ApiRoute] = []
_POLL_QUERY = ("timeout", "number", f"seconds to wait (default {DEFAULT_POLL:g}, at most {MAX_POLL:g})")


def route(method: str, template: str, summary: str, *, body=None, returns=None, many=False, query=(), errors=(), long_poll=False):
    def register(handler):
        ROUTES.append(ApiRoute(method, template, handler, summary, body, returns, many, tuple(query), tuple(errors), long_poll))
        return handler

    return register


class ControlServer:
    def __init__(self, broker: Broker, token: str | None = None) -> None:
        self.broker = broker
        self.token = token or secrets.token_urlsafe(32)
        self.port: int | None = None
        self._sock: socket.socket | None = None
        self._server: HTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bind(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (OSError if the port is taken); the server
        answers once `start` ran in the event loop."""
        self._sock = socket.create_server(("127.0.0.1", port))
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]

    async def start(self) -> None:
        self._server = HTTPServer(_application(self), max_body_size=MAX_BODY, max_header_size=MAX_HEAD)
        self._server.add_sockets([self._sock])

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            asyncio.ensure_future(self._server.close_all_connections())  # long polls included
        elif self._sock is not None:
            self._sock.close()
        self._server = self._sock = None

    # --- routes ------------------------------------------------------------------

    @route("GET", "/openapi.json", "This description (OpenAPI 3.1).")
    async def openapi(self, query: Query) -> Reply:
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
    async def calls(self, query: Query) -> Reply:
        return 200, self.broker.held(query.get("session") or None)

    @route("GET", "/v1/calls/{id}", "A held call with the agent's request.", returns=Event, errors=[404, 409, 410])
    async def call(self, query: Query, id: str) -> Reply:
        return 200, self.broker.call(id).event()

    @route(
        "POST", "/v1/calls/{id}/response",
        "Answer a call: a full response object, or text (and tool calls) to make one from. Pushing again to an "
        "answered call is ignored (duplicate: true).",
        body=ResponsePush, returns=PushResult, errors=[400, 404, 409, 410],
    )  # fmt: skip
    async def respond(self, query: Query, push: ResponsePush, id: str) -> Reply:
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
    async def delta(self, query: Query, push: DeltaPush, id: str) -> Reply:
        self.broker.delta(id, Delta(push.as_delta(), push.index, push.finish_reason, push.logprobs), push.extra)
        return 200, PushResult(id=id)

    @route("POST", "/v1/calls/{id}/finish", "End a streamed answer. Again on a finished call: ignored (duplicate: true).",
           body=FinishPush, returns=PushResult, errors=[400, 404, 410])  # fmt: skip
    async def finish(self, query: Query, push: FinishPush, id: str) -> Reply:
        duplicate = not self.broker.finish(id, Finish(push.finish_reason, push.usage), push.extra)
        return 200, PushResult(id=id, duplicate=duplicate)

    @route("POST", "/v1/calls/{id}/error",
           "Answer a call with an error: that status and an error body in the API's shape (mid-stream: an error "
           "event). Again on an answered call: ignored (duplicate: true).",
           body=ErrorPush, returns=PushResult, errors=[400, 404, 410])  # fmt: skip
    async def error(self, query: Query, push: ErrorPush, id: str) -> Reply:
        failure = Failure(push.status, push.message, push.type, push.code)
        return 200, PushResult(id=id, duplicate=not self.broker.fail(id, failure, push.extra))

    @route("GET", "/v1/sessions", "Every session seen since the proxy started.", returns=SessionInfo, many=True)
    async def sessions(self, query: Query) -> Reply:
        return 200, self.broker.sessions()

    @route(
        "POST", "/v1/sessions/{session}/end",
        "End a session (the agent exited): its held calls get a 410, drivers get session_end, its later calls "
        "are refused. Idempotent.",
        body=EndSession, returns=SessionInfo, errors=[400],
    )  # fmt: skip
    async def end_session(self, query: Query, push: EndSession, session: str) -> Reply:
        return 200, self.broker.end_session(_session_id(session), push.reason)



# --- HTTP --------------------------------------------------------------------------


def _application(server: ControlServer) -> Application:
    """One handler per path template, holding that path's routes by method."""
    by_template: dict[str, dict[str, ApiRoute]] = {}
    for r in ROUTES:
        by_template.setdefault(r.template, {})[r.method] = r
    handlers = [
        ("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + "$", _Handler, {"server": server, "routes": routes})
        for template, routes in by_template.items()
    ]
    return Application(handlers, default_handler_class=_Handler, default_handler_args={"server": server, "routes": {}},
                       log_function=_no_access_log, compress_response=False)  # fmt: skip


def _no_access_log(handler: RequestHandler) -> None:
    pass  # a line per driver request would cost more than the request (and mitmproxy silences tornado's anyway)


class _Handler(RequestHandler):
    def initialize(self, server: ControlServer, routes: dict[str, ApiRoute]) -> None:
        self._server = server
        self._routes = routes
        self._poll: asyncio.Future | None = None

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        self.clear_header("Content-Type")  # set only with a body

    def compute_etag(self) -> None:
        return None  # answers are live state: no conditional requests

    def prepare(self) -> None:
        if not _authorized(self.request.headers.get("authorization", ""), self._server.token):
            raise ControlError(401, "missing or wrong token: send Authorization: Bearer <token> (see the control file)",
                               "unauthorized")  # fmt: skip

    async def get(self, **params: str) -> None:
        r = self._routes.get(self.request.method)
        if r is None:
            if self._routes:
                raise ControlError(405, f"{self.request.method} is not allowed here; use {', '.join(self._routes)}",
                                   "method_not_allowed")  # fmt: skip
            raise ControlError(404, f"no route {self.request.method} {self.request.path}; see GET /openapi.json",
                               "not_found")  # fmt: skip
        query = {k: v[-1].decode("utf-8", "replace") for k, v in self.request.query_arguments.items() if v[-1]}
        try:
            work = r.handler(self._server, query, _parse_body(r.body, self.request.body), **params) if r.body \
                else r.handler(self._server, query, **params)  # fmt: skip
            if r.long_poll:  # abandoned if the driver hangs up first, so no event is taken for a driver that is gone
                self._poll = asyncio.ensure_future(work)
                try:
                    status, payload = await self._poll
                except asyncio.CancelledError:
                    if self._poll.cancelled():
                        return
                    raise
            else:
                status, payload = await work
        except BrokerError as exc:
            raise ControlError(exc.status, str(exc), exc.code) from None
        self._reply(status, payload)

    # every method is routed, so a wrong one gets its 405 in the API's error shape (HEAD: tornado drops the body)
    head = post = put = patch = delete = options = get

    def on_connection_close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs["exc_info"][1] if "exc_info" in kwargs else None
        if isinstance(exc, ControlError):
            message, code = exc.message, exc.code
        else:  # tornado's own (a malformed request) or a bug
            message, code = responses.get(status_code, "error"), "bad_request" if status_code < 500 else "internal_error"
        if status_code == 401:
            self.set_header("www-authenticate", "Bearer")
        self._reply(status_code, _error(message, code))

    def _reply(self, status: int, payload: Any) -> None:
        self.set_status(status)
        if payload is None:
            self.finish()
            return
        self.set_header("content-type", "application/json")
        self.finish(_encode(payload))


# --- helpers -----------------------------------------------------------------------


def _authorized(header: str, token: str) -> bool:
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
        for status in sorted({*r.errors, 401}):
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


