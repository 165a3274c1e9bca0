"""Request bodies sent to the record writer as deltas against the session's
previous body (issue 16): the records on disk are byte for byte those of
bodies sent whole, through writer deaths, evictions, edits and alternating
conversations, and a delta the writer has no previous body for is refused."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import time

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st
from llmtraj.cli.proxy_process import ProxyProcess
from llmtraj.core.chain import shared_prefix
from llmtraj.core.store import read_records
from llmtraj.recording import capture
from llmtraj.recording.capture import ACK, DELTA, RESENT, BodyPieces, CallCapture, LastBodies, shared_length
from llmtraj.recording.sink import RecordSink
from llmtraj.recording.writer import serve

from ..reliability.test_faults_e2e import writer_pid

T0 = 1_700_000_000.0
SSE = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\ndata: [DONE]\n\n'


def _pieces(data: bytes, seed: int, count: int = 12) -> list[bytes]:
    cuts = sorted({0, len(data), *(random.Random(seed).randrange(len(data) + 1) for _ in range(count))})
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


@given(st.binary(max_size=300), st.binary(max_size=60), st.binary(max_size=60), st.integers(0, 99), st.integers(0, 99))
def test_shared_length_of_pieces_is_the_common_prefix(common, tail_a, tail_b, seed_a, seed_b):
    a, b = common + tail_a, common + tail_b
    assert shared_length(_pieces(a, seed_a), _pieces(b, seed_b)) == shared_prefix(a, b)


def test_last_bodies_keep_the_sessions_sent_to_last_within_their_budget():
    bodies = LastBodies(sessions=2, budget=100)
    assert bodies.swap("a", b"1", 40) is None and bodies.swap("b", b"2", 40) is None
    assert bodies.swap("a", b"3", 40) == (b"1", 40)  # "a" is now the newest
    bodies.swap("c", b"4", 40)  # over both limits: "b", the oldest, goes
    assert bodies.last("b") is None and bodies.last("a") == b"3" and bodies.last("c") == b"4"
    bodies.swap("d", b"5", 101)  # a body over the budget is not kept at all
    assert bodies.last("d") is None


def _conversation(turn: int, topic: str = "a", edit: str = "") -> bytes:
    messages = [{"role": "system", "content": f"You are helping with {topic}. " + "Rules. " * 600}]
    for i in range(turn):
        messages.append({"role": "user", "content": f"{topic} step {i}{edit if i == turn // 2 else ''} " + "ctx " * 700})
        messages.append({"role": "assistant", "content": f"done {i}"})
    return json.dumps({"model": "m", "messages": messages}).encode()


def _bodies() -> list[tuple[str, bytes]]:
    """(session, body) in order: a session that grows, is edited in the middle,
    shrinks (compacted), sends a body twice, then alternates between two
    conversations; another session between them."""
    calls = [("s", _conversation(t)) for t in range(1, 9)]
    calls += [("s", _conversation(8, edit=" (edited)")), ("s", _conversation(9, edit=" (edited)"))]
    calls += [("s", _conversation(3)), ("s", _conversation(4)), ("s", _conversation(4))]  # shrunk, grows, the same again
    for t in range(4, 10):
        calls += [("s", _conversation(t, "b")), ("s", _conversation(t + 1)), ("side", _conversation(t, "c"))]
    calls += [("s", b""), ("s", b"not json " * 300), ("s", b"not json " * 400)]
    return calls


def _capture(index: int, session: str, body: bytes | list[bytes]) -> CallCapture:
    return CallCapture(
        api="chat.completions", session=session, index=index, mode="record", method="POST",
        url="http://u/v1/chat/completions", request_headers=[(b"authorization", b"Bearer sk-secret-123456")],
        request_body=body, started_at=T0 + index, status=200,
        response_headers=[(b"content-type", b"text/event-stream")], response_headers_at=T0 + index,
        chunks=[SSE], chunk_times=[T0 + index], ended_at=T0 + index,
    )  # fmt: skip


def _files(path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(path.iterdir()) if file.suffix == ".jsonl"}


def _whole(tmp_path) -> dict[str, bytes]:
    """The files of the bodies of `_bodies` sent whole."""
    whole = tmp_path / "whole"
    frames = [piece for i, (session, body) in enumerate(_bodies(), 1) for piece in _capture(i, session, body).frame(i)]
    assert serve(str(whole), io.BytesIO(b"".join(frames)))
    return _files(whole)


def test_a_writer_rebuilds_deltas_into_the_records_of_whole_bodies(tmp_path):
    last, frames, deltas = {}, [], 0
    for i, (session, body) in enumerate(_bodies(), 1):
        capture = _capture(i, session, body)
        shared = shared_prefix(last[session], body) if session in last else 0
        if shared:
            deltas += 1
            frames += capture.frame(i, DELTA, shared, len(last[session]))
        else:
            frames += capture.frame(i)
        last[session] = body
    assert deltas > 20
    assert serve(str(tmp_path / "delta"), io.BytesIO(b"".join(frames)))
    assert _files(tmp_path / "delta") == _whole(tmp_path)


def test_a_delta_the_writer_has_no_previous_body_for_is_refused(tmp_path, capfd):
    body = _conversation(3)
    first = _capture(1, "s", body).frame(1)
    stray = _capture(2, "s", body + b" ").frame(2, DELTA | RESENT, len(body), len(body))
    wrong = _capture(2, "s", body + b" ").frame(2, DELTA, len(body), len(body) + 1)  # not the body it has
    for frames, confirmed in ((stray, b""), ([*first, *wrong], ACK.pack(1))):
        read_acks, write_acks = os.pipe()
        assert not serve(str(tmp_path), io.BytesIO(b"".join([*frames, *_capture(3, "s", body).frame(3)])), acks=write_acks)
        os.close(write_acks)
        acks = os.read(read_acks, 100)
        os.close(read_acks)
        assert acks == confirmed  # the call before it confirmed, it and the rest not
        lines = capfd.readouterr().err.splitlines()
        assert len(lines) == 1 and "does not have the body a call's request repeats" in lines[0]
        assert [r.index for r in read_records(tmp_path)] == ([1] if confirmed else [])  # nothing after it, nothing wrong


def test_the_sink_sends_deltas_and_the_writer_killed_twice_loses_nothing(tmp_path, monkeypatch):
    """Through a real writer process: bodies go as deltas (in pieces), the
    writer is killed twice mid-session (the frames sent again go whole, and
    the next of each session too), sessions are evicted from the proxy's
    last bodies (their next body goes whole): every record reads back as
    that of its body sent whole."""
    flags = []
    frame = CallCapture.frame

    def noting(self, seq=0, flag=0, shared=0, base=0):
        flags.append(flag)
        return frame(self, seq, flag, shared, base)

    monkeypatch.setattr(CallCapture, "frame", noting)
    sink = RecordSink(tmp_path / "delta")
    sink._last_bodies = LastBodies(sessions=2)  # (fewer than the writer keeps: it has every body the proxy does)
    sink.start()
    calls = _bodies()
    for i, (session, body) in enumerate(calls, 1):
        sink.send(_capture(i, session, _pieces(body, i, 30)))
        if i in (9, 23):  # mid-session, with frames unconfirmed
            deadline = time.monotonic() + 30
            while len(list(read_records(tmp_path / "delta"))) < i - 2 and time.monotonic() < deadline:
                sink._write()
                time.sleep(0.02)
            sink._proc.send_signal(signal.SIGKILL)
            sink._proc.wait()
        if i == 20:  # a third session evicts the oldest of the two the proxy keeps
            sink.send(_capture(1000, "other", _conversation(1, "d")))
    sink.close()
    assert sink.restarts == 2 and sink.acked == len(calls) + 1
    assert flags.count(DELTA) > 15 and flags.count(0) > 5
    _whole(tmp_path)  # (a writer started anew stores each session's next request whole: the files differ there)
    records = [r.model_dump() for r in read_records(tmp_path / "delta") if r.session != "other"]
    assert records == [r.model_dump() for r in read_records(tmp_path / "whole")]


def test_a_long_session_through_mitmdump_with_its_writer_killed_twice(upstream, tmp_path):
    """A long session through a real mitmdump, its requests growing past
    hundreds of KB: every record holds the request sent, once, though the
    writer was killed twice mid-session."""
    path = tmp_path / "traj"
    sent = []
    with ProxyProcess(upstream=upstream.url, options={"llm_traj_path": path}) as p:
        with httpx.Client(base_url=f"{p.url}/s/long/v1", timeout=30) as client:
            messages = [{"role": "system", "content": "Be brief. " * 2000}]
            for turn in range(1, 41):
                messages.append({"role": "user", "content": f"turn {turn} " + "tool output " * 1500})
                if turn == 25:
                    messages[1] = {"role": "user", "content": "edited early turn"}
                response = client.post("/chat/completions", json={"model": "standin-text", "messages": messages, "stream": True})
                assert response.status_code == 200 and b"[DONE]" in response.content
                sent.append(json.loads(json.dumps(messages)))
                messages.append({"role": "assistant", "content": f"answer {turn}"})
                if turn in (12, 30):
                    os.kill(writer_pid(path, p), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(list(read_records(path))) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.1)
        output = p.output()
    records = list(read_records(path))
    assert [r.index for r in records] == list(range(1, len(sent) + 1))
    assert [r.request["messages"] for r in records] == sent
    assert output.count("the record writer stopped (killed by signal 9)") == 2
    assert "does not have the body" not in output



@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=40)), min_size=1, max_size=12), st.integers(0, 60))
def test_body_pieces_read_as_the_joined_body(steps, joined):
    """A body kept as the pieces of the ones before it (some joined, some
    cut) reads as the bytes it stands for, at every offset."""
    saved, capture._JOINED = capture._JOINED, joined
    try:
        body, pieces = b"", BodyPieces([])
        for shared, new in steps:
            shared = shared % (len(body) + 1)
            body, pieces = body[:shared] + new, BodyPieces.after(pieces, shared, new)
            assert len(pieces) == len(body) and all(len(piece) for piece in pieces.pieces)
            for at in range(len(body) + 1):
                assert pieces.head(at) == body[:at] and pieces.tail(at) == body[at:]
                if at < len(body):
                    assert pieces.at(at) == body[at]
        assert bytes(pieces) == body and bytes(pieces) is bytes(pieces)
    finally:
        capture._JOINED = saved
