"""Properties of the version 2 trajectory format: whatever sequence of calls
is written (conversations that grow, are edited in the middle or compacted,
side conversations in the same session, sessions sharing one file, a writer
restarted midway), the reader gives back every request exactly as sent; a
file cut at any byte gives back every whole line before the cut; a line only
ever refers to an earlier line of its own session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmtraj.core.record import CallRecord, Timings
from llmtraj.core.store import TrajectoryError, TrajectoryReader, TrajectoryWriter, read_records

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool"]), "content": TEXT | st.lists(TEXT, max_size=2)}
)
# What happens to one conversation between two of its calls.
STEP = st.one_of(
    st.tuples(st.just("append"), st.lists(MESSAGE, min_size=1, max_size=3)),
    st.tuples(st.just("edit"), st.integers(0, 50), MESSAGE),  # a message in the middle changes
    st.tuples(st.just("compact"), st.integers(0, 50), MESSAGE),  # everything before a point becomes a summary
    st.tuples(st.just("same"), st.none()),  # asked again unchanged (a retry)
)
# A streamed answer's SSE blocks: mostly the same framing around a delta.
DELTA = st.one_of(TEXT, st.sampled_from(["", "a", "é✓", "\n\n", '"quoted"']))
EVENTS = st.none() | st.lists(
    st.one_of(
        DELTA.map(lambda d: 'data: {"id":"c1","choices":[{"delta":{"content":' + json.dumps(d) + '}}]}\n\n'),
        DELTA.map(lambda d: f"event: content_block_delta\ndata: {d}\n\n"),
        TEXT,
    ),
    max_size=8,
)
# One call: which session, which of its conversations, what happened to it,
# which API shape carries it, its stream, and whether the writer restarts before it.
CALL = st.tuples(
    st.sampled_from(["a", "b"]), st.integers(0, 2), STEP, st.sampled_from(["chat", "anthropic", "responses"]),
    EVENTS, st.booleans(),
)


def body(shape: str, conversation: list[dict[str, Any]], n: int) -> dict[str, Any]:
    tools = [{"type": "function", "function": {"name": "run", "parameters": {"type": "object"}}}]
    if shape == "chat":
        return {"model": "m", "messages": conversation, "tools": tools, "stream": n % 2 == 0}
    if shape == "anthropic":
        return {"model": "claude", "system": [{"type": "text", "text": "You are an agent. " * 5}],
                "messages": conversation, "max_tokens": 100 + n % 3}  # fmt: skip
    return {"model": "gpt", "instructions": "Be brief. " * 10, "input": conversation or "hello", "tools": tools}


def evolve(conversation: list[dict[str, Any]], step: tuple) -> list[dict[str, Any]]:
    kind = step[0]
    if kind == "append":
        return conversation + step[1]
    if kind == "edit" and conversation:
        at = step[1] % len(conversation)
        return conversation[:at] + [step[2]] + conversation[at + 1 :]
    if kind == "compact" and conversation:
        at = step[1] % len(conversation)
        return [step[2]] + conversation[at:]
    return conversation


def record(session: str, index: int, request: dict[str, Any], events: list[str] | None) -> CallRecord:
    return CallRecord(
        session=session, index=index, api="chat.completions", mode="record", method="POST",
        url="http://up/v1/chat/completions", request_headers=[("content-type", "application/json")],
        request=request, status=200, response={"choices": []}, timings=Timings(started_at=1.0, ended_at=2.0),
        stream=events is not None, events=None if events is None else [{"t": k / 8, "raw": e} for k, e in enumerate(events)],
    )  # fmt: skip


def write(path: Path, calls: list[tuple]) -> list[CallRecord]:
    """Writes the calls; returns the records sent, in writing order."""
    conversations: dict[tuple[str, int], list[dict[str, Any]]] = {}
    sent: list[CallRecord] = []
    writer = TrajectoryWriter(path)
    for n, (session, which, step, shape, events, restart) in enumerate(calls):
        if restart:
            writer.close()
            writer = TrajectoryWriter(path)
        conversation = conversations[session, which] = evolve(conversations.get((session, which), []), step)
        rec = record(session, writer.next_index(session), body(shape, conversation, n), events)
        writer.append(rec)
        sent.append(json.loads(rec.model_dump_json()))  # a copy: what was sent, not what the writer keeps
    writer.close()
    return sent


def as_sent(records) -> list[dict[str, Any]]:
    return [json.loads(r.model_dump_json()) for r in records]


def only_earlier_references(file: Path) -> None:
    seen: set[tuple[str, int]] = set()
    for line in file.read_bytes().splitlines():
        obj = json.loads(line)
        base = obj.get("request_base")
        if base is not None:
            assert (obj["session"], base["index"]) in seen
        seen.add((obj["session"], obj["index"]))


SETTINGS = settings(max_examples=max(150, settings.default.max_examples), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(calls=st.lists(CALL, min_size=1, max_size=25), single=st.booleans())
def test_every_request_reads_back_as_sent(tmp_path_factory, calls, single):
    root = tmp_path_factory.mktemp("traj")
    path = root / "all.jsonl" if single else root / "dir"
    sent = write(path, calls)
    for v in sent:
        v["schema_version"] = 2
    got = as_sent(read_records(path))
    key = lambda r: (r["session"], r["index"])  # noqa: E731
    assert sorted(got, key=key) == sorted(sent, key=key)
    # one session at a time gives the same
    assert sorted(as_sent(TrajectoryReader(path)), key=key) == sorted(sent, key=key)
    for file in (path,) if single else sorted(path.glob("*.jsonl")):
        only_earlier_references(file)


@SETTINGS
@given(calls=st.lists(CALL, min_size=1, max_size=10), cuts=st.lists(st.floats(0, 1), min_size=1, max_size=20))
def test_a_file_cut_anywhere_reads_back_every_whole_line_before_the_cut(tmp_path_factory, calls, cuts):
    root = tmp_path_factory.mktemp("traj")
    file = root / "all.jsonl"
    write(file, calls)
    data = file.read_bytes()
    whole = as_sent(read_records(file))
    ends = [i for i, byte in enumerate(data) if byte == ord("\n")]  # each line's newline
    cut_file = root / "cut.jsonl"
    for fraction in cuts + [1.0]:
        cut = round(fraction * len(data))
        cut_file.write_bytes(data[:cut])
        # a line is whole when all of its bytes (its newline aside) are before the cut
        expected = sum(1 for end in ends if end <= cut)
        got = as_sent(read_records(cut_file))
        assert got == whole[:expected]


def test_a_reference_to_an_index_on_two_lines_is_refused_not_guessed(tmp_path):
    # Two writers numbering one session in one file (two proxies on one path):
    # the later reference could mean either line.
    file = tmp_path / "t.jsonl"
    first, second = TrajectoryWriter(file), TrajectoryWriter(file)
    first.append(record("s", 1, {"messages": [{"role": "user", "content": "mine"}]}, None))
    second.append(record("s", 1, {"messages": [{"role": "user", "content": "theirs"}]}, None))
    first.append(record("s", 2, {"messages": [{"role": "user", "content": "mine"}, {"role": "user", "content": "more"}]}, None))
    for w in (first, second):
        w.close()
    assert json.loads(file.read_text().splitlines()[2])["request_base"]["index"] == 1
    with pytest.raises(TrajectoryError, match=r"t.jsonl:3: request_base: call 1 is on two lines of this session"):
        list(read_records(file))
    assert [r.request["messages"][0]["content"] for r in read_records(file, tolerate_corrupt=True)] == ["mine", "theirs"]


def _naive_shared(a: str, b: str, limit: int, suffix: bool) -> int:
    n = 0
    while n < limit and (a[len(a) - n - 1] == b[len(b) - n - 1] if suffix else a[n] == b[n]):
        n += 1
    return n


@settings(max_examples=max(500, settings.default.max_examples), deadline=None)
@given(st.text(alphabet="ab", max_size=12), st.text(alphabet="ab", max_size=12), st.integers(0, 14), st.integers(0, 14))
def test_shared_prefix_and_suffix_are_maximal_whatever_the_guess(a, b, guess, cut):
    # Each event is stored against the previous one by the longest shared
    # prefix and suffix; the previous pair's lengths only speed the search up.
    from llmtraj.core.chain import _shared_prefix, _shared_suffix

    limit = min(len(a), len(b), cut)
    assert _shared_prefix(a, b, limit, guess) == _naive_shared(a, b, limit, suffix=False)
    assert _shared_suffix(a, b, limit, guess) == _naive_shared(a, b, limit, suffix=True)


@settings(max_examples=max(300, settings.default.max_examples), deadline=None)
@given(st.lists(st.tuples(st.text(alphabet="ab", max_size=6), st.text(alphabet="abé", max_size=4),
                          st.text(alphabet="ab", max_size=6)), max_size=12),
       st.text(alphabet="ab", min_size=0, max_size=12), st.integers(0, 4))  # fmt: skip
def test_events_are_stored_by_their_longest_shared_prefix_and_suffix(parts, frame, reach):
    # Events of a stream: a shared frame around a changing middle; the lengths one pair had are tried on the next
    # (and the strings of that pair's prefix and suffix reused): whatever they are, each event is stored by the
    # longest prefix it shares with the one before, then the longest suffix in what remains, and read back whole.
    from llmtraj.core.chain import _MIN_SHARED, decode_events, encode_events

    events = [{"t": i, "raw": frame + a + b + c + frame} for i, (a, b, c) in enumerate(parts)]
    near: list[str] = []
    stored = encode_events(events, near, ("c" * (reach + 1),))  # (a start of reach + 1 characters)
    assert decode_events(stored) == events
    previous = ""
    for event, kept, seen in zip(events, stored, near):
        raw = event["raw"]
        limit = min(len(raw), len(previous))
        p = _naive_shared(raw, previous, limit, suffix=False)
        s = _naive_shared(raw, previous, limit - p, suffix=True)
        if p + s >= _MIN_SHARED:
            assert (kept["p"], kept["s"], kept["raw"]) == (p, s, raw[p : len(raw) - s])
            assert seen == raw[max(0, p - reach) : len(raw) - s + reach]
        else:
            assert kept is event and seen == raw
        previous = raw


@settings(max_examples=max(300, settings.default.max_examples), deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.lists(st.text(alphabet='ab"é', max_size=5), min_size=2, max_size=4), st.lists(st.lists(st.text(alphabet='ab"é', max_size=5), min_size=3, max_size=3), max_size=5)),
    st.text(alphabet="ab", max_size=8)), max_size=6), st.booleans())  # fmt: skip
def test_events_of_a_template_are_stored_as_their_values_and_read_back_whole(runs, stray):
    # A stream of template runs (the template's event with its `slots`, then events marked with the values
    # they put there) and other events between them: each marked event is stored as its values alone, and
    # every event reads back whole. A value with no template before it (`stray`) is stored as a raw.
    from llmtraj.core.chain import decode_events, encode_events

    events, values_only = [], 0
    for run in runs:
        if isinstance(run, str):
            after_template = events and ("slots" in events[-1] or "v" in events[-1])
            events.append({"t": len(events), "raw": run, **({"v": ["x"]} if stray and not after_template else {})})
            continue
        around, rows = run
        slots = len(around) - 1
        for row_at, row in enumerate([[""] * slots, *(row[:slots] for row in rows)]):
            raw = "".join(a + v for a, v in zip(around, [*row, ""]))
            event = {"t": len(events), "raw": raw}
            if row_at == 0:
                ends = [sum(map(len, around[: i + 1])) for i in range(slots)]
                event["slots"] = [[end, end] for end in ends]
            else:
                event["v"] = row
                values_only += 1
            events.append(event)
    plain = [{k: v for k, v in event.items() if k not in ("slots", "v")} for event in events]
    stored = encode_events(events)
    assert sum(set(event) == {"t", "v"} for event in stored) == values_only
    assert decode_events(stored) == plain


@pytest.mark.parametrize("events", [
    [{"t": 0, "v": ["a"]}],  # values before any template
    [{"t": 0, "raw": "xay", "slots": [[1, 2]]}, {"t": 1, "v": ["a", "b"]}],  # more values than slots
    [{"t": 0, "raw": "xay", "slots": [[1, 2]]}, {"t": 1, "raw": "q"}, {"t": 2, "v": ["b"]}],  # the run ended
    [{"t": 0, "raw": "xay", "slots": [[2, 1]]}, {"t": 1, "v": ["b"]}],  # a slot that ends before it starts
    [{"t": 0, "raw": "xay", "slots": [[1, 9]]}, {"t": 1, "v": ["b"]}],  # a slot past the raw's end
    [{"t": 0, "raw": "xay", "slots": [[1, 2]]}, {"t": 1, "v": [1]}],  # a value that is not a string
])  # fmt: skip
def test_values_that_fit_no_template_are_refused(events):
    from llmtraj.core.chain import decode_events

    with pytest.raises(ValueError, match="events: "):
        decode_events(events)
