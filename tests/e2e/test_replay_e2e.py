"""Replay mode end to end: calls recorded through a real mitmdump in record
mode against the stand-in upstream, then replayed by a second mitmdump in
replay mode whose upstream is a port where nothing listens (or the stand-in,
counting connections), driven by the real openai SDK, httpx and curl."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from llmtraj.cli.proxy_process import ProxyProcess, ProxyStartError
from llmtraj.core.store import read_records
from openai import OpenAI

from ..replay.test_replay import agent_steps
from .test_record_e2e import (
    API_KEY,
    MESSAGES,
    STREAM_SCENARIOS,
    messages_of,
    sdk_aggregate,
)

ERRORS = ["error400", "error429", "error500", "error503"]
CURL_SCENARIOS = ["tools", "crlf", "multiline"]
PACE = {"x-standin-chunks": "4", "x-standin-delay-ms": "100"}  # 7 events 100 ms apart


def client(proxy: ProxyProcess, session: str) -> OpenAI:
    return OpenAI(base_url=f"{proxy.url}/s/{session}/v1", api_key=API_KEY, max_retries=0)


def sdk_calls(c: OpenAI, scenario: str) -> list[Any]:
    """A stream with usage, the same call not streamed, and the SDK's stream helper."""
    model = f"standin-{scenario}"
    chunks = list(c.chat.completions.create(model=model, messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    plain = c.chat.completions.create(model=model, messages=MESSAGES)
    with c.chat.completions.stream(model=model, messages=MESSAGES) as stream:
        helper = stream.get_final_completion()
    return [chunks, plain, helper]


def curl(proxy: ProxyProcess, session: str, scenario: str, stream: bool) -> tuple[int, bytes, bytes]:
    """(exit code, response head, body) as curl gets them."""
    body = json.dumps({"model": f"standin-{scenario}", "messages": MESSAGES, "stream": stream})
    out = subprocess.run(
        ["curl", "-sS", "--no-buffer", "-D", "-", f"{proxy.url}/s/{session}/v1/chat/completions",
         "-H", "content-type: application/json", "--data-binary", body],
        capture_output=True, timeout=30,
    )  # fmt: skip
    head, _, got = out.stdout.partition(b"\r\n\r\n")
    return out.returncode, head, got


def raw_call(proxy: ProxyProcess, session: str, model: str, stream: bool, **kw: Any) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "stream": stream, **kw.pop("extra", {})}
    return httpx.post(f"{proxy.url}/s/{session}/v1/chat/completions", json=body, timeout=30, **kw)


def echo_request(session: str, step: int) -> dict:
    return {"model": "standin-echo", "messages": [{"role": "user", "content": f"{session} step {step}"}]}


def agent_call(proxy: ProxyProcess, session: str, request: dict) -> httpx.Response:
    return httpx.post(f"{proxy.url}/s/{session}/v1/chat/completions", json=request, timeout=30)


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens here once closed


def wait_output(proxy: ProxyProcess, text: str, timeout: float = 5.0) -> str:
    """The proxy's output once it holds `text` (it is read by a thread)."""
    deadline = time.monotonic() + timeout
    while text not in proxy.output() and time.monotonic() < deadline:
        time.sleep(0.02)
    return proxy.output()


@dataclass
class Recording:
    path: Path
    got: dict[str, Any] = field(default_factory=dict)  # what the clients got at record time, by session


@pytest.fixture(scope="module")
def recording(upstream, tmp_path_factory) -> Recording:
    rec = Recording(tmp_path_factory.mktemp("replay") / "traj")
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_mode": "record", "llm_traj_path": rec.path}) as p:
        for scenario in STREAM_SCENARIOS:
            rec.got[f"sdk-{scenario}"] = sdk_calls(client(p, f"sdk-{scenario}"), scenario)
            c = client(p, f"cross-{scenario}")
            rec.got[f"cross-{scenario}"] = sdk_calls(c, scenario)[:2]  # a stream, then the same call not streamed
        rec.got["curl"] = [curl(p, "curl", s, stream) for s in CURL_SCENARIOS for stream in (True, False)]
        rec.got["drop"] = [curl(p, "drop", "drop", stream) for stream in (True, False)]
        rec.got["errors"] = [raw_call(p, "errors", f"standin-{e}", stream) for e in ERRORS for stream in (True, False)]
        for session in ("conc-a", "conc-b"):
            rec.got[session] = [agent_call(p, session, echo_request(session, k)).json() for k in range(1, 5)]
        for request in agent_steps(5):
            agent_call(p, "agent", request)
        for session in ("paced-0", "paced-1"):
            start = time.monotonic()
            with httpx.stream("POST", f"{p.url}/s/{session}/v1/chat/completions", headers=PACE, timeout=30,
                              json={"model": "standin-chunks", "messages": MESSAGES, "stream": True}) as r:  # fmt: skip
                rec.got[session] = (b"".join(r.iter_raw()), time.monotonic() - start)
        for k in (1, 2):
            agent_call(p, "pos", {"model": "standin-text", "messages": [{"role": "user", "content": f"pos {k}"}]})
    expected = {"agent": 5, "conc-a": 4, "pos": 2, "errors": 8, "curl": 6, "sdk-text": 3}
    for session, count in expected.items():  # every record is written once the proxy has stopped
        assert len(list(read_records(rec.path / f"{session}.jsonl"))) == count
    return rec


@pytest.fixture(scope="module")
def replayer(recording):
    """Replays with no upstream at all: any attempt to reach one would fail."""
    upstream = dead_address()
    with ProxyProcess(upstream=upstream, options={"llm_traj_mode": "replay", "llm_traj_path": recording.path}) as p:
        p.dead_upstream = upstream
        yield p
    assert f"server connect {upstream.removeprefix('http://')}" not in p.output()


# ------------------------------------------------------------ faithful replay


@pytest.mark.parametrize("scenario", STREAM_SCENARIOS)
def test_sdk_round_trip_stream_non_stream_and_stream_helper(replayer, recording, scenario):
    session = f"sdk-{scenario}"
    chunks, plain, helper = sdk_calls(client(replayer, session), scenario)
    rec_chunks, rec_plain, rec_helper = recording.got[session]
    assert chunks == rec_chunks
    assert plain == rec_plain
    assert helper == rec_helper
    if scenario == "tools":
        assert [t.function.name for t in helper.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    if scenario == "n":
        assert len(plain.choices) == 2
    assert plain.usage.total_tokens > 0 and chunks[-1].usage == rec_chunks[-1].usage


@pytest.mark.parametrize("scenario", STREAM_SCENARIOS)
def test_stream_and_non_stream_recordings_swap(replayer, recording, scenario):
    """Asked in the other order, the stream recording answers the non-stream
    call with its aggregate, and the non-stream one answers the stream with
    chunks the SDK folds into the same completion."""
    rec_chunks, rec_plain = recording.got[f"cross-{scenario}"]
    c = client(replayer, f"cross-{scenario}")
    raw = c.chat.completions.with_raw_response.create(model=f"standin-{scenario}", messages=MESSAGES)
    assert raw.headers["x-llm-traj-match"] == "exact" and raw.headers["x-llm-traj-step"] == f"cross-{scenario}#1"
    plain = raw.parse()
    assert plain == rec_plain
    chunks = list(c.chat.completions.create(model=f"standin-{scenario}", messages=MESSAGES, stream=True))
    got, expected = sdk_aggregate(chunks), sdk_aggregate(rec_chunks)
    assert messages_of(got) == messages_of(expected)
    assert [ch["finish_reason"] for ch in got["choices"]] == [ch["finish_reason"] for ch in expected["choices"]]
    assert got["usage"] == expected["usage"] == rec_plain.usage.model_dump(exclude_unset=True)


def test_curl_sees_the_recorded_bytes(replayer, recording):
    got = [curl(replayer, "curl", s, stream) for s in CURL_SCENARIOS for stream in (True, False)]
    for (code, head, body), (rec_code, rec_head, rec_body), stream in zip(got, recording.got["curl"], [True, False] * 3):
        assert code == rec_code == 0
        if stream:
            assert body == rec_body  # every SSE block, byte for byte
            assert b"content-type: text/event-stream" in head.lower()
        else:
            assert json.loads(body) == json.loads(rec_body)  # the JSON is kept, not its bytes


def test_recorded_failures_replay_with_their_status_and_body(replayer, recording):
    got = [raw_call(replayer, "errors", f"standin-{e}", stream) for e in ERRORS for stream in (True, False)]
    for r, rec in zip(got, recording.got["errors"]):
        assert (r.status_code, r.content) == (rec.status_code, rec.content)
        assert r.headers.get("retry-after") == rec.headers.get("retry-after")
        assert r.headers["x-llm-traj-match"] == "exact"
    assert [r.status_code for r in got] == [400, 400, 429, 429, 500, 500, 503, 503]


def test_calls_cut_short_replay_as_the_agent_got_them(replayer, recording):
    (code, _, body), (rec_code, _, rec_body) = curl(replayer, "drop", "drop", True), recording.got["drop"][0]
    assert code == rec_code == 18  # the stream up to the cut, then curl: transfer closed with data outstanding
    assert body == rec_body and body
    (code, head, body), (rec_code, rec_head, rec_body) = curl(replayer, "drop", "drop", False), recording.got["drop"][1]
    assert code == rec_code == 18  # a JSON body streams too: what arrived, then the cut
    assert head.startswith(b"HTTP/1.1 200") and rec_head.startswith(b"HTTP/1.1 200")
    assert body == rec_body and body


def test_concurrent_sessions_interleaved_differently(replayer, recording):
    """Recorded one session after the other; replayed side by side, b first."""
    turn = threading.Barrier(2)
    results: dict[str, list] = {}

    def agent(session: str, lag: float) -> None:
        results[session] = []
        for k in range(1, 5):
            turn.wait(10)
            time.sleep(lag)
            r = agent_call(replayer, session, echo_request(session, k))
            results[session].append((r.headers["x-llm-traj-match"], r.json()))

    threads = [threading.Thread(target=agent, args=a) for a in (("conc-a", 0.01), ("conc-b", 0.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for session in ("conc-a", "conc-b"):
        assert [m for m, _ in results[session]] == ["exact"] * 4
        assert [body for _, body in results[session]] == recording.got[session]


def test_divergent_agent_gets_an_error_naming_step_3(replayer):
    steps = agent_steps(5)
    for request in steps[:2]:
        assert agent_call(replayer, "agent", request).headers["x-llm-traj-match"] == "exact"
    changed = json.loads(json.dumps(steps[2]))
    changed["messages"][-1]["content"] = "observation 3 (changed)"
    r = agent_call(replayer, "agent", changed)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "replay_diverged" and error["type"] == "invalid_request_error"
    assert error["message"] == (
        "llm-traj replay: the request diverges from the recording of session 'agent' at step 3 (of 5): "
        'messages[5].content: recorded "observation 3", request "observation 3 (changed)"'
    )
    assert error["message"] in wait_output(replayer, "at step 3 (of 5)")  # the log says it too
    assert agent_call(replayer, "agent", steps[2]).headers["x-llm-traj-match"] == "exact"  # the miss moved nothing


def test_unknown_session_and_exhausted_session_answer_at_once(replayer):
    r = agent_call(replayer, "nobody", echo_request("nobody", 1))
    assert r.status_code == 400 and r.json()["error"]["code"] == "replay_unknown_session"
    assert "session 'nobody' is not in the recording (it has: agent, conc-a, conc-b, cross-crlf, cross-logprobs, … (25 in all))" in r.json()["error"]["message"]
    for k in (1, 2):
        agent_call(replayer, "pos", {"model": "standin-text", "messages": [{"role": "user", "content": f"pos {k}"}]})
    r = agent_call(replayer, "pos", {"model": "standin-text", "messages": [{"role": "user", "content": "pos 3"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "replay_exhausted"


def test_instant_stream_and_report_on_request(replayer, recording):
    start = time.monotonic()
    with httpx.stream("POST", f"{replayer.url}/s/paced-0/v1/chat/completions", headers=PACE, timeout=30,
                      json={"model": "standin-chunks", "messages": MESSAGES, "stream": True}) as r:  # fmt: skip
        body = b"".join(r.iter_raw())
    elapsed = time.monotonic() - start
    recorded_body, recorded_elapsed = recording.got["paced-0"]
    assert body == recorded_body and recorded_elapsed > 0.6 and elapsed < 0.3
    full = httpx.get(f"{replayer.url}/llm-traj/replay-report").json()
    report = full["sessions"]
    assert report["paced-0"] == {"recorded": 1, "served": 1, "unserved": 0, "rungs": {"exact": 1}, "rules": {},
                                 "nearest": [], "misses": 0, "first_divergence": None, "unreadable": None}  # fmt: skip
    # sessions never asked for are never read: counted, not listed
    assert "paced-1" not in report and full["sessions_not_asked"] >= 1 and report["nobody"]["misses"] >= 1


# ------------------------------------------- a live upstream that is never used


def test_live_upstream_is_never_connected_and_speed_1_keeps_the_pace(upstream, recording):
    options = {"llm_traj_mode": "replay", "llm_traj_path": recording.path, "llm_traj_replay_speed": "1",
               "llm_traj_replay_position": "true"}  # fmt: skip
    with ProxyProcess(upstream=upstream.url, options=options) as p:
        connections, requests = upstream.connections, len(upstream.requests)
        times, chunks = [], []
        start = time.monotonic()
        with httpx.stream("POST", f"{p.url}/s/paced-1/v1/chat/completions", headers=PACE, timeout=30,
                          json={"model": "standin-chunks", "messages": MESSAGES, "stream": True}) as r:  # fmt: skip
            for chunk in r.iter_raw():
                times.append(time.monotonic() - start)
                chunks.append(chunk)
        (record,) = read_records(recording.path / "paced-1.jsonl")
        first, last = record.events[0].t, record.events[-1].t
        assert b"".join(chunks) == recording.got["paced-1"][0]
        assert len(chunks) >= 5, "paced events must arrive one by one"
        assert times[0] < first + 0.15  # the first event comes at once
        assert (last - first) * 0.9 < times[-1] < (last - first) + 0.35
        # position rung: a changed request still gets the call at the cursor
        r = agent_call(p, "pos", {"model": "standin-text", "messages": [{"role": "user", "content": "changed"}]})
        assert (r.status_code, r.headers["x-llm-traj-match"], r.headers["x-llm-traj-step"]) == (200, "position", "pos#1")
        list(client(p, "sdk-tools").chat.completions.create(model="standin-tools", messages=MESSAGES, stream=True))
        assert upstream.connections == connections and len(upstream.requests) == requests


# ------------------------------------------------------------- miss policies


@pytest.mark.parametrize("policy", ["forward", "forward-record"])
def test_misses_forwarded_upstream_and_maybe_recorded(upstream, recording, tmp_path, policy):
    new = tmp_path / "new"
    options = {"llm_traj_mode": "replay", "llm_traj_path": recording.path, "llm_traj_replay_miss": policy}
    if policy == "forward-record":
        options["llm_traj_replay_record_path"] = new
    source = (recording.path / "agent.jsonl").read_bytes()
    steps = agent_steps(5)
    with ProxyProcess(upstream=upstream.url, options=options) as p:
        connections = upstream.connections
        for request in steps[:2]:
            assert agent_call(p, "agent", request).headers["x-llm-traj-match"] == "exact"
        assert upstream.connections == connections
        changed = json.loads(json.dumps(steps[2]))
        changed["messages"][-1]["content"] = "observation 3 (changed)"
        r = agent_call(p, "agent", changed)
        assert r.status_code == 200 and "x-llm-traj-match" not in r.headers  # the upstream's own answer
        assert json.loads(upstream.requests[-1].body) == changed
        assert "forwarded upstream" in wait_output(p, "forwarded upstream")
    assert (recording.path / "agent.jsonl").read_bytes() == source
    if policy == "forward":
        assert not new.exists()
    else:
        (record,) = read_records(new / "agent.jsonl")
        assert record.request == changed and record.mode == "replay" and record.index == 1 and record.complete
        assert record.response == r.json()


# ------------------------------------------------------ startup and shutdown


def replay_start_error(path: Path, **options: str) -> str:
    """The one line a replay proxy that must refuse to start (exit code 1) gives."""
    p = ProxyProcess(upstream=dead_address(), options={"llm_traj_mode": "replay", "llm_traj_path": path, **options})
    with pytest.raises(ProxyStartError) as err:
        p.start()
    assert p.stop() == 1
    assert f"llm-traj: {err.value}" in p.output()
    return str(err.value)


@pytest.mark.parametrize("damage,message,readable", [
    (lambda lines: [lines[0], b"{not json", *lines[1:]], "agent.jsonl:2: not valid JSON", 1),
    (lambda lines: [lines[0].replace(b'"schema_version":2', b'"schema_version":9'), *lines[1:]],
     "agent.jsonl:1: schema_version 9 is not supported", 0),
])  # fmt: skip
def test_corrupt_session_fails_its_calls_past_the_bad_line_with_file_and_line(recording, tmp_path, damage, message, readable):
    # Sessions are read when first asked for, so a damaged one is found then:
    # its calls before the bad line replay, the next gets a 500 saying where,
    # the other sessions replay.
    lines = (recording.path / "agent.jsonl").read_bytes().split(b"\n")[:-1]
    (tmp_path / "agent.jsonl").write_bytes(b"\n".join(damage(lines)) + b"\n")
    shutil.copy(recording.path / "pos.jsonl", tmp_path / "pos.jsonl")
    with ProxyProcess(upstream=dead_address(), options={"llm_traj_mode": "replay", "llm_traj_path": tmp_path}) as p:
        for step in agent_steps(readable):
            assert agent_call(p, "agent", step).headers["x-llm-traj-match"] == "exact"
        r = agent_call(p, "agent", agent_steps(readable + 1)[readable])
        assert r.status_code == 500 and r.json()["error"]["code"] == "replay_unreadable"
        assert str(tmp_path / message) in r.json()["error"]["message"]
        assert str(tmp_path / message) in wait_output(p, message)
        r = agent_call(p, "pos", {"model": "standin-text", "messages": [{"role": "user", "content": "pos 1"}]})
        assert r.headers["x-llm-traj-match"] == "exact"


def test_a_single_file_with_a_line_of_no_session_skips_it_with_a_warning(recording, tmp_path):
    lines = (recording.path / "agent.jsonl").read_bytes().split(b"\n")[:-1]
    (tmp_path / "all.jsonl").write_bytes(b"\n".join([lines[0], b"{not json", *lines[1:]]) + b"\n")
    with ProxyProcess(upstream=dead_address(), options={"llm_traj_mode": "replay", "llm_traj_path": tmp_path / "all.jsonl"}) as p:
        assert f"llm-traj: {tmp_path / 'all.jsonl'}:2: not valid JSON" in wait_output(p, "all.jsonl:2")  # at startup
        for step in agent_steps(5):  # no line of the session was lost: it replays whole
            assert agent_call(p, "agent", step).headers["x-llm-traj-match"] == "exact"


@pytest.mark.parametrize("options,message", [
    ({"llm_traj_replay_speed": "fast"}, "llm_traj_replay_speed='fast' is not a number >= 0"),
    ({"llm_traj_replay_miss": "forward-record"}, "llm_traj_replay_miss=forward-record needs --set llm_traj_replay_record_path"),
    ({"llm_traj_replay_miss": "retry"}, "llm_traj_replay_miss='retry' is not a policy"),
    ({"llm_traj_replay_miss": "forward-record", "llm_traj_replay_record_path": "SOURCE"},
     "llm_traj_replay_record_path must differ from llm_traj_path"),
])  # fmt: skip
def test_bad_replay_options_refuse_to_start(recording, options, message):
    options = {k: recording.path if v == "SOURCE" else v for k, v in options.items()}
    assert replay_start_error(recording.path, **options).startswith(message)


def test_nothing_to_replay_refuses_to_start(tmp_path):
    assert replay_start_error(tmp_path).startswith(f"{tmp_path}: no trajectory there")


def test_torn_last_line_is_skipped_with_a_warning_and_report_at_shutdown(recording, tmp_path):
    single = tmp_path / "all.jsonl"
    whole = (recording.path / "pos.jsonl").read_bytes()
    single.write_bytes(whole + whole.split(b"\n")[0][:100])  # a crash mid-write of a third record
    p = ProxyProcess(upstream=dead_address(), options={"llm_traj_mode": "replay", "llm_traj_path": single})
    with p:
        assert f"llm-traj: {single}:3: truncated last line (torn write), skipped" in p.output()
        for k in (1, 2):
            r = agent_call(p, "pos", {"model": "standin-text", "messages": [{"role": "user", "content": f"pos {k}"}]})
            assert r.headers["x-llm-traj-match"] == "exact"
        agent_call(p, "pos", {"model": "standin-text", "messages": [{"role": "user", "content": "pos 2"}]})
    output = wait_output(p, "misses; first")
    assert "llm-traj: replay report: 2 of 2 recorded calls served, 1 misses, 1 sessions" in output
    assert ("llm-traj:   pos: 2/2 served (exact 2), 1 misses; first: session 'pos' is exhausted: all 2 recorded "
            "calls were replayed; it equals step 2, already replayed") in output
    shutil.rmtree(tmp_path)
