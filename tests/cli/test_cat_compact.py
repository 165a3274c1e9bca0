"""`llm-traj cat` and `llm-traj compact`, and version 1 trajectories (as today's
recorders wrote them) read, replayed and exported exactly as their version 2
rewrite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from llmtraj.apis import API_BY_NAME
from llmtraj.cli.app import app
from llmtraj.core.record import CallRecord, Timings
from llmtraj.core.store import TrajectoryWriter, read_records
from llmtraj.replay import Served, load
from typer.testing import CliRunner

runner = CliRunner()


def turn_record(session: str, index: int, messages: list[dict], answer: str) -> CallRecord:
    return CallRecord(
        session=session, index=index, api="chat.completions", mode="record", method="POST",
        url="http://up/v1/chat/completions", request_headers=[("content-type", "application/json")],
        request={"model": "m", "messages": messages, "tools": [{"type": "function", "function": {"name": "sh"}}]},
        status=200, response_headers=[("content-type", "application/json")],
        response={"id": f"c{index}", "object": "chat.completion", "created": 1, "model": "m",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 10 * index, "completion_tokens": 3, "total_tokens": 10 * index + 3}},
        timings=Timings(started_at=1000.0 + index, first_byte_at=1000.1 + index, ended_at=1000.5 + index),
    )  # fmt: skip


def conversations(turns: int = 6) -> list[CallRecord]:
    records = []
    for session in ("alpha", "beta"):
        messages = [{"role": "system", "content": "You are terse. " * 20}]
        for index in range(1, turns + 1):
            messages = messages + [{"role": "user", "content": f"{session} question {index} " * 30}]
            answer = f"{session} answer {index}"
            records.append(turn_record(session, index, messages, answer))
            messages = messages + [{"role": "assistant", "content": answer}]
    return records


def cat(path: Path, *args: str) -> list[dict]:
    result = runner.invoke(app, ["cat", str(path), *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def v2(tmp_path) -> Path:
    writer = TrajectoryWriter(tmp_path / "v2")
    for rec in conversations():
        writer.append(rec)
    writer.close()
    return tmp_path / "v2"


@pytest.fixture
def v1(tmp_path, v2) -> Path:
    """The same trajectory as a version 1 recorder wrote it: `cat`'s lines, a file per session."""
    root = tmp_path / "v1"
    root.mkdir()
    for line in cat(v2):
        with open(root / f"{line['session']}.jsonl", "a") as fh:
            fh.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
    return root


def whole(records) -> list[dict]:
    return [{**r.model_dump(), "schema_version": None} for r in records]


def test_v2_files_refer_back_and_cat_prints_whole_version_1_lines(v2):
    lines = [json.loads(x) for x in (v2 / "alpha.jsonl").read_text().splitlines()]
    assert "request_base" not in lines[0] and all(x["request_base"]["index"] == x["index"] - 1 for x in lines[1:])
    printed = cat(v2)
    assert all(x["schema_version"] == 1 and "request_base" not in x for x in printed)
    assert printed == [{**r.model_dump(mode="json"), "schema_version": 1} for r in conversations()]
    assert [x["index"] for x in cat(v2, "--session", "beta")] == [1, 2, 3, 4, 5, 6]
    result = runner.invoke(app, ["cat", str(v2), "--session", "gamma"])
    assert result.exit_code == 2 and "no calls of session 'gamma'" in result.output


def test_version_1_reads_exports_and_shows_as_its_version_2_rewrite(v1, v2, tmp_path):
    assert [json.loads(x)["schema_version"] for x in (v1 / "alpha.jsonl").read_text().splitlines()] == [1] * 6
    assert whole(read_records(v1)) == whole(read_records(v2))
    for args in (["export", "--format", "openai-chat"], ["export", "--format", "openai-chat", "--granularity",
                 "per_session"], ["export", "--format", "atif"], ["export", "--format", "har"], ["stats", "--json"],
                 ["show"]):  # fmt: skip
        one, two = (runner.invoke(app, [args[0], str(p), *args[1:]]) for p in (v1, v2))
        assert one.exit_code == two.exit_code == 0 and one.stdout == two.stdout and one.stdout
    out = tmp_path / "train.jsonl"
    assert runner.invoke(app, ["export", str(v1), "--format", "openai-chat", "-o", str(out)]).exit_code == 0
    assert len(out.read_text().splitlines()) == 12 and not out.with_name("train.jsonl.partial").exists()


def test_version_1_replays_as_its_version_2_rewrite(v1, v2):
    replays = [load(v1), load(v2)]
    for rec in conversations():
        live = replays[0].canonical(API_BY_NAME[rec.api], json.dumps(rec.request).encode(), [])
        served = [r.match(rec.session, live) for r in replays]
        assert all(isinstance(s, Served) and s.rung == "exact" for s in served)
        assert served[0].reply == served[1].reply
        assert json.loads(served[0].reply.body)["choices"][0]["message"]["content"] == rec.response["choices"][0][
            "message"]["content"]  # fmt: skip


def test_a_difference_is_described_from_the_resolved_recording(v2):
    replay = load(v2)
    first = conversations()[0]
    assert isinstance(replay.match("alpha", replay.canonical(API_BY_NAME["chat.completions"], json.dumps(first.request).encode(), [])), Served)
    changed = json.loads(json.dumps(conversations()[1].request))
    changed["messages"][0]["content"] = "You are verbose."
    miss = replay.match("alpha", replay.canonical(API_BY_NAME["chat.completions"], json.dumps(changed).encode(), []))
    assert miss.code == "replay_diverged" and "messages[0].content: recorded \"You are terse." in miss.message


def test_compact_rewrites_version_1_as_version_2(v1, v2):
    before = whole(read_records(v1))
    size = sum(f.stat().st_size for f in v1.glob("*.jsonl"))
    result = runner.invoke(app, ["compact", str(v1)])
    assert result.exit_code == 0 and f"compacted {v1}: {size} bytes -> " in result.stdout
    assert whole(read_records(v1)) == before
    assert [f.read_bytes() for f in sorted(v1.glob("*.jsonl"))] == [f.read_bytes() for f in sorted(v2.glob("*.jsonl"))]
    assert sum(f.stat().st_size for f in v1.glob("*.jsonl")) < size / 2
    assert sorted(p.name for p in v1.iterdir()) == ["alpha.jsonl", "beta.jsonl"]  # no work files left
    assert oct((v1 / "alpha.jsonl").stat().st_mode & 0o777) == "0o600"


def test_compact_keeps_a_file_with_a_bad_line_and_skips_a_torn_last_line(v1):
    file = v1 / "alpha.jsonl"
    original = file.read_bytes()
    lines = original.split(b"\n")
    file.write_bytes(b"\n".join([lines[0], b"{oops", *lines[1:]]))
    result = runner.invoke(app, ["compact", str(v1)])
    assert result.exit_code == 2 and f"{file}:2: not valid JSON" in result.output
    assert file.read_bytes() == b"\n".join([lines[0], b"{oops", *lines[1:]])
    file.write_bytes(original + lines[0][:40])  # a crash mid-write
    result = runner.invoke(app, ["compact", str(file)])
    assert result.exit_code == 0 and f"{file}:7: truncated last line (torn write), skipped" in result.output
    assert [r.index for r in read_records(file)] == [1, 2, 3, 4, 5, 6]


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture
def recorded_v1(tmp_path) -> tuple[Path, Path]:
    """The version 1 recording of tests/fixtures/v1 as it is, and compacted."""
    paths = []
    for name in ("as-recorded", "compacted"):
        shutil.copytree(FIXTURES / "v1", tmp_path / name)
        paths.append(tmp_path / name)
    assert runner.invoke(app, ["compact", str(paths[1])]).exit_code == 0
    return paths[0], paths[1]


@pytest.mark.parametrize("args,expected", [
    (["export", "--format", "openai-chat"], "openai-chat.out"), (["export", "--format", "atif"], "atif.out"),
    (["export", "--format", "har"], "har.out"), (["show"], "show.out"), (["stats", "--json"], "stats.out"),
])  # fmt: skip
def test_a_version_1_recording_and_its_rewrite_export_as_before(recorded_v1, args, expected):
    want = (FIXTURES / "v1-expected" / expected).read_text()
    for path in recorded_v1:
        result = runner.invoke(app, [args[0], str(path), *args[1:]])
        assert result.exit_code == 0 and result.stdout.rstrip("\n") == want.rstrip("\n")


def test_a_version_1_recording_and_its_rewrite_replay_as_recorded(recorded_v1):
    v1, v2 = recorded_v1
    assert sum(f.stat().st_size for f in v2.glob("*.jsonl")) < sum(f.stat().st_size for f in v1.glob("*.jsonl"))
    recorded = list(read_records(v1))
    assert {r.api for r in recorded} == {"chat.completions", "anthropic.messages", "responses"}
    assert whole(read_records(v2)) == whole(recorded)
    for replay in (load(v1), load(v2)):
        for rec in recorded:
            api = API_BY_NAME[rec.api]
            served = replay.match(rec.session, replay.canonical(api, json.dumps(rec.request).encode(), rec.request_headers))
            assert isinstance(served, Served) and served.rung == "exact" and served.step.index == rec.index
            reply = served.reply
            assert reply.status == rec.status
            if rec.events is not None:
                assert reply.body == "".join(e.raw for e in rec.events).encode()
            else:
                assert json.loads(reply.body) == rec.response


# --- zstd ------------------------------------------------------------------------------


def test_compact_zstd_is_read_by_every_reader_as_the_plain_file(v1, v2, tmp_path):
    plain = {args[0] + " ".join(args[1:]): runner.invoke(app, [args[0], str(v2), *args[1:]]).stdout
             for args in READERS}  # fmt: skip
    before = whole(read_records(v2))
    size = sum(f.stat().st_size for f in v1.glob("*.jsonl"))
    result = runner.invoke(app, ["compact", "--zstd", str(v1)])
    assert result.exit_code == 0 and f"compacted {v1}: {size} bytes -> " in result.stdout, result.output
    assert sorted(p.name for p in v1.iterdir()) == ["alpha.jsonl.zst", "beta.jsonl.zst"]  # replaced, no work files
    assert oct((v1 / "alpha.jsonl.zst").stat().st_mode & 0o777) == "0o600"
    assert sum(f.stat().st_size for f in v1.iterdir()) < sum(f.stat().st_size for f in v2.iterdir()) / 2
    assert whole(read_records(v1)) == before
    for args in READERS:
        result = runner.invoke(app, [args[0], str(v1), *args[1:]])
        assert result.exit_code == 0 and result.stdout == plain[args[0] + " ".join(args[1:])], args
    assert cat(v1, "--session", "beta") == cat(v2, "--session", "beta")
    test_version_1_replays_as_its_version_2_rewrite(v1, v2)  # replay reads it too, served as from the plain one
    # compacting again keeps it compressed; a single file too, named either way once compressed
    assert runner.invoke(app, ["compact", str(v1)]).exit_code == 0 and whole(read_records(v1)) == before
    single = tmp_path / "all.jsonl"
    writer = TrajectoryWriter(single)
    for rec in conversations():
        writer.append(rec)
    writer.close()
    assert runner.invoke(app, ["compact", "--zstd", str(single)]).exit_code == 0
    assert not single.exists() and single.with_name("all.jsonl.zst").exists()
    for path in (single, single.with_name("all.jsonl.zst")):
        assert whole(read_records(path)) == before
        assert cat(path, "--session", "beta") == cat(v2, "--session", "beta")
    test_version_1_replays_as_its_version_2_rewrite(single, v2)


READERS = [["export", "--format", "openai-chat"], ["export", "--format", "atif"], ["export", "--format", "har"],
           ["export", "--format", "tokens"], ["stats", "--json"], ["show"], ["cat"]]  # fmt: skip


def test_a_compressed_session_continued_is_decompressed_and_numbered_on(v2):
    assert runner.invoke(app, ["compact", "--zstd", str(v2)]).exit_code == 0
    writer = TrajectoryWriter(v2)
    assert writer.next_index("alpha") == 7  # numbered after the compressed file's calls
    extra = turn_record("alpha", 7, [{"role": "user", "content": "later"}], "later answer")
    writer.append(extra)
    writer.close()
    assert sorted(p.name for p in v2.iterdir()) == ["alpha.jsonl", "beta.jsonl.zst"]
    assert [r.index for r in read_records(v2 / "alpha.jsonl")] == [1, 2, 3, 4, 5, 6, 7]
    assert whole(read_records(v2)) == whole([*conversations()[:6], extra, *conversations()[6:]])


def test_a_torn_line_in_a_compressed_file_is_skipped_as_in_a_plain_one(v2):
    import zstandard

    file = v2 / "alpha.jsonl"
    torn = file.read_bytes() + b'{"schema_version": 2, "sess'
    (v2 / "alpha.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(torn))
    file.unlink()
    skipped = []
    assert [r.index for r in read_records(v2 / "alpha.jsonl.zst", skipped=skipped)] == [1, 2, 3, 4, 5, 6]
    assert [s.line for s in skipped] == [7]


def test_compact_keeps_a_recorded_streams_events_stored_as_their_templates_values(tmp_path):
    # A stream the recorder stored as a template's values (`slots`, `v`) is stored so again by compaction,
    # not as each event's difference from the one before (which is larger), and reads back the same.
    from llmtraj.recording.capture import CallCapture
    from llmtraj.recording.writer import record_of

    chunks = [json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                          "choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}],
                          "obfuscation": "xyz"[: 1 + i % 3]}) for i in range(300)]  # fmt: skip
    capture = CallCapture(
        api="chat.completions", session="s", index=1, mode="record", method="POST", url="http://up/v1/chat/completions",
        request_headers=[(b"content-type", b"application/json")], request_body=b'{"model":"m","stream":true}',
        started_at=1000.0, status=200, response_headers=[(b"content-type", b"text/event-stream")],
        response_headers_at=1000.1, chunks=[f"data: {c}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"],
        chunk_times=[1000.2 + i / 1000 for i in range(301)], ended_at=1001.0,
    )  # fmt: skip
    writer = TrajectoryWriter(tmp_path / "t")
    writer.append(*record_of(capture))
    writer.close()
    file = tmp_path / "t" / "s.jsonl"
    recorded, size = list(read_records(file)), file.stat().st_size
    assert sum("v" in event for event in json.loads(file.read_text())["events"]) >= 290
    result = runner.invoke(app, ["compact", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    assert list(read_records(file)) == recorded and file.stat().st_size == size
    assert sum("v" in event for event in json.loads(file.read_text())["events"]) >= 290
