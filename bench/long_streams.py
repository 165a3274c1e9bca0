"""Long streams (`scripts/bench --only streams`, issue 19): what recording
costs on streamed answers of every API, against bare streaming mitmdump
(`stream_large_bodies=1`) in the same run.

Both proxies run side by side in front of one upstream (this file run with
`--serve`, its own process) that answers each API's streams as real servers
send them (`stream_blocks`: ids, envelopes, OpenAI's random padding new in
every event, the closing events that repeat the whole text), an event per
write. Every measurement alternates between the two proxies, round after round
(the order swapped each round), and a figure is the median of its rounds. CPU
is the proxy's plus, for llm-traj, its record writer's (the child process that
makes and writes the records), read once the writer has written every call;
the figures are checked: one record per request, the last one complete with
every event and the whole text.

  throughput  200-event streams (4-character deltas, back to back) from 4
              keep-alive clients for a fixed time: requests/s and CPU per
              request, per API
  lengths     streams of 200, 2,000 and 20,000 events, sequential: CPU per
              event, and the writer's alone (flat: it must not grow with the
              length)
  small       small non-streamed JSON calls from 1 and 16 clients: requests/s
  first event streams whose events come 1 ms apart: time to the first event
  in process  the writer's code (`record_of` and `TrajectoryWriter.append`)
              fed one call of each API, length and delta size (4 and 120
              characters): µs per event, split into making and writing the
              record, and its peak memory against the record's size

Targets (the issue's): 200-event streams at 4 clients >= 0.95x bare
streaming mitmdump's requests/s with <= 1.25x its CPU per request; writer CPU
per event flat up to 20,000 events, memory linear in the record; small calls
>= 0.95x at 1 and 16 clients; first event <= +1.0 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import re
import statistics
import string
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

from llmtraj.apis import API_BY_NAME, chat_view
from llmtraj.cli.proxy_process import ServerProcess
from llmtraj.core.store import TrajectoryWriter
from llmtraj.recording.capture import FRAME_HEAD, CallCapture
from llmtraj.recording.writer import record_of

APIS = ("chat.completions", "anthropic.messages", "responses")
PATHS = {"chat.completions": "/v1/chat/completions", "anthropic.messages": "/v1/messages", "responses": "/v1/responses"}
SHORT_DELTA, LONG_DELTA = 4, 120  # characters of text per event: a token, a burst of tokens


def _sse(data: dict, event: str | None = None) -> bytes:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\ndata: {text}\n\n" if event else f"data: {text}\n\n").encode()


def _pieces(events: int, delta: int) -> list[str]:
    words = ("the ", "quick", " brown", " fox ", "jumps", " over", " a ", "lazy ", "dög ", "—\n")
    return [(words[i % len(words)] * (delta // 4 + 1))[:delta] for i in range(events)]


def _padding(i: int) -> str:
    """OpenAI's `obfuscation` of the i-th event: random letters and digits of a varying length, new in every
    event (it pads the event's size), so an event differs from the one before in its padding too."""
    n = 1 + i * 7 % 15
    return "".join(_ALPHANUMERIC[(i * 31 + k * 17 + n) % len(_ALPHANUMERIC)] for k in range(n))


_ALPHANUMERIC = string.ascii_letters + string.digits


def _chat(events: int, delta: int) -> list[bytes]:
    top = {"id": "chatcmpl-CKm7tGqR2bZbQ1xY9fE3uJkLpW0aS", "object": "chat.completion.chunk", "created": 1759000000,
           "model": "gpt-4.1-mini-2025-04-14", "service_tier": "default", "system_fingerprint": "fp_3f58d112f7"}
    def chunk(delta_: dict, obfuscation: str, finish: str | None = None) -> bytes:
        return _sse({**top, "choices": [{"index": 0, "delta": delta_, "logprobs": None, "finish_reason": finish}],
                     "obfuscation": obfuscation})
    blocks = [chunk({"role": "assistant", "content": "", "refusal": None}, _padding(0))]
    blocks += [chunk({"content": piece}, _padding(i)) for i, piece in enumerate(_pieces(events - 3, delta), 1)]
    blocks.append(chunk({}, _padding(events), "stop"))
    blocks.append(_sse({**top, "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": events,
                                                        "total_tokens": events + 20}}))
    return blocks + [b"data: [DONE]\n\n"]


def _anthropic(events: int, delta: int) -> list[bytes]:
    message = {"model": "claude-sonnet-4-5-20250929", "id": "msg_01HCAxbEwNqJwbHGbYzkPW7t", "type": "message",
               "role": "assistant", "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 21, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                         "output_tokens": 1, "service_tier": "standard"}}
    blocks = [_sse({"type": "message_start", "message": message}, "message_start"),
              _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                   "content_block_start"),
              _sse({"type": "ping"}, "ping")]
    blocks += [_sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
                    "content_block_delta") for piece in _pieces(events - 6, delta)]
    blocks += [_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
               _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                     "usage": {"output_tokens": events}}, "message_delta"),
               _sse({"type": "message_stop"}, "message_stop")]
    return blocks


def _responses(events: int, delta: int) -> list[bytes]:
    seq = iter(range(1 << 30))
    response = {"id": "resp_68b1f2c3a4e08190b1f6e2d3c4a5b6c70d9e8f7a6b5c4d3e", "object": "response",
                "created_at": 1756493507, "status": "in_progress", "error": None, "model": "gpt-4.1-mini-2025-04-14",
                "output": [], "usage": None, "metadata": {}}
    item_id = "msg_68b1f2c4b1c48190a7e3f5d2c1b0a9f80d9e8f7a6b5c4d3e"
    at = {"item_id": item_id, "output_index": 0, "content_index": 0}

    def event(kind: str, **fields) -> bytes:
        return _sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

    pieces = _pieces(events - 9, delta)
    text = "".join(pieces)
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item = {"id": item_id, "type": "message", "status": "completed", "content": [part], "role": "assistant"}
    blocks = [event("response.created", response=response), event("response.in_progress", response=response),
              event("response.output_item.added", output_index=0,
                    item={**item, "status": "in_progress", "content": []}),
              event("response.content_part.added", **at, part={**part, "text": ""})]
    blocks += [event("response.output_text.delta", **at, delta=piece, logprobs=[], obfuscation=_padding(i))
               for i, piece in enumerate(pieces)]
    blocks += [event("response.output_text.done", **at, text=text, logprobs=[]),
               event("response.content_part.done", **at, part=part),
               event("response.output_item.done", output_index=0, item=item),
               event("response.completed", response={**response, "status": "completed", "output": [item],
                                                     "usage": {"input_tokens": 20, "output_tokens": events,
                                                               "total_tokens": events + 20}})]
    return blocks


_MAKERS = {"chat.completions": _chat, "anthropic.messages": _anthropic, "responses": _responses}


@functools.lru_cache(maxsize=64)
def stream_blocks(api: str, events: int, delta: int) -> list[bytes]:
    """About `events` SSE blocks of a text answer of `api`, `delta` characters per text event."""
    return _MAKERS[api](max(events, 10), delta)


def request_body(api: str) -> bytes:
    body = {"model": "bench", "stream": True}
    if api == "responses":
        body["input"] = "Say something long."
    else:
        body["messages"] = [{"role": "user", "content": "Say something long."}]
        if api == "anthropic.messages":
            body["max_tokens"] = 64000
    return json.dumps(body).encode()


def capture_of(api: str, blocks: list[bytes], started: float = 1.0e9) -> CallCapture:
    """The capture the proxy hands the writer for a stream sent an event per chunk."""
    return CallCapture(
        api=api, session="bench", index=0, mode="record", method="POST", url="http://upstream" + PATHS[api],
        request_headers=[(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-bench-not-a-key")],
        request_body=request_body(api), started_at=started, status=200,
        response_headers=[(b"content-type", b"text/event-stream; charset=utf-8")], response_headers_at=started + 0.1,
        chunks=list(blocks), chunk_times=[started + 0.1 + i * 1e-4 for i in range(len(blocks))],
        ended_at=started + 0.2 + len(blocks) * 1e-4,
    )


def writer_cost(api: str, events: int, delta: int, repeat: int = 3) -> dict:
    """The writer's CPU per event for one call of `events` events (best of
    `repeat`: the machine is shared), split into making the record and writing
    its line, with the line's size."""
    blocks = stream_blocks(api, events, delta)
    head, *body = capture_of(api, blocks).frame()
    frame, body = head[FRAME_HEAD.size :], b"".join(body)
    best_make = best_write = float("inf")
    size = 0
    with tempfile.TemporaryDirectory() as tmp:
        writer = TrajectoryWriter(Path(tmp))
        for _ in range(repeat):
            gc.collect()
            t0 = time.process_time()
            capture = CallCapture.unframe(frame, body)
            record = record_of(capture)
            t1 = time.process_time()
            writer.append(*record)
            t2 = time.process_time()
            best_make, best_write = min(best_make, t1 - t0), min(best_write, t2 - t1)
        writer.close()
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.jsonl")) // repeat
    n = len(blocks)
    return {"api": api, "events": n, "delta": delta, "make_us_per_event": best_make / n * 1e6,
            "write_us_per_event": best_write / n * 1e6, "us_per_event": (best_make + best_write) / n * 1e6,
            "record_bytes": size}


def writer_memory(api: str, events: int, delta: int) -> dict:
    """Peak Python memory the writer allocates for one call, against the record's size."""
    blocks = stream_blocks(api, events, delta)
    head, *body = capture_of(api, blocks).frame()
    frame, body = head[FRAME_HEAD.size :], b"".join(body)
    with tempfile.TemporaryDirectory() as tmp:
        writer = TrajectoryWriter(Path(tmp))
        gc.collect()
        tracemalloc.start()
        capture = CallCapture.unframe(frame, body)
        writer.append(*record_of(capture))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        writer.close()
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.jsonl"))
    return {"api": api, "events": len(blocks), "delta": delta, "peak_bytes": peak, "record_bytes": size,
            "peak_per_record_byte": peak / size}



# ---------------------------------------------------------------- the upstream

EVENTS_HEADER, DELTA_HEADER, DELAY_HEADER = "x-bench-events", "x-bench-delta", "x-bench-delay-ms"
_API_OF_PATH = {path: api for api, path in PATHS.items()}
_SMALL_ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1759000000, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Something short."}, "logprobs": None,
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}).encode()  # fmt: skip


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One keep-alive connection: each streamed request gets its API's stream,
    an event per write (`x-bench-delay-ms` apart), any other a small JSON answer."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            if not json.loads(body).get("stream"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(_SMALL_ANSWER), _SMALL_ANSWER))  # fmt: skip
                await writer.drain()
                continue
            key = (_API_OF_PATH[path], int(headers.get(EVENTS_HEADER, 200)), int(headers.get(DELTA_HEADER, SHORT_DELTA)))
            blocks = stream_blocks(*key)
            delay = int(headers.get(DELAY_HEADER, 0)) / 1000
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                         b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")  # fmt: skip
            for i, block in enumerate(blocks):
                if delay and i:
                    await asyncio.sleep(delay)
                writer.write(b"%x\r\n%s\r\n" % (len(block), block))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve() -> None:
    server = await asyncio.start_server(_answer, "127.0.0.1", 0)
    print(f"long streams upstream: listening on http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def upstream_process() -> ServerProcess:
    return ServerProcess([sys.executable, __file__, "--serve"],
                         re.compile(r"listening on http(s?)://127\.0\.0\.1:(\d+)"))  # fmt: skip


# ---------------------------------------------------------------- measurements


def request(url: str, api: str, *, stream: bool, events: int = 200, delta: int = SHORT_DELTA, delay_ms: int = 0) -> bytes:
    from urllib.parse import urlsplit

    body = request_body(api) if stream else json.dumps({"model": "bench", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    headers = [f"POST {PATHS[api] if stream else PATHS['chat.completions']} HTTP/1.1", f"Host: {urlsplit(url).netloc}",
               "Content-Type: application/json", "Authorization: Bearer sk-bench-not-a-real-key",
               f"Content-Length: {len(body)}"]  # fmt: skip
    if stream:
        headers += [f"{EVENTS_HEADER}: {events}", f"{DELTA_HEADER}: {delta}", f"{DELAY_HEADER}: {delay_ms}"]
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


class StreamsFailed(RuntimeError):
    """A proxy answered wrong or did not record every call: no figure stands."""


@dataclass
class Proxy:
    """A started proxy: where to send requests, whose CPU to count, where it records."""

    name: str
    url: str
    pid: int
    trajectory: Path | None = None
    sent: int = 0  # requests sent so far (the record count to expect)

    def writer_pid(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as fh:
                children = [int(p) for p in fh.read().split()]
        except OSError:
            return None
        return children[0] if children else None


@dataclass(frozen=True)
class Work:
    """One measurement: `clients` keep-alive clients sending `request` for
    `seconds` (or, with `count`, that many requests each, sequentially)."""

    key: str
    api: str
    stream: bool
    clients: int = 1
    seconds: float | None = None
    count: int | None = None
    events: int = 200
    delta: int = SHORT_DELTA
    delay_ms: int = 0


@dataclass
class Sample:
    requests: int
    seconds: float
    proxy_cpu: float
    writer_cpu: float
    first_event_ms: list[float] = field(default_factory=list)


def _cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    from bench import cpu_seconds

    return cpu_seconds(pid) or 0.0


async def _run(proxy: Proxy, work: Work) -> Sample:
    from bench import Connection, _count_events, _ok, host_port

    data = request(proxy.url, work.api, stream=work.stream, events=work.events, delta=work.delta, delay_ms=work.delay_ms)
    conns = [Connection(*host_port(proxy.url)) for _ in range(work.clients)]
    for conn in conns:  # connect and warm the path before measuring
        _ok(await conn.request(data))
    proxy.sent += work.clients
    await _written(proxy)
    writer = proxy.writer_pid()
    done, firsts = 0, []
    cpu0, writer0, t0 = _cpu(proxy.pid), _cpu(writer), time.perf_counter()
    end = t0 + (work.seconds or 0)

    async def client(conn) -> None:
        nonlocal done
        sent = 0
        while (time.perf_counter() < end) if work.count is None else sent < work.count:
            start = time.perf_counter()
            response = _ok(await conn.request(data, keep_body=work.stream, watch_events=work.stream))
            sent += 1
            done += 1
            if work.stream:
                if _count_events(response.body) < len(stream_blocks(work.api, work.events, work.delta)):
                    raise StreamsFailed(f"{proxy.name}: {work.key}: a stream cut short")
                firsts.append((response.first_event - start) * 1e3)

    try:
        await asyncio.gather(*(client(conn) for conn in conns))
    finally:
        for conn in conns:
            conn.close()
    elapsed = time.perf_counter() - t0
    proxy.sent += done
    await _written(proxy)
    return Sample(done, elapsed, _cpu(proxy.pid) - cpu0, _cpu(writer) - writer0, firsts)


async def _written(proxy: Proxy, timeout: float = 60.0) -> None:
    """Until the writer has written a record for every request sent (the
    writer's CPU counts only once it is done)."""
    if proxy.trajectory is None:
        return
    from bench import count_records

    deadline = time.monotonic() + timeout
    while (found := count_records(proxy.trajectory)) < proxy.sent:
        if time.monotonic() > deadline:
            raise StreamsFailed(f"{proxy.name}: {found} records for {proxy.sent} requests")
        await asyncio.sleep(0.02)
    if found != proxy.sent:
        raise StreamsFailed(f"{proxy.name}: {found} records for {proxy.sent} requests")


def check_last_record(proxy: Proxy, work: Work) -> None:
    """The last record is the call as sent: complete, every event, the whole text."""
    from bench import last_record

    record = last_record(proxy.trajectory)
    if not work.stream:
        ok = record["status"] == 200 and not record["stream"] and record["response"]["choices"]
    else:
        blocks = stream_blocks(work.api, work.events, work.delta)
        text = chat_view(work.api, record["response"])["choices"][0]["message"]["content"]
        ok = (record["complete"] and record["stream"] and len(record["events"]) == len(blocks) and not record["problems"]
              and text == "".join(_pieces(_text_events(work.api, len(blocks)), work.delta)))  # fmt: skip
    if not ok:
        raise StreamsFailed(f"{proxy.name}: {work.key}: the last record is not the call as sent")


def _text_events(api: str, events: int) -> int:
    """How many of a stream's events carry text (see the makers above)."""
    return events - {"chat.completions": 4, "anthropic.messages": 6, "responses": 8}[api]


# ---------------------------------------------------------------- the run

BARE, RECORD = "mitmdump-sb1", "llm-traj"
TPUT_RPS_TARGET, TPUT_CPU_TARGET = 0.95, 1.25
SMALL_RPS_TARGET, FIRST_EVENT_TARGET_MS = 0.95, 1.0
FLAT_TARGET = 1.25  # the writer's CPU per event at 20,000 events over that at 200 (flat, within the noise)
LENGTHS = (200, 2000, 20000)


@dataclass(frozen=True)
class StreamSettings:
    seconds: float = 3.0
    rounds: int = 3
    first_requests: int = 20
    quick: bool = False
    small_only: bool = False  # the small calls alone (`scripts/bench --only small-calls`)

    @property
    def lengths(self) -> tuple[int, ...]:
        return LENGTHS

    def count(self, events: int) -> int:
        """Sequential requests per round for a stream of `events` (CPU time comes in 10 ms ticks)."""
        return max(2, (20_000 if self.quick else 60_000) // events)


def works(settings: StreamSettings) -> list[Work]:
    small = [Work(f"small.c{c}", "chat.completions", False, clients=c, seconds=settings.seconds) for c in (1, 16)]
    if settings.small_only:
        return small
    out = [Work(f"{api}.tput", api, True, clients=4, seconds=settings.seconds) for api in APIS]
    out += [Work(f"{api}.len{n}", api, True, count=settings.count(n), events=n) for api in APIS for n in settings.lengths]
    out += small
    out += [Work(f"{api}.first", api, True, count=settings.first_requests, events=20, delay_ms=1) for api in APIS]
    return out


def metrics_of(work: Work, sample: Sample) -> dict[str, float]:
    cpu = sample.proxy_cpu + sample.writer_cpu
    out = {"cpu_us_per_req": cpu / sample.requests * 1e6}
    if work.seconds is not None:
        out["rps"] = sample.requests / sample.seconds
    if work.stream:
        events = sample.requests * len(stream_blocks(work.api, work.events, work.delta))
        out |= {"cpu_us_per_event": cpu / events * 1e6, "writer_us_per_event": sample.writer_cpu / events * 1e6,
                "proxy_us_per_event": sample.proxy_cpu / events * 1e6}  # fmt: skip
        out["first_event_ms"] = statistics.median(sample.first_event_ms)
    return out


def run_streams(settings: StreamSettings) -> dict:
    """Both proxies, every measurement in alternating rounds; medians."""
    from bench import progress, start_proxy

    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llm-traj-bench-streams-")))
        upstream = stack.enter_context(upstream_process())
        progress(f"long streams: upstream at {upstream.url}")
        bare = stack.enter_context(start_proxy(upstream.url, {"stream_large_bodies": "1"}, False, workdir))
        recording = stack.enter_context(start_proxy(upstream.url, {"llm_traj_mode": "record",
                                                                   "llm_traj_path": workdir / "rec"}, True, workdir))  # fmt: skip
        proxies = [Proxy(BARE, bare.url, bare.pid), Proxy(RECORD, recording.url, recording.pid, workdir / "rec")]
        for work in works(settings):
            for round_ in range(settings.rounds):
                for proxy in proxies if round_ % 2 == 0 else proxies[::-1]:
                    sample = asyncio.run(_run(proxy, work))
                    for key, value in metrics_of(work, sample).items():
                        samples.setdefault(work.key, {}).setdefault(proxy.name, {}).setdefault(key, []).append(value)
                    if proxy.trajectory is not None:
                        check_last_record(proxy, work)
            progress(f"long streams: {work.key} done")
        records = proxies[1].sent
    medians = {key: {name: {m: statistics.median(v) for m, v in ms.items()} for name, ms in by.items()}
               for key, by in samples.items()}  # fmt: skip
    return {"samples": samples, "medians": medians, "records": records}


def in_process(quick: bool) -> dict:
    lengths = (200, 2000) if quick else LENGTHS
    cost = [writer_cost(api, n, delta) for api in APIS for delta in (SHORT_DELTA, LONG_DELTA) for n in lengths]
    memory = [writer_memory(api, n, SHORT_DELTA) for api in APIS for n in lengths]
    return {"cost": cost, "memory": memory}


# ---------------------------------------------------------------- report


def _table(header: list[str], rows: list[list[str]]) -> str:
    from bench import markdown_table

    return markdown_table(header, rows)


def checks(results: dict) -> list[dict]:
    m = results["medians"]
    out = []

    def check(name: str, ok: bool, text: str) -> None:
        out.append({"name": name, "ok": ok, "text": text})

    for api in APIS if f"{APIS[0]}.tput" in m else ():  # (none with the small calls alone)
        bare, rec = m[f"{api}.tput"][BARE], m[f"{api}.tput"][RECORD]
        rps, cpu = rec["rps"] / bare["rps"], rec["cpu_us_per_req"] / bare["cpu_us_per_req"]
        check(f"{api}.tput.rps", rps >= TPUT_RPS_TARGET,
              f"{api}, 200-event streams at 4 clients: {rps:.2f}x bare streaming mitmdump's requests/s "
              f"(target >= {TPUT_RPS_TARGET:.2f}x)")
        check(f"{api}.tput.cpu", cpu <= TPUT_CPU_TARGET,
              f"{api}, 200-event streams at 4 clients: {cpu:.2f}x its CPU per request, proxy + writer "
              f"(target <= {TPUT_CPU_TARGET:.2f}x)")
        short, long_ = (m[f"{api}.len{n}"][RECORD]["writer_us_per_event"] for n in (LENGTHS[0], LENGTHS[-1]))
        check(f"{api}.writer.flat", long_ / short <= FLAT_TARGET,
              f"{api}: the writer's CPU per event at {LENGTHS[-1]:,} events {long_:.1f} µs, at {LENGTHS[0]} "
              f"{short:.1f} µs: {long_ / short:.2f}x (flat: target <= {FLAT_TARGET:.2f}x)")
        delta = m[f"{api}.first"][RECORD]["first_event_ms"] - m[f"{api}.first"][BARE]["first_event_ms"]
        check(f"{api}.first_event", delta <= FIRST_EVENT_TARGET_MS,
              f"{api}: first event {delta:+.2f} ms over bare streaming mitmdump (target <= +{FIRST_EVENT_TARGET_MS:g} ms)")
    for c in (1, 16):
        bare, rec = m[f"small.c{c}"][BARE], m[f"small.c{c}"][RECORD]
        ratio = rec["rps"] / bare["rps"]
        check(f"small.c{c}.rps", ratio >= SMALL_RPS_TARGET,
              f"small JSON calls, {c} client{'s' if c > 1 else ''}: {ratio:.2f}x bare streaming mitmdump's "
              f"requests/s (target >= {SMALL_RPS_TARGET:.2f}x)")
    return out


def report(results: dict, local: dict, settings: StreamSettings) -> str:
    from bench import environment

    m = results["medians"]
    apis = () if settings.small_only else APIS  # (the streams measured)
    rows = []
    for api in apis:
        bare, rec = m[f"{api}.tput"][BARE], m[f"{api}.tput"][RECORD]
        rows.append([api, f"{bare['rps']:.0f}", f"{rec['rps']:.0f}", f"{rec['rps'] / bare['rps']:.2f}x",
                     f"{bare['cpu_us_per_req']:.0f}", f"{rec['cpu_us_per_req']:.0f}",
                     f"{rec['cpu_us_per_req'] / bare['cpu_us_per_req']:.2f}x", f"{rec['writer_us_per_event']:.1f}"])  # fmt: skip
    tput = _table(["200-event streams, 4 clients", "bare req/s", "llm-traj req/s", "ratio", "bare CPU µs/req",
                   "llm-traj CPU µs/req", "ratio", "writer µs/event"], rows)  # fmt: skip
    rows = []
    for api in apis:
        for n in settings.lengths:
            bare, rec = m[f"{api}.len{n}"][BARE], m[f"{api}.len{n}"][RECORD]
            rows.append([api, f"{n:,}", f"{bare['cpu_us_per_event']:.1f}", f"{rec['proxy_us_per_event']:.1f}",
                         f"{rec['writer_us_per_event']:.1f}", f"{rec['cpu_us_per_event'] / bare['cpu_us_per_event']:.2f}x"])  # fmt: skip
    lengths = _table(["sequential streams", "events", "bare CPU µs/event", "llm-traj proxy µs/event",
                      "writer µs/event", "CPU ratio"], rows)  # fmt: skip
    rows = []
    for c in (1, 16):
        bare, rec = m[f"small.c{c}"][BARE], m[f"small.c{c}"][RECORD]
        rows.append([f"{c}", f"{bare['rps']:.0f}", f"{rec['rps']:.0f}", f"{rec['rps'] / bare['rps']:.2f}x",
                     f"{bare['cpu_us_per_req']:.0f}", f"{rec['cpu_us_per_req']:.0f}"])  # fmt: skip
    small = _table(["small JSON calls, clients", "bare req/s", "llm-traj req/s", "ratio", "bare CPU µs/req",
                    "llm-traj CPU µs/req"], rows)  # fmt: skip
    rows = [[api, f"{m[f'{api}.first'][BARE]['first_event_ms']:.2f}", f"{m[f'{api}.first'][RECORD]['first_event_ms']:.2f}",
             f"{m[f'{api}.first'][RECORD]['first_event_ms'] - m[f'{api}.first'][BARE]['first_event_ms']:+.2f}"] for api in apis]  # fmt: skip
    first = _table(["first event (p50 ms)", "bare", "llm-traj", "difference"], rows)
    rows = [[c["api"], str(c["delta"]), f"{c['events']:,}", f"{c['make_us_per_event']:.1f}", f"{c['write_us_per_event']:.1f}",
             f"{c['us_per_event']:.1f}", f"{c['record_bytes']:,}"] for c in local["cost"]]  # fmt: skip
    cost = _table(["writer in process", "delta chars", "events", "make µs/event", "write µs/event", "total µs/event",
                   "record bytes"], rows)  # fmt: skip
    rows = [[c["api"], f"{c['events']:,}", f"{c['record_bytes']:,}", f"{c['peak_bytes']:,}", f"{c['peak_per_record_byte']:.1f}"]
            for c in local["memory"]]  # fmt: skip
    memory = _table(["writer memory", "events", "record bytes", "peak bytes", "peak / record"], rows)
    return "\n".join([
        f"llm-traj long streams: {environment()}",
        f"{BARE} = bare mitmdump reverse, stream_large_bodies=1; {RECORD} = mitmdump + llm-traj record "
        f"(CPU: mitmdump + its record writer); each figure the median of {settings.rounds} alternating rounds; "
        f"{results['records']} records written, each checked",
        *(["", small, ""] if settings.small_only else ["", tput, "", lengths, "", small, "", first, "", cost, "", memory, ""]),
        *(f"{'PASS' if c['ok'] else 'MISS'}  {c['text']}" for c in checks(results)),
    ])  # fmt: skip


def main(quick: bool, seconds: float | None, rounds: int | None, json_path: Path | None, small_only: bool = False) -> int:
    settings = StreamSettings(seconds=seconds or (1.0 if quick else 3.0), rounds=rounds or (1 if quick else 3),
                              first_requests=8 if quick else 20, quick=quick, small_only=small_only)  # fmt: skip
    local = {"cost": [], "memory": []} if small_only else in_process(quick)
    results = run_streams(settings)
    print(report(results, local, settings))
    if json_path:
        json_path.write_text(json.dumps({"settings": vars(settings), **results, "in_process": local,
                                         "checks": checks(results)}, indent=2) + "\n")  # fmt: skip
        print(f"\nresults: {json_path}")
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    asyncio.run(serve())
