"""Faults end to end through a real mitmdump (issue 15): each failure is
recorded with the side that caused it and the status the agent saw (None when
no response came), and no call whose answer reached the agent is lost when the
record writer or mitmdump itself is killed."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import Counter

import httpx
import pytest
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.core.store import read_records
from llmtraj.testing.standin import FIXTURES
from openai import OpenAI

from ..cli.test_cli_run import processes_mentioning
from ..conftest import wait_records
from .scripted_upstream import ScriptedUpstream

MESSAGES = [{"role": "user", "content": "Say hello"}]


def writer_pid(path, proxy) -> int:
    """The record writer's pid, once one runs (after a death the next one may start a moment later)."""
    deadline = time.monotonic() + 15
    while len(pids := set(processes_mentioning("llmtraj.recording.writer")) & set(processes_mentioning(str(path))) - {proxy.pid}) != 1:
        assert time.monotonic() < deadline, f"record writers running: {pids}"
        time.sleep(0.05)
    (pid,) = pids
    return pid


def test_an_agent_hanging_up_while_sending_its_request_is_recorded_as_such(upstream, tmp_path):
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": tmp_path}) as p:
        with socket.create_connection(("127.0.0.1", p.port)) as sock:
            sock.sendall(b"POST /s/hangup/v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b'content-length: 10000\r\n\r\n{"model": "m", "messages": [')
            time.sleep(0.3)  # the proxy has the head and is streaming the body upstream
        (record,) = wait_records(tmp_path / "hangup.jsonl", 1)
    assert record.complete is False and record.error.kind == "client_disconnected"
    assert record.status is None  # (the part of the body sent so far, if the upstream had it, is in `request_raw`)


@pytest.fixture
def hangs_up_upstream():
    """An upstream that reads the request's head and closes the connection without a word."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                data = b""
                while b"\r\n\r\n" not in data and (more := conn.recv(65536)):
                    data += more

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    server.close()


def test_an_upstream_hanging_up_before_answering_is_recorded_with_no_status(hangs_up_upstream, tmp_path):
    with ProxyProcess(upstream=hangs_up_upstream, options={"llm_traj_path": tmp_path}) as p:
        with pytest.raises(Exception):
            OpenAI(base_url=f"{p.url}/v1", api_key="x", max_retries=0).chat.completions.create(model="m", messages=MESSAGES)
        (record,) = wait_records(tmp_path / "default.jsonl", 1)
    assert record.complete is False and record.error.kind == "upstream_disconnected" and record.status is None


def agents(proxy, count: int, stop: threading.Event, answered: Counter, errors: list) -> list[threading.Thread]:
    """`count` agents calling in a loop (streamed and not, in turn), each in its
    own session, counting the calls whose whole answer they got."""

    def agent(i: int) -> None:
        c = OpenAI(base_url=f"{proxy.url}/s/a{i}/v1", api_key="x", max_retries=0)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if n % 2:
                    chunks = list(c.chat.completions.create(model="standin-text", messages=MESSAGES, stream=True))
                    assert chunks[-1].choices[0].finish_reason == "stop"
                else:
                    c.chat.completions.create(model="standin-text", messages=MESSAGES)
            except Exception as exc:  # noqa: BLE001 - a proxy killed under it
                errors.append(exc)
                return
            answered[f"a{i}"] += 1

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    return threads


def on_disk(path) -> Counter:
    calls = Counter()
    seen = set()
    for r in read_records(path):
        assert (r.session, r.index) not in seen, f"{r.session}#{r.index} written twice"
        seen.add((r.session, r.index))
        calls[r.session] += 1
    return calls


def test_killing_the_writer_under_load_loses_no_call(upstream, tmp_path):
    path = tmp_path / "traj"
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": path}) as p:
        stop, answered, errors = threading.Event(), Counter(), []
        threads = agents(p, 8, stop, answered, errors)
        for _ in range(3):
            time.sleep(1.0)
            os.kill(writer_pid(path, p), signal.SIGKILL)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        deadline = time.monotonic() + 30
        while on_disk(path) != answered and time.monotonic() < deadline:
            time.sleep(0.1)
        output = p.output()
    assert errors == []  # the agents never noticed
    assert sum(answered.values()) > 16 and on_disk(path) == answered
    assert output.count("the record writer stopped (killed by signal 9)") == 3


CHAT_EVENTS = [
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}\n\n',
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    b'"delta":{},"finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
]
ANTHROPIC_EVENTS = [
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant",'
    b'"model":"m","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":0}}}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":1}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]


RESPONSES_EVENTS = [
    block + b"\n\n" for block in (FIXTURES / "responses" / "text.sse").read_bytes().split(b"\n\n") if block
]


@pytest.mark.parametrize("path, events, final, together", [
    ("/v1/chat/completions", CHAT_EVENTS, "data: [DONE]", False),
    ("/v1/messages", ANTHROPIC_EVENTS, "event: message_stop", False),
    ("/v1/responses", RESPONSES_EVENTS, "event: response.completed", False),
    ("/v1/chat/completions", CHAT_EVENTS, "data: [DONE]", True),
    ("/v1/messages", ANTHROPIC_EVENTS, "event: message_stop", True),
], ids=["chat", "anthropic", "responses", "chat-one-chunk", "anthropic-one-chunk"])  # fmt: skip
def test_killing_mitmdump_once_the_agent_has_the_final_event_loses_nothing(tmp_path, path, events, final, together):
    """SDKs stop reading at their API's final event (the openai SDKs return at
    `data: [DONE]` and close), before the body's own end, which here comes 3 s
    later. The agent reads to that event and, its connection still open,
    mitmdump is killed: the capture went into the writer's pipe with the final
    event, so the call is on disk, complete. The events come a chunk each, or
    all in one chunk (as an upstream that flushes late sends them)."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    chunks = [b"".join(events)] if together else events
    answer = head + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    traj = tmp_path / "traj"
    with ScriptedUpstream([answer, b"0\r\n\r\n"], gap=3.0) as upstream:
        p = ProxyProcess(upstream=upstream.url, options={"llm_traj_path": traj}).start()
        try:
            with httpx.stream("POST", f"{p.url}/s/k{path}", json={"model": "m", "stream": True, "messages": MESSAGES},
                              headers={"authorization": "Bearer x"}, timeout=10) as response:  # fmt: skip
                for line in response.iter_lines():
                    if line == final:
                        os.kill(p.pid, signal.SIGKILL)
                        break
        finally:
            p.stop()
        [record] = wait_records(traj / "k.jsonl", 1)
    assert record.complete and record.status == 200 and len(record.events) == len(events)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_killing_mitmdump_as_soon_as_the_agent_has_its_answer_loses_nothing(upstream, tmp_path, stream):
    """The capture is in the writer's pipe before the agent gets the end of the
    response; the writer, in its own session, writes it after mitmdump died."""
    path = tmp_path / "traj"
    for round_ in range(3):
        p = ProxyProcess(upstream=upstream.url, options={"llm_traj_path": path}).start()
        try:
            c = OpenAI(base_url=f"{p.url}/s/k/v1", api_key="x", max_retries=0)
            if stream:
                list(c.chat.completions.create(model="standin-text", messages=MESSAGES, stream=True))
            else:
                c.chat.completions.create(model="standin-text", messages=MESSAGES)
            os.kill(p.pid, signal.SIGKILL)
        finally:
            p.stop()
        records = wait_records(path / "k.jsonl", round_ + 1)
    assert [r.index for r in records] == [1, 2, 3] and all(r.complete for r in records)
