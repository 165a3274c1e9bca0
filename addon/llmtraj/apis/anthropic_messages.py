"""Anthropic messages: `POST [/v1]/messages`.

A stream is a sequence of named events: `message_start` (the message with no
content), then per content block `content_block_start`, its
`content_block_delta`s and `content_block_stop`, then `message_delta` (stop
reason, final usage) and `message_stop`; `ping` keep-alives anywhere, and an
`error` event if the call fails after the headers went out. They are folded
into the `Message` a non-streamed call returns, following the anthropic SDK's
own accumulator (`anthropic.lib.streaming._messages.accumulate_event`), with
these differences, all about streams the SDK would reject or fields it drops:

- events that cannot be folded in (bad JSON, a delta before `message_start`,
  an index without a block, tool input that is not JSON) are `problems` and
  are skipped; the SDK raises.
- `message_delta` fields other than `stop_reason`/`stop_sequence` (e.g.
  `stop_details`, `container`) are copied only when the event carries them
  non-null (the SDK also sets `stop_details` to null when the event has none),
  and every non-null usage field overwrites, not only the five the SDK knows.
- an `error` event is a problem, and its error object is kept as the
  aggregate's `error` key: a partial message gains `"error": {...}`, and a
  stream that failed before `message_start` aggregates to the API's error body
  `{"type": "error", "error": {...}}`.
"""

from __future__ import annotations

import copy
import json
import secrets
from typing import Any

from pydantic_core import from_json

from ..core import sse
from ..core.jsontext import compact_json
from ..core.sse import SSEBlock
from .base import TextSlot, single_choice_view

# Blocks whose `input` is streamed as `input_json_delta` fragments (the beta
# API's `mcp_tool_use` as well: betas are served on the same path).
_TOOL_INPUT_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
# delta type -> (the block types it extends, the delta's field with the fragment)
_FRAGMENT_DELTAS = {
    "text_delta": (frozenset({"text"}), "text"),
    "thinking_delta": (frozenset({"thinking"}), "thinking"),
    "input_json_delta": (_TOOL_INPUT_BLOCKS, "partial_json"),
}
# How the stream builder starts the blocks it streams text into (a thinking
# block needs a signature, even an empty one, to be a valid block).
_EMPTY_BLOCKS = {"text": {"type": "text", "text": ""}, "thinking": {"type": "thinking", "thinking": "", "signature": ""}}
# chat-completions finish_reason -> Anthropic stop_reason (others pass through)
_STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}
# The usage counts the SDK's accumulator takes from message_delta (cumulative totals).
_DELTA_USAGE = ("output_tokens", "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                "server_tool_use", "output_tokens_details")


def _sse_event(name: str, data: dict[str, Any]) -> bytes:
    return sse.encode(compact_json(data), name)


class _StreamedBlock:
    """A content block as `content_block_start` gave it, plus the fragments its
    deltas carried since. `settle` folds them in: text is joined once and tool
    input parsed once, not at every delta."""

    __slots__ = ("data", "fragments", "partial_json")

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.fragments: list[str] = []
        self.partial_json = ""  # every input_json_delta so far (tool blocks)

    def settle(self, *, complete: bool) -> str | None:
        """Folds the pending fragments in; returns a problem when a complete
        block's tool input is not JSON."""
        if not self.fragments:
            return None
        joined = "".join(self.fragments)
        self.fragments.clear()
        kind = self.data.get("type")
        if kind in _TOOL_INPUT_BLOCKS:
            self.partial_json += joined
            return self._parse_input(complete)
        self.data[kind] = (self.data.get(kind) or "") + joined  # a text or thinking block's own field
        return None

    def _parse_input(self, complete: bool) -> str | None:
        if not self.partial_json:  # only empty fragments: the input as started ({})
            return None
        try:
            self.data["input"] = from_json(self.partial_json)
            return None
        except ValueError as exc:
            problem = f"input of {self.data.get('type')} {self.data.get('name')!r} is not JSON ({exc}): {self.partial_json[:200]!r}"
        try:  # what the SDK's snapshot shows for a cut-off block
            self.data["input"] = from_json(self.partial_json, allow_partial=True)
        except ValueError:
            pass
        return problem if complete else None


class AnthropicMessageAggregator:
    def __init__(self) -> None:
        self._message: dict[str, Any] | None = None
        self._blocks: list[_StreamedBlock] = []
        self._error: Any = None
        self.problems: list[str] = []
        self.done = False  # message_stop seen

    def add(self, block: SSEBlock) -> None:
        data = block.data
        if data is None or not block.terminated:
            return
        name = block.event
        if name == "ping":
            return
        try:
            event = from_json(data)
        except ValueError as exc:
            self.problems.append(f"{name or 'event'} is not JSON ({exc}): {data[:200]!r}")
            return
        self.add_parsed(name, data, event)

    def add_parsed(self, name: str | None, data: str, event: Any) -> None:
        if name == "ping":
            return
        if not isinstance(event, dict):
            self.problems.append(f"{name or 'event'} is not a JSON object: {data[:200]!r}")
            return
        if name is None:  # servers that leave out `event:` lines still type the data
            name = event.get("type")
        if name == "error":
            self.problems.append("error event: " + json.dumps(event.get("error", event))[:500])
            if self._error is None:
                self._error = event.get("error", event)
            return
        if name == "message_start":
            self._start(event, data)
            return
        handler = self._HANDLERS.get(name)
        if handler is None:
            return  # an event type added after this code (the SDK skips them too)
        if self._message is None:
            self.problems.append(f"{name} before message_start: {data[:200]!r}")
            return
        handler(self, event, data)

    def _start(self, event: dict[str, Any], data: str) -> None:
        message = event.get("message")
        if self._message is not None:
            self.problems.append(f"second message_start ignored: {data[:200]!r}")
            return
        if not isinstance(message, dict):
            self.problems.append(f"message_start without a message object: {data[:200]!r}")
            return
        content = message.get("content")
        self._message = message
        self._blocks = [_StreamedBlock(b) for b in content if isinstance(b, dict)] if isinstance(content, list) else []

    def _block_at(self, event: dict[str, Any], data: str) -> _StreamedBlock | None:
        index = event.get("index")
        if isinstance(index, int) and 0 <= index < len(self._blocks):
            return self._blocks[index]
        self.problems.append(f"{event.get('type')} for no started block: {data[:200]!r}")
        return None

    def _content_block_start(self, event: dict[str, Any], data: str) -> None:
        content_block = event.get("content_block")
        if not isinstance(content_block, dict):
            self.problems.append(f"content_block_start without a content block: {data[:200]!r}")
            return
        self._blocks.append(_StreamedBlock(content_block))

    def text_slot(self, name: str | None, event: Any) -> TextSlot | None:
        # a text, thinking or tool input delta: each one appends its fragment to the same block's
        if not isinstance(event, dict) or (name or event.get("type")) != "content_block_delta" or self._message is None:
            return None
        index, delta = event.get("index"), event.get("delta")
        if not (isinstance(index, int) and 0 <= index < len(self._blocks) and isinstance(delta, dict)):
            return None
        block = self._blocks[index]
        block_types, field = _FRAGMENT_DELTAS.get(delta.get("type"), ((), ""))
        if block.data.get("type") not in block_types or type(delta.get(field)) is not str:
            return None
        return TextSlot(("delta", field), (), block.fragments.append)

    def _content_block_delta(self, event: dict[str, Any], data: str) -> None:
        block = self._block_at(event, data)
        delta = event.get("delta")
        if block is None:
            return
        if not isinstance(delta, dict):
            self.problems.append(f"content_block_delta without a delta object: {data[:200]!r}")
            return
        kind, block_type = delta.get("type"), block.data.get("type")
        if kind in _FRAGMENT_DELTAS:
            block_types, field = _FRAGMENT_DELTAS[kind]
            fragment = delta.get(field)
            if block_type in block_types and isinstance(fragment, str):
                block.fragments.append(fragment)
                return
        elif kind == "signature_delta" and block_type == "thinking" and isinstance(delta.get("signature"), str):
            block.data["signature"] = delta["signature"]
            return
        elif kind == "citations_delta" and block_type == "text" and "citation" in delta:
            if not block.data.get("citations"):
                block.data["citations"] = []
            block.data["citations"].append(delta["citation"])
            return
        # Deltas carry content, so one not folded in leaves the message incomplete.
        self.problems.append(f"{kind} not folded into the {block_type} block: {data[:200]!r}")

    def _content_block_stop(self, event: dict[str, Any], data: str) -> None:
        block = self._block_at(event, data)
        if block is not None and (problem := block.settle(complete=True)):
            self.problems.append(problem)

    def _message_delta(self, event: dict[str, Any], data: str) -> None:
        message = self._message
        assert message is not None
        delta, usage = event.get("delta") or {}, event.get("usage") or {}
        if not isinstance(delta, dict) or not isinstance(usage, dict):
            self.problems.append(f"message_delta with a delta or usage that is not an object: {data[:200]!r}")
            return
        message["stop_reason"] = delta.get("stop_reason")
        message["stop_sequence"] = delta.get("stop_sequence")
        message.update((k, v) for k, v in delta.items() if v is not None)
        if usage:
            # message_delta counts are cumulative totals: they overwrite, and an
            # absent or null one leaves message_start's.
            message["usage"] = {**(message.get("usage") or {}), **{k: v for k, v in usage.items() if v is not None}}

    def _message_stop(self, event: dict[str, Any], data: str) -> None:
        self.done = True

    _HANDLERS = {
        "content_block_start": _content_block_start,
        "content_block_delta": _content_block_delta,
        "content_block_stop": _content_block_stop,
        "message_delta": _message_delta,
        "message_stop": _message_stop,
    }

    def result(self) -> dict[str, Any] | None:
        if self._message is None:
            return None if self._error is None else {"type": "error", "error": copy.deepcopy(self._error)}
        for block in self._blocks:
            block.settle(complete=False)  # blocks still open when the stream ended
        message = copy.deepcopy(self._message)
        message["content"] = [copy.deepcopy(block.data) for block in self._blocks]
        if self._error is not None:
            message["error"] = copy.deepcopy(self._error)
        return message


def _model(request: Any) -> str:
    return str(request.get("model") or "") if isinstance(request, dict) else ""


def _message_id() -> str:
    return "msg_llmtraj_" + secrets.token_hex(12)


def _tool_use_id() -> str:
    return "toolu_llmtraj_" + secrets.token_hex(12)


def _stop_reason(finish_reason: str | None, has_tools: bool) -> str:
    if finish_reason is None:
        return "tool_use" if has_tools else "end_turn"
    return _STOP_REASONS.get(finish_reason, finish_reason)


def _usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Anthropic usage from either shape a driver may push; chat-completions
    counts are converted (Anthropic's input_tokens leave out cache reads)."""
    if not usage:
        return {"input_tokens": 0, "output_tokens": 0}
    if "input_tokens" in usage or "output_tokens" in usage:
        return {"input_tokens": 0, "output_tokens": 0, **usage}
    details = usage.get("prompt_tokens_details")
    cached = (details.get("cached_tokens") if isinstance(details, dict) else None) or 0
    converted = {"input_tokens": (usage.get("prompt_tokens") or 0) - cached, "output_tokens": usage.get("completion_tokens") or 0}
    if cached:
        converted["cache_read_input_tokens"] = cached
    return converted


def _tool_input(arguments: Any, position: int) -> dict[str, Any]:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise ValueError(f"tool_calls[{position}]: function.arguments is not JSON ({exc})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"tool_calls[{position}]: function.arguments must be a JSON object (a tool_use input)")
    return arguments


def _tool_use(call: Any, position: int) -> dict[str, Any]:
    """A tool_use block from a driver's chat-style `{"id"?, "function": {"name", "arguments"}}`
    (arguments a JSON string or an object)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"tool_calls[{position}] needs function.name (a string)")
    return {
        "type": "tool_use",
        "id": call.get("id") or _tool_use_id(),
        "name": function["name"],
        "input": _tool_input(function.get("arguments"), position),
    }


class AnthropicMessageStream:
    """A messages stream built from a driver's chat-completions-style deltas
    (anti-call): `content` becomes a text block, `reasoning_content` (or
    `thinking`) a thinking block, each `tool_calls` index a tool_use block
    whose arguments fragments are its input_json_deltas. A change of kind
    closes the open block and starts the next. It aggregates what it builds,
    so a non-streaming agent can get the same answer as JSON."""

    def __init__(self, request: Any) -> None:
        self._head = {
            "id": _message_id(), "type": "message", "role": "assistant", "model": _model(request),
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0},
        }  # fmt: skip
        self._aggregator = AnthropicMessageAggregator()
        self._unfolded: list[SSEBlock] = []  # built, not yet folded: only a non-streamed answer needs the aggregate
        self._started = False
        self._blocks = 0  # content blocks started so far
        self._open: str | int | None = None  # "text", "thinking" or a tool call's index
        self._tools: set[int] = set()  # tool call indexes started
        self._finish_reason: str | None = None

    def _event(self, name: str, data: dict[str, Any]) -> bytes:
        text = compact_json(data)
        self._unfolded.append(SSEBlock(raw=b"", event=name, data=text))
        return sse.encode(text, name)

    def _begin(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        return [self._event("message_start", {"type": "message_start", "message": self._head})]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [self._event("content_block_stop", {"type": "content_block_stop", "index": self._blocks - 1})]

    def _open_block(self, kind: str | int, content_block: dict[str, Any]) -> list[bytes]:
        events = self._close()
        self._open = kind
        self._blocks += 1
        start = {"type": "content_block_start", "index": self._blocks - 1, "content_block": content_block}
        return events + [self._event("content_block_start", start)]

    def _fragment(self, kind: str, key: str, fragment: Any) -> list[bytes]:
        if fragment is None or fragment == "":
            return []
        if not isinstance(fragment, str):
            raise ValueError(f"a delta's {key} must be a string")
        events = [] if self._open == kind else self._open_block(kind, dict(_EMPTY_BLOCKS[kind]))
        delta = {"type": f"{kind}_delta", kind: fragment}
        return events + [self._event("content_block_delta", {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta})]

    def _tool_call(self, call: Any) -> list[bytes]:
        index = call.get("index") if isinstance(call, dict) else None
        if not isinstance(index, int):
            raise ValueError("each tool_calls fragment needs an integer index")
        function = call.get("function") or {}
        if not isinstance(function, dict):
            raise ValueError(f"tool call {index}: function must be an object")
        events = []
        if index not in self._tools:
            if not isinstance(function.get("name"), str):
                raise ValueError(f"the first fragment of tool call {index} needs function.name (a string)")
            self._tools.add(index)
            tool_use = {"type": "tool_use", "id": call.get("id") or _tool_use_id(), "name": function["name"], "input": {}}
            events = self._open_block(index, tool_use)
        elif self._open != index:
            raise ValueError(f"tool call {index} continues after another content block started (Anthropic streams one block at a time)")
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        if arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            events.append(self._event("content_block_delta", {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta}))
        return events

    def delta(self, delta: dict[str, Any], *, index: int = 0, finish_reason: str | None = None,
              logprobs: Any = None) -> bytes:
        if index != 0:
            raise ValueError(f"an Anthropic message has one answer: delta index must be 0, not {index}")
        if finish_reason is not None:
            self._finish_reason = finish_reason
        reasoning_key = "reasoning_content" if delta.get("reasoning_content") is not None else "thinking"
        tool_calls = delta.get("tool_calls") or []
        if not isinstance(tool_calls, list):
            raise ValueError("a delta's tool_calls must be a list")
        events = self._begin()
        events += self._fragment("thinking", reasoning_key, delta.get(reasoning_key))
        events += self._fragment("text", "content", delta.get("content"))
        for call in tool_calls:
            events += self._tool_call(call)
        return b"".join(events)

    def finish(self, *, finish_reason: str | None = None, usage: dict[str, Any] | None = None,
               stop_sequence: str | None = None) -> bytes:
        events = self._begin() + self._close()
        stop_reason = "stop_sequence" if stop_sequence is not None else _stop_reason(finish_reason or self._finish_reason, bool(self._tools))
        events.append(self._event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}, "usage": _usage(usage),
        }))  # fmt: skip
        events.append(self._event("message_stop", {"type": "message_stop"}))
        return b"".join(events)

    def error(self, body: dict[str, Any]) -> bytes:
        return _sse_event("error", body)

    def completion(self) -> dict[str, Any]:
        for block in self._unfolded:
            self._aggregator.add(block)
        self._unfolded.clear()
        return self._aggregator.result() or copy.deepcopy(self._head)


def _start_block(block: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A finished content block as a stream starts it, and the deltas that complete it."""
    kind = block.get("type")
    if kind == "text":
        citations = block.get("citations")
        start = {**block, "text": ""}
        deltas = []
        if isinstance(citations, list) and citations:
            start["citations"] = []
            deltas += [{"type": "citations_delta", "citation": c} for c in citations]
        if block.get("text"):
            deltas.append({"type": "text_delta", "text": block["text"]})
        return start, deltas
    if kind == "thinking":
        start, deltas = {**block, "thinking": ""}, []
        if block.get("thinking"):
            deltas.append({"type": "thinking_delta", "thinking": block["thinking"]})
        if block.get("signature"):
            start["signature"] = ""
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        return start, deltas
    if kind in _TOOL_INPUT_BLOCKS and "input" in block:
        partial_json = json.dumps(block["input"], ensure_ascii=False, separators=(",", ":"))
        return {**block, "input": {}}, [{"type": "input_json_delta", "partial_json": partial_json}]
    return block, []  # redacted_thinking, tool results, ...: sent whole at the start


class AnthropicMessages:
    name = "anthropic.messages"
    final_events = (b"event: message_stop",)
    final_endings = (b'"message_stop"}\n\n',)  # (Anthropic's data: {"type":"message_stop"})

    def matches(self, method: str, path: str) -> bool:
        path = path.rstrip("/")
        return method == "POST" and (path.endswith("/v1/messages") or path == "/messages")

    def new_aggregator(self) -> AnthropicMessageAggregator:
        return AnthropicMessageAggregator()

    def chunks_from_final(self, final: dict[str, Any]) -> list[bytes]:
        # As the API streams: message_start with the message minus its content
        # and end-of-turn fields (its usage is the final one; the API sends an
        # early output_tokens count there, which message_delta overwrites
        # either way); each block started empty, one delta per kind of content,
        # stopped; then message_delta with the end-of-turn fields and the
        # usage counts it carries (the ones the SDK folds in); message_stop.
        content = final.get("content")
        if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
            raise ValueError("a message's content must be a list of content block objects")
        usage = final.get("usage") if isinstance(final.get("usage"), dict) else {"input_tokens": 0, "output_tokens": 0}
        head = {**final, "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
        if "stop_details" in final:
            head["stop_details"] = None
        events = [_sse_event("message_start", {"type": "message_start", "message": head})]
        for index, block in enumerate(content):
            start, deltas = _start_block(block)
            events.append(_sse_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}))
            events += [_sse_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas]
            events.append(_sse_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        end = {"stop_reason": final.get("stop_reason"), "stop_sequence": final.get("stop_sequence")}
        if "stop_details" in final:
            end["stop_details"] = final["stop_details"]
        delta_usage = {k: usage[k] for k in _DELTA_USAGE if usage.get(k) is not None}
        events.append(_sse_event("message_delta", {"type": "message_delta", "delta": end, "usage": {"output_tokens": 0, **delta_usage}}))
        events.append(_sse_event("message_stop", {"type": "message_stop"}))
        return events

    def error_body(self, message: str, type: str, code: str | None = None) -> dict[str, Any]:
        # Anthropic errors have no code; llm-traj's own (replay_miss, model_not_found) is kept beside for scripts
        return {"type": "error", "error": {"type": type, "message": message, **({"code": code} if code else {})}}

    def wants_stream(self, request: Any) -> bool:
        return isinstance(request, dict) and request.get("stream") is True

    def completion_from_text(self, request: Any, text: str | None, *, tool_calls: list[dict[str, Any]] | None = None,
                             finish_reason: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        tool_uses = [_tool_use(call, i) for i, call in enumerate(tool_calls or [])]
        content: list[dict[str, Any]] = [{"type": "text", "text": text or ""}] if text or not tool_uses else []
        return {
            "id": _message_id(),
            "type": "message",
            "role": "assistant",
            "model": _model(request),
            "content": content + tool_uses,
            "stop_reason": _stop_reason(finish_reason, bool(tool_uses)),
            "stop_sequence": None,
            "usage": _usage(usage),
        }

    def new_stream(self, request: Any) -> AnthropicMessageStream:
        return AnthropicMessageStream(request)

    def chat_view(self, final: dict[str, Any]) -> dict[str, Any]:
        content = final.get("content")
        if not isinstance(content, list):
            return final
        texts, thinking, calls = [], [], []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(block.get("text") or "")
            elif kind == "thinking":
                thinking.append(block.get("thinking") or "")
            elif kind in _TOOL_INPUT_BLOCKS:
                arguments = json.dumps(block.get("input", {}), ensure_ascii=False)
                calls.append({"id": block.get("id"), "type": "function", "function": {"name": block.get("name"), "arguments": arguments}})
        finish = {v: k for k, v in _STOP_REASONS.items()}.get(final.get("stop_reason"), final.get("stop_reason"))
        usage, chat_usage = final.get("usage"), None
        if isinstance(usage, dict):
            prompt = sum(usage.get(k) or 0 for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
            completion = usage.get("output_tokens") or 0
            chat_usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return single_choice_view(final, texts=texts, reasoning="".join(thinking), tool_calls=calls,
                                  finish_reason=finish, usage=chat_usage)  # fmt: skip

    def chat_request_view(self, request: Any) -> dict[str, Any] | None:
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            return None
        messages: list[dict[str, Any]] = []
        if request.get("system"):
            messages.append({"role": "system", "content": _plain_text(request["system"])})
        for message in request["messages"]:
            if isinstance(message, dict):
                messages += _chat_messages(message)
        view: dict[str, Any] = {"model": request.get("model"), "messages": messages}
        tools = [  # client tools as functions; server tools (web search, ...) run at Anthropic: kept as they are
            {"type": "function", "function": {k: v for k, v in (("name", t.get("name")), ("description", t.get("description")),
                                                                ("parameters", t["input_schema"])) if v is not None}}
            if "input_schema" in t else dict(t)
            for t in request.get("tools") or [] if isinstance(t, dict)
        ]  # fmt: skip
        if tools:
            view["tools"] = tools
        return view


def _plain_text(content: Any) -> str:
    """The text of a system prompt or tool result: a string, or its text blocks joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text") or "" for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _chat_part(block: dict[str, Any]) -> dict[str, Any]:
    if block.get("type") == "text":
        return {"type": "text", "text": block.get("text") or ""}
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if block.get("type") == "image" and source.get("type") == "base64":
        return {"type": "image_url", "image_url": {"url": f"data:{source.get('media_type')};base64,{source.get('data')}"}}
    if block.get("type") == "image" and source.get("type") == "url":
        return {"type": "image_url", "image_url": {"url": source.get("url")}}
    return {"type": "text", "text": f"[{block.get('type')}]"}


def _chat_messages(message: dict[str, Any]) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: an assistant turn's blocks in one
    message (text, thinking as reasoning_content, tool_use as tool_calls); a user
    turn's tool results as tool messages first, then what else it says."""
    role, content = message.get("role"), message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    blocks = [b for b in content or [] if isinstance(b, dict)]
    if role == "assistant":
        view = AnthropicMessages().chat_view({"content": blocks})
        return [view["choices"][0]["message"]]
    out = [{"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": _plain_text(b.get("content"))}
           for b in blocks if b.get("type") == "tool_result"]  # fmt: skip
    parts = [_chat_part(b) for b in blocks if b.get("type") != "tool_result"]
    if parts:
        only_text = all(p["type"] == "text" for p in parts)
        out.append({"role": role, "content": "".join(p["text"] for p in parts) if only_text else parts})
    return out
