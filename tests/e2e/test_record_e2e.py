"""Record mode end to end: real mitmdump with the addon, real TCP, the real
openai SDK and curl, against the stand-in upstream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.core.model_lists import read_kept
from llmtraj.core.store import read_records
from openai import APIStatusError, AsyncOpenAI, OpenAI
from openai.lib.streaming.chat import ChatCompletionStreamState

from ..conftest import wait_records

API_KEY = "sk-test-e2e-SECRET-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "Say hello"}]
STREAM_SCENARIOS = ["text", "reasoning", "tools", "n", "logprobs", "vendor", "crlf", "multiline"]


def client(proxy, session: str, **kw) -> OpenAI:
    return OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key=API_KEY, max_retries=0, **kw)


def sdk_aggregate(chunks) -> dict:
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    return state.current_completion_snapshot.model_dump(exclude_unset=True)


def _plain(value):
    """A message without the SDK's own helper fields and the stream-only `index`."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None and k not in ("parsed", "parsed_arguments", "index")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def messages_of(completion: dict) -> list[dict]:
    return [_plain(c["message"]) for c in completion["choices"]]


def test_non_stream_bytes_and_record(proxy, upstream, traj_dir, session):
    raw = client(proxy, session).chat.completions.with_raw_response.create(
        model="standin-tools", messages=MESSAGES
    )
    sent = upstream.sent[-1]
    assert raw.http_response.content == sent.body
    assert raw.http_response.status_code == 200
    (record,) = wait_records(traj_dir / f"{session}.jsonl", 1)
    assert record.session == session and record.index == 1
    assert record.stream is False and record.complete and record.error is None
    assert record.response == json.loads(sent.body)
    assert record.request["messages"] == MESSAGES
    assert record.url == f"{upstream.url}/v1/chat/completions"
    assert upstream.requests[-1].path == "/v1/chat/completions"  # session prefix stripped
    t = record.timings
    assert t.started_at <= t.response_headers_at <= t.first_byte_at <= t.ended_at


@pytest.mark.parametrize("scenario", STREAM_SCENARIOS)
def test_stream_bytes_and_aggregate(proxy, upstream, traj_dir, session, scenario):
    c = client(proxy, session)
    kwargs = dict(model=f"standin-{scenario}", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    with c.chat.completions.with_streaming_response.create(**kwargs) as resp:
        body = b"".join(resp.iter_bytes())
    sent = upstream.sent[-1]
    assert body == sent.body, "the client must get the upstream's bytes exactly"

    chunks = list(c.chat.completions.create(**kwargs))  # the same call, parsed by the SDK
    records = wait_records(traj_dir / f"{session}.jsonl", 2)
    for record in records:
        assert record.stream and record.complete and record.status == 200
        assert "".join(e.raw for e in record.events).encode() == sent.body
        assert record.response["object"] == "chat.completion"
    expected = sdk_aggregate(chunks)
    got = records[1].response
    assert messages_of(got) == messages_of(expected)
    assert [c["finish_reason"] for c in got["choices"]] == [c["finish_reason"] for c in expected["choices"]]
    assert got["usage"] == expected["usage"] and got["usage"]["total_tokens"] > 0
    # the non-stream twin of the call is the same completion
    plain = c.chat.completions.create(model=f"standin-{scenario}", messages=MESSAGES)
    assert messages_of(got) == messages_of(plain.model_dump(exclude_unset=True))


def test_stream_aggregate_keeps_vendor_fields(proxy, traj_dir, session):
    list(client(proxy, session).chat.completions.create(model="standin-vendor", messages=MESSAGES, stream=True))
    (record,) = wait_records(traj_dir / f"{session}.jsonl", 1)
    plain = json.loads(OpenAI(base_url=f"{proxy.url}/v1", api_key="x").chat.completions.with_raw_response.create(
        model="standin-vendor", messages=MESSAGES).http_response.content)
    for key in set(plain) - {"object", "usage"}:
        assert record.response[key] == plain[key], key
    assert record.response["choices"][0]["message"] == plain["choices"][0]["message"]


def test_async_sdk_stream_and_non_stream(proxy, traj_dir, session):
    async def main():
        c = AsyncOpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key=API_KEY, max_retries=0)
        stream = await c.chat.completions.create(model="standin-tools", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
        plain = await c.chat.completions.create(model="standin-tools", messages=MESSAGES)
        await c.close()
        return chunks, plain

    chunks, plain = asyncio.run(main())
    streamed, non_streamed = wait_records(traj_dir / f"{session}.jsonl", 2)
    assert messages_of(streamed.response) == messages_of(sdk_aggregate(chunks))
    assert non_streamed.response == plain.model_dump(exclude_unset=True)
    calls = streamed.response["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
@pytest.mark.parametrize("stream", [True, False])
def test_content_encoded_bytes_pass_and_record_decodes(proxy, upstream, traj_dir, session, encoding, stream):
    body = json.dumps({"model": "standin-tools", "messages": MESSAGES, "stream": stream})
    out = subprocess.run(
        ["curl", "-sS", "--no-buffer", "-D", "-", f"{proxy.url}/s/{session}/v1/chat/completions",
         "-H", "content-type: application/json", "-H", f"x-standin-encoding: {encoding}",
         "-H", f"authorization: Bearer {API_KEY}", "--data-binary", body],
        capture_output=True, check=True, timeout=30,
    ).stdout
    head, _, got = out.partition(b"\r\n\r\n")
    sent = upstream.sent[-1]
    assert f"content-encoding: {encoding}".encode() in head.lower()
    assert got == sent.body  # curl without --compressed: the encoded bytes as sent
    (record,) = wait_records(traj_dir / f"{session}.jsonl", 1)
    assert record.stream is stream and record.problems == []
    message = record.response["choices"][0]["message"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]


@pytest.mark.parametrize("scenario,status", [("error400", 400), ("error429", 429), ("error500", 500), ("error503", 503)])
@pytest.mark.parametrize("stream", [True, False])
def test_upstream_errors_pass_through_and_are_recorded(proxy, upstream, traj_dir, session, scenario, status, stream):
    with pytest.raises(APIStatusError) as err:
        client(proxy, session).chat.completions.create(model=f"standin-{scenario}", messages=MESSAGES, stream=stream)
    assert err.value.status_code == status
    assert err.value.response.content == upstream.sent[-1].body
    (record,) = wait_records(traj_dir / f"{session}.jsonl", 1)
    assert record.status == status and record.complete
    assert record.response["error"]["type"] == json.loads(upstream.sent[-1].body)["error"]["type"]
    if status == 429:
        assert ("retry-after", "1") in [(k.lower(), v) for k, v in record.response_headers]


def test_stream_dropped_by_upstream_is_recorded_incomplete(proxy, traj_dir, session):
    with pytest.raises(Exception):
        list(client(proxy, session).chat.completions.create(model="standin-drop", messages=MESSAGES, stream=True))
    (record,) = wait_records(traj_dir / f"{session}.jsonl", 1)
    assert record.complete is False
    assert record.error.kind == "upstream_disconnected"
    assert len(record.events) == 3  # what arrived before the cut
    assert record.response["choices"][0]["message"]["content"]


def test_client_hanging_up_mid_stream_is_recorded(proxy, traj_dir, session):
    body = json.dumps({"model": "standin-chunks", "messages": MESSAGES, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(
            f"POST /s/{session}/v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"x-standin-chunks: 50\r\nx-standin-delay-ms: 50\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
        )
        received = b""
        while b"data: " not in received:  # the first event arrives while the upstream keeps going
            received += sock.recv(65536)
    (record,) = wait_records(traj_dir / f"{session}.jsonl", 1)
    assert record.complete is False and record.error.kind == "client_disconnected"
    assert 1 <= len(record.events) < 50


def test_stream_is_not_buffered(proxy, session):
    """The first event reaches the client long before the stream ends."""
    body = {"model": "standin-chunks", "messages": MESSAGES, "stream": True}
    headers = {"x-standin-chunks": "5", "x-standin-delay-ms": "150"}
    start = time.monotonic()
    with httpx.stream("POST", f"{proxy.url}/s/{session}/v1/chat/completions", json=body, headers=headers) as r:
        chunks = r.iter_raw()
        next(chunks)
        first = time.monotonic() - start
        for _ in chunks:
            pass
        total = time.monotonic() - start
    assert total > 0.7
    assert first < 0.4, f"first chunk after {first:.3f}s of {total:.3f}s: buffered?"


@pytest.mark.parametrize("stream", [True, False])
def test_5mb_response(proxy, upstream, traj_dir, session, stream):
    c = client(proxy, session)
    kwargs = dict(model="standin-big", messages=MESSAGES, stream=stream)
    if stream:
        with c.chat.completions.with_streaming_response.create(**kwargs) as resp:
            body = b"".join(resp.iter_bytes())
    else:
        body = c.chat.completions.with_raw_response.create(**kwargs).http_response.content
    assert len(body) > 5_000_000 and body == upstream.sent[-1].body
    (record,) = wait_records(traj_dir / f"{session}.jsonl", 1)
    assert len(record.response["choices"][0]["message"]["content"]) >= 5_000_000


def test_secrets_never_reach_the_trajectory(proxy, upstream, traj_dir, session):
    c = client(proxy, session, default_headers={"x-api-key": API_KEY, "api-key": API_KEY})
    c.chat.completions.create(
        model="standin-echo", messages=[{"role": "user", "content": f"my key is {API_KEY}"}],
        extra_body={"api_key": "body-secret-value-123456", "max_tokens": 7},
    )
    (record,) = wait_records(traj_dir / f"{session}.jsonl", 1)
    text = (traj_dir / f"{session}.jsonl").read_text()
    assert API_KEY not in text and "body-secret-value-123456" not in text
    assert "Bearer" not in text
    assert record.request["max_tokens"] == 7 and record.request["api_key"] == "[REDACTED]"
    headers = {k.lower(): v for k, v in record.request_headers}
    assert headers["authorization"] == headers["x-api-key"] == headers["api-key"] == "[REDACTED]"
    # forwarded all the same: the upstream saw the key and the field
    seen = upstream.requests[-1]
    assert seen.header("authorization") == f"Bearer {API_KEY}" and seen.header("x-api-key") == API_KEY
    assert json.loads(seen.body)["api_key"] == "body-secret-value-123456"


def test_session_from_header_and_default(proxy, upstream, traj_dir, session):
    OpenAI(base_url=f"{proxy.url}/v1", api_key="x", default_headers={"x-llm-traj-session": session}).chat.completions.create(
        model="standin-text", messages=MESSAGES)
    assert "x-llm-traj-session" not in {k.lower() for k, _ in upstream.requests[-1].headers}
    (record,) = wait_records(traj_dir / f"{session}.jsonl", 1)
    assert record.session == session
    before = len(list(read_records(traj_dir / "default.jsonl"))) if (traj_dir / "default.jsonl").exists() else 0
    OpenAI(base_url=f"{proxy.url}", api_key="x").chat.completions.create(model="standin-text", messages=MESSAGES)
    records = wait_records(traj_dir / "default.jsonl", before + 1)
    assert records[-1].url.endswith("/chat/completions") and "/v1/" not in records[-1].url  # no /v1 prefix
    assert records[-1].index == before + 1


@pytest.mark.parametrize("bad", ["..%2F..%2Fetc", "%2E%2E", ".hidden", "a%00b", "a" * 200])
def test_bad_session_ids_are_refused(proxy, traj_dir, bad):
    r = httpx.post(f"{proxy.url}/s/{bad}/v1/chat/completions", json={"model": "standin-text", "messages": MESSAGES})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_session"
    r = httpx.post(f"{proxy.url}/v1/chat/completions", headers={"x-llm-traj-session": ".."},
                   json={"model": "standin-text", "messages": MESSAGES})
    assert r.status_code == 400
    assert all(p.parent == traj_dir for p in traj_dir.rglob("*"))


def test_concurrent_sessions_keep_their_own_sequence(proxy, traj_dir, session):
    sessions = [f"{session}-{i}" for i in range(6)]

    def agent(s):
        c = client(proxy, s)
        for step in range(5):
            list(c.chat.completions.create(model="standin-text", messages=[{"role": "user", "content": f"{s} {step}"}],
                                           stream=step % 2 == 0))

    threads = [threading.Thread(target=agent, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in sessions:
        records = wait_records(traj_dir / f"{s}.jsonl", 5)
        assert [r.index for r in records] == [1, 2, 3, 4, 5]
        assert [r.request["messages"][0]["content"] for r in records] == [f"{s} {i}" for i in range(5)]


def test_other_traffic_passes_untouched_and_unrecorded(proxy, upstream, traj_dir, session):
    before = {p.name for p in traj_dir.iterdir()} - {"models.json"}
    r = httpx.get(f"{proxy.url}/plain")
    assert r.text == "hello from standin\n"
    models = OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key="x").models.list()
    assert upstream.requests[-1].path == "/v1/models"
    assert any(m.id == "standin-text" for m in models)
    # no call is recorded; the model list is kept beside the trajectory, for offline replay
    deadline = time.monotonic() + 5
    while not (traj_dir / "models.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert {p.name for p in traj_dir.iterdir()} == before | {"models.json"}
    # kept as the upstream answered it (not as an SDK version re-serialises it)
    answered = httpx.get(f"{upstream.url}/v1/models").json()
    assert [a.body for a in read_kept(traj_dir / "models.json") if a.path == "/v1/models"] == [answered]


def test_malformed_request_body_is_forwarded_and_recorded(proxy, upstream, traj_dir, session):
    r = httpx.post(f"{proxy.url}/s/{session}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.content == upstream.sent[-1].body
    (record,) = wait_records(traj_dir / f"{session}.jsonl", 1)
    assert record.request is None and record.request_raw == "{not json" and record.status == 400


def test_a_bad_option_set_at_runtime_is_refused_and_recording_goes_on(upstream, tmp_path):
    """`:set llm_traj_retries=99` (here through mitmproxy's `set` command, from a
    test script in the same mitmdump) is refused; the old value stays, and so
    does recording."""
    script = Path(__file__).with_name("runtime_set.py")
    options = {"llm_traj_path": tmp_path, "llm_traj_retries": 1}
    with ProxyProcess(upstream=upstream.url, options=options, extra_args=["-s", str(script)]) as p:
        refused = httpx.get(f"{p.url}/__set__/llm_traj_retries/99")
        assert refused.status_code == 400 and "llm_traj_retries=99 must be between 0 and 20" in refused.text
        assert httpx.get(f"{p.url}/__get__/llm_traj_retries").text == "1"
        assert httpx.get(f"{p.url}/__set__/llm_traj_mode/replay-ish").status_code == 400
        assert httpx.get(f"{p.url}/__set__/llm_traj_retries/2").status_code == 200  # a good value still goes in
        assert httpx.get(f"{p.url}/__get__/llm_traj_retries").text == "2"
        answer = client(p, "after-refusal").chat.completions.create(model="m", messages=MESSAGES)
        (record,) = wait_records(tmp_path / "after-refusal.jsonl", 1)
    assert record.response["choices"][0]["message"]["content"] == answer.choices[0].message.content
    assert record.upstream.route == "agent" and len(record.upstream.attempts) == 1  # through the retrying client


def test_dead_upstream_gives_502_and_a_record(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens here once closed
    # Record mode keeps the user's connection_strategy: with mitmproxy's default
    # (eager) a dead upstream drops the agent's connection before any request.
    options = {"llm_traj_path": tmp_path, "connection_strategy": "lazy"}
    with ProxyProcess(upstream=f"http://127.0.0.1:{dead}", options=options) as p:
        with pytest.raises(APIStatusError) as err:
            OpenAI(base_url=f"{p.url}/v1", api_key="x", max_retries=0).chat.completions.create(
                model="m", messages=MESSAGES)
        assert err.value.status_code == 502
        assert err.value.body["code"] == "upstream_unreachable" and "llm-traj: " in err.value.message
        (record,) = wait_records(tmp_path / "default.jsonl", 1)
    assert record.complete is False and record.error.kind == "upstream_unreachable"
    assert record.status is None


def test_kill_9_leaves_only_whole_lines(upstream, tmp_path):
    path = tmp_path / "all.jsonl"
    p = ProxyProcess(upstream=upstream.url, options={"llm_traj_path": path}).start()
    try:
        stop = threading.Event()

        def agent(i):
            c = OpenAI(base_url=f"{p.url}/s/k{i}/v1", api_key="x", max_retries=0)
            while not stop.is_set():
                try:
                    list(c.chat.completions.create(model="standin-text", messages=MESSAGES, stream=True))
                except Exception:
                    return

        threads = [threading.Thread(target=agent, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        # Killed mid-traffic once some calls are written (not after a fixed time: a loaded machine is slow)
        deadline = time.monotonic() + 30
        while (path.read_bytes().count(b"\n") if path.exists() else 0) <= 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        p.stop()
    records = list(read_records(path))  # raises on any line that does not parse
    assert len(records) > 4
    for i in range(4):
        indexes = [r.index for r in records if r.session == f"k{i}"]
        assert indexes == sorted(indexes) and len(set(indexes)) == len(indexes)


def test_regular_mode_via_https_proxy(tmp_path):
    """HTTPS_PROXY mode: the agent trusts mitmproxy's CA, mitmproxy talks TLS to
    an HTTPS upstream with its own self-signed certificate."""
    from llmtraj.testing.standin import StandinUpstream, make_self_signed_cert

    cert, key = make_self_signed_cert(tmp_path)
    confdir = tmp_path / "mitm"
    with StandinUpstream(tls=(cert, key)) as up, ProxyProcess(
        options={"llm_traj_path": tmp_path / "traj", "confdir": confdir, "ssl_insecure": "true"}
    ) as p:
        trust_mitmproxy = ssl.create_default_context(cafile=confdir / "mitmproxy-ca-cert.pem")
        http_client = httpx.Client(proxy=p.url, verify=trust_mitmproxy)
        c = OpenAI(base_url=f"{up.url}/v1", api_key=API_KEY, http_client=http_client, max_retries=0)
        chunks = list(c.chat.completions.create(model="standin-tools", messages=MESSAGES, stream=True))
        plain = c.chat.completions.create(model="standin-text", messages=MESSAGES)
        streamed, non_streamed = wait_records(tmp_path / "traj" / "default.jsonl", 2)
    assert streamed.url.startswith("https://127.0.0.1:")
    assert messages_of(streamed.response) == messages_of(sdk_aggregate(chunks))
    assert non_streamed.response == plain.model_dump(exclude_unset=True)
    assert API_KEY not in (tmp_path / "traj" / "default.jsonl").read_text()


def test_record_writer_killed_is_restarted(upstream, tmp_path):
    """The record writer is a child process: if it dies, the proxy says so and
    starts another for the next calls; the agent never notices."""
    from ..cli.test_cli_run import processes_mentioning

    path = tmp_path / "traj"
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": path}) as p:
        c = OpenAI(base_url=f"{p.url}/v1", api_key="x", max_retries=0)
        c.chat.completions.create(model="standin-text", messages=MESSAGES)
        wait_records(path / "default.jsonl", 1)
        (writer,) = set(processes_mentioning("llmtraj.recording.writer")) & set(processes_mentioning(str(path))) - {p.pid}
        os.kill(writer, signal.SIGKILL)
        for _ in range(3):  # the first may find the pipe broken: sent again to the next writer
            c.chat.completions.create(model="standin-text", messages=MESSAGES)
        records = wait_records(path / "default.jsonl", 4)
    assert [r.index for r in records] == [1, 2, 3, 4]
    assert "the record writer stopped (killed by signal 9); starting another" in p.output()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="a Linux scheduling policy")
def test_record_writer_runs_as_a_batch_process(upstream, tmp_path):
    """The writer, woken by every call's capture, does not preempt the proxy
    sending the agent its answer: it runs as a batch process (issue 19)."""
    from ..cli.test_cli_run import processes_mentioning

    path = tmp_path / "traj"
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": path}) as p:
        OpenAI(base_url=f"{p.url}/v1", api_key="x", max_retries=0).chat.completions.create(model="standin-text", messages=MESSAGES)
        wait_records(path / "default.jsonl", 1)
        (writer,) = set(processes_mentioning("llmtraj.recording.writer")) & set(processes_mentioning(str(path))) - {p.pid}
        assert os.sched_getscheduler(writer) == os.SCHED_BATCH


def test_log_has_no_line_per_streamed_call(upstream, tmp_path):
    """mitmproxy's "Streaming response from ..." notices, one per recorded call,
    are dropped; its other lines stay."""
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": tmp_path}) as p:
        client = OpenAI(base_url=f"{p.url}/v1", api_key=API_KEY, max_retries=0)
        list(client.chat.completions.create(model="standin-text", messages=MESSAGES, stream=True))
        client.chat.completions.create(model="standin-text", messages=MESSAGES)
        wait_records(tmp_path / "default.jsonl", 2)
    output = p.output()
    assert "Streaming response" not in output and "Streaming request" not in output
    assert "client connect" in output and "POST" in output


def test_flow_files_keep_the_annotations(upstream, tmp_path):
    """With -w the saved flows carry llm-traj's marks and comments, as mitmweb shows them."""
    from mitmproxy import io

    flows = tmp_path / "flows.mitm"
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": tmp_path}, extra_args=["-w", str(flows)]) as p:
        client = OpenAI(base_url=f"{p.url}/s/saved/v1", api_key=API_KEY, max_retries=0)
        client.chat.completions.create(model="standin-text", messages=MESSAGES)
        httpx.get(f"{p.url}/plain")
    with open(flows, "rb") as fh:
        call, other = list(io.FlowReader(fh).stream())
    assert call.comment == "llm-traj saved #1, record" and call.marked
    assert other.comment == "" and not other.marked
