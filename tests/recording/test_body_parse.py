"""The record writer's parse of request bodies reuses the items a session's
earlier bodies held at the same bytes, and gives exactly what a parse of the
whole body gives: the same value, keys in the same order, or the same refusal."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmtraj.core.chain import shared_prefix
from llmtraj.recording import body_parse, capture
from llmtraj.recording.body_parse import RequestBodies
from llmtraj.recording.capture import BodyPieces
from pydantic_core import from_json, to_json

ITEMS = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=20)}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": st.lists(st.dictionaries(
        st.sampled_from(["type", "text", "messages", "input", "a]b", "{"]), st.one_of(st.text(max_size=8), st.integers()),
        max_size=3), max_size=2)}),  # fmt: skip
    st.text(max_size=12),  # ("]", ",", quotes, "messages" itself)
    st.integers(),
    st.lists(st.integers(), max_size=3),
)
STYLES = [(",", ":"), (", ", ": "), (" ,\n", " :\t")]


def as_body(value: dict, style: tuple[str, str], ascii_only: bool) -> bytes:
    return json.dumps(value, separators=style, ensure_ascii=ascii_only).encode()


def same_parse(bodies: RequestBodies, session: str, body: bytes, given=None, repeats=None) -> object:
    """`given`: what to hand the parse instead of `body` (its pieces). The value parsed, or None."""
    given = body if given is None else given
    try:
        expected = from_json(body)
    except ValueError:
        with pytest.raises(ValueError):
            bodies.parse(session, given, repeats)
        return None
    value = bodies.parse(session, given, repeats)
    assert to_json(value) == to_json(expected), body  # (to_json: the keys' order too)
    return value


def held(value: object) -> tuple[object, dict[str, int], bytes]:
    """What a holder of a parsed value keeps (as the store's chain tips do):
    the value, the lengths of its lists, and its JSON then."""
    lengths = {k: len(v) for k, v in value.items() if isinstance(v, list)} if isinstance(value, dict) else {}
    return value, lengths, to_json(value)


def still_whole(holders: list[tuple[object, dict[str, int], bytes]]) -> None:
    """Every holder reads what it held: its lists' own first items are as they were
    (a later body may have appended to a list, never changed what was in it)."""
    for value, lengths, then in holders:
        if isinstance(value, dict):
            value = {k: v[: lengths[k]] if k in lengths else v for k, v in value.items()}
        assert to_json(value) == then


@settings(max_examples=max(300, settings.default.max_examples), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(
    st.sampled_from(["append", "append", "append", "edit", "cut", "other key", "side", "twice", "escaped", "trailing comma",
                     "torn", "first"]),
    st.lists(ITEMS, min_size=1, max_size=3), st.sampled_from(STYLES), st.booleans(), st.randoms(use_true_random=False),
), min_size=1, max_size=14))  # fmt: skip
@pytest.mark.parametrize("as_deltas", [False, True])
def test_a_session_s_bodies_parse_as_they_do_whole(monkeypatch, as_deltas, steps):
    """`as_deltas`: each body given as the record writer has it, the pieces of
    the previous body it repeats then its new bytes, with how much repeats."""
    monkeypatch.setattr(body_parse, "MIN_BODY", 0)  # every body takes the reusing path
    monkeypatch.setattr(capture, "_JOINED", 0)  # (every delta's new bytes a piece of their own)
    bodies = RequestBodies()
    previous = None
    holders = []
    main: list = [{"role": "system", "content": "be brief"}]
    side: list = []
    for what, items, style, ascii_only, rnd in steps:
        conversation = side if what == "side" else main
        if what == "edit" and conversation:
            conversation[rnd.randrange(len(conversation))] = items[0]
        elif what == "cut":
            del conversation[rnd.randrange(len(conversation) + 1) :]
        elif what != "trailing comma":
            conversation.extend(items)
        value = {"model": "m", "messages": conversation, "stream": True}
        if what == "other key":
            value = {"tools": [1, 2], **value, "temperature": rnd.random()}
        elif what == "first":
            value = {"messages": conversation, "model": "m"}
        elif what == "trailing comma":  # the items before the last, and a comma after them
            value = {**value, "messages": [*conversation[:-1], "@end"]}
        body = as_body(value, style, ascii_only)
        if what == "twice":  # the last "messages" counts
            body = body[:-1] + b', "messages": [1, 2]}'
        elif what == "escaped":
            body = body[:-1] + b', "m\\u0065ssages": []}'
        elif what == "trailing comma":
            body = body.replace(b'"@end"', b"")
        elif what == "torn":
            body = body[: rnd.randrange(len(body))]
        if not as_deltas:
            holders.append(held(same_parse(bodies, "s", body)))
        else:
            shared = shared_prefix(bytes(previous), body) if previous is not None else 0
            given = BodyPieces.after(previous, shared, body[shared:]) if shared else BodyPieces([body])
            holders.append(held(same_parse(bodies, "s", body, given, (previous, shared) if shared else None)))
            previous = given
        still_whole(holders)


def test_a_long_conversation_reuses_what_it_repeats(monkeypatch):
    """Only what precedes the array and what follows its repeated items is
    parsed: a body whose repeated part the parser could not take apart would be
    parsed whole again (not here). The conversation outgrows the tools, which
    were the longest array at first."""
    whole = []
    monkeypatch.setattr(body_parse, "from_json", lambda data: whole.append(len(data)) or from_json(data))
    bodies = RequestBodies()
    tools = [{"name": f"tool{i}", "description": "does things " * 300} for i in range(20)]
    messages = [{"role": "system", "content": "be brief"}]
    for turn in range(60):
        messages += [{"role": "user", "content": f"turn {turn} " + "tool output line " * 200}, {"role": "assistant", "content": "ok"}]
        body = json.dumps({"model": "m", "tools": tools, "messages": messages, "stream": False}).encode()
        assert bodies.parse("s", body) == json.loads(body)
    head = len(json.dumps({"model": "m", "tools": tools}))  # (what precedes the array is parsed each time)
    assert len(body) > 3 * head and max(whole[-10:]) < head + 10_000  # the last calls parsed a few KB more each


@settings(max_examples=max(30, settings.default.max_examples // 3), deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "append", "edit", "cut", "side"]), st.integers(0, 10**6)),
                min_size=2, max_size=8))  # fmt: skip
def test_records_of_reused_parses_read_back_as_sent(tmp_path_factory, steps):
    """Through the writer's path (record, secret scan, version 2 chain), with
    bodies large enough to be reused: every request reads back whole."""
    from llmtraj.core.store import TrajectoryWriter, read_records
    from llmtraj.recording.capture import CallCapture
    from llmtraj.recording.secret_scan import SecretFieldScan
    from llmtraj.recording.writer import record_of

    path = tmp_path_factory.mktemp("traj")
    writer, scan, bodies = TrajectoryWriter(path), SecretFieldScan(), RequestBodies()
    main = [{"role": "system", "content": "be brief " * 4000}]
    side = [{"role": "user", "content": "a title, please " * 3000}]
    sent = []
    for index, (what, n) in enumerate(steps, start=1):
        conversation = side if what == "side" else main
        if what == "edit":
            conversation[n % len(conversation)] = {"role": "user", "content": f"edited {n}", "api_key": "k" * (n % 2)}
        elif what == "cut":
            del conversation[1 + n % len(conversation) :]
        else:
            conversation += [{"role": "user", "content": f"{n} " + "tool output " * (n % 3000)}, {"role": "assistant", "content": "ok"}]
        body = json.dumps({"model": "m", "messages": conversation}).encode()
        sent.append(json.loads(body))
        capture = CallCapture(
            api="chat.completions", session="s", index=index, mode="record", method="POST", url="http://u/v1/chat/completions",
            request_headers=[], request_body=body, started_at=1.0, status=200, response_headers=[(b"content-type", b"application/json")],
            response_headers_at=1.0, chunks=[b'{"choices": []}'], chunk_times=[1.0], ended_at=1.0,
        )  # fmt: skip
        writer.append(*record_of(capture, None, scan, bodies))
    writer.close()
    back = [r.request for r in read_records(path)]
    assert [json.dumps(r) for r in back] == [json.dumps(redacted(r)) for r in sent]


def redacted(request: dict) -> dict:
    from llmtraj.core.redact import redact_fields

    return redact_fields(request)


def test_a_list_extended_in_place_reads_back_for_every_holder(tmp_path):
    """A body that repeats every item of the session's previous one appends its
    own to that body's list instead of copying it (the writer's work per call
    does not grow with the conversation); the earlier parses and the store's
    chain tips holding that list read only their own items. Through the
    writer's path, after in-place extensions: a side conversation that extends
    the main one's last body, the main one going on, an edit in the middle, a
    branch back to an older body, and a return to the side conversation: every
    request reads back as sent."""
    from llmtraj.core.store import TrajectoryWriter, read_records
    from llmtraj.recording.capture import CallCapture
    from llmtraj.recording.secret_scan import SecretFieldScan
    from llmtraj.recording.writer import record_of

    system = {"role": "system", "content": "be brief " * 5000}  # (above MIN_BODY: the bodies are reused)

    def turns(count: int, first: int = 0, topic: str = "main") -> list[dict]:
        return [{"role": "user", "content": f"{topic} {i}"} for i in range(first, first + count)]

    title = [{"role": "user", "content": "a title, please"}]
    edited = [system, *turns(2), {"role": "user", "content": "edited"}, *turns(3, 3)]
    steps = [  # (the conversation, whether its list is the previous call's, appended to)
        ([system, *turns(1)], False), ([system, *turns(2)], True), ([system, *turns(3)], True),
        ([system, *turns(3), *title], True),  # a side call repeating all of main's: main's list, appended to
        ([system, *turns(4)], False),  # main again: a copy (the side call holds the list beyond main's items)
        ([system, *turns(5)], True), ([system, *turns(6)], True),
        (edited, False), ([*edited, *turns(1, 6)], True),
        ([system, *turns(5), *turns(1, topic="retry")], False),  # back to the 5-turn body, another 6th turn
        ([system, *turns(3), *title, {"role": "assistant", "content": "A title"}], False),  # the side call goes on
        ([system, *turns(3), *title, {"role": "assistant", "content": "A title"}, *turns(1, topic="more")], True),
    ]  # fmt: skip
    writer, scan, bodies = TrajectoryWriter(tmp_path), SecretFieldScan(), RequestBodies()
    previous, previous_bytes, previous_list, sent = None, b"", None, []
    for index, (conversation, in_place) in enumerate(steps, start=1):
        whole = json.dumps({"model": "m", "messages": conversation, "stream": True}).encode()
        sent.append(json.loads(whole))
        shared = shared_prefix(previous_bytes, whole) if previous is not None else 0
        body = BodyPieces.after(previous, shared, whole[shared:]) if shared else BodyPieces([whole])
        call = CallCapture(
            api="chat.completions", session="s", index=index, mode="record", method="POST", url="http://u/v1/chat/completions",
            request_headers=[], request_body=body, started_at=1.0, status=200, response_headers=[(b"content-type", b"application/json")],
            response_headers_at=1.0, chunks=[b'{"choices": []}'], chunk_times=[1.0], ended_at=1.0,
        )  # fmt: skip
        fields, secrets, request_json = record_of(call, None, scan, bodies, (previous, shared) if shared else None)
        assert (fields["request"]["messages"] is previous_list) == in_place, index
        writer.append(fields, secrets, request_json)
        previous, previous_bytes, previous_list = body, whole, fields["request"]["messages"]
    writer.close()
    assert [r.request for r in read_records(tmp_path)] == sent
