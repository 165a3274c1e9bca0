"""Plain-text rendering of trajectory records for people."""

from __future__ import annotations

import json
from collections.abc import Iterable

from ..apis import chat_view
from ..core.record import CallRecord
from ..tokens.normalise import summary
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


def _last_input(request: object) -> dict | None:
    """The last message of a request: `messages` (chat, Anthropic), `input`
    (Responses: text or items), `prompt` (legacy completions)."""
    if not isinstance(request, dict):
        return None
    for key in ("messages", "input", "prompt"):
        value = request.get(key)
        if isinstance(value, str):
            return {"role": "user", "content": value}
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            return value[-1]
    return None


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
        if r.prompt is not None and r.prompt.name is not None:
            details = [r.prompt.match, *(f"{k}={_clip(v, 40)}" for k, v in r.prompt.variables.items())]
            if r.prompt.override:
                details.append(f"override {r.prompt.override}")
            out.append(f"    prompt: {prompt_key(r)} ({'; '.join(details)})")
        last = _last_input(r.request)
        if last is not None:
            content = last.get("content", last.get("output"))  # a Responses tool result: output
            text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
            out.append(f"    {last.get('role') or last.get('type')}: {_clip(text or '')}")
        out += [f"    {line}" for line in describe_reply(r)]
        if r.tokens is not None:
            out.append(f"    token ids ({r.tokens.source}): {summary(r.tokens.model_dump())}")
        if r.error:
            out.append(f"    INCOMPLETE ({r.error.kind}): {r.error.message}")
    return "\n".join(out)
