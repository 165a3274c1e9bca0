"""Harbor's Agent Trajectory Interchange Format (see `llmtraj.inspect.export`)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from ...core.headers import header
from ...core.record import CallRecord
from ..stats import by_session, reasoning_tokens, request_model, usage_of
from .common import (
    Skipped,
    Unusable,
    chat_request,
    first_choice,
    iso_time,
    llm_traj_version,
    message_text,
    ok_calls,
    prompt_of,
)

ATIF_VERSION = "ATIF-v1.4"


# ------------------------------------------------------------------- atif


def atif_documents(
    records: Iterable[CallRecord],
    *,
    agent_name: str | None = None,
    agent_version: str | None = None,
    skipped: list[Skipped] | None = None,
) -> Iterator[dict[str, Any]]:
    """One document per session that has a successful call. The agent is
    named as given, else as recognised from its calls (the replay presets:
    user-agent, its own headers), else "unknown"."""
    for session, calls in by_session(records).items():
        builder = _AtifSession()
        for record in ok_calls(calls, skipped):
            try:
                builder.add_call(record)
            except Unusable as exc:
                if skipped is not None:
                    skipped.append(Skipped(record.session, record.index, str(exc)))
        if builder.first is not None:
            yield builder.document(session, agent_name, agent_version)


def _essence(message: Any) -> Any:
    """What makes two messages the same one: an agent sends back a reply in
    its own serialization (`content: null` left out, keys reordered, ...)."""
    if not isinstance(message, dict):
        return message
    calls = [  # arguments parsed: an agent re-serialises them (spacing, key order)
        (c.get("id"), (c.get("function") or {}).get("name"), _atif_arguments((c.get("function") or {}).get("arguments")))
        for c in message.get("tool_calls") or []
        if isinstance(c, dict)
    ]
    return message.get("role"), message_text(message.get("content")), calls, message.get("tool_call_id")


def _common_prefix(history: list[Any], messages: list[Any]) -> int:
    n = 0
    for old, new in zip(history, messages):
        if _essence(old) != _essence(new):
            break
        n += 1
    return n


def _atif_arguments(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"raw": arguments}  # ATIF wants an object: keep what the model wrote


def _atif_tool_calls(message: dict[str, Any], step_id: int) -> list[dict[str, Any]]:
    calls = []
    for i, call in enumerate(c for c in message.get("tool_calls") or [] if isinstance(c, dict)):
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        calls.append({
            "tool_call_id": call.get("id") or f"call_{step_id}_{i}",  # some servers send no ids
            "function_name": fn.get("name") or "",
            "arguments": _atif_arguments(fn.get("arguments")),
        })  # fmt: skip
    return calls


def _atif_metrics(usage: dict[str, Any] | None, choice: dict[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if usage is not None:
        for key in ("prompt_tokens", "completion_tokens"):
            if isinstance(usage.get(key), int):
                metrics[key] = usage[key]
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            metrics["cached_tokens"] = details["cached_tokens"]
        if (reasoning := reasoning_tokens(usage)) is not None:
            metrics["extra"] = {"reasoning_tokens": reasoning}
    logprobs = choice.get("logprobs")
    entries = logprobs.get("content") if isinstance(logprobs, dict) else None
    if isinstance(entries, list) and entries:
        metrics["logprobs"] = [e.get("logprob") for e in entries if isinstance(e, dict)]
    return metrics


class _AtifSession:
    """The conversations of one session, built call by call: a call continues
    the conversation whose history it shares the longest start with (its system
    prompt at least: a compacted history keeps it), or starts one of its own (a
    side call with a prompt of its own: a title, a summary).
    The conversation of the most calls is the session's; the others are kept
    apart, in `extra.side_conversations`."""

    def __init__(self) -> None:
        self.conversations: list[_Conversation] = []
        self.first: CallRecord | None = None  # the first call that made a step

    def add_call(self, record: CallRecord) -> None:
        messages = chat_request(record)["messages"]
        choice, reply = first_choice(record)  # before anything is added: an unusable reply changes nothing
        self.first = self.first or record
        best, shared = None, 0
        for conversation in self.conversations:
            n = _common_prefix(conversation.history, messages)
            if n > shared:
                best, shared = conversation, n
        if best is None:
            best = _Conversation()
            self.conversations.append(best)
        best.add_call(record, messages, shared, choice, reply)

    def document(self, session: str, agent_name: str | None, agent_version: str | None) -> dict[str, Any]:
        main = max(self.conversations, key=lambda c: c.calls)  # the first of the most calls
        document = main.document(session, self.first, agent_name, agent_version)
        side = [{"steps": c.steps} for c in self.conversations if c is not main]
        if side:
            document["extra"] = {"side_conversations": side}
        return document


class _Conversation:
    """The steps of one conversation."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.calls = 0
        # What the next request's messages are expected to start with: the
        # previous request's messages and its reply.
        self.history: list[Any] = []

    def add_call(self, record: CallRecord, messages: list[Any], shared: int, choice: dict[str, Any],
                 reply: dict[str, Any]) -> None:  # fmt: skip
        timestamp = iso_time(record.timings.started_at)
        for message in messages[shared:]:
            self._add_message(message, timestamp)
        self._add_reply(record, choice, reply)
        self.history = [*messages, reply]
        self.calls += 1

    def _step(self, source: str, timestamp: str, message: str) -> dict[str, Any]:
        step = {"step_id": len(self.steps) + 1, "timestamp": timestamp, "source": source, "message": message}
        self.steps.append(step)
        return step

    def _add_message(self, message: Any, timestamp: str) -> None:
        if not isinstance(message, dict):
            return
        role = message.get("role")
        agent = next((s for s in reversed(self.steps) if s["source"] == "agent"), None) if role == "tool" else None
        if agent is not None:
            result: dict[str, Any] = {"content": message_text(message.get("content"))}
            if message.get("tool_call_id") in {c["tool_call_id"] for c in agent.get("tool_calls", ())}:
                result = {"source_call_id": message["tool_call_id"], **result}
            agent.setdefault("observation", {"results": []})["results"].append(result)
            return
        # A tool result with no agent step before it is fed back as user input.
        source = {"system": "system", "developer": "system", "assistant": "agent"}.get(role, "user")
        step = self._step(source, timestamp, message_text(message.get("content")))
        if source == "agent" and (calls := _atif_tool_calls(message, step["step_id"])):
            step["tool_calls"] = calls

    def _add_reply(self, record: CallRecord, choice: dict[str, Any], reply: dict[str, Any]) -> None:
        t = record.timings
        step = self._step("agent", iso_time(t.ended_at or t.started_at), message_text(reply.get("content")))
        model = record.response.get("model") or request_model(record)
        if isinstance(model, str):
            step["model_name"] = model
        effort = record.request.get("reasoning_effort")
        if isinstance(effort, str):
            step["reasoning_effort"] = effort
        reasoning = reply.get("reasoning_content") or reply.get("reasoning")  # vLLM/DeepSeek, OpenRouter
        if isinstance(reasoning, str) and reasoning:
            step["reasoning_content"] = reasoning
        if calls := _atif_tool_calls(reply, step["step_id"]):
            step["tool_calls"] = calls
        if metrics := _atif_metrics(usage_of(record), choice):
            step["metrics"] = metrics
        step["extra"] = {"llm_traj": {"index": record.index, "finish_reason": choice.get("finish_reason")}}
        if (prompt := prompt_of(record)) is not None:
            step["extra"]["prompt"] = prompt

    def document(self, session: str, first: CallRecord, agent_name: str | None, agent_version: str | None) -> dict[str, Any]:
        user_agent = header(first.request_headers, "user-agent")
        agent: dict[str, Any] = {"name": agent_name or _agent_title(first, user_agent),
                                 "version": agent_version or _version(user_agent)}  # fmt: skip
        if model := request_model(first):
            agent["model_name"] = model
        if user_agent:
            agent["extra"] = {"user_agent": user_agent}
        if (prompt := prompt_of(first)) is not None:
            agent.setdefault("extra", {})["prompt"] = prompt
        final: dict[str, Any] = {}
        for key in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            values = [s["metrics"][key] for s in self.steps if key in s.get("metrics", {})]
            if values:
                final[f"total_{key}"] = sum(values)
        final["total_steps"] = len(self.steps)
        return {
            "schema_version": ATIF_VERSION,
            "session_id": session,
            "agent": agent,
            "notes": (
                f"Rebuilt by llm-traj {llm_traj_version()} from the LLM calls it recorded: agent steps are the model's "
                "replies; the other steps and the observations are the messages the agent sent."
            ),
            "steps": self.steps,
            "final_metrics": final,
        }


def _agent_title(record: CallRecord, user_agent: str | None) -> str:
    """The agent a call came from, as replay recognises it (its preset), else "unknown"."""
    from ...replay.normalize import GENERIC, Normalizer

    normalizer = Normalizer.builtin()
    name = normalizer.preset_for(record.request_headers, json.dumps(record.request, ensure_ascii=False))
    return next((p.title for p in normalizer.presets if p.name == name), "unknown") if name != GENERIC else "unknown"


def _version(user_agent: str | None) -> str:
    """The version in a `name/1.2.3 (...)` user-agent, else "unknown"."""
    found = re.match(r"[\w.-]+/(\d[\w.+-]*)", user_agent or "")
    return found.group(1) if found else "unknown"
