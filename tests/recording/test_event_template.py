"""The blocks a stream's body taken at once folds in as the text they add to
the one before them (`recording.event_template`, issue 19) make the record the
general path makes, parsing and folding in each block whole: streams whose
blocks repeat an envelope around texts of every kind (quotes, backslashes,
escapes, unicode, the envelope's own text), with the fields around them
changing now and then (ids, models, finish reasons, counters, padding, the
choice, the JSON's spacing and escaping), and raws made invalid where a text
or counter is (a raw control character, a bad escape, a lone surrogate, a
number that is no integer)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import from_json
from llmtraj.apis import API_BY_NAME
from llmtraj.recording import event_template
from llmtraj.recording.event_template import EventTemplate

from .test_recorder import T0
from .test_whole_stream import _same_both_ways

# Replaced in a block's JSON text after it is written (so they may make it invalid): what servers could send.
_MARK = "\u2603"
RAW_SNIPPETS = ["\t", "\\q", "\\ud800", "\\ud83d\\ude00", "\\u00e9", '\\"', '"', "\\\\", "\\", "\\/", "\x7f", "\\u12"]
TEXT = st.lists(st.sampled_from(
    ['"', "\\", "\n", "\t", "é", "—", "😀", "a", " ", "}", "]", ",", ":", "\u2028", "\x00", _MARK,
     '","obfuscation":"', '"}]}', "data: ", '"delta":"', '{"content":"', "\\n", "\\u00e9"]), max_size=6,
).map("".join) | st.sampled_from(["", "the ", " quick", "x"])
NUMBER = st.sampled_from([0, 1, 7, 9, 10, 99, 100, -1, 123456789012345678901234567890]) | st.just(_MARK)


def _text(draw: Any) -> str:
    return draw(TEXT)


class _Draws:
    """Hypothesis's draws, and the stream's way of writing JSON (spaced, ASCII only)."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.style = data.draw(st.tuples(st.booleans(), st.booleans()))

    def __call__(self, strategy: st.SearchStrategy) -> Any:
        return self.data.draw(strategy)


def _rarely(draw: Any) -> bool:
    return draw(st.integers(0, 9)) == 0


def _written(value: dict[str, Any], draw: Any) -> str:
    """The JSON text of `value` as a server writes it (spaced or not, escaping all but ASCII or not: the
    stream's way, now and then another), marks replaced."""
    style = draw.style = draw(st.tuples(st.booleans(), st.booleans())) if _rarely(draw) else draw.style
    spaced, ascii_only = style
    text = json.dumps(value, ensure_ascii=ascii_only, separators=(", ", ": ") if spaced else (",", ":"))
    for mark in (f'"{_MARK}"', '"\\u2603"'):  # a number's place
        while mark in text:
            text = text.replace(mark, draw(st.sampled_from(["5.0", "1e2", "-0", "01", '"7"', "7"])), 1)
    for mark in (_MARK, "\\u2603"):  # within a string
        while mark in text:
            text = text.replace(mark, draw(st.sampled_from(RAW_SNIPPETS)), 1)
    return text


def _chat(draw: Any, events: int) -> list[str]:
    top = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    padding = draw(st.sampled_from(["x9Q", None]))
    blocks = []
    for _ in range(events):
        if _rarely(draw):  # now and then another id, model, creation time
            top = {**top, draw(st.sampled_from(["id", "model", "created"])): draw(st.sampled_from(["x", 2, "m"]))}
        kind = draw(st.integers(0, 9))
        delta: dict[str, Any] = {"content": _text(draw)}
        if kind == 0:
            delta = {"role": "assistant", "content": _text(draw)}
        elif kind == 1:
            delta = {"tool_calls": [{"index": draw(st.integers(0, 1)), "function": {"arguments": _text(draw)}}]}
        elif kind == 2:
            delta = {"reasoning_content": _text(draw)}
        choice = {"index": draw(st.sampled_from([0] * 9 + [1])), "delta": delta, "logprobs": None,
                  "finish_reason": draw(st.sampled_from([None] * 9 + ["stop", "length"]))}  # fmt: skip
        if _rarely(draw):
            choice["logprobs"] = {"content": [{"token": _text(draw), "logprob": -0.5}]}
        chunk = {**top, "choices": [choice]}
        if _rarely(draw):
            padding = draw(st.sampled_from(["x9Q", "Ab", "", _MARK, 5, None]))
        if padding is not None:
            chunk["obfuscation"] = padding
        if draw(st.integers(0, 19)) == 0:
            chunk = {**top, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
        blocks.append(f"data: {_written(chunk, draw)}\n\n")
    return [*blocks, "data: [DONE]\n\n"]


def _anthropic(draw: Any, events: int) -> list[str]:
    start = {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "content": [],
                                                  "model": "c", "stop_reason": None, "usage": {"output_tokens": 1}}}
    blocks = [("message_start", start),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
              ("content_block_start", {"type": "content_block_start", "index": 1,
                                       "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}})]
    for _ in range(events):
        index = draw(st.sampled_from([0, 0, 0, 1, 2]))
        kind, field = draw(st.sampled_from([("text_delta", "text")] * 3 + [("input_json_delta", "partial_json")]))
        event = {"type": "content_block_delta", "index": index, "delta": {"type": kind, field: _text(draw)}}
        if _rarely(draw):
            event["extra"] = draw(NUMBER)
        name = draw(st.sampled_from(["content_block_delta"] * 8 + [None, "ping"]))
        blocks.append((name, event))
        if draw(st.integers(0, 29)) == 0:
            blocks.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    blocks.append(("message_stop", {"type": "message_stop"}))
    return [(f"event: {name}\n" if name else "") + f"data: {_written(event, draw)}\n\n" for name, event in blocks]


def _responses(draw: Any, events: int) -> list[str]:
    item = {"id": "i", "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
    blocks = [{"type": "response.created", "response": {"id": "r", "object": "response", "output": []}},
              {"type": "response.output_item.added", "output_index": 0, "item": item},
              {"type": "response.content_part.added", "item_id": "i", "output_index": 0, "content_index": 0,
               "part": {"type": "output_text", "annotations": [], "text": ""}}]  # fmt: skip
    padding = draw(st.sampled_from(["lLUaIst", None]))
    for _ in range(events):
        event = {"type": "response.output_text.delta", "item_id": draw(st.sampled_from(["i"] * 9 + ["j"])),
                 "output_index": 0, "content_index": draw(st.sampled_from([0] * 9 + [1])), "delta": _text(draw),
                 "logprobs": draw(st.sampled_from([[]] * 9 + [[{"token": "a"}]]))}  # fmt: skip
        if _rarely(draw):
            padding = draw(st.sampled_from(["lLU", "x", _MARK, None]))
        if padding is not None:
            event["obfuscation"] = padding
        if _rarely(draw):
            event = {"type": "response.output_text.done", "item_id": "i", "output_index": 0, "content_index": 0,
                     "text": _text(draw)}  # fmt: skip
        blocks.append(event)
    blocks.append({"type": "response.completed", "response": {"id": "r", "object": "response", "status": "completed"}})
    written = []
    sequence = 0
    for event in blocks:
        sequence += draw(st.sampled_from([1] * 9 + [0, 2, 1000]))
        number = draw(st.sampled_from([sequence] * 9 + [_MARK, -sequence]))
        name = draw(st.sampled_from([event["type"]] * 9 + [None]))
        text = _written({"type": event["type"], "sequence_number": number, **event}, draw)
        written.append((f"event: {name}\n" if name else "") + f"data: {text}\n\n")
    return written


STREAMS = {"chat.completions": _chat, "anthropic.messages": _anthropic, "responses": _responses}


@pytest.mark.parametrize("api", STREAMS)
@settings(max_examples=max(150, settings.default.max_examples), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(data=st.data(), events=st.integers(1, 30))
def test_blocks_folded_in_by_template_give_the_general_paths_record(api, data, events):
    blocks = [block.encode() for block in STREAMS[api](_Draws(data), events)]
    _, taken = _same_both_ways(API_BY_NAME[api], blocks, [T0 + 0.2 + i * 0.001 for i in range(len(blocks))])
    assert taken


def _long_stream(api: str) -> list[bytes]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
    try:
        from long_streams import stream_blocks
    finally:
        sys.path.pop(0)
    return stream_blocks(api, 300, 4)


def _escaped_chat_stream(events: int) -> list[bytes]:
    # A server that escapes all but ASCII (`json.dumps`' default), its texts CJK, quotes and line ends.
    texts = ["\u4f60\u597d", "\n\n", '"\u4e16\u754c"', "\\", "\u2014\t"]
    chunks = [{"id": "c", "object": "chat.completion.chunk", "model": "m",
               "choices": [{"index": 0, "delta": {"content": texts[i % len(texts)]}, "finish_reason": None}]}
              for i in range(events)]  # fmt: skip
    return [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks] + [b"data: [DONE]\n\n"]


@pytest.mark.parametrize("api", [*STREAMS, "escaped"])
def test_a_long_streams_text_blocks_are_folded_in_by_template(api, monkeypatch):
    # The streams servers send (the benchmark's, and texts written with escapes): all but the first few and
    # last few blocks match a template (else the comparisons above compare the general path with itself).
    taken = []
    given: list = []  # the events each take was given: the blocks it takes get their values there
    take = EventTemplate.take

    def counted(self, raws, start, events=None):
        taken.append(take(self, raws, start, events) - start)
        given.append(events)
        return taken[-1] + start

    monkeypatch.setattr(event_template.EventTemplate, "take", counted)
    blocks = _escaped_chat_stream(300) if api == "escaped" else _long_stream(api)
    shape = API_BY_NAME["chat.completions" if api == "escaped" else api]
    record, bulk = _same_both_ways(shape, blocks, [T0 + 0.2 + i * 0.001 for i in range(len(blocks))])
    assert bulk and sum(taken) >= len(blocks) - 10
    assert record["complete"] and not record["problems"]
    assert given[0] is not None and sum("v" in event for event in given[0]) == sum(taken)


def test_a_template_is_proven_on_its_own_block():
    path = ("choices", 0, "delta", "content")
    for raw in ['data: {"choices":[{"index":0,"delta":{"content":"a","content":"b"}}]}\n\n',
                'data: {"choices":[{"index":0,"delta":{"content":"b","content":"a"}}]}\n\n',
                'data: {"choices":[{"index":0,"delta":{"content":"b"}}],"x":{"content":"b"}}\n\n']:  # fmt: skip
        # (duplicate keys: the template, if any, reads the text where the parser does)
        texts: list[str] = []
        template = EventTemplate.of(raw, from_json(raw[6:-2]), path, (), texts.append)
        other = raw.replace('"b"', '"q"', 1)
        if template is not None and template.take([other], 0) == 1:
            assert texts == [from_json(other[6:-2])["choices"][0]["delta"]["content"]]
    texts = []
    raw = 'data: {"choices":[{"index":0,"delta":{"content":"b"}}],"obfuscation":"x"}\n\n'
    template = EventTemplate.of(raw, from_json(raw[6:-2]), path, (("obfuscation",),), texts.append)
    assert template is not None
    raws = [raw.replace('"b"', '"c\\n"').replace('"x"', '"y"'), raw.replace('"b"', '"d"}'), raw]
    assert template.take(raws, 0) == 1 and texts == ["c\n"]
