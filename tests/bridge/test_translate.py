"""The bridge's translations, both ways, for every block and item type, and
its refusals: Anthropic Messages and Responses requests to chat completions,
and chat-completions streams and bodies back to each API's own events, checked
by folding them with the real SDKs' accumulators."""

from __future__ import annotations

import inspect
import json

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from llmtraj.apis import API_BY_NAME
from llmtraj.bridge import Untranslatable, to_chat
from llmtraj.bridge.to_agent import StreamTranslator, translate_body
from llmtraj.core.sse import SSEParser
from openai.types.responses import Response
from pydantic import TypeAdapter

ANTHROPIC = API_BY_NAME["anthropic.messages"]
RESPONSES = API_BY_NAME["responses"]
IMAGE = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


# --- Anthropic Messages -> chat ------------------------------------------------


def test_anthropic_request_every_block():
    request = {
        "model": "m", "max_tokens": 100, "temperature": 0.5, "top_p": 0.9, "top_k": 20, "stop_sequences": ["END"],
        "stream": True, "metadata": {"user_id": "u1"},
        "system": [{"type": "text", "text": "sys one", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "sys two"}],
        "tools": [{"name": "get_weather", "description": "d", "input_schema": SCHEMA}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "thinking": {"type": "enabled", "budget_tokens": 10000},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image", "source": IMAGE},
                                         {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "calling"},
                {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": "bad"}], "is_error": True},
                {"type": "text", "text": "and now?"},
            ]},
            {"role": "assistant", "content": "plain"},
            {"role": "system", "content": [{"type": "text", "text": "reminder"}]},
        ],
    }  # fmt: skip
    chat = to_chat("anthropic.messages", request)
    assert chat == {
        "model": "m", "max_tokens": 100, "temperature": 0.5, "top_p": 0.9, "top_k": 20, "stop": ["END"],
        "stream": True, "stream_options": {"include_usage": True}, "user": "u1",
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA, "description": "d"}}],
        "tool_choice": "auto", "parallel_tool_calls": False,
        "reasoning_effort": "medium", "chat_template_kwargs": {"enable_thinking": True},
        "messages": [
            {"role": "system", "content": "sys one\n\nsys two"},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
            ]},
            {"role": "assistant", "content": "calling", "reasoning_content": "hmm", "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "t2", "content": "Error: bad"},
            {"role": "user", "content": "and now?"},
            {"role": "assistant", "content": "plain"},
            {"role": "system", "content": "reminder"},
        ],
    }  # fmt: skip


def test_anthropic_output_config_and_context_management():
    request = {"model": "m", "max_tokens": 1, "messages": [], "thinking": {"type": "enabled", "budget_tokens": 1000},
               "output_config": {"effort": "high", "format": {"type": "json_schema", "schema": SCHEMA}},
               "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}}  # fmt: skip
    chat = to_chat("anthropic.messages", request)
    assert chat["reasoning_effort"] == "high"
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA}}
    assert "context_management" not in chat


@pytest.mark.parametrize("choice, expected", [
    ({"type": "any"}, "required"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
])  # fmt: skip
def test_anthropic_tool_choice(choice, expected):
    chat = to_chat("anthropic.messages", {"model": "m", "max_tokens": 1, "messages": [], "tool_choice": choice})
    assert chat["tool_choice"] == expected


@pytest.mark.parametrize("request_part, named", [
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "bash_20250124"),
    ({"mcp_servers": [{"type": "url", "url": "https://m"}]}, "mcp_servers"),
    ({"container": "c1"}, "container"),
    ({"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}}, "clear_tool_uses_20250919"),
    ({"context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 1}}]}},
     "clear_thinking_20251015"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "document"),
    ({"messages": [{"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]}]}, "redacted_thinking"),
    ({"messages": [{"role": "assistant", "content": [{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}]}]},
     "server_tool_use"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]}, "'file' source"),
    ({"system": [{"type": "image", "source": IMAGE}]}, "image block in system"),
])  # fmt: skip
def test_anthropic_refusals_name_the_feature(request_part, named):
    request = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}], **request_part}
    with pytest.raises(Untranslatable) as refused:
        to_chat("anthropic.messages", request)
    assert named in str(refused.value) and "cannot be translated" in str(refused.value)


# --- Responses -> chat ---------------------------------------------------------


def test_responses_request_every_item():
    request = {
        "model": "m", "instructions": "be good", "max_output_tokens": 50, "temperature": 0.2, "top_p": 0.8,
        "parallel_tool_calls": False, "stream": True, "store": False, "prompt_cache_key": "k",
        "include": ["reasoning.encrypted_content"], "reasoning": {"effort": "low", "summary": "auto"},
        "text": {"format": {"type": "json_schema", "name": "out", "schema": SCHEMA, "strict": True}, "verbosity": "medium"},
        "tools": [{"type": "function", "name": "get_weather", "description": "d", "parameters": SCHEMA, "strict": False},
                  {"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": "inner", "parameters": SCHEMA}]}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "dev note"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "look"},
                                         {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "high"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking"}], "encrypted_content": None},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "calling"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
            {"role": "user", "content": "thanks"},
        ],
    }  # fmt: skip
    chat = to_chat("responses", request)
    assert chat == {
        "model": "m", "max_tokens": 50, "temperature": 0.2, "top_p": 0.8, "parallel_tool_calls": False,
        "stream": True, "stream_options": {"include_usage": True}, "reasoning_effort": "low",
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA, "strict": True}},
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": SCHEMA, "strict": False}},
                  {"type": "function", "function": {"name": "inner", "parameters": SCHEMA}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [
            {"role": "system", "content": "be good"},
            {"role": "system", "content": "dev note"},
            {"role": "user", "content": [{"type": "text", "text": "look"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "high"}}]},
            {"role": "assistant", "content": "calling", "reasoning_content": "thinking", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": "rain"},
            {"role": "user", "content": "thanks"},
        ],
    }  # fmt: skip


def test_responses_string_input():
    assert to_chat("responses", {"model": "m", "input": "hi"})["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("request_part, named", [
    ({"tools": [{"type": "web_search"}]}, "built-in tool 'web_search'"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "built-in tool 'file_search'"),
    ({"tools": [{"type": "computer_use_preview"}]}, "built-in tool 'computer_use_preview'"),
    ({"tools": [{"type": "custom", "name": "apply_patch", "format": {"type": "grammar"}}]}, "custom tool 'apply_patch'"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"input": [{"type": "reasoning", "id": "rs", "summary": [], "encrypted_content": "gAAA"}]}, "encrypted reasoning"),
    ({"input": [{"type": "web_search_call", "id": "ws", "status": "completed"}]}, "web_search_call"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input_file"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
])  # fmt: skip
def test_responses_refusals_name_the_feature(request_part, named):
    with pytest.raises(Untranslatable) as refused:
        to_chat("responses", {"model": "m", "input": "x", **request_part})
    assert named in str(refused.value)


def test_other_apis_are_not_bridged():
    with pytest.raises(Untranslatable, match="completions call"):
        to_chat("completions", {"model": "m", "prompt": "x"})


# --- chat -> the agent's API ----------------------------------------------------


def chunk(delta=None, finish=None, **top):
    choices = [] if delta is None and finish is None else [{"index": 0, "delta": delta or {}, "finish_reason": finish, **top.pop("choice", {})}]
    return ("data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": choices, **top}) + "\n\n").encode()


USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
TOOL_STREAM = [
    chunk({"role": "assistant", "reasoning_content": "let me"}),
    chunk({"reasoning_content": " think"}),
    chunk({"content": "Calling."}),
    chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}),
    chunk({}, "tool_calls"),
    chunk(usage=USAGE),
    b"data: [DONE]\n\n",
]  # fmt: skip


def translated(api, request, chunks, chat_request=None):
    translator = StreamTranslator(api, request, chat_request or {})
    out = b"".join(translator.feed(c) for c in chunks) + translator.close()
    return out, translator


def anthropic_fold(stream: bytes) -> Message:
    snapshot = None
    adapter = TypeAdapter(RawMessageStreamEvent)
    # newer SDKs (anthropic 2.x) keep each tool input's partial JSON in buffers the caller owns
    buffers = {"json_bufs": {}} if "json_bufs" in inspect.signature(accumulate_event).parameters else {}
    for block in SSEParser().feed(stream):
        snapshot = accumulate_event(event=adapter.validate_json(block.data), current_snapshot=snapshot, **buffers)
    return snapshot


def test_chat_stream_to_anthropic_events():
    out, translator = translated(ANTHROPIC, {"model": "claude-x"}, TOOL_STREAM)
    assert translator.failed is None and translator.done
    message = anthropic_fold(out)
    assert message.model == "claude-x" and message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert message.content[0].thinking == "let me think" and message.content[1].text == "Calling."
    assert (message.content[2].id, message.content[2].input) == ("call_a", {"city": "Paris"})
    assert (message.content[3].name, message.content[3].input) == ("get_time", {})
    assert message.usage.input_tokens == 10 and message.usage.output_tokens == 5
    # the arguments arrive as the upstream streamed them
    deltas = [json.loads(b.data)["delta"] for b in SSEParser().feed(out) if b.event == "content_block_delta"]
    assert [d["partial_json"] for d in deltas if d["type"] == "input_json_delta"] == ['{"city": ', '"Paris"}', "{}"]


def test_interleaved_tool_calls_are_put_in_order():
    stream = [
        chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": '{"x":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"y":'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "1}"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "2}"}}]}),
        chunk({}, "tool_calls"),
    ]  # fmt: skip
    out, translator = translated(ANTHROPIC, {"model": "m"}, stream)
    message = anthropic_fold(out)
    assert [(b.id, b.input) for b in message.content] == [("a", {"y": 2}), ("b", {"x": 1})]


def test_stop_sequence_and_length():
    stop = [chunk({"content": "hi"}), chunk({}, "stop", choice={"stop_reason": "END"})]
    message = anthropic_fold(translated(ANTHROPIC, {}, stop, {"stop": ["END"]})[0])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")
    message = anthropic_fold(translated(ANTHROPIC, {}, [chunk({"content": "hi"}), chunk({}, "length")])[0])
    assert message.stop_reason == "max_tokens"


def test_a_stream_cut_short_ends_with_an_error_event():
    out, translator = translated(ANTHROPIC, {}, [chunk({"content": "hi"})])
    blocks = SSEParser().feed(out)
    assert blocks[-1].event == "error" and translator.failed
    assert json.loads(blocks[-1].data)["error"]["type"] == "api_error"


def test_chat_stream_to_responses_events():
    out, translator = translated(RESPONSES, {"model": "gpt-x", "instructions": "be good"}, TOOL_STREAM)
    events = [json.loads(b.data) for b in SSEParser().feed(out)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = Response.model_validate(events[-1]["response"])
    assert events[-1]["type"] == "response.completed" and final.instructions == "be good"
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call", "function_call"]
    assert final.output[0].summary[0].text == "let me think" and final.output_text == "Calling."
    assert (final.output[2].call_id, json.loads(final.output[2].arguments)) == ("call_a", {"city": "Paris"})
    assert final.usage.input_tokens == 10 and final.usage.output_tokens == 5
    aggregator = RESPONSES.new_aggregator()
    for block in SSEParser().feed(out):
        aggregator.add(block)
    assert aggregator.result() == events[-1]["response"]


def test_chat_body_to_each_api():
    completion = {"id": "c", "object": "chat.completion", "model": "engine", "usage": USAGE, "choices": [{
        "index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "ok", "reasoning": "because",
            "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}}]}  # fmt: skip
    message = translate_body(ANTHROPIC, {"model": "claude-x"}, {}, completion)
    Message.model_validate(message)
    assert [b["type"] for b in message["content"]] == ["thinking", "text", "tool_use"]
    assert message["content"][2]["input"] == {"a": 1} and message["stop_reason"] == "tool_use"
    response = translate_body(RESPONSES, {"model": "gpt-x"}, {}, completion)
    Response.model_validate(response)
    assert [i["type"] for i in response["output"]] == ["reasoning", "message", "function_call"]
    with pytest.raises(ValueError, match="several choices"):
        translate_body(ANTHROPIC, {}, {}, {**completion, "choices": completion["choices"] * 2})


@pytest.mark.parametrize("framing", ["lf", "crlf", "comments", "split"])
def test_any_sse_framing_of_the_upstream(framing):
    stream = [chunk({"content": "Hello"}), chunk({"content": " there"}), chunk({}, "stop"), b"data: [DONE]\n\n"]
    if framing == "crlf":
        stream = [c.replace(b"\n", b"\r\n") for c in stream]
    elif framing == "comments":
        stream = [b": keep-alive\n\n", *stream[:2], b"event: chunk\n" + stream[2], stream[3]]
    elif framing == "split":  # events cut anywhere across the pieces the upstream's body comes in
        whole = b"".join(stream)
        stream = [whole[i : i + 7] for i in range(0, len(whole), 7)]
    out, translator = translated(ANTHROPIC, {}, stream)
    message = anthropic_fold(out)
    assert message.content[0].text == "Hello there" and message.stop_reason == "end_turn" and translator.done
