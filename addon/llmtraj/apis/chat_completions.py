"""OpenAI chat completions: `POST [/v1]/chat/completions`.

Streams are `chat.completion.chunk` objects whose choice deltas are folded into
the `message` of a `chat.completion`, following the same rules as the openai
SDK's own stream accumulator: strings concatenate, objects merge, lists of
objects merge by their `index` (tool calls, parallel or split across chunks),
lists of scalars and logprob entries extend. Unknown vendor fields
(`reasoning_content`, `stop_reason`, ...) are kept by the same rules, and a
choice-level list (vLLM's `token_ids`, each chunk's new ids) extends too.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from pydantic_core import from_json

from ..core import sse
from ..core.jsontext import compact_json
from ..core.sse import SSEBlock
from .base import TextSlot

# Top-level chunk fields that describe the chunk, not the completion
# (`obfuscation`: OpenAI's per-chunk random padding).
_CHUNK_ONLY = {"choices", "object", "obfuscation"}
_DONE = b"data: [DONE]\n\n"
_ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


class _Pieces:
    """A string a stream sends in pieces (content, tool call arguments): kept
    as a list and joined once when the aggregate is read, so each delta costs
    its own size, not the size of everything before it."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[str]) -> None:
        self.parts = parts


class DeltaMerger:
    """Folds deltas into an accumulated object by the openai SDK's rules:
    strings concatenate, objects merge, lists of objects merge by their
    `index`, other lists extend. Strings that grow are `_Pieces` until
    `settle` joins them (in place: merging may go on after)."""

    def __init__(self) -> None:
        self._growing: list[tuple[dict[str, Any], str, _Pieces]] = []

    def merge(self, acc: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
        for key, value in delta.items():
            old = acc.get(key)
            if old is None:
                acc[key] = value
            elif type(old) is _Pieces and isinstance(value, str):  # the usual delta: more of a string
                old.parts.append(value)
            elif key in ("index", "type"):
                if value is not None and value != "":  # a null/empty repeat must not erase it
                    acc[key] = value
            elif isinstance(old, str) and isinstance(value, str):
                pieces = acc[key] = _Pieces([old, value])
                self._growing.append((acc, key, pieces))
            elif isinstance(old, dict) and isinstance(value, dict):
                self.merge(old, value)
            elif isinstance(old, list) and isinstance(value, list):
                self._merge_list(old, value)
            elif value is not None:
                acc[key] = value
        return acc

    def _merge_list(self, old: list[Any], new: list[Any]) -> None:
        indexed = new and all(isinstance(e, dict) and isinstance(e.get("index"), int) for e in new)
        if not indexed:
            old.extend(new)  # scalars, logprob entries: new entries only
            return
        by_index = {e.get("index"): e for e in old if isinstance(e, dict)}
        for entry in new:
            target = by_index.get(entry["index"])
            if target is None:
                entry = dict(entry)
                old.append(entry)
                by_index[entry["index"]] = entry
            else:
                self.merge(target, entry)

    def settle(self) -> None:
        """Joins every string still in pieces."""
        for acc, key, pieces in self._growing:
            if acc.get(key) is pieces:  # not replaced by a value of another type since
                acc[key] = "".join(pieces.parts)
        self._growing.clear()


class ChatCompletionAggregator:
    def __init__(self) -> None:
        self._top: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._merger = DeltaMerger()
        self.problems: list[str] = []
        self.done = False

    def add(self, block: SSEBlock) -> None:
        data = block.data
        if data is None or not block.terminated:
            return
        try:
            chunk = from_json(data)
        except ValueError as exc:
            if data.strip() == "[DONE]":
                self.done = True
            else:
                self.problems.append(f"event is not JSON ({exc}): {data[:200]!r}")
            return
        self.add_parsed(block.event, data, chunk)

    def add_parsed(self, name: str | None, data: str, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            self.problems.append(f"event is not a JSON object: {data[:200]!r}")
            return
        if "error" in chunk and "choices" not in chunk:
            self.problems.append("error event: " + json.dumps(chunk["error"])[:500])
            self._top.setdefault("error", chunk["error"])
            return
        # Every non-null field, the chunk's own ones too (left out when read): one update, not one per field.
        if None in chunk.values():
            self._top.update({key: value for key, value in chunk.items() if value is not None})
        else:
            self._top.update(chunk)
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            self.problems.append(f"choices is not a list: {data[:200]!r}")
            return
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict) or not isinstance(choice.get("index", position), int):
                self.problems.append(f"choice is not an object with an integer index: {data[:200]!r}")
                continue
            self._add_choice(position, choice)

    def text_slot(self, name: str | None, chunk: Any) -> TextSlot | None:
        # a chunk of one choice whose delta is content alone and whose other fields are scalars: another such
        # chunk sets the same top-level fields and choice fields again and merges its content (the padding
        # is not read)
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not (isinstance(choices, list) and len(choices) == 1 and isinstance(choice := choices[0], dict)):
            return None
        delta, index = choice.get("delta"), choice.get("index", 0)
        if not (type(delta) is dict and len(delta) == 1 and type(delta.get("content")) is str
                and isinstance(index, int) and index in self._choices):  # fmt: skip
            return None
        if any(key not in ("index", "delta") and isinstance(value, (dict, list)) for key, value in choice.items()):
            return None
        message, merge = self._choices[index]["message"], self._merger.merge

        def append(text: str) -> None:
            if type(pieces := message["content"]) is _Pieces:
                pieces.parts.append(text)
            else:
                merge(message, {"content": text})

        return TextSlot(("choices", 0, "delta", "content"), (("obfuscation",),), append)

    def _add_choice(self, position: int, choice: dict[str, Any]) -> None:
        index = choice.get("index", position)
        acc = self._choices.get(index)
        if acc is None:
            acc = self._choices[index] = {"index": index, "message": {}, "finish_reason": None}
        for key, value in choice.items():
            if key == "delta":
                if isinstance(value, dict):
                    self._merger.merge(acc["message"], value)
                elif value is not None:
                    self.problems.append(f"delta is not an object: {json.dumps(value)[:200]}")
            elif value is None:
                if key not in acc:  # also a first `"logprobs": null`
                    acc[key] = None
            elif key == "logprobs":
                if isinstance(value, dict):
                    if acc.get("logprobs") is None:  # also after a first `"logprobs": null`
                        acc["logprobs"] = {}
                    self._merger.merge(acc["logprobs"], value)
                else:
                    acc.setdefault("logprobs", value)
            elif key == "index":
                continue
            elif isinstance(value, list) and isinstance(acc.get(key), list):
                acc[key].extend(value)  # each chunk's new ids (vLLM's `token_ids`): concatenated
            else:
                acc[key] = value

    def _top_fields(self) -> dict[str, Any]:
        """The completion's own top-level fields so far (not the chunks' `choices`, `object`, padding)."""
        return {key: value for key, value in self._top.items() if key not in _CHUNK_ONLY}

    def result(self) -> dict[str, Any] | None:
        completion = self._top_fields()
        if not completion and not self._choices:
            return None
        self._merger.settle()
        completion["object"] = "chat.completion"
        completion["choices"] = [self._finish_choice(self._choices[i]) for i in sorted(self._choices)]
        completion.setdefault("usage", None)
        return completion

    @staticmethod
    def _finish_choice(acc: dict[str, Any]) -> dict[str, Any]:
        choice = dict(acc)
        message = dict(acc["message"])
        message.setdefault("role", "assistant")
        message.setdefault("content", None)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {k: v for k, v in call.items() if k != "index"}
                for call in sorted(message["tool_calls"], key=lambda c: c.get("index", 0))
            ]
        choice["message"] = message
        return choice


_ID_PREFIX = "chatcmpl-llmtraj-"


def _new_id() -> str:
    return _ID_PREFIX + secrets.token_hex(12)


def _model(request: Any) -> str:
    return str(request.get("model") or "") if isinstance(request, dict) else ""


def _tool_call(call: Any, position: int) -> dict[str, Any]:
    """A complete tool call from a driver's `{"function": {"name", "arguments"}}`
    (arguments may be an object; id and type are filled in when missing)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"tool_calls[{position}] needs function.name (a string)")
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": call.get("id") or "call_" + secrets.token_hex(12),
        "type": call.get("type") or "function",
        "function": {**function, "arguments": arguments},
    }


class ChoiceChunkStream:
    """What the OpenAI streams of choice chunks built delta by delta (anti-call)
    share: chunks of one id, usage as OpenAI sends it, and the aggregate of
    what was built, so a non-streaming agent can get the same answer as JSON."""

    chunk_object: str
    final_object: str
    id_prefix: str

    def __init__(self, request: Any, aggregator: ChatCompletionAggregator) -> None:
        options = request.get("stream_options") if isinstance(request, dict) else None
        self._include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self._top = {"id": self.id_prefix + secrets.token_hex(12), "object": self.chunk_object,
                     "created": int(time.time()), "model": _model(request)}  # fmt: skip
        self._finished: set[int] = set()
        self._aggregator = aggregator
        self._usage: dict[str, Any] | None = None

    def _event(self, choices: list[dict[str, Any]], **top: Any) -> bytes:
        chunk = {**self._top, "choices": choices, **top}
        if self._include_usage:  # as OpenAI: null in every chunk but the usage-only one
            chunk.setdefault("usage", None)
        text = json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
        self._aggregator.add(SSEBlock(raw=b"", data=text))
        return b"data: %s\n\n" % text.encode()

    def error(self, body: dict[str, Any]) -> bytes:
        return sse.encode(compact_json(body))

    def completion(self) -> dict[str, Any]:
        completion = self._aggregator.result() or {**self._top, "object": self.final_object, "choices": []}
        completion["usage"] = self._usage or dict(_ZERO_USAGE)
        return completion


class ChatCompletionStream(ChoiceChunkStream):
    """A `chat.completion.chunk` stream built delta by delta."""

    chunk_object, final_object, id_prefix = "chat.completion.chunk", "chat.completion", _ID_PREFIX

    def __init__(self, request: Any) -> None:
        super().__init__(request, ChatCompletionAggregator())
        self._open: dict[int, bool] = {}  # choice index -> whether it has tool calls, once started

    def delta(self, delta: dict[str, Any], *, index: int = 0, finish_reason: str | None = None,
              logprobs: Any = None) -> bytes:
        delta = dict(delta)
        if index not in self._open:
            delta.setdefault("role", "assistant")
            self._open[index] = False
        if delta.get("tool_calls"):
            self._open[index] = True
        if finish_reason is not None:
            self._finished.add(index)
        return self._event([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])

    def finish(self, *, finish_reason: str | None = None, usage: dict[str, Any] | None = None,
               stop_sequence: str | None = None) -> bytes:
        self._usage = usage or dict(_ZERO_USAGE)
        events = []
        for index, has_tools in sorted((self._open or {0: False}).items()):
            if index in self._finished:
                continue
            delta = {} if index in self._open else {"role": "assistant", "content": ""}
            reason = finish_reason or ("tool_calls" if has_tools else "stop")
            events.append(self._event([{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]))
        if self._include_usage:
            events.append(self._event([], usage=self._usage))
        return b"".join(events) + _DONE



class ChatCompletions:
    name = "chat.completions"
    final_events = (b"data: [DONE]",)
    final_endings = (b"data: [DONE]\n\n",)

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.rstrip("/").endswith("/chat/completions")

    def new_aggregator(self) -> ChatCompletionAggregator:
        return ChatCompletionAggregator()

    def chunks_from_final(self, final: dict[str, Any]) -> list[bytes]:
        # Per choice one delta carrying the whole message and one carrying the
        # finish_reason (and vendor fields such as stop_reason), as OpenAI ends a
        # choice; then usage in the usage-only chunk; then [DONE].
        top = {k: v for k, v in final.items() if k not in ("choices", "usage", "object")}
        top["object"] = "chat.completion.chunk"
        chunks = []
        for position, choice in enumerate(final.get("choices") or []):
            index = choice.get("index", position)
            delta = dict(choice.get("message") or {})
            if isinstance(delta.get("tool_calls"), list):  # a stream's tool calls need their `index`
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(delta["tool_calls"])]
            finish = {k: v for k, v in choice.items() if k not in ("index", "message", "logprobs")}
            chunks.append({**top, "choices": [
                {"index": index, "delta": delta, "logprobs": choice.get("logprobs"), "finish_reason": None}]})
            chunks.append({**top, "choices": [{"index": index, "delta": {}, "logprobs": None, **finish}]})
        if final.get("usage") is not None:
            chunks.append({**top, "choices": [], "usage": final["usage"]})
        return [sse.encode(compact_json(c)) for c in chunks] + [_DONE]

    def error_body(self, message: str, type: str, code: str | None = None) -> dict[str, Any]:
        return {"error": {"message": message, "type": type, "param": None, "code": code}}

    def wants_stream(self, request: Any) -> bool:
        return isinstance(request, dict) and request.get("stream") is True

    def completion_from_text(self, request: Any, text: str | None, *, tool_calls: list[dict[str, Any]] | None = None,
                             finish_reason: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = [_tool_call(call, i) for i, call in enumerate(tool_calls)]
        return {
            "id": _new_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": _model(request),
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop")}],
            "usage": usage or dict(_ZERO_USAGE),
        }  # fmt: skip

    def new_stream(self, request: Any) -> ChatCompletionStream:
        return ChatCompletionStream(request)

    def chat_view(self, final: dict[str, Any]) -> dict[str, Any]:
        return final

    def chat_request_view(self, request: Any) -> dict[str, Any] | None:
        return request if isinstance(request, dict) and isinstance(request.get("messages"), list) else None
