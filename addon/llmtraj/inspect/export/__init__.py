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

tokens
    Token ids for RL trainers (see `tokens.py`): `per_call` a row per choice
    of each call with token ids, `per_session` a row per linear chain of a
    session; JSON lines, or Parquet when the output file ends in `.parquet`.

Failed and incomplete calls are no part of a conversation: openai-chat and
atif leave them out and list them, with every other call they skip, in the
`skipped` list the caller passes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from ...core.record import CallRecord
from .atif import atif_documents
from .common import FORMATS, GRANULARITIES, Skipped
from .har import har
from .openai_chat import openai_chat_samples
from .tokens import token_rows

__all__ = ["FORMATS", "GRANULARITIES", "Skipped", "atif_documents", "export", "har", "openai_chat_samples"]


def export(
    records: Iterable[CallRecord],
    fmt: str,
    *,
    granularity: str = "per_call",
    agent_name: str | None = None,
    agent_version: str | None = None,
    skipped: list[Skipped] | None = None,
) -> Iterator[str] | str:
    """`openai-chat`, `tokens`: JSON lines, one sample each; `atif`: JSON lines, one
    document per session (lines come without their newline); `har`: one JSON
    document. ValueError for an unknown format or granularity."""
    if fmt == "openai-chat":
        return map(_line, openai_chat_samples(records, granularity, skipped))
    if fmt == "har":
        return json.dumps(har(records), ensure_ascii=False, indent=2)
    if fmt == "atif":
        return map(_line, atif_documents(records, agent_name=agent_name, agent_version=agent_version, skipped=skipped))
    if fmt == "tokens":
        return map(_line, token_rows(records, granularity, skipped))
    raise ValueError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")


def _line(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
