"""Capture on request: the fields added upstream, and the events the agent gets
without what it did not ask for (vLLM sets such fields to null, SGLang leaves
its id fields out), the same bytes where nothing changes, however the
network cuts the stream."""

from __future__ import annotations

import json
import random

import pytest

from llmtraj.tokens.capture import StreamHider, hide_in_body, plan_capture

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def lp(token: str, value: float) -> dict:
    return {"token": token, "logprob": value, "bytes": list(token.encode()), "top_logprobs": []}


def vllm_chat_stream(*, ids: bool, logprobs: bool, usage: bool) -> list[dict]:
    """The chunks vLLM 0.32 sends for a two-token answer (as probed), with or without each family."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}],
               "prompt_token_ids": [1, 2, 3] if ids else None, "prompt_text": None}]  # fmt: skip
    for token, id_, value, finish in (("He", 7, -0.5, None), ("llo", 8, -0.25, "stop")):
        choice = {"index": 0, "delta": {"content": token}, "logprobs": {"content": [lp(token, value)]} if logprobs else None,
                  "finish_reason": finish}  # fmt: skip
        if finish:
            choice["stop_reason"] = None
        choice["token_ids"] = [id_] if ids else None
        chunks.append({**head, "choices": [choice]})
    # vLLM stamps its fingerprint on the last event: the usage event when asked for, else the finishing one
    if usage:
        chunks.append({**head, "choices": [], "usage": {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2},
                       "system_fingerprint": "vllm-0.32.0"})  # fmt: skip
    else:
        chunks[-1]["system_fingerprint"] = "vllm-0.32.0"
    return chunks


def sse(chunks: list[dict], end: bytes = b"\n\n") -> bytes:
    lines = [b"data: " + json.dumps(c, ensure_ascii=False, separators=(",", ":")).encode() + end for c in chunks]
    return b"".join(lines) + b"data: [DONE]" + end


def pass_through(hider: StreamHider, data: bytes, rng: random.Random) -> bytes:
    out, at = [], 0
    while at < len(data):
        step = rng.randint(1, 40)
        out.append(hider.feed(data[at : at + step]))
        at += step
    out.append(hider.feed(b""))
    return b"".join(out)


def test_plan_adds_only_what_the_agent_did_not_ask_for():
    plan = plan_capture("chat.completions", {**CHAT, "stream": True})
    assert plan.added == {"return_token_ids": True, "logprobs": True, "stream_options": {"include_usage": True}}
    assert plan.hidden == {"token_ids", "logprobs", "usage"}
    asked = plan_capture("chat.completions", {**CHAT, "logprobs": True, "top_logprobs": 2, "stream": True,
                                              "stream_options": {"include_usage": True}})  # fmt: skip
    assert asked.added == {"return_token_ids": True} and asked.hidden == {"token_ids"}
    assert plan_capture("chat.completions", {**CHAT, "return_token_ids": True, "logprobs": True}) is None
    text = plan_capture("completions", {"model": "m", "prompt": "x", "stream_options": {"continuous_usage_stats": True}, "stream": True})
    assert text.added == {"return_token_ids": True, "logprobs": 0,
                          "stream_options": {"continuous_usage_stats": True, "include_usage": True}}  # fmt: skip
    assert plan_capture("completions", {"model": "m", "prompt": "x", "logprobs": 0}).added == {"return_token_ids": True}
    assert plan_capture("anthropic.messages", CHAT) is None and plan_capture("chat.completions", [1]) is None


def test_plan_for_sglang():
    assert plan_capture("chat.completions", CHAT, "sglang").added == {
        "return_token_ids": True, "return_prompt_token_ids": True, "logprobs": True}  # fmt: skip
    streamed = plan_capture("chat.completions", {**CHAT, "stream": True}, "sglang")  # no ids in SGLang chat streams
    assert "return_token_ids" not in streamed.added and "token_ids" not in streamed.hidden


@pytest.mark.parametrize("end", [b"\n\n", b"\r\n\r\n"])
@pytest.mark.parametrize("seed", range(5))
def test_stream_the_agent_gets_is_what_vllm_sends_unasked(end, seed):
    request = {**CHAT, "stream": True}
    hider = StreamHider(plan_capture("chat.completions", request))
    upstream = sse(vllm_chat_stream(ids=True, logprobs=True, usage=True), end)
    got = pass_through(hider, upstream, random.Random(seed))
    assert got == sse(vllm_chat_stream(ids=False, logprobs=False, usage=False), end)
    assert hider.rewritten == [0, 1, 2] and hider.dropped == 1


def test_events_that_need_no_change_pass_as_the_same_bytes():
    request = {**CHAT, "stream": True, "logprobs": True, "stream_options": {"include_usage": True}}
    hider = StreamHider(plan_capture("chat.completions", request))
    # spaced JSON and a comment: only the events carrying ids are rewritten
    upstream = (b': keep-alive\n\ndata: {"choices": [], "usage": {"completion_tokens": 2}}\n\n'
                + sse(vllm_chat_stream(ids=True, logprobs=True, usage=False)))  # fmt: skip
    got = pass_through(hider, upstream, random.Random(1))
    assert got.startswith(b': keep-alive\n\ndata: {"choices": [], "usage": {"completion_tokens": 2}}\n\n')
    assert got.endswith(sse(vllm_chat_stream(ids=False, logprobs=True, usage=False)))
    assert hider.rewritten == [2, 3, 4] and hider.dropped == 0


def test_vllm_events_take_the_quick_way():
    # (the parser would give the same bytes, only at several times the cost per event on the proxy's loop)
    hider = StreamHider(plan_capture("chat.completions", {**CHAT, "stream": True}))
    for chunk in vllm_chat_stream(ids=True, logprobs=True, usage=True):
        event = sse([chunk])[: -len(b"data: [DONE]\n\n")]
        assert hider._hide_compact(event) is not None, event


def test_the_fingerprint_of_the_usage_event_goes_to_the_finishing_event():
    # the agent asked for ids and logprobs, not for usage: only the usage event changes things
    request = {**CHAT, "stream": True, "logprobs": True, "return_token_ids": True}
    hider = StreamHider(plan_capture("chat.completions", request))
    got = pass_through(hider, sse(vllm_chat_stream(ids=True, logprobs=True, usage=True)), random.Random(2))
    assert got == sse(vllm_chat_stream(ids=True, logprobs=True, usage=False))
    assert hider.rewritten == [2] and hider.dropped == 1


def test_a_cut_off_last_event_goes_as_it_came():
    hider = StreamHider(plan_capture("chat.completions", {**CHAT, "stream": True}))
    assert hider.feed(b'data: {"choices": [{"token_ids": [1]') == b""
    assert hider.feed(b"") == b'data: {"choices": [{"token_ids": [1]'


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("event", [
    b'data: {"choices":[{"logprobs":{},"finish_reason":token_ids":[1]}]}\n\n',  # no reasons between the keys
    b'data: {"choices":[{"logprobs":"logprobs":{},"finish_reason":null}]}\n\n',  # a key after a key
    b'data: {"choices":[{"token_ids":token_ids":[1]}]}\n\n',
    b'data: {"a":token_ids":token_ids":token_ids":}\n\n',
])
def test_an_event_that_is_not_json_does_not_break_the_stream(engine, event):
    # The proxy's loop runs this on the upstream's bytes: garbage passes (cut where the keys say, as the general
    # way cuts it, or unchanged), and the events after it are shown as ever.
    plan = plan_capture("chat.completions", {**CHAT, "stream": True}, engine)
    hider, general = StreamHider(plan), StreamHider(plan)
    assert hider.feed(event) == general._event(event, True)
    following = sse(vllm_chat_stream(ids=True, logprobs=True, usage=True))
    assert hider.feed(following) + hider.feed(b"") == StreamHider(plan).feed(following) + StreamHider(plan).feed(b"")


def test_sglang_id_fields_are_left_out_and_logprobs_null():
    plan = plan_capture("completions", {"model": "m", "prompt": "x", "stream": True}, "sglang")
    chunk = {"id": "1", "object": "text_completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": [-1.0]},
                          "finish_reason": None, "matched_stop": None, "token_ids": [5], "prompt_token_ids": [1, 2]}],
             "usage": None}  # fmt: skip
    got = StreamHider(plan).feed(sse([chunk]))
    first = json.loads(got.split(b"\n\n")[0][6:])
    assert first["choices"][0] == {"index": 0, "text": "a", "logprobs": None, "finish_reason": None, "matched_stop": None}
    assert first["usage"] is None


def test_non_stream_body():
    plan = plan_capture("chat.completions", CHAT)
    body = {"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": {"content": [lp("Hello", -1.0)]},
         "finish_reason": "stop", "stop_reason": None, "token_ids": [9]}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}, "prompt_token_ids": [1, 2, 3]}  # fmt: skip
    hidden = json.loads(hide_in_body(json.dumps(body).encode(), plan))
    assert hidden["prompt_token_ids"] is None and hidden["usage"] == body["usage"]
    assert hidden["choices"][0]["token_ids"] is None and hidden["choices"][0]["logprobs"] is None
    unchanged = json.dumps({**body, "prompt_token_ids": None, "choices": [{**body["choices"][0], "token_ids": None,
                                                                           "logprobs": None}]}).encode()  # fmt: skip
    assert hide_in_body(unchanged, plan) is unchanged
    assert hide_in_body(b"not json", plan) == b"not json"


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_text_that_looks_like_the_fields_is_left_alone(engine):
    # what the model wrote may spell the very keys: inside a JSON string their quotes are escaped
    tricky = 'a "logprobs":{"x":1},"finish_reason":"stop","token_ids":[1,2]} "usage":{'
    plan = plan_capture("completions", {"model": "m", "prompt": "x", "stream": True}, engine)  # ids and logprobs hidden
    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": tricky}, "logprobs": {"content": [lp(tricky, -1.0)]},
                                     "finish_reason": None, "token_ids": [5, 6]}]}  # fmt: skip
    compact = sse([chunk])
    spaced = b"data: " + json.dumps(chunk).encode() + b"\n\n" + b"data: [DONE]\n\n"  # the parsing way
    for data in (compact, spaced):
        got = json.loads(StreamHider(plan).feed(data).split(b"\n\n")[0][6:])
        choice = got["choices"][0]
        assert choice["delta"]["content"] == tricky and choice["logprobs"] is None
        assert ("token_ids" not in choice) if engine == "sglang" else (choice["token_ids"] is None)
