"""The growth table (`scripts/bench --only growth`): how a trajectory scales with
the work, measured through the proxy.

  size       one session per length (10, 50, 200, 1000 turns), each turn ~2 KB
             (a user message and the model's streamed answer, the stand-in's
             `text` scenario) recorded through mitmdump with the addon: bytes
             on disk against the final conversation's bytes (its messages as
             compact JSON), and what the same calls take as version 1 lines
             (`llm-traj cat`'s, every request whole), the format before this one
  CPU        proxy and writer CPU per call over the 1000-turn session, per
             100 turns, and bare mitmdump's for the same calls: the proxy's
             own cost of forwarding requests that grow to 1.8 MB, which the
             addon's share is told apart from. Bare mitmdump runs beside the
             recording proxy, each turn's request sent to both, in turn
             first to one and first to the other, and streams request and
             response bodies as the recording proxy does in record mode
             (`stream_large_bodies=1`). Each process's CPU is its threads'
             time on a CPU (/proc/PID/task/*/schedstat, to the nanosecond),
             the writer's read once it has written the bucket. Flat: "added
             by llm-traj" and "writer" at turns 901-1000 at most
             max(+25%, +100 µs) above turns 101-200 (turns 1-100 warm the
             caches on small bodies)
  writer     the record writer's CPU per call in process (`record_of` and the
             store's append, as the writer process runs them, each body
             taken as the pieces of the previous one it repeats and the new
             bytes the proxy sends, told how much repeats the previous one) along a
             1000-turn conversation of the same turns, per 100 turns; with
             each whole body parsed and scanned for secret-named fields (as
             before the writer reused what a body repeats of the session's
             earlier ones) beside it
  export     `export --format openai-chat` of the longest session, in process,
             per call (each sample holds the conversation so far: the output
             grows with the square of the length) and per session
  replay     10,000 sessions of 50 turns (1,000 with --quick; the 50-turn session's file copied
             under new names): `replay.load` in process; mitmdump's start to
             ready, against the same mitmdump started on an empty recording
             (its own start, which the loaded machine makes slow); its resident
             memory then, and after replaying 20 whole sessions
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
from llmtraj.cli.proxy_process import ProxyProcess, standin_process
from llmtraj.core.chain import shared_prefix
from llmtraj.core.store import TrajectoryReader, TrajectoryWriter, read_records
from llmtraj.inspect.export import export
from llmtraj.recording.body_parse import RequestBodies
from llmtraj.recording.capture import BodyPieces, CallCapture
from llmtraj.recording.secret_scan import SecretFieldScan
from llmtraj.recording.writer import record_of
from llmtraj.replay import load

LENGTHS = (10, 50, 200, 1000)
QUICK_LENGTHS = (10, 50, 200)
TURN_BYTES = 2000
CPU_BUCKET = 100
REPLAY_SESSIONS, QUICK_REPLAY_SESSIONS, REPLAY_TURNS, REPLAY_SERVED = 10_000, 1_000, 50, 20
SIZE_TARGET = 3.0
STARTUP_TARGET_S, RSS_TARGET_MB = 2.0, 200.0
FLAT_SHARE, FLAT_MICROS = 0.25, 100  # a CPU column is flat if its last turns are at most this far above turns 101-200


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def _cpu(pid: int) -> float:
    """The time a process's threads have run on a CPU, in seconds to the
    nanosecond (its CPU ticks are 10 ms: 100 µs per call in a row of 100
    calls); 0 for no process."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as fh:  # (a thread that ended)
                total += int(fh.read().split()[0])
    return total / 1e9


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _lines(file: Path) -> int:
    try:
        with open(file, "rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _wait_lines(file: Path, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _lines(file) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench growth: {file} has {_lines(file)} of {count} records")
        time.sleep(0.01)


def _answer(body: bytes) -> str:
    text = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


def _session(client: httpx.Client, proxy: ProxyProcess, traj: Path, session: str, turns: int,
             buckets: list[dict] | None = None, bare: ProxyProcess | None = None) -> int:
    """Runs one conversation through `proxy`, each request sent to `bare` too
    (bare mitmdump) when given; returns its final conversation's bytes."""
    urls = [f"{p.url}/s/{session}/v1/chat/completions" for p in (proxy, bare) if p is not None]
    messages: list[dict] = [{"role": "system", "content": "You are a coding agent. Answer briefly."}]
    writer = mark = None
    for turn in range(1, turns + 1):
        filler = f"turn {turn}: the command printed " + "output line of the tool, " * 80
        messages.append({"role": "user", "content": filler[: TURN_BYTES - 80]})
        if buckets is not None and (turn - 1) % CPU_BUCKET == 0:
            writer = writer or next(iter(_children(proxy.pid)), None)
            mark = (turn, _cpu(proxy.pid), _cpu(bare.pid) if bare else 0.0, _cpu(writer) if writer else 0.0,
                    len(json.dumps(messages)))  # fmt: skip
        request = {"model": "standin-text", "messages": messages, "stream": True}
        for url in urls if turn % 2 else urls[::-1]:  # (each proxy first every other turn)
            r = client.post(url, json=request)
            if r.status_code != 200:
                raise RuntimeError(f"bench growth: turn {turn} got {r.status_code} from {url}: {r.text[:200]}")
            if url == urls[0]:
                answer = _answer(r.content)
        messages.append({"role": "assistant", "content": answer})
        if buckets is not None and turn % CPU_BUCKET == 0:
            _wait_lines(traj / f"{session}.jsonl", turn)
            first, proxy_cpu, bare_cpu, writer_cpu, request_bytes = mark
            calls = turn - first + 1
            row = {"turns": f"{first}-{turn}", "request KB": round(request_bytes / 1024, 1)}
            if bare is not None:
                row["bare mitmdump µs/call"] = round((_cpu(bare.pid) - bare_cpu) / calls * 1e6)
            row["proxy µs/call"] = round((_cpu(proxy.pid) - proxy_cpu) / calls * 1e6)
            if bare is not None:
                row["added by llm-traj µs/call"] = row["proxy µs/call"] - row["bare mitmdump µs/call"]
            row["writer µs/call"] = round(((_cpu(writer) if writer else 0.0) - writer_cpu) / calls * 1e6)
            buckets.append(row)
    _wait_lines(traj / f"{session}.jsonl", turns)
    return len(json.dumps(messages, ensure_ascii=False, separators=(",", ":")).encode())


def measure_writer_cpu(workdir: Path, turns: int = 1000) -> list[dict]:
    """CPU per call of making and writing each call's record, in process, per CPU_BUCKET turns."""
    bodies, messages = [], [{"role": "system", "content": "You are a coding agent. Answer briefly."}]
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": (f"turn {turn}: the command printed " + "output line of the tool, " * 80)[: TURN_BYTES - 80]})
        bodies.append(json.dumps({"model": "standin-text", "messages": messages, "stream": False}).encode())
        messages.append({"role": "assistant", "content": "Done. " * 20})
    answer = json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Done. " * 20}, "finish_reason": "stop"}]}).encode()
    per_way = {}
    for way, scan, parses in (("as the writer does", SecretFieldScan(), RequestBodies()),
                              ("whole body parsed and scanned", None, None)):
        writer, cpu, previous, previous_bytes = TrajectoryWriter(workdir / f"writer-{scan is None}"), [], None, b""
        for index, whole in enumerate(bodies, start=1):
            shared = shared_prefix(previous_bytes, whole) if previous is not None else 0
            new = whole[shared:]  # (what comes through the pipe)
            started = time.process_time()
            body = BodyPieces.after(previous, shared, new) if previous is not None else BodyPieces([new])
            capture = CallCapture(
                api="chat.completions", session="w", index=index, mode="record", method="POST", url="http://up/v1/chat/completions",
                request_headers=[(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-bench-0123456789")],
                request_body=body, started_at=1.0, status=200, response_headers=[(b"content-type", b"application/json")],
                response_headers_at=1.1, chunks=[answer], chunk_times=[1.2], ended_at=1.3)  # fmt: skip
            writer.append(*record_of(capture, None, scan, parses, (previous, shared) if previous is not None else None))
            cpu.append(time.process_time() - started)
            previous, previous_bytes = (body, whole) if scan is not None else (None, b"")
        writer.close()
        per_way[way] = cpu
    rows = []
    for first in range(0, turns, CPU_BUCKET):
        row = {"turns": f"{first + 1}-{first + CPU_BUCKET}", "request KB": round(len(bodies[first]) / 1024, 1)}
        for way, cpu in per_way.items():
            row[f"writer µs/call, {way}"] = round(sum(cpu[first : first + CPU_BUCKET]) / CPU_BUCKET * 1e6)
        rows.append(row)
    return rows


def _v1_bytes(file: Path) -> int:
    total = 0
    for record in TrajectoryReader(file.parent).sessions[file.stem]:
        record.schema_version = 1
        total += len(record.model_dump_json()) + 1
    return total


def measure_size_and_cpu(
    workdir: Path, lengths: tuple[int, ...], cpu_turns: int = max(LENGTHS)
) -> tuple[list[dict], list[dict], list[dict]]:
    """Sizes per session length; the CPU rows of the session of `cpu_turns`
    turns (if one of `lengths`); the export of the longest session."""
    traj = workdir / "growth"
    sizes, buckets = [], []
    with standin_process() as upstream, ProxyProcess(
        upstream=upstream.url, options={"llm_traj_mode": "record", "llm_traj_path": traj},
        extra_args=["--set", "flow_detail=0"],
    ) as proxy, ProxyProcess(
        upstream=upstream.url, addon=False, extra_args=["--set", "flow_detail=0", "--set", "stream_large_bodies=1"],
    ) as bare, httpx.Client(timeout=120) as client:  # fmt: skip
        for turns in lengths:
            final = _session(client, proxy, traj, f"g{turns}", turns, *((buckets, bare) if turns == cpu_turns else ()))
            file = traj / f"g{turns}.jsonl"
            on_disk, v1 = file.stat().st_size, _v1_bytes(file)
            sizes.append({
                "turns": turns, "conversation KB": round(final / 1024, 1), "on disk KB": round(on_disk / 1024, 1),
                "disk / conversation": round(on_disk / final, 2), "v1 lines KB": round(v1 / 1024, 1),
                "v1 / conversation": round(v1 / final, 1),
            })  # fmt: skip
    longest = traj / f"g{max(lengths)}.jsonl"
    start = time.perf_counter()
    records = sum(1 for _ in read_records(longest))
    took = time.perf_counter() - start
    exported = [{"session": longest.stem, "granularity": "(read_records only)", "samples": records,
                 "seconds": round(took, 2), "trajectory MB/s": round(longest.stat().st_size / took / 1e6, 1),
                 "output MB": 0, "output MB/s": 0}]  # fmt: skip
    for granularity in ("per_call", "per_session"):
        start = time.perf_counter()
        lines = out = 0
        for line in export(TrajectoryReader(longest), "openai-chat", granularity=granularity):
            lines, out = lines + 1, out + len(line) + 1
        took = time.perf_counter() - start
        exported.append({
            "session": longest.stem, "granularity": granularity, "samples": lines, "seconds": round(took, 2),
            "trajectory MB/s": round(longest.stat().st_size / took / 1e6, 1), "output MB": round(out / 1e6, 1),
            "output MB/s": round(out / took / 1e6, 1),
        })  # fmt: skip
    return sizes, buckets, exported


def measure_replay(workdir: Path, template: Path, sessions: int) -> dict:
    traj = workdir / "replay"
    traj.mkdir()
    data = template.read_bytes()
    name = json.dumps(template.stem).encode()
    for k in range(sessions):
        (traj / f"r{k:05d}.jsonl").write_bytes(data.replace(b'"session":' + name, b'"session":"r%05d"' % k))
    total_mb = sum(f.stat().st_size for f in traj.iterdir()) / 1e6
    requests = [json.loads(r.model_dump_json())["request"] for r in TrajectoryReader(template.parent).sessions[template.stem]]
    started = time.perf_counter()
    load(traj)
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    with ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_mode": "record", "llm_traj_path": workdir / "empty"},
                      extra_args=["--set", "flow_detail=0"]):  # fmt: skip
        bare_start = time.perf_counter() - started
    started = time.perf_counter()
    with ProxyProcess(upstream="http://127.0.0.1:9", options={"llm_traj_mode": "replay", "llm_traj_path": traj},
                      extra_args=["--set", "flow_detail=0"]) as proxy, httpx.Client(timeout=60) as client:  # fmt: skip
        startup = time.perf_counter() - started
        rss_ready = _rss_mb(proxy.pid)
        served_at = time.perf_counter()
        for k in range(0, sessions, sessions // REPLAY_SERVED):
            for request in requests:
                r = client.post(f"{proxy.url}/s/r{k:05d}/v1/chat/completions", json=request)
                if r.headers.get("x-llm-traj-match") != "exact":
                    raise RuntimeError(f"bench growth: replay of r{k:05d} answered {r.status_code}: {r.text[:200]}")
        per_call_ms = (time.perf_counter() - served_at) / (REPLAY_SERVED * len(requests)) * 1000
        rss_served = _rss_mb(proxy.pid)
    return {"sessions": sessions, "turns": len(requests), "trajectory MB": round(total_mb),
            "load s": round(loaded, 2), "proxy start s": round(startup, 2), "same, empty recording s": round(bare_start, 2),
            "RSS ready MB": round(rss_ready), "served sessions": REPLAY_SERVED,
            "RSS after MB": round(rss_served), "ms per replayed call": round(per_call_ms, 2)}  # fmt: skip


def _flatness(rows: list[dict], column: str) -> str:
    """PASS when `column` at the last turns is at most FLAT_SHARE or
    FLAT_MICROS (whichever is larger) above the turns after the first bucket
    (which warms the caches on small bodies)."""
    base, last = rows[1][column], rows[-1][column]
    allowed = max(base * FLAT_SHARE, FLAT_MICROS)
    return (f"{'PASS' if last - base <= allowed else 'MISS'} {column.removesuffix(' µs/call')} flat along the session: "
            f"{last} µs/call at turns {rows[-1]['turns']}, {base} at {rows[1]['turns']} (at most +{FLAT_SHARE:.0%} "
            f"or +{FLAT_MICROS} µs, whichever is larger)")  # fmt: skip


def table(rows: list[dict]) -> str:
    header = list(rows[0])
    cells = [[str(row[h]) for h in header] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = lambda values: "| " + " | ".join(v.rjust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|", *map(line, cells)])


def run_growth(quick: bool = False) -> tuple[str, dict]:
    lengths = QUICK_LENGTHS if quick else LENGTHS
    sessions = QUICK_REPLAY_SESSIONS if quick else REPLAY_SESSIONS
    with tempfile.TemporaryDirectory(prefix="llm-traj-growth-") as tmp:
        workdir = Path(tmp)
        print(f"bench growth: sessions of {', '.join(map(str, lengths))} turns through the proxy...", file=sys.stderr)
        sizes, buckets, exported = measure_size_and_cpu(workdir, lengths)
        print("bench growth: the record writer along 1000 turns, in process...", file=sys.stderr)
        writer = measure_writer_cpu(workdir)
        print(f"bench growth: replay of {sessions} sessions of {REPLAY_TURNS} turns...", file=sys.stderr)
        replay = measure_replay(workdir, workdir / "growth" / f"g{REPLAY_TURNS}.jsonl", sessions)
    worst = max(row["disk / conversation"] for row in sizes)
    checks = [
        f"{'PASS' if worst <= SIZE_TARGET else 'MISS'} bytes on disk <= {SIZE_TARGET}x the conversation at every "
        f"length (worst {worst}x)",
        f"{'PASS' if replay['load s'] < STARTUP_TARGET_S else 'MISS'} replay startup with {sessions} "
        f"sessions < {STARTUP_TARGET_S} s (load {replay['load s']} s; mitmdump ready in {replay['proxy start s']} s, "
        f"{replay['same, empty recording s']} s on an empty recording)",
        f"{'PASS' if replay['RSS after MB'] < RSS_TARGET_MB else 'MISS'} replay RSS < {RSS_TARGET_MB:.0f} MB "
        f"({replay['RSS ready MB']} MB ready, {replay['RSS after MB']} MB after {REPLAY_SERVED} sessions)",
    ] + [_flatness(buckets, column) for column in ("added by llm-traj µs/call", "writer µs/call") if buckets]
    text = "\n\n".join(filter(None, [
        "Growth: bytes on disk per session length (turns of ~2 KB, streamed)", table(sizes),
        "Proxy and writer CPU per call along the 1000-turn session (bare mitmdump forwarding the same calls at the same time)" if buckets else "", table(buckets) if buckets else "",
        "The record writer's CPU per call along 1000 turns, in process", table(writer),
        "Export (openai-chat, in process; per_call repeats the conversation in every sample)", table(exported),
        "Replay of many sessions", table([replay]), "\n".join(checks),
    ]))  # fmt: skip
    return text, {"sizes": sizes, "cpu": buckets, "writer": writer, "export": exported, "replay": replay, "checks": checks}
