"""Reliability runs (not tests): a soak and a crash run of the recording proxy,
through a real mitmdump with the addon in front of the stand-in upstream (its
own process).

    scripts/soak  [--clients 64] [--seconds 1800] [--every 10] [--warmup 60] [--json FILE]
    scripts/crash [--clients 64] [--rounds 5] [--kill writer,mitmdump,both] [--json FILE]

Each client is an agent of its own session calling in a loop, a mix of calls:
streamed and not, plain text, tool calls, gzip-encoded streams. Every call
carries a unique id in its message; a call counts as answered when the client
got its whole answer (a stream to its [DONE]). On disk, a call is found by
that id in the record's request.

soak: samples resident memory and open files of mitmdump and of the record
writer every `--every` seconds. At the end it waits for the writer, then
checks every answered call is on disk exactly once and complete. Memory is
judged flat when the growth after warm-up, the median of the last quarter of
the samples against the median of the first samples after `--warmup`, is at
most 5 MB.

crash: each round starts a proxy, puts the clients to work, then kills with
SIGKILL the record writer (the proxy starts another), mitmdump (its writer,
in a session of its own, writes what it was sent and exits), or both at the
same instant. Then it checks that every line of the trajectory parses (a torn
line is skipped with a note) and counts answered calls that are not on disk:
zero is the promise when one of them dies; when both do, what was lost (calls
answered in the last moments whose capture the killed writer had not written).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llmtraj.cli.proxy_process import ProxyProcess, standin_process
from llmtraj.core.store import SkippedLine, read_records
from bench import vm_rss  # bench/bench.py, beside this script (bench/ is sys.path[0])

FLAT_BYTES = 5 * 1024 * 1024
CALL_KINDS = [  # (scenario, stream, encoding)
    ("text", True, None), ("text", False, None), ("tools", True, None), ("text", True, "gzip"), ("tools", False, None),
]  # fmt: skip


# ------------------------------------------------------------------ processes


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def writer_of(proxy_pid: int) -> int | None:
    for pid in children(proxy_pid):
        try:
            if b"llmtraj.recording.writer" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            pass
    return None


def open_files(pid: int | None) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, TypeError):
        return None


def load_average() -> list[float]:
    return list(os.getloadavg())


def wait_gone(pid: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid is not None and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return pid is None


# ------------------------------------------------------------------ the agents


@dataclass
class Tally:
    answered: set[str] = field(default_factory=set)  # call ids whose whole answer arrived
    errors: Counter = field(default_factory=Counter)  # by kind
    started: int = 0


async def agent(proxy_url: str, client_id: int, stop: asyncio.Event, tally: Tally, prefix: str) -> None:
    session = f"{prefix}c{client_id}"
    async with httpx.AsyncClient(base_url=f"{proxy_url}/s/{session}/v1", timeout=60) as http:
        n = 0
        while not stop.is_set():
            n += 1
            call_id = f"{session}-{n}"
            scenario, stream, encoding = CALL_KINDS[(client_id + n) % len(CALL_KINDS)]
            headers = {"authorization": "Bearer sk-soak-0123456789abcdefghij", "x-standin-scenario": scenario}
            if encoding:
                headers["x-standin-encoding"] = encoding
            body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": f"call {call_id}"}]}
            tally.started += 1
            try:
                async with http.stream("POST", "/chat/completions", json=body, headers=headers) as response:
                    data = b"".join([chunk async for chunk in response.aiter_bytes()])
                if response.status_code != 200 or (stream and b"data: [DONE]" not in data):
                    tally.errors[f"status {response.status_code}" if response.status_code != 200 else "stream cut"] += 1
                    continue
                tally.answered.add(call_id)
            except (httpx.HTTPError, OSError) as exc:
                tally.errors[type(exc).__name__] += 1
                if not stop.is_set():
                    await asyncio.sleep(0.2)  # the proxy is down (crash runs): do not spin


class Clients:
    """`count` agents on an event loop in a thread of their own."""

    def __init__(self, proxy_url: str, count: int, prefix: str) -> None:
        self.tally = Tally()
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, args=(proxy_url, count, prefix), daemon=True)
        self._thread.start()

    def _run(self, proxy_url: str, count: int, prefix: str) -> None:
        async def main():
            await asyncio.gather(*(agent(proxy_url, i, self._stop, self.tally, prefix) for i in range(count)))

        self._loop.run_until_complete(main())

    def stop(self) -> Tally:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(120)
        return self.tally


def calls_on_disk(path: Path, skipped: list[SkippedLine]) -> tuple[Counter, set[str], int]:
    """(call id -> lines holding it, ids recorded complete, lines read)."""
    found: Counter = Counter()
    complete: set[str] = set()
    lines = 0
    for record in read_records(path, skipped=skipped):  # raises on a line that does not parse (other than torn)
        lines += 1
        messages = (record.request or {}).get("messages") or []
        text = messages[-1].get("content", "") if messages else ""
        if isinstance(text, str) and text.startswith("call "):
            found[text[5:]] += 1
            if record.complete:
                complete.add(text[5:])
    return found, complete, lines


def check_disk(path: Path, answered: set[str]) -> dict:
    skipped: list[SkippedLine] = []
    found, complete, lines = calls_on_disk(path, skipped)
    missing = answered - set(found)
    return {
        "lines": lines,
        "answered": len(answered),
        "answered_not_on_disk": len(missing),
        "answered_recorded_incomplete": len(answered & set(found) - complete),
        "written_twice": sum(1 for n in found.values() if n > 1),
        "torn_lines_skipped": [str(s) for s in skipped],
        "missing_examples": sorted(missing)[:5],
    }


def settle(path: Path, answered: set[str], timeout: float) -> None:
    """Wait until every answered call is on disk (or the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found, _, _ = calls_on_disk(path, [])
        except ValueError:
            found = Counter()
        if not answered - set(found):
            return
        time.sleep(0.2)


# ------------------------------------------------------------------ soak


def soak(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="llm-traj-soak-"))
    path = workdir / "traj"
    samples = []
    with standin_process() as upstream, ProxyProcess(upstream=upstream.url, options={"llm_traj_path": path}) as proxy:
        clients = Clients(proxy.url, args.clients, "soak")
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < args.seconds:
            time.sleep(min(args.every, max(0.0, args.seconds - elapsed)))
            writer = writer_of(proxy.pid)
            sample = {
                "t": round(time.monotonic() - start, 1), "answered": len(clients.tally.answered),
                "errors": sum(clients.tally.errors.values()),
                "proxy_rss": vm_rss(proxy.pid), "proxy_fds": open_files(proxy.pid),
                "writer_rss": vm_rss(writer), "writer_fds": open_files(writer), "load": load_average()[0],
            }  # fmt: skip
            samples.append(sample)
            if not args.quiet:
                print(f"{sample['t']:7.0f}s  calls {sample['answered']:7d}  errors {sample['errors']}  "
                      f"mitmdump {mb(sample['proxy_rss'])} {sample['proxy_fds']} fds  "
                      f"writer {mb(sample['writer_rss'])} {sample['writer_fds']} fds  load {sample['load']:.1f}", flush=True)  # fmt: skip
        tally = clients.stop()
        settle(path, tally.answered, 60)
    disk = check_disk(path, tally.answered)
    result = {
        "kind": "soak", "clients": args.clients, "seconds": args.seconds, "calls_per_second": round(len(tally.answered) / args.seconds, 1),
        "errors": dict(tally.errors), **disk,
        "proxy_rss_growth": growth(samples, "proxy_rss", args.warmup), "writer_rss_growth": growth(samples, "writer_rss", args.warmup),
        "proxy_fds": [min(s["proxy_fds"] or 0 for s in samples), max(s["proxy_fds"] or 0 for s in samples)],
        "writer_fds": [min(s["writer_fds"] or 0 for s in samples), max(s["writer_fds"] or 0 for s in samples)],
        "load_average": [min(s["load"] for s in samples), max(s["load"] for s in samples)],
        "cpus": os.cpu_count(), "samples": samples,
    }  # fmt: skip
    result["memory_flat"] = all(
        g is not None and g <= FLAT_BYTES for g in (result["proxy_rss_growth"], result["writer_rss_growth"]))
    result["ok"] = result["memory_flat"] and not tally.errors and disk["answered_not_on_disk"] == 0 and not disk["written_twice"]
    return result


def growth(samples: list[dict], key: str, warmup: float) -> int | None:
    after = [s[key] for s in samples if s["t"] >= warmup and s[key] is not None]
    if len(after) < 4:
        return None
    first = statistics.median(after[: max(1, len(after) // 4)])
    last = statistics.median(after[-max(1, len(after) // 4):])
    return int(last - first)


def mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MB"


# ------------------------------------------------------------------ crash


def crash(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="llm-traj-crash-"))
    rounds = []
    with standin_process() as upstream:
        for kill in args.kill:
            for number in range(1, args.rounds + 1):
                rounds.append(crash_round(upstream.url, workdir / f"{kill}-{number}", kill, args))
                if not args.quiet:
                    r = rounds[-1]
                    print(f"{kill:9s} round {number}: answered {r['answered']:5d}  not on disk {r['answered_not_on_disk']}"
                          f"  twice {r['written_twice']}  torn {len(r['torn_lines_skipped'])}  lines {r['lines']}", flush=True)  # fmt: skip
    result = {"kind": "crash", "clients": args.clients, "rounds": rounds, "cpus": os.cpu_count(), "load_average": load_average()}
    result["ok"] = all(r["written_twice"] == 0 and (r["kill"] == "both" or r["answered_not_on_disk"] == 0) for r in rounds)
    return result


def crash_round(upstream_url: str, path: Path, kill: str, args: argparse.Namespace) -> dict:
    proxy = ProxyProcess(upstream=upstream_url, options={"llm_traj_path": path}).start()
    try:
        clients = Clients(proxy.url, args.clients, f"{kill}")
        deadline = time.monotonic() + 60
        while len(clients.tally.answered) < args.clients and time.monotonic() < deadline:
            time.sleep(0.05)  # every client under way (a loaded machine is slow to start)
        time.sleep(args.before)
        writer = writer_of(proxy.pid)
        if kill in ("writer", "both"):
            os.kill(writer, signal.SIGKILL)
        if kill in ("mitmdump", "both"):
            os.kill(proxy.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        if kill == "writer":
            time.sleep(args.after)  # the proxy goes on with another writer
        tally = clients.stop()
        if kill == "mitmdump":
            wait_gone(writer, 60)  # the orphaned writer writes what it was sent, then ends
        else:
            settle(path, tally.answered, 30)
    finally:
        proxy.stop()
    disk = check_disk(path, tally.answered)
    return {"kill": kill, "seconds_to_kill": args.before, "errors": dict(tally.errors), **disk,
            "stopped_in": round(time.monotonic() - killed_at, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reliability")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("soak", help="N clients for S seconds; memory, files, every call on disk")
    s.add_argument("--clients", type=int, default=64)
    s.add_argument("--seconds", type=float, default=1800)
    s.add_argument("--every", type=float, default=10, help="seconds between samples")
    s.add_argument("--warmup", type=float, default=60, help="seconds before memory is judged")
    c = sub.add_parser("crash", help="kill -9 the writer, mitmdump or both under load; count lost calls")
    c.add_argument("--clients", type=int, default=64)
    c.add_argument("--rounds", type=int, default=5, help="rounds of each kind of kill")
    c.add_argument("--kill", type=lambda v: v.split(","), default=["writer", "mitmdump", "both"])
    c.add_argument("--before", type=float, default=4.0, help="seconds of load before the kill (once calls are answered)")
    c.add_argument("--after", type=float, default=2.0, help="seconds of load after killing the writer")
    for p in (s, c):
        p.add_argument("--json", type=Path, help="write the result here as JSON")
        p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    result = soak(args) if args.command == "soak" else crash(args)
    summary = {k: v for k, v in result.items() if k not in ("samples", "rounds")}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
