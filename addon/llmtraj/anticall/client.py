"""Async Python client of the anti-call control API, for drivers (RL trainers).

    async with AntiCallClient.from_control_file("trajectories/control.json") as proxy:
        while True:
            req = await proxy.get_request(session="default")
            if req is None or req.type == "cancelled":
                continue                      # nothing yet / a call the agent gave up
            if req.session_end:
                break
            await proxy.send_response(req, "Hello!")    # or a full completion, or deltas

`get_request` returns an `Event`: `req.request` is the agent's JSON body,
`req.id` names the call for the `send_*` methods (which also take the event).

Stdlib only: the control API is a plain HTTP/1.1 server on loopback, and a
minimal keep-alive client costs a tenth of a general one per request, which
is most of what a round trip through a driver adds.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from .control_file import ControlFileError, read_control_file
from .models import DEFAULT_POLL, CallInfo, Event, PushResult, SessionInfo


class AntiCallError(Exception):
    """The control API refused a call (`status`, `code`), or cannot be reached (status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


CallRef = str | Event | CallInfo


def _id(call: CallRef) -> str:
    return call if isinstance(call, str) else call.id


class AntiCallClient:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self._http = _Http(self.url, token)

    @classmethod
    def from_control_file(cls, path: Path | str) -> AntiCallClient:
        try:
            info = read_control_file(path)
        except ControlFileError as exc:
            raise AntiCallError(0, exc.code, str(exc)) from None
        if info.url is None:
            raise AntiCallError(0, "no_control_api", f"{path}: the proxy is not in anti-call mode; it has no control API")
        return cls(info.url, info.token)

    async def __aenter__(self) -> AntiCallClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._http.close()

    # --- getting work ------------------------------------------------------------

    async def get_request(self, session: str | None = None, timeout: float = DEFAULT_POLL) -> Event | None:
        """The next event (a new call, a cancelled one, or the end of a session)
        of `session`, or of any session; None if none came within `timeout` s."""
        params = {"timeout": timeout} | ({"session": session} if session else {})
        return await self._poll("/v1/requests/next", params, timeout)

    async def wait_call(self, session: str, index: int, timeout: float = DEFAULT_POLL) -> Event | None:
        """Call `index` (from 1) of `session` once made, or the session's end; None after `timeout` s."""
        return await self._poll(f"/v1/sessions/{quote(session)}/calls/{index}", {"timeout": timeout}, timeout)

    async def get_call(self, call: CallRef) -> Event:
        return Event.model_validate(await self._request("GET", f"/v1/calls/{quote(_id(call), safe=':')}"))

    async def calls(self, session: str | None = None) -> list[CallInfo]:
        params = {"session": session} if session else None
        return [CallInfo.model_validate(c) for c in await self._request("GET", "/v1/calls", params=params)]

    async def sessions(self) -> list[SessionInfo]:
        return [SessionInfo.model_validate(s) for s in await self._request("GET", "/v1/sessions")]

    # --- answering ---------------------------------------------------------------

    async def send_response(
        self,
        call: CallRef,
        response: str | dict[str, Any] | None = None,
        *,
        text: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        finish_reason: str | None = None,
        usage: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> PushResult:
        """Answer a call: `response` is text or a full response object (a
        chat.completion); or give `text` / `tool_calls` (with `finish_reason`,
        `usage`). `extra` (token ids, logprobs, ...) goes to the trajectory only."""
        if isinstance(response, str):
            response, text = None, response
        body = {"response": response, "text": text, "tool_calls": tool_calls, "finish_reason": finish_reason,
                "usage": usage, "extra": extra}  # fmt: skip
        return await self._push(call, "response", body)

    async def send_delta(
        self,
        call: CallRef,
        text: str | None = None,
        *,
        delta: dict[str, Any] | None = None,
        index: int = 0,
        finish_reason: str | None = None,
        logprobs: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> PushResult:
        """Stream a content delta (`text`) or any choice delta (`delta`, e.g.
        tool_calls fragments) to the agent; then `finish`."""
        body = {"text": text, "delta": delta, "index": index, "finish_reason": finish_reason, "logprobs": logprobs,
                "extra": extra}  # fmt: skip
        return await self._push(call, "delta", body)

    async def finish(
        self,
        call: CallRef,
        *,
        finish_reason: str | None = None,
        usage: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> PushResult:
        return await self._push(call, "finish", {"finish_reason": finish_reason, "usage": usage, "extra": extra})

    async def send_error(
        self,
        call: CallRef,
        message: str,
        status: int = 500,
        *,
        type: str = "server_error",
        code: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> PushResult:
        """Answer a call with an error (that HTTP status, the API's error body)."""
        body = {"status": status, "message": message, "type": type, "code": code, "extra": extra}
        return await self._push(call, "error", body)

    async def end_session(self, session: str, reason: str = "ended by a driver") -> SessionInfo:
        return SessionInfo.model_validate(
            await self._request("POST", f"/v1/sessions/{quote(session)}/end", body={"reason": reason})
        )

    # --- plumbing ----------------------------------------------------------------

    async def _push(self, call: CallRef, what: str, body: dict[str, Any]) -> PushResult:
        body = {k: v for k, v in body.items() if v is not None}
        return PushResult.model_validate(await self._request("POST", f"/v1/calls/{quote(_id(call), safe=':')}/{what}", body=body))

    async def _poll(self, path: str, params: dict[str, Any], timeout: float) -> Event | None:
        data = await self._request("GET", path, params=params, timeout=timeout + 30.0)
        return None if data is None else Event.model_validate(data)

    async def _request(self, method: str, path: str, *, params=None, body=None, timeout: float = 30.0) -> Any:
        if params:
            path += "?" + urlencode(params)
        status, answer = await self._http.request(method, path, None if body is None else json.dumps(body).encode(), timeout)
        if status == 204:
            return None
        try:
            data = json.loads(answer)
        except ValueError:
            data = None
        if 200 <= status < 300:
            return data
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else answer[:200].decode("utf-8", "replace")
        code = error.get("code") if isinstance(error, dict) else "http_error"
        raise AntiCallError(status, code or "http_error", message or f"HTTP {status}")


_MAX_IDLE = 32  # idle keep-alive connections kept for reuse


class _Http:
    """HTTP/1.1 over keep-alive connections, one request per connection at a
    time, for a server that always answers with a Content-Length (ours)."""

    def __init__(self, url: str, token: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise AntiCallError(0, "bad_url", f"the control API URL {url!r} is not http://HOST:PORT")
        self.url = url
        self._address = (parts.hostname, parts.port or 80)
        self._head = f"host: {parts.netloc}\r\nauthorization: Bearer {token}\r\n"
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\n{self._head}"
        if body is not None:
            head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        data = (head + "\r\n").encode() + (body or b"")
        while True:
            reused = bool(self._idle)
            try:
                if reused:
                    connection = self._idle.pop()
                else:
                    connection = await asyncio.wait_for(asyncio.open_connection(*self._address), timeout)
                return await self._exchange(connection, data, timeout)
            except asyncio.IncompleteReadError as exc:
                if not (reused and not exc.partial):
                    raise self._unreachable(exc) from None
            except ConnectionError as exc:
                if not reused:
                    raise self._unreachable(exc) from None
            except (OSError, TimeoutError) as exc:
                raise self._unreachable(exc) from None
            # a kept connection the server closed meanwhile, before any answer: try the next one

    async def _exchange(self, connection, data: bytes, timeout: float) -> tuple[int, bytes]:
        reader, writer = connection
        try:
            async with asyncio.timeout(timeout):
                writer.write(data)
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close" or len(self._idle) >= _MAX_IDLE:
            writer.close()
        else:
            self._idle.append(connection)
        return status, body

    def _unreachable(self, exc: BaseException) -> AntiCallError:
        return AntiCallError(0, "unreachable", f"cannot reach the control API at {self.url}: {exc!r}")

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

