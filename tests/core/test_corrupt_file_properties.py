"""Properties of the trajectory reader on corrupted files (issue 15), with
hypothesis: whatever bytes are flipped and whatever garbage lines are put
between the lines of a trajectory (one file for every session, or a file per
session), reading it raises nothing but TrajectoryError; with
`tolerate_corrupt` it raises nothing, every line is either a record, a
reported skipped line or one of the later lines of its session that a bad
line cut (counted in its `left_out`), and each session none of whose lines
was touched reads back whole, as written."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmtraj.core.store import SkippedLine, TrajectoryError, TrajectoryReader, _session_named_at_start, read_records

from .test_chain_properties import CALL, as_sent, write

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# One damage: a byte of some line flipped (by a mask, so it changes), or a garbage line put before some line.
DAMAGE = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")),
              st.none()),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.sampled_from([b'{"session":"a"', b'{"session":"b","index":1}', b"{}", b"[]",
                                                                         b'{"session": 5}', b"\xff\xfe"]), st.none()),
)  # fmt: skip


def damaged(data: bytes, damages: list[tuple]) -> tuple[bytes, set[int]]:
    """The file's bytes damaged, and the numbers (0-based) of the lines touched."""
    lines = [line + b"\n" for line in lines_of(data)]  # as written: each line whole
    touched: set[int] = set()
    inserted: dict[int, list[bytes]] = {}
    for kind, line, where, mask in damages:
        line %= len(lines)
        if kind == "flip":
            text = bytearray(lines[line])
            at = int(where * (len(text) - 1))  # never the newline
            text[at] ^= mask
            lines[line] = bytes(text)
            touched.add(line)
        else:
            inserted.setdefault(line, []).append(where + b"\n")
    return b"".join(b"".join(inserted.get(n, [])) + line for n, line in enumerate(lines)), touched


def lines_of(data: bytes) -> list[bytes]:
    """The lines as the reader splits them: at LF only (a CR is data)."""
    return data.split(b"\n")[: -1 if data.endswith(b"\n") else None]


def sessions_named(pieces: list[bytes]) -> set[str]:
    """The sessions that damaged text claims: as JSON, or by the start of a line that is not JSON."""
    named = set()
    for piece in pieces:
        for part in lines_of(piece):
            try:
                obj = json.loads(part)
            except ValueError:
                named |= {_session_named_at_start(part)} - {None}
                continue
            if isinstance(obj, dict) and isinstance(obj.get("session"), str):
                named.add(obj["session"])
    return named


def check(path: Path, files: dict[Path, tuple[bytes, list[tuple]]]) -> None:
    """Damages each file, then reads `path` every way."""
    whole = as_sent(read_records(path))
    affected: set[str] = set()
    lines = 0
    for file, (data, damages) in files.items():
        bad, touched = damaged(data, damages)
        file.write_bytes(bad)
        originals = lines_of(data)
        affected |= {json.loads(originals[n])["session"] for n in touched}
        changed = [line for line in lines_of(bad) if line not in set(originals)]  # flipped and inserted lines
        affected |= sessions_named(changed)
        if changed and path.is_dir():
            affected.add(file.stem)
        lines += sum(1 for line in lines_of(bad) if line.strip())
    try:
        list(read_records(path))
    except TrajectoryError:
        pass
    skipped: list[SkippedLine] = []
    got = as_sent(read_records(path, tolerate_corrupt=True, skipped=skipped))
    assert len(got) + len(skipped) + sum(s.left_out for s in skipped) == lines
    assert len({(s.file, s.line) for s in skipped}) == len(skipped)
    intact = [r for r in whole if r["session"] not in affected]
    assert [r for r in got if r["session"] not in affected] == intact
    by_session: list[SkippedLine] = []
    reader = TrajectoryReader(path, tolerate_corrupt=True, skipped=by_session)
    for session in {r["session"] for r in intact}:
        assert as_sent(reader.sessions[session]) == [r for r in intact if r["session"] == session]


@SETTINGS
@given(calls=st.lists(CALL, min_size=1, max_size=10), damages=st.lists(DAMAGE, min_size=1, max_size=4))
def test_a_damaged_single_file_reads_every_untouched_session_and_reports_the_rest(tmp_path_factory, calls, damages):
    file = tmp_path_factory.mktemp("traj") / "all.jsonl"
    write(file, calls)
    check(file, {file: (file.read_bytes(), damages)})


@SETTINGS
@given(calls=st.lists(CALL, min_size=1, max_size=10), damages=st.lists(DAMAGE, min_size=1, max_size=4),
       which=st.lists(st.integers(0, 10), min_size=4, max_size=4))  # fmt: skip
def test_damaged_session_files_spoil_only_their_own_session(tmp_path_factory, calls, damages, which):
    root = tmp_path_factory.mktemp("traj") / "dir"
    write(root, calls)
    files = sorted(root.glob("*.jsonl"))
    plan: dict[Path, tuple[bytes, list[tuple]]] = {file: (file.read_bytes(), []) for file in files}
    for damage, pick in zip(damages, which):
        plan[files[pick % len(files)]][1].append(damage)
    check(root, plan)
