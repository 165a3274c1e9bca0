"""The bridge end to end: a real mitmdump whose route says its upstream speaks
chat completions (`upstream_api`), the stand-in as that upstream, and the real
anthropic and openai SDKs as agents speaking Messages and Responses."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import openai
import pytest
from anthropic import Anthropic
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.inspect.export import export
from llmtraj.inspect.show import render
from llmtraj.testing.standin import ANSWER, REASONING, TEXT, TOOL_CALLS, StandinUpstream
from openai import OpenAI

from ..conftest import wait_records

WEATHER_TOOL = {"name": "get_weather", "description": "The weather of a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}  # fmt: skip
FUNCTION_TOOL = {"type": "function", "name": "get_weather", "description": "The weather of a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}  # fmt: skip


@pytest.fixture(scope="module")
def chat_upstream():
    with StandinUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def bridged(chat_upstream, tmp_path_factory):
    """A recording proxy routing every model to the stand-in as a chat-completions upstream."""
    root = tmp_path_factory.mktemp("bridge")
    config = root / "upstreams.toml"
    config.write_text(f"""
default_route = "engine"

[providers.engine]
base_url = "{chat_upstream.url}/v1"
kind = "vllm"
upstream_api = "chat.completions"
capture_tokens = true

[providers.dead]
base_url = "http://127.0.0.1:9/v1"
upstream_api = "chat.completions"

[models."dead-model"]
provider = "dead"
""")
    with ProxyProcess(upstream="http://127.0.0.1:9", options={
        "llm_traj_mode": "record", "llm_traj_path": root / "traj", "llm_traj_config": config,
    }) as proxy:  # fmt: skip
        yield proxy, root / "traj"


def claude(proxy: ProxyProcess, session: str) -> Anthropic:
    return Anthropic(base_url=f"{proxy.url}/s/{session}", api_key="sk-ant-dummy", max_retries=0)


def codex(proxy: ProxyProcess, session: str) -> OpenAI:
    return OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key="sk-dummy", max_retries=0)


def test_anthropic_stream_text_is_translated_event_by_event(bridged, chat_upstream, session):
    proxy, traj = bridged
    client = claude(proxy, session)
    events = list(client.messages.create(model="standin-text", max_tokens=64, stream=True,
                                         messages=[{"role": "user", "content": "hi"}]))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert len(deltas) > 3 and "".join(deltas) == TEXT  # one event per upstream chunk, not one lump
    upstream_request = json.loads(chat_upstream.requests[-1].body)
    assert upstream_request["messages"] == [{"role": "user", "content": "hi"}]
    assert upstream_request["stream"] is True and upstream_request["max_tokens"] == 64
    [record] = wait_records(traj / f"{session}.jsonl", 1)
    assert record.api == "anthropic.messages" and record.stream and record.complete
    assert record.response["content"] == [{"type": "text", "text": TEXT}]
    assert record.response["stop_reason"] == "end_turn"
    assert record.response["usage"]["output_tokens"] > 0
    assert record.bridge is not None and record.bridge.upstream_api == "chat.completions"
    assert record.bridge.request["messages"] == [{"role": "user", "content": "hi"}]
    assert record.bridge.response["choices"][0]["message"]["content"] == TEXT
    assert record.bridge.url == f"{chat_upstream.url}/v1/chat/completions"
    assert record.tokens is not None and record.tokens.complete  # the stand-in gives vLLM-style ids when asked


def test_anthropic_stream_tool_use_with_the_sdk_helper(bridged, chat_upstream, session):
    proxy, traj = bridged
    client = claude(proxy, session)
    with client.messages.stream(model="standin-tools", max_tokens=64, tools=[WEATHER_TOOL],
                                tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "weather?"}]) as stream:  # fmt: skip
        message = stream.get_final_message()
    uses = [b for b in message.content if b.type == "tool_use"]
    assert [(u.id, u.name, u.input) for u in uses] == list(TOOL_CALLS)
    assert message.stop_reason == "tool_use"
    upstream_request = json.loads(chat_upstream.requests[-1].body)
    assert upstream_request["tool_choice"] == "required"
    assert upstream_request["tools"][0]["function"]["parameters"] == WEATHER_TOOL["input_schema"]
    # the tool results go back as tool messages after the assistant's calls
    follow = client.messages.create(model="standin-text", max_tokens=64, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [u.model_dump() for u in uses]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"},
            {"type": "tool_result", "tool_use_id": uses[1].id, "content": [{"type": "text", "text": "noon"}]},
        ]},
    ])  # fmt: skip
    assert follow.content[0].text == TEXT
    messages = json.loads(chat_upstream.requests[-1].body)["messages"]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": json.dumps(TOOL_CALLS[0][2])}
    assert messages[2:] == [{"role": "tool", "tool_call_id": uses[0].id, "content": "sunny"},
                            {"role": "tool", "tool_call_id": uses[1].id, "content": "noon"}]  # fmt: skip
    first, second = wait_records(traj / f"{session}.jsonl", 2)
    assert [b["type"] for b in first.response["content"]] == ["tool_use", "tool_use"]
    assert not second.stream and second.bridge.stream is False
    # export reads bridged records as any: the agent's conversation, the engine's tokens
    [sample] = [json.loads(line) for line in export([second], "openai-chat")]
    assert [m["role"] for m in sample["messages"]] == ["user", "assistant", "tool", "tool", "assistant"]
    rows = [json.loads(line) for line in export([first, second], "tokens")]
    assert len(rows) == 2 and all(row["prompt_ids"] and row["response_ids"] for row in rows)


def test_anthropic_thinking_and_system(bridged, chat_upstream, session):
    proxy, _ = bridged
    message = claude(proxy, session).messages.create(
        model="standin-reasoning", max_tokens=64, system=[{"type": "text", "text": "be brief"}],
        thinking={"type": "enabled", "budget_tokens": 2048}, stop_sequences=["###"],
        messages=[{"role": "user", "content": "hi"}])  # fmt: skip
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == REASONING and message.content[1].text == ANSWER
    sent = json.loads(chat_upstream.requests[-1].body)
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert sent["stop"] == ["###"] and sent["reasoning_effort"] == "low"


def test_untranslatable_is_refused_in_the_agents_shape(bridged, chat_upstream, session):
    proxy, traj = bridged
    before = len(chat_upstream.requests)
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude(proxy, session).messages.create(
            model="standin-text", max_tokens=64, messages=[{"role": "user", "content": "search"}],
            tools=[{"type": "web_search_20250305", "name": "web_search"}])  # fmt: skip
    assert refused.value.status_code == 400
    assert "web_search_20250305" in refused.value.body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        codex(proxy, session).responses.create(model="standin-text", input="hi", tools=[{"type": "web_search"}])
    assert "built-in tool 'web_search'" in refused.value.body["message"]
    assert len(chat_upstream.requests) == before  # nothing went upstream
    records = wait_records(traj / f"{session}.jsonl", 2)
    assert [r.status for r in records] == [400, 400]


def test_upstream_error_keeps_its_status_in_the_agents_shape(bridged, session):
    proxy, _ = bridged
    with pytest.raises(anthropic.RateLimitError) as failed:
        claude(proxy, session).messages.create(model="standin-error429", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert failed.value.body["error"]["type"] == "rate_limit_error"
    assert "simulated 429" in failed.value.body["error"]["message"]


def test_unreachable_upstream_is_recorded_without_a_response(bridged, session):
    proxy, traj = bridged
    with pytest.raises(anthropic.APIStatusError) as failed:
        claude(proxy, session).messages.create(model="dead-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert failed.value.status_code == 502 and failed.value.body["type"] == "error"
    [record] = wait_records(traj / f"{session}.jsonl", 1)
    assert record.status is None and record.error.kind == "upstream_unreachable" and not record.complete
    assert record.bridge.status is None and record.bridge.request["model"] == "dead-model"
    assert "bridged to chat.completions: http://127.0.0.1:9/v1/chat/completions (no response)" in render([record])


def test_responses_stream_and_create(bridged, chat_upstream, session):
    proxy, traj = bridged
    client = codex(proxy, session)
    with client.responses.stream(model="standin-tools", input="weather?", tools=[FUNCTION_TOOL],
                                 instructions="use tools") as stream:  # fmt: skip
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.function_call_arguments.delta") >= 4
    calls = [(item.call_id, item.name, json.loads(item.arguments)) for item in final.output]
    assert calls == list(TOOL_CALLS)
    sent = json.loads(chat_upstream.requests[-1].body)
    assert sent["messages"] == [{"role": "system", "content": "use tools"}, {"role": "user", "content": "weather?"}]
    plain = client.responses.create(model="standin-reasoning", input=[
        {"role": "user", "content": "weather?"},
        *({"type": "function_call", "call_id": c, "name": n, "arguments": json.dumps(a)} for c, n, a in TOOL_CALLS),
        *({"type": "function_call_output", "call_id": c, "output": "ok"} for c, _, _ in TOOL_CALLS),
    ], max_output_tokens=50)  # fmt: skip
    assert plain.output_text == ANSWER
    assert [item.type for item in plain.output] == ["reasoning", "message"]
    sent = json.loads(chat_upstream.requests[-1].body)
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool", "tool"]
    assert len(sent["messages"][1]["tool_calls"]) == 2 and sent["max_tokens"] == 50
    records = wait_records(traj / f"{session}.jsonl", 2)
    assert [r.api for r in records] == ["responses", "responses"]
    assert records[0].response["status"] == "completed" and records[1].bridge.response["object"] == "chat.completion"


def test_first_event_arrives_while_the_upstream_still_streams(bridged, session):
    """Paced upstream (50 ms per chunk): the agent has its first text before the upstream's stream has ended."""
    proxy, traj = bridged
    client = claude(proxy, session)
    started = time.monotonic()
    first = None
    with client.messages.with_streaming_response.create(
        model="standin-chunks", max_tokens=64, stream=True, messages=[{"role": "user", "content": "x"}],
        extra_headers={"x-standin-chunks": "10", "x-standin-delay-ms": "50"}) as response:  # fmt: skip
        for line in response.iter_lines():
            if "content_block_delta" in line and first is None:
                first = time.monotonic() - started
        total = time.monotonic() - started
    assert first is not None and first < total - 0.2
    [record] = wait_records(traj / f"{session}.jsonl", 1)
    assert record.bridge.events >= 12 and record.bridge.ended_at > record.timings.first_byte_at
    # when each upstream event came: paced 50 ms apart, in order, within the upstream's stream
    times = record.bridge.event_times
    assert len(times) == record.bridge.events and times == sorted(times)
    assert times[-1] - times[0] >= 0.4 and times[-1] <= record.bridge.ended_at - record.bridge.first_byte_at


def test_replay_serves_the_agent_what_it_saw(bridged, tmp_path, session):
    proxy, traj = bridged
    client = claude(proxy, session)
    recorded = client.messages.create(model="standin-tools", max_tokens=64, tools=[WEATHER_TOOL],
                                      messages=[{"role": "user", "content": "weather?"}])  # fmt: skip
    wait_records(traj / f"{session}.jsonl", 1)
    with ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_mode": "replay", "llm_traj_path": traj}) as replay:
        again = claude(replay, session).messages.create(model="standin-tools", max_tokens=64, tools=[WEATHER_TOOL],
                                                         messages=[{"role": "user", "content": "weather?"}])  # fmt: skip
    assert again.model_dump() == recorded.model_dump()


def test_health_names_each_routes_upstream_api(bridged, chat_upstream):
    proxy, _ = bridged
    routes = httpx.get(f"{proxy.url}/llm-traj/health").json()["routes"]
    assert {"name": "engine", "url": f"{chat_upstream.url}/v1", "upstream_api": "chat.completions"} in routes


def test_an_agent_that_goes_away_stops_the_upstream(bridged, chat_upstream, session):
    """The agent hangs up after the first event of a 3 s stream: the bridge closes the upstream connection
    (an engine stops generating), and the record says the client went away."""
    proxy, traj = bridged
    headers = {"x-standin-chunks": "30", "x-standin-delay-ms": "100"}
    body = {"model": "standin-chunks", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", f"{proxy.url}/s/{session}/v1/messages", json=body, headers=headers, timeout=30) as response:
        next(response.iter_raw())
    [record] = wait_records(traj / f"{session}.jsonl", 1)
    assert record.error is not None and record.error.kind == "client_disconnected"
    time.sleep(3.5)  # past the stream's whole length
    sent = chat_upstream.sent[-1]
    assert sent.header("content-type") == "text/event-stream" and sent.body == b""  # never written to its end


def test_an_upstream_that_breaks_off_ends_the_agents_stream_with_its_error_event(bridged, session):
    proxy, traj = bridged
    with pytest.raises(anthropic.APIStatusError) as failed:  # the SDK raises the stream's error event
        list(claude(proxy, session).messages.create(model="standin-drop", max_tokens=64, stream=True,
                                                    messages=[{"role": "user", "content": "x"}]))  # fmt: skip
    assert "upstream broke off" in str(failed.value)
    [record] = wait_records(traj / f"{session}.jsonl", 1)
    assert record.status == 200 and not record.complete and record.error.kind == "upstream_disconnected"
    assert json.loads(record.events[-1].raw.split("data: ", 1)[1])["type"] == "error"
