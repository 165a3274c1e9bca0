"""OpenAI Responses API: `POST [/v1]/responses`.

A stream is typed events (`event: <type>`, `data: {"type", "sequence_number", ...}`):
`response.created` and `response.in_progress` carry the response without output; each
output item is announced empty (`response.output_item.added`), its parts and texts grow
by `*.added` / `*.delta` events and are repeated whole by `*.done` events, then the
whole item comes in `response.output_item.done`. `response.completed` (or `incomplete`,
`failed`) ends the stream with the final response, output included; there is no
`[DONE]`. That final response is the aggregate, as the openai SDK's stream state gives
it; a stream cut short is rebuilt from the items and texts it carried.
"""

from __future__ import annotations

import copy
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import from_json

from ..core import sse
from ..core.jsontext import compact_json
from ..core.sse import SSEBlock
from .base import TextSlot, single_choice_view
from .chat_completions import ChatCompletions, _model, _tool_call

_SNAPSHOT_EVENTS = {"response.created", "response.in_progress", "response.queued"}
# The event that ends a stream, by the final response's status (any other status ends as completed).
_END_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed"}
# An item's lists of parts: the prefix of the events that announce and close a part, and their index field.
_PART_LISTS = {
    "content": ("response.content_part", "content_index"),
    "summary": ("response.reasoning_summary_part", "summary_index"),
}
# The lists an item type streams part by part, in the order the API streams them.
_ITEM_PARTS = {"message": ("content",), "reasoning": ("summary", "content")}
# A driver's chat-style finish reasons that leave a response incomplete, with the reason Responses gives.
_INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}
# Response fields that echo the request, with what the API answers when the request leaves them out.
_ECHOED = {
    "background": False,
    "instructions": None,
    "max_output_tokens": None,
    "max_tool_calls": None,
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "prompt_cache_key": None,
    "reasoning": {"effort": None, "summary": None},
    "safety_identifier": None,
    "service_tier": "default",
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}, "verbosity": "medium"},
    "tool_choice": "auto",
    "tools": [],
    "top_logprobs": 0,
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
    "metadata": {},
}


@dataclass(frozen=True)
class _Text:
    """A streamed text of an output item: the prefix of its `.delta` / `.done`
    events, its field, and for a text held in a part, the item's list of parts
    and the part's type."""

    events: str
    key: str
    parts: str | None = None
    part_type: str | None = None


_OUTPUT_TEXT = _Text("response.output_text", "text", "content", "output_text")
_REFUSAL = _Text("response.refusal", "refusal", "content", "refusal")
_REASONING_TEXT = _Text("response.reasoning_text", "text", "content", "reasoning_text")
_SUMMARY_TEXT = _Text("response.reasoning_summary_text", "text", "summary", "summary_text")
_ARGUMENTS = _Text("response.function_call_arguments", "arguments")
_CUSTOM_INPUT = _Text("response.custom_tool_call_input", "input")
_TEXTS = (_OUTPUT_TEXT, _REFUSAL, _REASONING_TEXT, _SUMMARY_TEXT, _ARGUMENTS, _CUSTOM_INPUT)
_TEXT_OF_PART = {(text.parts, text.part_type): text for text in _TEXTS if text.parts}
_TEXT_OF_ITEM = {"function_call": _ARGUMENTS, "custom_tool_call": _CUSTOM_INPUT}
# A part event's type -> (its item's list of parts, whether it closes the part)
_PART_EVENTS = {
    f"{prefix}.{stage}": (parts, stage == "done") for parts, (prefix, _) in _PART_LISTS.items() for stage in ("added", "done")
}
# A text event's type -> (its text, its stage): most of a stream's events are `.delta`s.
_TEXT_EVENTS = {f"{text.events}.{stage}": (text, stage) for text in _TEXTS for stage in ("delta", "done")}


def _new_id(prefix: str) -> str:
    return f"{prefix}_llmtraj_{secrets.token_hex(16)}"


def _new_part(text: _Text, value: str) -> dict[str, Any]:
    extra = {"annotations": [], "logprobs": []} if text is _OUTPUT_TEXT else {}
    return {"type": text.part_type, **extra, text.key: value}


def _at(item: dict[str, Any], output_index: int, parts: str | None = None, part_index: int = 0) -> dict[str, Any]:
    """The fields locating an event's text: its item, and its part if it has one."""
    at = {"item_id": item.get("id"), "output_index": output_index}
    if parts is not None:
        at[_PART_LISTS[parts][1]] = part_index
    return at


class _EventWriter:
    """Makes a stream's events, numbered in order (`sequence_number`)."""

    def __init__(self) -> None:
        self._next = 0

    def event(self, type: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type, "sequence_number": self._next, **fields}
        self._next += 1
        return event

    def part_added(self, at: dict[str, Any], parts: str, part: dict[str, Any]) -> dict[str, Any]:
        return self.event(_PART_LISTS[parts][0] + ".added", **at, part=part)

    def part_done(self, at: dict[str, Any], parts: str, part: dict[str, Any]) -> dict[str, Any]:
        return self.event(_PART_LISTS[parts][0] + ".done", **at, part=part)

    # The SDK's event types require `logprobs` on output text events and `name` on arguments.done.
    def text_delta(self, at: dict[str, Any], text: _Text, delta: str, logprobs: list[Any] | None = None) -> dict[str, Any]:
        extra = {"logprobs": logprobs or []} if text is _OUTPUT_TEXT else {}
        return self.event(text.events + ".delta", **at, delta=delta, **extra)

    def text_done(self, at: dict[str, Any], text: _Text, value: str, *, logprobs: list[Any] | None = None,
                  name: str | None = None) -> dict[str, Any]:
        extra: dict[str, Any] = {"logprobs": logprobs or []} if text is _OUTPUT_TEXT else {}
        if text is _ARGUMENTS:
            extra["name"] = name
        return self.event(text.events + ".done", **at, **{text.key: value}, **extra)


def _item_events(writer: _EventWriter, index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    """One whole output item as the API streams it: announced empty, each
    text as one delta, then whole."""
    item_type = item.get("type")
    part_lists = [parts for parts in _ITEM_PARTS.get(item_type, ()) if isinstance(item.get(parts), list)]
    item_text = _TEXT_OF_ITEM.get(item_type)
    announced = {**item, **{parts: [] for parts in part_lists}}
    if "status" in item:
        announced["status"] = "in_progress"
    if item_text is not None:
        announced[item_text.key] = ""
    events = [writer.event("response.output_item.added", output_index=index, item=announced)]
    for parts in part_lists:
        for part_index, part in enumerate(item[parts]):
            events += _part_events(writer, _at(item, index, parts, part_index), parts, part)
    if item_text is not None:
        value = item.get(item_text.key) or ""
        if value:
            events.append(writer.text_delta(_at(item, index), item_text, value))
        events.append(writer.text_done(_at(item, index), item_text, value, name=item.get("name")))
    events.append(writer.event("response.output_item.done", output_index=index, item=item))
    return events


def _part_events(writer: _EventWriter, at: dict[str, Any], parts: str, part: dict[str, Any]) -> list[dict[str, Any]]:
    text = _TEXT_OF_PART.get((parts, part.get("type")))
    if text is None:  # no streamed text (e.g. audio): the part comes whole
        return [writer.part_added(at, parts, part), writer.part_done(at, parts, part)]
    value = part.get(text.key) or ""
    announced = {**part, text.key: "", **{key: [] for key in ("annotations", "logprobs") if key in part}}
    events = [writer.part_added(at, parts, announced)]
    if value:
        events.append(writer.text_delta(at, text, value, part.get("logprobs")))
    events.append(writer.text_done(at, text, value, logprobs=part.get("logprobs")))
    events.append(writer.part_done(at, parts, part))
    return events


def _get(event: dict[str, Any], key: str, kind: type) -> Any:
    value = event.get(key)
    if type(value) is kind and (kind is not int or value >= 0):  # the usual case, settled at once
        return value
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key} is not {'an' if kind is int else 'a'} {kind.__name__}")
    if kind is int and value < 0:
        raise ValueError(f"{key} is negative")
    return value


class ResponsesAggregator:
    def __init__(self) -> None:
        self._snapshot: dict[str, Any] | None = None  # the response as last announced, without output
        self._final: dict[str, Any] | None = None  # from the event that ended the stream
        self._items: dict[int, dict[str, Any]] = {}  # output_index -> the item as announced (or done)
        # output_index -> (parts, part index, field) -> the pieces of a text not yet in its item:
        # joined once in result(), so each delta costs only its own size.
        self._texts: dict[int, dict[tuple[str | None, int | None, str], list[str]]] = {}
        self._error: dict[str, Any] | None = None
        self.problems: list[str] = []

    @property
    def done(self) -> bool:
        """Whether the event that ends a stream came (completed, incomplete, failed)."""
        return self._final is not None

    def add(self, block: SSEBlock) -> None:
        data = block.data
        if data is None or not block.terminated:
            return
        try:
            event = from_json(data)
        except ValueError as exc:
            if data.strip() != "[DONE]":  # [DONE]: some compatible servers
                self.problems.append(f"event is not JSON ({exc}): {data[:200]!r}")
            return
        self.add_parsed(block.event, data, event)

    def add_parsed(self, name: str | None, data: str, event: Any) -> None:
        if not isinstance(event, dict):
            self.problems.append(f"event is not a JSON object: {data[:200]!r}")
            return
        kind = event.get("type") or name
        if not isinstance(kind, str):
            self.problems.append(f"event without a type: {data[:200]!r}")
            return
        try:
            self._fold(kind, event)
        except ValueError as exc:
            self.problems.append(f"{kind} event not folded in ({exc}): {data[:200]!r}")

    def _fold(self, kind: str, event: dict[str, Any]) -> None:
        if (text_event := _TEXT_EVENTS.get(kind)) is not None:
            self._fold_text(*text_event, event)
        elif kind in _SNAPSHOT_EVENTS:
            self._snapshot = _get(event, "response", dict)
        elif kind in _END_EVENTS.values():
            self._final = _get(event, "response", dict)
        elif kind == "error":
            # documented flat ({code, message, param}); OpenAI sends it nested under `error` too
            error = event["error"] if isinstance(event.get("error"), dict) else event
            self._error = {"code": error.get("code"), "message": error.get("message")}
            details = {k: v for k, v in event.items() if k not in ("type", "sequence_number")}
            self.problems.append("error event: " + compact_json(details)[:500])
        elif kind in ("response.output_item.added", "response.output_item.done"):
            index = _get(event, "output_index", int)
            self._items[index] = _get(event, "item", dict)
            self._texts.pop(index, None)  # the item as sent holds every text so far
        elif kind in _PART_EVENTS:
            parts, done = _PART_EVENTS[kind]
            output_index, item = self._item(event)
            part_index = _get(event, _PART_LISTS[parts][1], int)
            self._put_part(item, parts, part_index, _get(event, "part", dict))
            if done:
                texts = self._texts.get(output_index, {})
                for key in [key for key in texts if key[:2] == (parts, part_index)]:
                    del texts[key]
        # other events (annotations, built-in tool progress) are repeated by output_item.done

    def text_slot(self, name: str | None, event: Any) -> TextSlot | None:
        # a text's delta event: each one appends its `delta` to the same pieces (its sequence number and padding
        # are not read)
        if not isinstance(event, dict):
            return None
        kind = event.get("type") or name
        text_event = _TEXT_EVENTS.get(kind) if isinstance(kind, str) else None
        if text_event is None or text_event[1] != "delta" or type(event.get("delta")) is not str:
            return None
        try:
            pieces = self._text_pieces(text_event[0], event)
        except ValueError:
            return None
        return TextSlot(("delta",), (("sequence_number",), ("obfuscation",)), pieces.append)

    def _fold_text(self, text: _Text, stage: str, event: dict[str, Any]) -> None:
        pieces = self._text_pieces(text, event)
        if stage == "delta":
            pieces.append(_get(event, "delta", str))
        else:
            pieces[:] = [_get(event, text.key, str)]

    def _text_pieces(self, text: _Text, event: dict[str, Any]) -> list[str]:
        """The pieces of the text an event of `text` is about (its part put in if it was not announced)."""
        output_index, item = self._item(event)
        part_index = None
        if text.parts is not None:
            part_index = _get(event, _PART_LISTS[text.parts][1], int)
            if part_index >= len(item.get(text.parts) or []):  # a text whose part was not announced
                self._put_part(item, text.parts, part_index, _new_part(text, ""))
        texts = self._texts.get(output_index)
        if texts is None:
            texts = self._texts[output_index] = {}
        key = (text.parts, part_index, text.key)
        pieces = texts.get(key)
        if pieces is None:
            pieces = texts[key] = []
        return pieces

    def _item(self, event: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        index = _get(event, "output_index", int)
        item = self._items.get(index)
        if item is None:
            raise ValueError(f"output item {index} was not announced")
        return index, item

    @staticmethod
    def _put_part(item: dict[str, Any], parts: str, index: int, part: dict[str, Any]) -> None:
        part_list = item.get(parts)
        if not isinstance(part_list, list):
            part_list = item[parts] = []
        if index > len(part_list):
            raise ValueError(f"{parts} part {index} comes before part {len(part_list)}")
        part_list[index:index + 1] = [part]

    def result(self) -> dict[str, Any] | None:
        if self._final is not None:
            return copy.deepcopy(self._final)
        if self._snapshot is None and not self._items and self._error is None:
            return None
        response = copy.deepcopy(self._snapshot) if self._snapshot is not None else {"object": "response"}
        response["output"] = [self._item_so_far(index) for index in sorted(self._items)]
        if self._error is not None and not response.get("error"):
            response["error"] = self._error
        return response

    def _item_so_far(self, index: int) -> dict[str, Any]:
        item = copy.deepcopy(self._items[index])
        for (parts, part_index, key), pieces in self._texts.get(index, {}).items():
            target = item if parts is None else item[parts][part_index]
            target[key] = "".join(pieces)
        return item


def _usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Usage in the Responses shape; a driver may give it in chat's
    (prompt_tokens / completion_tokens)."""
    usage = usage or {}
    chat = "input_tokens" not in usage and "output_tokens" not in usage
    input_tokens = usage.get("prompt_tokens" if chat else "input_tokens") or 0
    output_tokens = usage.get("completion_tokens" if chat else "output_tokens") or 0
    input_details = usage.get("prompt_tokens_details" if chat else "input_tokens_details") or {}
    output_details = usage.get("completion_tokens_details" if chat else "output_tokens_details") or {}
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": input_details.get("cached_tokens") or 0,
                                 "cache_write_tokens": input_details.get("cache_write_tokens") or 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": output_details.get("reasoning_tokens") or 0},
        "total_tokens": usage.get("total_tokens") or input_tokens + output_tokens,
    }


def _new_response(request: Any) -> dict[str, Any]:
    """The response to `request` as `response.created` announces it: in progress, no output."""
    fields = request if isinstance(request, dict) else {}
    response = {
        "id": _new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "model": _model(request),
        "output": [],
        "usage": None,
    }
    for key, default in _ECHOED.items():
        value = fields.get(key)
        response[key] = copy.deepcopy(default if value is None else value)
    return response


def _ending(finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    """The status and incomplete_details a chat-style finish reason gives a response."""
    reason = _INCOMPLETE_REASONS.get(finish_reason or "")
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


def _message_item(text: str) -> dict[str, Any]:
    content = [_new_part(_OUTPUT_TEXT, text)]
    return {"id": _new_id("msg"), "type": "message", "status": "completed", "content": content, "role": "assistant"}


def _function_call_item(call: dict[str, Any], *, status: str = "completed") -> dict[str, Any]:
    """A function_call item from a chat-style tool call (as `_tool_call` completes it)."""
    function = call["function"]
    return {"id": _new_id("fc"), "type": "function_call", "status": status, "arguments": function["arguments"],
            "call_id": call["id"], "name": function["name"]}  # fmt: skip


@dataclass
class _OpenItem:
    source: str | int  # the driver's name for it: "content", "reasoning_content", or a tool call's index
    output_index: int
    item: dict[str, Any]  # as announced
    text: _Text  # the text its deltas grow
    pieces: list[str] = field(default_factory=list)

    @property
    def at(self) -> dict[str, Any]:
        return _at(self.item, self.output_index, self.text.parts)


class ResponsesStream:
    """A `response.*` event stream built from a driver's chat-completions-style
    deltas (anti-call): `content` grows a message, `reasoning_content` a
    reasoning item's summary (what Responses clients such as Codex show; raw
    reasoning text they hide by default), each tool call a function_call item.
    A response has one output list of items streamed one after the other, so a
    delta of another kind closes the open item. It aggregates what it builds,
    so a non-streaming agent can get the same answer as JSON."""

    def __init__(self, request: Any) -> None:
        self._response = _new_response(request)
        self._writer = _EventWriter()
        self._aggregator = ResponsesAggregator()
        self._unfolded: list[SSEBlock] = []  # built, not yet folded: only a non-streamed answer needs the aggregate
        self._output: list[dict[str, Any]] = []  # the closed items
        self._open: _OpenItem | None = None
        self._closed_calls: set[int] = set()
        self._finish_reason: str | None = None
        self._started = False

    def delta(self, delta: dict[str, Any], *, index: int = 0, finish_reason: str | None = None,
              logprobs: Any = None) -> bytes:
        """`logprobs` are not carried: chat's per-choice logprobs have no place in a Responses stream."""
        if index != 0:
            raise ValueError(f"choice index {index}: a response has a single output list, so deltas must use index 0")
        texts = [(source, delta.get(source)) for source in ("reasoning_content", "content")]
        for source, value in texts:
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{source} must be a string")
        calls = self._tool_call_fragments(delta.get("tool_calls"), after_text=any(value for _, value in texts))
        events = self._start()
        for source, value in texts:
            if value:
                events += self._grow(source, value)
        for call_index, call, arguments in calls:
            events += self._grow(call_index, arguments, call)
        if finish_reason is not None:
            self._finish_reason = finish_reason
        return self._write(events)

    def _tool_call_fragments(self, fragments: Any, *, after_text: bool) -> list[tuple[int, dict[str, Any] | None, str]]:
        """Chat-style tool call fragments as (call index, the whole call when the
        fragment starts one, arguments), all checked before anything is sent:
        the calls stream one after the other, so a closed one cannot continue."""
        if not fragments:
            return []
        if not isinstance(fragments, list):
            raise ValueError("tool_calls must be a list")
        open_source = self._open.source if self._open is not None else None
        closed = set(self._closed_calls)
        if after_text and isinstance(open_source, int):  # the delta's text goes first and closes the open call
            closed.add(open_source)
        open_call = None if after_text else open_source
        checked = []
        for position, fragment in enumerate(fragments):
            call_index = fragment.get("index") if isinstance(fragment, dict) else None
            if not isinstance(call_index, int) or isinstance(call_index, bool):
                raise ValueError(f"tool_calls[{position}] needs an integer index")
            if call_index == open_call:
                function = fragment.get("function") or {}
                arguments = (function.get("arguments") or "") if isinstance(function, dict) else None
                if not isinstance(arguments, str):
                    raise ValueError(f"tool_calls[{position}].function.arguments must be a string fragment")
                checked.append((call_index, None, arguments))
                continue
            if call_index in closed:
                raise ValueError(f"tool call {call_index} continues after another output item began; "
                                 "Responses streams function calls one after the other")  # fmt: skip
            call = _tool_call(fragment, position)
            if isinstance(open_call, int):
                closed.add(open_call)
            open_call = call_index
            checked.append((call_index, call, call["function"]["arguments"]))
        return checked

    def _start(self) -> list[dict[str, Any]]:
        if self._started:
            return []
        self._started = True
        return [self._writer.event(kind, response=self._response) for kind in ("response.created", "response.in_progress")]

    def _grow(self, source: str | int, piece: str, call: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        continues = call is None and self._open is not None and self._open.source == source
        events = [] if continues else self._open_item(source, call)
        assert self._open is not None
        if piece:
            self._open.pieces.append(piece)
            events.append(self._writer.text_delta(self._open.at, self._open.text, piece))
        return events

    def _open_item(self, source: str | int, call: dict[str, Any] | None) -> list[dict[str, Any]]:
        events = self._close()
        if source == "content":
            item = {"id": _new_id("msg"), "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
            text = _OUTPUT_TEXT
        elif source == "reasoning_content":
            item, text = {"id": _new_id("rs"), "type": "reasoning", "summary": []}, _SUMMARY_TEXT
        else:
            assert call is not None
            item, text = {**_function_call_item(call, status="in_progress"), "arguments": ""}, _ARGUMENTS
        self._open = opened = _OpenItem(source, len(self._output), item, text)
        events.append(self._writer.event("response.output_item.added", output_index=opened.output_index, item=item))
        if text.parts is not None:
            events.append(self._writer.part_added(opened.at, text.parts, _new_part(text, "")))
        return events

    def _close(self) -> list[dict[str, Any]]:
        closing, self._open = self._open, None
        if closing is None:
            return []
        value, text, at = "".join(closing.pieces), closing.text, closing.at
        item = dict(closing.item)
        if "status" in item:
            item["status"] = "completed"
        if text.parts is not None:
            part = _new_part(text, value)
            item[text.parts] = [part]
            events = [self._writer.text_done(at, text, value), self._writer.part_done(at, text.parts, part)]
        else:
            item[text.key] = value
            events = [self._writer.text_done(at, text, value, name=item.get("name"))]
        if isinstance(closing.source, int):
            self._closed_calls.add(closing.source)
        events.append(self._writer.event("response.output_item.done", output_index=closing.output_index, item=item))
        self._output.append(item)
        return events

    def finish(self, *, finish_reason: str | None = None, usage: dict[str, Any] | None = None,
               stop_sequence: str | None = None) -> bytes:
        events = self._start() + self._close()
        status, incomplete_details = _ending(finish_reason or self._finish_reason)
        final = {**self._response, "status": status, "incomplete_details": incomplete_details,
                 "output": self._output, "usage": _usage(usage)}  # fmt: skip
        events.append(self._writer.event(_END_EVENTS[status], response=final))
        return self._write(events)

    def error(self, body: dict[str, Any]) -> bytes:
        # The documented event is flat; OpenAI also nests the error object,
        # which is what the openai SDKs look for to raise.
        error = body.get("error") if isinstance(body.get("error"), dict) else body
        event = self._writer.event("error", code=error.get("code"), message=error.get("message"),
                                   param=error.get("param"), error=error)  # fmt: skip
        return self._write([event])

    def completion(self) -> dict[str, Any]:
        for block in self._unfolded:
            self._aggregator.add(block)
        self._unfolded.clear()
        return self._aggregator.result() or copy.deepcopy(self._response)

    def _write(self, events: list[dict[str, Any]]) -> bytes:
        chunks = []
        for event in events:
            data = compact_json(event)
            self._unfolded.append(SSEBlock(raw=b"", event=event["type"], data=data))
            chunks.append(sse.encode(data, event["type"]))
        return b"".join(chunks)


class Responses:
    name = "responses"
    final_events = (b"event: response.completed", b"event: response.incomplete", b"event: response.failed")
    final_endings = ()  # (the data is the whole response)

    # OpenAI's error shape and `stream` flag, as chat completions
    error_body = ChatCompletions.error_body
    wants_stream = ChatCompletions.wants_stream

    def matches(self, method: str, path: str) -> bool:
        # not /responses/{id}, /responses/{id}/cancel, /responses/input_tokens
        return method == "POST" and path.rstrip("/").endswith("/responses")

    def new_aggregator(self) -> ResponsesAggregator:
        return ResponsesAggregator()

    def chunks_from_final(self, final: dict[str, Any]) -> list[bytes]:
        output = final.get("output")
        if not isinstance(output, list):
            raise ValueError("a response needs an output list")
        # response.created announces the response before any output or outcome
        start = {**final, "status": "in_progress", "output": [], "error": None, "incomplete_details": None, "usage": None}
        if "completed_at" in final:
            start["completed_at"] = None
        writer = _EventWriter()
        events = [writer.event(kind, response=start) for kind in ("response.created", "response.in_progress")]
        for index, item in enumerate(output):
            events += _item_events(writer, index, item)
        events.append(writer.event(_END_EVENTS.get(final.get("status"), "response.completed"), response=final))
        return [sse.encode(compact_json(event), event["type"]) for event in events]

    def completion_from_text(self, request: Any, text: str | None, *, tool_calls: list[dict[str, Any]] | None = None,
                             finish_reason: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        output = [_message_item(text)] if text else []
        output += [_function_call_item(_tool_call(call, i)) for i, call in enumerate(tool_calls or [])]
        status, incomplete_details = _ending(finish_reason)
        return {**_new_response(request), "status": status, "incomplete_details": incomplete_details,
                "output": output, "usage": _usage(usage)}  # fmt: skip

    def new_stream(self, request: Any) -> ResponsesStream:
        return ResponsesStream(request)

    def chat_view(self, final: dict[str, Any]) -> dict[str, Any]:
        output = final.get("output")
        if not isinstance(output, list):
            return final
        texts, reasoning, calls = [], [], []
        for item in output:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "message":
                texts += [p.get("text") or p.get("refusal") or "" for p in item.get("content") or [] if isinstance(p, dict)]
            elif kind == "reasoning":
                parts = [*(item.get("summary") or []), *(item.get("content") or [])]
                reasoning += [p.get("text") or "" for p in parts if isinstance(p, dict)]
            elif kind in ("function_call", "custom_tool_call"):
                arguments = item.get("arguments") if kind == "function_call" else item.get("input")
                calls.append({"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": arguments}})
        status = final.get("status")
        finish = "length" if status == "incomplete" else "tool_calls" if calls else "stop" if status == "completed" else status
        usage, chat_usage = final.get("usage"), None
        if isinstance(usage, dict):
            prompt, completion = usage.get("input_tokens") or 0, usage.get("output_tokens") or 0
            chat_usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                          "completion_tokens_details": {"reasoning_tokens": (usage.get("output_tokens_details") or {}).get("reasoning_tokens")}}  # fmt: skip
        return single_choice_view(final, texts=texts, reasoning="\n\n".join(reasoning), tool_calls=calls,
                                  finish_reason=finish, usage=chat_usage)  # fmt: skip

    def chat_request_view(self, request: Any) -> dict[str, Any] | None:
        if not isinstance(request, dict) or not isinstance(request.get("input"), (str, list)):
            return None
        messages: list[dict[str, Any]] = []
        if request.get("instructions"):
            messages.append({"role": "system", "content": str(request["instructions"])})
        items = request["input"] if isinstance(request["input"], list) else [{"role": "user", "content": request["input"]}]
        for item in items:
            if isinstance(item, dict):
                _add_chat_message(messages, item)
        view: dict[str, Any] = {"model": request.get("model"), "messages": messages}
        tools = _chat_tools(request.get("tools") or [])
        if tools:
            view["tools"] = tools
        if isinstance(request.get("parallel_tool_calls"), bool):
            view["parallel_tool_calls"] = request["parallel_tool_calls"]
        return view


def _chat_tools(tools: list[Any]) -> list[dict[str, Any]]:
    """Every tool offered, as chat tools: functions as functions, the functions
    of a namespace (a tool group) each with its namespace, and built-in tools
    (web_search, ...) as they are."""
    out: list[dict[str, Any]] = []
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "function":
            out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                          if tool.get(k) is not None}})  # fmt: skip
        elif tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
            for inner in _chat_tools(tool["tools"]):
                if inner.get("type") == "function":
                    inner["function"]["namespace"] = tool.get("name")
                out.append(inner)
        else:
            out.append(dict(tool))
    return out


def _chat_content(content: Any) -> Any:
    """Input content as chat content: a string, or parts (text, image_url)."""
    if not isinstance(content, list):
        return content
    parts = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text") or ""})
        elif part.get("type") == "input_image" and part.get("image_url"):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            parts.append({"type": "text", "text": f"[{part.get('type')}]"})
    return "".join(p["text"] for p in parts) if all(p["type"] == "text" for p in parts) else parts


def _add_chat_message(messages: list[dict[str, Any]], item: dict[str, Any]) -> None:
    """Appends one input item as chat: a message as is, a function call to the
    assistant turn it belongs to, a function call's output as a tool message.
    Reasoning items (encrypted, for the model's own reuse) are left out."""
    kind = item.get("type") or "message"
    if kind == "message":
        messages.append({"role": item.get("role"), "content": _chat_content(item.get("content"))})
    elif kind in ("function_call", "custom_tool_call"):
        arguments = item.get("arguments") if kind == "function_call" else item.get("input")
        call = {"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": arguments}}
        last = messages[-1] if messages else None
        if last is None or last.get("role") != "assistant":
            last = {"role": "assistant", "content": None}
            messages.append(last)
        last.setdefault("tool_calls", []).append(call)
    elif kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output")
        text = output if isinstance(output, str) else _chat_content(output)
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)})  # fmt: skip
