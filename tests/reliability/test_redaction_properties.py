"""Properties of redaction (issue 15), with hypothesis: whatever the record and
whatever the secret (JSON punctuation, quotes, escapes, a field's name), every
line written is valid JSON, no secret survives anywhere in it (in the bytes or
in any string read back), and the record keeps its structure: the same keys,
types and list lengths, each string that held no secret unchanged. Bodies come
as the agent spelled them too (`\\u` escapes, `\\/`), and calls chain
(later requests stored as references to earlier ones).

The quick profile runs in the default suite; `scripts/properties` runs the
long one (LLM_TRAJ_PROPERTIES=long)."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmtraj.core.record import CallRecord
from llmtraj.core.redact import REDACTED, Scrubber, looks_like_credential
from llmtraj.core.store import TrajectoryWriter, read_records

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _field_names(schema: Any) -> set[str]:
    """Every field name of the record model, nested ones too."""
    if isinstance(schema, dict):
        names = set(schema["properties"]) if isinstance(schema.get("properties"), dict) else set()
        return names.union(*(_field_names(v) for v in schema.values()))
    if isinstance(schema, list):
        return set().union(*(_field_names(v) for v in schema))
    return set()


# The record's own field names: redaction scrubs values, never the keys of the record's structure, so a
# "secret" that is part of one (`aw_base6`, of `raw_base64`) would survive by design, not by a fault.
FIELD_NAMES = _field_names(CallRecord.model_json_schema())
# Secrets: printable ASCII with a digit, JSON punctuation and escapes welcome.
SECRET = st.text(alphabet=string.ascii_letters + string.digits + '"\\{}[]:,/-_.= ', min_size=8, max_size=24).filter(
    lambda s: looks_like_credential(s) and not any(s in name for name in FIELD_NAMES))
PLAIN = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
KEYS = st.sampled_from(["model", "messages", "content", "role", "index", "api", "x", "tools", "n"])


def strings_with(secrets: list[str]):
    """Text that holds a secret (or a piece of one) somewhere, or none."""
    piece = st.one_of(PLAIN, st.sampled_from(secrets), st.sampled_from(secrets).map(lambda s: s[: len(s) // 2]))
    return st.lists(piece, max_size=4).map("".join)


def json_values(secrets: list[str]):
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                       strings_with(secrets))
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(KEYS, inner, max_size=4)), max_leaves=20)


def spelled(value: Any, escape: bool) -> str:
    """JSON as an agent might spell it: every character of every string as a
    `\\u` escape, and `/` as `\\/`."""
    if not escape:
        return json.dumps(value)
    if isinstance(value, str):
        return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else json.dumps(c)[1:-1] for c in value) + '"'
    if isinstance(value, list):
        return "[" + ",".join(spelled(v, escape) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{spelled(k, escape)}:{spelled(v, escape)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def record_fields(index: int, request: Any, response: Any, events: list[str], text: str) -> dict[str, Any]:
    return {
        "schema_version": 2, "session": "s", "index": index, "api": "chat.completions", "mode": "record",
        "method": "POST", "url": "http://u/v1/chat/completions?key=" + text.replace("&", ""),
        "request_headers": [["authorization", REDACTED], ["x-note", text]], "request": request, "request_raw": None,
        "status": 200, "response_headers": [["content-type", "text/event-stream"]], "stream": bool(events),
        "response": response, "response_raw": None, "events": [{"t": 0.1 * i, "raw": e} for i, e in enumerate(events)] or None,
        "complete": True, "error": None, "problems": [text], "timings": {"started_at": 1.0, "ended_at": 2.0},
        "upstream": None, "prompt": None, "extra": {"note": text}, "tokens": None, "capture": None,
    }  # fmt: skip


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys, types, lengths; strings as `str`."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [shape(v) for v in value]
    return "str" if isinstance(value, str) else type(value).__name__


def strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)


def unchanged_where_clean(before: Any, after: Any, secrets: list[str]) -> None:
    if isinstance(before, str):
        if not any(s in before for s in secrets) and not Scrubber().may_hold_text(before):
            assert after == before
    elif isinstance(before, dict):
        for k in before:
            unchanged_where_clean(before[k], after[k], secrets)
    elif isinstance(before, list):
        for b, a in zip(before, after, strict=True):
            unchanged_where_clean(b, a, secrets)


@st.composite
def calls(draw):
    secrets = draw(st.lists(SECRET, min_size=1, max_size=2, unique=True))
    values = json_values(secrets)
    conversation: list[Any] = []
    out = []
    for index in range(1, draw(st.integers(1, 3)) + 1):
        conversation = conversation + draw(st.lists(values, min_size=1, max_size=2))
        request = {"model": draw(strings_with(secrets)), "messages": conversation, "extra": draw(values)}
        events = draw(st.lists(strings_with(secrets).map(lambda t: f"data: {json.dumps({'d': t})}\n\n"), max_size=3))
        out.append((index, request, draw(values), events, draw(strings_with(secrets)), draw(st.booleans())))
    return secrets, out


@SETTINGS
@given(case=calls())
def test_no_secret_survives_and_the_structure_is_kept(tmp_path_factory, case):
    secrets, written = case
    file = tmp_path_factory.mktemp("redaction") / "t.jsonl"
    writer = TrajectoryWriter(file)
    for index, request, response, events, text, escape in written:
        body = spelled(request, escape).encode()
        writer.append(record_fields(index, request, response, events, text), set(secrets), body)
    writer.close()
    raw = file.read_bytes()
    for line in raw.splitlines():
        json.loads(line)  # every line valid JSON
    for secret in secrets:
        assert json.dumps(secret)[1:-1].encode() not in raw
    records = list(read_records(file))
    assert len(records) == len(written)
    for record, (index, request, response, events, text, _) in zip(records, written):
        back = record.model_dump(mode="json")
        for s in strings(back):
            assert not any(secret in s for secret in secrets), s
        assert (record.session, record.index, record.api, record.method, record.status) == ("s", index, "chat.completions", "POST", 200)
        assert shape(record.request) == shape(request) and shape(record.response) == shape(response)
        assert [shape(e.raw) for e in record.events or []] == ["str"] * len(events)
        unchanged_where_clean(request, record.request, secrets)
        unchanged_where_clean(response, record.response, secrets)


@SETTINGS
@given(data=st.data())
def test_scrubbing_a_value_keeps_its_shape_and_removes_every_secret(data):
    secrets = data.draw(st.lists(SECRET, min_size=1, max_size=3, unique=True))
    value = data.draw(json_values(secrets))
    scrubber = Scrubber(secrets)
    clean = scrubber.value(value)
    assert shape(clean) == shape(value)
    assert not any(secret in s for s in strings(clean) for secret in secrets)
    unchanged_where_clean(value, clean, secrets)
    # the cheap check never misses what the exact one finds
    for s in strings(value):
        if scrubber.may_hold_text(s):
            assert scrubber.may_hold(json.dumps(s, ensure_ascii=False).encode())


# Starts and pieces of credential shapes, to fall on either side of what an event shares with the one before.
SHAPE_PIECES = st.sampled_from(["sk-", "sk-proj", "1234567890abcdefghij", "Bearer ", "bearer ", "abcdefgh12345678XYZ",
                                "gh", "ghp_", "p_", "AIza", "AKIA", "xox", "xoxb-", "earer ", "hf_", "-"])


@SETTINGS
@given(data=st.data())
def test_events_repeating_one_another_are_each_scrubbed_as_alone(tmp_path_factory, data):
    """The writer searches an event for secrets only around what it adds to the
    one before it: whatever the stream, each event is written as scrubbing it
    alone gives, a secret or shape straddling what it shares included."""
    secrets = data.draw(st.lists(SECRET, min_size=1, max_size=2, unique=True))
    piece = st.one_of(PLAIN, SHAPE_PIECES, st.sampled_from(secrets),
                      st.sampled_from(secrets).map(lambda s: s[: len(s) // 2]),
                      st.sampled_from(secrets).map(lambda s: s[len(s) // 2 :]))  # fmt: skip
    text = st.lists(piece, max_size=3).map("".join)
    head, tail = data.draw(text), data.draw(text)
    if data.draw(st.booleans()):  # each event its own delta
        pieces = data.draw(st.lists(text, min_size=1, max_size=10))
    else:  # each event the text so far (cut anywhere, inside a secret too)
        whole = "".join(data.draw(st.lists(piece, min_size=1, max_size=8)))
        pieces = [whole[:cut] for cut in sorted(data.draw(st.lists(st.integers(0, len(whole)), min_size=1, max_size=10)))]
    events = [f"data: {head}{piece}{tail}\n\n" for piece in pieces]
    file = tmp_path_factory.mktemp("events") / "t.jsonl"
    writer = TrajectoryWriter(file)
    writer.append(record_fields(1, {"model": "m"}, None, events, "x"), set(secrets))
    writer.close()
    (record,) = read_records(file)
    assert [event.raw for event in record.events] == [Scrubber(secrets).text(event) for event in events]


def _template_raws(around: list[str], values: list[list[str]]) -> list[str]:
    return ["".join(a + v for a, v in zip(around, [*vs, ""])) for vs in values]


def _written_as_template(file: Path, around: list[str], values: list[list[str]], secrets: list[str]) -> list[str]:
    """Writes a stream whose events put `values` in a template's slots between the texts `around` them, the
    events marked as the writer's template marks them (`slots`, `v`); their raws as read back."""
    fields = record_fields(1, {"model": "m"}, None, _template_raws(around, values), "x")
    places = []
    for a, v in zip(around, values[0]):
        start = (places[-1][1] if places else 0) + len(a)
        places.append([start, start + len(v)])
    fields["events"][0]["slots"] = places
    for event, vs in zip(fields["events"][1:], values[1:]):
        event["v"] = vs
    writer = TrajectoryWriter(file)
    writer.append(fields, set(secrets))
    writer.close()
    (record,) = read_records(file)
    return [event.raw for event in record.events]


@SETTINGS
@given(data=st.data())
def test_events_stored_as_a_templates_values_are_each_scrubbed_as_alone(tmp_path_factory, data):
    """Events stored as the values they put in a template's slots (`slots`, `v`: the writer searches
    them for credential shapes only around each value): whatever the values, each event is written as
    scrubbing it alone gives, a secret or shape straddling a value and the template's text included."""
    secrets = data.draw(st.lists(SECRET, min_size=1, max_size=2, unique=True))
    # (a shape's start or a secret cut anywhere: its two parts on either side of a value's edge)
    cut = st.tuples(st.one_of(SHAPE_PIECES, st.sampled_from(secrets)), st.integers(0, 8), st.booleans())
    piece = st.one_of(PLAIN, SHAPE_PIECES, st.sampled_from(secrets),
                      cut.map(lambda c: c[0][: c[1]] if c[2] else c[0][c[1] :]))  # fmt: skip
    text = st.lists(piece, max_size=4).map("".join)
    slots = data.draw(st.integers(1, 3))
    around = ["data: " + data.draw(text), *(data.draw(text) for _ in range(slots - 1)), data.draw(text) + "\n\n"]
    values = data.draw(st.lists(st.lists(text, min_size=slots, max_size=slots), min_size=1, max_size=8))
    raws = _written_as_template(tmp_path_factory.mktemp("events") / "t.jsonl", around, values, secrets)
    assert raws == [Scrubber(secrets).text(raw) for raw in _template_raws(around, values)]


KEY_TAIL = "-abcdefgh12345678XYZ12"  # what makes "sk" a key


@pytest.mark.parametrize(("around", "values"), [
    (["data: ", "k" + KEY_TAIL + "\n\n"], [["q"], ["s"]]),  # its start in a value and the text after it
    (["data: s", "\n\n"], [["q" + KEY_TAIL], ["k" + KEY_TAIL]]),  # in the text before a value and the value
    (["data: ", "k", "\n\n"], [["q", "x"], ["s", KEY_TAIL]]),  # in two values and the text between them
    (["data: ", "k" + KEY_TAIL + " " * 40 + "\n\n"], [["q"], ["s"]]),  # the text after it long
])  # fmt: skip
def test_a_key_made_where_a_value_meets_the_template_is_scrubbed(tmp_path, around, values):
    # (the cases a random text rarely makes: the key's start across a value's edge, the first raw clean)
    secrets = ["Bearer abcdefgh12345678"]
    raws = _written_as_template(tmp_path / "t.jsonl", around, values, secrets)
    assert raws == [Scrubber(secrets).text(raw) for raw in _template_raws(around, values)]
    assert REDACTED not in raws[0] and REDACTED in raws[1]
