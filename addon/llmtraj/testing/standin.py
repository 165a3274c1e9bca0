"""A local stand-in for an OpenAI-compatible model server (the "upstream").

Used by the end-to-end tests, the benchmark and the no-API-key demo. It answers
`POST .../chat/completions` with deterministic canned completions, streamed or
not, lists models, and misbehaves on request (errors, dropped connections,
content-encodings, odd but valid SSE framing) so that a proxy in front of it can
be exercised without a real provider.

The scenario comes from the `x-standin-scenario` header, else from a request
`model` of the form `standin-<scenario>`, else it is `text`. A scenario is
written once, as its list of stream chunks; the non-stream body is the
aggregate of those chunks, so both variants describe the same completion by
construction.

Stdlib + brotli + zstandard only: pure asyncio with a minimal HTTP/1.1 parser
(keep-alive, content-length or chunked request bodies), cheap enough per
request never to be the bottleneck of a benchmark of the proxy in front of it.

    with StandinUpstream() as up:
        OpenAI(base_url=up.url + "/v1", api_key="x").chat.completions.create(...)
        up.requests[-1].body, up.sent[-1].body

    python -m llmtraj.testing.standin [--host 127.0.0.1] [--port 0] [--tls-cert F --tls-key F]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import re
import signal
import ssl
import sys
import threading
import zlib
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import brotli
import zstandard

SCENARIO_HEADER = "x-standin-scenario"
CHUNKS_HEADER = "x-standin-chunks"  # `chunks` scenario: number of content deltas
DELAY_HEADER = "x-standin-delay-ms"  # sleep before each stream event / the response
ENCODING_HEADER = "x-standin-encoding"  # gzip | br | zstd
# Transient failures: the first N requests with the same fail key (default:
# the path) get the fail status (default 500), with the retry-after headers
# given; the later ones are answered normally.
FAIL_FIRST_HEADER = "x-standin-fail-first"
FAIL_STATUS_HEADER = "x-standin-fail-status"
FAIL_KEY_HEADER = "x-standin-fail-key"
RETRY_AFTER_HEADERS = {"x-standin-retry-after": "retry-after", "x-standin-retry-after-ms": "retry-after-ms"}

CHAT_ID = "chatcmpl-standin-1"
CREATED = 1_700_000_000
FINGERPRINT = "fp_standin"
DEFAULT_MODEL = "standin"

TEXT = "Hello! I am the standin upstream, a deterministic fake model — café ✓."
REASONING = "The user greets me. A short, friendly answer will do."
ANSWER = "Hello there, from the reasoning scenario."
TOOL_CALLS = [
    ("call_standin_0", "get_weather", {"city": "Paris", "unit": "celsius"}),
    ("call_standin_1", "get_time", {"timezone": "Europe/Paris"}),
]
KEEPALIVE = b": keep-alive\n\n"
_HEAD_LIMIT = 1 << 20  # request head / chunk-size line limit


# --- what the tests see -------------------------------------------------------


def _find(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    return next((v for k, v in reversed(headers) if k.lower() == name), None)


@dataclass(slots=True)
class ReceivedRequest:
    method: str
    path: str  # the request target as received, query included
    headers: list[tuple[str, str]]  # in order, names as received
    body: bytes  # de-chunked, otherwise as received

    def header(self, name: str) -> str | None:
        return _find(self.headers, name)


@dataclass(slots=True)
class SentResponse:
    status: int
    headers: list[tuple[str, str]]
    # Entity bytes exactly as written: after content-encoding, without chunked
    # framing. Complete before the client can see the end of the response.
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return _find(self.headers, name)


# --- scenarios: each returns its stream chunks (choices + extra top-level fields)


class _Ctx(NamedTuple):
    req: dict[str, Any]  # the parsed request body
    body: bytes
    chunks: str | None  # the x-standin-chunks header


def _choice(delta: dict, index: int = 0, finish: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _ev(*choices: dict, **top: Any) -> dict:
    return {"choices": list(choices), **top}


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text)


def _split(text: str, parts: int) -> list[str]:
    return [text[len(text) * k // parts : len(text) * (k + 1) // parts] for k in range(parts)]


def _content(pieces: list[str], index: int = 0) -> list[dict]:
    """Role delta, one content delta per piece, then the finish delta."""
    return [
        _ev(_choice({"role": "assistant", "content": ""}, index)),
        *(_ev(_choice({"content": p}, index)) for p in pieces),
        _ev(_choice({}, index, "stop")),
    ]


def _text(ctx: _Ctx) -> list[dict]:
    return _content(_words(TEXT))


def _reasoning(ctx: _Ctx) -> list[dict]:
    return [
        _ev(_choice({"role": "assistant", "content": None, "reasoning_content": ""})),
        *(_ev(_choice({"content": None, "reasoning_content": p})) for p in _words(REASONING)),
        *(_ev(_choice({"content": p, "reasoning_content": None})) for p in _words(ANSWER)),
        _ev(_choice({}, finish="stop")),
    ]


def _tools(ctx: _Ctx) -> list[dict]:
    starts = [
        {"index": i, "id": id_, "type": "function", "function": {"name": name, "arguments": ""}}
        for i, (id_, name, _) in enumerate(TOOL_CALLS)
    ]
    events = [
        _ev(_choice({"role": "assistant", "content": None, "tool_calls": [starts[0]]})),
        _ev(_choice({"tool_calls": [starts[1]]})),
    ]
    # Arguments in 4 fragments each, the two calls interleaved: the hard case
    # for an aggregator, which must go by `index`, not by arrival order.
    fragments = [_split(json.dumps(args), 4) for *_, args in TOOL_CALLS]
    for k in range(4):
        for i, frags in enumerate(fragments):
            call = {"index": i, "function": {"arguments": frags[k]}}
            events.append(_ev(_choice({"tool_calls": [call]})))
    return events + [_ev(_choice({}, finish="tool_calls"))]


def _n(ctx: _Ctx) -> list[dict]:
    n = int(ctx.req.get("n") or 2)
    if not 1 <= n <= 128:
        raise ValueError(f"n must be in 1..128, got {n}")
    # Same word count for every choice, so the round robin below is complete.
    per_choice = [_content(_words(f"Choice {i} of {n}: answer number {i}."), i) for i in range(n)]
    return [ev for step in zip(*per_choice) for ev in step]


def _logprob(token: str, j: int, top: int) -> dict:
    def entry(tok: str, lp: float) -> dict:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

    lp = -(j % 4 + 1) / 8  # exact binary fractions: stable JSON
    alts = [entry(f"alt{a}", lp - a - 1) for a in range(top - 1)]
    return {**entry(token, lp), "top_logprobs": [entry(token, lp), *alts]}


def _logprobs(ctx: _Ctx) -> list[dict]:
    top = int(ctx.req.get("top_logprobs") or 2)
    events = _content(_words(TEXT))
    for j, ev in enumerate(events[1:-1]):
        ch = ev["choices"][0]
        ch["logprobs"] = {"content": [_logprob(ch["delta"]["content"], j, top)], "refusal": None}
    return events


def _vendor(ctx: _Ctx) -> list[dict]:
    events = _content(_words(TEXT))
    events[1]["choices"][0]["delta"]["audio_tokens_hint"] = "x"
    for ev in events:
        ev["provider_meta"] = {"provider": "standin", "region": "local-1"}
        ev["choices"][0]["stop_reason"] = None
    events[-1]["choices"][0]["stop_reason"] = 151645  # vLLM: the stop token's id
    return events


def _big(ctx: _Ctx) -> list[dict]:
    filler = ("standin big payload " * 250)[:4992]
    return _content([f"[{i:05d}] {filler}" for i in range(1000)])  # 1000 x 5000 chars


def _chunks(ctx: _Ctx) -> list[dict]:
    return _content([f"tok{i} " for i in range(int(ctx.chunks or 200))])


def _echo(ctx: _Ctx) -> list[dict]:
    text = ctx.body.decode("utf-8", "replace")
    return _content([text[i : i + 64] for i in range(0, len(text), 64)])


_SCENARIOS: dict[str, Callable[[_Ctx], list[dict]]] = {
    "text": _text,
    "reasoning": _reasoning,
    "tools": _tools,
    "n": _n,
    "logprobs": _logprobs,
    "vendor": _vendor,
    "crlf": _text,  # the difference is in the framing, see _FRAMES
    "multiline": _text,
    "drop": _text,  # cut short when sent
    "big": _big,
    "chunks": _chunks,
    "echo": _echo,
}
# name -> status, error type, code, extra response headers
_ERRORS: dict[str, tuple[int, str, str | None, list[tuple[str, str]]]] = {
    "error400": (400, "invalid_request_error", "invalid_value", []),
    "error429": (429, "requests", "rate_limit_exceeded", [("retry-after", "1")]),
    "error500": (500, "server_error", None, []),
    "error503": (503, "service_unavailable", None, []),
}
SCENARIOS: tuple[str, ...] = (*_SCENARIOS, *_ERRORS)
MODELS = {
    "object": "list",
    "data": [
        {"id": f"standin-{name}", "object": "model", "created": CREATED, "owned_by": "standin"}
        for name in SCENARIOS
    ],
}


# --- from chunks to the non-stream body / to SSE ---------------------------


class _Cat(list):
    """Pieces of a string being concatenated, joined once at the end (`big` has
    1000 pieces of 5 KB: repeated `+` would copy gigabytes)."""


def _merge(acc: dict, delta: dict) -> None:
    """Accumulate a delta as clients do (openai's `accumulate_delta`): strings
    concatenate, lists of indexed dicts merge by `index`, None never erases."""
    for k, v in delta.items():
        cur = acc.get(k)
        if v is None:
            acc.setdefault(k, None)
        elif isinstance(v, str) and k not in ("index", "type"):
            if isinstance(cur, _Cat):
                cur.append(v)
            else:
                acc[k] = _Cat([v])
        elif isinstance(v, dict):
            if not isinstance(cur, dict):
                cur = acc[k] = {}
            _merge(cur, v)
        elif isinstance(v, list):
            if not isinstance(cur, list):
                cur = acc[k] = []
            for item in v:
                while len(cur) <= item["index"]:
                    cur.append({})
                _merge(cur[item["index"]], item)
        else:
            acc[k] = v


def _joined(x: Any) -> Any:
    if isinstance(x, _Cat):
        return "".join(x)
    if isinstance(x, dict):
        return {k: _joined(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_joined(v) for v in x]
    return x


def _completion(events: list[dict], model: str, usage: dict) -> dict:
    top: dict[str, Any] = {}
    choices: dict[int, dict] = {}
    for ev in events:
        top.update((k, v) for k, v in ev.items() if k != "choices")  # last one wins
        for ch in ev["choices"]:
            acc = choices.setdefault(ch["index"], {"index": ch["index"], "message": {}})
            for k, v in ch.items():
                if k == "delta":
                    _merge(acc["message"], v)
                elif k == "logprobs" and v is not None:
                    lp = acc.get("logprobs") or {"content": [], "refusal": None}
                    lp["content"] = lp["content"] + v["content"]
                    acc["logprobs"] = lp
                elif k == "token_ids":
                    acc[k] = (acc.get(k) or []) + v
                elif v is not None or k not in acc:
                    acc[k] = v
    out = []
    for i in sorted(choices):
        choice = _joined(choices[i])
        choice["message"].setdefault("content", None)
        for call in choice["message"].get("tool_calls", ()):
            del call["index"]  # stream-only field
        out.append(choice)
    return {
        "id": CHAT_ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": out,
        "usage": usage,
        **top,
    }


def _with_engine_tokens(events: list[dict], req: dict, usage: dict) -> list[dict]:
    """The events as vLLM sends them when asked (`return_token_ids`, `logprobs`):
    prompt ids on top of the first, each choice's new ids (one per delta that
    carries anything, as `_usage` counts) and their logprobs."""
    ids, logprobs = req.get("return_token_ids") is True, req.get("logprobs") is True
    if not (ids or logprobs):
        return events
    out = []
    for j, ev in enumerate(events):
        choices = []
        for ch in ev["choices"]:
            produced = any(v for k, v in ch["delta"].items() if k != "role")
            ch = dict(ch)
            if logprobs and ch.get("logprobs") is None and produced:
                ch["logprobs"] = {"content": [_logprob(str(ch["delta"].get("content") or ""), j, 1)]}
            if ids:
                ch["token_ids"] = [1000 + j] if produced else []
            choices.append(ch)
        out.append({**ev, "choices": choices})
    if ids and out:
        out[0] = {**out[0], "prompt_token_ids": list(range(usage["prompt_tokens"]))}
    return out


def _usage(events: list[dict], req: dict) -> dict:
    # Predictable from the request alone: 10 per message; one per delta carrying
    # anything but the role.
    prompt = 10 * max(1, len(req.get("messages") or ()))
    completion = sum(
        1 for ev in events for ch in ev["choices"] if any(v for k, v in ch["delta"].items() if k != "role")
    )
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _stream_chunks(events: list[dict], model: str, usage: dict, include_usage: bool) -> Iterator[dict]:
    base = {"id": CHAT_ID, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "system_fingerprint": FINGERPRINT}  # fmt: skip
    tail = {"usage": None} if include_usage else {}  # as OpenAI: null until the usage chunk
    for ev in events:
        yield {**base, **ev, **tail}
    if include_usage:
        yield {**base, "choices": [], "usage": usage}


def _dumps(obj: Any, indent: int | None = None) -> str:
    if isinstance(obj, str):  # the [DONE] sentinel
        return obj
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), indent=indent)


_FRAMES: dict[str, Callable[[Any], str]] = {
    "plain": lambda o: f"data: {_dumps(o)}\n\n",
    "crlf": lambda o: f"data: {_dumps(o)}\r\n\r\n",
    # One event's JSON over several `data:` lines; SSE joins them with "\n".
    "multiline": lambda o: "".join(f"data: {ln}\n" for ln in _dumps(o, 1).splitlines()) + "\n",
}


def _sse_blocks(chunks: Iterator[dict], scenario: str) -> list[bytes]:
    frame = _FRAMES.get(scenario, _FRAMES["plain"])
    blocks = [frame(c).encode() for c in chunks] + [frame("[DONE]").encode()]
    if scenario == "multiline":  # keep-alive comments between events
        blocks = [b for block in blocks for b in (KEEPALIVE, block)][1:]
    return blocks


# --- content-encodings: (per-event step, last) -------------------------------
# Each step flushes the compressor so that every event can be decoded as soon as
# it arrives, as a streaming server must.

_Codec = tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]


def _identity() -> _Codec:
    return (lambda d: d), (lambda d: d)


def _gzip() -> _Codec:
    c = zlib.compressobj(wbits=31)
    return (lambda d: c.compress(d) + c.flush(zlib.Z_SYNC_FLUSH)), (lambda d: c.compress(d) + c.flush())


def _br() -> _Codec:
    c = brotli.Compressor()
    return (lambda d: c.process(d) + c.flush()), (lambda d: c.process(d) + c.finish())


def _zstd() -> _Codec:
    c = zstandard.ZstdCompressor().compressobj()
    step = lambda d: c.compress(d) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)  # noqa: E731
    return step, (lambda d: c.compress(d) + c.flush())


_ENCODERS = {"": _identity, "gzip": _gzip, "br": _br, "zstd": _zstd}


# --- HTTP ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # immutable: _chat's are cached and shared
class _Response:
    status: int = 200
    body: bytes | tuple[bytes, ...] = b""  # a tuple is streamed chunked, one write per block
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False  # close before the end of the body


def _json(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> _Response:
    return _Response(status, _dumps(obj).encode(), headers=tuple(headers or ()))


def _error(status: int, message: str, type_: str, code: str | None = None, headers=None) -> _Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return _json(status, body, headers)


@functools.lru_cache(maxsize=16)
def _chat(raw: bytes, scenario: str | None, chunks: str | None) -> _Response:
    """A pure function of its arguments, hence the cache: a benchmark repeats the
    same request, and building a completion is most of the cost of answering."""
    try:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError included
        return _error(400, f"We could not parse the JSON body of your request: {e}", "invalid_request_error")
    model = body.get("model") if isinstance(body.get("model"), str) else DEFAULT_MODEL
    name = scenario or (model[8:] if model.startswith("standin-") else "text")
    if name in _ERRORS:
        status, type_, code, headers = _ERRORS[name]
        return _error(status, f"standin: simulated {status} ({name})", type_, code, headers)
    if name not in _SCENARIOS:
        return _error(400, f"unknown standin scenario {name!r}; known: {', '.join(SCENARIOS)}",
                      "invalid_request_error", "unknown_scenario")  # fmt: skip
    try:
        events = _SCENARIOS[name](_Ctx(body, raw, chunks))
    except (TypeError, ValueError) as e:  # bad `n`, bad x-standin-chunks...
        return _error(400, f"standin: {e}", "invalid_request_error")
    usage = _usage(events, body)
    events = _with_engine_tokens(events, body, usage)
    drop = name == "drop"
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        blocks = _sse_blocks(_stream_chunks(events, model, usage, include_usage), name)
        return _Response(body=tuple(blocks[:3] if drop else blocks), content_type="text/event-stream", drop=drop)
    return _Response(body=_dumps(_completion(events, model, usage)).encode(), drop=drop)


# The other APIs answer with the fixtures shaped like real captures: the
# scenario names a fixture (`<name>.sse` streamed one event per write, its
# `<name>.expected.json` as the non-stream body); default `text`.
# Package data, so that an installed `llm-traj demo` finds them too; pip installs
# packages as plain files, so the traversable is a filesystem path.
FIXTURES = Path(str(resources.files(__package__).joinpath("fixtures", "streams")))
FIXTURE_APIS = (("/v1/messages", "anthropic"), ("/responses", "responses"), ("/completions", "completions"))


@functools.lru_cache(maxsize=32)
def _from_fixture(folder: str, raw: bytes, scenario: str | None) -> _Response:
    try:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
    except ValueError as e:
        return _error(400, f"We could not parse the JSON body of your request: {e}", "invalid_request_error")
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    name = scenario or (model[8:] if model.startswith("standin-") else "text")
    fixture = FIXTURES / folder / f"{name}.sse"
    if not fixture.is_file():
        known = sorted(p.stem for p in (FIXTURES / folder).glob("*.sse"))
        return _error(400, f"unknown standin scenario {name!r} for {folder}; known: {', '.join(known)}",
                      "invalid_request_error", "unknown_scenario")  # fmt: skip
    if body.get("stream"):
        events = fixture.read_bytes().split(b"\n\n")
        return _Response(body=tuple(e + b"\n\n" for e in events if e.strip()), content_type="text/event-stream")
    return _Response(body=fixture.with_suffix(".expected.json").read_bytes())


def _route(req: ReceivedRequest, h: dict[str, str]) -> _Response:
    path = req.path.partition("?")[0]
    if req.method == "POST" and path.endswith("/chat/completions"):
        return _chat(req.body, h.get(SCENARIO_HEADER), h.get(CHUNKS_HEADER))
    for suffix, folder in FIXTURE_APIS:
        if req.method == "POST" and path.endswith(suffix):
            return _from_fixture(folder, req.body, h.get(SCENARIO_HEADER))
    if req.method == "GET" and path.endswith("/models"):
        return _json(200, MODELS)
    if req.method == "GET" and path == "/plain":
        return _Response(body=b"hello from standin\n", content_type="text/plain")
    return _error(404, f"Unknown request URL: {req.method} {path}.", "invalid_request_error", "unknown_url")


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *(f"{k}: {v}" for k, v in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, ignored
        pass
    return bytes(body)


class StandinServer:
    """The asyncio server. `StandinUpstream` runs one in a background thread,
    the CLI in the main thread. `record=False` keeps no history (long benchmarks)."""

    def __init__(self, tls: tuple[str, str] | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, record: bool = True) -> None:  # fmt: skip
        self.tls, self.host, self.port, self.record = tls, host, port, record
        self.url = ""
        self.connections = 0
        self.requests: list[ReceivedRequest] = []
        self.sent: list[SentResponse] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._failed: dict[str, int] = {}  # fail key -> failures sent

    async def start(self) -> None:
        ctx = None
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            ctx.set_alpn_protocols(["http/1.1"])

        def protocol() -> asyncio.Protocol:
            self.connections += 1  # at TCP accept, before any TLS handshake
            reader = asyncio.StreamReader(limit=_HEAD_LIMIT)
            return asyncio.StreamReaderProtocol(reader, self._connection)

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(protocol, self.host, self.port, ssl=ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if ctx else 'http'}://{self.host}:{self.port}"

    async def aclose(self) -> None:
        """Stop listening and close every connection (Server.close() leaves open
        connections alone before 3.12)."""
        if self._server:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server:
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task
        self._tasks.add(task)
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ssl.SSLError):
            pass  # the client went away or spoke garbage: drop the connection
        except asyncio.CancelledError:
            pass  # aclose(); end normally, StreamReaderProtocol logs a cancelled handler as an error
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request, answer it; whether the connection stays open."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # closed between requests
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        h = {k.lower(): v for k, v in headers}
        if h.get("expect", "").lower() == "100-continue":  # curl, for bodies > 1 KB
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in h.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        else:
            body = await reader.readexactly(int(h.get("content-length", 0)))
        req = ReceivedRequest(method, target, headers, body)
        if self.record:
            self.requests.append(req)
        keep = version == "HTTP/1.1" and h.get("connection", "").lower() != "close"

        enc, delay = h.get(ENCODING_HEADER, "").lower(), h.get(DELAY_HEADER, "0")
        if enc in _ENCODERS and delay.isdigit():
            resp = self._failure(req, h) or _route(req, h)
        else:
            resp = _error(400, f"bad {ENCODING_HEADER} or {DELAY_HEADER}", "invalid_request_error")
            enc, delay = "", "0"
        return await self._send(writer, resp, enc, int(delay) / 1000, keep) and keep

    async def _send(self, writer: asyncio.StreamWriter, resp: _Response, enc: str, delay: float, keep: bool) -> bool:
        """Write the response; False when it was cut short (connection to close)."""
        step, last = _ENCODERS[enc]()
        headers = [("content-type", resp.content_type)]
        headers += [("content-encoding", enc)] if enc else []
        headers += [*resp.headers, *([] if keep else [("connection", "close")])]
        if isinstance(resp.body, bytes):
            if delay:
                await asyncio.sleep(delay)
            data = last(resp.body)
            headers.insert(1, ("content-length", str(len(data))))
            if resp.drop:  # promise the whole body, send half
                data = data[: len(data) // 2]
            self._sent(SentResponse(resp.status, headers, data))
            writer.write(_head(resp.status, headers) + data)
            await writer.drain()
            return not resp.drop

        headers.insert(1, ("transfer-encoding", "chunked"))
        sent = self._sent(SentResponse(resp.status, headers))
        writer.write(_head(resp.status, headers))
        out = []
        for i, block in enumerate(resp.body):
            if delay and not block.startswith(b":"):  # comments are not events
                await asyncio.sleep(delay)
            final = i == len(resp.body) - 1 and not resp.drop
            data = (last if final else step)(block)
            out.append(data)
            if final or resp.drop:
                sent.body = b"".join(out)  # before the client can see the end
            frame = b"%x\r\n%s\r\n" % (len(data), data) if data else b""  # b"0\r\n" would end it
            writer.write(frame + b"0\r\n\r\n" if final else frame)  # one write per event
            await writer.drain()
        # `drop`: the caller closes the connection mid-body (no last chunk, no [DONE]);
        # a plain close rather than a RST so that the chunks sent surely arrive.
        return not resp.drop

    def _failure(self, req: ReceivedRequest, h: dict[str, str]) -> _Response | None:
        first = h.get(FAIL_FIRST_HEADER)
        if first is None:
            return None
        key = h.get(FAIL_KEY_HEADER) or req.path
        failed = self._failed.get(key, 0)
        if not first.isdigit() or failed >= int(first):
            return None
        self._failed[key] = failed + 1
        status = int(h.get(FAIL_STATUS_HEADER) or 500)
        headers = [(name, h[ours]) for ours, name in RETRY_AFTER_HEADERS.items() if ours in h]
        return _error(status, f"standin: transient failure {failed + 1} of {first}", "server_error", None, headers)

    def _sent(self, sent: SentResponse) -> SentResponse:
        if self.record:
            self.sent.append(sent)
        return sent


# --- in-process use ------------------------------------------------------------


class StandinUpstream:
    """A `StandinServer` on its own event loop in a background thread; a
    context manager (or `start()` / `stop()`). Reading `connections`,
    `requests` and `sent` from another thread is safe: the loop thread only
    increments / appends."""

    def __init__(self, tls: tuple[str, str] | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, record: bool = True) -> None:  # fmt: skip
        self.server = StandinServer(tls, host=host, port=port, record=record)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    url = property(lambda self: self.server.url)
    port = property(lambda self: self.server.port)
    connections = property(lambda self: self.server.connections)
    requests = property(lambda self: self.server.requests)
    sent = property(lambda self: self.server.sent)

    def start(self) -> StandinUpstream:
        self._thread = threading.Thread(target=self._run, name="standin-upstream", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error:
            self._thread.join()
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> StandinUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            try:
                loop.run_until_complete(self.server.start())
            except BaseException as e:  # reported by start() in the caller's thread
                self._error = e
                return
            finally:
                self._ready.set()
            loop.run_forever()
            loop.run_until_complete(self.server.aclose())
        finally:
            loop.close()


def make_self_signed_cert(directory: str | Path) -> tuple[str, str]:
    """Write `cert.pem` / `key.pem` for localhost and 127.0.0.1 into `directory`.
    The certificate is its own CA, so a client can trust exactly it:
    `ssl.create_default_context(cafile=cert)`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())  # fast to generate, unlike RSA
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "standin localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(certfile), str(keyfile)


# --- CLI -------------------------------------------------------------------------


async def _serve(server: StandinServer) -> None:
    await server.start()
    print(f"listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.aclose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmtraj.testing.standin", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: an ephemeral port")
    ap.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    ap.add_argument("--tls-key", help="... and this key (PEM)")
    args = ap.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    # No history: a long benchmark would otherwise keep every request in memory.
    asyncio.run(_serve(StandinServer(tls, host=args.host, port=args.port, record=False)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
