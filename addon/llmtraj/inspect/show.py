"""Plain-text rendering of trajectory records for people."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from ..apis import API_BY_NAME, chat_view
from ..core.record import CallRecord
from ..tokens.normalise import summary
from .export.common import message_text
from .stats import prompt_key, usage_of


def _ms(a: float | None, b: float | None) -> str:
    return f"{(b - a) * 1000:.0f} ms" if a is not None and b is not None else "-"


def _clip(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def describe_reply(record: CallRecord) -> list[str]:
    response = chat_view(record.api, record.response)
    if not isinstance(response, dict):
        return [_clip(record.response_raw or "(no body)")]
    if "error" in response and "choices" not in response:
        return ["error: " + _clip(json.dumps(response["error"]))]
    lines = []
    for choice in response.get("choices") or []:
        message = choice.get("message") or {}
        prefix = f"[{choice.get('index', 0)}] " if len(response["choices"]) > 1 else ""
        if message.get("reasoning_content"):
            lines.append(f"{prefix}reasoning: {_clip(message['reasoning_content'])}")
        if message.get("content"):
            lines.append(f"{prefix}assistant: {_clip(message['content'])}")
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            lines.append(f"{prefix}tool call {fn.get('name')}({_clip(fn.get('arguments') or '', 80)})")
        lines.append(f"{prefix}finish: {choice.get('finish_reason')}")
    return lines


_REMINDERS = re.compile(r"<system-reminder>.*?</system-reminder>", re.S)


def _latest(record: CallRecord) -> str | None:
    """The newest turn of a request through its chat view: the last message that
    is not a system one (agents such as Claude Code add system messages
    mid-conversation), a tool result as its text; a legacy completion's prompt."""
    shape = API_BY_NAME.get(record.api)
    view = shape.chat_request_view(record.request) if shape is not None else None
    messages = [m for m in (view or {}).get("messages") or [] if isinstance(m, dict)]
    if not messages:
        prompt = record.request.get("prompt") if isinstance(record.request, dict) else None
        return f"prompt: {_clip(prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False))}" if prompt else None
    last = next((m for m in reversed(messages) if m.get("role") != "system"), messages[-1])
    text = message_text(last.get("content"))
    text = _REMINDERS.sub("", text).strip() or text  # what a harness prepends to the prompt (Claude Code)
    calls = [(c.get("function") or {}).get("name") for c in last.get("tool_calls") or [] if isinstance(c, dict)]
    if calls:
        text += (" " if text else "") + "tool calls: " + ", ".join(str(name) for name in calls)
    role = "tool result" if last.get("role") == "tool" else last.get("role")
    return f"{role}: {_clip(text)}"


def render(records: Iterable[CallRecord]) -> str:
    out = []
    for r in records:
        model = (r.request or {}).get("model") if isinstance(r.request, dict) else None
        usage = usage_of(r)
        tokens = f"{usage.get('prompt_tokens')}+{usage.get('completion_tokens')} tokens" if usage else "no usage"
        kind = "stream" if r.stream else "json"
        t = r.timings
        out.append(
            f"{r.session} #{r.index}  {r.api}  {model}  {r.status}  {kind}  {tokens}  "
            f"first byte {_ms(t.started_at, t.first_byte_at)}, total {_ms(t.started_at, t.ended_at)}"
        )
        if r.bridge is not None:
            out.append(f"    bridged to {r.bridge.upstream_api}: {r.bridge.url} ({r.bridge.status or 'no response'})")
        if r.prompt is not None and r.prompt.name is not None:
            details = [r.prompt.match, *(f"{k}={_clip(v, 40)}" for k, v in r.prompt.variables.items())]
            if r.prompt.override:
                details.append(f"override {r.prompt.override}")
            out.append(f"    prompt: {prompt_key(r)} ({'; '.join(details)})")
        latest = _latest(r)
        if latest is not None:
            out.append(f"    {latest}")
        out += [f"    {line}" for line in describe_reply(r)]
        if r.tokens is not None:
            out.append(f"    token ids ({r.tokens.source}): {summary(r.tokens.model_dump())}")
        if r.error:
            out.append(f"    INCOMPLETE ({r.error.kind}): {r.error.message}")
    return "\n".join(out)
