"""RecordBuilder, the record-side tee of one call: chunking- and encoding-proof
stream capture, non-stream bodies, failures, and redaction."""

from __future__ import annotations

import gzip
import json
import os
import random
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

import brotli
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import from_json, to_json
from llmtraj.apis import API_BY_NAME, ApiShape
from llmtraj.apis.chat_completions import ChatCompletions
from llmtraj.core.chain import decode_events, encode_events
from llmtraj.core.record import CallRecord
from llmtraj.core.redact import REDACTED
from llmtraj.core.store import TrajectoryWriter, read_records
from llmtraj.recording.builder import RecordBuilder
from llmtraj.testing.standin import FIXTURES

STREAMS = FIXTURES
FIXTURES = sorted(STREAMS.glob("*.sse"))
T0 = 1_700_000_000.0

SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]
JSON_HEADERS = [("content-type", "application/json")]


def validated(fields) -> CallRecord:
    """What the writer would write, read back through the trajectory model."""
    return CallRecord.model_validate(fields)


def expected_for(fixture: Path) -> dict[str, Any]:
    return json.loads((fixture.parent / (fixture.stem + ".expected.json")).read_text(encoding="utf-8"))


def compress(data: bytes, encoding: str | None) -> bytes:
    if encoding is None:
        return data
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "deflate":
        return zlib.compress(data)
    if encoding == "br":
        return brotli.compress(data)
    if encoding == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    raise AssertionError(encoding)


def flushed_gzip(data: bytes, pieces: list[int]) -> bytes:
    """gzip written the way a streaming server writes it: a sync flush after each event."""
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out, i = [], 0
    for n in pieces:
        out.append(c.compress(data[i : i + n]) + c.flush(zlib.Z_SYNC_FLUSH))
        i += n
    out.append(c.compress(data[i:]) + c.flush())
    return b"".join(out)


def chunkings(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rng.choice([1, 2, 3, 7, 64, 500, 4096])
        out.append(data[i : i + n])
        i += n
    return out


def new_tee(
    request_headers: list[tuple[str, str]] | None = None,
    request_body: bytes = b'{"model": "m", "stream": true, "messages": []}',
    api: ApiShape | None = None,
) -> RecordBuilder:
    return RecordBuilder(
        api=api or ChatCompletions(),
        session="sess-1",
        index=1,
        mode="record",
        method="POST",
        url="https://api.example.com/v1/chat/completions",
        request_headers=request_headers or [("content-type", "application/json")],
        request_body=request_body,
        started_at=T0,
    )


def run(tee: RecordBuilder, headers, chunks: list[bytes], status: int = 200) -> CallRecord:
    tee.response_started(status, headers, now=T0 + 0.1)
    for i, chunk in enumerate(chunks):
        tee.chunk(chunk, now=T0 + 0.2 + i * 0.001)
    return validated(tee.finish(now=T0 + 5))


def events_bytes(record: CallRecord) -> bytes:
    return "".join(e.raw for e in record.events).encode("utf-8")


# ------------------------------------------------------------------- streams


@pytest.mark.parametrize("encoding", [None, "gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_stream_in_arbitrary_chunkings_and_encodings(fixture, encoding):
    decoded = fixture.read_bytes()
    body = compress(decoded, encoding)
    headers = SSE_HEADERS + ([("Content-Encoding", encoding)] if encoding else [])
    for seed in range(3):
        record = run(new_tee(), headers, chunkings(body, seed))
        assert record.stream and record.complete and record.error is None
        assert record.problems == []
        assert events_bytes(record) == decoded
        assert record.response == expected_for(fixture)
        assert record.events[-1].raw.rstrip() == "data: [DONE]"


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_compressed_stream_one_byte_at_a_time(encoding):
    fixture = STREAMS / "dashscope_qwen_reasoning_tools.sse"  # multi-byte UTF-8 throughout
    decoded = fixture.read_bytes()
    body = compress(decoded, encoding)
    record = run(new_tee(), SSE_HEADERS + [("content-encoding", encoding)], [body[i : i + 1] for i in range(len(body))])
    assert events_bytes(record) == decoded
    assert record.response == expected_for(fixture)


def test_sync_flushed_gzip_yields_each_event_as_it_arrives():
    fixture = STREAMS / "openai_chat_basic.sse"
    decoded = fixture.read_bytes()
    raws = [r + b"\n\n" for r in decoded.split(b"\n\n")[:-1]]
    body = flushed_gzip(decoded, [len(r) for r in raws])
    tee = new_tee()
    tee.response_started(200, SSE_HEADERS + [("content-encoding", "gzip")], now=T0 + 0.1)
    # cut the compressed body right after each flush point
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    offset = 0
    for i, raw in enumerate(raws):
        piece = len(c.compress(raw) + c.flush(zlib.Z_SYNC_FLUSH))
        tee.chunk(body[offset : offset + piece], now=T0 + 1 + i)
        offset += piece
    tee.chunk(body[offset:], now=T0 + 100)
    record = validated(tee.finish(now=T0 + 101))
    # each event is stamped with the time of the chunk that completed it, not a later one
    assert [e.t for e in record.events] == [float(1 + i) for i in range(len(raws))]
    assert events_bytes(record) == decoded


def test_crlf_events_are_stamped_with_their_own_chunk_time():
    data = (STREAMS / "openai_chat_basic_crlf.sse").read_bytes()
    raws = [r + b"\r\n\r\n" for r in data.split(b"\r\n\r\n")[:-1]]
    tee = new_tee()
    tee.response_started(200, SSE_HEADERS, now=T0 + 0.1)
    for i, raw in enumerate(raws):
        tee.chunk(raw, now=T0 + 1 + i)
    record = validated(tee.finish(now=T0 + 100))
    assert [e.t for e in record.events] == [float(1 + i) for i in range(len(raws))]
    assert events_bytes(record) == data


def test_event_times_are_relative_to_the_start():
    data = (STREAMS / "vllm_chat_reasoning.sse").read_bytes()
    tee = new_tee()
    tee.response_started(200, SSE_HEADERS, now=T0 + 0.05)
    first, second = data[:700], data[700:]
    tee.chunk(first, now=T0 + 0.25)
    tee.chunk(second, now=T0 + 0.75)
    record = validated(tee.finish(now=T0 + 1))
    times = [e.t for e in record.events]
    assert times == sorted(times) and set(times) == {0.25, 0.75}
    assert record.timings.started_at == T0
    assert record.timings.response_headers_at == T0 + 0.05
    assert record.timings.first_byte_at == T0 + 0.25
    assert record.timings.ended_at == T0 + 1


def test_stream_with_unterminated_tail_is_recorded_byte_exact():
    data = (STREAMS / "openai_chat_basic.sse").read_bytes().replace(b"data: [DONE]\n\n", b"data: [DONE]")
    record = run(new_tee(), SSE_HEADERS, chunkings(data, 1))
    assert events_bytes(record) == data
    assert record.response == expected_for(STREAMS / "openai_chat_basic.sse")


def test_malformed_event_is_recorded_and_the_rest_aggregates():
    fixture = STREAMS / "openai_chat_parallel_tools.sse"
    data = fixture.read_bytes()
    cut = data.index(b"\n\n", 2000) + 2
    data = data[:cut] + b"data: {not json}\n\n" + data[cut:]
    record = run(new_tee(), SSE_HEADERS, chunkings(data, 2))
    assert record.response == expected_for(fixture)
    assert len(record.problems) == 1 and "not JSON" in record.problems[0]
    assert events_bytes(record) == data


# ------------------------------------------------------------------ non-stream


@pytest.mark.parametrize("encoding", [None, "gzip", "br", "zstd"])
def test_non_stream_json(encoding):
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "杭州 🙂"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    body = compress(json.dumps(completion, ensure_ascii=False).encode(), encoding)
    headers = JSON_HEADERS + ([("content-encoding", encoding)] if encoding else [])
    record = run(new_tee(request_body=b'{"model": "m", "messages": []}'), headers, chunkings(body, 4))
    assert not record.stream and record.events is None
    assert record.response == completion and record.response_raw is None
    assert record.complete and record.problems == []


def test_non_json_body_is_kept_as_text():
    html = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    record = run(new_tee(), [("content-type", "text/html")], [html[:10], html[10:]], status=502)
    assert record.status == 502
    assert record.response is None and record.response_raw == html.decode()


def test_json_error_response():
    error = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    record = run(new_tee(), JSON_HEADERS, [json.dumps(error).encode()], status=401)
    assert record.status == 401 and record.response == error


def test_empty_body():
    record = run(new_tee(), JSON_HEADERS, [])
    assert record.response is None and record.response_raw is None and record.complete


def test_unsupported_encoding_is_noted_and_body_kept_undecoded():
    record = run(new_tee(), JSON_HEADERS + [("content-encoding", "compress")], [b'{"a": 1}'])
    assert any("unsupported content-encoding" in p for p in record.problems)
    assert record.response == {"a": 1}


def test_corrupt_compressed_stream_does_not_raise():
    decoded = (STREAMS / "openai_chat_basic.sse").read_bytes()
    body = bytearray(gzip.compress(decoded))
    body[len(body) // 2 : len(body) // 2 + 8] = b"\x00" * 8
    body = b"\x1f\x8b\x08\x00garbage" + bytes(body[9:])
    record = run(new_tee(), SSE_HEADERS + [("content-encoding", "gzip")], chunkings(bytes(body), 3))
    assert any("cannot decode body" in p for p in record.problems)
    assert record.stream


def test_request_body_that_is_not_json():
    tee = new_tee(request_body=b"not json \xff")
    assert tee.fields['request'] is None and tee.fields['request_raw'] == "not json \ufffd"


# ------------------------------------------------------------------- failures


def test_fail_mid_stream_keeps_what_arrived():
    fixture = STREAMS / "openai_chat_basic.sse"
    data = fixture.read_bytes()
    cut = data.index(b" help") + 3  # in the middle of an event
    tee = new_tee()
    tee.response_started(200, SSE_HEADERS, now=T0 + 0.1)
    for i, chunk in enumerate(chunkings(data[:cut], 5)):
        tee.chunk(chunk, now=T0 + 0.2 + i * 0.001)
    record = validated(tee.fail("upstream_disconnected", "connection reset by peer", now=T0 + 3))
    assert record.complete is False
    assert record.error.kind == "upstream_disconnected" and record.error.message == "connection reset by peer"
    assert events_bytes(record) == data[:cut]
    assert record.events[-1].raw.endswith(" he")  # the cut-off event is kept too
    message = record.response["choices"][0]["message"]
    assert message["content"] == "Hello! How can I"
    assert record.response["choices"][0]["finish_reason"] is None
    assert record.timings.ended_at == T0 + 3


def test_fail_mid_compressed_stream():
    data = (STREAMS / "sglang_chat.sse").read_bytes()
    body = flushed_gzip(data, [len(r) + 2 for r in data.split(b"\n\n")[:-1]])
    tee = new_tee()
    tee.response_started(200, SSE_HEADERS + [("content-encoding", "gzip")])
    tee.chunk(body[: len(body) * 3 // 4])
    record = validated(tee.fail("client_disconnected", "client went away"))
    assert record.complete is False and record.error.kind == "client_disconnected"
    got = events_bytes(record)
    assert got and data.startswith(got)
    assert record.response["choices"][0]["message"]["content"].startswith("The")


@pytest.mark.parametrize(("folder", "api"), [("", "chat.completions"), ("anthropic", "anthropic.messages"),
                                             ("responses", "responses"), ("completions", "completions")])
def test_client_hanging_up_after_the_end_marker_is_a_complete_call(folder, api):
    """SDKs close the connection once they read [DONE] / message_stop /
    response.completed, which can come before the HTTP body's own end: the
    agent had the whole answer, so the call is complete (with a note); a hang-up
    before the marker is not."""
    fixture = STREAMS / folder / ("openai_chat_basic.sse" if not folder else "text.sse")
    data = fixture.read_bytes()
    for cut, complete in ((len(data), True), (len(data) - 30, False)):
        tee = new_tee(api=API_BY_NAME[api])
        tee.response_started(200, SSE_HEADERS)
        tee.chunk(data[:cut])
        record = validated(tee.fail("client_disconnected", "Client disconnected."))
        assert record.complete is complete and (record.error is None) is complete
        if complete:
            assert record.response == json.loads(fixture.with_suffix(".expected.json").read_text())
            assert record.problems == ["the client closed the connection after the end of the stream"]


def test_fail_non_stream_keeps_partial_body():
    tee = new_tee()
    tee.response_started(200, JSON_HEADERS)
    tee.chunk(b'{"id": "chatcmpl-1", "choi')
    record = validated(tee.fail("upstream_disconnected", "eof"))
    assert record.complete is False and record.response is None
    assert record.response_raw == '{"id": "chatcmpl-1", "choi'


def test_fail_before_any_response():
    record = validated(new_tee().fail("upstream_unreachable", "connect: connection refused", now=T0 + 1))
    assert record.complete is False and record.status is None
    assert record.events is None and record.response is None
    assert record.error.kind == "upstream_unreachable"


# ------------------------------------------------------------------ redaction

SECRET = "sk-proj-Abc123DEF456ghi789JKL0"
ANTHROPIC_KEY = "sk-ant-api03-zyx987WVU654"


def test_redaction_of_headers_body_and_echoed_secrets(tmp_path):
    request = {
        "model": "gpt-4o",
        "max_tokens": 256,
        "max_completion_tokens": 300,
        "logprobs": True,
        "top_logprobs": 2,
        "api_key": "sk-body-key-000111222",
        "metadata": {"token": "kept-token", "client_secret": "cs-999", "tokens": 5},
        "messages": [
            {"role": "system", "content": "Tools may need the key."},
            {"role": "user", "content": f"my key is {SECRET}, please check it"},
        ],
        "stream": True,
    }
    tee = new_tee(
        request_headers=[
            ("Host", "api.openai.com"),
            ("Authorization", f"Bearer {SECRET}"),
            ("x-api-key", ANTHROPIC_KEY),
            ("Content-Type", "application/json"),
            ("OpenAI-Organization", "org-visible"),
        ],
        request_body=json.dumps(request).encode(),
    )
    headers = dict(tee.fields['request_headers'])
    assert headers["Authorization"] == REDACTED and headers["x-api-key"] == REDACTED
    assert headers["Content-Type"] == "application/json" and headers["OpenAI-Organization"] == "org-visible"
    assert SECRET in tee.secrets and ANTHROPIC_KEY in tee.secrets
    assert f"Bearer {SECRET}" in tee.secrets

    body = tee.fields['request']
    assert body["api_key"] == REDACTED
    assert body["metadata"] == {"token": "kept-token", "client_secret": REDACTED, "tokens": 5}
    assert (body["max_tokens"], body["max_completion_tokens"], body["top_logprobs"]) == (256, 300, 2)

    fixture = STREAMS / "openai_chat_logprobs.sse"
    tee.response_started(200, SSE_HEADERS + [("set-cookie", "__cf_bm=abcdefghijkl; path=/"), ("x-request-id", "req_123")])
    tee.chunk(fixture.read_bytes())
    record = validated(tee.finish())
    response_headers = dict(record.response_headers)
    assert response_headers["set-cookie"] == REDACTED and response_headers["x-request-id"] == "req_123"
    # logprob entries named `token` are response data, not secrets
    entries = record.response["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in entries][:2] == ["Yes", ","]

    # the request echoed the key in a message: the writer scrubs it everywhere
    file = tmp_path / "t.jsonl"
    writer = TrajectoryWriter(file)
    writer.append(record, secrets=tee.secrets)
    writer.close()
    text = file.read_text()
    assert SECRET not in text and ANTHROPIC_KEY not in text and "sk-body-key" not in text
    [back] = read_records(file)
    assert back.request["messages"][1]["content"] == f"my key is {REDACTED}, please check it"
    assert back.request["max_tokens"] == 256
    assert back.response == expected_for(fixture)


def test_short_header_values_are_redacted_but_not_scrubbed():
    tee = new_tee(request_headers=[("authorization", "Bearer abc"), ("content-type", "application/json")])
    assert dict(tee.fields['request_headers'])["authorization"] == REDACTED
    assert "abc" not in tee.secrets  # scrubbing 3 letters would mangle ordinary text


def test_tee_fields_are_exactly_the_record_schema():
    """The tee writes its dict unvalidated: it must name every CallRecord field, no more."""
    tee = RecordBuilder(api=ChatCompletions(), session="s", index=1, mode="record", method="POST",
                  url="http://u/v1/chat/completions", request_headers=[], request_body=b"{}")
    tee.response_started(200, JSON_HEADERS)
    tee.chunk(b"{}")
    fields = tee.finish()
    assert set(fields) == set(CallRecord.model_fields)
    assert CallRecord.model_validate(fields).model_dump(mode="json") == json.loads(json.dumps(fields))


_SSE = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\ndata: [DONE]\n\n'


def _sse_capture(index: int, session: str = "s"):
    """A streamed call's capture, an event per chunk."""
    from llmtraj.recording.capture import CallCapture

    cut = _SSE.index(b"\n\n") + 2
    return CallCapture(
        api="chat.completions", session=session, index=index, mode="record", method="POST",
        url="http://u/v1/chat/completions", request_headers=[(b"authorization", b"Bearer sk-secret-123456")],
        request_body=b'{"model": "m", "messages": []}', started_at=T0 + index, status=200,
        response_headers=[(b"content-type", b"text/event-stream")], response_headers_at=T0 + index + 0.1,
        chunks=[_SSE[:cut], _SSE[cut:]], chunk_times=[T0 + index + 0.2, T0 + index + 0.3], ended_at=T0 + index + 0.4,
        extra={"token_ids": [1, 2]},
    )  # fmt: skip


def _ack_writes(monkeypatch, acks: int) -> list[bytes]:
    """What the writer writes on the acknowledgement pipe, write by write."""
    writes, write = [], os.write

    def spy(fd, data):
        if fd == acks:
            writes.append(bytes(data))
        return write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    return writes


def test_record_sink_writes_what_the_proxy_captured(tmp_path, monkeypatch):
    """The proxy's capture goes through the frame format to the child's writer;
    a frame cut off (the proxy killed mid-write) is dropped, the rest kept. The
    frames read together are acknowledged together, in one write, at the end
    of the input too."""
    import io

    from llmtraj.recording.capture import ACK, RESENT
    from llmtraj.recording.writer import serve

    frames = b"".join(_sse_capture(1).frame(1) + _sse_capture(2).frame(2))
    read_acks, write_acks = os.pipe()
    writes = _ack_writes(monkeypatch, write_acks)
    serve(str(tmp_path), io.BytesIO(frames + b"".join(_sse_capture(3).frame(3))[:-5]), acks=write_acks)
    os.close(write_acks)
    assert writes == [ACK.pack(1) + ACK.pack(2)]  # each written call confirmed, in order, in one write
    assert os.read(read_acks, 100) == ACK.pack(1) + ACK.pack(2)
    records = list(read_records(tmp_path))
    assert [r.index for r in records] == [1, 2]
    assert records[0].response["choices"][0]["message"]["content"] == "Hi"
    assert records[0].extra == {"token_ids": [1, 2]} and [e.t for e in records[0].events] == [0.2, 0.3]
    assert "sk-secret-123456" not in (tmp_path / "s.jsonl").read_text()

    # frames sent again to a restarted writer: what is on disk is skipped, the rest written
    resent = _sse_capture(2).frame(2, RESENT) + _sse_capture(3).frame(3, RESENT) + _sse_capture(2).frame(4)
    serve(str(tmp_path), io.BytesIO(b"".join(resent)))
    assert [r.index for r in read_records(tmp_path)] == [1, 2, 3, 2]  # (a frame not marked is written as sent)


def test_the_writer_freezes_what_start_up_built(tmp_path):
    """The writer process's start-up objects are out of the cyclic collector's
    passes (a long stream's records set off full passes that walked them)."""
    import gc
    import io

    from llmtraj.recording.writer import serve

    made_at_start_up = {"schemas": [1, 2, 3]}
    gc.unfreeze()
    try:
        assert any(obj is made_at_start_up for obj in gc.get_objects())
        serve(str(tmp_path), io.BytesIO(b""))
        assert gc.get_freeze_count() > 0
        assert not any(obj is made_at_start_up for obj in gc.get_objects())  # frozen: in no generation
    finally:
        gc.unfreeze()


def test_the_writer_confirms_a_call_at_once_and_those_arriving_while_it_waits_together(tmp_path, monkeypatch):
    """A frame arriving at an idle writer is written and confirmed at once; the
    frames that arrive in the pause after that (each in its own write) are
    read, written and confirmed in one go, and so is a frame longer than a read."""
    import threading
    import time

    from llmtraj.recording.capture import ACK
    from llmtraj.recording.writer import serve

    read_frames, write_frames = os.pipe()
    read_acks, write_acks = os.pipe()
    writes = _ack_writes(monkeypatch, write_acks)
    with open(read_frames, "rb") as source:
        writer = threading.Thread(target=serve, args=(str(tmp_path), source), kwargs={"acks": write_acks, "nap": 0.5})
        writer.start()
        try:
            os.write(write_frames, b"".join(_sse_capture(1).frame(1)))
            started = time.monotonic()
            assert os.read(read_acks, 100) == ACK.pack(1)  # not held for the pause
            assert time.monotonic() - started < 0.4
            for index in (2, 3):  # during the pause
                os.write(write_frames, b"".join(_sse_capture(index).frame(index)))
                time.sleep(0.05)
            big = _sse_capture(4)
            big.request_body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 300_000}]}).encode()
            sending = threading.Thread(target=os.write, args=(write_frames, b"".join(big.frame(4))))  # (more than a pipe takes)
            sending.start()
            sending.join(30)
        finally:
            os.close(write_frames)
            writer.join(30)
    os.close(write_acks)
    assert writes[0] == ACK.pack(1) and writes[1] == ACK.pack(2) + ACK.pack(3)
    assert b"".join(writes) == b"".join(map(ACK.pack, (1, 2, 3, 4)))
    assert os.read(read_acks, 100) == b"".join(map(ACK.pack, (2, 3, 4)))
    assert [len(r.request["messages"]) for r in read_records(tmp_path)] == [0, 0, 0, 1]


def test_a_writer_busy_longer_than_its_pause_reads_on_at_once(tmp_path, monkeypatch):
    """The pause counts from when the writer took its first call: one that
    took longer to write (large bodies, a backlog) does not pause at all."""
    import io
    import threading

    from llmtraj.recording import writer

    pauses, sleep, make = [], writer.time.sleep, writer.record_of
    monkeypatch.setattr(writer.time, "sleep", lambda seconds: (pauses.append(seconds), sleep(seconds)))
    frames = b"".join(_sse_capture(1).frame(1) + _sse_capture(2).frame(2))
    writer.serve(str(tmp_path / "quick"), io.BytesIO(frames), nap=0.3)
    assert len(pauses) == 1 and 0.2 < pauses[0] <= 0.3  # (what writing took counts against it)

    def slow(*args):
        threading.Event().wait(0.2)
        return make(*args)

    pauses.clear()
    monkeypatch.setattr(writer, "record_of", slow)
    writer.serve(str(tmp_path / "slow"), io.BytesIO(frames), nap=0.3)
    assert pauses == [] and len(list(read_records(tmp_path / "slow"))) == 2


def test_wait_written_returns_once_a_burst_of_calls_is_on_disk(tmp_path):
    """The proxy's written barrier returns when the writer has confirmed every
    call of the session, not a pause later, and not before they are on disk."""
    import asyncio
    import time

    from llmtraj.recording.sink import RecordSink
    from llmtraj.recording.writer import NAP

    async def burst() -> tuple[bool, float, int]:
        sink = RecordSink(tmp_path)
        try:
            sink.send(_sse_capture(0, session="other"))  # (a writer started, and busy with another session)
            assert await sink.wait_written("other", 30)
            started = time.monotonic()
            for index in range(1, 41):
                sink.send(_sse_capture(index))
            written = await sink.wait_written("s", 30)
            elapsed = time.monotonic() - started
            return written, elapsed, len(list(read_records(tmp_path / "s.jsonl")))
        finally:
            sink.close()

    written, elapsed, on_disk = asyncio.run(burst())
    assert written and on_disk == 40
    assert elapsed < 1.0 + NAP  # (the writer's pause delays a call's confirmation by NAP at most)


def test_record_sink_hands_over_bodies_in_pieces_past_a_full_pipe_and_dead_writers(tmp_path):
    """The proxy's sink writes a request body as the pieces it arrived in,
    straight into the pipe: what a full pipe does not take waits as a view of
    its piece, and a writer killed meanwhile gets every unconfirmed frame again
    (its pieces whole, marked sent before): each call is on disk once, its body exact."""
    import signal
    import time

    from llmtraj.recording.capture import CallCapture
    from llmtraj.recording.sink import RecordSink

    sink = RecordSink(tmp_path)
    sink.start()  # (no event loop: nothing is read back until `close`, so every frame stays unconfirmed)
    sent = {}
    for index in range(1, 8):
        messages = [{"role": "user", "content": f"call {index} " + "tool output " * (90_000 + 7_001 * index)}]
        body = json.dumps({"model": "m", "messages": messages}).encode()
        cuts = sorted({0, len(body), *(random.Random(index).randrange(len(body)) for _ in range(40))})
        sent[index] = messages
        sink.send(CallCapture(
            api="chat.completions", session="s", index=index, mode="record", method="POST",
            url="http://u/v1/chat/completions", request_headers=[], started_at=T0 + index, status=200,
            request_body=[body[a:b] for a, b in zip(cuts, cuts[1:])] + [b""],  # (an empty piece too)
            response_headers=[(b"content-type", b"application/json")], response_headers_at=T0 + index,
            chunks=[b'{"choices": []}'], chunk_times=[T0 + index], ended_at=T0 + index,
        ))  # fmt: skip
        assert sink._pending  # more than the pipe takes (1 MB at most): the rest waits
        if index in (3, 5):
            deadline = time.monotonic() + 30
            while len(list(read_records(tmp_path))) < index - 1 and time.monotonic() < deadline:
                sink._write()  # (what the loop does when the pipe has room)
                time.sleep(0.02)  # until the writer has written calls it could not confirm: resent, they are skipped
            sink._proc.send_signal(signal.SIGKILL)
            sink._proc.wait()
    sink.close()
    assert sink.restarts == 2 and sink.acked == 7
    records = list(read_records(tmp_path))
    assert [r.index for r in records] == list(range(1, 8))
    assert all(r.request["messages"] == sent[r.index] for r in records)


def test_a_body_short_of_its_content_length_is_recorded_incomplete_by_the_writer():
    """Whatever ended the response (a proxy that saw no error), the writer counts
    the upstream's bytes against their Content-Length."""
    from llmtraj.recording.capture import CallCapture
    from llmtraj.recording.writer import record_of

    body = b'{"id": "c1", "object": "chat.completion", "choices": []}'

    def fields(length: int) -> dict[str, Any]:
        capture = CallCapture(
            api="chat.completions", session="s", index=1, mode="record", method="POST", url="http://u/v1/chat/completions",
            request_headers=[], request_body=b"{}", started_at=T0, status=200,
            response_headers=[(b"content-type", b"application/json"), (b"content-length", str(length).encode())],
            response_headers_at=T0 + 0.1, chunks=[body[:10], body[10:]], chunk_times=[T0 + 0.2, T0 + 0.3], ended_at=T0 + 0.4,
        )  # fmt: skip
        return validated(record_of(capture)[0])

    whole, short = fields(len(body)), fields(len(body) + 7)
    assert whole.complete and whole.error is None
    assert not short.complete and short.error.kind == "upstream_disconnected" and short.response["id"] == "c1"
    assert short.error.message == f"the body ended after {len(body)} of its {len(body) + 7} bytes (Content-Length)"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_compressed_data_cut_short_is_recorded_incomplete(encoding):
    decoded = (STREAMS / "openai_chat_basic.sse").read_bytes()
    body = compress(decoded, encoding)
    whole = run(new_tee(), SSE_HEADERS + [("content-encoding", encoding)], chunkings(body, 3))
    cut = run(new_tee(), SSE_HEADERS + [("content-encoding", encoding)], [body[: len(body) - 4]])
    assert whole.complete and whole.error is None
    assert not cut.complete and cut.error.kind == "bad_stream" and "ended before its compressed data did" in cut.error.message


# Every fixture of every API, with the API that reads it.
ALL_STREAMS = [(path, API_BY_NAME["chat.completions"]) for path in FIXTURES] + [
    (path, API_BY_NAME[api])
    for folder, api in (("anthropic", "anthropic.messages"), ("responses", "responses"), ("completions", "completions"))
    for path in sorted((STREAMS / folder).glob("*.sse"))
]


def _recorded(api: ApiShape, chunks: list[bytes]) -> dict[str, Any]:
    """The record's fields for a stream fed in `chunks`, every chunk at the same time, its events as
    the store writes and reads them (a stream taken at once also says where its events repeat a template's)."""
    tee = new_tee(api=api)
    tee.response_started(200, SSE_HEADERS, now=T0 + 0.1)
    for chunk in chunks:
        tee.chunk(chunk, now=T0 + 0.2)
    fields = tee.finish(now=T0 + 5)
    return {**fields, "events": decode_events(from_json(to_json(encode_events(fields["events"]))))}


@pytest.mark.parametrize(("fixture", "api"), ALL_STREAMS, ids=lambda p: getattr(p, "name", None) or p.name)
@settings(max_examples=max(40, settings.default.max_examples), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.floats(0, 1), max_size=40))
def test_chunking_at_any_boundary_gives_the_same_record(fixture, api, cuts):
    data = fixture.read_bytes()
    at = sorted({int(c * len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *at], [*at, len(data)])]
    whole = _recorded(api, [data])
    assert _recorded(api, chunks) == whole
    assert whole["response"] == expected_for(fixture)
    assert "".join(e["raw"] for e in whole["events"]).encode() == data
