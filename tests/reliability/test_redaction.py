"""Redaction never corrupts a record and leaves no secret behind: the cases the
reliability review found (issue 15), each through the record writer's own
path (RecordBuilder -> TrajectoryWriter -> reader)."""

from __future__ import annotations

import base64
import json
import os
import stat

from llmtraj.apis.chat_completions import ChatCompletions
from llmtraj.core.redact import REDACTED, Scrubber, _has_shape_start, redact_url
from llmtraj.core.store import TrajectoryWriter, read_records
from llmtraj.recording.builder import RecordBuilder

SSE = [("content-type", "text/event-stream")]
JSON = [("content-type", "application/json")]
KEY = "sk-proj-Abc123DEF456ghi789JKL0"


def write_call(tmp_path, headers, body: bytes, response: bytes = b'{"ok": true}', response_headers=JSON,
               url="https://api.example.com/v1/chat/completions"):
    tee = RecordBuilder(api=ChatCompletions(), session="s", index=1, mode="record", method="POST", url=url,
                        request_headers=headers, request_body=body)
    tee.response_started(200, response_headers)
    tee.chunk(response)
    file = tmp_path / "t.jsonl"
    writer = TrajectoryWriter(file)
    writer.append(tee.finish(), tee.secrets, tee.request_json)
    writer.close()
    (record,) = read_records(file)
    return record, file.read_bytes()


def chat_body(*messages, **extra) -> bytes:
    return json.dumps({"model": "m", "messages": list(messages), **extra}).encode()


def test_a_key_that_is_a_common_word_rewrites_nothing_but_its_header(tmp_path):
    body = chat_body({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})
    record, _ = write_call(tmp_path, [("authorization", "Bearer assistant")], body)
    assert dict(record.request_headers)["authorization"] == REDACTED
    assert [m["role"] for m in record.request["messages"]] == ["user", "assistant"]


def test_a_key_that_names_the_api_leaves_the_record_readable(tmp_path):
    record, _ = write_call(tmp_path, [("authorization", "Bearer chat.completions")], chat_body())
    assert record.api == "chat.completions"


def test_a_key_of_json_punctuation_keeps_the_line_valid(tmp_path):
    key = '","index":1,"'
    body = chat_body({"role": "user", "content": f"my key is {key} ok"})
    record, raw = write_call(tmp_path, [("x-api-key", key)], body, response=json.dumps({"echo": key}).encode())
    json.loads(raw)  # one valid line
    assert record.index == 1 and record.request["messages"][0]["content"] == f"my key is {REDACTED} ok"
    assert record.response == {"echo": REDACTED}
    assert json.dumps(key)[1:-1].encode() not in raw  # (the key as such is JSON's own punctuation)


def test_a_secret_in_a_body_the_parser_rejects_is_redacted(tmp_path):
    deep = b'{"api_key": "sk-live-9f8e7d6c5b4a39281706", "x": ' + b"[" * 300 + b"]" * 300 + b"}"
    record, raw = write_call(tmp_path, [], deep)
    assert record.request is None and record.request_raw.startswith(f'{{"api_key": "{REDACTED}"')
    assert b"9f8e7d6c5b4a" not in raw
    surrogate = b'{"client_secret": "s3cr3t-value", "content": "\\ud800"}'
    record, raw = write_call(tmp_path / "2", [], surrogate)
    assert record.request_raw == '{"client_secret": "[REDACTED]", "content": "\\ud800"}'


def test_query_string_keys_are_redacted_in_the_url(tmp_path):
    url = "https://generativelanguage.googleapis.com/v1beta/models/g:streamGenerateContent?alt=sse&key=AIzaSyD-0123456789abcdefghijklmnopqrstu"
    record, raw = write_call(tmp_path, [], chat_body(), url=url)
    assert record.url == f"https://generativelanguage.googleapis.com/v1beta/models/g:streamGenerateContent?alt=sse&key={REDACTED}"
    assert b"AIzaSyD" not in raw
    assert redact_url("http://h/p?access_token=abc&model=m") == f"http://h/p?access_token={REDACTED}&model=m"


def test_key_shapes_are_scrubbed_without_any_header(tmp_path):
    text = f"env: OPENAI_API_KEY={KEY}\ncurl -H 'Authorization: Bearer eyJhbGciOi.J9abc123.def456ghi'"
    record, raw = write_call(tmp_path, [], chat_body({"role": "user", "content": text}))
    assert record.request["messages"][0]["content"] == (
        f"env: OPENAI_API_KEY={REDACTED}\ncurl -H 'Authorization: Bearer {REDACTED}'")
    assert KEY.encode() not in raw


def test_every_shape_is_found_and_scrubbed():
    # the searches for where a shape may start (`_SHAPE_STARTS`) cover every start (`_SHAPE_LITERALS`)
    for start in ("sk-", "AIza", "AKIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "hf_", "xox", "earer ", "EARER "):
        assert _has_shape_start("x " + start + " y"), start
    assert not _has_shape_start("sk_ AIz AKI gh_ ghx_ hf- xo earer,EARER")
    for text, clean in (
        ("k sk-abc1234567890defghijklmno", f"k {REDACTED}"), ("AIza" + "a1" * 17 + "b", REDACTED),
        ("AKIA" + "A1" * 8, REDACTED), ("ghs_" + "a1" * 18, REDACTED), ("hf_" + "a1" * 15, REDACTED),
        ("xoxb-1234567890", REDACTED), ("BEARER abcdefgh12345678", f"BEARER {REDACTED}"),
    ):
        assert Scrubber().text(text) == clean, text


def test_secrets_in_stream_events_are_scrubbed_and_the_events_still_decode(tmp_path):
    events = b"".join(
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":'
        + json.dumps(piece).encode() + b'},"finish_reason":null}]}\n\n'
        for piece in ["your key: ", KEY, " and again ", KEY]
    ) + b"data: [DONE]\n\n"
    record, raw = write_call(tmp_path, [("authorization", f"Bearer {KEY}")], chat_body(stream=True), events, SSE)
    assert KEY.encode() not in raw
    assert record.response["choices"][0]["message"]["content"] == f"your key: {REDACTED} and again {REDACTED}"
    assert [json.loads(e.raw[6:])["choices"][0]["delta"]["content"] for e in record.events[:4]] == [
        "your key: ", REDACTED, " and again ", REDACTED]


def test_a_secret_the_agent_spelled_with_escapes_is_found(tmp_path):
    escaped = "".join(f"\\u{ord(c):04x}" for c in KEY)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "k=' + escaped.encode() + b'"}]}'
    record, raw = write_call(tmp_path, [("authorization", f"Bearer {KEY}")], body)
    assert record.request["messages"][0]["content"] == f"k={REDACTED}"
    assert escaped.encode() not in raw


def test_a_secret_in_a_later_call_of_a_chain_is_scrubbed(tmp_path):
    """Calls after the first store their request as a reference plus what is
    new: what is new is scrubbed, and what is referred to was scrubbed before."""
    file = tmp_path / "t.jsonl"
    writer = TrajectoryWriter(file)
    messages = [{"role": "user", "content": "x" * 100}]
    for index in (1, 2, 3):
        messages.append({"role": "user", "content": f"call {index}: {KEY}"})
        tee = RecordBuilder(api=ChatCompletions(), session="s", index=index, mode="record", method="POST",
                            url="http://u/v1/chat/completions", request_headers=[("authorization", f"Bearer {KEY}")],
                            request_body=chat_body(*messages))
        tee.response_started(200, JSON)
        tee.chunk(b"{}")
        writer.append(tee.finish(), tee.secrets, tee.request_json)
    writer.close()
    lines = [json.loads(line) for line in file.read_bytes().splitlines()]
    assert lines[1]["request_base"]["index"] == 1 and lines[2]["request_base"]["index"] == 2
    assert KEY.encode() not in file.read_bytes()
    third = list(read_records(file))[2]
    assert [m["content"] for m in third.request["messages"][1:]] == [f"call {i}: {REDACTED}" for i in (1, 2, 3)]


def test_scrubber_keeps_keys_and_types():
    scrubber = Scrubber({KEY})
    value = {"a": [KEY, 1, None, True, {"b": f"x{KEY}y"}], KEY: 2, "[REDACTED]": 3, "n": 1.5}
    assert scrubber.value(value) == {"a": [REDACTED, 1, None, True, {"b": f"x{REDACTED}y"}], "[REDACTED]#2": 2,
                                     "[REDACTED]": 3, "n": 1.5}


def test_trajectory_directory_is_private(tmp_path):
    old = os.umask(0)  # even with a permissive umask
    try:
        TrajectoryWriter(tmp_path / "traj").close()
        TrajectoryWriter(tmp_path / "one" / "all.jsonl").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "traj").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "one").stat().st_mode) == 0o700


def test_bodies_and_events_that_are_not_utf8_are_kept_byte_exact(tmp_path):
    bad = b"\xff\xfe caf\xe9 " + KEY.encode()
    tee = RecordBuilder(api=ChatCompletions(), session="s", index=1, mode="record", method="POST",
                        url="http://u/v1/chat/completions", request_headers=[("authorization", f"Bearer {KEY}")],
                        request_body=bad)
    tee.response_started(200, SSE)
    events = [b'data: {"choices":[{"index":0,"delta":{"content":"ok"}}]}\n\n', b"data: \xc3(\n\n", b"data: [DONE]\n\n"]
    for event in events:
        tee.chunk(event)
    file = tmp_path / "t.jsonl"
    writer = TrajectoryWriter(file)
    writer.append(tee.finish(), tee.secrets, tee.request_json)
    (record,) = read_records(file)
    assert "\ufffd" in record.request_raw
    assert base64.b64decode(record.request_raw_base64) == b"\xff\xfe caf\xe9 " + REDACTED.encode()  # scrubbed, byte-exact otherwise
    assert [e.data() for e in record.events] == events
    assert record.events[1].raw == "data: \ufffd(\n\n" and record.events[0].raw_base64 is None
