"""Broken answers through a real mitmdump (issue 15): a compressed body cut
short, an event stream with no data event, a body shorter than its
Content-Length. The agent gets exactly the bytes the upstream sent; the record
says the call did not complete, and replay does not pass it off as a good answer."""

from __future__ import annotations

import gzip
import json
import zlib

import brotli
import httpx
import pytest
import zstandard
from llmtraj.cli.proxy_process import ProxyProcess

from ..conftest import wait_records
from .scripted_upstream import ScriptedUpstream, http_response

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}]}
COMPLETION = json.dumps({
    "id": "c1", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there, " * 40}, "finish_reason": "stop"}],
}).encode()  # fmt: skip
EVENTS = b"".join(
    b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                            "choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}]}).encode() + b"\n\n"
    for i in range(40)
) + b"data: [DONE]\n\n"  # fmt: skip

COMPRESS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


def record_through_proxy(tmp_path, answer: bytes):
    """(the bytes the agent got, or the error it saw; the call's record)."""
    with ScriptedUpstream(answer) as up, ProxyProcess(upstream=up.url, options={"llm_traj_path": tmp_path}) as p:
        with httpx.Client(timeout=10) as client:
            try:
                with client.stream("POST", f"{p.url}/v1/chat/completions", json=REQUEST) as r:
                    got = b"".join(r.iter_raw())
            except httpx.HTTPError as exc:
                got = exc
        (record,) = wait_records(tmp_path / "default.jsonl", 1)
    return got, record


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("encoding", sorted(COMPRESS))
def test_a_compressed_body_cut_short_is_recorded_incomplete(tmp_path, encoding, stream):
    body = COMPRESS[encoding](EVENTS if stream else COMPLETION)
    body = body[: len(body) * 2 // 3]  # the upstream's framing says it is whole
    content_type = "text/event-stream" if stream else "application/json"
    answer = http_response(body, {"content-type": content_type, "content-encoding": encoding, "content-length": str(len(body))})
    got, record = record_through_proxy(tmp_path, answer)
    assert got == body  # passed on exactly as sent
    assert record.complete is False and record.error.kind == "bad_stream" and record.status == 200
    assert f"the {encoding} body ended before its compressed data did" in record.error.message


def test_a_whole_compressed_body_is_complete(tmp_path):
    """(the control: the same answer, not cut)"""
    body = gzip.compress(EVENTS)
    answer = http_response(body, {"content-type": "text/event-stream", "content-encoding": "gzip", "content-length": str(len(body))})
    got, record = record_through_proxy(tmp_path, answer)
    assert got == body and record.complete is True and record.error is None
    assert record.response["choices"][0]["message"]["content"].startswith("word0 word1")


def test_an_event_stream_without_a_data_event_is_recorded_incomplete(tmp_path):
    body = b": keep-alive\n\n: still here\n\n"
    answer = http_response(body, {"content-type": "text/event-stream", "content-length": str(len(body))})
    got, record = record_through_proxy(tmp_path, answer)
    assert got == body
    assert record.complete is False and record.error.kind == "bad_stream" and record.status == 200
    assert record.error.message == "the event stream ended without a data event" and len(record.events) == 2


def test_a_body_shorter_than_its_content_length_is_recorded_incomplete(tmp_path):
    answer = http_response(COMPLETION, {"content-type": "application/json", "content-length": str(len(COMPLETION) + 100)})
    got, record = record_through_proxy(tmp_path, answer)
    assert isinstance(got, httpx.RemoteProtocolError)  # the agent saw the body end early too
    assert record.complete is False and record.error.kind == "upstream_disconnected" and record.status == 200


def test_replay_of_a_cut_short_answer_cuts_the_agent_off(tmp_path):
    body = gzip.compress(EVENTS)[:-20]
    answer = http_response(body, {"content-type": "text/event-stream", "content-encoding": "gzip", "content-length": str(len(body))})
    _, record = record_through_proxy(tmp_path, answer)
    assert record.complete is False
    with ProxyProcess(upstream=None, options={"llm_traj_mode": "replay", "llm_traj_path": tmp_path}, extra_args=["--mode", "reverse:http://127.0.0.1:9"]) as p:
        with httpx.Client(timeout=10) as client, pytest.raises(httpx.RemoteProtocolError):
            with client.stream("POST", f"{p.url}/v1/chat/completions", json=REQUEST) as r:
                assert r.status_code == 200
                b"".join(r.iter_raw())  # the recorded events, then the connection is cut as it was
