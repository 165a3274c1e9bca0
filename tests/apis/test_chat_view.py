"""Every API's final object seen as a chat completion and its request as a chat
request, and what is built on them (show, stats, export), for calls of each API."""

from __future__ import annotations

import json

import pytest
from llmtraj.apis import API_BY_NAME, chat_view
from llmtraj.core.record import CallRecord, Timings
from llmtraj.inspect.export.openai_chat import openai_chat_samples
from llmtraj.inspect.show import render
from llmtraj.inspect.stats import call_outcome, usage_of
from llmtraj.testing.standin import FIXTURES

STREAMS = FIXTURES


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


ANTHROPIC_TURN_2 = {
    "model": "claude-sonnet-4-5",
    "system": [{"type": "text", "text": "Be brief."}],
    "tools": [{"name": "get_stock_price", "input_schema": {"type": "object"}},
              {"type": "web_search_20250305", "name": "web_search"}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "AAPL in euros?"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Use the tool.", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_stock_price", "input": {"ticker": "AAPL"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "212.40 EUR"}]}]},
    ],
}  # fmt: skip
RESPONSES_TURN_2 = {
    "model": "gpt-5",
    "instructions": "You are a coding agent.",
    "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List the files."}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA"},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "shell", "arguments": '{"command":["ls"]}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "README.md\nsrc"},
    ],
    "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}, {"type": "web_search"},
              {"type": "namespace", "name": "agents", "description": "Sub-agents.",
               "tools": [{"type": "function", "name": "spawn", "parameters": {"type": "object"}}]}],
    "parallel_tool_calls": False,
}


def test_requests_of_other_apis_as_chat_requests():
    anthropic = API_BY_NAME["anthropic.messages"].chat_request_view(ANTHROPIC_TURN_2)
    assert anthropic["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "AAPL in euros?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Use the tool.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_stock_price", "arguments": '{"ticker": "AAPL"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "212.40 EUR"},
    ]  # fmt: skip
    # every tool the agent offered: server tools (web search) as they are
    assert anthropic["tools"][1:] == [{"type": "web_search_20250305", "name": "web_search"}]
    assert [t["function"]["name"] for t in anthropic["tools"][:1]] == ["get_stock_price"]
    responses = API_BY_NAME["responses"].chat_request_view(RESPONSES_TURN_2)
    assert responses["messages"] == [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "List the files."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "shell", "arguments": '{"command":["ls"]}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "README.md\nsrc"},
    ]  # fmt: skip
    assert responses["tools"] == [  # every tool offered: a namespace's functions with their namespace, built-ins as they are
        {"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}}}, {"type": "web_search"},
        {"type": "function", "function": {"name": "spawn", "parameters": {"type": "object"}, "namespace": "agents"}},
    ]  # fmt: skip
    assert responses["parallel_tool_calls"] is False
    assert API_BY_NAME["completions"].chat_request_view({"prompt": "x"}) is None


def test_export_makes_chat_samples_of_every_api_with_a_conversation():
    records = [
        record("anthropic.messages", ANTHROPIC_TURN_2, final("anthropic", "text")),
        record("responses", RESPONSES_TURN_2, final("responses", "text")),
        record("completions", {"prompt": "Say this is a test"}, final("completions", "text")),
    ]
    records = [r.model_copy(update={"session": f"s{i}"}) for i, r in enumerate(records)]
    skipped: list = []
    first, second = list(openai_chat_samples(records, skipped=skipped))
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert first["messages"][-1]["content"].startswith("The capital of France")
    assert first["tools"] == [{"type": "function", "function": {"name": "get_stock_price", "parameters": {"type": "object"}}},
                              {"type": "web_search_20250305", "name": "web_search"}]  # fmt: skip
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert second["parallel_tool_calls"] is False
    assert [(s.session, s.reason) for s in skipped] == [("s2", "a completions call has no conversation")]


def test_show_prints_the_newest_turn_through_the_chat_view():
    """Not the raw last message: a harness's mid-conversation system message is
    passed over, a tool result is shown as its text, the prompt after reminders."""
    request = {"model": "claude", "system": [{"type": "text", "text": "sys"}], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "<system-reminder>today</system-reminder>\n"}, {"type": "text", "text": "Fix the bug"}]},
        {"role": "system", "content": "Agent types: many words"},
    ]}  # fmt: skip
    text = render([record("anthropic.messages", request, final("anthropic", "text"))])
    assert "user: Fix the bug" in text and "Agent types" not in text
    request["messages"] += [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "a.txt"}]}]},
    ]  # fmt: skip
    text = render([record("anthropic.messages", request, final("anthropic", "text"))])
    assert "tool result: a.txt" in text and '"type"' not in text.splitlines()[1]
    responses = {"model": "gpt", "input": [{"type": "function_call_output", "call_id": "c", "output": "done"}]}
    assert "tool result: done" in render([record("responses", responses, final("responses", "text"))])
