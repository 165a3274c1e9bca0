"""OpenAI legacy text completions shape: stream aggregation (fixtures against
hand-checked expectations: the SDK has no accumulator for these), streams made
from a final completion, and completions and streams made for anti-call drivers."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest
from llmtraj.apis.completions import Completions, TextCompletionAggregator
from llmtraj.core.sse import SSEBlock
from openai.types import Completion

from ..streams import STREAMS as ALL_STREAMS
from ..streams import blocks_of, expected_for, fold, fold_in_pieces, request_for

STREAMS = ALL_STREAMS / "completions"
FIXTURES = sorted(STREAMS.glob("*.sse"))
API = Completions()
HEAD = {"id": "cmpl-test", "object": "text_completion", "created": 1756493721, "model": "gpt-3.5-turbo-instruct"}


def aggregate(blocks: list[SSEBlock]) -> TextCompletionAggregator:
    return fold(TextCompletionAggregator(), blocks)


def sse(*events: Any) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, str) else json.dumps(e, ensure_ascii=False)).encode() + b"\n\n" for e in events
    )


def chunk(*choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {**HEAD, "choices": list(choices), **top}


def chunks_of(data: bytes) -> list[dict[str, Any]]:
    """The chunks of a stream we made, then [DONE]. Checked by hand: the SDK
    reads chunks leniently, and its `Completion` model wants the finish_reason
    that chunks leave null until a choice ends."""
    blocks = blocks_of(data)
    assert blocks[-1].data == "[DONE]"
    chunks = [json.loads(b.data) for b in blocks[:-1]]
    for c in chunks:
        assert c["object"] == "text_completion" and {"id", "created", "model"} <= c.keys()
        assert all(choice.keys() >= {"text", "index", "logprobs", "finish_reason"} for choice in c["choices"])
    return chunks


# ------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_fixture_aggregates_to_expected(fixture):
    agg = aggregate(blocks_of(fixture.read_bytes()))
    assert agg.problems == [] and agg.done
    assert agg.result() == expected_for(fixture)
    Completion.model_validate(agg.result())


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_fixture_request_is_a_streamed_call_for_its_model(fixture):
    request = request_for(fixture)
    assert API.wants_stream(request)
    assert expected_for(fixture)["model"].startswith(request["model"])
    assert len(expected_for(fixture)["choices"]) == request.get("n", 1)


def test_fixtures_cover_the_interesting_shapes():
    text = expected_for(STREAMS / "text.sse")
    assert [c["finish_reason"] for c in text["choices"]] == ["stop", "length"] and text["usage"]["total_tokens"]
    [choice] = expected_for(STREAMS / "logprobs.sse")["choices"]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == len(logprobs["text_offset"]) > 1
    prompt = request_for(STREAMS / "logprobs.sse")["prompt"]
    assert logprobs["text_offset"][0] == len(prompt)
    assert all(b - a == len(tok) for a, b, tok in zip(logprobs["text_offset"], logprobs["text_offset"][1:], logprobs["tokens"]))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_split_anywhere_gives_the_same_aggregate(fixture, seed):
    agg = fold_in_pieces(TextCompletionAggregator(), fixture.read_bytes(), random.Random(seed))
    assert agg.problems == [] and agg.result() == expected_for(fixture)


# ---------------------------------------------------------------- folding


def test_choices_interleave_and_concatenate_by_index():
    data = sse(
        chunk({"text": "A1", "index": 1, "logprobs": None, "finish_reason": None}),
        chunk({"text": "B1", "index": 0, "logprobs": None, "finish_reason": None}),
        chunk({"text": " A2", "index": 1, "logprobs": None, "finish_reason": "stop"}),
        chunk({"text": " B2", "index": 0, "logprobs": None, "finish_reason": None}),
        chunk({"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}),
        "[DONE]",
    )
    result = aggregate(blocks_of(data)).result()
    assert result == {**HEAD, "usage": None, "choices": [
        {"text": "B1 B2", "index": 0, "logprobs": None, "finish_reason": "length"},
        {"text": "A1 A2", "index": 1, "logprobs": None, "finish_reason": "stop"},
    ]}  # fmt: skip


def test_logprobs_extend_after_a_null_first_chunk():
    lp = lambda tok, off: {"tokens": [tok], "token_logprobs": [-0.5], "top_logprobs": [{tok: -0.5}], "text_offset": [off]}  # noqa: E731
    data = sse(
        chunk({"text": "", "index": 0, "logprobs": None, "finish_reason": None}),
        chunk({"text": "a", "index": 0, "logprobs": lp("a", 3), "finish_reason": None}),
        chunk({"text": "b", "index": 0, "logprobs": lp("b", 4), "finish_reason": None}),
        chunk({"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}),
    )
    [choice] = aggregate(blocks_of(data)).result()["choices"]
    assert choice["logprobs"] == {"tokens": ["a", "b"], "token_logprobs": [-0.5, -0.5],
                                  "top_logprobs": [{"a": -0.5}, {"b": -0.5}], "text_offset": [3, 4]}  # fmt: skip
    assert choice["finish_reason"] == "stop" and choice["text"] == "ab"


def test_finish_reason_is_the_last_non_null_and_usage_chunk_is_kept():
    usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    data = sse(
        chunk({"text": "x", "index": 0, "logprobs": None, "finish_reason": "length"}, usage=None),
        chunk({"text": "", "index": 0, "logprobs": None, "finish_reason": None}, usage=None),
        chunk(usage=usage),
        "[DONE]",
    )
    result = aggregate(blocks_of(data)).result()
    assert result["choices"][0]["finish_reason"] == "length" and result["usage"] == usage


def test_vendor_fields_are_kept():
    # vLLM: choice-level stop_reason, token ids lists when asked for
    data = sse(
        chunk({"text": "a", "index": 0, "logprobs": None, "finish_reason": None, "token_ids": [64]}, system_fingerprint="fp_1"),
        chunk({"text": "b", "index": 0, "logprobs": None, "finish_reason": "stop", "stop_reason": "\n", "token_ids": [65]}),
    )
    result = aggregate(blocks_of(data)).result()
    assert result["system_fingerprint"] == "fp_1"
    assert result["choices"][0] == {"text": "ab", "index": 0, "logprobs": None, "finish_reason": "stop",
                                    "token_ids": [64, 65], "stop_reason": "\n"}  # fmt: skip


def test_cut_short_stream_gives_the_text_so_far():
    blocks = blocks_of((STREAMS / "logprobs.sse").read_bytes())
    agg = aggregate(blocks[:3])
    assert not agg.done
    [choice] = agg.result()["choices"]
    assert choice["text"] == " Paris. It" and choice["finish_reason"] is None
    assert choice["logprobs"]["tokens"] == [" Paris", ".", " It"]


def test_malformed_json_event_is_a_problem_and_the_rest_aggregates():
    fixture = STREAMS / "text.sse"
    good = blocks_of(fixture.read_bytes())
    bad = blocks_of(b'data: {"choices": [{"text": "tru\n\n')
    agg = aggregate(good[:4] + bad + good[4:])
    assert len(agg.problems) == 1 and "not JSON" in agg.problems[0]
    assert agg.result() == expected_for(fixture)


def test_error_event_is_a_problem():
    error = {"message": "The server had an error.", "type": "server_error", "param": None, "code": None}
    agg = aggregate(blocks_of(sse(chunk({"text": "Partial", "index": 0, "logprobs": None, "finish_reason": None}), {"error": error})))
    assert len(agg.problems) == 1 and agg.problems[0].startswith("error event:")
    result = agg.result()
    assert result["error"] == error and result["choices"][0]["text"] == "Partial"


def test_nothing_seen_is_none_and_results_do_not_alias():
    assert TextCompletionAggregator().result() is None
    assert aggregate(blocks_of(b": ping\n\ndata: [DONE]\n\n")).result() is None
    agg = aggregate(blocks_of((STREAMS / "logprobs.sse").read_bytes()))
    agg.result()["choices"][0]["logprobs"]["tokens"].clear()
    assert agg.result() == expected_for(STREAMS / "logprobs.sse")


# ------------------------------------------------------- chunks_from_final

ROUND_TRIPS = {f.stem: expected_for(f) for f in FIXTURES}
ROUND_TRIPS["vendor_fields"] = {**HEAD, "usage": None, "choices": [
    {"text": "ok", "index": 0, "logprobs": None, "finish_reason": "stop", "stop_reason": None, "token_ids": [1, 2]}]}  # fmt: skip
ROUND_TRIPS["empty_text"] = {**HEAD, "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1},
                             "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}]}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_chunks_from_final_fold_back_into_it(name):
    final = ROUND_TRIPS[name]
    data = b"".join(API.chunks_from_final(final))
    chunks_of(data)
    agg = aggregate(blocks_of(data))
    assert agg.problems == [] and agg.done
    assert agg.result() == final


def test_chunks_from_final_shape():
    final = expected_for(STREAMS / "text.sse")
    chunks = chunks_of(b"".join(API.chunks_from_final(final)))
    assert [[(c["index"], c["text"], c["finish_reason"]) for c in chunk["choices"]] for chunk in chunks] == [
        [(0, "\n\nThis is a test.", None)], [(0, "", "stop")],
        [(1, "\n\nThis is only a test", None)], [(1, "", "length")],
        [],
    ]  # fmt: skip
    assert all(c["object"] == "text_completion" and c["id"] == final["id"] for c in chunks)
    assert chunks[-1]["usage"] == final["usage"] and all("usage" not in c for c in chunks[:-1])


# --------------------------------------------------------- the API shape


@pytest.mark.parametrize(
    ("method", "path", "matches"),
    [
        ("POST", "/v1/completions", True),
        ("POST", "/completions", True),
        ("POST", "/v1/completions/", True),
        ("POST", "/openai/deployments/x/completions", True),
        ("GET", "/v1/completions", False),
        ("POST", "/v1/chat/completions", False),
        ("POST", "/chat/completions/", False),
        ("POST", "/v1/responses", False),
        ("POST", "/v1/completions/abc", False),
    ],
)
def test_matches(method, path, matches):
    assert API.matches(method, path) is matches


def test_error_body_and_wants_stream():
    assert API.name == "completions"
    assert API.error_body("m", "t") == {"error": {"message": "m", "type": "t", "param": None, "code": None}}
    assert API.wants_stream({"stream": True}) and not API.wants_stream({"stream": False}) and not API.wants_stream([])


def test_completion_from_text():
    completion = API.completion_from_text({"model": "gpt-3.5-turbo-instruct", "prompt": "x"}, "Hi.", finish_reason="length",
                                          usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})  # fmt: skip
    Completion.model_validate(completion)
    assert completion["id"].startswith("cmpl-") and completion["object"] == "text_completion"
    assert completion["model"] == "gpt-3.5-turbo-instruct" and completion["usage"]["total_tokens"] == 3
    assert completion["choices"] == [{"text": "Hi.", "index": 0, "logprobs": None, "finish_reason": "length"}]
    default = API.completion_from_text(None, None)
    assert default["choices"][0]["text"] == "" and default["choices"][0]["finish_reason"] == "stop"
    assert default["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_completion_from_text_refuses_tool_calls():
    with pytest.raises(ValueError, match="legacy completions have no tool calls"):
        API.completion_from_text({"model": "m"}, "x", tool_calls=[{"function": {"name": "f"}}])


# ------------------------------------------------------------ new_stream


def test_stream_of_text_with_usage():
    request = {"model": "gpt-3.5-turbo-instruct", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    stream = API.new_stream(request)
    data = stream.delta({"content": "Hel"}) + stream.delta({"text": "lo"})
    data += stream.finish(usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    chunks = chunks_of(data)
    assert [[(c["index"], c["text"], c["finish_reason"]) for c in chunk["choices"]] for chunk in chunks] == [
        [(0, "Hel", None)], [(0, "lo", None)], [(0, "", "stop")], []]  # fmt: skip
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["total_tokens"] == 3
    completion = stream.completion()
    Completion.model_validate(completion)
    assert completion == aggregate(blocks_of(data)).result()
    assert completion["choices"] == [{"text": "Hello", "index": 0, "logprobs": None, "finish_reason": "stop"}]
    assert completion["model"] == "gpt-3.5-turbo-instruct" and completion["object"] == "text_completion"


def test_stream_of_two_choices_with_logprobs_and_an_early_finish():
    stream = API.new_stream({"model": "m"})
    lp = {"tokens": ["a"], "token_logprobs": [-0.1], "top_logprobs": [{"a": -0.1}], "text_offset": [0]}
    data = stream.delta({"text": "a"}, index=0, logprobs=lp)
    data += stream.delta({"text": "b"}, index=1, finish_reason="length")
    data += stream.finish()
    chunks = chunks_of(data)
    assert "usage" not in chunks[-1]  # not asked for
    completion = stream.completion()
    assert completion["choices"] == [
        {"text": "a", "index": 0, "logprobs": lp, "finish_reason": "stop"},
        {"text": "b", "index": 1, "logprobs": None, "finish_reason": "length"},
    ]
    assert completion["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_stream_finish_without_deltas():
    stream = API.new_stream({"model": "m"})
    chunks = chunks_of(stream.finish(finish_reason="length"))
    assert chunks[0]["choices"] == [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert stream.completion()["choices"][0]["finish_reason"] == "length"


def test_stream_refuses_tool_calls_and_leaves_out_other_chat_fields():
    stream = API.new_stream({"model": "m"})
    with pytest.raises(ValueError, match="legacy completions have no tool calls"):
        stream.delta({"tool_calls": [{"index": 0, "function": {"name": "f"}}]})
    [chunk_] = chunks_of(stream.delta({"role": "assistant", "reasoning_content": "hm", "content": "x"}) + b"data: [DONE]\n\n")
    assert chunk_["choices"] == [{"text": "x", "index": 0, "logprobs": None, "finish_reason": None}]


def test_stream_error_event_is_the_openai_error_body():
    stream = API.new_stream({"model": "m"})
    body = API.error_body("driver failed", "server_error", "driver_error")
    data = stream.delta({"text": "a"}) + stream.error(body)
    assert blocks_of(data)[-1].data == json.dumps(body, separators=(",", ":"))
    assert copy.deepcopy(stream.completion())["choices"][0]["text"] == "a"
