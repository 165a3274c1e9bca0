"""Replay without mitmproxy: canonical requests, the match ladder and the
per-session cursors, divergence messages, the replies (as recorded, converted
between stream and non-stream, cut short), chunk synthesis, pacing, loading
and the report."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

import pytest
from llmtraj.apis.chat_completions import ChatCompletions
from llmtraj.core.jsontext import first_difference
from llmtraj.core.record import CallError, CallRecord, Timings
from llmtraj.core.store import TrajectoryWriter
from llmtraj.recording.builder import RecordBuilder
from llmtraj.replay import Miss, Replay, ReplayLoadError, Served, load
from llmtraj.replay.matching import DEFAULT_IGNORE, canonical_request
from llmtraj.replay.replies import reply_body

from ..apis.test_chat_aggregate import (
    FIXTURES,
    aggregate,
    blocks_of,
    canon,
    expected_for,
    sdk_accumulate,
)

API = ChatCompletions()
T0 = 1_700_000_000.0
SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("x-request-id", "req-1")]
JSON_HEADERS = [("content-type", "application/json"), ("content-length", "99"), ("set-cookie", "[REDACTED]")]


def chat(*contents: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": c} for c in contents], **extra}


def completion(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "c1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, **extra,
    }  # fmt: skip


def record(session: str, index: int, request: Any, response: Any = None, **kw: Any) -> CallRecord:
    """A non-streamed call as the recorder writes it."""
    return CallRecord(
        session=session, index=index, api="chat.completions", mode="record", method="POST",
        url="http://up/v1/chat/completions", request_headers=[("content-type", "application/json")],
        request=request, status=kw.pop("status", 200), response_headers=kw.pop("response_headers", JSON_HEADERS),
        response=response if response is not None else completion(f"answer {index}"),
        timings=Timings(started_at=T0), **kw,
    )  # fmt: skip


def stream_record(session: str, index: int, request: dict, sse: bytes, pieces: int = 1, step: float = 0.0,
                  fail: str | None = None) -> CallRecord:  # fmt: skip
    """A streamed call recorded by the real tee, its bytes fed in `pieces`
    arriving `step` seconds apart (from T0 + 0.5)."""
    tee = RecordBuilder(api=API, session=session, index=index, mode="record", method="POST", url="http://up/v1/chat/completions",
                  request_headers=[], request_body=json.dumps(request).encode(), started_at=T0)  # fmt: skip
    tee.response_started(200, SSE_HEADERS, now=T0 + 0.1)
    size = -(-len(sse) // pieces)
    for k in range(pieces):
        tee.chunk(sse[k * size : (k + 1) * size], now=T0 + 0.5 + k * step)
    fields = tee.fail("upstream_disconnected", "peer closed", now=T0 + 9) if fail else tee.finish(now=T0 + 9)
    return CallRecord.model_validate(fields)


def live(replay: Replay, request: Any, headers: list[tuple[str, str]] | None = None) -> Any:
    body = request if isinstance(request, bytes) else json.dumps(request).encode()
    return replay.canonical(API, body, headers or [])


def serve(replay: Replay, session: str, request: Any, allow_position: bool = False) -> Served | Miss:
    return replay.match(session, live(replay, request), allow_position)


def header(reply, name: bytes) -> bytes | None:
    return next((v for k, v in reply.headers if k.lower() == name), None)


def test_replay_logic_does_not_import_mitmproxy():
    code = "import sys, llmtraj.replay; print(sorted(m for m in sys.modules if m.startswith('mitmproxy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "addon")})  # fmt: skip
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------ canonical form


def test_key_order_and_ignored_fields_do_not_matter():
    ignore = frozenset(DEFAULT_IGNORE)
    a = canonical_request(API, json.dumps(chat("hi", temperature=0)).encode(), [], ignore)
    b = canonical_request(API, json.dumps(
        {"temperature": 0, "stream": True, "user": "u-42", "metadata": {"run": 7}, "stream_options": {"include_usage": True},
         "messages": [{"content": "hi", "role": "user"}], "model": "m"}).encode(), [], ignore)  # fmt: skip
    assert a.key == b.key
    assert not a.wants_stream and b.wants_stream


@pytest.mark.parametrize("change", [
    {"temperature": 0.5}, {"temperature": 0.0}, {"temperature": False}, {"model": "m2"}, {"tools": []},
])  # fmt: skip
def test_every_other_field_matters_and_types_are_strict(change):
    ignore = frozenset(DEFAULT_IGNORE)
    base = canonical_request(API, json.dumps(chat("hi", temperature=0)).encode(), [], ignore)
    other = canonical_request(API, json.dumps({**chat("hi", temperature=0), **change}).encode(), [], ignore)
    assert base.key != other.key
    assert first_difference(base.body, other.body) is not None


def test_ignored_fields_are_configurable():
    r = Replay([record("s", 1, chat("hi", user="a", seed=1))], ignore=["seed"])
    assert isinstance(serve(r, "s", chat("hi", user="a", seed=2)), Served)
    r = Replay([record("s", 1, chat("hi", user="a", seed=1))], ignore=["seed"])
    assert isinstance(serve(r, "s", chat("hi", user="b", seed=1)), Miss)  # `user` no longer ignored


def test_live_request_is_redacted_like_the_recording():
    """The recorder redacted secret fields and scrubbed header secrets from the
    body: a live request with the real values must still match."""
    key = "live-0123456789abcdef"  # no credential shape (an `sk-` key is scrubbed whatever the headers)
    recorded = record("s", 1, {**chat("my key is [REDACTED]"), "api_key": "[REDACTED]"})
    r = Replay([recorded])
    got = serve(r, "s", {**chat(f"my key is {key}"), "api_key": "body-secret-123456"})
    assert isinstance(got, Miss)  # no header secret given: the text differs
    r = Replay([recorded])
    request = live(r, {**chat(f"my key is {key}"), "api_key": "body-secret-123456"}, [("authorization", f"Bearer {key}")])
    assert isinstance(r.match("s", request), Served)
    assert key not in json.dumps(request.body)  # nor will it show in a divergence message


def test_a_key_shaped_string_is_scrubbed_like_the_recording_without_headers():
    recorded = record("s", 1, chat("my key is [REDACTED]"))
    assert isinstance(serve(Replay([recorded]), "s", chat("my key is sk-proj-0123456789abcdefghij")), Served)


def test_a_secret_that_is_a_common_word_leaves_the_request_as_it_is():
    """`Authorization: Bearer assistant` is redacted in the header only: the
    body's `"role": "assistant"` is compared as sent."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
    r = Replay([record("s", 1, body)])
    request = live(r, body, [("authorization", "Bearer assistant")])
    assert isinstance(r.match("s", request), Served) and '"assistant"' in request.key


def test_non_json_bodies_match_by_text():
    r = Replay([record("s", 1, None, request_raw="{not json"), record("s", 2, None, request_raw="other")])
    assert serve(r, "s", b"{not json").rung == "exact"
    miss = serve(r, "s", b"{not jsonx")
    assert isinstance(miss, Miss) and 'body: recorded "other", request "{not jsonx"' in miss.message


# --------------------------------------------------------------- the ladder


def test_exact_then_later_then_miss_and_the_cursor():
    r = Replay([record("s", i, chat(f"q{i}")) for i in (1, 2, 3, 4)])
    assert serve(r, "s", chat("q1")).rung == "exact"
    got = serve(r, "s", chat("q3"))  # q2 skipped (or still in flight): later
    assert (got.rung, got.step.index) == ("later", 3)
    assert serve(r, "s", chat("q2")).rung == "exact"  # the cursor stayed at the first unserved step
    assert serve(r, "s", chat("q4")).rung == "exact"  # ... and jumped over 3, served already
    miss = serve(r, "s", chat("q4"))
    assert isinstance(miss, Miss) and miss.code == "replay_exhausted"
    assert "session 's' is exhausted: all 4 recorded calls were replayed; it equals step 4, already replayed" in miss.message


def test_identical_requests_replay_in_recorded_order():
    r = Replay([record("s", i, chat("same"), completion(f"answer {i}")) for i in (1, 2, 3)])
    served = [serve(r, "s", chat("same")) for _ in range(3)]
    assert [s.step.index for s in served] == [1, 2, 3]
    assert [json.loads(s.reply.body)["choices"][0]["message"]["content"] for s in served] == ["answer 1", "answer 2", "answer 3"]


def test_position_rung_only_when_allowed_and_a_miss_keeps_the_cursor():
    records = [record("s", 1, chat("q1")), record("s", 2, chat("q2"))]
    r = Replay(records)
    assert isinstance(serve(r, "s", chat("changed")), Miss)
    assert serve(r, "s", chat("q1")).rung == "exact"  # the miss did not move the cursor
    r = Replay(records)
    got = serve(r, "s", chat("changed"), allow_position=True)
    assert (got.rung, got.step.index) == ("position", 1)
    assert serve(r, "s", chat("q2"), allow_position=True).rung == "exact"
    assert serve(r, "s", chat("q1"), allow_position=True).code == "replay_exhausted"  # 1 went by position


def test_position_rung_does_not_steal_a_later_exact_match():
    r = Replay([record("s", 1, chat("q1")), record("s", 2, chat("q2"))])
    got = serve(r, "s", chat("q2"), allow_position=True)
    assert (got.rung, got.step.index) == ("later", 2)
    got = serve(r, "s", chat("q1"), allow_position=True)
    assert (got.rung, got.step.index) == ("exact", 1)


def test_sessions_have_their_own_cursors_in_any_interleaving():
    r = Replay([record(s, i, chat(f"{s}{i}")) for s in "ab" for i in (1, 2, 3)])
    order = [("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    for s, i in order:
        got = serve(r, s, chat(f"{s}{i}"))
        assert (got.rung, got.step.session, got.step.index) == ("exact", s, i)


def test_records_are_ordered_by_index_not_file_order():
    r = Replay([record("s", 2, chat("q2")), record("s", 1, chat("q1"))])
    assert serve(r, "s", chat("q1")).rung == "exact"


def test_unknown_session_lists_known_ones():
    r = Replay([record(f"s{i}", 1, chat("q")) for i in range(7)])
    miss = serve(r, "nope", chat("q"))
    assert miss.code == "replay_unknown_session"
    assert "session 'nope' is not in the recording (it has: s0, s1, s2, s3, s4, … (7 in all))" in miss.message


# --------------------------------------------------------------- divergence


def agent_steps(n: int) -> list[dict]:
    """An agent's requests: each repeats the whole conversation so far."""
    steps, messages = [], [{"role": "system", "content": "You are an agent."}]
    for k in range(1, n + 1):
        messages = [*messages, {"role": "user", "content": f"observation {k}"}]
        steps.append({"model": "m", "messages": messages})
        messages = [*messages, {"role": "assistant", "content": f"action {k}"}]
    return steps


def test_divergence_names_session_step_path_and_both_values():
    steps = agent_steps(5)
    r = Replay([record("agent", k, s) for k, s in enumerate(steps, 1)])
    assert serve(r, "agent", steps[0]).rung == serve(r, "agent", steps[1]).rung == "exact"
    changed = json.loads(json.dumps(steps[2]))
    changed["messages"][5]["content"] = "observation 3, but different"
    miss = serve(r, "agent", changed)
    assert miss.code == "replay_diverged"
    assert miss.message == (
        "llm-traj replay: the request diverges from the recording of session 'agent' at step 3 (of 5): "
        'messages[5].content: recorded "observation 3", request "observation 3, but different"'
    )
    report = r.report()["sessions"]["agent"]
    assert report["misses"] == 1 and report["first_divergence"] in miss.message


@pytest.mark.parametrize("recorded,request_,where", [
    ({"a": 1, "b": 2}, {"a": 1}, "b: recorded 2, request (absent)"),
    ({"a": 1}, {"a": 1, "c": [1]}, "c: recorded (absent), request [1]"),
    ({"m": [1, 2, 3]}, {"m": [1, 2]}, "m[2]: recorded 3, request (absent)"),
    ({"m": [{"x": True}]}, {"m": [{"x": 1}]}, "m[0].x: recorded true, request 1"),
    ({"t": "x" * 200 + "END"}, {"t": "x" * 200 + "FIN"}, 't: recorded …"xxxxxxxxxxxxxxxxxxxxEND", request …"xxxxxxxxxxxxxxxxxxxxFIN"'),
    ({"t": "a" + "x" * 100}, {"t": "b" + "x" * 100}, f't: recorded "a{"x" * 59}"…, request "b{"x" * 59}"…'),
    ({"o": {"k": list(range(50))}}, {"o": 3}, 'o: recorded {"k":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,2…, request 3'),
])  # fmt: skip
def test_first_difference_paths_and_excerpts(recorded, request_, where):
    r = Replay([record("s", 1, recorded)])
    assert serve(r, "s", request_).message.endswith(f"at step 1 (of 1): {where}")


# ------------------------------------------------------------------- replies

FIXTURE = {f.stem: f for f in FIXTURES}


def test_stream_recording_replays_its_exact_bytes_and_pace():
    sse = FIXTURE["openai_chat_parallel_tools"].read_bytes()
    rec = stream_record("s", 1, chat("q"), sse, pieces=4, step=0.25)
    got = serve(Replay([rec]), "s", chat("q", stream=True))
    reply = got.reply
    assert reply.status == 200 and reply.body == sse and not reply.cut
    assert b"".join(raw for _, raw in reply.events) == sse
    assert reply.events[0][0] == 0.0 and reply.events[-1][0] == pytest.approx(0.75)
    assert header(reply, b"content-type") == b"text/event-stream; charset=utf-8"
    assert header(reply, b"x-llm-traj-step") == b"s#1" and header(reply, b"x-request-id") == b"req-1"


def test_stream_recording_asked_without_stream_gives_the_aggregate():
    fixture = FIXTURE["vllm_chat_reasoning"]
    rec = stream_record("s", 1, chat("q", stream=True), fixture.read_bytes())
    reply = serve(Replay([rec]), "s", chat("q")).reply
    assert json.loads(reply.body) == expected_for(fixture)
    assert header(reply, b"content-type") == b"application/json" and not reply.events


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_non_stream_recording_asked_as_stream_gives_valid_chunks(fixture):
    final = expected_for(fixture)
    reply = serve(Replay([record("s", 1, chat("q"), final)]), "s", chat("q", stream=True)).reply
    assert header(reply, b"content-type") == b"text/event-stream" and reply.status == 200
    blocks = blocks_of(reply.body)
    assert blocks[-1].data == "[DONE]"
    ours = aggregate(blocks)
    assert ours.problems == [] and ours.result() == final  # finish_reason, usage, vendor fields: all of it
    assert canon(sdk_accumulate(blocks)) == canon(final)
    for block in blocks[:-1]:
        for choice in json.loads(block.data)["choices"]:
            for call in choice["delta"].get("tool_calls") or []:
                assert isinstance(call["index"], int)


def test_chunks_from_final_n_choices_and_usage_chunk():
    final = completion("zero")
    final["choices"].append({"index": 1, "message": {"role": "assistant", "content": "one"}, "finish_reason": "length"})
    chunks = [json.loads(b[len(b"data: "):]) for b in API.chunks_from_final(final)[:-1]]
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 5
    assert [(ch["index"], ch["finish_reason"]) for c in chunks[:4] for ch in c["choices"]] == [
        (0, None), (0, "stop"), (1, None), (1, "length")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == final["usage"]


def test_recorded_errors_replay_as_they_were_whatever_is_asked():
    body = {"error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    rec = record("s", 1, chat("q"), body, status=429, response_headers=[("content-type", "application/json"), ("retry-after", "1")])
    reply = serve(Replay([rec]), "s", chat("q", stream=True)).reply
    assert reply.status == 429 and json.loads(reply.body) == body
    assert header(reply, b"retry-after") == b"1"


def test_headers_lose_framing_and_redacted_values():
    reply = serve(Replay([record("s", 1, chat("q"))]), "s", chat("q")).reply
    names = [k for k, _ in reply.headers]
    assert names == [b"content-type", b"x-llm-traj-step"]


def test_stream_cut_short_replays_what_arrived_then_cuts():
    sse = FIXTURE["openai_chat_basic"].read_bytes()
    part = sse[: len(sse) // 2]
    rec = stream_record("s", 1, chat("q"), part, fail="upstream_disconnected")
    reply = serve(Replay([rec]), "s", chat("q")).reply  # asked without stream: still the cut stream
    assert reply.cut and reply.status == 200 and reply.body == part


def test_non_stream_cut_short_replays_what_arrived_then_cuts():
    rec = record("s", 1, chat("q"), None, complete=False,
                 error=CallError(kind="upstream_disconnected", message="peer closed connection"))  # fmt: skip
    rec.response, rec.response_raw = None, '{"id": "c1", "obj'
    reply = serve(Replay([rec]), "s", chat("q")).reply
    assert reply.status == 200 and reply.cut
    assert reply.body == b'{"id": "c1", "obj'


def test_no_answer_recorded_replays_the_proxys_502():
    rec = record("s", 1, chat("q"), None, status=None, response_headers=[], complete=False,
                 error=CallError(kind="upstream_unreachable", message="connection refused"))  # fmt: skip
    rec.response = None
    reply = serve(Replay([rec]), "s", chat("q")).reply
    assert reply.status == 502 and not reply.cut
    assert json.loads(reply.body)["error"] == {
        "message": "llm-traj: connection refused", "type": "proxy_error", "param": None, "code": "upstream_unreachable"}


def test_a_timeout_recorded_replays_as_the_proxys_504():
    rec = record("s", 1, chat("q"), None, status=None, response_headers=[], complete=False,
                 error=CallError(kind="upstream_timeout", message="upstream sent nothing for 600 s (idle timeout)"))  # fmt: skip
    rec.response = None
    reply = serve(Replay([rec]), "s", chat("q")).reply
    assert reply.status == 504 and json.loads(reply.body)["error"]["code"] == "upstream_timeout"


# -------------------------------------------------------------------- pacing


async def collect(reply, speed: float) -> list[tuple[float, bytes]]:
    start = time.monotonic()
    return [(time.monotonic() - start, chunk) async for chunk in reply_body(reply, speed)]


def test_reply_body_paces_by_recorded_time_divided_by_speed():
    sse = FIXTURE["openai_chat_basic"].read_bytes()
    reply = serve(Replay([stream_record("s", 1, chat("q"), sse, pieces=3, step=0.2)]), "s", chat("q", stream=True)).reply
    got = asyncio.run(collect(reply, 2.0))  # 0, 0.1, 0.2 s
    assert b"".join(c for _, c in got) == sse
    assert got[0][0] < 0.05 and 0.18 < got[-1][0] < 0.35
    instant = asyncio.run(collect(reply, 0))
    assert instant == [(instant[0][0], sse)] and instant[0][0] < 0.05


def test_reply_body_cut_raises_after_the_body():
    rec = stream_record("s", 1, chat("q"), b'data: {"choices":[]}\n\n', fail="upstream_disconnected")
    reply = serve(Replay([rec]), "s", chat("q")).reply

    async def drain():
        return [chunk async for chunk in reply_body(reply, 0)]

    with pytest.raises(ConnectionResetError):
        asyncio.run(drain())


# ------------------------------------------------------------ loading, report


def two_sessions(path: Path, other: str, content: str) -> Path:
    """Session s (calls q1, q2) and one more; the file of s."""
    writer = TrajectoryWriter(path)
    for k in (1, 2):
        writer.append(record("s", k, chat(f"q{k}")))
    writer.append(record(other, 1, chat(content)))
    writer.close()
    return path / "s.jsonl"


def test_load_reads_a_session_when_first_asked_and_skips_a_torn_last_line(tmp_path, caplog):
    file = two_sessions(tmp_path, "other", "o1")
    with open(file, "ab") as fh:
        fh.write(b'{"schema_version": 1, "sess')  # a crash mid-write
    replay = load(tmp_path)
    assert (replay.sessions, replay.calls) == (2, 0)  # nothing read yet
    with caplog.at_level("WARNING", logger="llm_traj"):
        assert isinstance(serve(replay, "s", chat("q1")), Served)
    assert replay.calls == 2
    assert f"{file}:3: truncated last line (torn write), skipped" in caplog.text
    assert replay.report()["sessions_not_asked"] == 1


def test_a_bad_line_cuts_only_its_session_there_with_file_and_line(tmp_path, caplog):
    file = two_sessions(tmp_path, "ok", "fine")
    lines = file.read_bytes().split(b"\n")
    file.write_bytes(b"\n".join([lines[0], b"{oops", lines[1], b""]))
    replay = load(tmp_path)
    with caplog.at_level("WARNING", logger="llm_traj"):
        assert isinstance(serve(replay, "s", chat("q1")), Served)  # before the bad line
    skipped = f"{file}:2: not valid JSON (key must be a string at line 1 column 2), skipped; session 's' is unreadable past it (1 later calls left out)"
    assert caplog.messages == [f"llm-traj: {skipped}"]
    miss = serve(replay, "s", chat("q2"))  # past it
    assert isinstance(miss, Miss) and (miss.status, miss.code) == (500, "replay_unreadable")
    assert miss.message == ("llm-traj replay: the request matches none of the 1 calls of session 's' not yet replayed"
                            f" before its recording becomes unreadable: {skipped}")  # fmt: skip
    assert isinstance(serve(replay, "ok", chat("fine")), Served)
    report = replay.report()
    assert report["skipped_lines"] == [skipped] and report["sessions"]["s"]["unreadable"] == skipped
    assert replay.report_lines()[-1] == f"  skipped {skipped}"
    file.write_bytes(lines[0].replace(b'"schema_version":2', b'"schema_version":4') + b"\n")
    miss = serve(load(tmp_path), "s", chat("q1"))
    assert f"{file}:1: schema_version 4 is not supported" in miss.message


def test_load_refuses_an_empty_path_and_unknown_apis(tmp_path):
    with pytest.raises(ReplayLoadError, match="no trajectory there"):
        load(tmp_path / "missing")
    rec = record("s", 3, chat("q"))
    rec.api = "images.generate"
    with pytest.raises(ReplayLoadError, match=r"session s #3: cannot replay api 'images.generate'"):
        Replay([rec])
    writer = TrajectoryWriter(tmp_path / "t")
    writer.append(rec)
    writer.close()
    miss = serve(load(tmp_path / "t"), "s", chat("q"))
    assert "session s #3: cannot replay api 'images.generate'" in miss.message and miss.status == 500


def test_report_per_session():
    r = Replay([record("a", i, chat(f"a{i}")) for i in (1, 2, 3)] + [record("b", 1, chat("b1"))])
    serve(r, "a", chat("a2"))
    serve(r, "a", chat("a1"))
    serve(r, "a", chat("oops"))
    serve(r, "ghost", chat("x"))
    assert r.report() == {"sessions": {
        "a": {"recorded": 3, "served": 2, "unserved": 1, "rungs": {"later": 1, "exact": 1}, "rules": {}, "nearest": [],
              "misses": 1,
              "first_divergence": "the request diverges from the recording of session 'a' at step 3 (of 3): "
                                  'messages[0].content: recorded "a3", request "oops"', "unreadable": None},
        "b": {"recorded": 1, "served": 0, "unserved": 1, "rungs": {}, "rules": {}, "nearest": [], "misses": 0,
              "first_divergence": None, "unreadable": None},
        "ghost": {"recorded": 0, "served": 0, "unserved": 0, "rungs": {}, "rules": {}, "nearest": [], "misses": 1,
                  "first_divergence": "session 'ghost' is not in the recording (it has: a, b)", "unreadable": None},
    }, "sessions_not_asked": 0, "skipped_lines": []}  # fmt: skip
    lines = r.report_lines()
    assert lines[0] == "replay report: 2 of 4 recorded calls served, 2 misses, 3 sessions"
    assert lines[1].startswith("  a: 2/3 served (later 1, exact 1), 1 misses; first: the request diverges")
    assert lines[2] == "  b: 0/1 served, 0 misses"


# ------------------------------------------------ normalisation and nearest


CLAUDE_UA = [("user-agent", "claude-cli/1.0 (external)")]


def dated(day: str, home: str = "/home/a", text: str = "do the task") -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "system", "content": f"Today is {day}. Home: {home}/work"},
                                       {"role": "user", "content": text}]}  # fmt: skip


def test_normalized_rung_serves_a_call_that_differs_only_in_volatile_fields():
    recorded = record("s", 1, dated("2026-01-01"))
    recorded.request_headers = CLAUDE_UA
    r = Replay([recorded, record("s", 2, dated("2026-01-01", text="next"))])
    served = r.match("s", live(r, dated("2026-01-02", home="/Users/b"), CLAUDE_UA))
    assert isinstance(served, Served) and served.rung == "normalized" and served.step.index == 1
    assert served.rules == ("claude-code:abs-path", "claude-code:iso-date")
    assert header(served.reply, b"x-llm-traj-step") == b"s#1"
    report = r.report()["sessions"]["s"]
    assert report["rungs"] == {"normalized": 1} and report["rules"] == {"claude-code:abs-path": 1, "claude-code:iso-date": 1}
    assert "rules: claude-code:abs-path 1, claude-code:iso-date 1" in r.report_lines()[1]
    # the exact request is still served exactly, before normalisation is even made
    assert serve(r, "s", dated("2026-01-01", text="next")).rung == "exact"


def test_a_user_rule_makes_calls_match_and_a_different_task_still_misses(tmp_path):
    from llmtraj.replay.normalize import normalizer_from_table

    normalizer = normalizer_from_table({"rules": [{"name": "build", "pattern": r"build \d+"}]})
    r = Replay([record("s", 1, chat("build 41 passed")), record("s", 2, chat("next"))], normalizer=normalizer)
    assert serve(r, "s", chat("build 42 passed")).rung == "normalized"
    assert r.report()["sessions"]["s"]["rules"] == {"generic:build": 1}
    assert isinstance(serve(r, "s", chat("something else entirely")), Miss)


def near_steps() -> list[dict[str, Any]]:
    long = "the same long observation of the repository " * 10
    return [{"model": "m", "messages": [{"role": "user", "content": f"{long} call {k}"}]} for k in (1, 2)]


def test_nearest_rung_is_opt_in_and_reports_score_and_differences():
    steps = near_steps()
    changed = json.loads(json.dumps(steps[0]))
    changed["messages"][0]["content"] += " and a little more"
    r = Replay([record("s", k, s) for k, s in enumerate(steps, 1)])
    assert isinstance(r.match("s", live(r, changed)), Miss)  # not without asking
    served = r.match("s", live(r, changed), allow_nearest=True)
    assert isinstance(served, Served) and served.rung == "nearest" and served.step.index == 1
    assert 0.8 < served.score < 1
    assert served.differences[0].startswith("messages[0].content: recorded")
    nearest = r.report()["sessions"]["s"]["nearest"]
    assert nearest == [{"step": 1, "score": round(served.score, 3), "differences": list(served.differences)}]
    assert "step 1 served as nearest (similarity" in "\n".join(r.report_lines())


def test_nearest_needs_the_same_shape_and_enough_similarity():
    steps = near_steps()
    r = Replay([record("s", k, s) for k, s in enumerate(steps, 1)])
    other_shape = {"model": "m", "messages": [*steps[0]["messages"], {"role": "assistant", "content": "x"}]}
    assert isinstance(r.match("s", live(r, other_shape), allow_nearest=True), Miss)
    unrelated = {"model": "m", "messages": [{"role": "user", "content": "completely unrelated words here"}]}
    assert isinstance(r.match("s", live(r, unrelated), allow_nearest=True), Miss)
    other_model = {**steps[0], "model": "other"}
    assert isinstance(r.match("s", live(r, other_model), allow_nearest=True), Miss)


def test_a_miss_is_explained_against_the_closest_recorded_call():
    steps = agent_steps(4)
    r = Replay([record("agent", k, s) for k, s in enumerate(steps, 1)])
    changed = json.loads(json.dumps(steps[2]))  # step 3, while the cursor is at step 1
    changed["messages"][5]["content"] = "observation 3, changed"
    miss = r.match("agent", live(r, changed))
    assert miss.code == "replay_diverged"
    assert miss.message.startswith(
        "llm-traj replay: the request diverges from the recording of session 'agent' at step 3 (of 4), "
        "the closest recorded call (similarity 0."
    )
    assert miss.message.endswith(
        '; the cursor is at step 1): messages[5].content: recorded "observation 3", request "observation 3, changed"'
    )
