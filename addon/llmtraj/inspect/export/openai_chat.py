"""OpenAI chat fine-tuning samples (see `llmtraj.inspect.export`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from ...core.record import CallRecord
from ..stats import by_session
from .common import (
    GRANULARITIES,
    Skipped,
    Unusable,
    chat_request,
    first_choice,
    message_text,
    ok_calls,
    prompt_of,
)

# ------------------------------------------------------------ openai-chat


def openai_chat_samples(
    records: Iterable[CallRecord], granularity: str = "per_call", skipped: list[Skipped] | None = None
) -> Iterator[dict[str, Any]]:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; use one of: {', '.join(GRANULARITIES)}")
    return _samples(records, granularity == "per_session", skipped)


def _samples(
    records: Iterable[CallRecord], per_session: bool, skipped: list[Skipped] | None
) -> Iterator[dict[str, Any]]:
    for calls in by_session(records).values():
        last = None
        for record in ok_calls(calls, skipped):
            try:
                sample = _sample(record)
            except Unusable as exc:
                if skipped is not None:
                    skipped.append(Skipped(record.session, record.index, str(exc)))
                continue
            if per_session:
                last = sample
            else:
                yield sample
        if last is not None:
            yield last


def _sample(record: CallRecord) -> dict[str, Any]:
    request = chat_request(record)
    _, reply = first_choice(record)
    call_ids: set[str] = set()
    sample: dict[str, Any] = {"messages": [_ft_message(m, call_ids) for m in [*request["messages"], reply]]}
    if request.get("tools"):
        sample["tools"] = [_ft_tool(tool) for tool in request["tools"]]
    if isinstance(request.get("parallel_tool_calls"), bool):
        sample["parallel_tool_calls"] = request["parallel_tool_calls"]
    if (prompt := prompt_of(record)) is not None:
        sample["prompt"] = prompt
    return sample


def _ft_message(message: Any, call_ids: set[str]) -> dict[str, Any]:
    """A message as the fine-tuning format takes it; `call_ids` collects the
    tool calls made so far, which tool results must answer."""
    if not isinstance(message, dict):
        raise Unusable("a message is not an object")
    role = message.get("role")
    if role == "developer":
        role = "system"
    out: dict[str, Any] = {"role": role}
    if role == "user":
        content = message.get("content")
        out["content"] = content if isinstance(content, list) else message_text(content)  # parts: images are allowed
    elif role == "system":
        out["content"] = message_text(message.get("content"))
    elif role == "assistant":
        content = message_text(message.get("content"))
        calls = [_ft_tool_call(call) for call in message.get("tool_calls") or []]
        if not content and not calls:
            raise Unusable("an assistant message has neither content nor tool calls")
        if content:
            out["content"] = content
        if calls:
            out["tool_calls"] = calls
            call_ids.update(call["id"] for call in calls)
        if message.get("weight") in (0, 1):
            out["weight"] = message["weight"]
    elif role == "tool":
        call_id = message.get("tool_call_id")
        if call_id not in call_ids:
            raise Unusable(f"a tool result answers call {call_id!r}, which no earlier assistant message made")
        out["tool_call_id"] = call_id
        out["content"] = message_text(message.get("content"))
    else:
        raise Unusable(f"role {role!r} is not in the fine-tuning format")
    if role != "tool" and isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def _ft_tool_call(call: Any) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if (
        not isinstance(fn, dict)
        or call.get("type", "function") != "function"
        or not isinstance(call.get("id"), str)
        or not isinstance(fn.get("name"), str)
    ):
        raise Unusable("a tool call is not a function call with an id and a name")
    arguments = fn.get("arguments")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": arguments}}


def _ft_tool(tool: Any) -> dict[str, Any]:
    if isinstance(tool, dict) and tool.get("type") not in (None, "function"):
        return tool  # a built-in tool the agent offered (web search, ...): kept as it is
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise Unusable("a tool is not a function with a name")
    out: dict[str, Any] = {"name": fn["name"]}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    parameters = fn.get("parameters")
    # A function declared without parameters takes none: say so explicitly.
    out["parameters"] = parameters if isinstance(parameters, dict) else {"type": "object", "properties": {}}
    return {"type": "function", "function": out}
