"""Properties of the stream aggregators (issue 15), with hypothesis: on any
valid stream of each API shape, fed to the SSE parser in any chunks, our
aggregator ends with what the API's own SDK accumulates from the same events,
and with the answer the stream was made from.

- chat completions: 1-3 interleaved choices with text, reasoning, parallel
  tool calls, logprobs, a usage chunk (openai's ChatCompletionStreamState);
- Anthropic Messages: text with citations, thinking with its signature,
  redacted thinking, tool_use with its input in input_json fragments, pings,
  and cut after any event (anthropic's accumulate_event, json_bufs on 2.x);
- Responses: message, reasoning and function_call items, part by part
  (openai's ResponseStreamState: its final response, and its snapshot at any
  cut before the end).

Legacy text completions, which the openai SDK does not accumulate, against
the answer the stream was made from (1-3 choices, logprobs, usage).

Streams are framed with LF, CRLF or CR line ends and keep-alive comments.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmtraj.apis.anthropic_messages import AnthropicMessageAggregator
from llmtraj.apis.base import StreamAggregator
from llmtraj.apis.chat_completions import ChatCompletionAggregator
from llmtraj.apis.completions import TextCompletionAggregator
from llmtraj.apis.responses import ResponsesAggregator
from llmtraj.core.sse import SSEBlock, SSEParser
from openai import omit
from openai._models import construct_type
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from ..streams import blocks_of
from .test_anthropic_messages import same_as_sdk
from .test_anthropic_messages import sdk_accumulate as anthropic_sdk
from .test_chat_aggregate import canon
from .test_responses_api import without_parsed
from .test_chat_aggregate import sdk_accumulate as chat_sdk
from .test_responses_api import without_parsed

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from('"\\\n{}é杭🙂'),
               min_size=1, max_size=20)  # fmt: skip
IDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=4, max_size=10)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**9, 10**9) | TEXT,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                           max_leaves=8)  # fmt: skip
TOOL_INPUT = st.dictionaries(st.sampled_from(["command", "path", "q", "n", "é", "a\"b"]), JSON_VALUES, max_size=3)
# Framing: the line end of the whole stream, and where keep-alive comments go.
FRAMING = st.tuples(st.sampled_from(["\n", "\r\n", "\r"]), st.lists(st.integers(0, 60), max_size=3))
CUTS = st.lists(st.floats(0, 1), max_size=12)


@st.composite
def pieces(draw, text: str) -> list[str]:
    """`text` cut into the fragments a stream sends it in (an empty first one at times)."""
    at = sorted(set(draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=5)))) if len(text) > 1 else []
    out = [text[a:b] for a, b in zip([0, *at], [*at, len(text)])]
    return [""] + out if draw(st.booleans()) else out


def framed(events: list[tuple[str | None, str]], framing: tuple[str, list[int]]) -> bytes:
    """SSE bytes of (event name or None, data) pairs."""
    end, pings = framing
    blocks = [(f"event: {name}{end}" if name else "") + f"data: {data}{end}{end}" for name, data in events]
    for at in sorted(pings, reverse=True):
        blocks.insert(min(at, len(blocks)), f": keep-alive{end}{end}")
    return "".join(blocks).encode()


def fold_chunks(aggregator: StreamAggregator, data: bytes, cuts: list[float]) -> StreamAggregator:
    """`data` fed to a parser in the chunks `cuts` make, each block folded in as it comes."""
    parser = SSEParser()
    at = sorted({round(c * len(data)) for c in cuts})
    for a, b in zip([0, *at], [*at, len(data)]):
        for block in parser.feed(data[a:b]):
            aggregator.add(block)
    for block in parser.finish():
        aggregator.add(block)
    return aggregator


def named(events: list[dict[str, Any]], framing) -> bytes:
    """SSE bytes of events each named by its type (`event:` lines, as Anthropic and Responses send them)."""
    return framed([(e["type"], json.dumps(e, ensure_ascii=False)) for e in events], framing)


def folded_to(aggregator: StreamAggregator, events: list[dict[str, Any]], final: dict[str, Any], framing, cuts) -> bytes:
    """Feeds the named events to `aggregator` in the chunks `cuts` make and
    checks it ends with `final`, cleanly; returns the stream's bytes."""
    data = named(events, framing)
    fold_chunks(aggregator, data, cuts)
    assert aggregator.problems == [] and aggregator.done
    assert aggregator.result() == final
    return data


def events_of(blocks: list[SSEBlock]) -> list[SSEBlock]:
    return [block for block in blocks if block.data is not None]


def interleaved(draw, head: dict[str, Any], queues: list[list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], Any]:
    """Chunks taking each choice's steps in order, the choices interleaved
    (several in a chunk at times), then perhaps a usage chunk; and the usage."""
    chunks = []
    while any(queues):
        live = [i for i in range(len(queues)) if queues[i]]
        together = draw(st.lists(st.sampled_from(live), min_size=1, max_size=len(live), unique=True))
        chunks.append({**head, "choices": [{"index": i, **queues[i].pop(0)} for i in sorted(together)]})
    usage = None
    if draw(st.booleans()):
        prompt, completion = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        chunks.append({**head, "choices": [], "usage": usage})
    return chunks, usage


def folded_chunks(aggregator: StreamAggregator, chunks: list[dict[str, Any]], framing, cuts) -> tuple[dict[str, Any], bytes]:
    """Feeds the chunks, then [DONE], to `aggregator` in the pieces `cuts`
    make; (its result, which came cleanly, and the stream's bytes)."""
    data = framed([(None, json.dumps(chunk, ensure_ascii=False)) for chunk in chunks] + [(None, "[DONE]")], framing)
    fold_chunks(aggregator, data, cuts)
    assert aggregator.problems == [] and aggregator.done
    return aggregator.result(), data


# ----------------------------------------------------------- chat completions


@st.composite
def chat_streams(draw) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Chunks of a chat-completion stream, and the answer (in `canon` form)."""
    n = draw(st.integers(1, 3))
    head = {"id": "chatcmpl-" + draw(IDS), "object": "chat.completion.chunk", "created": 1700000000, "model": "gen-1"}
    steps, truth = [], []
    for i in range(n):
        reasoning = draw(st.none() | TEXT)
        content = draw(st.none() | TEXT)
        with_logprobs = content is not None and draw(st.booleans())
        mine = [{"delta": {"role": "assistant", "content": "" if content is not None else None}, "finish_reason": None}]
        for piece in draw(pieces(reasoning)) if reasoning else []:
            mine.append({"delta": {"reasoning_content": piece}, "finish_reason": None})
        entries = []
        for piece in draw(pieces(content)) if content is not None else []:
            step = {"delta": {"content": piece}, "finish_reason": None}
            if with_logprobs:
                entry = {"token": piece, "logprob": -draw(st.floats(0, 20)), "bytes": list(piece.encode()), "top_logprobs": []}
                entries.append(entry)
                step["logprobs"] = {"content": [entry], "refusal": None}
            mine.append(step)
        calls = []
        for j, arguments in enumerate(draw(st.lists(TOOL_INPUT.map(json.dumps), max_size=3))):
            call = {"id": f"call_{i}_{j}_" + draw(IDS), "type": "function", "name": f"tool_{j}", "arguments": arguments}
            calls.append(call)
            opening = {"index": j, "id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": ""}}
            mine.append({"delta": {"tool_calls": [opening]}, "finish_reason": None})
            for piece in draw(pieces(arguments)):
                mine.append({"delta": {"tool_calls": [{"index": j, "function": {"arguments": piece}}]}, "finish_reason": None})
        finish = "tool_calls" if calls else draw(st.sampled_from(["stop", "length", "content_filter"]))
        mine.append({"delta": {}, "finish_reason": finish})
        steps.append(mine)
        truth.append({"index": i, "role": "assistant", "content": content, "reasoning_content": reasoning, "refusal": None,
                      "tool_calls": calls, "finish_reason": finish, "logprobs": entries or None})  # fmt: skip
    # The first chunk opens every choice in order (the SDK appends choices as
    # they come), the rest interleave, several choices in a chunk at times.
    rest, usage = interleaved(draw, head, [s[1:] for s in steps])
    chunks = [{**head, "choices": [{"index": i, **steps[i][0]} for i in range(n)]}, *rest]
    return chunks, {"id": head["id"], "model": head["model"], "choices": truth, "usage": usage}


@SETTINGS
@given(chat_streams(), FRAMING, CUTS)
def test_chat_aggregate_is_the_openai_sdk_accumulation(stream, framing, cuts):
    chunks, truth = stream
    ours, data = folded_chunks(ChatCompletionAggregator(), chunks, framing, cuts)
    assert canon(ours) == truth
    assert canon(chat_sdk(blocks_of(data))) == truth


# ---------------------------------------------------------- text completions


@st.composite
def text_completion_streams(draw) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Chunks of a legacy completion stream, and the answer: per choice its
    text joined, its logprobs lists extended, its last finish reason."""
    n = draw(st.integers(1, 3))
    head = {"id": "cmpl-" + draw(IDS), "object": "text_completion", "created": 1700000000, "model": "gen-1"}
    steps, truth = [], []
    for i in range(n):
        text = draw(TEXT)
        with_logprobs = draw(st.booleans())
        logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} if with_logprobs else None
        mine, offset = [], 0
        for piece in draw(pieces(text)):
            step = {"text": piece, "logprobs": None, "finish_reason": None}
            if with_logprobs:
                lp = -draw(st.floats(0, 20))
                step["logprobs"] = {"tokens": [piece], "token_logprobs": [lp], "top_logprobs": [{piece: lp}], "text_offset": [offset]}
                for key, values in step["logprobs"].items():
                    logprobs[key] += values
            offset += len(piece)
            mine.append(step)
        finish = draw(st.sampled_from(["stop", "length"]))
        mine.append({"text": "", "logprobs": None, "finish_reason": finish})
        steps.append(mine)
        truth.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish})
    chunks, usage = interleaved(draw, head, steps)
    return chunks, {**head, "choices": truth, "usage": usage}


@SETTINGS
@given(text_completion_streams(), FRAMING, CUTS)
def test_text_completion_aggregate_is_the_answer_streamed(stream, framing, cuts):
    chunks, truth = stream
    assert folded_chunks(TextCompletionAggregator(), chunks, framing, cuts)[0] == truth


# -------------------------------------------------------- Anthropic Messages

CITATION = st.builds(
    lambda text, start, title: {"type": "char_location", "cited_text": text, "document_index": 0,
                                "document_title": title, "start_char_index": start, "end_char_index": start + len(text)},
    TEXT, st.integers(0, 1000), st.none() | TEXT,
)  # fmt: skip


@st.composite
def anthropic_block(draw, index: int) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(content_block_start's block, its deltas, the block as the message ends with it)."""
    kind = draw(st.sampled_from(["text", "text_cited", "thinking", "redacted_thinking", "tool_use"]))
    if kind.startswith("text"):
        text = draw(TEXT)
        deltas = [{"type": "text_delta", "text": piece} for piece in draw(pieces(text))]
        final = {"type": "text", "text": text}
        start = {"type": "text", "text": ""}
        if kind == "text_cited":
            citations = draw(st.lists(CITATION, min_size=1, max_size=3))
            places = sorted(draw(st.lists(st.integers(0, len(deltas)), min_size=len(citations), max_size=len(citations))))
            for place, citation in reversed(list(zip(places, citations))):  # in order, each after some of the text
                deltas.insert(place, {"type": "citations_delta", "citation": citation})
            start["citations"] = []
            final["citations"] = citations
        return start, deltas, final
    if kind == "thinking":
        thinking, signature = draw(TEXT), draw(IDS)
        deltas = [{"type": "thinking_delta", "thinking": piece} for piece in draw(pieces(thinking))]
        deltas.append({"type": "signature_delta", "signature": signature})
        return {"type": "thinking", "thinking": "", "signature": ""}, deltas, {"type": "thinking", "thinking": thinking, "signature": signature}
    if kind == "redacted_thinking":
        block = {"type": "redacted_thinking", "data": draw(IDS)}
        return block, [], block
    tool_input = draw(TOOL_INPUT)
    start = {"type": "tool_use", "id": f"toolu_{index}_" + draw(IDS), "name": draw(st.sampled_from(["Bash", "read", "é"])), "input": {}}
    deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in draw(pieces(json.dumps(tool_input)))]
    return start, deltas, {**start, "input": tool_input}


@st.composite
def anthropic_streams(draw) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Events of a Messages stream, and the message it makes."""
    usage = {"input_tokens": draw(st.integers(0, 10**6)), "output_tokens": 1}
    if draw(st.booleans()):
        usage |= {"cache_creation_input_tokens": draw(st.integers(0, 10**5)), "cache_read_input_tokens": draw(st.integers(0, 10**5))}
    message = {"id": "msg_" + draw(IDS), "type": "message", "role": "assistant", "model": "claude-gen", "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": usage}  # fmt: skip
    events = [{"type": "message_start", "message": message}]
    content = []
    for index in range(draw(st.integers(0, 4))):
        start, deltas, final = draw(anthropic_block(index))
        events.append({"type": "content_block_start", "index": index, "content_block": start})
        events += [{"type": "content_block_delta", "index": index, "delta": delta} for delta in deltas]
        events.append({"type": "content_block_stop", "index": index})
        content.append(final)
    stop_reason = "tool_use" if any(b["type"] == "tool_use" for b in content) else draw(st.sampled_from(["end_turn", "max_tokens", "stop_sequence"]))
    stop_sequence = draw(TEXT) if stop_reason == "stop_sequence" else None
    output_tokens = draw(st.integers(1, 10**5))
    events.append({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                   "usage": {"output_tokens": output_tokens}})  # fmt: skip
    events.append({"type": "message_stop"})
    for at in draw(st.lists(st.integers(1, len(events) - 1), max_size=2)):
        events.insert(at, {"type": "ping"})
    final = {**message, "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
             "usage": {**usage, "output_tokens": output_tokens}}  # fmt: skip
    return events, final


@SETTINGS
@given(anthropic_streams(), FRAMING, CUTS)
def test_anthropic_aggregate_is_the_anthropic_sdk_accumulation(stream, framing, cuts):
    events, final = stream
    data = folded_to(AnthropicMessageAggregator(), events, final, framing, cuts)
    assert same_as_sdk(final, anthropic_sdk(blocks_of(data)))


@SETTINGS
@given(anthropic_streams(), st.data())
def test_anthropic_stream_cut_after_any_event_is_what_the_sdk_has_then(stream, data):
    events, _ = stream
    cut = data.draw(st.integers(1, len(events)), label="events kept")
    blocks = blocks_of(named(events[:cut], ("\n", [])))
    ours = fold_chunks(AnthropicMessageAggregator(), b"".join(b.raw for b in blocks), [])
    assert same_as_sdk(ours.result(), anthropic_sdk(blocks))


# ------------------------------------------------------------------ Responses


@st.composite
def responses_item(draw, index: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the events that stream one output item, the item as done)."""
    kind = draw(st.sampled_from(["message", "reasoning", "function_call"]))
    item_id = f"{kind[:2]}_{index}_" + draw(IDS)
    at = {"output_index": index, "item_id": item_id}
    events: list[dict[str, Any]] = []
    if kind == "function_call":
        arguments = json.dumps(draw(TOOL_INPUT))
        item = {"type": "function_call", "id": item_id, "call_id": f"call_{index}_" + draw(IDS), "name": draw(st.sampled_from(["shell", "é"])),
                "arguments": arguments, "status": "completed"}  # fmt: skip
        events.append({"type": "response.output_item.added", "output_index": index, "item": {**item, "arguments": "", "status": "in_progress"}})
        events += [{"type": "response.function_call_arguments.delta", **at, "delta": piece} for piece in draw(pieces(arguments))]
        events.append({"type": "response.function_call_arguments.done", **at, "arguments": arguments})
    else:
        message = kind == "message"
        parts_key, part_type = ("content", "output_text") if message else ("summary", "summary_text")
        events_of_part = "response.content_part" if message else "response.reasoning_summary_part"
        text_events = "response.output_text" if message else "response.reasoning_summary_text"
        index_key = "content_index" if message else "summary_index"
        item = {"type": kind, "id": item_id, parts_key: []}
        if message:
            item |= {"role": "assistant", "status": "completed"}
        elif draw(st.booleans()):
            item["encrypted_content"] = draw(IDS)
        added = {**item, parts_key: [], **({"status": "in_progress"} if message else {})}
        events.append({"type": "response.output_item.added", "output_index": index, "item": added})
        for part_index, text in enumerate(draw(st.lists(TEXT, min_size=1 if message else 0, max_size=2))):
            part = {"type": part_type, "text": text} | ({"annotations": [], "logprobs": []} if message else {})
            events.append({"type": f"{events_of_part}.added", **at, index_key: part_index, "part": {**part, "text": ""}})
            for piece in draw(pieces(text)):
                events.append({"type": f"{text_events}.delta", **at, index_key: part_index, "delta": piece}
                              | ({"logprobs": []} if message else {}))  # fmt: skip
            events.append({"type": f"{text_events}.done", **at, index_key: part_index, "text": text}
                          | ({"logprobs": []} if message else {}))  # fmt: skip
            events.append({"type": f"{events_of_part}.done", **at, index_key: part_index, "part": part})
            item[parts_key].append(part)
    events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    return events, item


@st.composite
def responses_streams(draw) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Events of a Responses stream (sequence numbers in order), and the final response."""
    response = {"id": "resp_" + draw(IDS), "object": "response", "created_at": 1700000000, "model": "gpt-gen",
                "status": "in_progress", "output": [], "usage": None, "parallel_tool_calls": True, "tool_choice": "auto",
                "tools": [], "error": None, "incomplete_details": None}  # fmt: skip
    events = [{"type": "response.created", "response": response}]
    if draw(st.booleans()):
        events.append({"type": "response.in_progress", "response": response})
    output = []
    for index in range(draw(st.integers(0, 4))):
        item_events, item = draw(responses_item(index))
        events += item_events
        output.append(item)
    tokens = draw(st.integers(0, 10**6))
    usage = {"input_tokens": tokens, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 7,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": tokens + 7}  # fmt: skip
    final = {**response, "status": "completed", "output": output, "usage": usage}
    events.append({"type": "response.completed", "response": final})
    for number, event in enumerate(events):
        event["sequence_number"] = number
    return events, final


def sdk_state(blocks: list[SSEBlock]) -> ResponseStreamState:
    """openai's ResponseStreamState (what `client.responses.stream()` folds
    with) after the events of `blocks`, built as the SDK builds them."""
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    for block in events_of(blocks):
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=json.loads(block.data)))
    return state


def sdk_view(item: dict[str, Any]) -> dict[str, Any]:
    """What the SDK's snapshot follows of an item: its identity, the text of a
    message's parts, a function call's arguments (a reasoning item stays as
    announced)."""
    view = {"type": item["type"], "id": item["id"]}
    if item["type"] == "message":
        view["texts"] = [part["text"] for part in item["content"]]
    elif item["type"] == "function_call":
        view |= {"name": item["name"], "call_id": item["call_id"], "arguments": item["arguments"]}
    return view


@SETTINGS
@given(responses_streams(), FRAMING, CUTS)
def test_responses_aggregate_is_the_openai_sdk_final_response(stream, framing, cuts):
    events, final = stream
    data = folded_to(ResponsesAggregator(), events, final, framing, cuts)
    completed = sdk_state(blocks_of(data))._completed_response
    assert completed is not None and without_parsed(completed.to_dict()) == final


@SETTINGS
@given(responses_streams(), st.data())
def test_responses_stream_cut_before_its_end_is_what_the_sdk_snapshot_has(stream, data):
    events, _ = stream
    cut = data.draw(st.integers(1, len(events) - 1), label="events kept")
    blocks = blocks_of(named(events[:cut], ("\n", [])))
    ours = fold_chunks(ResponsesAggregator(), b"".join(b.raw for b in blocks), []).result()
    snapshot = sdk_state(blocks)._ResponseStreamState__current_snapshot  # what its events' `snapshot`s come from
    # item by item: the whole snapshot's to_dict() warns of its own generic item types
    assert [sdk_view(item) for item in ours["output"]] == [sdk_view(item.to_dict()) for item in snapshot.output]
    assert (ours["id"], ours["status"], ours["model"]) == (snapshot.id, snapshot.status, snapshot.model)
