"""Trajectories in other formats: OpenAI chat fine-tuning JSONL, HAR 1.2, and
Harbor's Agent Trajectory Interchange Format (ATIF).

openai-chat
    One sample per line, `{"messages": [...], "tools": [...],
    "parallel_tool_calls": ...}` (the last two only when the request had them).
    `per_call`: a sample per successful call, its request's messages then its
    reply; `per_session`: a sample per session, the last successful call's
    messages and reply, i.e. the conversation as it ended. Messages keep only
    what the fine-tuning format accepts: roles system, user, assistant, tool
    (`developer`, its newer name, becomes `system`); `name`; assistant
    `tool_calls` and `weight`; tool `tool_call_id`. Response-only and vendor
    fields (`refusal`, `annotations`, `audio`, `reasoning_content`, ...) are
    dropped; tools keep `name`, `description` and `parameters`. The reply is
    the first choice's message. A call that cannot make a valid sample (an
    assistant message with neither content nor tool calls, a tool result for
    a call no earlier assistant message made, a tool that is not a function,
    ...) is skipped.

har
    One HAR 1.2 document, an entry per call, failed and incomplete calls
    included. Bodies are the recorded ones: the request JSON re-serialized
    (secrets redacted), the response after content decoding (for a stream its
    SSE events concatenated as the client got them). A call that got no
    response has status 0; one that did not finish carries `response._error`.
    `wait` is the time to the response headers, `receive` the rest (`send` is
    not measured: 0). The HTTP version is not recorded: "". `_llm_traj` says
    session, index and mode.

atif
    One ATIF document per session (ATIF-v1.4), its steps rebuilt from the
    calls in order:
      - the messages of the first successful call's request become steps:
        system (and developer) messages system steps, user messages user
        steps, assistant messages (a history the agent seeded) agent steps;
      - each successful call adds an agent step: the reply's content as
        `message`, `reasoning_content`, `tool_calls` (arguments parsed; text
        that is no JSON object is kept as `{"raw": text}`), `metrics` from the
        usage (`cached_tokens`, reasoning tokens in `metrics.extra`) and the
        logprobs, the request's `reasoning_effort`;
      - the messages the next successful call's request adds after that reply
        go the same way, except that a tool result becomes a result of the
        `observation` of the last agent step (`source_call_id` set when it
        answers one of that step's tool calls). So a step's observation holds
        the results of its own tool calls.
    A request whose history no longer starts with the previous request and its
    reply (an agent that compacted its context) adds its messages from the
    first one that differs. `final_metrics` sums the agent steps' tokens.

Failed and incomplete calls are no part of a conversation: openai-chat and
atif leave them out and list them, with every other call they skip, in the
`skipped` list the caller passes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from importlib import metadata
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .apis import API_BY_NAME, chat_view
from .record import CallRecord, Headers
from .recorder import header
from .stats import by_session, call_outcome, reasoning_tokens, request_model, usage_of

FORMATS = ("openai-chat", "har", "atif")
GRANULARITIES = ("per_call", "per_session")
ATIF_VERSION = "ATIF-v1.4"


@dataclass(frozen=True)
class Skipped:
    """A call an export left out, and why."""

    session: str
    index: int
    reason: str

    def __str__(self) -> str:
        return f"{self.session} #{self.index}: {self.reason}"


class _Unusable(ValueError):
    """A call the format cannot express, and why."""


def export(
    records: Iterable[CallRecord],
    fmt: str,
    *,
    granularity: str = "per_call",
    agent_name: str = "unknown",
    agent_version: str = "unknown",
    skipped: list[Skipped] | None = None,
) -> Iterator[str] | str:
    """`openai-chat`: JSON lines, one sample each; `atif`: JSON lines, one
    document per session (lines come without their newline); `har`: one JSON
    document. ValueError for an unknown format or granularity."""
    if fmt == "openai-chat":
        return map(_line, openai_chat_samples(records, granularity, skipped))
    if fmt == "har":
        return json.dumps(har(records), ensure_ascii=False, indent=2)
    if fmt == "atif":
        return map(_line, atif_documents(records, agent_name=agent_name, agent_version=agent_version, skipped=skipped))
    raise ValueError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")


def _line(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _version() -> str:
    try:
        return metadata.version("llm-traj")
    except metadata.PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ok_calls(calls: list[CallRecord], skipped: list[Skipped] | None) -> Iterator[CallRecord]:
    for record in calls:
        outcome = call_outcome(record)
        if outcome == "ok":
            yield record
        elif skipped is not None:
            detail = record.error.kind if record.error else f"status {record.status}"
            skipped.append(Skipped(record.session, record.index, f"{outcome} ({detail})"))


def _chat_request(record: CallRecord) -> dict[str, Any]:
    """The request as chat completions sees it (Anthropic and Responses requests converted)."""
    shape = API_BY_NAME.get(record.api)
    request = shape.chat_request_view(record.request) if shape is not None else None
    if request is None:
        raise _Unusable(f"a {record.api} call has no conversation")
    if not request.get("messages"):
        raise _Unusable("the request has no messages")
    return request


def _first_choice(record: CallRecord) -> tuple[dict[str, Any], dict[str, Any]]:
    """(choice, its message) of a successful call."""
    choice = chat_view(record.api, record.response)["choices"][0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise _Unusable("the reply has no message")
    return choice, message


def _text(content: Any) -> str:
    """The text of message content: a string, or its parts' text (other parts as `[type]`)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) if part.get("type") == "text" else f"[{part.get('type')}]"
            for part in content
            if isinstance(part, dict)
        )
    return json.dumps(content, ensure_ascii=False)


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
        for record in _ok_calls(calls, skipped):
            try:
                sample = _sample(record)
            except _Unusable as exc:
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
    request = _chat_request(record)
    _, reply = _first_choice(record)
    call_ids: set[str] = set()
    sample: dict[str, Any] = {"messages": [_ft_message(m, call_ids) for m in [*request["messages"], reply]]}
    if request.get("tools"):
        sample["tools"] = [_ft_tool(tool) for tool in request["tools"]]
    if isinstance(request.get("parallel_tool_calls"), bool):
        sample["parallel_tool_calls"] = request["parallel_tool_calls"]
    return sample


def _ft_message(message: Any, call_ids: set[str]) -> dict[str, Any]:
    """A message as the fine-tuning format takes it; `call_ids` collects the
    tool calls made so far, which tool results must answer."""
    if not isinstance(message, dict):
        raise _Unusable("a message is not an object")
    role = message.get("role")
    if role == "developer":
        role = "system"
    out: dict[str, Any] = {"role": role}
    if role == "user":
        content = message.get("content")
        out["content"] = content if isinstance(content, list) else _text(content)  # parts: images are allowed
    elif role == "system":
        out["content"] = _text(message.get("content"))
    elif role == "assistant":
        content = _text(message.get("content"))
        calls = [_ft_tool_call(call) for call in message.get("tool_calls") or []]
        if not content and not calls:
            raise _Unusable("an assistant message has neither content nor tool calls")
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
            raise _Unusable(f"a tool result answers call {call_id!r}, which no earlier assistant message made")
        out["tool_call_id"] = call_id
        out["content"] = _text(message.get("content"))
    else:
        raise _Unusable(f"role {role!r} is not in the fine-tuning format")
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
        raise _Unusable("a tool call is not a function call with an id and a name")
    arguments = fn.get("arguments")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": arguments}}


def _ft_tool(tool: Any) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _Unusable("a tool is not a function with a name")
    out: dict[str, Any] = {"name": fn["name"]}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    parameters = fn.get("parameters")
    # A function declared without parameters takes none: say so explicitly.
    out["parameters"] = parameters if isinstance(parameters, dict) else {"type": "object", "properties": {}}
    return {"type": "function", "function": out}


# -------------------------------------------------------------------- har


def har(records: Iterable[CallRecord]) -> dict[str, Any]:
    entries = [_har_entry(r) for r in sorted(records, key=lambda r: r.timings.started_at)]
    return {"log": {"version": "1.2", "creator": {"name": "llm-traj", "version": _version()}, "entries": entries}}


def _har_headers(headers: Headers) -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in headers]


def _har_entry(record: CallRecord) -> dict[str, Any]:
    t = record.timings
    end = t.ended_at or t.response_headers_at or t.started_at
    headers_at = t.response_headers_at or end
    wait = round(max(0.0, headers_at - t.started_at) * 1000, 3)
    receive = round(max(0.0, end - headers_at) * 1000, 3)

    if record.request_raw is not None:
        request_text = record.request_raw
    else:
        request_text = json.dumps(record.request, ensure_ascii=False) if record.request is not None else ""
    query = parse_qsl(urlsplit(record.url).query, keep_blank_values=True)
    request: dict[str, Any] = {
        "method": record.method,
        "url": record.url,
        "httpVersion": "",
        "cookies": [],
        "headers": _har_headers(record.request_headers),
        "queryString": [{"name": k, "value": v} for k, v in query],
        "headersSize": -1,
        "bodySize": len(request_text.encode()),
    }
    if request_text:
        mime = header(record.request_headers, "content-type") or "application/json"
        request["postData"] = {"mimeType": mime, "text": request_text}

    if record.events is not None:
        text = "".join(event.raw for event in record.events)
    elif record.response_raw is not None:
        text = record.response_raw
    else:
        text = json.dumps(record.response, ensure_ascii=False) if record.response is not None else ""
    size = len(text.encode())
    status = record.status or 0
    response: dict[str, Any] = {
        "status": status,
        "statusText": HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "",
        "httpVersion": "",
        "cookies": [],
        "headers": _har_headers(record.response_headers),
        "content": {"size": size, "mimeType": header(record.response_headers, "content-type") or "", "text": text},
        "redirectURL": "",
        "headersSize": -1,
        # The text is decoded; what a content-encoded body weighed on the wire was not recorded.
        "bodySize": -1 if header(record.response_headers, "content-encoding") else size,
    }
    if record.error is not None:
        response["_error"] = f"{record.error.kind}: {record.error.message}"

    return {
        "startedDateTime": _iso(t.started_at),
        "time": round(wait + receive, 3),
        "request": request,
        "response": response,
        "cache": {},
        "timings": {"send": 0, "wait": wait, "receive": receive},
        "_llm_traj": {"session": record.session, "index": record.index, "api": record.api, "mode": record.mode},
    }


# ------------------------------------------------------------------- atif


def atif_documents(
    records: Iterable[CallRecord],
    *,
    agent_name: str = "unknown",
    agent_version: str = "unknown",
    skipped: list[Skipped] | None = None,
) -> Iterator[dict[str, Any]]:
    """One document per session that has a successful call."""
    for session, calls in by_session(records).items():
        builder = _AtifSession()
        for record in _ok_calls(calls, skipped):
            try:
                builder.add_call(record)
            except _Unusable as exc:
                if skipped is not None:
                    skipped.append(Skipped(record.session, record.index, str(exc)))
        if builder.first is not None:
            yield builder.document(session, agent_name, agent_version)


def _essence(message: Any) -> Any:
    """What makes two messages the same one: an agent sends back a reply in
    its own serialization (`content: null` left out, keys reordered, ...)."""
    if not isinstance(message, dict):
        return message
    calls = [
        (c.get("id"), (c.get("function") or {}).get("name"), (c.get("function") or {}).get("arguments"))
        for c in message.get("tool_calls") or []
        if isinstance(c, dict)
    ]
    return message.get("role"), _text(message.get("content")), calls, message.get("tool_call_id")


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
    """The steps of one session, built call by call."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.first: CallRecord | None = None  # the first call that made a step
        # What the next request's messages are expected to start with: the
        # previous request's messages and its reply.
        self._history: list[Any] = []

    def add_call(self, record: CallRecord) -> None:
        messages = _chat_request(record)["messages"]
        choice, reply = _first_choice(record)
        self.first = self.first or record
        timestamp = _iso(record.timings.started_at)
        for message in messages[_common_prefix(self._history, messages) :]:
            self._add_message(message, timestamp)
        self._add_reply(record, choice, reply)
        self._history = [*messages, reply]

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
            result: dict[str, Any] = {"content": _text(message.get("content"))}
            if message.get("tool_call_id") in {c["tool_call_id"] for c in agent.get("tool_calls", ())}:
                result = {"source_call_id": message["tool_call_id"], **result}
            agent.setdefault("observation", {"results": []})["results"].append(result)
            return
        # A tool result with no agent step before it is fed back as user input.
        source = {"system": "system", "developer": "system", "assistant": "agent"}.get(role, "user")
        step = self._step(source, timestamp, _text(message.get("content")))
        if source == "agent" and (calls := _atif_tool_calls(message, step["step_id"])):
            step["tool_calls"] = calls

    def _add_reply(self, record: CallRecord, choice: dict[str, Any], reply: dict[str, Any]) -> None:
        t = record.timings
        step = self._step("agent", _iso(t.ended_at or t.started_at), _text(reply.get("content")))
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

    def document(self, session: str, agent_name: str, agent_version: str) -> dict[str, Any]:
        first = self.first
        agent: dict[str, Any] = {"name": agent_name, "version": agent_version}
        if model := request_model(first):
            agent["model_name"] = model
        if user_agent := header(first.request_headers, "user-agent"):
            agent["extra"] = {"user_agent": user_agent}
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
                f"Rebuilt by llm-traj {_version()} from the LLM calls it recorded: agent steps are the model's "
                "replies; the other steps and the observations are the messages the agent sent."
            ),
            "steps": self.steps,
            "final_metrics": final,
        }
