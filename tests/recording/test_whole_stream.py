"""A stream's body taken at once (`RecordBuilder._whole_stream`, issue 19) makes
the record the general path makes chunk by chunk: the same events (text, bytes,
times), the same aggregate and problems, for every fixture of every API in any
chunking and for generated streams of every shape, the usual one (the bulk path
takes it) and any other (the general path takes it). Token capture's fold of
the engine's own bytes (`tokens.recording.engine_final`, issue 12) takes them at
once the same way."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic_core import from_json, to_json
from llmtraj.apis import API_BY_NAME, ApiShape
from llmtraj.core.chain import decode_events, encode_events
from llmtraj.recording.builder import RecordBuilder
from llmtraj.tokens.recording import engine_final

from .test_recorder import ALL_STREAMS, SSE_HEADERS, T0, expected_for, new_tee


def _recorded(api: ApiShape, chunks: list[bytes], times: list[float], bulk: bool) -> tuple[dict[str, Any], bool]:
    """(the record's fields for `chunks` fed at once, whether the bulk path took them)."""
    taken = []
    whole_stream = RecordBuilder._whole_stream

    def spy(self, chunks, times):
        taken.append(bulk and whole_stream(self, chunks, times))
        return taken[-1]

    tee = new_tee(api=api)
    tee.response_started(200, SSE_HEADERS, now=T0 + 0.1)
    tee._whole_stream = spy.__get__(tee)
    tee.chunks(chunks, times)
    return tee.finish(now=T0 + 5), any(taken)


def _same_both_ways(api: ApiShape, chunks: list[bytes], times: list[float]) -> tuple[dict[str, Any], bool]:
    bulk, taken = _recorded(api, chunks, times, bulk=True)
    general, _ = _recorded(api, chunks, times, bulk=False)
    if bulk["events"]:
        # The bulk path's events also say where they repeat a template's (`slots`, `v`): what they say is
        # true of the raws, and they are stored and read back as the general path's events.
        events = bulk["events"]
        _check_template_values(events)
        plain = [{k: v for k, v in event.items() if k not in ("slots", "v")} for event in events]
        assert decode_events(from_json(to_json(encode_events(events)))) == plain  # (as the store writes and reads)
        bulk = {**bulk, "events": plain}
    assert json.dumps(bulk, sort_keys=False) == json.dumps(general, sort_keys=False)  # also the order of keys
    assert bulk == general
    return bulk, taken


def _check_template_values(events: list[dict[str, Any]]) -> None:
    """Each event with values (`v`) follows its template's event (`slots`) or another such, and is that
    event's raw with the values in the slots."""
    template = None
    for event in events:
        if "v" in event:
            assert template is not None
            raw, slots = template
            starts, ends = [a for a, _ in slots], [0, *(b for _, b in slots)]
            pieces = [raw[a:b] for a, b in zip(ends, [*starts, len(raw)])]
            assert event["raw"] == "".join(piece + value for piece, value in zip(pieces, [*event["v"], ""]))
        else:
            template = (event["raw"], event["slots"]) if "slots" in event else None


def _blocks(data: bytes) -> list[bytes]:
    """The stream's blocks, each with its blank line (LF line ends)."""
    return [block + b"\n\n" for block in data.split(b"\n\n")[:-1]]


@pytest.mark.parametrize(("fixture", "api"), ALL_STREAMS, ids=lambda p: getattr(p, "name", None) or p.name)
@settings(max_examples=max(20, settings.default.max_examples), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(cuts=st.lists(st.floats(0, 1), max_size=30))
def test_every_fixture_in_any_chunking_gives_the_general_paths_record(fixture, api, cuts):
    data = fixture.read_bytes()
    at = sorted({int(c * len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *at], [*at, len(data)])]
    record, _ = _same_both_ways(api, chunks, [T0 + 0.2 + i * 0.0013 for i in range(len(chunks))])
    assert record["response"] == expected_for(fixture)


@pytest.mark.parametrize(("fixture", "api"), ALL_STREAMS, ids=lambda p: getattr(p, "name", None) or p.name)
def test_every_fixture_of_the_usual_shape_is_taken_at_once(fixture, api):
    # An event per chunk, as engines send them: the bulk path must take every fixture that is of its shape
    # (else the comparisons above compare the general path with itself).
    data = fixture.read_bytes()
    usual = b"\r" not in data and all(
        block.startswith((b"data: ", b"event: ")) and block.count(b"\n") == 2 + block.startswith(b"event: ")
        and b"\ndata: " in b"\n" + block for block in _blocks(data)
    ) and data.endswith(b"\n\n")  # fmt: skip
    chunks = _blocks(data) if data.endswith(b"\n\n") else [data]
    record, taken = _same_both_ways(api, chunks, [T0 + 0.2 + i * 0.0013 for i in range(len(chunks))])
    assert taken == usual
    assert record["response"] == expected_for(fixture)
    if usual:
        assert [event["t"] for event in record["events"]] == [round(0.2 + i * 0.0013, 6) for i in range(len(chunks))]


# Generated streams: blocks of the usual shape with data the aggregators fold (and data they do not), mixed
# with blocks of every other shape; any chunking, any times.
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
CHAT = TEXT.map(lambda t: json.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m", "created": 1,
                                      "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]},
                                     ensure_ascii=False))  # fmt: skip
ANTHROPIC = st.sampled_from([
    ("message_start", '{"type":"message_start","message":{"id":"m","type":"message","role":"assistant","content":[],'
                      '"model":"c","stop_reason":null,"usage":{"input_tokens":1,"output_tokens":1}}}'),
    ("content_block_start", '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'),
    ("ping", '{"type":"ping"}'), ("message_stop", '{"type":"message_stop"}'),
]) | TEXT.map(lambda t: ("content_block_delta", json.dumps(
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}, ensure_ascii=False)))
RESPONSES = TEXT.map(lambda t: ("response.output_text.delta", json.dumps(
    {"type": "response.output_text.delta", "item_id": "i", "output_index": 0, "content_index": 0, "delta": t},
    ensure_ascii=False))) | st.just(("response.created", '{"type":"response.created","response":{"id":"r","output":[]}}'))
LINE = TEXT.filter(lambda t: "\n" not in t and "\r" not in t)
ODD_DATA = st.sampled_from(["[DONE]", "", "{", "not json", "[1,2]", "1", '{"error":{"message":"x"}}', "\ufeff{}"]) | LINE
USUAL = st.one_of(
    CHAT.map(lambda d: f"data: {d}\n\n".encode()),
    ANTHROPIC.map(lambda e: f"event: {e[0]}\ndata: {e[1]}\n\n".encode()),
    RESPONSES.map(lambda e: f"event: {e[0]}\ndata: {e[1]}\n\n".encode()),
    ODD_DATA.map(lambda d: f"data: {d}\n\n".encode()),
    st.tuples(LINE, ODD_DATA).map(
        lambda e: f"event: {e[0]}\ndata: {e[1]}\n\n".encode()),
)
OTHER = st.sampled_from([
    b": keep-alive\n\n", b"data: a\ndata: b\n\n", b"data: {}\r\n\r\n", b"data: x\r\r", b"event: \ndata: {}\n\n",
    b"\n", b"data:{}\n\n", b"id: 1\ndata: {}\n\n", b"data: \xff\xfe\n\n", b"data: caf\xc3\n\n", b"retry: 5\n\n",
    b"event: a\n\n", b"data: [DONE]\n\n", b"data: cut",
])  # fmt: skip
STREAM = st.tuples(st.sampled_from([b"", b"\xef\xbb\xbf"]), st.lists(USUAL | OTHER, max_size=12),
                   st.lists(USUAL, max_size=6)).map(lambda s: s[0] + b"".join(s[1]) + b"".join(s[2]))
USUAL_STREAM = st.lists(USUAL, min_size=1, max_size=12)


def _cut(data: bytes, cuts: list[float]) -> list[bytes]:
    at = sorted({int(c * len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *at], [*at, len(data)])]


TIMES = st.lists(st.floats(1.0e9, 2.0e9, allow_nan=False) | st.floats(1.0e-3, 1.0e3), min_size=60, max_size=60)


@pytest.mark.parametrize("api", ["chat.completions", "anthropic.messages", "responses", "completions"])
@settings(max_examples=max(60, settings.default.max_examples), deadline=None)
@given(data=STREAM, cuts=st.lists(st.floats(0, 1), max_size=10), times=TIMES)
@example(data=b"data: {}\n\ndata: [DONE]\n\n", cuts=[], times=[T0] * 60)
def test_any_stream_in_any_chunking_gives_the_general_paths_record(api, data, cuts, times):
    chunks = _cut(data, cuts)
    _same_both_ways(API_BY_NAME[api], chunks, times[: len(chunks)])


@pytest.mark.parametrize("api", ["chat.completions", "anthropic.messages", "responses", "completions"])
@settings(max_examples=max(60, settings.default.max_examples), deadline=None)
@given(data=STREAM | USUAL_STREAM.map(b"".join), cuts=st.lists(st.floats(0, 1), max_size=10))
def test_the_engines_bytes_fold_to_the_general_paths_aggregate(api, data, cuts):
    chunks = _cut(data, cuts)
    record, _ = _recorded(API_BY_NAME[api], chunks, [T0 + 1] * len(chunks), bulk=False)
    assert engine_final(API_BY_NAME[api], chunks, True) == record["response"]


@pytest.mark.parametrize("api", ["chat.completions", "anthropic.messages", "responses"])
@settings(max_examples=max(60, settings.default.max_examples), deadline=None)
@given(blocks=USUAL_STREAM, merge=st.lists(st.booleans(), min_size=12, max_size=12), times=TIMES)
def test_usual_streams_are_taken_at_once_with_each_blocks_time(api, blocks, merge, times):
    # Several blocks per chunk, or one: each event gets the time of the chunk its block ended in.
    chunks = [blocks[0]]
    for block, joined in zip(blocks[1:], merge):
        if joined:
            chunks[-1] += block
        else:
            chunks.append(block)
    record, taken = _same_both_ways(API_BY_NAME[api], chunks, times[: len(chunks)])
    assert taken
    assert "".join(event["raw"] for event in record["events"]).encode() == b"".join(blocks)


def test_a_chunk_with_no_bytes_and_a_time_of_none_change_nothing():
    blocks = [b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n', b"data: [DONE]\n\n"]
    api = API_BY_NAME["chat.completions"]
    _, taken = _same_both_ways(api, [blocks[0], b"", blocks[1]], [T0 + 1, T0 + 2, T0 + 3])
    assert taken
    record, taken = _recorded(api, blocks, [T0 + 1, None], bulk=True)
    assert not taken  # "now": left to the general path
    assert [event["raw"] for event in record["events"]] == [block.decode() for block in blocks]


@pytest.mark.parametrize("odd", [None, 5, 63, 64, 70, 127, 149])
def test_long_streams_with_data_that_is_not_json_give_the_general_paths_record(odd):
    # Blocks of one template, some data among them not JSON (the template dropped there, and made again after).
    blocks = [f'data: {{"id":"c","choices":[{{"index":0,"delta":{{"content":"{i} "}}}}]}}\n\n'.encode()
              for i in range(150)]  # fmt: skip
    if odd is not None:
        blocks[odd] = b"data: [DONE]\n\n" if odd % 2 else b"data: not json\n\n"
    record, taken = _same_both_ways(API_BY_NAME["chat.completions"], [*blocks, b"data: [DONE]\n\n"],
                                    [T0 + 1 + i / 1000 for i in range(151)])  # fmt: skip
    assert taken and len(record["events"]) == 151


def test_chunks_may_be_bytearrays():
    blocks = [b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n', b"data: [DONE]\n\n"]
    api = API_BY_NAME["chat.completions"]
    record, taken = _same_both_ways(api, list(map(bytearray, blocks)), [T0 + 1, T0 + 2])
    assert taken and record == _same_both_ways(api, blocks, [T0 + 1, T0 + 2])[0]
