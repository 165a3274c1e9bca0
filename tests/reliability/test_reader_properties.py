"""Properties of the trajectory reader on a damaged trajectory (issue 15), with
hypothesis: sessions whose calls are interleaved and chained (each request
stored as a reference to the one before), in one file or a file each; any one
line damaged in any of the ways a file gets damaged (bytes that are not JSON,
with or without the start that says whose the line is; a line cut short; a
line replaced by garbage). Read tolerantly, every other session reads whole,
the damaged session reads up to that line (its later calls refer to it), and
the line is reported with its file and number.

The quick profile runs in the default suite; `scripts/properties` runs the
long one (LLM_TRAJ_PROPERTIES=long)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmtraj.core.record import CallRecord, Timings
from llmtraj.core.store import SkippedLine, TrajectoryReader, TrajectoryWriter, read_records, trajectory_files

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def record(session: str, index: int) -> CallRecord:
    messages = [{"role": "user", "content": f"{session} turn {t} " * 6} for t in range(1, index + 1)]
    return CallRecord(session=session, index=index, api="chat.completions", mode="record", method="POST",
                      url="https://api.example.com/v1/chat/completions", request_headers=[], request={"model": "m", "messages": messages},
                      status=200, response={"choices": []}, timings=Timings(started_at=1.0))  # fmt: skip


def damage(line: bytes, kind: str, at: float) -> bytes:
    """`line` (without its newline) damaged; `at` in [0, 1) picks where."""
    if kind == "control character":  # anywhere: inside a string or between tokens, never JSON
        cut = int(at * len(line))
        return line[:cut] + b"\x01" + line[cut:]
    if kind == "cut short":  # at least its first byte kept: a line that is only the start of a record
        return line[: 1 + int(at * (len(line) - 1))]
    return b"garbage"


@SETTINGS
@given(
    turns=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    single_file=st.booleans(),
    pick=st.floats(0, 1, exclude_max=True),
    kind=st.sampled_from(["control character", "cut short", "garbage"]),
    at=st.floats(0, 1, exclude_max=True),
)
def test_a_damaged_line_costs_only_its_session_from_that_line_on(turns, single_file, pick, kind, at):
    sessions = [f"s{i}" for i in range(len(turns))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("all.jsonl" if single_file else "traj")
        writer = TrajectoryWriter(path)
        for k in range(1, max(turns) + 1):  # interleaved
            for session, n in zip(sessions, turns):
                if k <= n:
                    writer.append(record(session, k))
        writer.close()
        files = trajectory_files(path)
        file = files[int(pick * len(files))]
        lines = file.read_bytes().splitlines()
        number = 1 + int(at * len(lines))  # the damaged line, 1-based
        hit = json.loads(lines[number - 1])
        lines[number - 1] = damage(lines[number - 1], kind, at)
        file.write_bytes(b"\n".join(lines) + b"\n")

        skipped: list[SkippedLine] = []
        got = [(r.session, r.index, r.request) for r in read_records(path, tolerate_corrupt=True, skipped=skipped)]
        # every other session whole, the damaged one up to the damaged call (which is its call `index`)
        expected = [(s, k, record(s, k).request) for s, n in zip(sessions, turns) for k in range(1, n + 1)
                    if s != hit["session"] or k < hit["index"]]  # fmt: skip
        assert sorted(got, key=lambda c: (c[0], c[1])) == expected
        assert (file, number) in [(s.file, s.line) for s in skipped]
        # and so session by session (a single file: the lines of each found by a scan first)
        by_session: dict[str, list[int]] = {}
        for session, k, _ in expected:
            by_session.setdefault(session, []).append(k)
        reader = TrajectoryReader(path, tolerate_corrupt=True)
        assert {s: [r.index for r in calls] for s, calls in reader.sessions.items() if calls} == by_session
