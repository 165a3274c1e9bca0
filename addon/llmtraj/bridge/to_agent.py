"""The chat upstream's answer as the agent's own API answers: a stream event by
event as its chunks arrive (through the API's `StreamBuilder`, which anti-call
drives the same way), or a whole body.

Per upstream chunk only that chunk is parsed; what the agent gets for it is
written at once, so the upstream's pacing is kept.
"""

from __future__ import annotations

from typing import Any

from pydantic_core import from_json

from ..apis import ApiShape
from ..apis.base import StreamBuilder
from ..core.sse import SSEParser
from .errors import agent_error

# What of a chat delta the agent's events carry (logprobs and token ids go to the record only).
_DELTA_KEYS = ("reasoning_content", "content", "tool_calls")


def _delta_of(delta: Any) -> dict[str, Any]:
    """The parts of a chat delta (or a non-streamed message) the builders take;
    vLLM's newer `reasoning` field is its `reasoning_content`."""
    if not isinstance(delta, dict):
        return {}
    pieces = {key: delta[key] for key in _DELTA_KEYS if delta.get(key)}
    if "reasoning_content" not in pieces and isinstance(delta.get("reasoning"), str) and delta["reasoning"]:
        pieces["reasoning_content"] = delta["reasoning"]
    return pieces


class _ToolCallOrder:
    """Puts a stream's tool call fragments in the order the agent's API streams
    them, one call after the other (its blocks and items cannot be reopened).
    Engines stream calls one after the other too, so fragments pass at once;
    a call whose fragments come interleaved with an earlier one's (OpenAI can)
    waits until the earlier call's arguments are a whole JSON value, or the
    stream ends."""

    def __init__(self) -> None:
        self._live: int | None = None  # the call whose fragments pass at once
        self._arguments: list[str] = []  # the live call's arguments so far
        self._waiting: dict[int, list[dict[str, Any]]] = {}  # later calls' fragments, in start order

    def fragments(self, calls: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for call in calls:
            index = call.get("index", 0) if isinstance(call, dict) else None
            if not isinstance(index, int):
                raise ValueError("a tool call fragment without an integer index")
            if self._live is None:
                self._live = index
            if index == self._live:
                out.append(call)
                self._arguments.append(_arguments_of(call))
            else:
                self._waiting.setdefault(index, []).append(call)
            if self._waiting and self._whole():
                out += self._advance()
        return out

    def _whole(self) -> bool:
        try:
            from_json("".join(self._arguments))
        except ValueError:
            return False
        return True

    def _advance(self) -> list[dict[str, Any]]:
        """The live call is done: the next one's fragments so far, and it goes live."""
        self._live = next(iter(self._waiting))
        fragments = self._waiting.pop(self._live)
        self._arguments = [_arguments_of(call) for call in fragments]
        return fragments + (self._advance() if self._waiting and self._whole() else [])

    def flush(self) -> list[dict[str, Any]]:
        """The stream ended: every waiting call's fragments, in order."""
        return [call for fragments in self._waiting.values() for call in fragments]


def _arguments_of(call: dict[str, Any]) -> str:
    function = call.get("function")
    arguments = function.get("arguments") if isinstance(function, dict) else None
    return arguments if isinstance(arguments, str) else ""


class _Ending:
    """How the upstream's only choice ended, as its chunks tell."""

    def __init__(self, request: Any) -> None:
        stop = request.get("stop") if isinstance(request, dict) else None
        self._stops = set(stop if isinstance(stop, list) else [stop] if isinstance(stop, str) else [])
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self.usage: dict[str, Any] | None = None

    def choice(self, choice: dict[str, Any]) -> None:
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
            matched = choice.get("stop_reason")  # vLLM: the stop string that ended it
            if self.finish_reason == "stop" and isinstance(matched, str) and matched in self._stops:
                self.stop_sequence = matched

    def finish(self, builder: StreamBuilder) -> bytes:
        return builder.finish(finish_reason=self.finish_reason, usage=self.usage, stop_sequence=self.stop_sequence)


class StreamTranslator:
    """Fed the upstream's stream bytes as they arrive (uncompressed), gives the
    agent's stream bytes. `failed` is set when the upstream's stream carried
    an error (the agent got it as its API's error event, which ends its stream)."""

    def __init__(self, api: ApiShape, agent_request: Any, chat_request: Any) -> None:
        self._api = api
        self._builder = api.new_stream(agent_request)
        self._parser: SSEParser | None = None  # once the upstream frames its events otherwise than compactly
        self._tail = b""
        self._ending = _Ending(chat_request)
        self._calls = _ToolCallOrder()
        self._started = False
        self.ended = False  # the agent's stream is closed (finished or failed)
        self.failed: str | None = None
        self.done = False  # the upstream's [DONE] came

    def feed(self, data: bytes) -> bytes:
        if self.ended:
            return b""
        if self._parser is None and b"\r" not in data:
            # The way engines frame chat chunks, `data: {...}` and a blank line
            # (LF): split on blank lines, no general parse.
            buf = self._tail + data if self._tail else data
            out, start = [], 0
            while (end := buf.find(b"\n\n", start)) != -1:
                event, start = buf[start:end], end + 2
                if event.startswith(b"data: ") and b"\n" not in event:
                    out.append(self._data(event[6:]))
                else:  # comments, named events, multi-line data: parsed as such
                    out += [self._data(block.data) for block in SSEParser().feed(event + b"\n\n")]
            self._tail = buf[start:]
            return b"".join(out)
        if self._parser is None:
            self._parser, data, self._tail = SSEParser(), self._tail + data, b""
        return b"".join([self._data(block.data) for block in self._parser.feed(data)])

    def close(self) -> bytes:
        """The upstream's stream ended: the rest of the agent's stream. One that
        ended with no finish reason was cut short: the agent gets an error event.
        (An unterminated last event is not one, by the SSE rules.)"""
        blocks = self._parser.finish() if self._parser is not None else []
        out = b"".join([self._data(block.data) for block in blocks if block.terminated])
        if self.ended:
            return out
        if self._ending.finish_reason is None:
            return out + self.fail("the upstream's stream ended before its answer did")
        self.ended = True
        return out + self._ending.finish(self._builder)

    def fail(self, message: str, status: int = 502) -> bytes:
        """An error event for the agent (the upstream broke off); ends its stream."""
        if self.ended:
            return b""
        self.ended, self.failed = True, message
        return self._builder.error(agent_error(self._api, status, None, f"llm-traj bridge: {message}"))

    def _data(self, data: str | bytes | None) -> bytes:
        """The agent's bytes for one upstream event's data."""
        if data is None or self.ended:
            return b""  # keep-alive comments: the agent's API has its own (or none)
        if data.strip() in ("[DONE]", b"[DONE]"):
            self.done = True
            return b""
        try:
            chunk = from_json(data)
        except ValueError:
            return self.fail(f"the upstream sent an event that is not JSON: {data[:200]!r}")
        if not isinstance(chunk, dict):
            return self.fail(f"the upstream sent an event that is not an object: {data[:200]!r}")
        if "error" in chunk and not chunk.get("choices"):
            self.ended, self.failed = True, "the upstream's stream carried an error"
            return self._builder.error(agent_error(self._api, 500, chunk, "the upstream failed"))
        if isinstance(chunk.get("usage"), dict):
            self._ending.usage = chunk["usage"]
        out = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if choice.get("index", 0) != 0:
                return self.fail("the upstream answered with several choices; the agent's API has one answer")
            pieces = _delta_of(choice.get("delta"))
            try:
                if "tool_calls" in pieces:
                    pieces["tool_calls"] = self._calls.fragments(pieces["tool_calls"])
                if choice.get("finish_reason") is not None and (waiting := self._calls.flush()):
                    pieces["tool_calls"] = [*pieces.get("tool_calls", ()), *waiting]
                if any(pieces.values()) or not self._started:  # the agent's stream starts with the upstream's
                    self._started = True
                    out.append(self._builder.delta({k: v for k, v in pieces.items() if v}))
            except ValueError as exc:  # e.g. text between a tool call's fragments
                out.append(self.fail(f"the upstream's stream cannot be translated: {exc}"))
                break
            self._ending.choice(choice)
        return b"".join(out)


def translate_body(api: ApiShape, agent_request: Any, chat_request: Any, completion: Any) -> dict[str, Any]:
    """A non-streamed chat completion as the agent's API's final object (ValueError when it is not one)."""
    choices = completion.get("choices") if isinstance(completion, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("the upstream's answer is not a chat completion with a choice")
    if len(choices) > 1:
        raise ValueError("the upstream answered with several choices; the agent's API has one answer")
    choice = choices[0]
    message = _delta_of(choice.get("message"))
    if isinstance(message.get("tool_calls"), list):  # as a stream's fragments: each with its index
        message["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"]) if isinstance(call, dict)]
    builder = api.new_stream(agent_request)
    ending = _Ending(chat_request)
    ending.choice(choice)
    ending.usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else None
    if message:
        builder.delta(message)
    ending.finish(builder)
    return builder.completion()
