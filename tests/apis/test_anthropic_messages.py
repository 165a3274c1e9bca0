"""Anthropic messages: fixtures against their expected messages and the
anthropic SDK's own accumulator, the stream made from a final message, the
stream built from a driver's deltas, and the small API-shape methods.

The fixtures in `fixtures/streams/anthropic/` were written by hand in the
shape api.anthropic.com streams (named events, `ping`s, compact JSON with
space padding before the closing brace in some events, cumulative usage in
`message_delta`); they are not captures. Each `NAME.sse` has the message it
aggregates to (`NAME.expected.json`, the SDK's result too) and the request
that would have produced it (`NAME.request.json`)."""

from __future__ import annotations

import copy
import inspect
import json
import random
from typing import Any

import anthropic
import llmtraj.apis.anthropic_messages as anthropic_messages
import pytest
from anthropic import Anthropic
from anthropic._models import construct_type
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from llmtraj.apis.anthropic_messages import (
    AnthropicMessageAggregator,
    AnthropicMessages,
)
from llmtraj.core.sse import SSEBlock

from ..sdk_http import http_of
from ..streams import STREAMS as ALL_STREAMS
from ..streams import blocks_of, expected_for, fold, fold_in_pieces, request_for

STREAMS = ALL_STREAMS / "anthropic"
FIXTURES = sorted(STREAMS.glob("*.sse"))
API = AnthropicMessages()


def aggregate(blocks: list[SSEBlock]) -> AnthropicMessageAggregator:
    return fold(AnthropicMessageAggregator(), blocks)


def sse(*events: tuple[str, Any]) -> bytes:
    return b"".join(
        b"event: %s\ndata: %s\n\n" % (name.encode(), (data if isinstance(data, str) else json.dumps(data)).encode())
        for name, data in events
    )


def sdk_accumulate(blocks: list[SSEBlock]) -> dict[str, Any]:
    """What `client.messages.stream(...)` ends with: the events its stream
    yields (named message events, data built with the SDK's lenient
    `construct_type`) folded by its `accumulate_event`."""
    snapshot = None
    # newer SDKs (anthropic 2.x) keep each tool input's partial JSON in buffers the caller owns
    buffers = {"json_bufs": {}} if "json_bufs" in inspect.signature(accumulate_event).parameters else {}
    for block in blocks:
        if block.data is None or block.event == "ping":
            continue
        assert block.event != "error", "the SDK raises on error events"
        event = construct_type(type_=RawMessageStreamEvent, value=json.loads(block.data))
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, **buffers)
    assert snapshot is not None
    return snapshot.to_dict(mode="json")


def same_as_sdk(ours: dict[str, Any], sdk: dict[str, Any]) -> bool:
    """The SDK sets `stop_details` to null at every message_delta even when the
    event has none; the aggregator keeps only what the stream carried."""
    sdk = dict(sdk)
    if sdk.get("stop_details") is None and "stop_details" not in ours:
        sdk.pop("stop_details", None)
    return ours == sdk


def sdk_over_http(body: bytes) -> dict[str, Any]:
    """The message the real SDK client gets for a streamed response `body`."""
    http = http_of(anthropic)
    transport = http.MockTransport(lambda request: http.Response(200, headers={"content-type": "text/event-stream"}, content=body))
    client = Anthropic(api_key="test", base_url="http://anthropic.test", http_client=http.Client(transport=transport), max_retries=0)
    with client.messages.stream(model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as stream:
        return stream.get_final_message().to_dict(mode="json")


def message(*content: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "id": "msg_01Test", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
        "content": list(content), "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5}, **top,
    }  # fmt: skip


CITATION = {"type": "char_location", "cited_text": "The grass is green.", "document_index": 0, "document_title": "Notes",
            "start_char_index": 0, "end_char_index": 19}  # fmt: skip
BUILT = {
    "empty": message(),
    "empty_text": message({"type": "text", "text": ""}),
    "stop_sequence": message({"type": "text", "text": "1, 2, 3"}, stop_reason="stop_sequence", stop_sequence="4"),
    "citations": message({"type": "text", "text": "the grass is green", "citations": [CITATION, {**CITATION, "start_char_index": 3}]}),
    "redacted_thinking": message(
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP"},
        {"type": "thinking", "thinking": "", "signature": "EqQBCgIYAhIM"},
        {"type": "text", "text": "Done."},
    ),
    "server_tool": message(
        {"type": "server_tool_use", "id": "srvtoolu_014hJH82Qum7Td6UV8gDXThB", "name": "web_search", "input": {"query": "weather NYC"}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_014hJH82Qum7Td6UV8gDXThB",
         "content": [{"type": "web_search_result", "title": "Weather", "url": "https://example.com/w", "encrypted_content": "Ev0D", "page_age": None}]},
        {"type": "text", "text": "It is sunny."},
        usage={"input_tokens": 2679, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 510,
               "server_tool_use": {"web_search_requests": 1}, "service_tier": "standard"},
    ),
    "tool_no_input": message({"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}, stop_reason="tool_use"),
    "unicode_tool": message({"type": "tool_use", "id": "toolu_2", "name": "say", "input": {"text": "杭州 café 🙂\n\"q\"", "n": [1, 2.5, None, True]}},
                            stop_reason="tool_use"),
    "refusal": message({"type": "text", "text": "I can't help with that."}, stop_reason="refusal",
                       stop_details={"type": "refusal", "category": "cyber", "explanation": None}),
    "container": message({"type": "text", "text": "ok"}, container={"id": "container_011", "expires_at": "2025-06-01T00:00:00Z"}),
    "max_tokens": message({"type": "thinking", "thinking": "Let me think", "signature": ""}, stop_reason="max_tokens"),
}  # fmt: skip


# ------------------------------------------------------------------- fixtures


def test_fixtures_exist():
    assert {f.stem for f in FIXTURES} >= {"text", "tool_use", "thinking_tool_use"}


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_fixture_aggregates_to_expected(fixture):
    agg = aggregate(blocks_of(fixture.read_bytes()))
    assert agg.problems == []
    assert agg.done
    assert agg.result() == expected_for(fixture)


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_fixture_matches_the_anthropic_sdk(fixture):
    blocks = blocks_of(fixture.read_bytes())
    ours = aggregate(blocks).result()
    assert same_as_sdk(ours, sdk_accumulate(blocks))
    assert same_as_sdk(ours, sdk_over_http(fixture.read_bytes()))
    Message.model_validate(ours)  # a valid Message, strictly


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_fixture_requests_fit_their_streams(fixture):
    request, expected = request_for(fixture), expected_for(fixture)
    assert request["stream"] is True and request["max_tokens"] > 0 and API.wants_stream(request)
    assert expected["model"].startswith(request["model"])
    tool_names = {t["name"] for t in request.get("tools", [])}
    assert {b["name"] for b in expected["content"] if b["type"] == "tool_use"} <= tool_names
    assert any(b["type"] == "thinking" for b in expected["content"]) == ("thinking" in request)


def test_fixtures_cover_the_interesting_shapes():
    expected = {f.stem: expected_for(f) for f in FIXTURES}
    blocks = [b for e in expected.values() for b in e["content"]]
    assert sum(b["type"] == "tool_use" for b in blocks) >= 2
    assert any(b["type"] == "thinking" and b["signature"] for b in blocks)
    assert {e["stop_reason"] for e in expected.values()} >= {"end_turn", "tool_use"}
    data = b"".join(f.read_bytes() for f in FIXTURES)
    assert b"event: ping" in data and b' }\n' in data  # keep-alives and padded JSON


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_fixture_split_anywhere_aggregates_the_same(fixture):
    data = fixture.read_bytes()
    for seed in range(20):
        agg = fold_in_pieces(AnthropicMessageAggregator(), data, random.Random(seed))
        assert agg.problems == [] and agg.result() == expected_for(fixture)


def test_stream_without_event_lines_uses_the_data_type():
    fixture = STREAMS / "tool_use.sse"
    data = b"\n".join(line for line in fixture.read_bytes().split(b"\n") if not line.startswith(b"event: "))
    agg = aggregate(blocks_of(data))
    assert agg.problems == [] and agg.result() == expected_for(fixture)


# ----------------------------------------------------------- chunks_from_final


ROUND_TRIP = {**{f"fixture-{f.stem}": expected_for(f) for f in FIXTURES}, **BUILT}


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_chunks_from_final_round_trip(name):
    final = ROUND_TRIP[name]
    body = b"".join(API.chunks_from_final(copy.deepcopy(final)))
    agg = aggregate(blocks_of(body))
    assert agg.problems == [] and agg.done
    assert agg.result() == final
    assert same_as_sdk(final, sdk_accumulate(blocks_of(body)))
    assert same_as_sdk(final, sdk_over_http(body))


def test_chunks_from_final_event_sequence():
    final = expected_for(STREAMS / "thinking_tool_use.sse")
    chunks = API.chunks_from_final(final)
    assert all(c.startswith(b"event: ") and c.endswith(b"\n\n") and c.count(b"\n") == 3 for c in chunks)
    blocks = [b for c in chunks for b in blocks_of(c)]
    events = [json.loads(b.data) for b in blocks]
    assert all(b.event == e["type"] for b, e in zip(blocks, events))
    assert [b.event for b in blocks] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["stop_sequence"] is None
    assert start["usage"] == final["usage"]
    assert events[1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[5]["content_block"] == {"type": "text", "text": ""}
    assert events[8]["content_block"]["input"] == {}
    assert json.loads(events[9]["delta"]["partial_json"]) == {"ticker": "AAPL", "currency": "EUR"}
    assert events[11]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[11]["usage"] == {"output_tokens": 154, "input_tokens": 38, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1854}


@pytest.mark.parametrize("content", [None, "hi", [1], [{"type": "text", "text": "a"}, "b"]])
def test_chunks_from_final_rejects_content_that_is_not_blocks(content):
    with pytest.raises(ValueError, match="content"):
        API.chunks_from_final(message(content=content))


def test_chunks_from_final_without_usage_still_streams():
    final = {k: v for k, v in message({"type": "text", "text": "x"}).items() if k != "usage"}
    result = aggregate(blocks_of(b"".join(API.chunks_from_final(final)))).result()
    assert result == {**final, "usage": {"input_tokens": 0, "output_tokens": 0}}


# ------------------------------------------------------------ odd streams


START = ("message_start", {"type": "message_start", "message": message(stop_reason=None)})


def delta(index: int, **d: Any) -> tuple[str, dict[str, Any]]:
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}


def block_start(index: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}


def block_stop(index: int) -> tuple[str, dict[str, Any]]:
    return "content_block_stop", {"type": "content_block_stop", "index": index}


def test_bad_json_is_a_problem_and_the_rest_aggregates():
    fixture = STREAMS / "tool_use.sse"
    good = blocks_of(fixture.read_bytes())
    bad = blocks_of(b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_d\n\n')
    bad += blocks_of(b"event: content_block_delta\ndata: [1, 2]\n\n")
    agg = aggregate(good[:5] + bad + good[5:])
    assert len(agg.problems) == 2
    assert "not JSON" in agg.problems[0] and "not a JSON object" in agg.problems[1]
    assert agg.result() == expected_for(fixture)


def test_error_event_mid_stream_keeps_the_partial_message():
    error = {"type": "overloaded_error", "message": "Overloaded"}
    data = sse(START, block_start(0, {"type": "text", "text": ""}), delta(0, type="text_delta", text="Partial"),
               ("error", {"type": "error", "error": error}))  # fmt: skip
    agg = aggregate(blocks_of(data))
    assert len(agg.problems) == 1 and agg.problems[0].startswith("error event:") and "overloaded_error" in agg.problems[0]
    result = agg.result()
    assert result["error"] == error
    assert result["content"] == [{"type": "text", "text": "Partial"}] and result["stop_reason"] is None
    assert not agg.done


def test_error_event_alone_is_the_error_body():
    error = {"type": "api_error", "message": "Internal server error"}
    agg = aggregate(blocks_of(sse(("error", {"type": "error", "error": error}))))
    assert agg.result() == {"type": "error", "error": error} == API.error_body("Internal server error", "api_error")
    assert len(agg.problems) == 1


def test_unterminated_last_block_is_ignored():
    data = sse(START, block_start(0, {"type": "text", "text": ""}), delta(0, type="text_delta", text="a"))
    blocks = blocks_of(data + b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"b"}}')
    assert blocks[-1].terminated is False
    agg = aggregate(blocks)
    assert agg.problems == [] and agg.result()["content"] == [{"type": "text", "text": "a"}]


def test_nothing_seen_is_none():
    assert AnthropicMessageAggregator().result() is None
    agg = aggregate(blocks_of(b': keep-alive\n\nevent: ping\ndata: {"type": "ping"}\n\n'))
    assert agg.result() is None and agg.problems == []


@pytest.mark.parametrize(
    "events, problem",
    [
        ([delta(0, type="text_delta", text="x")], "before message_start"),
        ([START, START], "second message_start"),
        ([START, delta(0, type="text_delta", text="x")], "no started block"),
        ([START, block_stop(3)], "no started block"),
        ([START, block_start(0, {"type": "tool_use", "id": "t", "name": "f", "input": {}}), delta(0, type="text_delta", text="x")], "text_delta not folded"),
        ([START, block_start(0, {"type": "text", "text": ""}), delta(0, type="text_delta", text=None)], "text_delta not folded"),
        ([START, block_start(0, {"type": "text", "text": ""}), delta(0, type="hologram_delta", beam="x")], "hologram_delta not folded"),
        ([START, ("content_block_start", {"type": "content_block_start", "index": 0})], "without a content block"),
        ([START, ("message_delta", {"type": "message_delta", "delta": "x", "usage": {}})], "not an object"),
        ([("message_start", {"type": "message_start"})], "without a message"),
    ],
    ids=["delta-first", "two-starts", "delta-no-block", "stop-no-block", "wrong-block", "null-text", "unknown-delta",
         "start-no-block", "odd-message-delta", "start-no-message"],
)  # fmt: skip
def test_odd_events_are_problems_not_exceptions(events, problem):
    agg = aggregate(blocks_of(sse(*events)))
    assert len(agg.problems) == 1 and problem in agg.problems[0]


def test_unknown_event_types_are_skipped_as_the_sdk_does():
    data = sse(START, ("hologram", {"type": "hologram", "beam": 1}), block_start(0, {"type": "text", "text": "a"}))
    agg = aggregate(blocks_of(data))
    assert agg.problems == [] and agg.result()["content"] == [{"type": "text", "text": "a"}]


def test_tool_input_that_is_not_json_is_a_problem_with_the_readable_part_kept():
    data = sse(START, block_start(0, {"type": "tool_use", "id": "t", "name": "f", "input": {}}),
               delta(0, type="input_json_delta", partial_json='{"a": 1, "b": [2'), delta(0, type="input_json_delta", partial_json="}}"),
               block_stop(0))  # fmt: skip
    agg = aggregate(blocks_of(data))
    assert len(agg.problems) == 1 and "input of tool_use 'f' is not JSON" in agg.problems[0]
    assert agg.result()["content"][0]["input"] == {"a": 1, "b": [2]}


def test_stream_cut_inside_tool_input_shows_what_the_sdk_shows():
    data = sse(START, block_start(0, {"type": "tool_use", "id": "t", "name": "f", "input": {}}),
               delta(0, type="input_json_delta", partial_json='{"city": "Par'), delta(0, type="input_json_delta", partial_json='is", "days": [1, 2'))  # fmt: skip
    blocks = blocks_of(data)
    agg = aggregate(blocks)
    assert agg.problems == [] and not agg.done
    result = agg.result()
    assert result["content"][0]["input"] == {"city": "Paris", "days": [1, 2]}
    assert same_as_sdk(result, sdk_accumulate(blocks))
    for block in blocks_of(sse(delta(0, type="input_json_delta", partial_json=", 3]}"), block_stop(0))):
        agg.add(block)
    assert agg.problems == []
    assert agg.result()["content"][0]["input"] == {"city": "Paris", "days": [1, 2, 3]}


def test_tool_input_is_parsed_once_not_per_delta(monkeypatch):
    calls = 0
    real = anthropic_messages.from_json

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(anthropic_messages, "from_json", counting)
    fragments = [f'"k{i}": {i}, ' for i in range(500)]
    events = [START, block_start(0, {"type": "tool_use", "id": "t", "name": "f", "input": {}}), delta(0, type="input_json_delta", partial_json="{")]
    events += [delta(0, type="input_json_delta", partial_json=f) for f in fragments]
    events += [delta(0, type="input_json_delta", partial_json='"end": true}'), block_stop(0)]
    agg = aggregate(blocks_of(sse(*events)))
    assert calls == len(events) + 1  # each event once, the input once
    assert len(agg.result()["content"][0]["input"]) == 501


def test_message_delta_overwrite_rules():
    start = message(stop_reason=None, usage={"input_tokens": 7, "cache_read_input_tokens": 100, "output_tokens": 1, "service_tier": "standard"})
    data = sse(
        ("message_start", {"type": "message_start", "message": start}),
        block_start(0, {"type": "text", "text": ""}),
        delta(0, type="citations_delta", citation=CITATION),
        delta(0, type="text_delta", text="green"),
        block_stop(0),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "refusal", "stop_sequence": None, "stop_details": {"type": "refusal", "category": None, "explanation": None},
                                     "container": None},
                           "usage": {"output_tokens": 12, "input_tokens": None, "cache_read_input_tokens": 120, "server_tool_use": {"web_search_requests": 1}}}),
        ("message_stop", {"type": "message_stop"}),
    )  # fmt: skip
    result = aggregate(blocks_of(data)).result()
    assert result["usage"] == {"input_tokens": 7, "cache_read_input_tokens": 120, "output_tokens": 12, "service_tier": "standard",
                               "server_tool_use": {"web_search_requests": 1}}  # fmt: skip
    assert result["stop_reason"] == "refusal" and result["stop_details"]["type"] == "refusal"
    assert "container" not in result
    assert result["content"] == [{"type": "text", "text": "green", "citations": [CITATION]}]
    assert same_as_sdk(result, sdk_accumulate(blocks_of(data)))


def test_results_do_not_alias_each_other():
    data = sse(START, block_start(0, {"type": "text", "text": ""}), delta(0, type="text_delta", text="a"))
    agg = aggregate(blocks_of(data))
    first = agg.result()
    snapshot = copy.deepcopy(first)
    first["content"][0]["text"] = "changed"
    first["usage"]["output_tokens"] = 99
    agg.add(blocks_of(sse(delta(0, type="text_delta", text="b")))[0])
    agg.add(blocks_of(sse(("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}})))[0])
    assert snapshot["content"][0]["text"] == "a" and snapshot["usage"]["output_tokens"] == 5
    assert agg.result()["content"][0]["text"] == "ab" and agg.result()["usage"]["output_tokens"] == 3


# ---------------------------------------------------------- small methods


@pytest.mark.parametrize(
    "method, path, expected",
    [
        ("POST", "/v1/messages", True),
        ("POST", "/v1/messages/", True),
        ("POST", "/messages", True),
        ("POST", "/anthropic/v1/messages", True),
        ("POST", "/apps/anthropic/v1/messages", True),
        ("GET", "/v1/messages", False),
        ("POST", "/v1/messages/count_tokens", False),
        ("POST", "/v1/messages/batches", False),
        ("POST", "/v1/messages/batches/msgbatch_01/cancel", False),
        ("POST", "/v1/threads/thread_abc/messages", False),
        ("POST", "/v1/chat/completions", False),
        ("POST", "/v2/messages", False),
        ("POST", "/x/messages", False),
    ],
)
def test_matches(method, path, expected):
    assert API.matches(method, path) is expected


def test_error_body_and_wants_stream():
    assert API.error_body("slow down", "rate_limit_error") == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    # llm-traj's own codes (replay_miss, model_not_found) ride along for scripts
    assert API.error_body("no", "invalid_request_error", "replay_miss")["error"]["code"] == "replay_miss"
    assert API.name == "anthropic.messages"
    assert API.wants_stream({"stream": True})
    assert not any(API.wants_stream(r) for r in ({"stream": False}, {}, {"stream": "true"}, None, []))


def test_completion_from_text_plain():
    result = API.completion_from_text({"model": "claude-haiku-4-5"}, "Hello!")
    assert result["id"].startswith("msg_") and result["id"] != API.completion_from_text({}, "x")["id"]
    assert result | {"id": "x"} == {
        "id": "x", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }  # fmt: skip
    Message.model_validate(result)
    assert API.completion_from_text("not a dict", None)["content"] == [{"type": "text", "text": ""}]


def test_completion_from_text_tool_calls():
    calls = [
        {"id": "toolu_keep", "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}},
        {"function": {"name": "now", "arguments": ""}},
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
    ]
    result = API.completion_from_text({"model": "m"}, None, tool_calls=calls)
    assert result["stop_reason"] == "tool_use"
    blocks = result["content"]
    assert [b["type"] for b in blocks] == ["tool_use"] * 3  # no empty text block before tool calls
    assert blocks[0] == {"type": "tool_use", "id": "toolu_keep", "name": "get_weather", "input": {"location": "Paris"}}
    assert blocks[1]["id"].startswith("toolu_") and blocks[1]["input"] == {}
    assert blocks[2]["input"] == {"a": 1, "b": 2}
    Message.model_validate(result)
    with_text = API.completion_from_text({}, "Checking.", tool_calls=calls[:1], finish_reason="stop")
    assert [b["type"] for b in with_text["content"]] == ["text", "tool_use"] and with_text["stop_reason"] == "end_turn"


@pytest.mark.parametrize(
    "call, message",
    [
        ({"name": "f"}, r"tool_calls\[0\] needs function.name"),
        ({"function": {"arguments": "{}"}}, r"tool_calls\[0\] needs function.name"),
        ("f", r"tool_calls\[0\] needs function.name"),
        ({"function": {"name": "f", "arguments": "{bad"}}, r"tool_calls\[0\]: function.arguments is not JSON"),
        ({"function": {"name": "f", "arguments": "[1, 2]"}}, r"tool_calls\[0\]: function.arguments must be a JSON object"),
        ({"function": {"name": "f", "arguments": 3}}, r"tool_calls\[0\]: function.arguments must be a JSON object"),
    ],
)
def test_completion_from_text_malformed_tool_call(call, message):
    with pytest.raises(ValueError, match=message):
        API.completion_from_text({}, "x", tool_calls=[call])


@pytest.mark.parametrize(
    "finish_reason, stop_reason",
    [("stop", "end_turn"), ("tool_calls", "tool_use"), ("length", "max_tokens"), ("end_turn", "end_turn"), ("pause_turn", "pause_turn"), ("content_filter", "content_filter")],
)
def test_completion_from_text_finish_reason(finish_reason, stop_reason):
    assert API.completion_from_text({}, "x", finish_reason=finish_reason)["stop_reason"] == stop_reason


@pytest.mark.parametrize(
    "usage, expected",
    [
        (None, {"input_tokens": 0, "output_tokens": 0}),
        ({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}, {"input_tokens": 12, "output_tokens": 5}),
        ({"prompt_tokens": 120, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 100}},
         {"input_tokens": 20, "output_tokens": 5, "cache_read_input_tokens": 100}),
        ({"input_tokens": 3, "output_tokens": 4, "cache_creation_input_tokens": 9}, {"input_tokens": 3, "output_tokens": 4, "cache_creation_input_tokens": 9}),
        ({"output_tokens": 4}, {"input_tokens": 0, "output_tokens": 4}),
    ],
    ids=["none", "chat", "chat-cached", "anthropic", "anthropic-partial"],
)  # fmt: skip
def test_completion_from_text_usage(usage, expected):
    assert API.completion_from_text({}, "x", usage=usage)["usage"] == expected


# ---------------------------------------------------------- stream builder


def events_of(body: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    return [(b.event, json.loads(b.data)) for b in blocks_of(body)]


def test_stream_text_then_tool_calls():
    stream = API.new_stream({"model": "claude-sonnet-4-5", "stream": True})
    parts = [
        stream.delta({"role": "assistant", "content": ""}),
        stream.delta({"content": "Let me "}),
        stream.delta({"content": "check."}),
        stream.delta({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
        stream.delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"location":'}}]}),
        stream.delta({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
        stream.delta({"tool_calls": [{"index": 1, "function": {"name": "now", "arguments": "{}"}}]}),
        stream.finish(usage={"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}),
    ]
    assert [b.event for b in blocks_of(parts[0])] == ["message_start"]
    body = b"".join(parts)
    assert [name for name, _ in events_of(body)] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    completion = stream.completion()
    assert completion["model"] == "claude-sonnet-4-5" and completion["id"].startswith("msg_")
    assert completion["content"] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"location": "Paris"}},
        {"type": "tool_use", "id": completion["content"][2]["id"], "name": "now", "input": {}},
    ]
    assert completion["stop_reason"] == "tool_use" and completion["stop_sequence"] is None
    assert completion["usage"] == {"input_tokens": 30, "output_tokens": 12}
    agg = aggregate(blocks_of(body))
    assert agg.problems == [] and agg.done and agg.result() == completion
    assert same_as_sdk(completion, sdk_accumulate(blocks_of(body)))
    assert same_as_sdk(completion, sdk_over_http(body))
    Message.model_validate(completion)


def test_stream_thinking_text_and_switching_back():
    stream = API.new_stream({"model": "m"})
    body = b"".join([
        stream.delta({"reasoning_content": "Think", "content": None}),
        stream.delta({"thinking": "ing."}),
        stream.delta({"content": "Answer"}),
        stream.delta({"reasoning_content": "More thought."}),
        stream.delta({"content": " done."}, finish_reason="length"),
        stream.finish(usage={"input_tokens": 5, "output_tokens": 9}),
    ])  # fmt: skip
    completion = stream.completion()
    assert completion["content"] == [
        {"type": "thinking", "thinking": "Thinking.", "signature": ""},
        {"type": "text", "text": "Answer"},
        {"type": "thinking", "thinking": "More thought.", "signature": ""},
        {"type": "text", "text": " done."},
    ]
    assert [e["index"] for name, e in events_of(body) if name == "content_block_start"] == [0, 1, 2, 3]
    assert completion["stop_reason"] == "max_tokens"  # the delta's finish_reason, remembered
    assert same_as_sdk(completion, sdk_over_http(body))


def test_stream_finish_alone_and_completion_before_anything():
    stream = API.new_stream({"model": "m"})
    before = stream.completion()
    assert before["content"] == [] and before["stop_reason"] is None and before["model"] == "m"
    body = stream.finish(finish_reason="stop")
    assert [name for name, _ in events_of(body)] == ["message_start", "message_delta", "message_stop"]
    assert stream.completion() == {**before, "stop_reason": "end_turn"}
    assert same_as_sdk(stream.completion(), sdk_over_http(body))


def test_stream_tool_arguments_as_an_object():
    stream = API.new_stream({})
    stream.delta({"tool_calls": [{"index": 0, "function": {"name": "add", "arguments": {"a": 1}}}]})
    stream.finish()
    assert stream.completion()["content"][0]["input"] == {"a": 1}


@pytest.mark.parametrize(
    "deltas, message",
    [
        ([({"content": "x"}, 1)], "delta index must be 0, not 1"),
        ([({"tool_calls": [{"function": {"name": "f"}}]}, 0)], "integer index"),
        ([({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, 0)], "first fragment of tool call 0 needs function.name"),
        ([({"tool_calls": [{"index": 0, "function": {"name": "f"}}]}, 0), ({"content": "x"}, 0),
          ({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, 0)], "tool call 0 continues after another content block"),
        ([({"tool_calls": {"index": 0}}, 0)], "tool_calls must be a list"),
        ([({"content": 3}, 0)], "content must be a string"),
        ([({"thinking": ["x"]}, 0)], "thinking must be a string"),
    ],
    ids=["index-1", "no-index", "no-name", "interleaved", "tool-calls-object", "content-number", "thinking-list"],
)  # fmt: skip
def test_stream_rejects_what_anthropic_cannot_carry(deltas, message):
    stream = API.new_stream({})
    with pytest.raises(ValueError, match=message):
        for d, index in deltas:
            stream.delta(d, index=index)


def test_stream_error_event():
    stream = API.new_stream({})
    stream.delta({"content": "partial"})
    body = API.error_body("upstream died", "api_error")
    data = stream.error(body)
    assert data == b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"upstream died"}}\n\n'
    agg = aggregate(blocks_of(data))
    assert agg.result() == body
