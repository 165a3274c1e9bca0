"""Trajectory files: writer modes, indices, session ids, permissions, the
reader's handling of torn and corrupt lines, and concurrent appends."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
from llmtraj.core import store
from llmtraj.core.record import SCHEMA_VERSION, Bridge, CallRecord, StreamEvent, Timings
from llmtraj.core.redact import REDACTED
from llmtraj.core.session import InvalidSession
from llmtraj.core.store import (
    SkippedLine,
    TrajectoryError,
    TrajectoryWriter,
    _lines,
    read_records,
    trajectory_files,
    trajectory_sessions,
)


def make_record(session: str, index: int, content: str = "hi") -> CallRecord:
    return CallRecord(
        session=session,
        index=index,
        api="chat.completions",
        mode="record",
        method="POST",
        url="https://api.example.com/v1/chat/completions",
        request_headers=[("content-type", "application/json")],
        request={"model": "m", "messages": [{"role": "user", "content": content}]},
        status=200,
        response={"object": "chat.completion", "choices": []},
        timings=Timings(started_at=1700000000.0, ended_at=1700000001.0),
    )


def write_calls(writer: TrajectoryWriter, session: str, count: int) -> list[int]:
    indices = []
    for _ in range(count):
        index = writer.next_index(session)
        writer.append(make_record(session, index))
        indices.append(index)
    return indices


def lines_of(file: Path) -> list[bytes]:
    data = file.read_bytes()
    assert data.endswith(b"\n")
    return data.split(b"\n")[:-1]


# --------------------------------------------------------------------- writer


def test_directory_mode_one_file_per_session(tmp_path):
    root = tmp_path / "traj"
    writer = TrajectoryWriter(root)
    assert not writer.single_file and root.is_dir()
    assert write_calls(writer, "alpha", 3) == [1, 2, 3]
    assert write_calls(writer, "beta", 2) == [1, 2]
    writer.close()
    assert sorted(p.name for p in root.iterdir()) == ["alpha.jsonl", "beta.jsonl"]
    assert [r.index for r in read_records(root / "alpha.jsonl")] == [1, 2, 3]
    assert [(r.session, r.index) for r in read_records(root)] == [("alpha", 1), ("alpha", 2), ("alpha", 3), ("beta", 1), ("beta", 2)]
    assert trajectory_files(root) == [root / "alpha.jsonl", root / "beta.jsonl"]


def test_single_file_mode_holds_every_session(tmp_path):
    file = tmp_path / "sub" / "all.jsonl"
    writer = TrajectoryWriter(file)
    assert writer.single_file and file.parent.is_dir()
    assert writer.file_for("a") == file == writer.file_for("b")
    assert write_calls(writer, "a", 2) == [1, 2]
    assert write_calls(writer, "b", 1) == [1]
    assert write_calls(writer, "a", 1) == [3]
    writer.close()
    assert [(r.session, r.index) for r in read_records(file)] == [("a", 1), ("a", 2), ("b", 1), ("a", 3)]
    assert list(tmp_path.joinpath("sub").iterdir()) == [file]


@pytest.mark.parametrize("name", ["traj", "all.jsonl"], ids=["directory", "single-file"])
def test_indices_continue_across_writer_restarts(tmp_path, name):
    path = tmp_path / name
    first = TrajectoryWriter(path)
    write_calls(first, "s1", 2)
    write_calls(first, "s2", 1)
    first.close()

    second = TrajectoryWriter(path)
    assert write_calls(second, "s1", 2) == [3, 4]
    assert write_calls(second, "s2", 1) == [2]
    assert write_calls(second, "new", 1) == [1]
    second.close()

    third = TrajectoryWriter(path)
    assert third.next_index("s1") == 5
    third.close()
    by_session: dict[str, list[int]] = {}
    for r in read_records(path):
        by_session.setdefault(r.session, []).append(r.index)
    assert by_session == {"s1": [1, 2, 3, 4], "s2": [1, 2], "new": [1]}


def test_restart_after_a_torn_last_line_continues_after_the_whole_ones(tmp_path):
    file = tmp_path / "t.jsonl"
    writer = TrajectoryWriter(file)
    write_calls(writer, "s", 2)
    writer.close()
    with open(file, "ab") as fh:
        fh.write(make_record("s", 3).model_dump_json().encode()[:40])  # killed mid-write
    assert TrajectoryWriter(file).next_index("s") == 3


@pytest.mark.parametrize(
    "session",
    ["../x", "..", "a/b", "a\\b", "", ".hidden", "/abs", "a b", "x" * 200, "s\x00", "-lead", "é"],
    ids=["traversal", "dotdot", "slash", "backslash", "empty", "leading-dot", "absolute", "space", "200-chars", "nul", "leading-dash", "non-ascii"],
)
@pytest.mark.parametrize("name", ["traj", "all.jsonl"], ids=["directory", "single-file"])
def test_invalid_session_ids_are_rejected(tmp_path, name, session):
    writer = TrajectoryWriter(tmp_path / name)
    with pytest.raises(InvalidSession):
        writer.file_for(session)
    with pytest.raises(InvalidSession):
        writer.next_index(session)
    with pytest.raises(InvalidSession):
        writer.append(make_record(session, 1))
    writer.close()
    # nothing was written anywhere
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


@pytest.mark.parametrize("session", ["a", "0", "run-1.attempt_2", "x" * 128, "A.b-C_d"])
def test_valid_session_ids(tmp_path, session):
    writer = TrajectoryWriter(tmp_path / "traj")
    assert writer.file_for(session) == tmp_path / "traj" / f"{session}.jsonl"
    writer.append(make_record(session, writer.next_index(session)))
    writer.close()
    assert [r.session for r in read_records(tmp_path / "traj")] == [session]


def test_invalid_session_is_a_value_error():
    assert issubclass(InvalidSession, ValueError)


@pytest.mark.parametrize("name", ["traj", "all.jsonl"], ids=["directory", "single-file"])
def test_files_are_created_0600(tmp_path, name):
    old = os.umask(0)  # even with a permissive umask
    try:
        writer = TrajectoryWriter(tmp_path / name)
        write_calls(writer, "s", 1)
        writer.close()
    finally:
        os.umask(old)
    [file] = trajectory_files(tmp_path / name)
    assert stat.S_IMODE(file.stat().st_mode) == 0o600


def test_lines_are_whole_json_objects(tmp_path):
    file = tmp_path / "t.jsonl"
    writer = TrajectoryWriter(file)
    tricky = 'line\nbreak "quoted" \\ back\u2028sep 杭州 🙂'
    for i in range(1, 4):
        writer.append(make_record("s", i, content=tricky))
    writer.close()
    lines = lines_of(file)
    assert len(lines) == 3
    for i, line in enumerate(lines, start=1):
        obj = json.loads(line)
        assert obj["schema_version"] == SCHEMA_VERSION and obj["index"] == i
        # the first call is written whole, the next ones refer to it
        assert obj.get("request_base") == (None if i == 1 else {"index": i - 1, "same": ["messages"], "prefix": {}})
    assert [r.request["messages"][0]["content"] for r in read_records(file)] == [tricky] * 3


def test_append_scrubs_secret_values(tmp_path):
    file = tmp_path / "t.jsonl"
    writer = TrajectoryWriter(file)
    writer.append(make_record("s", 1, content="key sk-live-0123456789 leaked"), secrets={"sk-live-0123456789"})
    writer.close()
    text = file.read_text()
    assert "sk-live-0123456789" not in text
    assert next(read_records(file)).request["messages"][0]["content"] == "key [REDACTED] leaked"


def test_reader_of_missing_paths_is_empty(tmp_path):
    assert list(read_records(tmp_path / "nope")) == []
    assert list(read_records(tmp_path / "nope.jsonl")) == []


# --------------------------------------------------------------------- reader


def _write_lines(file: Path, lines: list[bytes], trailing_newline: bool = True) -> None:
    file.write_bytes(b"\n".join(lines) + (b"\n" if trailing_newline else b""))


def _good(i: int) -> bytes:
    return make_record("s", i).model_dump_json().encode()


def test_truncated_last_line_is_skipped_and_reported(tmp_path):
    file = tmp_path / "t.jsonl"
    _write_lines(file, [_good(1), _good(2), _good(3)[:57]], trailing_newline=False)
    skipped: list[SkippedLine] = []
    records = list(read_records(file, skipped=skipped))
    assert [r.index for r in records] == [1, 2]
    assert len(skipped) == 1
    assert skipped[0].file == file and skipped[0].line == 3
    assert "truncated" in skipped[0].message
    assert str(skipped[0]).startswith(f"{file}:3:")


def test_last_line_without_newline_that_parses_is_kept(tmp_path):
    file = tmp_path / "t.jsonl"
    _write_lines(file, [_good(1), _good(2)], trailing_newline=False)
    skipped: list[SkippedLine] = []
    assert [r.index for r in read_records(file, skipped=skipped)] == [1, 2]
    assert skipped == []


def test_bad_line_in_the_middle_raises_with_file_and_line(tmp_path):
    file = tmp_path / "t.jsonl"
    _write_lines(file, [_good(1), b'{"schema_version": 1, "session": "s"}}', _good(3)])
    with pytest.raises(TrajectoryError) as info:
        list(read_records(file))
    assert info.value.file == file and info.value.line == 2
    assert str(info.value).startswith(f"{file}:2:")
    assert "JSON" in str(info.value)


def test_a_torn_line_that_a_later_writer_ended_is_skipped_with_a_note(tmp_path):
    """A writer killed mid-line leaves the beginning of a record; the next writer
    starts on a fresh line, and readers skip that one line and read on."""
    file = tmp_path / "t.jsonl"
    writer = TrajectoryWriter(file)
    write_calls(writer, "s", 1)
    writer.close()
    with open(file, "ab") as fh:
        fh.write(_good(2)[:30])  # killed mid-write
    writer = TrajectoryWriter(file)
    assert write_calls(writer, "s", 2) == [2, 3]
    writer.close()
    assert file.read_bytes().count(b"\n") == 4  # the torn line ended, each record on its own line
    skipped: list[SkippedLine] = []
    assert [r.index for r in read_records(file, skipped=skipped)] == [1, 2, 3]
    assert [(s.line, s.message) for s in skipped] == [
        (2, "truncated line (torn write; a later writer started on the next line), skipped")]


def test_a_cut_line_that_is_not_the_start_of_a_record_is_corruption(tmp_path):
    file = tmp_path / "t.jsonl"
    _write_lines(file, [_good(1), _good(2)[30:]])
    with pytest.raises(TrajectoryError) as info:
        list(read_records(file))
    assert info.value.line == 2


def test_tolerate_corrupt_skips_and_reports_bad_lines(tmp_path):
    file = tmp_path / "t.jsonl"
    _write_lines(file, [_good(1), b"garbage", b"[1, 2]", _good(4)])
    skipped: list[SkippedLine] = []
    assert [r.index for r in read_records(file, tolerate_corrupt=True, skipped=skipped)] == [1, 4]
    assert [s.line for s in skipped] == [2, 3]


def _conversations(path: Path, sessions: list[str], turns: int) -> None:
    """Each session's calls repeating its conversation so far (stored chained), the sessions' calls interleaved."""
    writer = TrajectoryWriter(path)
    for k in range(1, turns + 1):
        for session in sessions:
            messages = [{"role": "user", "content": f"{session} turn {t} " * 10} for t in range(1, k + 1)]
            record = make_record(session, k)
            record.request = {"model": "m", "messages": messages}
            writer.append(record)
    writer.close()


def test_a_bad_line_in_a_single_file_cuts_only_its_session_there(tmp_path):
    file = tmp_path / "all.jsonl"
    _conversations(file, ["a", "b"], 4)
    lines = lines_of(file)
    assert json.loads(lines[4])["request_base"]["index"] == 2  # a#3, chained to a#2
    lines[2] = lines[2][:60] + b"\x01" + lines[2][60:]  # a#2: not JSON any more, but says whose it is
    _write_lines(file, lines)
    with pytest.raises(TrajectoryError) as info:
        list(read_records(file))
    assert info.value.line == 3
    skipped: list[SkippedLine] = []
    got = [(r.session, r.index) for r in read_records(file, tolerate_corrupt=True, skipped=skipped)]
    assert got == [("a", 1), ("b", 1), ("b", 2), ("b", 3), ("b", 4)]  # a#3 and a#4 refer to it: a stops there
    (bad,) = skipped
    assert (bad.file, bad.line, bad.session, bad.left_out) == (file, 3, "a", 2)
    assert str(bad).startswith(f"{file}:3: not valid JSON")
    assert str(bad).endswith("skipped; session 'a' is unreadable past it (2 later calls left out)")
    scanned: list[SkippedLine] = []
    trajectory_sessions(file, scanned, tolerate_corrupt=True)  # reported by the scan too, the same
    assert [str(line) for line in scanned] == [str(bad)]
    sessions = trajectory_sessions(file)  # the scan finds whose the line is: it does not raise
    assert [r.index for _, r in sessions["b"].records()] == [1, 2, 3, 4]
    with pytest.raises(TrajectoryError):
        list(sessions["a"].records())
    assert [r.index for _, r in sessions["a"].records(tolerate_corrupt=True)] == [1]


def test_a_line_of_no_session_is_skipped_alone_and_what_referred_to_it_is_cut(tmp_path):
    file = tmp_path / "all.jsonl"
    _conversations(file, ["a", "b"], 3)
    lines = lines_of(file)
    lines[3] = b"garbage"  # b#2
    _write_lines(file, lines)
    skipped: list[SkippedLine] = []
    got = [(r.session, r.index) for r in read_records(file, tolerate_corrupt=True, skipped=skipped)]
    assert got == [("a", 1), ("b", 1), ("a", 2), ("a", 3)]
    assert [(s.line, s.session, s.left_out) for s in skipped] == [(4, None, 0), (6, "b", 0)]
    assert "request_base: call 2 is not an earlier line" in skipped[1].message
    with pytest.raises(TrajectoryError, match=r"all.jsonl:4: not valid JSON"):
        trajectory_sessions(file)
    assert list(trajectory_sessions(file, tolerate_corrupt=True)) == ["a", "b"]


def test_a_bad_line_in_a_session_file_cuts_that_session_and_not_the_others(tmp_path):
    _conversations(tmp_path, ["a", "b"], 3)
    lines = lines_of(tmp_path / "a.jsonl")
    _write_lines(tmp_path / "a.jsonl", [lines[0], b"[1, 2]", *lines[1:]])  # no session: the file's
    skipped: list[SkippedLine] = []
    got = [(r.session, r.index) for r in read_records(tmp_path, tolerate_corrupt=True, skipped=skipped)]
    assert got == [("a", 1), ("b", 1), ("b", 2), ("b", 3)]
    assert [(s.line, s.session, s.left_out) for s in skipped] == [(2, "a", 2)]


def test_wrong_schema_version_raises_with_the_line(tmp_path):
    file = tmp_path / "t.jsonl"
    future = json.loads(_good(2))
    future["schema_version"] = 4
    _write_lines(file, [_good(1), json.dumps(future).encode(), _good(3)])
    with pytest.raises(TrajectoryError) as info:
        list(read_records(file))
    assert info.value.line == 2
    assert "schema_version 4 is not supported (this llm-traj reads 1, 2, 3)" in str(info.value)


def test_a_line_with_events_stored_as_template_values_says_version_3(tmp_path, monkeypatch):
    # a reader of versions 1 and 2 alone cannot rebuild such events: the line's version makes it say so,
    # where it would otherwise fail on the first event without its raw
    from llmtraj.recording.builder import mark_templates

    chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}]} for i in range(20)]  # fmt: skip
    events = [StreamEvent(t=i / 100, raw=f"data: {json.dumps(c)}\n\n") for i, c in enumerate(chunks)]
    writer = TrajectoryWriter(tmp_path / "t", mark_templates)
    writer.append(make_record("streamed", 1).model_copy(update={"stream": True, "events": events}))
    writer.append(make_record("plain", 1))
    writer.close()
    streamed, plain = (tmp_path / "t" / "streamed.jsonl"), (tmp_path / "t" / "plain.jsonl")
    line = json.loads(streamed.read_text())
    assert line["schema_version"] == 3 and sum("v" in event for event in line["events"]) == 19
    assert json.loads(plain.read_text())["schema_version"] == SCHEMA_VERSION == 2
    (record,) = read_records(streamed)
    assert record.events == events and record.schema_version == 3

    monkeypatch.setattr(store, "SCHEMA_VERSIONS", (1, 2))
    with pytest.raises(TrajectoryError, match=r"schema_version 3 is not supported \(this llm-traj reads 1, 2\)"):
        list(read_records(streamed))
    assert [r.session for r in read_records(plain)] == ["plain"]


def test_missing_schema_version_raises(tmp_path):
    file = tmp_path / "t.jsonl"
    old = json.loads(_good(1))
    del old["schema_version"]
    _write_lines(file, [json.dumps(old).encode(), _good(2)])
    with pytest.raises(TrajectoryError, match="schema_version None"):
        list(read_records(file))


def test_invalid_record_names_the_field(tmp_path):
    file = tmp_path / "t.jsonl"
    bad = json.loads(_good(1))
    bad["index"] = 0
    _write_lines(file, [json.dumps(bad).encode(), _good(2)])
    with pytest.raises(TrajectoryError) as info:
        list(read_records(file))
    assert info.value.line == 1 and "index" in str(info.value)


def test_blank_lines_are_ignored(tmp_path):
    file = tmp_path / "t.jsonl"
    _write_lines(file, [b"", _good(1), b"   ", _good(2), b""])
    assert [r.index for r in read_records(file)] == [1, 2]


# ----------------------------------------------------------------- concurrency

THREADS, PER_THREAD = 8, 200


@pytest.mark.parametrize("shared", [True, False], ids=["one-writer", "writer-per-thread"])
def test_concurrent_appends_never_interleave_within_a_line(tmp_path, shared):
    file = tmp_path / "all.jsonl"
    padding = "p" * 9000  # lines well over PIPE_BUF
    common = TrajectoryWriter(file) if shared else None
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            writer = common or TrajectoryWriter(file)
            session = f"thread-{t}"
            start.wait()
            for i in range(1, PER_THREAD + 1):
                writer.append(make_record(session, i, content=f"{t}:{i}:{padding}"))
            if writer is not common:
                writer.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if common:
        common.close()
    assert errors == []

    # A writer that opens the file while another's line is half-way written
    # starts on a fresh line (it cannot tell it from a torn one): at worst a
    # blank line, which readers skip.
    lines = [line for line in lines_of(file) if line]
    assert len(lines) == THREADS * PER_THREAD
    seen: dict[str, list[int]] = {}
    for line in lines:
        obj = json.loads(line)  # a torn or interleaved line would not parse
        t, i, pad = obj["request"]["messages"][0]["content"].split(":")
        assert pad == padding and obj["session"] == f"thread-{t}" and obj["index"] == int(i)
        seen.setdefault(obj["session"], []).append(obj["index"])
    assert seen == {f"thread-{t}": list(range(1, PER_THREAD + 1)) for t in range(THREADS)}
    assert sum(1 for _ in read_records(file)) == THREADS * PER_THREAD


def test_request_body_written_as_received_reads_back_equal(tmp_path):
    """The recorder hands the writer the request body to splice in as is."""
    from llmtraj.apis.chat_completions import ChatCompletions
    from llmtraj.recording.builder import RecordBuilder

    body = b'{"model": "m",  "messages": [{"role": "user", "content": "caf\\u00e9 \\"quoted\\" \\u0000"}], "max_tokens": 5}'
    tee = RecordBuilder(api=ChatCompletions(), session="s", index=1, mode="record", method="POST",
                  url="http://u/v1/chat/completions", request_headers=[], request_body=body)
    assert tee.request_json == body
    tee.response_started(200, [("content-type", "application/json")])
    tee.chunk(b'{"ok": true}')
    writer = TrajectoryWriter(tmp_path)
    writer.append(tee.finish(), tee.secrets, tee.request_json)
    writer.close()
    assert body in (tmp_path / "s.jsonl").read_bytes()
    (record,) = read_records(tmp_path)
    assert record.request == json.loads(body) and record.response == {"ok": True}


@pytest.mark.parametrize("body", [b'{"model": "m",\r\n "messages": []}', b'{"api_key": "sk-123456789", "model": "m"}'])
def test_request_bodies_that_cannot_be_written_as_received(tmp_path, body):
    from llmtraj.apis.chat_completions import ChatCompletions
    from llmtraj.recording.builder import RecordBuilder

    tee = RecordBuilder(api=ChatCompletions(), session="s", index=1, mode="record", method="POST",
                  url="http://u", request_headers=[], request_body=body)
    assert (tee.request_json is None) == (b"api_key" in body)  # a secret must be redacted
    tee.response_started(200, [("content-type", "application/json")])
    tee.chunk(b'{"ok": true}')
    writer = TrajectoryWriter(tmp_path)
    writer.append(tee.finish(), tee.secrets, tee.request_json)
    writer.close()
    line = (tmp_path / "s.jsonl").read_bytes()
    assert body not in line and line.count(b"\n") == 1 and b"\r" not in line  # a line end would break the line
    (record,) = read_records(tmp_path)
    assert record.request == (json.loads(body) if b"api_key" not in body else {"api_key": REDACTED, "model": "m"})


def test_a_bridged_calls_translated_request_is_chained_like_the_request(tmp_path):
    """`bridge.request` repeats the conversation as the agent's request does:
    stored as a reference to the previous call's plus what is new, read back whole."""
    writer = TrajectoryWriter(tmp_path)
    turns = [{"role": "user", "content": f"turn {i} " + "x" * 2000} for i in range(6)]
    for i in range(1, 7):
        record = make_record("s", writer.next_index("s"))
        record.api = "anthropic.messages"
        record.request = {"model": "m", "max_tokens": 8, "messages": turns[:i]}
        record.bridge = Bridge(upstream_api="chat.completions", url="http://engine/v1/chat/completions", status=200,
                               request={"model": "m", "max_tokens": 8, "messages": [{"role": "system", "content": "s"}, *turns[:i]]})  # fmt: skip
        writer.append(record)
    writer.close()
    last = json.loads(lines_of(tmp_path / "s.jsonl")[-1])
    assert last["bridge"]["request_base"] == {"index": 5, "same": [], "prefix": {"messages": 6}}
    assert last["bridge"]["request"]["messages"] == [turns[5]]
    assert len(lines_of(tmp_path / "s.jsonl")[-1]) < 2 * 2200 + 1500  # the new turn twice, not the whole conversation
    records = list(read_records(tmp_path))
    assert [len(r.bridge.request["messages"]) for r in records] == [2, 3, 4, 5, 6, 7]
    assert records[-1].bridge.request["messages"][1:] == turns


def test_a_line_still_being_written_is_never_read_as_two(tmp_path):
    """A reader that meets the end of the file inside a line stops there: the
    rest of that line, written while it reads on, is not a line of its own
    (a 5 MB record read while its write was under way gave a bad "line 2")."""
    file = tmp_path / "s.jsonl"
    file.write_bytes(b'{"schema_version": 2, "session": "s"')
    lines = _lines(file)
    assert next(lines) == (1, 0, b'{"schema_version": 2, "session": "s"')
    with open(file, "ab") as fh:
        fh.write(b', "index": 1}\n')
    assert list(lines) == []
