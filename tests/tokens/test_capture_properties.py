"""Properties of taking the captured fields out of a stream: the quick way
through a compact event (spans found by their keys, cut out of the bytes)
gives the very bytes that parsing the event and writing it anew gives, for
whatever the model wrote (quotes, backslashes, text that spells the keys);
and however the network cuts the stream, the agent gets the same bytes and
the record the same account of what was rewritten."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from llmtraj.tokens.capture import _DROP, StreamHider, _shown_parsed, engine_json, plan_capture

TEXT = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
    st.sampled_from(['"logprobs":{"a":1},"finish_reason":"stop"', 'x": [1]', '\\"token_ids\\":[', '"usage":{',
                     "}],", "\n\n", "a\\", '"choices":[]']),  # fmt: skip
)
IDS = st.lists(st.integers(0, 200_000), max_size=3)
LOGPROB = st.fixed_dictionaries({"token": TEXT, "logprob": st.floats(-50, 0), "bytes": st.lists(st.integers(0, 255), max_size=3),
                                 "top_logprobs": st.just([])})  # fmt: skip
LOGPROBS = st.none() | st.fixed_dictionaries({"content": st.lists(LOGPROB, max_size=2)})
FINISH = st.sampled_from([None, "stop", "length", "tool_calls"])


# /v1/completions: the text and its logprobs in lists
TEXT_LOGPROBS = st.none() | st.fixed_dictionaries({
    "tokens": st.lists(TEXT, max_size=2), "token_logprobs": st.lists(st.floats(-50, 0), max_size=2),
    "top_logprobs": st.none(), "text_offset": st.lists(st.integers(0, 99), max_size=2)})  # fmt: skip


@st.composite
def choice(draw: st.DrawFn, index: int) -> dict[str, Any]:
    if draw(st.booleans()):
        delta = draw(st.sampled_from([{}, {"content": draw(TEXT)}, {"role": "assistant", "content": ""},
                                      {"reasoning_content": draw(TEXT)},
                                      {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                       "function": {"name": draw(TEXT), "arguments": draw(TEXT)}}]}]))  # fmt: skip
        out: dict[str, Any] = {"index": index, "delta": delta, "logprobs": draw(LOGPROBS), "finish_reason": draw(FINISH)}
    else:
        out = {"index": index, "text": draw(TEXT), "logprobs": draw(TEXT_LOGPROBS), "finish_reason": draw(FINISH)}
    if draw(st.booleans()):
        out["stop_reason"] = None
    if draw(st.booleans()):
        out["token_ids"] = draw(IDS | st.none())
    if draw(st.booleans()):  # SGLang's per-choice prompt ids
        out["prompt_token_ids"] = draw(IDS)
    return out


@st.composite
def chunk(draw: st.DrawFn) -> dict[str, Any]:
    """A stream chunk as vLLM or SGLang writes it (keys in their order): chat
    (text, reasoning, tool calls) or completions, up to two choices."""
    out: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": draw(TEXT)}
    choices = [draw(choice(i)) for i in range(draw(st.integers(0, 2)))]
    out["choices"] = choices
    if draw(st.booleans()):
        out["usage"] = draw(st.none() | st.just({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}))
    if draw(st.booleans()):
        out["prompt_token_ids"] = draw(IDS | st.none())
    if draw(st.booleans()):
        out["system_fingerprint"] = draw(TEXT)
    return out


PLAN = st.builds(
    lambda engine, asked: plan_capture("chat.completions", {"model": "m", "stream": True, **asked}, engine),
    st.sampled_from(["vllm", "sglang"]),
    st.fixed_dictionaries({}, optional={"logprobs": st.just(True), "return_token_ids": st.just(True),
                                        "stream_options": st.just({"include_usage": True})}),  # fmt: skip
).filter(lambda plan: plan is not None)


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + engine_json(obj) + b"\n\n"


@given(PLAN, chunk())
def test_the_quick_way_gives_what_parsing_gives(plan, obj):
    raw = event(obj)
    quick = StreamHider(plan)._hide_compact(raw)
    if quick is not None:  # None: it leaves the event to the parser
        parsed = _shown_parsed(raw, plan)
        assert quick is _DROP if parsed is _DROP else quick == parsed
        assert (quick is raw) == (parsed is raw)  # an event that needs no change passes as the same bytes


# The plans under which vLLM's usual event takes the hider's shortest way: ids and logprobs hidden, usage too or not
TOKEN_PLANS = st.sampled_from([
    plan_capture("chat.completions", {"model": "m", "stream": True}),
    plan_capture("chat.completions", {"model": "m", "stream": True, "stream_options": {"include_usage": True}}),
])


@st.composite
def token_event(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """A chunk as vLLM streams it when asked for ids and logprobs (one choice,
    its logprobs object and ids last), or one changed off that shape in a way
    the shortest way must see (ids or logprobs elsewhere, another key last);
    and whether it kept the shape."""
    choice: dict[str, Any] = {"index": 0, "delta": {"content": draw(TEXT)},
                              "logprobs": {"content": draw(st.lists(LOGPROB, max_size=2))}, "finish_reason": draw(FINISH)}  # fmt: skip
    if draw(st.booleans()):
        choice["stop_reason"] = draw(st.none() | TEXT | st.integers(0, 200_000))
    choice["token_ids"] = draw(IDS)
    out: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": draw(TEXT),
                           "choices": [choice]}  # fmt: skip
    if draw(st.booleans()):
        out["usage"] = None
    change = draw(st.sampled_from([None, "prompt ids first", "a choice without ids before", "a key last"]))
    if change == "prompt ids first":
        out = {"prompt_token_ids": draw(IDS), **out}
    elif change == "a choice without ids before":
        out["choices"] = [{"index": 1, "delta": {}, "logprobs": draw(LOGPROBS), "finish_reason": draw(FINISH)}, choice]
    elif change == "a key last":
        out["system_fingerprint"] = draw(TEXT)
    return out, change is None


@given(TOKEN_PLANS, token_event())
def test_vllms_usual_event_takes_the_shortest_way_to_what_the_general_way_gives(plan, shaped):
    obj, usual = shaped
    raw = event(obj)
    quick, general = StreamHider(plan), StreamHider(plan)
    if usual:
        quick._event = None  # (it must not be needed)
    assert quick.feed(raw) == general._event(raw, True)
    assert (quick.rewritten, quick.dropped, quick._held, quick._position) == (
        general.rewritten, general.dropped, general._held, general._position)


@given(TOKEN_PLANS, st.lists(token_event(), min_size=1, max_size=6), st.booleans())
def test_events_that_come_together_take_the_shortest_way_to_what_the_general_way_gives(plan, shaped, done):
    """Several events in one piece (a reader that fell behind its engine), the
    [DONE] line last or not: each usual one as the shortest way shows it alone."""
    data = b"".join(event(obj) for obj, _ in shaped) + (b"data: [DONE]\n\n" if done else b"")
    quick, general = StreamHider(plan), StreamHider(plan)
    taken = []
    shortest = quick._token_event
    quick._token_event = lambda raw: taken.append(raw) or shortest(raw)
    general._token_event = lambda raw: None  # (the general way for every event)
    assert quick.feed(data) + quick.feed(b"") == general.feed(data) + general.feed(b"")
    assert (quick.rewritten, quick.dropped, quick._held, quick._position) == (
        general.rewritten, general.dropped, general._held, general._position)
    assert taken[:1] == [event(shaped[0][0])]  # offered the shortest way
    if not quick._usage:  # (nothing is held: every event is)
        assert len(taken) == len(shaped) + done


def _agent_bytes(plan, data: bytes, cuts: list[int]) -> tuple[bytes, list[int], int]:
    hider = StreamHider(plan)
    out, at = [], 0
    for cut in sorted(set(cuts) - {0}) + [len(data)]:
        if cut > at:  # (b"" is the end of the stream)
            out.append(hider.feed(data[at:cut]))
            at = cut
    out.append(hider.feed(b""))
    return b"".join(out), hider.rewritten, hider.dropped


@given(PLAN, st.lists(chunk(), min_size=1, max_size=5), st.sampled_from([b"\n\n", b"\r\n\r\n"]), st.data())
def test_any_chunking_gives_the_same_bytes_and_account(plan, chunks, end, data):
    lines = [b"data: " + engine_json(c) + end for c in chunks]
    lines.insert(data.draw(st.integers(0, len(lines))), b"data: " + json.dumps(chunks[0]).encode() + end)  # spaced
    stream = b"".join(lines) + b"data: [DONE]" + end
    whole = _agent_bytes(plan, stream, [])
    per_event = _agent_bytes(plan, stream, [sum(map(len, lines[:i])) for i in range(1, len(lines) + 1)])
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert _agent_bytes(plan, stream, cuts) == whole == per_event
