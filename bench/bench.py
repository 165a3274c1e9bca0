"""Benchmark (not a test): what recording costs, measured on loopback in one run.

    scripts/bench [--seconds 3] [--rounds 3] [--quick] [--json FILE] [--only growth|prompt-tagging|normalize|anticall|bridge|streams|small-calls|zstd|capture|pool]

Four targets, each in front of the same stand-in upstream (its own process, so
it does not share a GIL with the load generator):

  direct         the stand-in itself
  mitmdump       bare mitmdump in reverse mode; by default it buffers bodies,
                 so a streamed answer arrives all at once
  mitmdump-sb1   bare mitmdump with stream_large_bodies=1: it streams, the fair
                 baseline for an addon that streams
  llm-traj       mitmdump with the addon recording every call

Measured per target: requests/s and p50/p99 latency of small non-streamed chat
completions from 1 and 16 concurrent keep-alive clients; for a 200-event SSE
stream with 1 ms between events, the time to the first event (TTFB) and to the
end (p50 of sequential requests); the same stream without delays (end-to-end
chunk throughput); and the proxy's CPU time per request. The load generator is
a minimal asyncio HTTP/1.1 client, so it costs little per request; the direct
numbers show how far above the proxies it can go.

All proxies run side by side and each measurement goes round them `--rounds`
times; a figure is the median of its rounds. mitmdump's per-stream info log
lines are silenced in every proxy alike (see QUIET_SCRIPT).

Two more targets, measured in the same rotation on the small calls only:

  llm-traj-replay    the addon replaying (upstream: a port where nothing
                     listens) a trajectory made before the measurements: the
                     load levels' call, recorded once, copied into as many
                     calls as the run can send (each is served once)
  llm-traj-anticall  the addon in anti-call mode, a driver in its own process
                     answering each call through the control API (1 client);
                     then, with no driver, 1000 calls held at once: the
                     proxy's resident memory before and while they are held

One more, on the streams only:

  llm-traj-tokens    the addon recording calls whose agent asks for token ids,
                     logprobs and usage itself (the stand-in answers them as
                     vLLM does)
  llm-traj-capture   the addon recording with llm_traj_capture_tokens=true for
                     an agent that asks for none of them: the proxy asks, and
                     takes them out of every event again; against
                     llm-traj-tokens, the same engine bytes, this is what
                     capture costs

And the bridge, on the streams only:

  llm-traj-bridge    the addon recording Anthropic Messages streams on the same
                     stand-in as a chat-completions upstream (`upstream_api`):
                     each upstream chunk translated into the agent's events as
                     it arrives; against llm-traj (the chat stream recorded as
                     it is), the time to the first event is what the bridge
                     adds (`--only bridge`: just these two)

And, in this process: what replay's normalisation costs per call on a 200 KB
request shaped like a coding agent's (tools, system prompt, history), the first
time that live request is seen: once the recorded call is loaded (loading
normalises it, which remembers its list items and strings; the live one differs
in its date and home), and with nothing loaded (cold).
`--only normalize` measures just that.

Targets checked: recording keeps >= 90% of mitmdump-sb1's requests/s and adds
<= 2 ms to a stream's first event; the bridge adds <= 2 ms to it; replay keeps >= 100% of it; the anti-call
round trip adds <= 2 ms at p50; token capture adds <= 10% to the proxy CPU per
streamed event of recording the same engine bytes. Each is printed as PASS or MISS (the exit
status stays 0: this is a measurement, not a test). The record and anti-call
targets must also have written one record per request, and the replay target
served each from the recording by exact match, checked after every measurement,
so a broken addon cannot look fast: if not, or if any response is wrong, the
benchmark stops with exit status 2.

Last, the growth table (bench/growth.py; alone with `--only growth`): bytes on
disk against the conversation for sessions of 10 to 1000 turns, proxy and
writer CPU per call along the longest, export throughput, and replay's startup
and memory with 10,000 sessions.

And what tagging a call with its prompt version costs in the record writer
(bench/prompt_tagging.py; alone with `--only prompt-tagging`).

And what the control API adds to an anti-call round trip, against a driver
on the broker's own loop (bench/anticall.py). `--only anticall` measures that
and the round trip through a real mitmdump against mitmdump-sb1.

Long streams of every API against bare streaming mitmdump, their own run
(bench/long_streams.py, `--only streams`): requests/s and CPU (proxy + record
writer) per request and per event, the writer's CPU per event up to 20,000
events, small calls, the first event's delay (`--only small-calls`: the small
calls alone, a minute).

And what zstd compression of finished session files pays (bench/compression.py;
alone with `--only zstd`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import re
import resource
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from llmtraj.anticall.client import AntiCallClient, AntiCallError
from llmtraj.cli.proxy_process import (
    ProxyProcess,
    ProxyStartError,
    ServerProcess,
    standin_process,
)
from llmtraj.replay.report import REPORT_PATH
import anticall  # bench/anticall.py, beside this script (bench/ is sys.path[0])
import compression  # bench/compression.py
import long_streams
import prompt_tagging  # bench/prompt_tagging.py, beside this script (bench/ is sys.path[0])
from growth import run_growth  # bench/growth.py, beside this script

RPS_TARGET = 0.90  # recording keeps at least this share of bare mitmdump's requests/s
TTFB_TARGET_MS = 2.0  # and adds at most this much to a stream's first event
# mitmdump prints nothing per flow (flow_detail=0) but keeps its info-level log,
# which carries the "listening"/"ready" lines ProxyProcess waits for (-q would hide them).
QUIET = ["--set", "flow_detail=0", "--set", "termlog_verbosity=info"]
# That log also has a line per streamed body ("Streaming response from ...", one
# more for the request with stream_large_bodies) and per connection: printing
# them costs the streaming targets, unevenly, CPU that has nothing to do with
# proxying. Every proxy target loads this script, which silences just that logger
# (no hooks, so it costs nothing per request).
QUIET_SCRIPT = """\
import logging

logging.getLogger("mitmproxy.proxy.server").setLevel(logging.WARNING)
"""


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    proxy: bool = True
    addon: bool = False
    options: dict[str, str] = field(default_factory=dict)
    upstream: bool = True  # False: reverse to a port where nothing listens (no LLM call goes upstream)
    only: tuple[str, ...] | None = None  # the measurements it takes part in (None: all)
    request_fields: dict[str, object] = field(default_factory=dict)  # what the agent's chat requests add
    api: str = "chat"  # the API the agent's streamed requests call: chat, or anthropic (bridged)
    config: str | None = None  # an llm_traj_config, `{upstream}` standing for the stand-in's URL

    @property
    def mode(self) -> str | None:
        return self.options.get("llm_traj_mode")

    def takes(self, measurement) -> bool:
        return self.only is None or measurement.name in self.only


DIRECT = Target("direct", "direct to upstream", proxy=False)
BARE = Target("mitmdump", "mitmdump reverse (default: buffers)")
BARE_SB1 = Target("mitmdump-sb1", "mitmdump reverse, stream_large_bodies=1", options={"stream_large_bodies": "1"})
RECORD = Target("llm-traj", "mitmdump + llm-traj record", addon=True, options={"llm_traj_mode": "record"})
REPLAY = Target("llm-traj-replay", "mitmdump + llm-traj replay (no upstream)", addon=True,
                options={"llm_traj_mode": "replay"}, upstream=False, only=("c1", "c16"))  # fmt: skip
ANTICALL = Target("llm-traj-anticall", "mitmdump + llm-traj anticall, a driver process answering", addon=True,
                  options={"llm_traj_mode": "anticall"}, upstream=False, only=("c1",))  # fmt: skip
CAPTURE = Target("llm-traj-capture", "mitmdump + llm-traj record with token capture (the stand-in answering "
                 "return_token_ids and logprobs as vLLM does, the agent getting them taken out)", addon=True,
                 options={"llm_traj_mode": "record", "llm_traj_capture_tokens": "true"}, only=("stream", "burst"))
# The same engine bytes without capture: the agent asks for them itself, the proxy only records.
RECORD_TOKENS = Target("llm-traj-tokens", "mitmdump + llm-traj record, the agent itself asking for token ids, "
                       "logprobs and usage", addon=True, options={"llm_traj_mode": "record"}, only=("stream", "burst"),
                       request_fields={"return_token_ids": True, "logprobs": True, "stream_options": {"include_usage": True}})  # fmt: skip
BRIDGE = Target("llm-traj-bridge", "mitmdump + llm-traj record, Anthropic Messages streams bridged to the stand-in "
                "as a chat-completions upstream", addon=True, options={"llm_traj_mode": "record"},
                only=("stream", "burst"), api="anthropic",
                config='default_route = "engine"\n[providers.engine]\nbase_url = "{upstream}/v1"\nupstream_api = "chat.completions"\n')  # fmt: skip
# The bridge's way to the upstream without its translation: llm-traj's own client behind the loopback server
# (what a route with retries or timeouts takes; a connect timeout that never fires puts the call on it).
CLIENT = Target("llm-traj-client", "mitmdump + llm-traj record, the chat stream sent by llm-traj's own client "
                "(a route with a timeout)", addon=True, options={"llm_traj_mode": "record"}, only=("stream", "burst"),
                config='default_route = "engine"\n[providers.engine]\nbase_url = "{upstream}/v1"\ntimeouts = {{connect = 30}}\n')  # fmt: skip
RECORDING_TARGETS = [DIRECT, BARE, BARE_SB1, RECORD]  # the main tables
TARGETS = [*RECORDING_TARGETS, REPLAY, ANTICALL, RECORD_TOKENS, CAPTURE, CLIENT, BRIDGE]
BASELINE, BUFFERED = BARE_SB1, BARE  # main and secondary baselines of the ratios
REPLAY_RPS_TARGET = 1.0  # replay keeps at least bare mitmdump's requests/s (no upstream involved)
CAPTURE_COST_TARGET = 0.10  # token capture adds at most this share to recording's proxy CPU per streamed event
ANTICALL_P50_TARGET_MS = 2.0  # agent -> driver -> agent adds at most this over bare mitmdump at p50
BRIDGE_TTFB_TARGET_MS = 2.0  # the bridge adds at most this to a stream's first event over recording it unbridged
REPLAY_RATE_BOUND = 3000  # req/s no target reaches here: sizes the replayed trajectory
REPLAY_MAX_CALLS = 200_000  # ... within reason (loading takes ~1-2 s per 60k lines)
HELD_CALLS = 1000  # held at once for the anti-call memory figure
HELD_SESSION = "held"
DRIVER_TEXT = "Something short."


@dataclass
class Running:
    """A started target: where to send requests and whose CPU time to watch."""

    url: str
    pid: int | None  # the proxy process (None for direct)
    trajectory: Path | None = None  # where the addon records (one record per call, verified)
    replayed: int | None = None  # replay: the calls in the trajectory it serves
    control_file: Path | None = None  # anticall: the control API's address and token
    driver: ServerProcess | None = None  # anticall: the driver process answering every call
    request_fields: dict[str, object] = field(default_factory=dict)  # see Target
    api: str = "chat"  # see Target


# ---------------------------------------------------------------- processes


@contextlib.contextmanager
def start_target(target: Target, upstream: ServerProcess, workdir: Path, settings: Settings) -> Iterator[Running]:
    if not target.proxy:
        yield Running(url=upstream.url, pid=None)
        return
    options: dict[str, object] = dict(target.options)
    trajectory = replayed = None
    if target.addon:
        trajectory = workdir / target.name
        options["llm_traj_path"] = trajectory
    if target.mode == "replay":
        replayed = replay_calls(settings)
        prepare_replay(trajectory, replayed, upstream, workdir)
    if target.config is not None:
        config = workdir / f"{target.name}.toml"
        config.write_text(target.config.format(upstream=upstream.url))
        options["llm_traj_config"] = config
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(start_proxy(upstream.url if target.upstream else dead_address(), options,
                                                target.addon, workdir))  # fmt: skip
        running = Running(url=proxy.url, pid=proxy.pid, trajectory=trajectory, replayed=replayed,
                          request_fields=target.request_fields, api=target.api)  # fmt: skip
        if target.mode == "replay":
            running.trajectory = None  # replay records nothing: the replay report is checked instead
        if target.mode == "anticall":
            running.control_file = trajectory / "control.json"
            running.driver = stack.enter_context(driver_process(running.control_file))
        yield running


def start_proxy(upstream: str, options: dict[str, object], addon: bool, workdir: Path) -> ProxyProcess:
    quiet = workdir / "quiet_log.py"
    if not quiet.exists():
        quiet.write_text(QUIET_SCRIPT)
    return ProxyProcess(upstream=upstream, options=options, addon=addon, extra_args=[*QUIET, "-s", str(quiet)])


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens here once closed


def driver_process(control_file: Path) -> ServerProcess:
    """The anti-call driver (`--driver`, below) in its own process, as a trainer would be."""
    return ServerProcess([sys.executable, __file__, "--driver", str(control_file)],
                         re.compile(r"bench driver: ready for (\S+) on port (\d+)"))  # fmt: skip


def vm_rss(pid: int | None) -> int | None:
    """Resident memory of a process in bytes (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, TypeError):
        pass
    return None


def raise_fd_limit(wanted: int) -> None:
    """Held calls need a socket each, in this process and in the proxy (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else hard, hard))


def _libc_cpu_clock() -> Callable[[int], int | None] | None:
    """`clock_getcpuclockid` from the C library: a process's CPU-time clock
    (every thread, the ones gone too) in nanoseconds, where /proc's user and
    system times come in whole clock ticks (10 ms)."""
    try:
        getcpuclockid = ctypes.CDLL(None, use_errno=True).clock_getcpuclockid
    except (OSError, AttributeError):
        return None
    getcpuclockid.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_int))

    def clock(pid: int) -> int | None:
        clock_id = ctypes.c_int()
        return clock_id.value if getcpuclockid(pid, ctypes.byref(clock_id)) == 0 else None

    return clock


_cpu_clock = _libc_cpu_clock()


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far, to the nanosecond where the
    C library gives its CPU-time clock, else in /proc's clock ticks; or None."""
    if pid is None:
        return None
    clock_id = _cpu_clock(pid) if _cpu_clock is not None else None
    if clock_id is not None:
        with contextlib.suppress(OSError):
            return time.clock_gettime(clock_id)
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------- HTTP client


class BadResponse(RuntimeError):
    pass


@dataclass
class Response:
    status: int
    body: bytes | None  # only when asked to keep it
    first_event: float | None  # perf_counter when the first SSE event (blank line) was in


class Connection:
    """One keep-alive HTTP/1.1 connection with just enough of a client: a
    prebuilt request goes out, the response comes back by Content-Length,
    chunked encoding or connection close."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, data: bytes, *, keep_body: bool = False, watch_events: bool = False) -> Response:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._writer.write(data)
        try:
            return await self._read_response(keep_body, watch_events)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.close()
            raise BadResponse(f"connection lost: {exc!r}") from None

    async def _read_response(self, keep_body: bool, watch_events: bool) -> Response:
        reader = self._reader
        head = await reader.readuntil(b"\r\n\r\n")
        try:
            status = int(head[9:12])
        except ValueError:
            raise BadResponse(f"not an HTTP response: {head[:80]!r}") from None
        length, chunked, close = _framing(head)
        body = bytearray()
        first_event: float | None = None
        want_body = keep_body or watch_events

        def take(data: bytes) -> None:
            nonlocal first_event
            if want_body:
                start = max(0, len(body) - 3)
                body.extend(data)
                if watch_events and first_event is None and (b"\n\n" in body[start:] or b"\r\n\r\n" in body[start:]):
                    first_event = time.perf_counter()

        if chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers expected
                    break
                take((await reader.readexactly(size + 2))[:-2])
        elif length is not None:
            left = length
            while left:
                data = await reader.read(min(left, 1 << 16)) if watch_events else await reader.readexactly(left)
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                take(data)
                left -= len(data)
        else:
            close = True
            while data := await reader.read(1 << 16):
                take(data)
        if close:
            self.close()
        return Response(status, bytes(body) if keep_body else None, first_event)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _framing(head: bytes) -> tuple[int | None, bool, bool]:
    length, chunked, close = None, False, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    return length, chunked, close


def chat_request(url: str, *, stream: bool, headers: dict[str, str], session: str | None = None,
                 fields: dict[str, object] | None = None, api: str = "chat") -> bytes:
    """A prebuilt small chat-completions request for the stand-in (`fields`
    added to its body); with `api="anthropic"` the same as an Anthropic
    Messages request (for a proxy that bridges it to the stand-in)."""
    body = {
        "model": "bench",  # no `standin-` prefix: the scenario header decides
        "messages": [{"role": "user", "content": "Say something short."}],
        "stream": stream,
        **({"max_tokens": 1024} if api == "anthropic" else {}),
        **(fields or {}),
    }
    payload = json.dumps(body).encode()
    host = urlsplit(url).netloc
    prefix = f"/s/{session}" if session else ""
    lines = [
        f"POST {prefix}/v1/{'messages' if api == 'anthropic' else 'chat/completions'} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        "Accept: application/json" if not stream else "Accept: text/event-stream",
        "Authorization: Bearer sk-bench-not-a-real-key",
        f"Content-Length: {len(payload)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def small_request(url: str, session: str | None = None) -> bytes:
    """The small non-streamed call of the load levels."""
    return chat_request(url, stream=False, headers={"x-standin-scenario": "text"}, session=session)


async def one_request(url: str, data: bytes) -> Response:
    """One request on its own connection; the body kept."""
    conn = Connection(*host_port(url))
    try:
        return await conn.request(data, keep_body=True)
    finally:
        conn.close()


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


# ---------------------------------------------------------------- measurements


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass(frozen=True)
class Settings:
    seconds: float
    warmup: float
    stream_requests: int  # per round
    rounds: int
    chunks: int = 200
    delay_ms: int = 1


@dataclass
class Outcome:
    metrics: dict[str, float]
    requests: int  # every request sent, warmup included (for the record count)
    check: Callable[[dict], str | None] | None = None  # checks the last record written


@dataclass(frozen=True)
class Load:
    """Small non-streamed calls from `concurrency` keep-alive clients for a fixed time."""

    concurrency: int

    @property
    def name(self) -> str:
        return f"c{self.concurrency}"

    def columns(self) -> list[tuple[str, str, str]]:
        c = self.concurrency
        return [
            (f"{self.name}.rps", f"c={c} req/s", "{:.0f}"),
            (f"{self.name}.p50_ms", f"c={c} p50 ms", "{:.2f}"),
            (f"{self.name}.p99_ms", f"c={c} p99 ms", "{:.2f}"),
            (f"{self.name}.cpu_us", f"c={c} proxy CPU µs/req", "{:.0f}"),
        ]

    async def run(self, target: Running, settings: Settings) -> Outcome:
        data = small_request(target.url)
        host, port = host_port(target.url)
        conns = [Connection(host, port) for _ in range(self.concurrency)]
        for conn in conns:  # connect (and warm the path) before the clock starts
            _ok(await conn.request(data))
        sent = self.concurrency
        latencies: list[float] = []
        start = time.perf_counter() + settings.warmup
        end = start + settings.seconds

        async def client(conn: Connection) -> None:
            nonlocal sent
            while (t0 := time.perf_counter()) < end:
                _ok(await conn.request(data))
                t1 = time.perf_counter()
                sent += 1
                if t0 >= start and t1 <= end:
                    latencies.append(t1 - t0)

        cpu0 = cpu_seconds(target.pid)
        try:
            await asyncio.gather(*(client(conn) for conn in conns))
        finally:
            for conn in conns:
                conn.close()
        cpu1 = cpu_seconds(target.pid)
        metrics = {
            f"{self.name}.rps": len(latencies) / settings.seconds,
            f"{self.name}.p50_ms": percentile(latencies, 50) * 1e3,
            f"{self.name}.p99_ms": percentile(latencies, 99) * 1e3,
        }
        if cpu0 is not None and cpu1 is not None:
            metrics[f"{self.name}.cpu_us"] = (cpu1 - cpu0) / (sent - self.concurrency) * 1e6
        return Outcome(metrics, sent, check=_check_text_record)


@dataclass(frozen=True)
class Stream:
    """Sequential streamed calls of `chunks` SSE events on one keep-alive connection."""

    name: str
    delay_ms: int | None  # None: the settings' delay
    ttfb: bool  # report the time to the first event
    requests_factor: int = 1  # times the settings' streamed requests

    def columns(self) -> list[tuple[str, str, str]]:
        cols = [(f"{self.name}.total_ms", f"{self.name} total ms", "{:.1f}")]
        if self.ttfb:
            cols.insert(0, (f"{self.name}.ttfb_ms", f"{self.name} TTFB ms", "{:.2f}"))
        return cols

    async def run(self, target: Running, settings: Settings) -> Outcome:
        delay = settings.delay_ms if self.delay_ms is None else self.delay_ms
        headers = {"x-standin-scenario": "chunks", "x-standin-chunks": str(settings.chunks)}
        if delay:
            headers["x-standin-delay-ms"] = str(delay)
        data = chat_request(target.url, stream=True, headers=headers, fields=target.request_fields, api=target.api)
        conn = Connection(*host_port(target.url))
        firsts: list[float] = []
        totals: list[float] = []
        cpu0 = None
        try:
            requests = settings.stream_requests * self.requests_factor
            for i in range(requests + 1):  # the first one warms up
                if i == 1:
                    cpu0 = cpu_seconds(target.pid)
                t0 = time.perf_counter()
                response = await conn.request(data, keep_body=True, watch_events=True)
                t1 = time.perf_counter()
                _ok(response)
                events = _count_events(response.body)
                if events < settings.chunks:
                    raise BadResponse(f"streamed {events} SSE events, expected at least {settings.chunks}")
                if i:
                    firsts.append(response.first_event - t0)
                    totals.append(t1 - t0)
        finally:
            conn.close()
        cpu1 = cpu_seconds(target.pid)
        metrics = {f"{self.name}.total_ms": percentile(totals, 50) * 1e3}
        if self.ttfb:
            metrics[f"{self.name}.ttfb_ms"] = percentile(firsts, 50) * 1e3
        if cpu0 is not None and cpu1 is not None:
            metrics[f"{self.name}.cpu_us"] = (cpu1 - cpu0) / requests * 1e6
        chunks = settings.chunks
        return Outcome(metrics, requests + 1, check=lambda rec: _check_stream_record(rec, chunks))


def _ok(response: Response) -> Response:
    if response.status != 200:
        raise BadResponse(f"HTTP {response.status}")
    return response


def _count_events(body: bytes) -> int:
    return body.replace(b"\r\n", b"\n").count(b"\n\n")


# bursts are short (a few ms): hundreds of them a round, so that what varies from
# one stream to the next (the loop's timing, the garbage collector) averages out
# and a few µs per event compare
BURST_FACTOR = 30
MEASUREMENTS = [
    Load(1),
    Load(16),
    Stream("stream", delay_ms=None, ttfb=True),  # events 1 ms apart: buffering shows in TTFB
    Stream("burst", delay_ms=0, ttfb=False, requests_factor=BURST_FACTOR),  # back to back: per-event cost shows in the total
]


# ---------------------------------------------------------------- record check


def count_records(path: Path) -> int:
    total = 0
    for file in sorted(path.glob("*.jsonl")) if path.is_dir() else []:
        with open(file, "rb") as fh:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    return total


def last_record(path: Path) -> dict | None:
    files = sorted(path.glob("*.jsonl"), key=lambda f: f.stat().st_mtime)
    if not files:
        return None
    with open(files[-1], "rb") as fh:
        end, tail = fh.seek(0, os.SEEK_END), 4 << 20
        while True:  # a tail that holds the whole last line (a long stream's record is several MB)
            start = max(0, end - tail)
            fh.seek(start)
            lines = fh.read().rstrip(b"\n").rsplit(b"\n", 1)
            if len(lines) == 2 or start == 0:
                return json.loads(lines[-1])
            tail *= 4


def _check_text_record(record: dict) -> str | None:
    if record.get("status") != 200 or record.get("stream") or not record.get("response"):
        return "last record is not a complete non-streamed 200 response"
    return None


def _check_stream_record(record: dict, chunks: int) -> str | None:
    events = len(record.get("events") or [])
    if record.get("status") != 200 or not record.get("stream") or events < chunks or not record.get("complete"):
        return f"last record is not a complete stream of >= {chunks} events (status {record.get('status')}, {events} events)"
    if record.get("capture") and not (record.get("tokens") or {}).get("complete"):
        return f"last record captured tokens but they are not complete: {(record.get('tokens') or {}).get('problems')}"
    return None


def verify_records(path: Path, expected: int, check: Callable[[dict], str | None] | None, timeout: float = 5.0) -> str | None:
    """None when the addon wrote one record per request (and the last looks right),
    else what is wrong. Records land just after the client has its last byte."""
    deadline = time.monotonic() + timeout
    while (found := count_records(path)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    if found != expected:
        return f"{found} records for {expected} requests in {path}"
    if check is not None:
        record = last_record(path)
        if record is None:
            return f"no records in {path}"
        return check(record)
    return None


# ---------------------------------------------------------------- replay


def replay_calls(settings: Settings) -> int:
    """Calls to record for the replay target: more than it can be sent in the run
    (each recorded call is served once), load levels taken x rounds x rate bound."""
    levels = [m for m in MEASUREMENTS if REPLAY.takes(m)]
    per_round = sum(REPLAY_RATE_BOUND * (settings.warmup + settings.seconds) + m.concurrency for m in levels)
    return min(REPLAY_MAX_CALLS, math.ceil(per_round * settings.rounds) + 100)


def prepare_replay(path: Path, calls: int, upstream: ServerProcess, workdir: Path) -> None:
    """Records the load levels' call once, through a short-lived record-mode proxy,
    and writes it `calls` times (index 1, 2, ...) as one session to replay."""
    source = workdir / "replay-source"
    with start_proxy(upstream.url, {"llm_traj_mode": "record", "llm_traj_path": source}, True, workdir) as proxy:
        _ok(asyncio.run(one_request(proxy.url, small_request(proxy.url))))
        if problem := verify_records(source, 1, _check_text_record):
            raise BadResponse(f"recording the call to replay: {problem}")
    record = last_record(source)
    head, tail = json.dumps({**record, "index": 0}).split('"index": 0', 1)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / f"{record['session']}.jsonl", "w") as fh:
        fh.writelines(f'{head}"index": {i}{tail}\n' for i in range(1, calls + 1))


def check_replay(running: Running, expected: int) -> tuple[str | None, int]:
    """(what is wrong or None, calls served): every request sent must have been
    served from the recording by an exact match (all answered 200 already)."""
    host = urlsplit(running.url).netloc
    response = asyncio.run(one_request(running.url, f"GET {REPORT_PATH} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()))
    sessions = json.loads(_ok(response).body)["sessions"]
    served = sum(s["served"] for s in sessions.values())
    exact = sum(s["rungs"].get("exact", 0) for s in sessions.values())
    misses = sum(s["misses"] for s in sessions.values())
    if served != expected or exact != expected or misses:
        return f"served {served} calls ({exact} exact, {misses} misses) for {expected} requests", served
    return None, served


# ---------------------------------------------------------------- anti-call


async def drive(control_file: Path) -> None:
    """The driver (`--driver CONTROL_FILE`): answers every call with a short text,
    through the real client, until stopped."""
    async with AntiCallClient.from_control_file(control_file) as client:
        deadline = time.monotonic() + 10
        while True:  # the control API may still be starting
            try:
                await client.sessions()
                break
            except AntiCallError as exc:
                if exc.status or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        print(f"bench driver: ready for {client.url} on port {urlsplit(client.url).port}", flush=True)
        while True:
            event = await client.get_request(timeout=1.0)
            if event is None or event.type != "request":
                continue
            with contextlib.suppress(AntiCallError):  # the agent may have hung up meanwhile
                await client.send_response(event, DRIVER_TEXT)


async def hold_calls(running: Running, count: int, timeout: float = 60.0) -> dict[str, float]:
    """With no driver answering: the proxy's memory with `count` calls held at
    once (each its own connection), then all of them released by ending their session."""
    before = vm_rss(running.pid)
    data = small_request(running.url, session=HELD_SESSION)
    host, port = host_port(running.url)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    async with AntiCallClient.from_control_file(running.control_file) as client:
        try:
            for start in range(0, count, 100):  # in batches: the listen backlog is short
                batch = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(min(100, count - start))))
                for _, writer in batch:
                    writer.write(data)
                conns += batch
            deadline = time.monotonic() + timeout
            while (held := len(await client.calls(HELD_SESSION))) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            after = vm_rss(running.pid)
            await client.end_session(HELD_SESSION, "benchmark done")
            heads = await asyncio.wait_for(asyncio.gather(*(reader.readuntil(b"\r\n\r\n") for reader, _ in conns)), timeout)
        finally:
            for _, writer in conns:
                writer.close()
    released = sum(1 for head in heads if head[9:12] == b"410")
    if held < count or released < count:
        raise BadResponse(f"{ANTICALL.name}: {held} of {count} calls held, {released} released with a 410")
    metrics = {"held.calls": float(held), "held.released": float(released)}
    if before is not None and after is not None:
        metrics |= {"held.rss_before_mib": before / 2**20, "held.rss_after_mib": after / 2**20,
                    "held.added_mib": (after - before) / 2**20, "held.kib_per_call": (after - before) / 1024 / held}  # fmt: skip
    return metrics


# ---------------------------------------------------------------- the run


@dataclass
class TargetResult:
    target: Target
    samples: dict[str, list[float]] = field(default_factory=dict)  # metric: one value per round
    requests: int = 0
    records: int | None = None  # for the addon target

    @property
    def metrics(self) -> dict[str, float]:
        """The median over the rounds of each metric."""
        return {key: statistics.median(values) for key, values in self.samples.items()}

    def add(self, outcome: Outcome) -> None:
        for key, value in outcome.metrics.items():
            self.samples.setdefault(key, []).append(value)
        self.requests += outcome.requests


def measure(measurement, target: Target, running: Running, result: TargetResult, settings: Settings) -> None:
    outcome = asyncio.run(measurement.run(running, settings))
    result.add(outcome)
    if running.trajectory is not None:
        problem = verify_records(running.trajectory, result.requests, outcome.check)
        if problem:
            raise BadResponse(f"{target.name}: the addon did not record every call: {problem}")
        result.records = count_records(running.trajectory)
    if running.replayed is not None:
        problem, result.records = check_replay(running, result.requests)
        if problem:
            raise BadResponse(f"{target.name}: the replay did not serve every call from the recording: {problem}")


def run(
    settings: Settings, targets: list[Target] = TARGETS, measurements: list | None = None, hold: bool = True
) -> dict[str, TargetResult]:
    """All targets run side by side (idle ones cost nothing); each measurement
    goes round the targets `rounds` times, in a rotating order, so drift of the
    machine spreads over all of them instead of favouring one. With the
    anti-call target and `hold`, its memory with calls held is measured last."""
    measurements = MEASUREMENTS if measurements is None else measurements
    results = {target.name: TargetResult(target) for target in targets}
    raise_fd_limit(2 * HELD_CALLS + 256)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llm-traj-bench-")))
        upstream = stack.enter_context(standin_process())
        progress(f"upstream: stand-in at {upstream.url} (pid {upstream.pid})")
        running: dict[str, Running] = {}
        for target in targets:
            running[target.name] = stack.enter_context(start_target(target, upstream, workdir, settings))
            progress(f"{target.name}: {running[target.name].url}")
        for measurement in measurements:
            for round in range(settings.rounds):
                progress(f"{measurement.name}, round {round + 1}/{settings.rounds}")
                for target in targets[round % len(targets):] + targets[: round % len(targets)]:
                    if target.takes(measurement):
                        measure(measurement, target, running[target.name], results[target.name], settings)
        if ANTICALL not in targets or not hold:
            return results
        anticall = running[ANTICALL.name]
        anticall.driver.stop()  # nobody answers now
        progress(f"{ANTICALL.name}: holding {HELD_CALLS} calls")
        results[ANTICALL.name].add(Outcome(asyncio.run(hold_calls(anticall, HELD_CALLS)), 0))
    return results


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- report


def columns() -> list[tuple[str, str, str]]:
    return [col for m in MEASUREMENTS for col in m.columns()]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


Column = tuple[str, str, str]  # metric, label, format


def absolute_table(results: dict[str, TargetResult], targets: list[Target], cols: list[Column] | None = None) -> str:
    cols = columns() if cols is None else cols
    rows = [
        [t.name, *(fmt.format(results[t.name].metrics[key]) if key in results[t.name].metrics else "-" for key, _, fmt in cols)]
        for t in targets
    ]
    return markdown_table(["target", *(label for _, label, _ in cols)], rows)


def _vs(results: dict[str, TargetResult], name: str, base: Target, key: str) -> float | None:
    a, b = results[name].metrics.get(key), results[base.name].metrics.get(key)
    return None if a is None or b is None or b == 0 else a / b


def _delta(results: dict[str, TargetResult], name: str, base: Target, key: str) -> float | None:
    a, b = results[name].metrics.get(key), results[base.name].metrics.get(key)
    return None if a is None or b is None else a - b


# (metric, label, "ratio" of rates / "delta" of times, format)
COMPARISONS = [
    ("c1.rps", "c=1 req/s", "ratio", "{:.2f}x"),
    ("c16.rps", "c=16 req/s", "ratio", "{:.2f}x"),
    ("c1.p50_ms", "c=1 p50", "delta", "{:+.2f} ms"),
    ("c16.p50_ms", "c=16 p50", "delta", "{:+.2f} ms"),
    ("c1.cpu_us", "c=1 CPU/req", "delta", "{:+.0f} µs"),
    ("c16.cpu_us", "c=16 CPU/req", "delta", "{:+.0f} µs"),
    ("stream.ttfb_ms", "stream TTFB", "delta", "{:+.2f} ms"),
    ("stream.total_ms", "stream total", "delta", "{:+.1f} ms"),
    ("burst.total_ms", "burst total", "delta", "{:+.1f} ms"),
]


def comparison(results: dict[str, TargetResult], name: str, base: Target, key: str, kind: str) -> float | None:
    return (_vs if kind == "ratio" else _delta)(results, name, base, key)


def ratio_table(results: dict[str, TargetResult], base: Target, targets: list[Target]) -> str:
    rows = []
    for target in targets:
        if target is base or not target.proxy:
            continue
        cells = [target.name]
        for key, _, kind, fmt in COMPARISONS:
            value = comparison(results, target.name, base, key, kind)
            cells.append("-" if value is None else fmt.format(value))
        rows.append(cells)
    return markdown_table([f"vs {base.name}", *(label for _, label, _, _ in COMPARISONS)], rows)


def _check(name: str, value: float | None, target: str, ok: bool, text: str) -> dict:
    return {"name": name, "value": value, "target": target, "ok": ok, "text": text}


def checks(results: dict[str, TargetResult], settings: Settings) -> list[dict]:
    out = []
    for key, label in (("c1.rps", "throughput, 1 client"), ("c16.rps", "throughput, 16 clients")):
        ratio, buffered = _vs(results, RECORD.name, BASELINE, key), _vs(results, RECORD.name, BUFFERED, key)
        out.append(_check(
            key, ratio, f">= {RPS_TARGET:.2f}x", ratio is not None and ratio >= RPS_TARGET,
            f"{label}: {RECORD.name} {_fmt(ratio, '{:.2f}x')} of {BASELINE.name}, {_fmt(buffered, '{:.2f}x')} of "
            f"{BUFFERED.name} (target >= {RPS_TARGET:.2f}x of {BASELINE.name})"))  # fmt: skip
    delta = _delta(results, RECORD.name, BASELINE, "stream.ttfb_ms")
    out.append(_check(
        "stream.ttfb_ms", delta, f"<= +{TTFB_TARGET_MS:g} ms", delta is not None and delta <= TTFB_TARGET_MS,
        f"stream first event: {RECORD.name} {_fmt(delta, '{:+.2f} ms')} vs {BASELINE.name} (target <= +{TTFB_TARGET_MS:g} ms)"))  # fmt: skip
    for key, label in (("c1.rps", "replay throughput, 1 client"), ("c16.rps", "replay throughput, 16 clients")):
        ratio, buffered = _vs(results, REPLAY.name, BASELINE, key), _vs(results, REPLAY.name, BUFFERED, key)
        out.append(_check(
            f"replay.{key}", ratio, f">= {REPLAY_RPS_TARGET:.2f}x", ratio is not None and ratio >= REPLAY_RPS_TARGET,
            f"{label}: {REPLAY.name} {_fmt(ratio, '{:.2f}x')} of {BASELINE.name}, {_fmt(buffered, '{:.2f}x')} of "
            f"{BUFFERED.name} (target >= {REPLAY_RPS_TARGET:.2f}x of {BASELINE.name})"))  # fmt: skip
    out += capture_checks(results, settings)
    out.append(anticall_check(results))
    out.append(bridge_check(results))
    return out


def anticall_check(results: dict[str, TargetResult]) -> dict:
    delta = _delta(results, ANTICALL.name, BASELINE, "c1.p50_ms")
    return _check(
        "anticall.c1.p50_ms", delta, f"<= +{ANTICALL_P50_TARGET_MS:g} ms", delta is not None and delta <= ANTICALL_P50_TARGET_MS,
        f"anti-call round trip agent -> driver -> agent: {ANTICALL.name} {_fmt(delta, '{:+.2f} ms')} at p50 "
        f"vs {BASELINE.name} (target <= +{ANTICALL_P50_TARGET_MS:g} ms)")  # fmt: skip


def bridge_check(results: dict[str, TargetResult]) -> dict:
    delta = _delta(results, BRIDGE.name, RECORD, "stream.ttfb_ms")
    return _check(
        "bridge.stream.ttfb_ms", delta, f"<= +{BRIDGE_TTFB_TARGET_MS:g} ms", delta is not None and delta <= BRIDGE_TTFB_TARGET_MS,
        f"bridge first event: {BRIDGE.name} {_fmt(delta, '{:+.2f} ms')} vs {RECORD.name} on the same upstream "
        f"(target <= +{BRIDGE_TTFB_TARGET_MS:g} ms)")  # fmt: skip


def bridge_only(settings: Settings) -> int:
    """`--only bridge`: the bridge's streams against the same streams recorded unbridged."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = run(settings, [RECORD, CLIENT, BRIDGE])
    except (KeyboardInterrupt, ProxyStartError, BadResponse) as exc:
        print(f"bench: {exc or 'interrupted'}", file=sys.stderr)
        return 2
    check = bridge_check(results)
    print("\n".join([f"llm-traj bridge benchmark: {environment()}", "", *bridge_report(results), "",
                     f"{'PASS' if check['ok'] else 'MISS'}  {check['text']}"]))  # fmt: skip
    return 0


def _fmt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def environment() -> str:
    try:
        from mitmproxy.version import VERSION as mitmproxy_version
    except ImportError:
        mitmproxy_version = "?"
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, mitmproxy {mitmproxy_version}, all on 127.0.0.1"
        f"; load average at the end {os.getloadavg()[0]:.2f} (other work on the machine skews the figures)"
    )


HELD_COLUMNS = [
    ("held.calls", "held calls", "{:.0f}"),
    ("held.rss_before_mib", "RSS before MiB", "{:.1f}"),
    ("held.rss_after_mib", "RSS held MiB", "{:.1f}"),
    ("held.added_mib", "added MiB", "{:+.1f}"),
    ("held.kib_per_call", "KiB per held call", "{:.1f}"),
    ("held.released", "released (410)", "{:.0f}"),
]


CAPTURE_COLUMNS = [
    ("stream.ttfb_ms", "stream TTFB ms", "{:.2f}"), ("stream.total_ms", "stream total ms", "{:.1f}"),
    ("stream.cpu_us", "stream proxy CPU µs/stream", "{:.0f}"),
    ("burst.total_ms", "burst total ms", "{:.1f}"), ("burst.cpu_us", "burst proxy CPU µs/stream", "{:.0f}"),
]  # fmt: skip


def capture_checks(results: dict[str, TargetResult], settings: Settings) -> list[dict]:
    """Capture's added proxy CPU per streamed event: the median over the rounds
    of each round's ratio (the two targets run next to each other in a round,
    so the machine's drift between rounds cancels out)."""
    out = []
    for stream, how in (("stream", "paced, an event per chunk"), ("burst", "back to back")):
        record, capture = (results[t.name].samples.get(f"{stream}.cpu_us") for t in (RECORD_TOKENS, CAPTURE))
        pairs = [(r, c) for r, c in zip(record or [], capture or []) if r]
        added = statistics.median(c / r - 1 for r, c in pairs) if pairs else None
        per_event = statistics.median((c - r) / settings.chunks for r, c in pairs) if pairs else None
        out.append(_check(
            f"capture.{stream}.cpu_added", added, f"<= +{CAPTURE_COST_TARGET:.0%}",
            added is not None and added <= CAPTURE_COST_TARGET,
            f"token capture ({how}): {CAPTURE.name} {_fmt(added, '{:+.1%}')} proxy CPU per streamed event vs "
            f"{RECORD_TOKENS.name} ({_fmt(per_event, '{:+.2f} µs')} per event; median of the rounds' ratios; "
            f"target <= +{CAPTURE_COST_TARGET:.0%})"))  # fmt: skip
    return out


def capture_report(results: dict[str, TargetResult], with_bare: bool = False) -> list[str]:
    capture = results[CAPTURE.name]
    return [
        f"token capture: {CAPTURE.label}; {capture.records} records for {capture.requests} requests, "
        f"each with complete tokens (checked)",
        "",
        f"against: {RECORD_TOKENS.label} (the same engine bytes, nothing rewritten)",
        "",
        absolute_table(results, [*([BARE, BARE_SB1] if with_bare else []), RECORD, RECORD_TOKENS, CAPTURE], CAPTURE_COLUMNS),
    ]


CAPTURE_TARGETS = [BARE, BARE_SB1, RECORD, RECORD_TOKENS, CAPTURE]  # --only capture


def capture_only(settings: Settings) -> int:
    """`--only capture`: token capture's streams against the same engine bytes recorded without it."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = run(settings, CAPTURE_TARGETS, [m for m in MEASUREMENTS if CAPTURE.takes(m)])
    except (KeyboardInterrupt, ProxyStartError, BadResponse) as exc:
        print(f"bench: {exc or 'interrupted'}", file=sys.stderr)
        return 2
    print("\n".join([
        f"llm-traj benchmark, token capture only: {environment()}",
        f"stream: {settings.chunks} SSE events {settings.delay_ms} ms apart, burst: the same without delay "
        f"({settings.stream_requests * BURST_FACTOR} sequential requests); proxy CPU: mitmdump's user+system time "
        f"per stream (its CPU-time clock, to the ns); every figure is the median of {settings.rounds} round(s) taken in turn across the targets",
        "",
        *capture_report(results, with_bare=True),
        "",
        *(f"{'PASS' if c['ok'] else 'MISS'}  {c['text']}" for c in capture_checks(results, settings)),
    ]))
    return 0


def bridge_report(results: dict[str, TargetResult]) -> list[str]:
    bridge = results[BRIDGE.name]
    return [
        f"bridge: {BRIDGE.label}; {bridge.records} records for {bridge.requests} requests (checked)",
        "",
        f"against: {RECORD.label}, the chat stream recorded as it is; and {CLIENT.name}: {CLIENT.label}, "
        "the bridge's way to the upstream without its translation",
        "",
        absolute_table(results, [t for t in (RECORD, CLIENT, BRIDGE) if t.name in results], CAPTURE_COLUMNS),
    ]


def replay_anticall_report(results: dict[str, TargetResult]) -> list[str]:
    replay, anticall = results[REPLAY.name], results[ANTICALL.name]
    load_cols = [col for m in MEASUREMENTS if REPLAY.takes(m) for col in m.columns()]
    return [
        f"replay: {REPLAY.label}; one recorded call replicated, each copy served once: "
        f"{replay.records} served by exact match for {replay.requests} requests, all 200",
        "",
        absolute_table(results, [BARE, BARE_SB1, REPLAY], load_cols),
        "",
        ratio_table(results, BASELINE, [REPLAY]),
        "",
        f"anti-call: {ANTICALL.label} (sequential calls, 1 client; get_request -> send_response through the "
        f"control API); {anticall.records} records for {anticall.requests} requests",
        "",
        absolute_table(results, [BARE_SB1, ANTICALL], Load(1).columns()),
        "",
        f"anti-call memory: {HELD_CALLS} non-streamed calls held at once with no driver answering "
        f"(mitmdump VmRSS), then released by ending their session",
        "",
        absolute_table(results, [ANTICALL], HELD_COLUMNS),
    ]


def report(results: dict[str, TargetResult], settings: Settings) -> str:
    record = results[RECORD.name]
    direct_ok = all(
        results[DIRECT.name].metrics.get(k, 0) > 1.5 * max(r.metrics.get(k, 0) for r in results.values() if r.target.proxy)
        for k in ("c1.rps", "c16.rps")
    )
    parts = [
        f"llm-traj benchmark: {environment()}",
        f"load: small non-streamed chat completions from 1 and 16 keep-alive clients, "
        f"{settings.seconds:g} s after {settings.warmup:g} s warmup;",
        f"stream: {settings.chunks} SSE events {settings.delay_ms} ms apart (TTFB = first event), "
        f"burst: the same without delay, p50 of {settings.stream_requests * BURST_FACTOR} sequential requests;",
        f"proxy CPU: mitmdump user+system time per request; "
        f"every figure is the median of {settings.rounds} round(s) taken in turn across the targets",
        "",
        "targets: " + "; ".join(f"{t.name} = {t.label}" for t in RECORDING_TARGETS),
        "",
        absolute_table(results, RECORDING_TARGETS),
        "",
        ratio_table(results, BASELINE, RECORDING_TARGETS),
        "",
        ratio_table(results, BUFFERED, RECORDING_TARGETS),
        "",
        f"records: {RECORD.name} wrote {record.records} records for {record.requests} requests (checked after every measurement)",
        "load generator: " + ("direct req/s well above every proxy's (> 1.5x): the client is not the bottleneck" if direct_ok
                              else "direct req/s NOT well above the proxies': the client or upstream may be limiting"),
        "",
        *replay_anticall_report(results),
        "",
        *capture_report(results),
        "",
        *bridge_report(results),
        "",
        *(f"{'PASS' if c['ok'] else 'MISS'}  {c['text']}" for c in checks(results, settings)),
    ]
    return "\n".join(parts)


def to_json(results: dict[str, TargetResult], settings: Settings) -> dict:
    return {
        "environment": environment(),
        "settings": vars(settings),
        "targets": {
            name: {"label": r.target.label, "metrics": r.metrics, "samples": r.samples,
                   "requests": r.requests, "records": r.records}
            for name, r in results.items()
        },
        "vs": {
            base.name: {
                name: {key: comparison(results, name, base, key, kind) for key, _, kind, _ in COMPARISONS}
                for name, r in results.items() if r.target.proxy and r.target is not base
            }
            for base in (BASELINE, BUFFERED)
        },
        "checks": [{k: v for k, v in c.items() if k != "text"} for c in checks(results, settings)],
    }


# ------------------------------------------------------- normalisation


NORMALIZE_TARGET_MS = 1.0


def agent_like_request(day: str, home: str, size: int = 200_000) -> dict:
    """A request shaped like a coding agent's, about `size` bytes of JSON: a
    system prompt naming the home, a reminder naming the date, many tools, a
    long history."""
    tools = [{"name": f"tool_{i}", "description": f"Tool {i} does one thing to files in the workspace. " * 12,
              "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}} for i in range(80)]
    messages = [{"role": "user", "content": [{"type": "text", "text": f"<reminder>Today is {day}.</reminder>"},
                                             {"type": "text", "text": "Fix the failing test."}]}]
    while len(json.dumps({"tools": tools, "messages": messages})) < size:
        k = len(messages)  # the history: replies replayed and what the tools said, the same in both runs
        messages.append({"role": "assistant", "content": [{"type": "tool_use", "id": f"toolu_{k:04d}", "name": "tool_1",
                                                           "input": {"path": f"src/module_{k}.py"}}]})
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{k:04d}",
                                                      "content": f"line {k}: ok\n" * 40}]})
    return {"model": "m", "max_tokens": 1000, "system": [{"type": "text", "text": f"cch=1a2b3; Home {home}"}],
            "tools": tools, "messages": messages, "metadata": {"user_id": home}}


def normalize_cost(rounds: int = 30) -> dict:
    """ms per call, median of `rounds`: normalising a live 200 KB request the
    first time it is seen, once the recording was loaded (warm: a fresh rule
    set normalised the recorded request first, as loading does), and with
    nothing loaded (cold)."""
    from pydantic_core import from_json

    from llmtraj.replay.normalize import Normalizer

    headers = [("user-agent", "claude-cli/1.0")]
    recorded = json.dumps(agent_like_request("2026-01-01", "/home/ann")).encode()
    live = json.dumps(agent_like_request("2026-01-02", "/home/bob")).encode()
    preset = Normalizer.builtin().preset_for(headers)
    gc.freeze()  # as the replaying proxy does once the recording is loaded
    warm, cold = [], []
    for _ in range(rounds):
        rules = Normalizer.builtin().rule_set(preset)
        loaded = rules.normalize("x", from_json(recorded))
        body = from_json(live)  # fresh objects, as a live request's are
        start = time.perf_counter()
        normalized = rules.normalize("x", body)
        warm.append((time.perf_counter() - start) * 1000)
        assert normalized.key == loaded.key
        fresh = Normalizer.builtin().rule_set(preset)
        body = from_json(live)
        start = time.perf_counter()
        fresh.normalize("x", body)
        cold.append((time.perf_counter() - start) * 1000)
    return {"request_bytes": len(live), "warm_ms": statistics.median(warm), "cold_ms": statistics.median(cold)}


def normalize_report(cost: dict) -> list[str]:
    ok = cost["warm_ms"] < NORMALIZE_TARGET_MS
    return [
        f"replay normalisation of a {cost['request_bytes'] / 1000:.0f} KB request (median ms per call): "
        f"{cost['warm_ms']:.2f} ms once the recording is loaded, {cost['cold_ms']:.2f} ms for strings never seen",
        f"{'PASS' if ok else 'MISS'}  normalising a live call after load costs < {NORMALIZE_TARGET_MS:g} ms",
    ]


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per load level (default 3)")
    parser.add_argument("--warmup", type=float, default=None, help="warmup seconds before each load level (default 0.5)")
    parser.add_argument("--streams", type=int, default=None,
                        help="sequential streamed requests per target and round (default 10)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="times each measurement goes round the targets; metrics are the median (default 3)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (1 round, 0.5 s loads, 5 streams)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--only", choices=["growth", "prompt-tagging", "normalize", "anticall", "bridge", "streams", "small-calls", "zstd", "capture", "pool"],
                        help="run only this part: growth (trajectory size, writer CPU per turn, export, replay of "
                        "10,000 sessions; --quick leaves out the 1000-turn session), prompt-tagging or normalize "
                        "(replay normalisation; each a few seconds), pool (anti-call calls/s through llmtraj.ray.ProxyPool "
                        "of 1 and 4 proxies against one proxy alone; needs the scale extra), anticall (the round trip through a real "
                        "mitmdump and what the control API adds to it), bridge (its streams against recording "
                        "them unbridged), streams (long streams of every API against bare streaming mitmdump, "
                        "bench/long_streams.py; a few minutes), small-calls (its small JSON calls alone), zstd (compressed session files: size, compaction, "
                        "reading, replay) or capture (token capture's streams against the same engine bytes recorded "
                        "without it, bare mitmdump beside them)")
    parser.add_argument("--driver", type=Path, metavar="CONTROL_FILE", help=argparse.SUPPRESS)  # the anti-call driver process
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick
    seconds = args.seconds if args.seconds is not None else (0.5 if quick else 3.0)
    warmup = args.warmup if args.warmup is not None else (0.2 if quick else 0.5)
    streams = args.streams if args.streams is not None else (5 if quick else 10)
    rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    return Settings(seconds=seconds, warmup=warmup, stream_requests=streams, rounds=rounds)


_interrupted = False


def _interrupt(signum, frame) -> None:
    """Ctrl-C or SIGTERM: unwind at once, so every `with` stops its process.
    (Ctrl-C also reaches the children, whose dying answers may arrive first.)"""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.driver:
        asyncio.run(drive(args.driver))  # until stopped
        return 0
    if args.only == "pool":  # bench/pool.py: needs the scale extra (Ray)
        import pool

        rows = pool.measure(sessions=16 if args.quick else 64)
        print("\n".join(pool.report(rows)))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    if args.only == "zstd":
        result = compression.measure(quick=args.quick)
        print("\n".join(compression.report(result)))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if args.only == "bridge":
        return bridge_only(settings_from(args))
    if args.only == "capture":
        return capture_only(settings_from(args))
    if args.only in ("streams", "small-calls"):
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            return long_streams.main(args.quick, args.seconds, args.rounds, args.json, small_only=args.only == "small-calls")
        except KeyboardInterrupt:
            print("bench: interrupted; all processes stopped", file=sys.stderr)
            return 130
        except RuntimeError as exc:  # a proxy did not start, answered wrong or recorded wrong (bench/long_streams.py)
            print(f"bench: {exc}", file=sys.stderr)
            return 2
    tagging = prompt_tagging.measure()
    if args.only == "prompt-tagging":
        print("\n".join(prompt_tagging.report(tagging)))
        return 0
    normalisation = normalize_cost()
    if args.only == "normalize":
        print("\n".join(normalize_report(normalisation)))
        return 0
    settings = settings_from(args)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        control_api = anticall.measure(settings.seconds, settings.warmup, settings.rounds) if args.only in (None, "anticall") else None
        if args.only == "anticall":
            round_trip = run(settings, [BARE_SB1, ANTICALL], [Load(1)], hold=False)
            check = anticall_check(round_trip)
            print("\n".join([f"{'PASS' if check['ok'] else 'MISS'}  {check['text']}", "", *anticall.report(control_api)]))
            if args.json:
                args.json.write_text(json.dumps({"round_trip": check, "control_api": control_api}, indent=2) + "\n")
            return 0
        growth_text, growth = run_growth(quick=args.quick)
        if args.only == "growth":
            print(growth_text)
            if args.json:
                args.json.write_text(json.dumps(growth, indent=2, ensure_ascii=False) + "\n")
            return 0
        results = run(settings)
        compressed = compression.measure(quick=args.quick)
    except KeyboardInterrupt:
        print("bench: interrupted; all processes stopped", file=sys.stderr)
        return 130
    except ProxyStartError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except BadResponse as exc:
        if _interrupted:
            print("bench: interrupted; all processes stopped", file=sys.stderr)
            return 130
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    print(report(results, settings))
    print("\n" + growth_text)
    print("\n" + "\n".join(anticall.report(control_api)))
    print("\n" + "\n".join(compression.report(compressed)))
    print("\n" + "\n".join(prompt_tagging.report(tagging)))
    print("\n" + "\n".join(normalize_report(normalisation)))
    if args.json:
        args.json.write_text(json.dumps({**to_json(results, settings), "growth": growth, "prompt_tagging": tagging,
                                         "normalize": normalisation, "control_api": control_api, "zstd": compressed}, indent=2, ensure_ascii=False) + "\n")
        print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
