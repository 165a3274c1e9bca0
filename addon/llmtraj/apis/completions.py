"""OpenAI legacy text completions: `POST [/v1]/completions` (not chat).

Streams are `text_completion` objects whose choices carry text fragments, then
`[DONE]`. They fold into one `text_completion` the way chat chunks do (this
reuses the chat aggregator's event handling): each choice's `text`
concatenates by `index`, its `logprobs` lists (tokens, token_logprobs,
top_logprobs, text_offset) extend, its finish_reason is the last non-null one,
and the usage chunk is kept. The openai SDK has no accumulator for these.
"""

from __future__ import annotations

import copy
import secrets
import time
from typing import Any

from ..core import sse
from ..core.jsontext import compact_json
from .base import TextSlot
from .chat_completions import (
    _DONE,
    _ZERO_USAGE,
    ChatCompletionAggregator,
    ChatCompletions,
    ChoiceChunkStream,
    _model,
)

_NO_TOOL_CALLS = "legacy completions have no tool calls"


class TextCompletionAggregator(ChatCompletionAggregator):
    def text_slot(self, name: str | None, chunk: Any) -> TextSlot | None:
        return None  # (legacy completions: every event goes the general way)

    def _add_choice(self, position: int, choice: dict[str, Any]) -> None:
        index = choice.get("index", position)
        acc = self._choices.get(index)
        if acc is None:
            acc = self._choices[index] = {"text": "", "index": index, "logprobs": None, "finish_reason": None}
        for key, value in choice.items():
            if key == "index":
                continue
            if key == "text" or isinstance(value, (dict, list)):  # text concatenates, logprobs lists extend
                self._merger.merge(acc, {key: value})
            elif value is not None or key not in acc:
                acc[key] = value

    def result(self) -> dict[str, Any] | None:
        completion = self._top_fields()
        if not completion and not self._choices:
            return None
        self._merger.settle()
        completion["object"] = "text_completion"
        completion["choices"] = [copy.deepcopy(self._choices[i]) for i in sorted(self._choices)]
        completion.setdefault("usage", None)
        return completion


_ID_PREFIX = "cmpl-llmtraj-"


def _new_id() -> str:
    return _ID_PREFIX + secrets.token_hex(12)


class TextCompletionStream(ChoiceChunkStream):
    """A `text_completion` stream built delta by delta (anti-call): a delta's
    `text` (or chat-style `content`) is the choice's next text; other chat
    fields (role, reasoning_content) have no place here and are left out."""

    chunk_object = final_object = "text_completion"
    id_prefix = _ID_PREFIX

    def __init__(self, request: Any) -> None:
        super().__init__(request, TextCompletionAggregator())
        self._started: set[int] = set()

    def delta(self, delta: dict[str, Any], *, index: int = 0, finish_reason: str | None = None,
              logprobs: Any = None) -> bytes:
        if delta.get("tool_calls"):
            raise ValueError(_NO_TOOL_CALLS)
        text = delta.get("text") or delta.get("content") or ""
        if not isinstance(text, str):
            raise ValueError("text must be a string")
        self._started.add(index)
        if finish_reason is not None:
            self._finished.add(index)
        return self._event([{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}])

    def finish(self, *, finish_reason: str | None = None, usage: dict[str, Any] | None = None,
               stop_sequence: str | None = None) -> bytes:
        self._usage = usage or dict(_ZERO_USAGE)
        events = [
            self._event([{"text": "", "index": index, "logprobs": None, "finish_reason": finish_reason or "stop"}])
            for index in sorted(self._started or {0})
            if index not in self._finished
        ]
        if self._include_usage:
            events.append(self._event([], usage=self._usage))
        return b"".join(events) + _DONE


class Completions:
    name = "completions"
    final_events, final_endings = ChatCompletions.final_events, ChatCompletions.final_endings

    # OpenAI's error shape and `stream` flag, as chat completions
    error_body = ChatCompletions.error_body
    wants_stream = ChatCompletions.wants_stream

    def matches(self, method: str, path: str) -> bool:
        path = path.rstrip("/")
        return method == "POST" and path.endswith("/completions") and not path.endswith("/chat/completions")

    def new_aggregator(self) -> TextCompletionAggregator:
        return TextCompletionAggregator()

    def chunks_from_final(self, final: dict[str, Any]) -> list[bytes]:
        # Per choice one chunk with the whole text and logprobs, one with the
        # finish_reason (and vendor fields), as OpenAI ends a choice; then usage
        # in the usage-only chunk; then [DONE].
        top = {k: v for k, v in final.items() if k not in ("choices", "usage", "object")}
        top["object"] = "text_completion"
        chunks = []
        for position, choice in enumerate(final.get("choices") or []):
            index = choice.get("index", position)
            finish = {k: v for k, v in choice.items() if k not in ("text", "index", "logprobs")}
            chunks.append({**top, "choices": [
                {"text": choice.get("text") or "", "index": index, "logprobs": choice.get("logprobs"), "finish_reason": None}]})
            chunks.append({**top, "choices": [{"text": "", "index": index, "logprobs": None, **finish}]})
        if final.get("usage") is not None:
            chunks.append({**top, "choices": [], "usage": final["usage"]})
        return [sse.encode(compact_json(c)) for c in chunks] + [_DONE]

    def completion_from_text(self, request: Any, text: str | None, *, tool_calls: list[dict[str, Any]] | None = None,
                             finish_reason: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        if tool_calls:
            raise ValueError(_NO_TOOL_CALLS)
        return {
            "id": _new_id(),
            "object": "text_completion",
            "created": int(time.time()),
            "model": _model(request),
            "choices": [{"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish_reason or "stop"}],
            "usage": usage or dict(_ZERO_USAGE),
        }

    def new_stream(self, request: Any) -> TextCompletionStream:
        return TextCompletionStream(request)

    def chat_view(self, final: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(final.get("choices"), list):
            return final
        choices = [
            {"index": c.get("index", i), "message": {"role": "assistant", "content": c.get("text")},
             "finish_reason": c.get("finish_reason")}
            for i, c in enumerate(final["choices"]) if isinstance(c, dict)
        ]  # fmt: skip
        return {**final, "object": "chat.completion", "choices": choices}

    def chat_request_view(self, request: Any) -> None:
        return None  # a prompt, not a conversation
