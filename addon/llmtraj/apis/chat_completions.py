"""OpenAI chat completions: `POST [/v1]/chat/completions`.

Streams are `chat.completion.chunk` objects whose choice deltas are folded into
the `message` of a `chat.completion`, following the same rules as the openai
SDK's own stream accumulator: strings concatenate, objects merge, lists of
objects merge by their `index` (tool calls, parallel or split across chunks),
lists of scalars and logprob entries extend. Unknown vendor fields
(`reasoning_content`, `stop_reason`, ...) are kept by the same rules.
"""

from __future__ import annotations

import json
from typing import Any

from ..sse import SSEBlock

# Top-level chunk fields that describe the chunk, not the completion
# (`obfuscation`: OpenAI's per-chunk random padding).
_CHUNK_ONLY = {"choices", "object", "obfuscation"}


def merge_delta(acc: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    for key, value in delta.items():
        old = acc.get(key)
        if old is None:
            acc[key] = value
        elif key in ("index", "type"):
            if value is not None and value != "":  # a null/empty repeat must not erase it
                acc[key] = value
        elif isinstance(old, str) and isinstance(value, str):
            acc[key] = old + value
        elif isinstance(old, dict) and isinstance(value, dict):
            merge_delta(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            _merge_list(old, value)
        elif value is not None:
            acc[key] = value
    return acc


def _merge_list(old: list[Any], new: list[Any]) -> None:
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
            merge_delta(target, entry)


class ChatCompletionAggregator:
    def __init__(self) -> None:
        self._top: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self.problems: list[str] = []
        self.done = False

    def add(self, block: SSEBlock) -> None:
        data = block.data
        if data is None or not block.terminated:
            return
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            self.problems.append(f"event is not JSON ({exc.msg}): {data[:200]!r}")
            return
        if not isinstance(chunk, dict):
            self.problems.append(f"event is not a JSON object: {data[:200]!r}")
            return
        if "error" in chunk and "choices" not in chunk:
            self.problems.append("error event: " + json.dumps(chunk["error"])[:500])
            self._top.setdefault("error", chunk["error"])
            return
        for key, value in chunk.items():
            if key not in _CHUNK_ONLY and value is not None:
                self._top[key] = value
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            self.problems.append(f"choices is not a list: {data[:200]!r}")
            return
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict) or not isinstance(choice.get("index", position), int):
                self.problems.append(f"choice is not an object with an integer index: {data[:200]!r}")
                continue
            self._add_choice(position, choice)

    def _add_choice(self, position: int, choice: dict[str, Any]) -> None:
        index = choice.get("index", position)
        acc = self._choices.get(index)
        if acc is None:
            acc = self._choices[index] = {"index": index, "message": {}, "finish_reason": None}
        for key, value in choice.items():
            if key == "delta":
                if isinstance(value, dict):
                    merge_delta(acc["message"], value)
                elif value is not None:
                    self.problems.append(f"delta is not an object: {json.dumps(value)[:200]}")
            elif key == "logprobs":
                if isinstance(value, dict):
                    if acc.get("logprobs") is None:  # also after a first `"logprobs": null`
                        acc["logprobs"] = {}
                    merge_delta(acc["logprobs"], value)
                else:
                    acc.setdefault("logprobs", value)
            elif key != "index" and (value is not None or key not in acc):
                acc[key] = value

    def result(self) -> dict[str, Any] | None:
        if not self._top and not self._choices:
            return None
        completion = dict(self._top)
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


class ChatCompletions:
    name = "chat.completions"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.rstrip("/").endswith("/chat/completions")

    def new_aggregator(self) -> ChatCompletionAggregator:
        return ChatCompletionAggregator()

    def error_body(self, message: str, type: str, code: str | None = None) -> dict[str, Any]:
        return {"error": {"message": message, "type": type, "param": None, "code": code}}
