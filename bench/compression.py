"""What zstd compression of finished session files pays (`scripts/bench --only zstd`).

A trajectory of agent-shaped sessions (turns of ~2 KB: a tool's output as the
user message, a streamed answer of 40 SSE events) written by the record
writer's store, in process: its size as version 1 lines (every request whole,
`llm-traj cat`'s), as version 2 (references to what the session sent before),
and as version 2 compressed by `llm-traj compact --zstd`; the time that takes;
reading it all back (`read_records`), plain and compressed; and replay: loading
it and serving every call of a few sessions, plain and compressed.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from llmtraj.apis import API_BY_NAME
from llmtraj.core.record import CallRecord, StreamEvent, Timings
from llmtraj.core.store import ZSTD_LEVEL, TrajectoryWriter, compact_file, read_records, trajectory_files
from llmtraj.replay import Served, load

SESSIONS, TURNS, EVENTS = 20, 100, 40
QUICK_SESSIONS = 5
SERVED_SESSIONS = 3


def _events(session: str, turn: int) -> list[StreamEvent]:
    out = []
    for i in range(EVENTS):
        chunk = {"id": f"chatcmpl-{session}-{turn}", "object": "chat.completion.chunk", "created": 1700000000 + turn,
                 "model": "agent-model", "choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}]}  # fmt: skip
        out.append(StreamEvent(t=round(0.01 * i, 6), raw=f"data: {json.dumps(chunk)}\n\n"))
    return [*out, StreamEvent(t=0.5, raw="data: [DONE]\n\n")]


# Tool output of an English-like entropy (words drawn from a vocabulary by a
# seeded generator, numbers, paths): a repeated filler would compress far
# better than what agents see.
_VOCABULARY = [f"{a}{b}" for a in ("re", "un", "con", "pro", "de", "in", "ex", "sub", "")
               for b in ("turn", "cord", "test", "file", "path", "load", "call", "mark", "sort", "read", "write",
                         "point", "state", "value", "count", "print", "check", "build", "parse", "trace")]  # fmt: skip


def _tool_output(rng: random.Random, turn: int) -> str:
    lines = [f"$ pytest tests/test_step_{turn}.py -q"]
    for _ in range(30):
        words = " ".join(rng.choice(_VOCABULARY) for _ in range(rng.randint(3, 9)))
        lines.append(f"src/{rng.choice(_VOCABULARY)}/{rng.choice(_VOCABULARY)}.py:{rng.randint(1, 999)}: {words}")
    return "\n".join(lines)


def _sessions(count: int) -> list[CallRecord]:
    rng = random.Random(16)
    records = []
    for s in range(count):
        session = f"agent-{s:03d}"
        messages = [{"role": "system", "content": "You are a coding agent. Use the tools. " * 40}]
        for turn in range(1, TURNS + 1):
            output = _tool_output(rng, turn)
            messages = [*messages, {"role": "user", "content": output}]
            answer = " ".join(f"word{i}" for i in range(EVENTS))  # the events' text
            records.append(CallRecord(
                session=session, index=turn, api="chat.completions", mode="record", method="POST",
                url="http://upstream/v1/chat/completions", request_headers=[("content-type", "application/json")],
                request={"model": "agent-model", "messages": messages, "stream": True,
                         "tools": [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}}}]},
                status=200, response_headers=[("content-type", "text/event-stream")], stream=True,
                response={"id": f"chatcmpl-{session}-{turn}", "object": "chat.completion", "created": 1700000000 + turn,
                          "model": "agent-model", "choices": [{"index": 0, "finish_reason": "stop",
                                                               "message": {"role": "assistant", "content": answer}}]},
                events=_events(session, turn),
                timings=Timings(started_at=1700000000.0 + turn, first_byte_at=1700000000.1 + turn, ended_at=1700000000.5 + turn),
            ))  # fmt: skip
            messages = [*messages, {"role": "assistant", "content": answer}]
    return records


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in trajectory_files(path))


def _read(path: Path) -> tuple[float, int]:
    started = time.perf_counter()
    calls = sum(1 for _ in read_records(path))
    return time.perf_counter() - started, calls


def _replay(path: Path, records: list[CallRecord]) -> tuple[float, float]:
    """(load seconds, ms per served call over the first sessions)."""
    started = time.perf_counter()
    replay = load(path)
    loaded = time.perf_counter() - started
    served = [r for r in records if r.session in {f"agent-{s:03d}" for s in range(SERVED_SESSIONS)}]
    api = API_BY_NAME["chat.completions"]
    started = time.perf_counter()
    for record in served:
        result = replay.match(record.session, replay.canonical(api, json.dumps(record.request).encode(), []))
        if not (isinstance(result, Served) and result.rung == "exact"):
            raise RuntimeError(f"bench zstd: {path.name} did not replay {record.session} #{record.index}: {result}")
        result.reply  # noqa: B018 (built when served)
    per_call = (time.perf_counter() - started) / len(served) * 1000
    replay.close()
    return loaded, per_call


def measure(quick: bool = False) -> dict:
    records = _sessions(QUICK_SESSIONS if quick else SESSIONS)
    with tempfile.TemporaryDirectory(prefix="llm-traj-bench-zstd-") as tmp:
        plain, compressed = Path(tmp) / "plain", Path(tmp) / "compressed"
        writer = TrajectoryWriter(plain)
        for record in records:
            writer.append(record)
        writer.close()
        v1 = sum(len(r.model_copy(update={"schema_version": 1}).model_dump_json()) + 1 for r in records)
        shutil.copytree(plain, compressed)
        started = time.perf_counter()
        for file in trajectory_files(compressed):
            compact_file(file, compress=True)
        compacting = time.perf_counter() - started
        v2, zst = _size(plain), _size(compressed)
        read_plain, calls = _read(plain)
        read_zst, _ = _read(compressed)
        load_plain, serve_plain = _replay(plain, records)
        load_zst, serve_zst = _replay(compressed, records)
    return {
        "sessions": len({r.session for r in records}), "calls": calls, "zstd level": ZSTD_LEVEL,
        "v1 MB": round(v1 / 1e6, 1), "v2 MB": round(v2 / 1e6, 2), "v2+zstd MB": round(zst / 1e6, 2),
        "v2 / v1": round(v2 / v1, 3), "zstd / v2": round(zst / v2, 3), "zstd / v1": round(zst / v1, 4),
        "compact --zstd MB/s": round(v2 / compacting / 1e6, 1),
        "read plain MB/s": round(v2 / read_plain / 1e6, 1), "read zstd MB/s (of v2 bytes)": round(v2 / read_zst / 1e6, 1),
        "read zstd / plain time": round(read_zst / read_plain, 2),
        "replay load plain s": round(load_plain, 3), "replay load zstd s": round(load_zst, 3),
        "replay ms/call plain": round(serve_plain, 3), "replay ms/call zstd": round(serve_zst, 3),
    }  # fmt: skip


def report(result: dict) -> list[str]:
    rows = [(k, str(v)) for k, v in result.items()]
    width = max(len(k) for k, _ in rows)
    return ["zstd compression of finished session files (in process)", "",
            *(f"  {k.ljust(width)}  {v}" for k, v in rows)]  # fmt: skip


if __name__ == "__main__":
    print("\n".join(report(measure())))
