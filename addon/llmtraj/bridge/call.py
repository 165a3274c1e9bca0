"""One bridged call: the agent's request translated for the chat upstream, and
the upstream's response translated back as it arrives, keeping what the record
needs of the upstream side (the request sent, the upstream's bytes). Knows
nothing of mitmproxy: it is given the upstream's response and gives the agent's.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic_core import from_json

from ..anticall.respond import JSON_HEADERS, SSE_HEADERS
from ..anticall.respond import Answer as AgentAnswer  # an answer made by the addon, as anti-call makes them
from ..apis import ApiShape, no_response_answer
from ..core.encoding import decoder_for
from ..core.headers import header
from .errors import Untranslatable, agent_error
from .from_anthropic import anthropic_to_chat
from .from_responses import responses_to_chat
from .to_agent import StreamTranslator, translate_body

UPSTREAM_API = "chat.completions"
_TRANSLATORS = {"anthropic.messages": anthropic_to_chat, "responses": responses_to_chat}


def to_chat(api: str, request: Any) -> dict[str, Any]:
    """The chat-completions request for an agent's request in `api`; raises
    Untranslatable naming what cannot be translated."""
    translate = _TRANSLATORS.get(api)
    if translate is None:
        raise Untranslatable(f"a {api} call", f"llm-traj bridges {' and '.join(_TRANSLATORS)} calls")
    return translate(request)


def json_answer(status: int, body: Any) -> AgentAnswer:
    return AgentAnswer(status, list(JSON_HEADERS), json.dumps(body, ensure_ascii=False).encode())


class BridgedCall:
    """The record's view of the upstream side fills in as the call runs
    (`note()`); `answer` turns the upstream's response into the agent's."""

    def __init__(self, api: ApiShape, agent_request: Any, chat_request: dict[str, Any], url: str) -> None:
        self.api = api
        self.agent_request = agent_request
        self.chat_request = chat_request
        self.url = url
        self.stream = chat_request.get("stream") is True
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []  # the upstream's body as it came (decoded)
        self.chunk_times: list[float] = []  # when each of them came
        self.first_byte_at: float | None = None
        self.ended_at: float | None = None
        self.error: tuple[str, str] | None = None  # (record error kind, message) when the upstream failed
        self.capture: dict[str, Any] | None = None  # token capture's plan note, when the route captures

    def body(self) -> bytes:
        return json.dumps(self.chat_request, ensure_ascii=False).encode()

    def note(self) -> dict[str, Any]:
        """Plain values for the record writer (`recording.capture.CallCapture.bridge`)."""
        return {
            "upstream_api": UPSTREAM_API, "url": self.url, "request": self.body(), "status": self.status,
            "headers": self.headers, "stream": self.stream, "chunks": self.chunks, "chunk_times": self.chunk_times,
            "first_byte_at": self.first_byte_at,
            "ended_at": self.ended_at, "error": self.error, "capture": self.capture,
        }  # fmt: skip

    def unreachable(self, kind: str, message: str) -> AgentAnswer:
        """No response came from the upstream (`kind`: the record's error kind):
        the agent gets the proxy's error in its shape."""
        self.error = (kind, message)
        self.ended_at = time.time()
        return json_answer(*no_response_answer(self.api, kind, message))

    async def answer(self, status: int, headers: list[tuple[str, str]], body: AsyncIterator[bytes]) -> AgentAnswer:
        """The agent's answer to the upstream's response: an error body in its
        shape (same status), its own stream event by event, or its final object."""
        self.status, self.headers = status, headers
        decoder = decoder_for(header(headers, "content-encoding"))
        content_type = (header(headers, "content-type") or "").lower()
        if status < 400 and self.stream and content_type.startswith("text/event-stream"):
            return AgentAnswer(200, list(SSE_HEADERS), self._events(body, decoder))
        whole = b"".join([decoder.decode(piece) async for piece in self._pieces(body)]) + decoder.flush()
        self.ended_at = time.time()
        self.chunks, self.chunk_times = [whole], [self.ended_at]
        try:
            parsed = from_json(whole) if whole else None
        except ValueError:
            parsed = None
        if status >= 400:
            return json_answer(status, agent_error(self.api, status, parsed, f"the upstream answered {status}"))
        try:  # (a stream asked for and a body answered: the agent gets the stream of that body)
            final = translate_body(self.api, self.agent_request, self.chat_request, parsed)
        except ValueError as exc:
            self.error = ("bad_stream", str(exc))
            return json_answer(502, self.api.error_body(f"llm-traj bridge: {exc}", "proxy_error", "bridge_bad_upstream"))
        if self.stream:
            return AgentAnswer(200, list(SSE_HEADERS), b"".join(self.api.chunks_from_final(final)))
        return json_answer(200, final)

    async def _pieces(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The upstream's body; closed (so is the upstream connection: the engine
        stops generating) when the agent goes away mid-stream."""
        try:
            async for piece in body:
                if piece and self.first_byte_at is None:
                    self.first_byte_at = time.time()
                yield piece
        finally:
            if hasattr(body, "aclose"):
                await body.aclose()

    async def _events(self, body: AsyncIterator[bytes], decoder) -> AsyncIterator[bytes]:
        translator = StreamTranslator(self.api, self.agent_request, self.chat_request)
        pieces = self._pieces(body)
        try:
            try:
                async for piece in pieces:
                    data = decoder.decode(piece)
                    if data:
                        self.chunks.append(data)
                        self.chunk_times.append(time.time())
                        out = translator.feed(data)
                        if out:
                            yield out
            except ConnectionError as exc:  # the upstream broke off or went idle: the agent gets an error event
                self.error = (getattr(exc, "kind", "upstream_disconnected"), str(exc))
                yield translator.fail(str(exc))
                return
            out = translator.close()
            if translator.failed and self.error is None:
                self.error = ("bad_stream", translator.failed)
            if out:
                yield out
        finally:
            self.ended_at = time.time()
            await pieces.aclose()
