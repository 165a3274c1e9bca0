"""OpenAI Responses API shape: stream aggregation (fixtures, against the openai
SDK's own stream state), streams made from a final response, responses and
streams made for anti-call drivers."""

from __future__ import annotations

import copy
import json
import random
from typing import Any, get_args

import httpx
import openai
import pytest
from llmtraj.apis.responses import Responses, ResponsesAggregator
from llmtraj.core.sse import SSEBlock
from openai.types.responses import Response, ResponseStreamEvent

from ..streams import STREAMS as ALL_STREAMS
from ..streams import blocks_of, expected_for, fold, fold_in_pieces, request_for

STREAMS = ALL_STREAMS / "responses"
FIXTURES = sorted(STREAMS.glob("*.sse"))
API = Responses()
# event type -> the SDK's model of that event
EVENT_MODELS = {get_args(m.model_fields["type"].annotation)[0]: m for m in get_args(get_args(ResponseStreamEvent)[0])}


def aggregate(blocks: list[SSEBlock]) -> ResponsesAggregator:
    return fold(ResponsesAggregator(), blocks)


def sse(*events: Any) -> bytes:
    """Events as the API writes them (`event:` line from the `type`); strings are sent as data as is."""
    out = []
    for event in events:
        if isinstance(event, str):
            out.append(f"data: {event}\n\n")
        else:
            out.append(f"event: {event.get('type')}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n")
    return "".join(out).encode()


def sdk_stream(data: bytes) -> tuple[list[Any], dict[str, Any] | None]:
    """What `client.responses.stream(...)` makes of a response body: the events
    it yields and its final response (None without response.completed)."""
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=data, headers={"content-type": "text/event-stream"}))
    client = openai.OpenAI(api_key="test", base_url="http://llm.test/v1", http_client=httpx.Client(transport=transport))
    with client.responses.stream(model="m", input="x") as stream:
        events = list(stream)
        try:
            final = stream.get_final_response()
        except RuntimeError:
            return events, None
    return events, without_parsed(final.to_dict())


def without_parsed(response: dict[str, Any]) -> dict[str, Any]:
    """A response without the SDK's own additions (parsed text and arguments)."""
    response = copy.deepcopy(response)
    for item in response.get("output") or []:
        item.pop("parsed_arguments", None)
        for part in item.get("content") or []:
            if isinstance(part, dict):
                part.pop("parsed", None)
    return response


def events_of(data: bytes) -> list[dict[str, Any]]:
    """The events of a stream we made, each checked against the SDK's event
    types (strictly: every required field, right types) and its `event:` line."""
    events = []
    for block in blocks_of(data):
        event = json.loads(block.data)
        assert block.event == event["type"]
        EVENT_MODELS[event["type"]].model_validate(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def output_text(response: dict[str, Any]) -> str:
    return "".join(
        part.get("text", "") for item in response["output"] if item["type"] == "message" for part in item["content"]
    )


# ------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_fixture_aggregates_to_expected(fixture):
    agg = aggregate(blocks_of(fixture.read_bytes()))
    assert agg.problems == []
    assert agg.result() == expected_for(fixture)


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_fixture_matches_openai_sdk_final_response(fixture):
    data = fixture.read_bytes()
    events, final = sdk_stream(data)
    assert final == aggregate(blocks_of(data)).result()
    assert events[-1].type == "response.completed"


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_fixture_request_is_a_streamed_call_for_its_model(fixture):
    request = request_for(fixture)
    assert API.wants_stream(request)
    assert expected_for(fixture)["model"].startswith(request["model"])
    for tool in request.get("tools") or []:
        assert tool in expected_for(fixture)["tools"]


def test_fixtures_cover_the_interesting_shapes():
    streams = {f.stem: f.read_text(encoding="utf-8") for f in FIXTURES}
    assert set(streams) == {"text", "function_call", "reasoning_function_call"}
    assert streams["function_call"].count("event: response.function_call_arguments.delta") >= 3
    types = [item["type"] for item in expected_for(STREAMS / "reasoning_function_call.sse")["output"]]
    assert types == ["reasoning", "message", "function_call"]
    reasoning = expected_for(STREAMS / "reasoning_function_call.sse")["output"][0]
    assert reasoning["encrypted_content"] and reasoning["summary"][0]["text"]
    for fixture in FIXTURES:
        for item in expected_for(fixture)["output"]:
            if item["type"] == "function_call":
                json.loads(item["arguments"])


# ---------------------------------------------------------- split and cut


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_split_anywhere_gives_the_same_aggregate(fixture, seed):
    agg = fold_in_pieces(ResponsesAggregator(), fixture.read_bytes(), random.Random(seed))
    assert agg.problems == []
    assert agg.result() == expected_for(fixture)


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_every_cut_short_stream_gives_what_it_carried(fixture):
    """Cut after any event, the aggregate is the last announced response with
    every item seen so far, each text a prefix of its final text."""
    blocks = blocks_of(fixture.read_bytes())
    expected = expected_for(fixture)
    for cut in range(2, len(blocks)):
        result = aggregate(blocks[:cut]).result()
        assert result["status"] == "in_progress" and result["id"] == expected["id"]
        assert len(result["output"]) <= len(expected["output"])
        for got, final in zip(result["output"], expected["output"]):
            assert got["id"] == final["id"] and got["type"] == final["type"]
            if final["type"] == "function_call":
                assert final["arguments"].startswith(got["arguments"])
            for parts in ("content", "summary"):
                for got_part, final_part in zip(got.get(parts) or [], final.get(parts) or []):
                    assert final_part["text"].startswith(got_part["text"])


def test_cut_short_stream_gives_the_partial_text_and_call():
    blocks = blocks_of((STREAMS / "reasoning_function_call.sse").read_bytes())
    expected = expected_for(STREAMS / "reasoning_function_call.sse")
    kinds = [json.loads(b.data)["type"] for b in blocks]
    # in the middle of the function call's arguments
    cut = kinds.index("response.function_call_arguments.delta") + 3
    result = aggregate(blocks[:cut]).result()
    reasoning, message, call = result["output"]
    assert reasoning == expected["output"][0] and message == expected["output"][1]
    assert call["status"] == "in_progress" and call["name"] == "shell"
    assert call["arguments"] == '{"command":["'
    # everything but response.completed: all items done
    result = aggregate(blocks[:-1]).result()
    assert result["output"] == expected["output"]
    assert result["usage"] is None and result["status"] == "in_progress"


def test_unterminated_last_block_is_not_aggregated():
    data = (STREAMS / "text.sse").read_bytes()
    cut = data.rindex(b"event: response.completed")
    blocks = blocks_of(data[: len(data) - 10])
    assert blocks[-1].terminated is False
    assert aggregate(blocks).result() == aggregate(blocks_of(data[:cut])).result()


def test_nothing_seen_is_none():
    assert ResponsesAggregator().result() is None
    agg = aggregate(blocks_of(b": keep-alive\n\n"))
    assert agg.result() is None and agg.problems == []


def test_done_marker_of_compatible_servers_is_ignored():
    data = (STREAMS / "text.sse").read_bytes() + b"data: [DONE]\n\n"
    agg = aggregate(blocks_of(data))
    assert agg.problems == [] and agg.result() == expected_for(STREAMS / "text.sse")


# ------------------------------------------------------------------ problems


def test_malformed_json_event_is_a_problem_and_the_rest_aggregates():
    fixture = STREAMS / "function_call.sse"
    good = blocks_of(fixture.read_bytes())
    bad = blocks_of(b'event: response.function_call_arguments.delta\ndata: {"type": "response.function_\n\n')
    agg = aggregate(good[:5] + bad + good[5:])
    assert len(agg.problems) == 1 and "not JSON" in agg.problems[0]
    assert agg.result() == expected_for(fixture)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ("42", "not a JSON object"),
        ("[1]", "not a JSON object"),
        ('{"sequence_number": 9}', "without a type"),
        ('{"type": "response.created", "response": []}', "response is not a dict"),
        ('{"type": "response.output_item.added", "output_index": "0", "item": {}}', "output_index is not an int"),
        ('{"type": "response.output_item.added", "output_index": -1, "item": {}}', "output_index is negative"),
        ('{"type": "response.output_text.delta", "output_index": 7, "content_index": 0, "delta": "x"}', "output item 7 was not announced"),
        ('{"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": 5}', "delta is not a str"),
        ('{"type": "response.output_text.delta", "output_index": 0, "content_index": 4, "delta": "x"}', "content part 4 comes before part 1"),
        ('{"type": "response.content_part.added", "output_index": 0, "content_index": 0, "part": "x"}', "part is not a dict"),
        ('{"type": "response.output_text.done", "output_index": 0, "content_index": 0}', "text is not a str"),
    ],
)
def test_odd_events_are_problems_not_exceptions(data, problem):
    head = sse(
        {"type": "response.created", "sequence_number": 0, "response": {"id": "r", "object": "response", "status": "in_progress", "output": []}},
        {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": {"id": "m", "type": "message", "role": "assistant", "content": []}},
        {"type": "response.output_text.delta", "sequence_number": 2, "item_id": "m", "output_index": 0, "content_index": 0, "delta": "ok"},
    )
    agg = aggregate(blocks_of(head + f"data: {data}\n\n".encode()))
    assert len(agg.problems) == 1 and problem in agg.problems[0]
    assert output_text(agg.result()) == "ok"


def test_text_before_its_part_is_announced_makes_the_part():
    data = sse(
        {"type": "response.output_item.added", "sequence_number": 0, "output_index": 0, "item": {"id": "m", "type": "message", "content": []}},
        {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "m", "output_index": 0, "content_index": 0, "delta": "a"},
        {"type": "response.output_text.delta", "sequence_number": 2, "item_id": "m", "output_index": 0, "content_index": 0, "delta": "b"},
    )
    agg = aggregate(blocks_of(data))
    assert agg.problems == []
    assert agg.result() == {"object": "response", "output": [
        {"id": "m", "type": "message", "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": "ab"}]}]}


@pytest.mark.parametrize(
    "error_event",
    [
        {"type": "error", "sequence_number": 3, "code": "server_error", "message": "The server had an error.", "param": None},
        {"type": "error", "sequence_number": 3, "error": {"type": "server_error", "code": "server_error", "message": "The server had an error.", "param": None}},
    ],
    ids=["documented-flat", "nested-as-sent"],
)
def test_error_event_mid_stream(error_event):
    blocks = blocks_of((STREAMS / "text.sse").read_bytes())
    agg = aggregate(blocks[:8] + blocks_of(sse(error_event)))
    assert len(agg.problems) == 1 and agg.problems[0].startswith("error event:")
    assert "The server had an error." in agg.problems[0]
    result = agg.result()
    assert result["error"] == {"code": "server_error", "message": "The server had an error."}
    assert output_text(result) == "Under a silver moon"


def test_error_event_alone():
    agg = aggregate(blocks_of(sse({"type": "error", "sequence_number": 0, "code": "rate_limit_exceeded", "message": "slow down", "param": None})))
    assert agg.result() == {"object": "response", "output": [], "error": {"code": "rate_limit_exceeded", "message": "slow down"}}
    assert len(agg.problems) == 1


def test_unknown_events_are_ignored():
    fixture = STREAMS / "text.sse"
    blocks = blocks_of(fixture.read_bytes())
    extra = blocks_of(sse({"type": "response.web_search_call.searching", "sequence_number": 99, "output_index": 0, "item_id": "ws"}))
    agg = aggregate(blocks[:5] + extra + blocks[5:])
    assert agg.problems == [] and agg.result() == expected_for(fixture)


def test_result_does_not_alias_the_aggregator_state():
    blocks = blocks_of((STREAMS / "text.sse").read_bytes())
    agg = aggregate(blocks[:6])
    first = agg.result()
    first["output"][0]["content"][0]["text"] = "changed"
    assert output_text(agg.result()) != "changed"
    agg = aggregate(blocks)
    agg.result()["output"].clear()
    assert agg.result()["output"]


@pytest.mark.parametrize(("status", "end_event"), [("incomplete", "response.incomplete"), ("failed", "response.failed")])
def test_incomplete_and_failed_ends_are_the_result(status, end_event):
    final = copy.deepcopy(expected_for(STREAMS / "text.sse"))
    final["status"] = status
    if status == "incomplete":
        final["incomplete_details"] = {"reason": "max_output_tokens"}
    else:
        final["error"] = {"code": "server_error", "message": "The model failed to generate a response."}
    chunks = API.chunks_from_final(final)
    assert chunks[-1].startswith(f"event: {end_event}\n".encode())
    assert aggregate(blocks_of(b"".join(chunks))).result() == final
    events, sdk_final = sdk_stream(b"".join(chunks))
    assert sdk_final is None  # the SDK's get_final_response wants response.completed
    assert events[-1].type == end_event and without_parsed(events[-1].response.to_dict()) == final


# ------------------------------------------------------- chunks_from_final

ITEMS = {
    "refusal": {"id": "msg_r", "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "refusal", "refusal": "I can't help with that."}]},
    "two_parts": {"id": "msg_2", "type": "message", "status": "completed", "role": "assistant", "content": [
        {"type": "output_text", "annotations": [{"type": "url_citation", "start_index": 0, "end_index": 3, "url": "https://example.com", "title": "Ex"}], "logprobs": [], "text": "One"},
        {"type": "output_text", "annotations": [], "text": " two"}]},
    "reasoning_text": {"id": "rs_t", "type": "reasoning", "summary": [{"type": "summary_text", "text": "Plan."}, {"type": "summary_text", "text": "Check."}],
                       "content": [{"type": "reasoning_text", "text": "Let me think step by step."}]},
    "empty_reasoning": {"id": "rs_e", "type": "reasoning", "summary": []},
    "custom_tool": {"id": "ctc_1", "type": "custom_tool_call", "status": "completed", "call_id": "call_c", "name": "apply_patch",
                    "input": "*** Begin Patch\n*** End Patch\n"},
    "web_search": {"id": "ws_1", "type": "web_search_call", "status": "completed", "action": {"type": "search", "query": "weather"}},
    "empty_arguments": {"id": "fc_0", "type": "function_call", "status": "completed", "arguments": "", "call_id": "call_0", "name": "now"},
}


def with_output(*items: dict[str, Any]) -> dict[str, Any]:
    final = copy.deepcopy(expected_for(STREAMS / "function_call.sse"))
    final["output"] = [copy.deepcopy(item) for item in items]
    return final


ROUND_TRIPS = {f.stem: expected_for(f) for f in FIXTURES} | {name: with_output(item) for name, item in ITEMS.items()}
ROUND_TRIPS["everything"] = with_output(*ITEMS.values())
ROUND_TRIPS["no_output"] = with_output()


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_chunks_from_final_fold_back_into_it(name):
    final = ROUND_TRIPS[name]
    data = b"".join(API.chunks_from_final(final))
    events = events_of(data)
    agg = aggregate(blocks_of(data))
    assert agg.problems == [] and agg.result() == final
    # everything but the last event: rebuilt from the items
    partial = aggregate(blocks_of(data)[:-1]).result()
    assert partial["output"] == final["output"] and partial["status"] == "in_progress"
    sdk_events, sdk_final = sdk_stream(data)
    assert sdk_final == final
    assert len(sdk_events) == len(events)


def test_chunks_from_final_follow_the_documented_sequence():
    final = expected_for(STREAMS / "reasoning_function_call.sse")
    events = events_of(b"".join(API.chunks_from_final(final)))
    reasoning, message, call = final["output"]
    assert [(e["type"], e.get("output_index")) for e in events] == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", 0),
        ("response.reasoning_summary_part.added", 0),
        ("response.reasoning_summary_text.delta", 0),
        ("response.reasoning_summary_text.done", 0),
        ("response.reasoning_summary_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.content_part.added", 1),
        ("response.output_text.delta", 1),
        ("response.output_text.done", 1),
        ("response.content_part.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2),
        ("response.output_item.done", 2),
        ("response.completed", None),
    ]
    created = events[0]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    assert created["id"] == final["id"] and created["tools"] == final["tools"]
    assert events[2]["item"] == {**reasoning, "summary": []}
    assert events[8]["item"] == {**message, "status": "in_progress", "content": []}
    assert events[9]["part"] == {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    assert events[10]["delta"] == message["content"][0]["text"] and events[10]["item_id"] == message["id"]
    assert events[14]["item"] == {**call, "status": "in_progress", "arguments": ""}
    assert events[15]["delta"] == events[16]["arguments"] == call["arguments"] and events[16]["name"] == "shell"
    assert [events[i]["item"] for i in (7, 13, 17)] == final["output"]
    assert events[-1]["response"] == final


@pytest.mark.parametrize("final", [{"id": "r"}, {"output": "x"}, {"output": [None]}], ids=["no-output", "output-string", "null-item"])
def test_chunks_from_final_of_something_else_raise_what_respond_catches(final):
    with pytest.raises((AttributeError, TypeError, ValueError)):
        API.chunks_from_final(final)


# --------------------------------------------------------- the API shape


@pytest.mark.parametrize(
    ("method", "path", "matches"),
    [
        ("POST", "/v1/responses", True),
        ("POST", "/responses", True),
        ("POST", "/v1/responses/", True),
        ("POST", "/openai/v1/responses", True),
        ("GET", "/v1/responses", False),
        ("POST", "/v1/responses/resp_123/cancel", False),
        ("POST", "/v1/responses/input_tokens", False),
        ("GET", "/v1/responses/resp_123", False),
        ("POST", "/v1/responses/compact", False),
        ("POST", "/v1/chat/completions", False),
        ("POST", "/v1/completions", False),
        ("POST", "/v1/myresponses", False),
    ],
)
def test_matches(method, path, matches):
    assert API.matches(method, path) is matches


def test_error_body_and_wants_stream():
    assert API.name == "responses"
    assert API.error_body("m", "t", "c") == {"error": {"message": "m", "type": "t", "param": None, "code": "c"}}
    assert API.wants_stream({"stream": True}) is True
    assert not API.wants_stream({"stream": "true"}) and not API.wants_stream({}) and not API.wants_stream(None)


# ------------------------------------------------------ completion_from_text

REQUEST = request_for(STREAMS / "reasoning_function_call.sse")


def test_completion_from_text_is_a_response_the_sdk_parses():
    response = API.completion_from_text(REQUEST, "Hello!")
    Response.model_validate(response)
    assert response["id"].startswith("resp_") and response["object"] == "response"
    assert response["status"] == "completed" and response["incomplete_details"] is None
    assert response["model"] == "gpt-5"
    [message] = response["output"]
    assert message["id"].startswith("msg_")
    assert {k: v for k, v in message.items() if k != "id"} == {
        "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": "Hello!"}],
    }  # fmt: skip
    # what the request set is echoed, the rest as the API defaults it
    assert response["tools"] == REQUEST["tools"] and response["instructions"] == REQUEST["instructions"]
    assert response["parallel_tool_calls"] is False and response["store"] is False
    assert response["reasoning"] == {"effort": "medium", "summary": "auto"}
    assert response["tool_choice"] == "auto" and response["temperature"] == 1.0
    assert response["usage"] == {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}, "output_tokens": 0,
                                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}  # fmt: skip
    assert output_text(response) == Response.model_validate(response).output_text


def test_completion_from_text_with_tool_calls():
    response = API.completion_from_text(
        REQUEST, None,
        tool_calls=[{"id": "call_1", "function": {"name": "shell", "arguments": '{"command":["ls"]}'}},
                    {"function": {"name": "shell", "arguments": {"command": ["pwd"]}}}],
    )  # fmt: skip
    parsed = Response.model_validate(response)
    first, second = response["output"]
    assert [item["type"] for item in response["output"]] == ["function_call", "function_call"]
    assert first["call_id"] == "call_1" and first["name"] == "shell" and first["arguments"] == '{"command":["ls"]}'
    assert second["call_id"].startswith("call_") and json.loads(second["arguments"]) == {"command": ["pwd"]}
    assert first["id"].startswith("fc_") and first["status"] == "completed"
    assert parsed.output_text == ""


def test_completion_from_text_with_text_and_a_call_puts_the_message_first():
    response = API.completion_from_text({"model": "m"}, "Let me check.", tool_calls=[{"function": {"name": "f"}}])
    assert [item["type"] for item in response["output"]] == ["message", "function_call"]
    assert response["output"][1]["arguments"] == ""
    Response.model_validate(response)


@pytest.mark.parametrize(
    ("finish_reason", "status", "details"),
    [(None, "completed", None), ("stop", "completed", None), ("tool_calls", "completed", None),
     ("length", "incomplete", {"reason": "max_output_tokens"}), ("content_filter", "incomplete", {"reason": "content_filter"})],
)  # fmt: skip
def test_completion_from_text_finish_reason(finish_reason, status, details):
    response = API.completion_from_text({"model": "m"}, "x", finish_reason=finish_reason)
    assert response["status"] == status and response["incomplete_details"] == details
    Response.model_validate(response)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14, "prompt_tokens_details": {"cached_tokens": 8},
          "completion_tokens_details": {"reasoning_tokens": 2}}, (10, 8, 0, 4, 2, 14)),
        ({"prompt_tokens": 3, "completion_tokens": 2}, (3, 0, 0, 2, 0, 5)),
        ({"input_tokens": 7, "output_tokens": 1, "output_tokens_details": {"reasoning_tokens": 1}}, (7, 0, 0, 1, 1, 8)),
        ({"input_tokens": 7, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 2}, "output_tokens": 3, "total_tokens": 10},
         (7, 4, 2, 3, 0, 10)),
    ],
    ids=["chat-shape", "chat-shape-bare", "responses-shape", "responses-shape-total"],
)  # fmt: skip
def test_completion_from_text_usage_in_responses_shape(usage, expected):
    input_tokens, cached, cache_written, output_tokens, reasoning, total = expected
    response = API.completion_from_text({"model": "m"}, "x", usage=usage)
    assert response["usage"] == {
        "input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": cache_written},
        "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning}, "total_tokens": total,
    }  # fmt: skip
    Response.model_validate(response)


@pytest.mark.parametrize(
    "tool_calls",
    [[{"function": {"arguments": "{}"}}], [{"name": "f"}], ["f"], [{"function": {"name": 3}}]],
    ids=["no-name", "no-function", "string", "name-not-string"],
)
def test_completion_from_text_malformed_tool_call(tool_calls):
    with pytest.raises(ValueError, match=r"tool_calls\[0\] needs function.name"):
        API.completion_from_text({"model": "m"}, None, tool_calls=tool_calls)


def test_completion_from_text_without_a_request_body():
    response = API.completion_from_text(None, "x")
    assert response["model"] == "" and response["tools"] == [] and response["parallel_tool_calls"] is True
    Response.model_validate(response)


# ------------------------------------------------------------ new_stream


def build(request: Any, *steps: tuple[str, Any]) -> tuple[bytes, Any]:
    stream = API.new_stream(request)
    data = b""
    for method, argument in steps:
        data += stream.delta(argument) if method == "delta" else getattr(stream, method)(**argument)
    return data, stream


def test_stream_of_text():
    data, stream = build(REQUEST, ("delta", {"role": "assistant", "content": ""}), ("delta", {"content": "Hel"}),
                         ("delta", {"content": "lo!"}), ("finish", {"usage": {"prompt_tokens": 5, "completion_tokens": 2}}))  # fmt: skip
    events = events_of(data)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hel", "lo!"]
    final = stream.completion()
    Response.model_validate(final)
    assert final == events[-1]["response"] and output_text(final) == "Hello!"
    assert final["status"] == "completed" and final["model"] == "gpt-5" and final["usage"]["total_tokens"] == 7
    assert final["id"] == events[0]["response"]["id"] and events[0]["response"]["output"] == []
    assert sdk_stream(data)[1] == final
    assert aggregate(blocks_of(data)).result() == final


def test_stream_of_reasoning_text_and_calls():
    data, stream = build(
        REQUEST,
        ("delta", {"reasoning_content": "I should "}),
        ("delta", {"reasoning_content": "list files."}),
        ("delta", {"content": "Listing."}),
        ("delta", {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "shell", "arguments": '{"command":'}}]}),
        ("delta", {"tool_calls": [{"index": 0, "function": {"arguments": '["ls"]}'}}]}),
        ("delta", {"tool_calls": [{"index": 1, "function": {"name": "shell", "arguments": {"command": ["pwd"]}}}]}),
        ("finish", {"finish_reason": "tool_calls"}),
    )
    events = events_of(data)
    assert [(e["type"], e.get("output_index")) for e in events] == [
        ("response.created", None), ("response.in_progress", None),
        ("response.output_item.added", 0), ("response.reasoning_summary_part.added", 0),
        ("response.reasoning_summary_text.delta", 0), ("response.reasoning_summary_text.delta", 0),
        ("response.reasoning_summary_text.done", 0), ("response.reasoning_summary_part.done", 0), ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.content_part.added", 1), ("response.output_text.delta", 1),
        ("response.output_text.done", 1), ("response.content_part.done", 1), ("response.output_item.done", 1),
        ("response.output_item.added", 2), ("response.function_call_arguments.delta", 2), ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2), ("response.output_item.done", 2),
        ("response.output_item.added", 3), ("response.function_call_arguments.delta", 3),
        ("response.function_call_arguments.done", 3), ("response.output_item.done", 3),
        ("response.completed", None),
    ]  # fmt: skip
    final = stream.completion()
    Response.model_validate(final)
    reasoning, message, first, second = final["output"]
    assert reasoning["type"] == "reasoning" and reasoning["summary"] == [{"type": "summary_text", "text": "I should list files."}]
    assert reasoning["id"].startswith("rs_")
    assert message["content"][0]["text"] == "Listing."
    assert (first["call_id"], first["name"], first["arguments"]) == ("call_a", "shell", '{"command":["ls"]}')
    assert second["call_id"].startswith("call_") and json.loads(second["arguments"]) == {"command": ["pwd"]}
    assert all(item["status"] == "completed" for item in (message, first, second))
    assert [e["item"] for e in events if e["type"] == "response.output_item.done"] == final["output"]
    assert sdk_stream(data)[1] == final
    assert aggregate(blocks_of(data)).result() == final


def test_stream_text_in_the_same_delta_as_a_call_comes_first():
    data, stream = build({"model": "m"}, ("delta", {"content": "Checking.", "tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]}),
                         ("finish", {}))  # fmt: skip
    assert [item["type"] for item in stream.completion()["output"]] == ["message", "function_call"]
    events_of(data)


def test_stream_length_finish_is_incomplete():
    data, stream = build({"model": "m", "max_output_tokens": 2}, ("delta", {"content": "cut"}), ("finish", {"finish_reason": "length"}))
    events = events_of(data)
    assert events[-1]["type"] == "response.incomplete"
    final = stream.completion()
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["max_output_tokens"] == 2 and output_text(final) == "cut"
    Response.model_validate(final)


def test_stream_finish_reason_given_with_a_delta():
    _, stream = build({"model": "m"}, ("delta", {"content": "cut"}), ("finish", {}))
    assert stream.completion()["status"] == "completed"
    stream = API.new_stream({"model": "m"})
    stream.delta({"content": "cut"}, finish_reason="length")
    stream.finish()
    assert stream.completion()["status"] == "incomplete"


def test_stream_finish_without_deltas_is_an_empty_response():
    data, stream = build({"model": "m"}, ("finish", {}))
    assert [e["type"] for e in events_of(data)] == ["response.created", "response.in_progress", "response.completed"]
    assert stream.completion()["output"] == [] and stream.completion()["status"] == "completed"
    assert sdk_stream(data)[1] == stream.completion()


def test_stream_completion_before_finish_is_what_was_built():
    stream = API.new_stream({"model": "m"})
    assert stream.completion()["output"] == [] and stream.completion()["status"] == "in_progress"
    stream.delta({"content": "part"})
    assert output_text(stream.completion()) == "part" and stream.completion()["status"] == "in_progress"


def test_stream_choice_index_other_than_zero_is_refused():
    stream = API.new_stream({"model": "m"})
    with pytest.raises(ValueError, match="index 1"):
        stream.delta({"content": "x"}, index=1)
    assert [e["type"] for e in events_of(stream.delta({"content": "x"}))][:2] == ["response.created", "response.in_progress"]


@pytest.mark.parametrize(
    ("fragments", "message"),
    [
        ([{"index": 2, "function": {"arguments": "{}"}}], r"tool_calls\[0\] needs function.name"),
        ([{"function": {"name": "f"}}], r"tool_calls\[0\] needs an integer index"),
        ("f", "tool_calls must be a list"),
        ([{"index": 2, "function": {"name": "f"}}, {"index": 0, "function": {"arguments": "x"}}], "tool call 0 continues after"),
        ([{"index": 1, "function": {"arguments": {"a": 1}}}], "must be a string fragment"),
    ],
    ids=["new-call-without-name", "no-index", "not-a-list", "closed-call-continues", "object-fragment"],
)
def test_stream_malformed_tool_call_fragments_send_nothing(fragments, message):
    stream = API.new_stream({"model": "m"})
    before = stream.delta({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{"}}]})
    before += stream.delta({"tool_calls": [{"index": 1, "function": {"name": "g", "arguments": ""}}]})
    with pytest.raises(ValueError, match=message):
        stream.delta({"tool_calls": fragments})
    after = stream.delta({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}) + stream.finish()
    events_of(before + after)  # numbering continues without a gap
    assert [item["arguments"] for item in stream.completion()["output"]] == ["{", "{}"]


def test_stream_content_must_be_text():
    with pytest.raises(ValueError, match="content must be a string"):
        API.new_stream({"model": "m"}).delta({"content": [{"type": "text", "text": "x"}]})


def test_stream_error_event_is_documented_and_raised_by_the_sdk():
    stream = API.new_stream({"model": "m"})
    data = stream.delta({"content": "Part"})
    data += stream.error(API.error_body("upstream broke", "server_error", "driver_error"))
    [error] = [e for e in events_of(data) if e["type"] == "error"]
    assert {k: error[k] for k in ("code", "message", "param")} == {"code": "driver_error", "message": "upstream broke", "param": None}
    assert error["error"] == {"message": "upstream broke", "type": "server_error", "param": None, "code": "driver_error"}
    with pytest.raises(openai.APIError, match="upstream broke"):
        sdk_stream(data)
    assert stream.completion()["error"] == {"code": "driver_error", "message": "upstream broke"}
    assert output_text(stream.completion()) == "Part"


def test_stream_of_a_request_that_is_not_an_object():
    data, stream = build(["x"], ("delta", {"content": "a"}), ("finish", {}))
    events_of(data)
    Response.model_validate(stream.completion())
