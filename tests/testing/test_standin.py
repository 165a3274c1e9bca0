"""The stand-in upstream, seen through the real openai SDK, httpx, curl and raw sockets."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import zlib
from pathlib import Path

import brotli
import httpx
import openai
import pytest
import zstandard
from llmtraj.testing.standin import (
    ANSWER,
    REASONING,
    SCENARIOS,
    TEXT,
    StandinUpstream,
    make_self_signed_cert,
)
from openai import OpenAI
from openai.lib.streaming.chat import ChatCompletionStreamState

from ..sdk_http import broken_stream_error

MESSAGES = [{"role": "user", "content": "hi"}]
ADDON = Path(__file__).resolve().parents[2] / "addon"


@pytest.fixture
def up():
    with StandinUpstream() as u:
        yield u


def sdk(up: StandinUpstream, http_client: httpx.Client | None = None, **headers: str) -> OpenAI:
    return OpenAI(base_url=up.url + "/v1", api_key="x", max_retries=0, timeout=10,
                  default_headers=headers, http_client=http_client)  # fmt: skip


def aggregate(stream) -> openai.types.chat.ParsedChatCompletion:
    state = ChatCompletionStreamState()
    for chunk in stream:
        state.handle_chunk(chunk)
    return state.get_final_completion()


def summary(c) -> dict:
    """What both a ChatCompletion and the SDK's stream aggregate keep."""
    return {
        "id": c.id,
        "model": c.model,
        "usage": c.usage.model_dump() if c.usage else None,
        "choices": [
            {
                "index": ch.index,
                "finish_reason": ch.finish_reason,
                "role": ch.message.role,
                "content": ch.message.content,
                "reasoning_content": getattr(ch.message, "reasoning_content", None),
                "tool_calls": [(t.id, t.type, t.function.name, t.function.arguments)
                               for t in ch.message.tool_calls or []],  # fmt: skip
                "logprobs": ch.logprobs.model_dump() if ch.logprobs else None,
            }
            for ch in c.choices
        ],
    }


def raw_exchange(up: StandinUpstream, body: dict, headers: dict[str, str] | None = None,
                 path: str = "/v1/chat/completions") -> tuple[str, list[bytes]]:  # fmt: skip
    """POST over a raw socket; the response head and the chunked body's chunks as framed."""
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with socket.create_connection(("127.0.0.1", up.port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(data)}\r\n"
                  f"content-type: application/json\r\nconnection: close\r\n{extra}\r\n".encode() + data)  # fmt: skip
        f = s.makefile("rb")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += f.readline()
        chunks = []
        while size := int(f.readline(), 16):
            chunks.append(f.read(size))
            assert f.read(2) == b"\r\n"
        assert f.readline() == b"\r\n" and f.read() == b""  # last chunk, then closed
    return head.decode(), chunks


# --- the SDK: stream and non-stream describe the same completion ----------------


@pytest.mark.parametrize("scenario", ["text", "tools", "reasoning", "n", "logprobs", "vendor", "crlf",
                                      "multiline", "chunks"])  # fmt: skip
def test_stream_aggregates_to_the_non_stream_completion(up, scenario):
    client = sdk(up)
    model = f"standin-{scenario}"
    full = client.chat.completions.create(model=model, messages=MESSAGES)
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    assert summary(aggregate(stream)) == summary(full)
    assert full.id == "chatcmpl-standin-1" and full.model == model
    assert full.usage.completion_tokens > 0
    assert [r.path for r in up.requests] == ["/v1/chat/completions"] * 2


def test_scenario_contents(up):
    client = sdk(up)
    text = client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert text.choices[0].message.content == TEXT and text.model == "gpt-test"
    assert text.choices[0].finish_reason == "stop"

    reasoning = client.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"x-standin-scenario": "reasoning"})
    assert reasoning.choices[0].message.content == ANSWER
    assert reasoning.choices[0].message.reasoning_content == REASONING

    tools = client.chat.completions.create(model="standin-tools", messages=MESSAGES)
    msg = tools.choices[0].message
    assert tools.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert [(t.id, t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls] == [
        ("call_standin_0", "get_weather", {"city": "Paris", "unit": "celsius"}),
        ("call_standin_1", "get_time", {"timezone": "Europe/Paris"}),
    ]

    n3 = client.chat.completions.create(model="standin-n", messages=MESSAGES, n=3)
    assert len({c.message.content for c in n3.choices}) == 3

    lp = client.chat.completions.create(model="standin-logprobs", messages=MESSAGES)
    tokens = lp.choices[0].logprobs.content
    assert "".join(t.token for t in tokens) == TEXT and all(bytes(t.bytes).decode() == t.token for t in tokens)

    vendor = client.chat.completions.create(model="standin-vendor", messages=MESSAGES)
    assert vendor.provider_meta == {"provider": "standin", "region": "local-1"}
    assert vendor.choices[0].stop_reason == 151645 and vendor.choices[0].message.audio_tokens_hint == "x"

    echo = client.chat.completions.create(model="standin-echo", messages=MESSAGES, temperature=0.5)
    assert echo.choices[0].message.content == up.requests[-1].body.decode()
    assert json.loads(echo.choices[0].message.content) == {"model": "standin-echo", "messages": MESSAGES,
                                                           "temperature": 0.5}  # fmt: skip


def test_stream_chunk_shapes(up):
    stream = sdk(up).chat.completions.create(model="standin-tools", messages=MESSAGES, stream=True,
                                             stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert [c.index for c in calls] == [0, 1] + [0, 1] * 4  # interleaved
    assert [c.id for c in calls if c.id] == ["call_standin_0", "call_standin_1"]  # ids only in the first delta
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])

    n = list(sdk(up).chat.completions.create(model="standin-n", messages=MESSAGES, stream=True))
    assert [c.choices[0].index for c in n[:4]] == [0, 1, 0, 1]


# --- framing on the wire ---------------------------------------------------------


@pytest.mark.parametrize("scenario,end", [("text", b"\n\n"), ("crlf", b"\r\n\r\n"), ("multiline", b"\n\n")])
def test_one_sse_event_per_chunk(up, scenario, end):
    head, chunks = raw_exchange(up, {"model": f"standin-{scenario}", "messages": MESSAGES, "stream": True})
    assert head.startswith("HTTP/1.1 200 OK\r\n")
    assert "content-type: text/event-stream" in head and "transfer-encoding: chunked" in head
    assert chunks[-1] == b"data: [DONE]" + end
    events = [c for c in chunks if not c.startswith(b":")]
    for chunk in events:
        assert chunk.startswith(b"data: ") and chunk.endswith(end) and chunk.count(end) == 1
    if scenario == "multiline":
        assert chunks[1] == b": keep-alive\n\n" and events[0].count(b"\ndata: ") > 3
        assert len(chunks) == 2 * len(events) - 1
    assert up.sent[-1].body == b"".join(chunks)


def _decoder(enc: str):
    if enc == "gzip":
        return zlib.decompressobj(wbits=31).decompress
    if enc == "br":
        return brotli.Decompressor().process
    return zstandard.ZstdDecompressor().decompressobj().decompress


@pytest.mark.parametrize("enc", ["gzip", "br", "zstd"])
def test_encoded_stream_decodes_event_by_event(up, enc):
    head, chunks = raw_exchange(up, {"model": "m", "stream": True}, {"x-standin-encoding": enc})
    assert f"content-encoding: {enc}" in head
    decode = _decoder(enc)
    events = [decode(c) for c in chunks]  # each chunk alone yields its whole event
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") and e.count(b"\n\n") == 1 for e in events)
    assert events[-1] == b"data: [DONE]\n\n"
    assert up.sent[-1].body == b"".join(chunks) and up.sent[-1].header("content-encoding") == enc


@pytest.mark.parametrize("enc", ["gzip", "br", "zstd"])
def test_encoded_responses_through_the_sdk(up, enc):
    plain = sdk(up).chat.completions.create(model="standin-tools", messages=MESSAGES)
    client = sdk(up, **{"x-standin-encoding": enc})
    full = client.chat.completions.create(model="standin-tools", messages=MESSAGES)
    assert up.sent[-1].header("content-encoding") == enc
    assert json.loads(_decoder(enc)(up.sent[-1].body)) == plain.model_dump(exclude_unset=True)
    stream = client.chat.completions.create(model="standin-tools", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    assert summary(aggregate(stream)) == summary(full) == summary(plain)


def test_non_stream_sent_record_is_exact(up):
    conn = http.client.HTTPConnection("127.0.0.1", up.port, timeout=10)
    conn.request("POST", "/chat/completions", json.dumps({"model": "m"}), {"x-standin-encoding": "gzip"})
    resp = conn.getresponse()
    body = resp.read()
    assert resp.getheader("content-length") == str(len(body)) and body == up.sent[-1].body
    assert json.loads(zlib.decompress(body, 31))["choices"][0]["message"]["content"] == TEXT
    assert up.sent[-1].status == 200 and up.requests[-1].header("X-Standin-Encoding") == "gzip"
    conn.close()


# --- failures ----------------------------------------------------------------------


def test_drop_makes_the_sdk_raise(up):
    client = sdk(up)
    got = []
    with pytest.raises(broken_stream_error()):
        for chunk in client.chat.completions.create(model="standin-drop", messages=MESSAGES, stream=True):
            got.append(chunk)
    assert len(got) == 3 and "[DONE]" not in up.sent[-1].body.decode()
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="standin-drop", messages=MESSAGES)
    assert int(up.sent[-1].header("content-length")) > len(up.sent[-1].body)


@pytest.mark.parametrize("scenario,exc,status", [
    ("error400", openai.BadRequestError, 400),
    ("error429", openai.RateLimitError, 429),
    ("error500", openai.InternalServerError, 500),
    ("error503", openai.InternalServerError, 503),
])  # fmt: skip
def test_errors_are_openai_json_even_for_streams(up, scenario, exc, status):
    with pytest.raises(exc) as info:
        sdk(up).chat.completions.create(model=f"standin-{scenario}", messages=MESSAGES, stream=True)
    err = info.value
    assert err.status_code == status and err.response.headers["content-type"] == "application/json"
    assert set(err.body) == {"message", "type", "param", "code"}  # the SDK unwraps "error"
    assert (err.response.headers.get("retry-after") == "1") == (status == 429)


def test_other_endpoints_and_keep_alive(up):
    conn = http.client.HTTPConnection("127.0.0.1", up.port, timeout=10)

    def get(method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        return resp, resp.read()

    for path in ("/v1/models", "/models"):
        resp, body = get("GET", path)
        ids = [m["id"] for m in json.loads(body)["data"]]
        assert resp.status == 200 and "standin-tools" in ids and len(ids) == len(SCENARIOS)
    resp, body = get("GET", "/plain")
    assert (resp.status, resp.getheader("content-type"), body) == (200, "text/plain", b"hello from standin\n")
    resp, body = get("GET", "/v1/nope?x=1")
    assert resp.status == 404 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    resp, body = get("POST", "/v1/chat/completions", b"{not json")
    assert resp.status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    resp, body = get("POST", "/v1/chat/completions", b"{}", {"x-standin-scenario": "nope"})
    assert resp.status == 400 and json.loads(body)["error"]["code"] == "unknown_scenario"
    resp, body = get("POST", "/v1/chat/completions", b"{}", {"x-standin-chunks": "3"})
    assert json.loads(body)["choices"][0]["message"]["content"] == TEXT  # only for `chunks`
    resp, body = get("POST", "/v1/chat/completions", b"{}", {"x-standin-scenario": "chunks", "x-standin-chunks": "3"})
    assert json.loads(body)["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert up.connections == 1 and len(up.requests) == len(up.sent) == 8
    conn.close()


def test_delay_between_events(up):
    stream = sdk(up, **{"x-standin-delay-ms": "30"}).chat.completions.create(
        model="standin-chunks", messages=MESSAGES, stream=True, extra_headers={"x-standin-chunks": "3"}
    )
    start = time.monotonic()
    arrivals = [time.monotonic() - start for _ in stream]
    assert len(arrivals) == 5  # role, 3 pieces, finish
    assert all(b - a > 0.015 for a, b in zip(arrivals, arrivals[1:]))


def test_big(up):
    with httpx.Client(timeout=10) as client:
        full = client.post(up.url + "/v1/chat/completions", json={"model": "standin-big"}).json()
        content = full["choices"][0]["message"]["content"]
        assert len(content) == 5_000_000
        pieces = []
        with client.stream("POST", up.url + "/v1/chat/completions", json={"model": "standin-big", "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    pieces += [c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"]]
    assert len(pieces) == 1002 and "".join(pieces) == content


# --- HTTPS, curl, the CLI, shutting down ----------------------------------------------


def test_https(tmp_path):
    cert, key = make_self_signed_cert(tmp_path)
    with StandinUpstream(tls=(cert, key)) as up:
        assert up.url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=ssl.create_default_context(cafile=cert)) as http_client:
            stream = sdk(up, http_client).chat.completions.create(model="standin-text", messages=MESSAGES, stream=True)
            assert aggregate(stream).choices[0].message.content == TEXT
            localhost = http_client.get(up.url.replace("127.0.0.1", "localhost") + "/plain")
            assert localhost.text == "hello from standin\n"
        with pytest.raises(httpx.ConnectError):  # not trusted without the cert
            httpx.get(up.url + "/plain")


@pytest.mark.skipif(not shutil.which("curl"), reason="no curl")
def test_curl_stream_and_chunked_upload(up):
    url = up.url + "/v1/chat/completions"
    out = subprocess.run(["curl", "-sSN", url, "-d", json.dumps({"model": "m", "stream": True})],
                         capture_output=True, check=True, timeout=10).stdout  # fmt: skip
    assert out.startswith(b"data: {") and out.endswith(b"data: [DONE]\n\n")
    body = json.dumps({"model": "standin-echo", "messages": [{"role": "user", "content": "y" * 3000}]})
    out = subprocess.run(["curl", "-sS", url, "-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue",
                          "--data-binary", "@-"], input=body.encode(), capture_output=True, check=True,
                         timeout=10).stdout  # fmt: skip
    assert json.loads(out)["choices"][0]["message"]["content"] == body
    assert up.requests[-1].header("transfer-encoding") == "chunked" and up.requests[-1].body == body.encode()


def test_cli_prints_the_url_and_exits_0_on_sigterm():
    env = {**os.environ, "PYTHONPATH": str(ADDON)}
    proc = subprocess.Popen([sys.executable, "-m", "llmtraj.testing.standin"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        port = int(re.fullmatch(r"listening on http://127\.0\.0\.1:(\d+)\n", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/plain")
        assert conn.getresponse().read() == b"hello from standin\n"
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0 and proc.stdout.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_exit_closes_connections_and_joins_the_thread():
    up = StandinUpstream().start()
    thread = up._thread
    with socket.create_connection(("127.0.0.1", up.port), timeout=10) as idle, \
         socket.create_connection(("127.0.0.1", up.port), timeout=10) as streaming:  # fmt: skip
        # one idle keep-alive connection, one in the middle of a slow stream
        data = json.dumps({"model": "standin-chunks", "stream": True}).encode()
        streaming.sendall(b"POST /chat/completions HTTP/1.1\r\nhost: x\r\nx-standin-delay-ms: 1000\r\n"
                          b"content-length: %d\r\n\r\n%s" % (len(data), data))  # fmt: skip
        assert streaming.recv(65536).startswith(b"HTTP/1.1 200 OK")
        up.stop()
        assert not thread.is_alive() and up.connections == 2
        assert idle.recv(10) == b""
        while streaming.recv(65536):
            pass  # closed (no last chunk)
