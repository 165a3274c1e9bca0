"""A drop-in for verl's SWE-agent recipe `ModelProxy` (recipe/swe_agent/model_proxy),
backed by llm-traj: the recipe switches by one import,

    from llmtraj.compat.verl import ModelProxy, ModelRequest

and its loop runs unchanged, while the agent gets what llm-traj gives it: a
stream when it asks for one (the answer's text as SSE chunks), tool calls
(`send_response(..., tool_calls=[...])` or a whole chat.completion), sessions
(`session_url(S)`: one proxy for many agents, each request names its
`session`), the agent's errors in the OpenAI shape with their real status, and
every call recorded (`await records()`, the trajectory under `path`).

Behind it runs a real mitmdump with the addon in anti-call mode on
`host:port`; the agent's base URL is `http://host:port/v1` as before.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..anticall.client import AntiCallClient
from ..anticall.control_file import control_file_for, read_control_file
from ..anticall.models import Event
from ..cli.proxy_process import ProxyProcess, ProxyStartError
from ..cli.run import COMMAND_DEFAULTS
from ..core.record import CallRecord
from ..upstreams.config import NO_UPSTREAM

logger = logging.getLogger(__name__)

DEFAULT_SESSION = "default"
_FIELDS = ("messages", "model", "temperature", "max_tokens", "stream")
_ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                 "not_found_error": 404, "rate_limit_error": 429, "server_error": 500}  # fmt: skip


@dataclass
class ModelRequest:
    """A model call of the agent, as the recipe's ModelRequest, plus its
    `session` and `api`; `is_session_end()` marks the end of a session."""

    request_id: str
    messages: list[dict[str, Any]]
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    stream: bool = False
    extra_params: dict[str, Any] | None = None
    session: str = DEFAULT_SESSION
    api: str = "chat.completions"
    body: dict[str, Any] = field(default_factory=dict, repr=False)  # the agent's whole request
    _session_end: bool = field(default=False, repr=False)

    def is_session_end(self) -> bool:
        return self._session_end


class ModelProxy:
    def __init__(self, port: int = 8080, host: str = "127.0.0.1", path: str | Path | None = None) -> None:
        """`path`: where the trajectory is written (default: a new temporary directory)."""
        self.port = port
        self.host = host
        self.path = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="llm-traj-verl-"))
        self._proxy: ProxyProcess | None = None
        self._client: AntiCallClient | None = None
        self._current_request: ModelRequest | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def session_url(self, session: str) -> str:
        """The OpenAI base URL for an agent of its own session (one proxy, many agents)."""
        return f"{self.url}/s/{session}/v1"

    async def start_server(self, port: int | None = None, max_retries: int = 50) -> None:
        """Start the proxy on `port` (else the constructor's); if that port is
        taken, on one the system picks (`self.port` says which). `max_retries`
        is the recipe's signature: no port is tried twice here."""
        if self._proxy is not None:
            raise RuntimeError("Server is already started")
        if port is not None:
            self.port = port
        if self.port and not _free(self.host, self.port):
            logger.warning(f"port {self.port} is in use; the system picks one")
            self.port = 0
        try:
            try:
                proxy = await self._started()
            except ProxyStartError as exc:
                if not self.port or "already in use" not in str(exc):
                    raise
                # taken between the check above and the proxy's bind (another process picked it meanwhile)
                logger.warning(f"port {self.port} was taken before the proxy could listen on it; the system picks one")
                self.port = 0
                proxy = await self._started()
        except ProxyStartError as exc:
            raise RuntimeError(f"the model proxy did not start: {exc}") from None
        self._proxy, self.port = proxy, proxy.port
        info = read_control_file(control_file_for(self.path))
        self._client = AntiCallClient(info.url, info.token)
        logger.info(f"Model proxy (llm-traj) started on {self.host}:{self.port}, trajectory {self.path}")

    async def _started(self) -> ProxyProcess:
        proxy = ProxyProcess(
            upstream=NO_UPSTREAM, listen_host=self.host, port=self.port, log=self.path / "proxy.log",
            options={**COMMAND_DEFAULTS, "llm_traj_mode": "anticall", "llm_traj_path": self.path},
        )  # fmt: skip
        await asyncio.to_thread(proxy.start)
        return proxy

    async def stop_server(self) -> None:
        if self._proxy is None:
            logger.warning("Server is not started, skipping stop")
            return
        await self._client.aclose()
        await asyncio.to_thread(self._proxy.stop)
        self._proxy = self._client = None

    async def get_request(self) -> ModelRequest:
        """The next call of any agent (waits for one), or a session's end
        (`is_session_end()`); calls the agent gave up on are skipped."""
        client = self._running()
        while True:
            event = await client.get_request(timeout=30.0)
            if event is None or event.type == "cancelled":
                continue
            request = _model_request(event)
            self._current_request = request
            return request

    async def send_response(
        self,
        response: str | dict[str, Any],
        request: ModelRequest | None = None,
        request_id: str | None = None,
        finish_reason: str = "stop",
        *,
        tool_calls: list[dict[str, Any]] | None = None,
        usage: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Answer a call (the one given, else the last `get_request` returned):
        `response` is the text (with `tool_calls`, `usage`), or a whole
        chat.completion; `extra` (token ids, logprobs) goes to the record only."""
        call = self._call_id(request, request_id)
        client = self._running()
        if isinstance(response, dict):
            await client.send_response(call, response, extra=extra)
        else:
            reason = "tool_calls" if tool_calls and finish_reason == "stop" else finish_reason
            await client.send_response(call, text=response, tool_calls=tool_calls, finish_reason=reason, usage=usage,
                                       extra=extra)  # fmt: skip

    async def send_error_response(self, request_id: str, error_message: str, error_type: str = "server_error") -> None:
        """Answer a call with an error: the agent gets the status of its type (500 for server_error) and an OpenAI error body."""
        status = _ERROR_STATUS.get(error_type, 500)
        await self._running().send_error(request_id, error_message, status, type=error_type)

    async def end_session(self, session: str = DEFAULT_SESSION, reason: str = "ended by the trainer") -> None:
        """End a session: its held calls get a 410, `get_request` returns its end."""
        await self._running().end_session(session, reason)

    async def records(self, session: str = DEFAULT_SESSION, timeout: float = 30.0) -> list[CallRecord]:
        """The session's recorded calls, once every call of it that got an answer is written."""
        if self._proxy is None:
            raise RuntimeError("the model proxy is not started: await start_server() first")
        return await asyncio.to_thread(self._proxy.written_records, session, self.path, timeout)

    def _running(self) -> AntiCallClient:
        if self._client is None:
            raise RuntimeError("the model proxy is not started: await start_server() first")
        return self._client

    def _call_id(self, request: ModelRequest | None, request_id: str | None) -> str:
        if request is not None:
            return request.request_id
        if request_id is not None:
            return request_id
        if self._current_request is None:
            raise ValueError("Either request, request_id must be provided, or a request must have been retrieved "
                             "via get_request() first")  # fmt: skip
        return self._current_request.request_id


def _free(host: str, port: int) -> bool:
    try:
        socket.create_server((host, port)).close()
    except OSError:
        return False
    return True


def _model_request(event: Event) -> ModelRequest:
    if event.type == "session_end":
        return ModelRequest(request_id=f"{event.session}:end", messages=[], session=event.session, _session_end=True)
    body = event.request if isinstance(event.request, dict) else {}
    messages = body.get("messages")
    if messages is None:  # Responses `input`, legacy `prompt`: as a user message when it is text
        given = body.get("input", body.get("prompt"))
        messages = given if isinstance(given, list) else [{"role": "user", "content": given}] if given is not None else []
    return ModelRequest(
        request_id=event.id, messages=messages, model=body.get("model"), temperature=body.get("temperature"),
        max_tokens=body.get("max_tokens", body.get("max_completion_tokens")), stream=bool(event.stream),
        extra_params={k: v for k, v in body.items() if k not in _FIELDS}, session=event.session, api=event.api or "",
        body=body,
    )  # fmt: skip
