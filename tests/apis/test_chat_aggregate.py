"""Chat-completion stream aggregation: fixtures against their expected objects,
and fixtures plus generated streams against the openai SDK's own accumulator."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest
from llmtraj.apis import api_for
from llmtraj.apis.chat_completions import (
    ChatCompletionAggregator,
    ChatCompletions,
    DeltaMerger,
)
from llmtraj.core.sse import SSEBlock
from openai._models import construct_type
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from ..streams import STREAMS, blocks_of, expected_for, fold

FIXTURES = sorted(STREAMS.glob("*.sse"))


def aggregate(blocks: list[SSEBlock]) -> ChatCompletionAggregator:
    return fold(ChatCompletionAggregator(), blocks)


def sse(*events: Any) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, str) else json.dumps(e, ensure_ascii=False)).encode() + b"\n\n" for e in events
    )


def sdk_accumulate(blocks: list[SSEBlock]) -> dict[str, Any]:
    """What `client.chat.completions.stream(...)` would end with: chunks built
    the way the SDK builds them (lenient `construct_type`) and folded by its
    `ChatCompletionStreamState`."""
    state = ChatCompletionStreamState()
    for block in blocks:
        if block.data is None or block.data.startswith("[DONE]"):
            continue
        chunk = construct_type(type_=ChatCompletionChunk, value=json.loads(block.data))
        list(state.handle_chunk(chunk))
    return state.current_completion_snapshot.to_dict()


def canon(completion: dict[str, Any]) -> dict[str, Any]:
    """The parts both accumulators must agree on."""
    choices = []
    for choice in sorted(completion["choices"], key=lambda c: c["index"]):
        message = choice["message"]
        logprobs = choice.get("logprobs") or {}
        choices.append(
            {
                "index": choice["index"],
                "role": message.get("role"),
                "content": message.get("content"),
                "reasoning_content": message.get("reasoning_content"),
                "refusal": message.get("refusal"),
                "tool_calls": [
                    {
                        "id": call.get("id"),
                        "type": call.get("type"),
                        "name": (call.get("function") or {}).get("name"),
                        "arguments": (call.get("function") or {}).get("arguments"),
                    }
                    for call in message.get("tool_calls") or []
                ],
                "finish_reason": choice.get("finish_reason"),
                "logprobs": logprobs.get("content"),
            }
        )
    return {"id": completion.get("id"), "model": completion.get("model"), "choices": choices, "usage": completion.get("usage")}


# ------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_fixture_aggregates_to_expected(fixture):
    agg = aggregate(blocks_of(fixture.read_bytes()))
    assert agg.problems == []
    assert agg.done
    assert agg.result() == expected_for(fixture)


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_fixture_matches_openai_sdk_accumulator(fixture):
    blocks = blocks_of(fixture.read_bytes())
    ours = aggregate(blocks).result()
    assert canon(ours) == canon(sdk_accumulate(blocks))


def test_fixtures_cover_the_interesting_shapes():
    expected = {f.stem: expected_for(f) for f in FIXTURES}
    messages = [c["message"] for e in expected.values() for c in e["choices"]]
    assert sum(len(m.get("tool_calls") or []) for m in messages) >= 4
    assert sum(bool(m.get("reasoning_content")) for m in messages) >= 2
    assert any(c.get("logprobs") for e in expected.values() for c in e["choices"])
    assert all(e["usage"] for e in expected.values())


def test_expected_tool_arguments_are_json():
    for fixture in FIXTURES:
        for choice in expected_for(fixture)["choices"]:
            for call in choice["message"].get("tool_calls") or []:
                json.loads(call["function"]["arguments"])
                assert call["type"] == "function" and call["id"] and "index" not in call


# ---------------------------------------------------------- generated streams

WORDS = "the quick brown fox jumps over a lazy dog 杭州 café 🙂 , . ! \n".split(" ")


def _split(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) + " " for _ in range(n)).strip() or "x"


def _logprob(token: str, rng: random.Random) -> dict[str, Any]:
    lp = -round(rng.random() * 5, 4)
    return {
        "token": token,
        "logprob": lp,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": token, "logprob": lp, "bytes": list(token.encode())}],
    }


def generate(seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A stream of chunks with 1-3 interleaved choices, and its known aggregate (`canon` form)."""
    rng = random.Random(seed)
    n = rng.randint(1, 3)
    head = {"id": f"chatcmpl-gen{seed}", "object": "chat.completion.chunk", "created": 1700000000 + seed, "model": "gen-1"}
    steps: list[list[dict[str, Any]]] = []  # per choice: choice objects (without index) in order
    truth = []
    for i in range(n):
        want_reasoning, want_text, want_tools = rng.random() < 0.4, rng.random() < 0.7, rng.random() < 0.5
        want_logprobs = want_text and rng.random() < 0.5
        mine: list[dict[str, Any]] = []
        role_delta: dict[str, Any] = {"role": "assistant", "content": "" if want_text else None}
        mine.append({"delta": role_delta, "logprobs": None, "finish_reason": None})
        reasoning = content = None
        if want_reasoning:
            reasoning = _text(rng, rng.randint(1, 12))
            for piece in _split(rng, reasoning):
                mine.append({"delta": {"reasoning_content": piece}, "logprobs": None, "finish_reason": None})
        entries = []
        if want_text:
            content = _text(rng, rng.randint(1, 15))
            for piece in _split(rng, content):
                lp = None
                if want_logprobs:
                    entry = _logprob(piece, rng)
                    entries.append(entry)
                    lp = {"content": [entry], "refusal": None}
                mine.append({"delta": {"content": piece}, "logprobs": lp, "finish_reason": None})
        calls = []
        if want_tools:
            for j in range(rng.randint(1, 3)):
                args = json.dumps({"q": _text(rng, rng.randint(1, 5)), "n": j}, ensure_ascii=False)
                call = {"id": f"call_{seed}_{i}_{j}", "type": "function", "name": f"tool_{j}", "arguments": args}
                calls.append(call)
                mine.append(
                    {
                        "delta": {"tool_calls": [{"index": j, "id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": ""}}]},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                )
                for frag in _split(rng, args):
                    mine.append({"delta": {"tool_calls": [{"index": j, "function": {"arguments": frag}}]}, "logprobs": None, "finish_reason": None})
        finish = "tool_calls" if calls else rng.choice(["stop", "length"])
        mine.append({"delta": {}, "logprobs": None, "finish_reason": finish})
        steps.append(mine)
        truth.append(
            {
                "index": i,
                "role": "assistant",
                "content": (content if want_text else None),
                "reasoning_content": reasoning,
                "refusal": None,
                "tool_calls": calls,
                "finish_reason": finish,
                "logprobs": entries or None,
            }
        )

    chunks = []
    # The first chunk opens every choice in order (as the SDK requires), the rest interleave.
    chunks.append({**head, "choices": [{"index": i, **steps[i][0]} for i in range(n)]})
    queues = [list(s[1:]) for s in steps]
    while any(queues):
        live = [i for i in range(n) if queues[i]]
        together = rng.sample(live, rng.randint(1, len(live)))  # sometimes several choices in one chunk
        chunks.append({**head, "choices": [{"index": i, **queues[i].pop(0)} for i in sorted(together)]})
    usage = {"prompt_tokens": 10 + seed, "completion_tokens": 5 * n, "total_tokens": 10 + seed + 5 * n}
    chunks.append({**head, "choices": [], "usage": usage})
    return chunks, {"id": head["id"], "model": head["model"], "choices": truth, "usage": usage}


@pytest.mark.parametrize("seed", range(60))
def test_generated_streams_match_truth_and_openai_sdk(seed):
    chunks, truth = generate(seed)
    blocks = blocks_of(sse(*chunks, "[DONE]"))
    agg = aggregate(blocks)
    assert agg.problems == [] and agg.done
    ours = agg.result()
    assert canon(ours) == truth
    assert canon(sdk_accumulate(blocks)) == truth


def test_generator_covers_the_cases():
    seen = set()
    for seed in range(60):
        _, truth = generate(seed)
        choices = truth["choices"]
        seen.add(f"n={len(choices)}")
        for c in choices:
            seen |= {k for k in ("reasoning_content", "logprobs") if c[k]}
            if len(c["tool_calls"]) > 1:
                seen.add("parallel_tools")
    assert {"n=1", "n=2", "n=3", "reasoning_content", "logprobs", "parallel_tools"} <= seen


# ---------------------------------------------------------------- behaviours

HEAD = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def chunk(*choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {**HEAD, "choices": list(choices), **top}


def test_n2_choices_interleaved():
    data = sse(
        chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}),
        chunk({"index": 1, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}),
        chunk({"index": 1, "delta": {"content": "B1"}, "finish_reason": None}),
        chunk({"index": 0, "delta": {"content": "A1"}, "finish_reason": None}),
        chunk({"index": 0, "delta": {"content": " A2"}, "finish_reason": None}, {"index": 1, "delta": {"content": " B2"}, "finish_reason": None}),
        chunk({"index": 1, "delta": {}, "finish_reason": "length"}),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"}),
        "[DONE]",
    )
    result = aggregate(blocks_of(data)).result()
    assert [c["index"] for c in result["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in result["choices"]] == ["A1 A2", "B1 B2"]
    assert [c["finish_reason"] for c in result["choices"]] == ["stop", "length"]
    assert canon(result) == canon(sdk_accumulate(blocks_of(data)))


def test_choices_without_index_use_their_position():
    data = sse(
        {**HEAD, "choices": [{"delta": {"content": "a"}}, {"delta": {"content": "b"}}]},
        {**HEAD, "choices": [{"delta": {"content": "c"}}, {"delta": {"content": "d"}}]},
    )
    result = aggregate(blocks_of(data)).result()
    assert [c["message"]["content"] for c in result["choices"]] == ["ac", "bd"]


def test_usage_only_final_chunk():
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    data = sse(
        chunk({"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}, usage=None),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"}, usage=None),
        chunk(usage=usage),
        "[DONE]",
    )
    result = aggregate(blocks_of(data)).result()
    assert result["usage"] == usage
    assert len(result["choices"]) == 1
    assert result["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert result["choices"][0]["finish_reason"] == "stop"


def test_usage_missing_is_none():
    result = aggregate(blocks_of(sse(chunk({"index": 0, "delta": {"content": "x"}})))).result()
    assert result["usage"] is None and result["object"] == "chat.completion"


def test_usage_in_every_chunk_keeps_the_last():
    # vLLM with stream_options.continuous_usage_stats
    data = sse(
        chunk({"index": 0, "delta": {"content": "a"}}, usage={"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}),
        chunk({"index": 0, "delta": {"content": "b"}}, usage={"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}),
    )
    assert aggregate(blocks_of(data)).result()["usage"]["completion_tokens"] == 2


def test_logprobs_are_extended_not_merged():
    e = lambda t: {"token": t, "logprob": -1.0, "bytes": list(t.encode()), "top_logprobs": []}  # noqa: E731
    data = sse(
        chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": {"content": [], "refusal": None}}),
        chunk({"index": 0, "delta": {"content": "a"}, "logprobs": {"content": [e("a")], "refusal": None}}),
        chunk({"index": 0, "delta": {"content": "bc"}, "logprobs": {"content": [e("b"), e("c")], "refusal": None}}),
        chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}),
    )
    choice = aggregate(blocks_of(data)).result()["choices"][0]
    assert choice["logprobs"] == {"content": [e("a"), e("b"), e("c")], "refusal": None}
    assert canon({"choices": [choice]})["choices"][0]["logprobs"] == [e("a"), e("b"), e("c")]


def test_logprobs_after_a_null_first_chunk():
    # vLLM and others send `"logprobs": null` on the role chunk, then real logprobs
    e = {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}
    data = sse(
        chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}),
        chunk({"index": 0, "delta": {"content": "a"}, "logprobs": {"content": [e]}}),
        chunk({"index": 0, "delta": {"content": "a"}, "logprobs": {"content": [e]}}),
        chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}),
    )
    agg = aggregate(blocks_of(data))
    assert agg.problems == []
    assert agg.result()["choices"][0]["logprobs"] == {"content": [e, e]}
    assert canon(agg.result()) == canon(sdk_accumulate(blocks_of(data)))


def test_logprobs_null_throughout_stays_null():
    data = sse(chunk({"index": 0, "delta": {"content": "a"}, "logprobs": None}))
    assert aggregate(blocks_of(data)).result()["choices"][0]["logprobs"] is None


def test_unknown_vendor_fields_are_kept():
    data = sse(
        chunk({"index": 0, "delta": {"role": "assistant", "content": "", "x_meta": {"a": "1"}}}, prompt_token_ids=[1, 2, 3], x_top="t"),
        chunk({"index": 0, "delta": {"reasoning_content": "th"}, "matched_stop": None}),
        chunk({"index": 0, "delta": {"reasoning_content": "ink", "x_meta": {"a": "2", "b": [1]}}}),
        chunk({"index": 0, "delta": {"content": "ok", "x_meta": {"b": [2]}}, "finish_reason": "stop", "stop_reason": 151645, "matched_stop": 151645}),
    )
    result = aggregate(blocks_of(data)).result()
    assert result["prompt_token_ids"] == [1, 2, 3] and result["x_top"] == "t"
    choice = result["choices"][0]
    assert choice["stop_reason"] == 151645 and choice["matched_stop"] == 151645
    assert choice["message"]["reasoning_content"] == "think"
    assert choice["message"]["x_meta"] == {"a": "12", "b": [1, 2]}


def test_obfuscation_padding_is_not_part_of_the_completion():
    data = sse(chunk({"index": 0, "delta": {"content": "a"}}, obfuscation="Zk3"), chunk(usage={"total_tokens": 1}, obfuscation="q"))
    assert "obfuscation" not in aggregate(blocks_of(data)).result()


def test_malformed_json_event_is_a_problem_and_the_rest_aggregates():
    fixture = STREAMS / "openai_chat_parallel_tools.sse"
    good = blocks_of(fixture.read_bytes())
    bad = blocks_of(b'data: {"choices": [{"index": 0, "delta": {"content": "tru\n\n')
    agg = aggregate(good[:5] + bad + good[5:])
    assert len(agg.problems) == 1 and "not JSON" in agg.problems[0]
    assert agg.result() == expected_for(fixture)


@pytest.mark.parametrize("data", ["42", '"text"', "[1, 2]", "null"])
def test_json_that_is_not_an_object_is_a_problem(data):
    agg = aggregate(blocks_of(sse(chunk({"index": 0, "delta": {"content": "a"}}), data)))
    assert len(agg.problems) == 1 and "not a JSON object" in agg.problems[0]
    assert agg.result()["choices"][0]["message"]["content"] == "a"


@pytest.mark.parametrize(
    "bad",
    [{"choices": [None]}, {"choices": ["x"]}, {"choices": {"0": {}}}, {"choices": [{"index": "0", "delta": {}}]}, {"choices": [{"index": 0, "delta": "x"}]}],
    ids=["null-choice", "string-choice", "choices-object", "string-index", "string-delta"],
)
def test_odd_chunk_shapes_are_problems_not_exceptions(bad):
    agg = aggregate(blocks_of(sse(chunk({"index": 0, "delta": {"content": "a"}}), {**HEAD, **bad}, chunk({"index": 0, "delta": {"content": "b"}}))))
    assert len(agg.problems) == 1
    result = agg.result()
    assert [c["message"]["content"] for c in result["choices"]] == ["ab"]


def test_error_event_mid_stream():
    error = {"message": "The server had an error while processing your request.", "type": "server_error", "param": None, "code": None}
    data = sse(
        chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}),
        chunk({"index": 0, "delta": {"content": "Partial"}, "finish_reason": None}),
        {"error": error},
        chunk({"index": 0, "delta": {"content": " more"}, "finish_reason": None}),
    )
    agg = aggregate(blocks_of(data))
    assert len(agg.problems) == 1 and agg.problems[0].startswith("error event:")
    assert "server_error" in agg.problems[0]
    result = agg.result()
    assert result["error"] == error
    assert result["choices"][0]["message"]["content"] == "Partial more"
    assert result["choices"][0]["finish_reason"] is None
    assert not agg.done


def test_error_event_alone():
    agg = aggregate(blocks_of(sse({"error": {"message": "overloaded", "type": "BadRequestError", "code": 400, "object": "error"}})))
    result = agg.result()
    assert result["error"]["message"] == "overloaded" and result["choices"] == []
    assert len(agg.problems) == 1


def test_unterminated_last_block_is_not_aggregated():
    blocks = blocks_of(sse(chunk({"index": 0, "delta": {"content": "a"}})) + b'data: {"choices":[{"index":0,"delta":{"content":"b"}}]}')
    assert blocks[-1].terminated is False
    assert aggregate(blocks).result()["choices"][0]["message"]["content"] == "a"


def test_keep_alive_comments_and_done_only():
    agg = aggregate(blocks_of(b": ping\n\ndata: [DONE]\n\n"))
    assert agg.done and agg.result() is None and agg.problems == []
    assert ChatCompletionAggregator().result() is None


def test_tool_call_fragments_with_empty_id_name_and_null_type():
    # DashScope repeats `"id": ""`, `"name": ""`; some servers repeat `"type": null` / `""`
    data = sse(
        chunk({"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}]}}),
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "", "type": "", "function": {"name": "", "arguments": ":"}}]}}),
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "id": None, "type": None, "function": {"name": None, "arguments": "1}"}}]}}),
        chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"}),
    )
    [call] = aggregate(blocks_of(data)).result()["choices"][0]["message"]["tool_calls"]
    assert call == {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}


def test_tool_calls_sorted_by_index_and_index_dropped():
    data = sse(
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}}),
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}),
    )
    calls = aggregate(blocks_of(data)).result()["choices"][0]["message"]["tool_calls"]
    assert [c["id"] for c in calls] == ["a", "b"] and all("index" not in c for c in calls)


def test_merge_delta_rules():
    acc: dict[str, Any] = {}
    merger = DeltaMerger()
    merger.merge(acc, {"s": "a", "d": {"x": "1"}, "l": [1], "t": [{"index": 0, "v": "p"}], "k": None, "type": "function"})
    merger.merge(acc, {"s": "b", "d": {"x": "2", "y": 3}, "l": [2], "t": [{"index": 0, "v": "q"}, {"index": 1, "v": "r"}], "k": "set", "type": None})
    merger.merge(acc, {"s": None, "d": None, "l": None})
    merger.settle()
    assert acc == {
        "s": "ab",
        "d": {"x": "12", "y": 3},
        "l": [1, 2],
        "t": [{"index": 0, "v": "pq"}, {"index": 1, "v": "r"}],
        "k": "set",
        "type": "function",
    }


def test_growing_strings_are_joined_once_and_merging_goes_on_after():
    acc: dict[str, Any] = {}
    merger = DeltaMerger()
    for piece in ("a", "b", "c"):
        merger.merge(acc, {"content": piece, "function": {"arguments": piece}})
    merger.settle()
    assert acc == {"content": "abc", "function": {"arguments": "abc"}}
    merger.merge(acc, {"content": "d", "function": {"arguments": {"not": "a string"}}})  # a value of another type replaces
    merger.settle()
    assert acc == {"content": "abcd", "function": {"arguments": {"not": "a string"}}}


def test_aggregate_does_not_alias_between_results():
    data = sse(chunk({"index": 0, "delta": {"content": "a", "tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}]}}))
    agg = aggregate(blocks_of(data))
    first = copy.deepcopy(agg.result())
    agg.add(blocks_of(sse(chunk({"index": 0, "delta": {"content": "b"}})))[0])
    assert first["choices"][0]["message"]["content"] == "a"
    assert agg.result()["choices"][0]["message"]["content"] == "ab"


def test_api_shape_matching_and_error_body():
    shape = ChatCompletions()
    assert api_for("POST", "/v1/chat/completions") is not None
    assert shape.matches("POST", "/chat/completions/")
    assert shape.matches("POST", "/compatible-mode/v1/chat/completions")
    assert not shape.matches("GET", "/v1/chat/completions")
    assert not shape.matches("POST", "/v1/completions")
    assert api_for("POST", "/v1/embeddings") is None
    assert shape.error_body("m", "t") == {"error": {"message": "m", "type": "t", "param": None, "code": None}}


def test_choice_level_token_ids_concatenate_per_choice():
    # vLLM with return_token_ids: prompt ids once at the top of the first chunk,
    # each chunk's new completion ids in its choices (n=2 interleaved here)
    data = sse(
        chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "token_ids": []},
              {"index": 1, "delta": {"role": "assistant", "content": ""}, "token_ids": []}, prompt_token_ids=[7, 8]),
        chunk({"index": 0, "delta": {"content": "a"}, "token_ids": [10]}),
        chunk({"index": 1, "delta": {"content": "x"}, "token_ids": [20, 21]}),
        chunk({"index": 0, "delta": {"content": "b"}, "token_ids": [11]}, {"index": 1, "delta": {}, "token_ids": [22]}),
        chunk({"index": 0, "delta": {}, "token_ids": [12], "finish_reason": "length"}),
        chunk({"index": 1, "delta": {}, "token_ids": None, "finish_reason": "stop"}),
    )
    result = aggregate(blocks_of(data)).result()
    assert result["prompt_token_ids"] == [7, 8]
    assert [c["token_ids"] for c in result["choices"]] == [[10, 11, 12], [20, 21, 22]]
    assert [c["message"]["content"] for c in result["choices"]] == ["ab", "x"]
