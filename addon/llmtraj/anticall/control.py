"""The anti-call control API: a small HTTP/1.1 JSON server on 127.0.0.1 for
drivers (the Python client, the `llm-traj anti-call` command, curl).

Stdlib asyncio only; it runs in the proxy's event loop beside the broker.
Every request needs `Authorization: Bearer <token>`; the address and token
are in the control file, readable only by its owner. The routes below are
also the source of the OpenAPI description served at `GET /openapi.json`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from ..core.session import InvalidSession, validate_session
from ..core.store import is_single_file
from .broker import Broker, BrokerError, CallConflict, Delta, Failure, Finish
from .models import (
    DEFAULT_POLL,
    MAX_POLL,
    ApiError,
    CallInfo,
    ControlInfo,
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


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


Reply = tuple[int, Any]  # status and a model, a list of models, a dict, or None (no body)


@dataclass(frozen=True)
class Route:
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

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template) + "$")


ROUTES: list[Route] = []
_POLL_QUERY = ("timeout", "number", f"seconds to wait (default {DEFAULT_POLL:g}, at most {MAX_POLL:g})")


def route(method: str, template: str, summary: str, *, body=None, returns=None, many=False, query=(), errors=(), long_poll=False):
    def register(handler):
        ROUTES.append(Route(method, template, handler, summary, body, returns, many, tuple(query), tuple(errors), long_poll))
        return handler

    return register


class ControlServer:
    def __init__(self, broker: Broker, token: str | None = None) -> None:
        self.broker = broker
        self.token = token or secrets.token_urlsafe(32)
        self.port: int | None = None
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._routes = [(r, r.pattern) for r in ROUTES]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bind(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (OSError if the port is taken); the server
        answers once `start` ran in the event loop."""
        self._sock = socket.create_server(("127.0.0.1", port))
        self.port = self._sock.getsockname()[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._sock, limit=MAX_HEAD)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            self._sock.close()
        for writer in list(self._writers):
            writer.close()
        self._server = self._sock = None

    # --- HTTP ------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # (asyncio leaves Nagle on for the sockets of socket.create_server)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writers.add(writer)
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except HttpError as exc:
                    _write(writer, exc.status, _error(exc.message, exc.code), keep_alive=False)
                    return
                if request is None:
                    return
                keep_alive = request.headers.get("connection", "").lower() != "close"
                status, payload = await self._dispatch(request, reader)
                if status == 0:  # the driver hung up while waiting
                    return
                _write(writer, status, payload, keep_alive)
                await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _dispatch(self, request: Request, reader: asyncio.StreamReader) -> Reply:
        if not _authorized(request.headers.get("authorization", ""), self.token):
            return 401, _error("missing or wrong token: send Authorization: Bearer <token> (see the control file)", "unauthorized")
        allowed = []
        for r, pattern in self._routes:
            m = pattern.match(request.path)
            if m is None:
                continue
            if r.method != request.method:
                allowed.append(r.method)
                continue
            params = {k: unquote(v) for k, v in m.groupdict().items()}
            try:
                body = _parse_body(r.body, request.body) if r.body else None
                work = r.handler(self, request, body, **params) if r.body else r.handler(self, request, **params)
                return await (_unless_hung_up(work, reader) if r.long_poll else work)
            except HttpError as exc:
                return exc.status, _error(exc.message, exc.code)
            except BrokerError as exc:
                return exc.status, _error(str(exc), exc.code)
        if allowed:
            return 405, _error(f"{request.method} is not allowed here; use {', '.join(allowed)}", "method_not_allowed")
        return 404, _error(f"no route {request.method} {request.path}; see GET /openapi.json", "not_found")

    # --- routes ------------------------------------------------------------------

    @route("GET", "/openapi.json", "This description (OpenAPI 3.1).")
    async def openapi(self, request: Request) -> Reply:
        return 200, openapi()

    @route(
        "GET", "/v1/requests/next",
        "Long-poll for the next event: a new held call (type request), a call released before it was answered "
        "(cancelled), or the end of a session (session_end). 204 when nothing came in time.",
        returns=Event, long_poll=True,
        query=[("session", "string", "only this session (default: any)"), _POLL_QUERY],
    )  # fmt: skip
    async def next_request(self, request: Request) -> Reply:
        session = request.query.get("session") or None
        if session is not None:
            _session_id(session)
        return _event(await self.broker.next_event(session, _poll_timeout(request)))

    @route(
        "GET", "/v1/sessions/{session}/calls/{index}",
        "Long-poll for call `index` (from 1) of a session, ROCK style: the call once the agent made it, or "
        "session_end if the session ends first. 204 when nothing came in time; 410 if the call is already over.",
        returns=Event, long_poll=True, query=[_POLL_QUERY], errors=[410],
    )  # fmt: skip
    async def wait_call(self, request: Request, session: str, index: str) -> Reply:
        _session_id(session)
        if not index.isdigit() or int(index) < 1:
            raise HttpError(400, f"call index {index!r} is not a number >= 1", "bad_index")
        return _event(await self.broker.wait_call(session, int(index), _poll_timeout(request)))

    @route("GET", "/v1/calls", "The held calls (without their request bodies).", returns=CallInfo, many=True,
           query=[("session", "string", "only this session")])  # fmt: skip
    async def calls(self, request: Request) -> Reply:
        return 200, self.broker.held(request.query.get("session") or None)

    @route("GET", "/v1/calls/{id}", "A held call with the agent's request.", returns=Event, errors=[404, 409, 410])
    async def call(self, request: Request, id: str) -> Reply:
        return 200, self.broker.call(id).event()

    @route(
        "POST", "/v1/calls/{id}/response",
        "Answer a call: a full response object, or text (and tool calls) to make one from. Pushing again to an "
        "answered call is ignored (duplicate: true).",
        body=ResponsePush, returns=PushResult, errors=[400, 404, 409, 410],
    )  # fmt: skip
    async def respond(self, request: Request, push: ResponsePush, id: str) -> Reply:
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
                raise HttpError(400, str(exc), "bad_push") from None
        return 200, PushResult(id=id, duplicate=not self.broker.respond(id, response, push.extra))

    @route("POST", "/v1/calls/{id}/delta", "Stream one delta to the agent (the call becomes streaming).",
           body=DeltaPush, returns=PushResult, errors=[400, 404, 409, 410])  # fmt: skip
    async def delta(self, request: Request, push: DeltaPush, id: str) -> Reply:
        self.broker.delta(id, Delta(push.as_delta(), push.index, push.finish_reason, push.logprobs), push.extra)
        return 200, PushResult(id=id)

    @route("POST", "/v1/calls/{id}/finish", "End a streamed answer. Again on a finished call: ignored (duplicate: true).",
           body=FinishPush, returns=PushResult, errors=[400, 404, 410])  # fmt: skip
    async def finish(self, request: Request, push: FinishPush, id: str) -> Reply:
        duplicate = not self.broker.finish(id, Finish(push.finish_reason, push.usage), push.extra)
        return 200, PushResult(id=id, duplicate=duplicate)

    @route("POST", "/v1/calls/{id}/error",
           "Answer a call with an error: that status and an error body in the API's shape (mid-stream: an error "
           "event). Again on an answered call: ignored (duplicate: true).",
           body=ErrorPush, returns=PushResult, errors=[400, 404, 410])  # fmt: skip
    async def error(self, request: Request, push: ErrorPush, id: str) -> Reply:
        failure = Failure(push.status, push.message, push.type, push.code)
        return 200, PushResult(id=id, duplicate=not self.broker.fail(id, failure, push.extra))

    @route("GET", "/v1/sessions", "Every session seen since the proxy started.", returns=SessionInfo, many=True)
    async def sessions(self, request: Request) -> Reply:
        return 200, self.broker.sessions()

    @route(
        "POST", "/v1/sessions/{session}/end",
        "End a session (the agent exited): its held calls get a 410, drivers get session_end, its later calls "
        "are refused. Idempotent.",
        body=EndSession, returns=SessionInfo, errors=[400],
    )  # fmt: skip
    async def end_session(self, request: Request, push: EndSession, session: str) -> Reply:
        return 200, self.broker.end_session(_session_id(session), push.reason)


# --- helpers -----------------------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise HttpError(400, "incomplete request head", "bad_request") from None
        return None
    except asyncio.LimitOverrunError:
        raise HttpError(431, "request head too large", "head_too_large") from None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _ = lines[0].split(" ", 2)
    except ValueError:
        raise HttpError(400, "bad request line", "bad_request") from None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(411, "send the body with a Content-Length", "length_required")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, "bad Content-Length", "bad_request") from None
    if length > MAX_BODY:
        raise HttpError(413, f"body larger than {MAX_BODY >> 20} MiB", "body_too_large")
    body = await reader.readexactly(length) if length else b""
    url = urlsplit(target)
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    return Request(method.upper(), url.path, query, headers, body)


async def _unless_hung_up(work: Awaitable[Reply], reader: asyncio.StreamReader) -> Reply:
    """Runs a long poll, abandoned (status 0) if the driver disconnects first,
    so no event is taken for a driver that is gone."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, gone):
            pending.cancel()
        await asyncio.wait((task, gone))  # the reader is free again once `gone` has stopped
    return task.result() if not task.cancelled() else (0, None)


def _authorized(header: str, token: str) -> bool:
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def _parse_body(model: type[BaseModel], body: bytes) -> BaseModel:
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise HttpError(400, f"{where}: {first['msg']}", "bad_push") from None


def _session_id(session: str) -> str:
    try:
        return validate_session(session)
    except InvalidSession as exc:
        raise HttpError(400, str(exc), "invalid_session") from None


def _poll_timeout(request: Request) -> float:
    raw = request.query.get("timeout", str(DEFAULT_POLL))
    try:
        timeout = float(raw)
    except ValueError:
        raise HttpError(400, f"timeout={raw!r} is not a number of seconds", "bad_timeout") from None
    if not 0 <= timeout <= MAX_POLL:
        raise HttpError(400, f"timeout must be between 0 and {MAX_POLL:g} seconds", "bad_timeout")
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


def _write(writer: asyncio.StreamWriter, status: int, payload: Any, keep_alive: bool) -> None:
    body = b"" if payload is None else _encode(payload)
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
    if body:
        head += "content-type: application/json\r\n"
    if status == 401:
        head += "www-authenticate: Bearer\r\n"
    if not keep_alive:
        head += "connection: close\r\n"
    writer.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)


def openapi() -> dict[str, Any]:
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


def control_file_for(traj: Path) -> Path:
    """Where the proxy writes the control file for a trajectory path."""
    return Path(f"{traj}.control.json") if is_single_file(traj) else traj / "control.json"


def write_control_file(path: Path, info: ControlInfo) -> None:
    """Write the control file atomically, readable only by its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, info.model_dump_json(indent=2).encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)
