"""Every API's final object seen as a chat completion, and the views built on
that (show, stats, the record summary), for calls of each API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtraj.apis import API_BY_NAME, chat_view
from llmtraj.record import CallRecord, Timings
from llmtraj.show import render
from llmtraj.stats import call_outcome, usage_of

STREAMS = Path(__file__).resolve().parents[1] / "fixtures" / "streams"


def final(folder: str, name: str) -> dict:
    return json.loads((STREAMS / folder / f"{name}.expected.json").read_text())


def record(api: str, request: dict, response: dict, status: int = 200) -> CallRecord:
    return CallRecord(session="s", index=1, api=api, mode="record", method="POST", url="http://x/v1/y",
                      request_headers=[], request=request, status=status, response=response,
                      timings=Timings(started_at=1.0, first_byte_at=1.2, ended_at=1.5))  # fmt: skip


def test_anthropic_thinking_text_and_tool_use():
    view = chat_view("anthropic.messages", final("anthropic", "thinking_tool_use"))
    [choice] = view["choices"]
    message = choice["message"]
    assert message["content"] == "Let me look up Apple's current price in euros."
    assert message["reasoning_content"].startswith("The user asks what Apple's stock")
    [call] = message["tool_calls"]
    assert call["function"]["name"] == "get_stock_price"
    assert json.loads(call["function"]["arguments"]) == {"ticker": "AAPL", "currency": "EUR"}
    assert choice["finish_reason"] == "tool_calls"
    # cache reads are prompt tokens too
    assert view["usage"] == {"prompt_tokens": 38 + 1854, "completion_tokens": 154, "total_tokens": 2046}


def test_responses_reasoning_message_and_function_call():
    view = chat_view("responses", final("responses", "reasoning_function_call"))
    message = view["choices"][0]["message"]
    assert message["content"] == "I'll list the directory contents."
    assert message["reasoning_content"].startswith("**Listing directory contents**")
    assert message["tool_calls"][0]["id"].startswith("call_") and message["tool_calls"][0]["function"]["name"] == "shell"
    assert view["choices"][0]["finish_reason"] == "tool_calls"
    assert view["usage"]["completion_tokens_details"] == {"reasoning_tokens": 128}


def test_legacy_completions_keep_every_choice():
    view = chat_view("completions", final("completions", "text"))
    assert [c["message"]["content"] for c in view["choices"]] == ["\n\nThis is a test.", "\n\nThis is only a test"]
    assert [c["finish_reason"] for c in view["choices"]] == ["stop", "length"]


@pytest.mark.parametrize("api", sorted(API_BY_NAME))
def test_error_bodies_and_non_objects_pass_through(api):
    error = API_BY_NAME[api].error_body("boom", "server_error", "x")
    assert chat_view(api, error)["error"] == error["error"]
    assert chat_view(api, None) is None and chat_view("unknown.api", {"a": 1}) == {"a": 1}


def test_show_and_stats_read_every_api():
    anthropic = record("anthropic.messages", {"model": "claude", "messages": [{"role": "user", "content": "AAPL?"}]},
                       final("anthropic", "thinking_tool_use"))  # fmt: skip
    responses = record("responses", {"model": "gpt-5", "input": "list files"}, final("responses", "reasoning_function_call"))
    text = render([anthropic, responses])
    assert "anthropic.messages  claude  200  json  1892+154 tokens" in text
    assert "user: AAPL?" in text and "tool call get_stock_price(" in text and "reasoning: The user asks" in text
    assert "responses  gpt-5  200  json  2318+214 tokens" in text and "user: list files" in text
    assert [call_outcome(r) for r in (anthropic, responses)] == ["ok", "ok"]
    assert usage_of(anthropic)["completion_tokens"] == 154
    failed = record("anthropic.messages", {}, API_BY_NAME["anthropic.messages"].error_body("overloaded", "overloaded_error"), 529)
    assert call_outcome(failed) == "failed" and "error: " in render([failed])
